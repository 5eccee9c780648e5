"""Offline teacher cache: the teacher's top-k logits per token, written once, read by ``distill``.

Why: a 70B teacher does not fit beside the student, but its top-k logits do fit on disk
(``k = 64`` at fp32 values + int32 indices is 512 bytes per token). The cache is built in
one inference pass and distillation then trains without loading the teacher.

Layout of a cache directory::

    manifest.json            header (model, tokenizer hash, data spec, seq_len, top_k, ...)
                             + shards [{file, start, count, sha256}]; written last = complete
    manifest.partial.json    the same while building (resume skips the shards it lists)
    shard-00000.safetensors  input_ids (n, T) int32, values (n, T, K), indices (n, T, K) int32

The sequences are the first ``n_sequences`` packed sequences of the data spec, in order
(:func:`slmcompress.data.packed_sequences`), so a live-teacher run sees the same text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmcompress.data import DataSpec, packed_sequences, resolved_split
from slmcompress.distill.losses import TopK, top_k_logits
from slmcompress.errors import DataError, PassError
from slmcompress.fsutil import LOCK_FILE, DirectoryBusy, atomic_write_json, exclusive_lock
from slmcompress.progress import progress_bar

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary (token -> id): equal hashes mean interchangeable token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _header(
    model_name: str,
    tokenizer,
    spec: DataSpec,
    seq_len: int,
    top_k: int,
    n: int,
    shard_size: int,
    values_dtype: str,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "data": {**spec.model_dump(), "split": resolved_split(spec)},
        "seq_len": seq_len,
        "top_k": top_k,
        "n_sequences": n,
        "shard_size": shard_size,
        "values_dtype": values_dtype,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _done_shards(out_dir: Path, header: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Shards already written by an earlier (interrupted) build; None when complete."""
    for name in (MANIFEST, PARTIAL):
        existing = _read_json(out_dir / name)
        if existing is None:
            continue
        if {k: existing.get(k) for k in header} != header:
            diff = sorted(k for k in header if existing.get(k) != header[k])
            raise DataError(
                f"teacher cache: {out_dir} holds a cache built with other settings "
                f"({', '.join(diff)}); use another --out or delete it"
            )
        if name == MANIFEST:
            return None
        return [s for s in existing["shards"] if (out_dir / s["file"]).is_file()]
    return []


