"""torchrun awareness: ``torchrun --nproc_per_node=N -m slmcompress run RECIPE``.

Only passes that declare ``supports_distributed`` (distillation) run on every rank; every
other stage, all checkpoint writing and all evaluation happen on rank 0 while the other
ranks wait at a barrier and then pick up rank 0's checkpoint from disk.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# Rank 0 may spend a long time alone (GPTQ, evaluation) while the others wait.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


def env_world_size() -> int:
    """World size announced by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env() -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); no-op otherwise."""
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes checkpoints, reports and manifests."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def local_device(default: torch.device) -> torch.device:
    """Each rank computes on its own GPU (LOCAL_RANK); CPU ranks share the CPU."""
    if is_distributed() and default.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return default
