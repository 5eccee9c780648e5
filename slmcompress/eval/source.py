"""Evaluate any model source, in memory when it fits the budget, streamed when it does not.

The library side of ``slmcompress eval``: a 70B checkpoint on a 24 GiB host still gets its
perplexity (one decoder layer resident), with task accuracy and speed reported as skipped.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slmcompress.cli_checks import check_context
from slmcompress.data import EvalSpec
from slmcompress.errors import SlmError


@dataclass
class SourceEvaluation:
    """Metrics, timings and model summary of one evaluated source, with how it was run."""

    metrics: dict[str, Any]
    timings: dict[str, float]
    summary: dict[str, Any]
    streamed: bool
    notes: list[str] = field(default_factory=list)


def evaluate_source(
    source: str,
    spec: EvalSpec,
    options: Any,
    device: str = "auto",
    dtype: str = "auto",
    max_memory: str | None = None,
) -> SourceEvaluation:
    """Evaluate ``source`` (alias, directory, .gguf, hub id) within the host budget."""
    from slmcompress.eval.report import evaluate, model_summary
    from slmcompress.models import load_model, resolve_device, resolve_dtype
    from slmcompress.streaming.engine import machine_budget, should_stream

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    budget = max_memory or machine_budget()
    decision = should_stream(source, budget, torch_dtype)
    if decision.stream:
        return _streamed(source, spec, options, dev, torch_dtype, budget, decision.reason)
    if str(source).endswith(".gguf"):
        _check_gguf_budget(Path(source).expanduser(), budget, torch_dtype)
    loaded = load_model(source, dtype=dtype, device=device)
    check_context(
        getattr(loaded.model.config, "max_position_embeddings", None), spec.seq_len, "--seq-len"
    )
    metrics, timings = evaluate(loaded.model, loaded.tokenizer, spec, options)
    return SourceEvaluation(metrics, timings, model_summary(loaded.model, loaded.local_dir), False)


def _check_gguf_budget(path: Path, budget: int | str, dtype: torch.dtype) -> None:
    """A .gguf is dequantized whole into memory (it cannot be streamed): refuse one over budget."""
    from slmcompress.memory_model import BASE_RSS, SLACK, format_bytes
    from slmcompress.model_sources import gguf_param_count
    from slmcompress.streaming.engine import resolve_budget

    elem = dtype.itemsize
    need = int(gguf_param_count(path) * elem * SLACK) + BASE_RSS
    limit = resolve_budget(budget)
    if need > limit:
        raise SlmError(
            f"--max-memory: {path} needs ~{format_bytes(need)} loaded (a .gguf is dequantized "
            f"to {str(dtype).removeprefix('torch.')} whole and cannot be streamed), over the "
            f"budget {format_bytes(limit)}; raise --max-memory, or export a safetensors "
            "checkpoint to stream"
        )


def _streamed(source, spec, options, device, dtype, budget, reason) -> SourceEvaluation:
    from slmcompress.eval.report import summary_from_checkpoint
    from slmcompress.eval.streamed import evaluate_streamed
    from slmcompress.memory_model import load_config
    from slmcompress.models import resolve_model_dir
    from slmcompress.streaming.wiring import load_tokenizer

    directory = resolve_model_dir(source)
    check_context(load_config(directory).get("max_position_embeddings"), spec.seq_len, "--seq-len")
    with tempfile.TemporaryDirectory(prefix="slmcompress-eval-") as work:
        metrics, timings = evaluate_streamed(
            directory, load_tokenizer(directory), spec, options, device, dtype, Path(work), budget
        )
    note = f"{reason}: perplexity streamed one decoder layer at a time; tasks and speed skipped"
    return SourceEvaluation(metrics, timings, summary_from_checkpoint(directory), True, [note])
