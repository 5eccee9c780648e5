"""Loading a causal LM from any model source (see :mod:`slmcompress.model_sources`).

The source-resolution helpers (built-in aliases, the cache, devices and dtypes) live in
:mod:`slmcompress.model_sources`, below checkpoints and streaming; they are re-exported
here, where most callers import them from.
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

from slmcompress.checkpoint import load_checkpoint
from slmcompress.errors import ModelSourceError, first_line
from slmcompress.kernels.dispatch import prepare_for_serving
from slmcompress.model_sources import (
    check_model_source,
    load_gguf,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
)
from slmcompress.remote_code import hf_kwargs


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
    torch_dtype = resolve_dtype(dtype, dev)
    local_dir = resolve_model_dir(source)
    if local_dir is not None:
        model, tokenizer = load_checkpoint(local_dir, dtype=torch_dtype)
    elif source.endswith(".gguf"):
        path = Path(source).expanduser()
        model, tokenizer = load_gguf(path, torch_dtype)
    else:
        model, tokenizer = _load_hub(source, torch_dtype)
    model.to(dev).eval()
    if getattr(model.config, "quantization_config", None):
        prepare_for_serving(model)  # GPTQ layers onto their kernel (int4 CPU / Triton)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, local_dir=local_dir)


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
