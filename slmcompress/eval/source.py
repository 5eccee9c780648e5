"""``slmcompress eval``'s library side: evaluate any model source within the host budget.

A local checkpoint (alias or directory) goes to :func:`~slmcompress.eval.artifact.evaluate_artifact`
as a directory, so a 70B checkpoint on a 24 GiB host still gets its perplexity (one decoder
layer resident), with task accuracy and speed reported as skipped. A ``.gguf`` file or hub id
has no directory to stream from: it is loaded and evaluated in memory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from slmcompress.data import EvalOptions, EvalSpec, check_context
from slmcompress.errors import SlmError
from slmcompress.eval.artifact import EvalBudget, Evaluation, evaluate_artifact
from slmcompress.io.checkpoint import CheckpointInfo, read_checkpoint
from slmcompress.io.load import load_resolved
from slmcompress.io.sources import (
    BUILTIN_MODELS,
    check_model_source,
    gguf_param_count,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
)
from slmcompress.memory_model import BASE_RSS, SLACK, format_bytes, load_config
from slmcompress.streaming.budget import machine_budget, resolve_budget


def evaluate_source(
    source: str,
    spec: EvalSpec,
    options: EvalOptions,
    device: str = "auto",
    dtype: str = "auto",
    max_memory: str | None = None,
) -> Evaluation:
    """Evaluate ``source`` (alias, directory, .gguf, hub id) within the host budget.

    Unlike a run's report, a model that cannot be measured at all (a budget too small to
    stream even one layer) is an error here: the user asked for exactly these numbers.
    """
    check_model_source(source)  # the remote-code check of a directory, made once here
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    directory = resolve_model_dir(source)

    def load(info: CheckpointInfo | None):
        loaded = load_resolved(source, info, torch_dtype, dev)
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
        check_context(limit, spec.seq_len, "--seq-len")
        return loaded.model, loaded.tokenizer

    with tempfile.TemporaryDirectory(prefix="slmcompress-eval-") as work:
        budget = EvalBudget(max_memory or machine_budget(), dev, torch_dtype, Path(work))
        if directory is None:  # .gguf or hub id: in memory
            if str(source).endswith(".gguf"):
                _check_gguf_budget(Path(source).expanduser(), budget.max_memory, torch_dtype)
            model, tokenizer = load(None)
            return evaluate_artifact(model, spec, options, budget, tokenizer=tokenizer)
        limit = load_config(directory).get("max_position_embeddings")
        check_context(limit, spec.seq_len, "--seq-len")
        resolve_budget(budget.max_memory)  # a bad --max-memory before the checkpoint, as ever
        # read once (config, headers; a built-in's cache directory gets its code check
        # here), then handed down to whichever load the budget picks
        info = read_checkpoint(directory, "checkpoint" if source in BUILTIN_MODELS else None)
        result = evaluate_artifact(info, spec, options, budget, load=load)
    if result.not_evaluated and options.ppl and result.metrics.get("wikitext2_ppl") is None:
        raise SlmError(result.not_evaluated.warning)
    return result


def _check_gguf_budget(path: Path, budget: int | str, dtype: torch.dtype) -> None:
    """A .gguf is dequantized whole into memory (it cannot be streamed): refuse one over budget."""
    need = int(gguf_param_count(path) * dtype.itemsize * SLACK) + BASE_RSS
    limit = resolve_budget(budget)
    if need > limit:
        raise SlmError(
            f"--max-memory: {path} needs ~{format_bytes(need)} loaded (a .gguf is dequantized "
            f"to {str(dtype).removeprefix('torch.')} whole and cannot be streamed), over the "
            f"budget {format_bytes(limit)}; raise --max-memory, or export a safetensors "
            "checkpoint to stream"
        )
