"""Streaming drivers: GPTQ and importance scoring over a model that never fits in memory.

They reuse the passes' per-layer code (the GPTQ pass's ``_quantize_layer``; the importance
statistics below mirror the prune pass's definitions) on :class:`StreamingRun` steps, save
each layer's result as a resume point, and assemble the final artifact shard by shard.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmcompress.passes.base import Context
from slmcompress.recipe import RUNTIME_FIELDS
from slmcompress.streaming.engine import StreamingRun, StreamOptions
from slmcompress.streaming.loader import StreamingModel
from slmcompress.streaming.sharded_writer import (
    DEFAULT_SHARD_BYTES,
    copy_side_files,
    sharded_checkpoint,
)
from slmcompress.versions import versions

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- GPTQ
@torch.no_grad()
def gptq_streaming(
    gptq_pass: Any,
    model_dir: Path,
    ctx: Context,
    out_dir: Path,
    options: StreamOptions | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: dict[str, Any] | None = None,
    tokens: torch.Tensor | None = None,
    max_layers: int | None = None,
) -> Path | None:
    """Quantize ``model_dir`` with a :class:`~slmcompress.passes.gptq.GPTQPass`'s settings, streamed.

    Writes a sharded GPTQ v1 checkpoint to ``out_dir`` (atomically) and returns it.
    """
    cfg = gptq_pass.config
    stream = StreamingModel(Path(model_dir), ctx.dtype)
    targets = gptq_pass._targets(stream.model, ctx)
    if tokens is None:
        tokens = ctx.calibration_tokens(cfg.n_samples, cfg.seq_len)  # (N, T)
    options = replace(
        options or StreamOptions(),
        batch_size=cfg.batch_size,
        pass_name="gptq",
        key={"gptq": cfg.model_dump(exclude=RUNTIME_FIELDS)},
    )
    run = StreamingRun(stream, tokens, ctx.device, ctx.work_dir, options, ctx.dtype)
    gptq_pass._groups_cache = {}
    prefix = stream.layer_prefix.rstrip(".")
    layer_indices = [max_layers - 1] if max_layers else None
    for step in run.steps(layer_indices):
        name = f"{prefix}.{step.index}"
        errors = gptq_pass.quantize_step(step, name, stream.model, targets, ctx)
        rtn = ctx.extra_metrics["rtn_layer_errors"].get(name, {})
        meta = {"errors": errors, "rtn_errors": rtn}
        run.save_result(step.index, _prefixed(step.layer, name), meta)
    if max_layers and max_layers < stream.num_layers():
        return None  # partial run (benchmarks): results stay in the work dir for a later resume
    qcfg = cfg.quantization_config()
    metas = {f"{prefix}.{i}": run.load_meta(i) for i in range(stream.num_layers())}
    errors = {name: meta.get("errors", {}) for name, meta in metas.items()}
    # resumed layers were quantized by an earlier process: their RTN figures come from disk
    ctx.extra_metrics["rtn_layer_errors"] = {
        name: meta.get("rtn_errors", {}) for name, meta in metas.items()
    }
    ctx.extra_metrics["gptq_layer_errors"] = errors
    ctx.extra_metrics["quantized_linears"] = sum(len(e) for e in errors.values())
    from slmcompress.passes.gptq import error_vs_rtn  # the pass imports this module

    ctx.extra_metrics["gptq_vs_rtn_output_err"] = error_vs_rtn(errors, ctx)
    out = assemble_checkpoint(
        run, out_dir, {"quantization_config": qcfg}, max_shard_bytes, metadata
    )
    return out


def _prefixed(layer: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for k, v in layer.state_dict().items()}


def assemble_checkpoint(
    run: StreamingRun,
    out_dir: Path,
    config_updates: dict[str, Any],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Non-layer tensors from the source + every layer's saved result -> sharded HF checkpoint."""
    stream = run.stream
    config = stream.config.to_dict()
    config.update(config_updates, torch_dtype=str(stream.dtype).removeprefix("torch."))
    with sharded_checkpoint(Path(out_dir), max_shard_bytes) as writer:
        for name in stream.non_layer_names():
            writer.add(name, stream.source.get(name, stream.dtype))
        for index in range(stream.num_layers()):
            tensors, _meta = run.load_result(index)
            writer.add_many(tensors)
            del tensors
        copy_side_files(stream.model_dir, writer.directory)
        (writer.directory / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n"
        )
        qcfg = config_updates.get("quantization_config")
        if qcfg:
            (writer.directory / "quantize_config.json").write_text(
                json.dumps(qcfg, indent=2) + "\n"
            )
        meta = {"format_version": 1, "versions": versions(), "streamed": True, **(metadata or {})}
        (writer.directory / "slmcompress.json").write_text(
            json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"
        )
    return Path(out_dir)


