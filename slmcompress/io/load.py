"""Loading a model: any source into memory, ready to serve, or a checkpoint layer by layer.

The top of :mod:`slmcompress.io`: a load goes down from here, resolving the source
(:mod:`~slmcompress.io.sources`), reading the checkpoint once
(:func:`~slmcompress.io.checkpoint.read_checkpoint`: config, remote-code check, headers)
and handing what was read on, to :func:`~slmcompress.io.checkpoint.load_checkpoint` or to
the streaming loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from slmcompress.errors import ModelSourceError, first_line
from slmcompress.io.checkpoint import (
    CheckpointInfo,
    load_checkpoint,
    quant_linear_swapper,
    read_checkpoint,
)
from slmcompress.io.gptq_checkpoint import parse_gptq_config
from slmcompress.io.remote_code import hf_kwargs
from slmcompress.io.sources import (
    BUILTIN_MODELS,
    check_model_source,
    load_gguf,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
)
from slmcompress.kernels.dispatch import prepare_for_serving
from slmcompress.streaming.loader import StreamingModel, WeightSource, build_skeleton


@dataclass
class LoadedModel:
    """A model, its tokenizer and the directory it was loaded from (for reloading)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    local_dir: Path | None


def load_model(
    source: str, dtype: str = "auto", device: str | torch.device = "auto"
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any supported source.

    Args:
        source: built-in alias (``slmcompress models``), HF directory (float or an
            slmcompress GPTQ checkpoint), ``.gguf`` file, or hub id.
        dtype: ``auto`` | ``float32`` | ``bfloat16`` | ``float16``.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.

    GPTQ checkpoints come back ready to serve (:func:`~slmcompress.kernels.dispatch.prepare_for_serving`);
    ``SLMCOMPRESS_KERNEL=torch`` keeps the plain-torch reference path.
    """
    check_model_source(source)
    dev = resolve_device(device)
    local_dir = resolve_model_dir(source)
    # check_model_source made the remote-code check on a directory the user named
    checked = local_dir is not None and source not in BUILTIN_MODELS
    local = read_checkpoint(local_dir, None if checked else "checkpoint") if local_dir else None
    return load_resolved(source, local, resolve_dtype(dtype, dev), dev)


def load_resolved(
    source: str, local: CheckpointInfo | None, dtype: torch.dtype, device: torch.device
) -> LoadedModel:
    """:func:`load_model` of a source already checked and resolved: ``local`` is its
    checkpoint read once (alias or directory), ``None`` for a .gguf file or hub id."""
    if local is not None:
        model, tokenizer = load_checkpoint(local, dtype=dtype)
    elif source.endswith(".gguf"):
        model, tokenizer = load_gguf(Path(source).expanduser(), dtype)
    else:
        model, tokenizer = _load_hub(source, dtype)
    model.to(device).eval()
    if getattr(model.config, "quantization_config", None):
        prepare_for_serving(model)  # GPTQ layers onto their kernel (int4 CPU / Triton)
    local_dir = local.directory if local is not None else None
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, local_dir=local_dir)


def open_streaming_model(checkpoint: Path | CheckpointInfo, dtype: torch.dtype) -> StreamingModel:
    """A checkpoint (float or GPTQ) whose layers are read from disk one at a time.

    ``checkpoint``: a directory, or the :class:`CheckpointInfo` a caller already read (its
    headers become the weight source; the remote-code check is not made again).
    """
    if isinstance(checkpoint, CheckpointInfo):
        info = checkpoint
    else:
        info = read_checkpoint(checkpoint)
    qcfg = info.config.get("quantization_config")
    fmt = info.gptq or (parse_gptq_config(qcfg, f"{info.directory}/config.json") if qcfg else None)
    prepare = quant_linear_swapper(fmt) if fmt is not None else None
    source = WeightSource(info.directory, info.entries())
    skeleton = build_skeleton(
        info.directory, dtype, allow_quantized=prepare is not None, code_checked=True
    )
    return StreamingModel(info.directory, dtype, prepare, skeleton=skeleton, source=source)


def _load_hub(source: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load from the Hugging Face hub (or its local cache when offline)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hf_kwargs())
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **hf_kwargs())
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(
            f"model: cannot load hub id {source!r} (offline or unknown; use a built-in alias, "
            f"a local directory or a .gguf file): {first_line(exc)}"
        ) from exc
    return model, tokenizer