def _write_shard(path: Path, input_ids: torch.Tensor, targets: TopK, dtype: torch.dtype) -> None:
    """Write one shard via temp file + rename, so a kill never leaves a torn shard."""
    tensors = {
        "input_ids": input_ids.to(torch.int32).contiguous(),  # (n, T)
        "values": targets.values.to(dtype).contiguous(),  # (n, T, K)
        "indices": targets.indices.to(torch.int32).contiguous(),  # (n, T, K)
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a torn temp file behind
        raise


@torch.no_grad()
def teacher_top_k(
    model: PreTrainedModel, input_ids: torch.Tensor, top_k: int, batch_size: int
) -> TopK:
    """The teacher's top-k logits for ``input_ids`` (n, T) in micro-batches, on CPU."""
    device = next(model.parameters()).device
    values, indices = [], []
    for start in range(0, input_ids.shape[0], batch_size):
        batch = input_ids[start : start + batch_size].to(device)  # (b, T)
        logits = model(input_ids=batch, use_cache=False).logits  # (b, T, V)
        targets = top_k_logits(logits, top_k)
        values.append(targets.values.cpu())
        indices.append(targets.indices.cpu())
    return TopK(values=torch.cat(values), indices=torch.cat(indices))


def build_teacher_cache(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data_spec: DataSpec,
    seq_len: int,
    top_k: int,
    out_dir: Path,
    n_sequences: int | None = None,
    *,
    batch_size: int = 4,
    shard_size: int = 256,
    values_dtype: str = "float32",
    model_name: str | None = None,
    show_progress: bool = True,
) -> Path:
    """Write (or finish writing) a teacher cache; returns ``out_dir``. See the module docstring.

    Args:
        n_sequences: how many packed sequences to cache (default: all of the data).
        values_dtype: ``float32`` (exact) | ``bfloat16`` | ``float16`` (half the size).
    """
    name = model_name or str(getattr(model, "name_or_path", "") or model.config.name_or_path)
    job = _CacheJob(tokenizer, data_spec, seq_len, top_k, n_sequences, shard_size, values_dtype)
    return job.write(
        Path(out_dir),
        name,
        lambda _index, ids: teacher_top_k(model, ids, top_k, batch_size),
        show_progress,
    )


def build_streamed_teacher_cache(
    model_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    data_spec: DataSpec,
    seq_len: int,
    top_k: int,
    out_dir: Path,
    n_sequences: int | None = None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_memory: int | str | None = None,
    batch_size: int = 4,
    shard_size: int = 256,
    values_dtype: str = "float32",
    model_name: str | None = None,
    show_progress: bool = True,
) -> Path:
    """The same cache from a teacher larger than memory: one streamed forward per shard.

    Each shard (``shard_size`` sequences) is one pass over the weights, so a shard should
    hold enough tokens that computing on them costs more than reading the model (see
    ``plan``). A kill resumes at the last finished shard, and inside it at the last
    finished decoder layer (``out_dir/.work``).
    """
    from slmcompress.checkpoint import open_streaming_model
    from slmcompress.streaming.budget import StreamOptions
    from slmcompress.streaming.forward import streamed_forward, top_k_head

    stream = open_streaming_model(Path(model_dir), dtype)
    job = _CacheJob(tokenizer, data_spec, seq_len, top_k, n_sequences, shard_size, values_dtype)
    options = StreamOptions(
        max_memory=max_memory,
        batch_size=batch_size,
        pass_name="forward",
        key={"head": "top_k", "top_k": top_k},
    )

    def compute(index: int, ids: torch.Tensor) -> TopK:
        work = Path(out_dir) / ".work" / f"shard-{index:05d}"
        rows = streamed_forward(stream, ids, top_k_head(top_k), device, work, options)
        shutil.rmtree(work, ignore_errors=True)
        shape = (*ids.shape, top_k)  # (n, T, K)
        return TopK(values=rows["values"].view(shape), indices=rows["indices"].view(shape))

    written = job.write(Path(out_dir), model_name or str(model_dir), compute, show_progress)
    shutil.rmtree(Path(out_dir) / ".work", ignore_errors=True)
    return written


class _CacheJob:
    """What a cache holds (sequences and header fields); writes the shards still missing."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        data_spec: DataSpec,
        seq_len: int,
        top_k: int,
        n_sequences: int | None,
        shard_size: int,
        values_dtype: str,
    ) -> None:
        if values_dtype not in VALUE_DTYPES:
            raise DataError(f"teacher cache: values_dtype must be one of {', '.join(VALUE_DTYPES)}")
        sequences = packed_sequences(tokenizer, data_spec, seq_len)  # (N, T)
        n = n_sequences or sequences.shape[0]
        if n > sequences.shape[0] or n < 1:
            raise DataError(
                f"teacher cache: {data_spec.source} has {sequences.shape[0]} sequences of "
                f"{seq_len} tokens, {n} requested"
            )
        self.sequences = sequences[:n]
        self.tokenizer, self.data_spec, self.seq_len, self.top_k = (
            tokenizer,
            data_spec,
            seq_len,
            top_k,
        )
        self.shard_size, self.values_dtype = shard_size, values_dtype

    def write(
        self,
        out_dir: Path,
        model_name: str,
        compute: Callable[[int, torch.Tensor], TopK],
        show_progress: bool,
    ) -> Path:
        """Take the directory's lock, then write what an earlier run did not finish."""
        out_dir = _cache_dir(out_dir)
        try:
            with exclusive_lock(out_dir):
                return self._fill(out_dir, model_name, compute, show_progress)
        except DirectoryBusy as exc:
            raise DataError(
                f"teacher cache: {out_dir} is being written by another slmcompress process "
                f"(pid {exc.pid}); wait for it or use another --out"
            ) from None

    def _fill(
        self,
        out_dir: Path,
        model_name: str,
        compute: Callable[[int, torch.Tensor], TopK],
        show_progress: bool,
    ) -> Path:
        n = self.sequences.shape[0]
        header = _header(
            model_name,
            self.tokenizer,
            self.data_spec,
            self.seq_len,
            self.top_k,
            n,
            self.shard_size,
            self.values_dtype,
        )
        shards = _done_shards(out_dir, header)
        if shards is None:
            log.info("teacher cache %s is complete", out_dir)
            return out_dir
        n_shards = math.ceil(n / self.shard_size)
        with progress_bar("teacher cache", total=n_shards, enabled=show_progress) as advance:
            advance(len(shards), info="resumed" if shards else "")
            for index in range(len(shards), n_shards):
                start, stop = index * self.shard_size, min(n, (index + 1) * self.shard_size)
                path = out_dir / f"shard-{index:05d}.safetensors"
                ids = self.sequences[start:stop]  # (n, T)
                _write_shard(path, ids, compute(index, ids), VALUE_DTYPES[self.values_dtype])
                shards.append(
                    {
                        "file": path.name,
                        "start": start,
                        "count": stop - start,
                        "sha256": file_sha256(path),
                    }
                )
                atomic_write_json(out_dir / PARTIAL, {**header, "shards": shards})
                advance(1)
        atomic_write_json(out_dir / MANIFEST, {**header, "shards": shards, "complete": True})
        (out_dir / PARTIAL).unlink(missing_ok=True)
        return out_dir


def _cache_dir(out_dir: Path) -> Path:
    """Create ``out_dir``; refuse a file, or a non-empty directory that is not a cache."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"teacher cache: {out_dir} is a file, not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"teacher cache: cannot create {out_dir}: {exc.strerror or exc}") from None
    ours = {MANIFEST, PARTIAL, LOCK_FILE, ".work"}
    names = {e.name for e in out_dir.iterdir()}
    if names and not names & {MANIFEST, PARTIAL} and names - ours:
        raise DataError(
            f"teacher cache: {out_dir} is not empty and is not a teacher cache; "
            "use a new or empty --out"
        )
    return out_dir


class TeacherCache:
    """Reads a complete teacher cache: the token ids and the top-k targets of any sequence."""

    def __init__(self, directory: Path, verify: bool = False) -> None:
        self.directory = Path(directory)
        manifest = _read_json(self.directory / MANIFEST)
        if manifest is None:
            partial = (self.directory / PARTIAL).is_file()
            state = (
                "is incomplete (rerun teacher-cache to finish it)"
                if partial
                else "has no manifest.json"
            )
            raise DataError(f"teacher_cache: {self.directory} {state}")
        self.manifest = manifest
        self.shard_size: int = manifest["shard_size"]
        if verify:
            self.verify()
        self._handles: dict[str, Any] = {}

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"TeacherCache({m['model']}: {m['n_sequences']} sequences x {m['seq_len']} tokens, "
            f"top-{m['top_k']} {m['values_dtype']}, {len(m['shards'])} shards)"
        )

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def n_sequences(self) -> int:
        return self.manifest["n_sequences"]

    def verify(self) -> None:
        """Check every shard against the sha256 recorded in the manifest."""
        for shard in self.manifest["shards"]:
            path = self.directory / shard["file"]
            if not path.is_file() or file_sha256(path) != shard["sha256"]:
                raise DataError(f"teacher_cache: {path} is missing or corrupt (sha256 mismatch)")

    def check_compatible(
        self, tokenizer: PreTrainedTokenizerBase, seq_len: int, where: str
    ) -> None:
        """The student must share the teacher's vocabulary and the training sequence length."""
        if self.manifest["tokenizer"] != tokenizer_fingerprint(tokenizer):
            raise PassError(
                f"{where}.teacher_cache: built with a different tokenizer "
                f"(vocab {self.manifest['vocab_size']} vs the student's {len(tokenizer)})"
            )
        if self.seq_len != seq_len:
            raise PassError(
                f"{where}.seq_len: {seq_len} differs from the teacher cache's seq_len {self.seq_len}"
            )

    def _open(self, shard: dict[str, Any]):
        if shard["file"] not in self._handles:
            self._handles[shard["file"]] = safe_open(
                str(self.directory / shard["file"]), framework="pt"
            )
        return self._handles[shard["file"]]

    def tokens(self) -> torch.Tensor:
        """All cached token ids, ``(n_sequences, seq_len)`` int64."""
        return torch.cat(
            [self._open(s).get_tensor("input_ids") for s in self.manifest["shards"]]
        ).long()

    def targets(self, sequence_ids: torch.Tensor) -> TopK:
        """Top-k targets of the given sequences, ``(B, T, K)`` float32 values / int64 indices."""
        values, indices = [], []
        for seq in sequence_ids.tolist():
            shard = self.manifest["shards"][seq // self.shard_size]
            row = seq - shard["start"]
            handle = self._open(shard)
            values.append(handle.get_slice("values")[row : row + 1])
            indices.append(handle.get_slice("indices")[row : row + 1])
        return TopK(values=torch.cat(values).float(), indices=torch.cat(indices).long())
