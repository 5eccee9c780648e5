"""Helpers for tests that start torchrun-like gloo ranks with ``torch.multiprocessing``."""

from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    """A TCP port nobody listens on (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_rank(rank: int, world: int, port: int) -> None:
    """Join a gloo group the way torchrun would set it up (env vars + one CPU thread)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
