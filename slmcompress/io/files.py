"""Checkpoint files on disk: safetensors headers, and the one writer of the JSON beside weights.

Every path that produces a checkpoint (the in-memory save in :mod:`slmcompress.io.checkpoint`,
the streamed GPTQ assembly, the streamed prune export, the runner publishing a stage)
writes ``slmcompress.json`` and ``quantize_config.json`` through :func:`write_metadata` and
:func:`write_quantize_config`, so their format lives in one place. Safetensors headers
are parsed here, without mmap (a 5 GB shard costs no address space to inspect).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slmcompress.errors import CheckpointError
from slmcompress.fsutil import atomic_write_text, read_json_file
from slmcompress.versions import versions

METADATA_FILE = "slmcompress.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
METADATA_FORMAT_VERSION = 1

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: shard file, byte range of its data, dtype and shape."""

    path: Path
    start: int  # absolute file offset of the first byte
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


def parse_header(path: Path) -> tuple[int, dict]:
    """(data section offset, header dict) of a safetensors file, read without mmap.

    Raises ``OSError`` / ``ValueError``; :func:`read_header` words them for the user.
    """
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        if header_len <= 0 or header_len > 100_000_000:
            raise ValueError(f"implausible header length {header_len}")
        return 8 + header_len, json.loads(handle.read(header_len))


def read_header(path: Path) -> tuple[int, dict]:
    """Parse a safetensors header; return (data section offset, header dict)."""
    try:
        return parse_header(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: weight shard {path} is missing") from None
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint: weight shard {path} is corrupt ({exc})") from exc


def header_entries(path: Path, base: int, header: dict) -> dict[str, TensorEntry]:
    """The tensors a parsed header names (``base``: its data section offset)."""
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(
            path, base + begin, end - begin, info["dtype"], tuple(info["shape"])
        )
    return entries


def shard_entries(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of one shard; raises CheckpointError naming the shard if it is truncated."""
    base, header = read_header(path)
    entries = header_entries(path, base, header)
    needed = base + max((e.start - base + e.nbytes for e in entries.values()), default=0)
    size = path.stat().st_size
    if size < needed:
        raise CheckpointError(
            f"checkpoint: weight shard {path} is truncated ({size} bytes, its header needs {needed})"
        )
    return entries


def shard_paths(model_dir: Path) -> list[Path]:
    """The shard files named by the index (or the single ``model.safetensors``)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint: {index} is not a valid safetensors index") from exc
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and "/" not in name for name in weight_map.values()
        ):
            raise CheckpointError(
                f"checkpoint: {index}: weight_map must map tensor names to shard file names"
            )
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise CheckpointError(f"checkpoint: {model_dir} has no {SINGLE_FILE} or {INDEX_FILE}")


# ---------------------------------------------------------------- JSON beside the weights
def new_metadata(metadata: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """``slmcompress.json`` content: format version and library versions, then ``metadata``."""
    return {
        "format_version": METADATA_FORMAT_VERSION,
        "versions": versions(),
        **fields,
        **(metadata or {}),
    }


def write_metadata(directory: Path, meta: dict[str, Any], atomic: bool = False) -> None:
    """Write ``slmcompress.json`` (sorted keys; ``atomic``: temp file + rename, for a published dir)."""
    path = Path(directory) / METADATA_FILE
    text = json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"
    if atomic:
        atomic_write_text(path, text)
    else:
        path.unlink(missing_ok=True)  # may be a hard link to the input checkpoint's file
        path.write_text(text)


def read_metadata(directory: Path) -> dict[str, Any]:
    """The ``slmcompress.json`` of a checkpoint dir (empty dict if absent).

    A file that is not a JSON object is a one-line CheckpointError naming it.
    """
    path = Path(directory) / METADATA_FILE
    if not path.exists() and not path.is_symlink():
        return {}
    meta = read_json_file(path, "checkpoint", CheckpointError)
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint: {path} must hold a JSON object")
    return meta


def write_quantize_config(directory: Path, quantization_config: dict[str, Any] | None) -> None:
    """``quantize_config.json`` beside a GPTQ checkpoint (AutoGPTQ/GPTQModel read it)."""
    qcfg = quantization_config
    if isinstance(qcfg, dict) and qcfg.get("quant_method") == "gptq":
        (Path(directory) / QUANTIZE_CONFIG_FILE).write_text(json.dumps(qcfg, indent=2) + "\n")