# ---------------------------------------------------------------- importance
@torch.no_grad()
def score_step(step: Any, parts: Any) -> dict[str, torch.Tensor]:
    """The prune pass's Minitron statistics of one layer step (its :class:`LayerParts`), plus
    its ``depth`` score (1 - cos between the layer's input and output); sets the step's outputs."""
    tensors, meta = minitron_layer_scores(step, parts)
    return {**tensors, "depth": torch.tensor([meta["cos_total"] / max(meta["cos_count"], 1)])}


@torch.no_grad()
def importance_streaming(
    model_dir: Path,
    tokens: torch.Tensor,
    device: torch.device,
    work_dir: Path,
    options: StreamOptions | None = None,
    dtype: torch.dtype = torch.float32,
    scorer: Any = score_step,
) -> dict[str, torch.Tensor]:
    """Per-layer importance scores of a streamed model: ``{"<layer>.<statistic>": scores}``.

    ``scorer`` is swappable so tests can interrupt a run at a chosen layer.
    """
    stream = StreamingModel(Path(model_dir), dtype)
    options = replace(
        options or StreamOptions(),
        pass_name="importance",
        key={"importance": getattr(scorer, "__qualname__", "scorer")},
    )
    from slmcompress.arch import layer_parts
    from slmcompress.prune.importance import check_supported

    family = check_supported(stream.model)
    run = StreamingRun(stream, tokens, device, work_dir, options, dtype)
    prefix = stream.layer_prefix.rstrip(".")
    for step in run.steps():
        scores = scorer(step, layer_parts(step.layer, family, stream.config))
        run.save_result(step.index, {f"{prefix}.{step.index}.{k}": v for k, v in scores.items()})
    result: dict[str, torch.Tensor] = {}
    for index in range(stream.num_layers()):
        result.update(run.load_result(index)[0])
    return result


# ---------------------------------------------------------------- Minitron importance (prune pass)
@torch.no_grad()
def minitron_layer_scores(
    step: Any, parts: Any, head_metric: str = "projected_output"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One layer of :func:`slmcompress.prune.importance.activation_importance`, as a saved result.

    Uses the prune module's own hooks and statistics, so the scores are bit-identical; the
    per-layer cosine sum is kept as a float in the metadata for the exact same division.
    """
    from slmcompress.prune.importance import _LayerHooks, cosine_importance

    hooks = _LayerHooks(parts, parts.n_heads, head_metric)
    try:
        outputs = step.forward(keep_outputs=True)
    finally:
        hooks.remove()
    step.set_outputs(outputs)
    total, count = 0.0, 0
    for batch, out in zip(step.inputs, outputs, strict=True):
        s, n = cosine_importance(batch.hidden, out)
        total, count = total + s, count + n
    tensors = {
        "heads": hooks.head_values(),
        "neurons": hooks.neurons.value(),
        "hidden": hooks.hidden.value(),
    }
    return tensors, {"cos_total": total, "cos_count": count}


@torch.no_grad()
def activation_importance_streaming(
    model_dir: Path,
    tokens: torch.Tensor,
    device: torch.device,
    work_dir: Path,
    options: StreamOptions | None = None,
    dtype: torch.dtype = torch.float32,
    block_size: int = 1,
    head_metric: str = "projected_output",
) -> Any:
    """:func:`~slmcompress.prune.importance.activation_importance` over a streamed model (resumable)."""
    from slmcompress.arch import layer_parts
    from slmcompress.errors import PassError
    from slmcompress.prune.importance import Importance, check_supported

    if block_size != 1:
        raise PassError(
            "importance: streaming scores single layers only (block_size 1); "
            "use depth_mode/ block scoring in memory"
        )
    stream = StreamingModel(Path(model_dir), dtype)
    family = check_supported(stream.model)
    options = replace(
        options or StreamOptions(),
        pass_name="importance",
        key={"importance": "minitron-activation", "head_metric": head_metric},
    )
    run = StreamingRun(stream, tokens, device, work_dir, options, dtype)
    for step in run.steps():
        parts = layer_parts(step.layer, family, stream.config)
        tensors, meta = minitron_layer_scores(step, parts, head_metric)
        run.save_result(step.index, tensors, meta)
    heads, neurons, cos, hidden = [], [], [], None
    for index in range(stream.num_layers()):
        tensors, meta = run.load_result(index)
        heads.append(tensors["heads"])
        neurons.append(tensors["neurons"])
        hidden = tensors["hidden"] if hidden is None else hidden + tensors["hidden"]
        cos.append(meta["cos_total"] / meta["cos_count"])
    return Importance(
        heads=heads,
        neurons=neurons,
        hidden=hidden,
        layers=torch.tensor(cos),
        blocks=torch.tensor(cos),
        block_size=1,
        method="activation",
        extra={"depth_metric": "cosine", "head_metric": head_metric, "streamed": True},
    )
