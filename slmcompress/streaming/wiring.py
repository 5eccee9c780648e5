"""How the GPTQ and prune passes hand their calibration loop to the streaming engine.

A pass streams when its stage config says ``streaming: true``, or (``streaming`` unset)
when the model it receives is a weightless skeleton: :func:`lazy_model_for` is what a
runner calls instead of loading a model that exceeds ``max_memory``. When the pass got a
skeleton it also returns one, pointing (``LAZY_ATTR``) at the sharded checkpoint it wrote,
which the runner moves into the stage directory instead of loading and re-saving it. Streaming needs the
stage's input as a safetensors directory, which is where the model was loaded from
(``model.name_or_path``) or where the skeleton was built from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmcompress.errors import PassError
from slmcompress.streaming.engine import StreamOptions, should_stream
from slmcompress.versions import versions

log = logging.getLogger(__name__)

LAZY_ATTR = "_slm_stream_source"


def is_lazy(model: PreTrainedModel) -> bool:
    """A skeleton whose parameters live on the meta device (never loaded)."""
    return any(p.device.type == "meta" for p in model.parameters())


def source_dir(model: PreTrainedModel) -> Path | None:
    """The safetensors directory the model was loaded (or its skeleton built) from."""
    for candidate in (getattr(model, LAZY_ATTR, None), getattr(model, "name_or_path", None)):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    return None


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a checkpoint (streamed stages never load the model)."""
    from transformers import AutoTokenizer

    from slmcompress.remote_code import hf_kwargs

    return AutoTokenizer.from_pretrained(directory, **hf_kwargs())


def move_streamed_checkpoint(
    streamed: Path | None, target: Path, metadata: dict[str, Any], work_dir: Path
) -> None:
    """Put a pass's sharded output into the stage's temp dir; merge the stage metadata.

    Output the pass wrote under ``work_dir`` is moved (a rename per file, so a 70B result is
    never copied or loaded). A skeleton still pointing at its *input* (a pass that changed
    nothing) is hard-linked or copied: the input directory is never touched.
    """
    if streamed is None or not (Path(streamed) / "config.json").is_file():
        raise PassError("streaming: the pass returned no streamed checkpoint to move into place")
    streamed = Path(streamed).resolve()
    owned = streamed.is_relative_to(Path(work_dir).resolve())
    meta_path = streamed / "slmcompress.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    for path in streamed.iterdir():
        if not path.is_file():
            continue
        if owned:
            os.replace(path, Path(target) / path.name)
        elif path.name not in ("report.json", "report.md"):
            try:
                os.link(path, Path(target) / path.name)
            except OSError:  # another filesystem
                shutil.copy2(path, Path(target) / path.name)
    meta.update(metadata, format_version=1, versions=versions())
    (Path(target) / "slmcompress.json").unlink(missing_ok=True)  # a link to the input's file
    (Path(target) / "slmcompress.json").write_text(
        json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"
    )
    if owned:
        shutil.rmtree(streamed, ignore_errors=True)


def wants_streaming(cfg: Any, model: PreTrainedModel) -> bool:
    """``streaming: true``, or unset and the model is a skeleton."""
    flag = getattr(cfg, "streaming", None)
    return bool(flag) or (flag is None and is_lazy(model))


def options_for(cfg: Any, ctx: Any = None) -> StreamOptions:
    """The stage's streaming options; its ``max_memory`` falls back to the recipe's."""
    return StreamOptions(
        max_memory=getattr(cfg, "max_memory", None) or getattr(ctx, "max_memory", None),
        batch_size=getattr(cfg, "batch_size", 1),
        activation_offload=getattr(cfg, "activation_offload", "auto"),
    )


def _require_source(model: PreTrainedModel, what: str) -> Path:
    directory = source_dir(model)
    if directory is None:
        raise PassError(
            f"{what}: streaming needs the stage's input model as a local safetensors directory"
        )
    return directory


def streamed_gptq(gptq_pass: Any, model: PreTrainedModel, ctx: Any) -> PreTrainedModel | None:
    """Run GPTQ through the streaming engine if asked; ``None`` means "use the in-memory loop"."""
    if not wants_streaming(gptq_pass.config, model):
        return None
    from slmcompress.checkpoint import load_checkpoint
    from slmcompress.streaming.drivers import gptq_streaming

    directory = _require_source(model, "quantize.gptq")
    out = Path(ctx.work_dir) / "streamed-checkpoint"
    log.info(
        "gptq: streaming %s layer by layer (budget %s)",
        directory,
        gptq_pass.config.max_memory or "auto",
    )
    gptq_streaming(gptq_pass, directory, ctx, out, options_for(gptq_pass.config, ctx))
    ctx.extra_metrics["streamed_from"] = str(directory)
    if is_lazy(model):  # too big to load: the runner moves the sharded result into place
        setattr(model, LAZY_ATTR, str(out))
        return model
    quantized, _tokenizer = load_checkpoint(out, dtype=ctx.dtype)
    return quantized.to(ctx.device).eval()


def streamed_importance(
    prune_pass: Any, model: PreTrainedModel, ctx: Any, tokens: torch.Tensor, block_size: int
) -> Any | None:
    """Minitron activation importance through the streaming engine if asked (bit-identical scores)."""
    if not wants_streaming(prune_pass.config, model):
        return None
    from slmcompress.streaming.drivers import activation_importance_streaming

    directory = _require_source(model, "prune")
    return activation_importance_streaming(
        directory,
        tokens,
        ctx.device,
        Path(ctx.work_dir) / "importance",
        options_for(prune_pass.config, ctx),
        ctx.dtype,
        block_size,
        head_metric=getattr(prune_pass.config, "head_metric", "projected_output"),
    )


def can_stream(stage_config: Any) -> bool:
    """Passes whose whole job runs layer by layer from disk: GPTQ, and activation/random pruning."""
    if getattr(stage_config, "type", None) == "prune":
        return getattr(stage_config, "method", None) in ("activation", "random")
    return getattr(stage_config, "method", None) == "gptq"


def lazy_model_for(
    model_dir: Path,
    stage_config: Any,
    dtype: torch.dtype,
    activation_bytes: int = 0,
    default_max_memory: str | None = None,
) -> PreTrainedModel | None:
    """For a runner: a weightless skeleton when this stage should stream, else ``None`` (load normally).

    A stage streams when it says ``streaming: true``, or leaves ``streaming`` unset and the
    model exceeds its ``max_memory`` (else the recipe's, else most of the free RAM).
    """
    flag = getattr(stage_config, "streaming", False)
    if flag is False or not can_stream(stage_config):
        return None
    budget = getattr(stage_config, "max_memory", None) or default_max_memory
    decision = should_stream(model_dir, budget, dtype, activation_bytes)
    if not (flag or decision.stream):
        return None
    log.info("streaming: %s", decision.reason)
    from slmcompress.streaming.loader import build_skeleton

    skeleton = build_skeleton(Path(model_dir), dtype)
    setattr(skeleton, LAZY_ATTR, str(model_dir))
    return skeleton
