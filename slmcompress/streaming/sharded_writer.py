"""Size-limited safetensors shards + ``model.safetensors.index.json``, written incrementally.

The output of a 70B run never has to fit in memory: each tensor is appended to the open
shard file as soon as it is added (memory = one tensor), and the shard's header is filled
in when the shard is closed. To make that possible the header region is reserved up front
and padded with spaces, which the safetensors format allows ("the header may be trailing
padded with whitespace"); a shard is closed early if its header would outgrow the reserve.

Everything is written inside :func:`slmcompress.fsutil.atomic_dir`: the checkpoint
directory appears under its final name only when every shard, the index and the config
files are complete. A float result loads with plain ``from_pretrained``; a GPTQ result
with :func:`slmcompress.io.checkpoint.load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from slmcompress.errors import CheckpointError
from slmcompress.fsutil import atomic_dir

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9
HEADER_RESERVE = 256 * 1024  # bytes; ~1500 tensor entries per shard
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class _Shard:
    """One shard file being written: reserved header, then tensor data appended in order."""

    def __init__(self, path: Path, reserve: int) -> None:
        self.path, self.reserve = path, reserve
        self.handle: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.handle.write(b"\0" * (8 + reserve))
        self.header: dict[str, Any] = {}
        self.nbytes = 0

    def header_size_with(self, name: str, tensor: torch.Tensor) -> int:
        entry = {name: _entry(tensor, 0, 0)}
        return len(json.dumps(self.header | entry, separators=(",", ":"))) + 64

    def append(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.handle.write(memoryview(data))
        self.header[name] = _entry(tensor, self.nbytes, self.nbytes + data.nbytes)
        self.nbytes += data.nbytes

    def finish(self) -> None:
        """Write the header into the reserved space (space-padded) and close the file."""
        text = json.dumps(
            {"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")
        ).encode()
        if len(text) > self.reserve:
            raise CheckpointError(f"checkpoint: header of {self.path.name} outgrew its reserve")
        self.handle.seek(0)
        self.handle.write(
            self.reserve.to_bytes(8, "little") + text + b" " * (self.reserve - len(text))
        )
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


def _entry(tensor: torch.Tensor, begin: int, end: int) -> dict[str, Any]:
    if tensor.dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"checkpoint: cannot store dtype {tensor.dtype} in safetensors")
    return {
        "dtype": _DTYPE_NAMES[tensor.dtype],
        "shape": list(tensor.shape),
        "data_offsets": [begin, end],
    }


class ShardedWriter:
    """Append tensors; shards roll over at ``max_shard_bytes``; ``close()`` writes the index."""

    def __init__(
        self,
        directory: Path,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        header_reserve: int = HEADER_RESERVE,
    ) -> None:
        self.directory, self.max_shard_bytes, self.reserve = (
            Path(directory),
            max_shard_bytes,
            header_reserve,
        )
        self._shards: list[_Shard] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor now (memory never holds more than this tensor)."""
        if name in self._names:
            raise CheckpointError(f"checkpoint: tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        shard = self._shards[-1] if self._shards else None
        if (
            shard is None
            or (shard.nbytes and shard.nbytes + nbytes > self.max_shard_bytes)
            or (shard.header_size_with(name, tensor) > self.reserve)
        ):
            shard = self._open_shard()
        try:
            shard.append(name, tensor)
        except OSError as exc:
            raise _write_error(exc, shard.path) from exc
        self._names.add(name)
        self.total_bytes += nbytes

    def add_many(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.add(name, tensor)

    def _open_shard(self) -> _Shard:
        if self._shards:
            self._finish(self._shards[-1])
        shard = _Shard(self.directory / f".shard-{len(self._shards) + 1:05d}.partial", self.reserve)
        self._shards.append(shard)
        return shard

    def _finish(self, shard: _Shard) -> None:
        if shard.handle.closed:
            return
        try:
            shard.finish()
        except OSError as exc:
            raise _write_error(exc, shard.path) from exc

    def close(self) -> list[Path]:
        """Finish the last shard, give shards their final names, write the index."""
        if not self._shards:
            self._open_shard()
        self._finish(self._shards[-1])
        n = len(self._shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        weight_map = {}
        for shard, name in zip(self._shards, names, strict=True):
            os.replace(shard.path, self.directory / name)
            weight_map.update({key: name for key in shard.header})
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [self.directory / name for name in names]

    def abort(self) -> None:
        for shard in self._shards:
            if not shard.handle.closed:
                shard.handle.close()


def _write_error(exc: OSError, path: Path) -> CheckpointError:
    what = "disk full" if exc.errno == errno.ENOSPC else "cannot write"
    return CheckpointError(
        f"checkpoint: {what} while writing {path.name} in {path.parent}: {exc.strerror or exc}"
    )


@contextlib.contextmanager
def sharded_checkpoint(
    target: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> Iterator[ShardedWriter]:
    """Yield a writer into a temp dir that becomes ``target`` only if the block completes."""
    with atomic_dir(Path(target)) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        try:
            yield writer
            writer.close()
        except BaseException:
            writer.abort()
            raise


def copy_side_files(source_dir: Path, target_dir: Path) -> None:
    """Tokenizer and generation files of the source model (everything but weights/config)."""
    skip = {"config.json", INDEX_FILE}
    for path in Path(source_dir).iterdir():
        if (
            path.is_file()
            and path.name not in skip
            and not path.name.endswith((".safetensors", ".bin", ".pt"))
        ):
            shutil.copy2(path, Path(target_dir) / path.name)


def save_state_sharded(
    state: dict[str, torch.Tensor],
    target: Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write an in-memory state dict as a sharded checkpoint (plus text files such as config.json)."""
    with sharded_checkpoint(target, max_shard_bytes) as writer:
        writer.add_many(state)
        for name, text in (extra_files or {}).items():
            (writer.directory / name).write_text(text)
    return Path(target)
