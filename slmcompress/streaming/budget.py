"""What a streamed run may use, and whether a model must stream: the budget decision.

The part of :mod:`slmcompress.streaming` that passes, the runner and evaluation consult to
decide residency (:func:`should_stream`, the host budgets) or to configure a streamed run
(:class:`StreamOptions`); the engine and the loader behind it stay internal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from slmcompress.io.sources import resolve_model_dir
from slmcompress.memory_model import (
    BASE_RSS,
    DEFAULT_MEMORY_FRACTION,
    SLACK,
    ModelDims,
    format_bytes,
    load_config,
    parse_bytes,
)
from slmcompress.streaming.activations import OffloadMode
from slmcompress.streaming.sharded_writer import DEFAULT_SHARD_BYTES


@dataclass(frozen=True)
class StreamOptions:
    """How a streaming run may use memory and disk."""

    max_memory: int | str | None = None  # host bytes; None = a fraction of available RAM
    activation_offload: OffloadMode = "auto"
    batch_size: int = 1
    resume: bool = True
    pass_name: str = "gptq"  # for the working-set estimate in the budget check
    key: dict[str, Any] = field(default_factory=dict)  # what the pass result depends on
    max_shard_bytes: int = DEFAULT_SHARD_BYTES  # of the checkpoint ``finish`` writes


def default_budget() -> int:
    """A fraction of the host memory available now (other jobs share this machine)."""
    return int(psutil.virtual_memory().available * DEFAULT_MEMORY_FRACTION)


def machine_budget() -> int:
    """A fraction of the host's total RAM: the runner's default, the same on every run."""
    return int(psutil.virtual_memory().total * DEFAULT_MEMORY_FRACTION)


def resolve_budget(max_memory: int | str | None) -> int:
    return default_budget() if max_memory in (None, "auto") else parse_bytes(max_memory)


def device_budget(device: torch.device) -> int | None:
    """Free memory of a CUDA device (None on CPU: the host budget covers it)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * 0.9)


# ---------------------------------------------------------------- decision
@dataclass(frozen=True)
class StreamDecision:
    """Whether a model should be streamed, and why (logged by the passes)."""

    stream: bool
    model_bytes: int
    budget_bytes: int
    reason: str


def should_stream(
    model_source: str | Path,
    max_memory: int | str | None = None,
    dtype: torch.dtype = torch.float32,
    activation_bytes: int = 0,
) -> StreamDecision:
    """Stream when the model (at the compute dtype) plus activations exceed the host budget."""
    model_dir = resolve_model_dir(str(model_source))
    if model_dir is None:
        return StreamDecision(False, 0, 0, "not a local safetensors directory; streaming needs one")
    try:
        arch = ModelDims.from_config(load_config(model_dir))
    except (KeyError, TypeError, ValueError):  # e.g. GPT-2 configs: not a layout we stream
        return StreamDecision(
            False, 0, 0, "architecture not understood by the planner; not streamed"
        )
    elem = dtype.itemsize
    need = int((arch.params() * elem + activation_bytes) * SLACK) + BASE_RSS
    budget = resolve_budget(max_memory)
    stream = need > budget
    verb = "exceeds" if stream else "fits in"
    return StreamDecision(
        stream,
        need,
        budget,
        f"model needs ~{format_bytes(need)}, {verb} the budget {format_bytes(budget)}",
    )
