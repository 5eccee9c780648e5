"""Offline teacher cache: the teacher's top-k logits per token, written once, read by ``distill``.

Why: a 70B teacher does not fit beside the student, but its top-k logits do fit on disk
(``k = 64`` at fp32 values + int32 indices is 512 bytes per token). The cache is built in
one inference pass and distillation then trains without loading the teacher.

Layout of a cache directory::

    manifest.json            header (model, tokenizer hash, data spec, seq_len, top_k, ...)
                             + shards [{file, start, count, sha256}]; written last = complete
    manifest.partial.json    the same while building, written before the first shard (so a
                             kill at any point leaves a cache that resumes)
    shard-00000.safetensors  input_ids (n, T) int32, values (n, T, K), indices (n, T, K) int32

Every reader verifies a shard before its first use in a process: the manifest's sha256
(streamed, once per shard per process), the tensors' dtypes and shapes, token ids inside
the vocabulary and indices inside the teacher's logit width (``logits_width``, which a
teacher with a padded vocabulary records beyond the tokenizer's ``vocab_size``).

The sequences are the first ``n_sequences`` packed sequences of the data spec, in order
(:func:`slmcompress.data.packed_sequences`), so a live-teacher run sees the same text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmcompress.data import DataSpec, packed_sequences, resolved_split
from slmcompress.distill.losses import TopK, top_k_logits
from slmcompress.errors import DataError, PassError
from slmcompress.fsutil import (
    LOCK_FILE,
    DirectoryBusy,
    atomic_write_json,
    clean_stale_tmp,
    exclusive_lock,
    io_problem,
    is_disk_full,
    is_tmp_name,
    new_tmp_file,
    read_json_file,
    refuse_links_inside,
    safe_rmtree,
)
from slmcompress.io.load import open_streaming_model
from slmcompress.progress import progress_bar
from slmcompress.streaming.budget import StreamOptions
from slmcompress.streaming.forward import streamed_forward, top_k_head

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
WORK_DIR = ".work"  # streamed teachers: per-layer resume state of the shard in progress
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
    logits_width: int,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "logits_width": logits_width,
        "data": {**spec.model_dump(), "split": resolved_split(spec)},
        "seq_len": seq_len,
        "top_k": top_k,
        "n_sequences": n,
        "shard_size": shard_size,
        "values_dtype": values_dtype,
    }


_SHARD_FILE = re.compile(r"shard-[0-9]{5}\.safetensors")


class ShardRecord(BaseModel):
    """One ``shards`` entry of a manifest."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(pattern=f"^{_SHARD_FILE.pattern}$")  # a plain name: nothing outside the cache
    start: int = Field(ge=0)
    count: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class CacheManifest(BaseModel):
    """What ``manifest.json`` / ``manifest.partial.json`` must hold (checked before any use)."""

    model_config = ConfigDict(extra="allow")

    format_version: int
    model: str
    tokenizer: str
    vocab_size: int = Field(ge=1)
    logits_width: int | None = Field(None, ge=1)  # absent in caches written before it
    data: dict[str, Any]
    seq_len: int = Field(ge=1)
    top_k: int = Field(ge=1)
    n_sequences: int = Field(ge=1)
    shard_size: int = Field(ge=1)
    values_dtype: str
    shards: list[ShardRecord]


def read_manifest(path: Path) -> dict[str, Any] | None:
    """A validated cache manifest, ``None`` if absent; anything malformed is one line naming it."""
    if not path.exists() and not path.is_symlink():
        return None
    data = read_json_file(path, "teacher_cache", DataError)
    if not isinstance(data, dict):
        raise DataError(f"teacher_cache: {path} is not a teacher-cache manifest (not an object)")
    try:
        manifest = CacheManifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "manifest"
        message = "missing" if err["type"] == "missing" else err["msg"]
        raise DataError(f"teacher_cache: {path}: {field}: {message}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"teacher_cache: {path}: {problem}")
    return data


def _manifest_problem(m: CacheManifest) -> str | None:
    if m.values_dtype not in VALUE_DTYPES:
        return f"values_dtype: must be one of {', '.join(VALUE_DTYPES)}"
    if m.logits_width is not None and m.logits_width < m.vocab_size:
        return f"logits_width: {m.logits_width} is below vocab_size {m.vocab_size}"
    for i, shard in enumerate(m.shards):
        want_count = min(m.shard_size, m.n_sequences - i * m.shard_size)
        expected = (f"shard-{i:05d}.safetensors", i * m.shard_size, want_count)
        if (shard.file, shard.start, shard.count) != expected:
            return f"shards[{i}]: expected file/start/count {list(expected)}"
    return None


def _done_shards(out_dir: Path, header: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Verified shards of an earlier (interrupted) build, in order; None when complete.

    A listed shard that is missing or fails verification is recomputed, and so is every
    shard after it (they are written in order, so the list stays a prefix).
    """
    for name in (MANIFEST, PARTIAL):
        existing = read_manifest(out_dir / name)
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
        done = []
        for shard in existing["shards"]:
            try:
                verify_shard(out_dir, shard, existing)
            except DataError as exc:
                log.warning("teacher cache: recomputing from %s: %s", shard["file"], exc)
                break
            done.append(shard)
        return done
    return []


def _write_shard(path: Path, input_ids: torch.Tensor, targets: TopK, dtype: torch.dtype) -> None:
    """Write one shard via temp file + rename, so a kill never leaves a torn shard."""
    tensors = {
        "input_ids": input_ids.to(torch.int32).contiguous(),  # (n, T)
        "values": targets.values.to(dtype).contiguous(),  # (n, T, K)
        "indices": targets.indices.to(torch.int32).contiguous(),  # (n, T, K)
    }
    tmp = new_tmp_file(path)  # a name of ours: a rerun removes it if we are killed
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
    job.logits_width = _logits_width(model.config.vocab_size, tokenizer)
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

    stream = open_streaming_model(Path(model_dir), dtype)
    job = _CacheJob(tokenizer, data_spec, seq_len, top_k, n_sequences, shard_size, values_dtype)
    job.logits_width = _logits_width(stream.config.vocab_size, tokenizer)
    options = StreamOptions(
        max_memory=max_memory,
        batch_size=batch_size,
        pass_name="forward",
        key={"head": "top_k", "top_k": top_k},
    )

    def compute(index: int, ids: torch.Tensor) -> TopK:
        work = Path(out_dir) / WORK_DIR / f"shard-{index:05d}"
        rows = streamed_forward(stream, ids, top_k_head(top_k), device, work, options)
        safe_rmtree(work, Path(out_dir), ignore_errors=True)
        shape = (*ids.shape, top_k)  # (n, T, K)
        return TopK(values=rows["values"].view(shape), indices=rows["indices"].view(shape))

    return job.write(Path(out_dir), model_name or str(model_dir), compute, show_progress)


def _logits_width(config_vocab: int, tokenizer: PreTrainedTokenizerBase) -> int:
    """The teacher's logit width: its config's vocab_size (may be padded past the tokenizer)."""
    return int(config_vocab or len(tokenizer))


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
        self.logits_width = len(tokenizer)  # the builders set the teacher's own width

    def write(
        self,
        out_dir: Path,
        model_name: str,
        compute: Callable[[int, torch.Tensor], TopK],
        show_progress: bool,
    ) -> Path:
        """Take the directory's lock, then write what an earlier run did not finish.

        A full disk (or any write failure) is one line naming the cache, never a traceback.
        """
        out_dir = _cache_dir(out_dir)
        try:
            with exclusive_lock(out_dir):
                clean_stale_tmp(out_dir)  # temp shards of a killed earlier build
                written = self._fill(out_dir, model_name, compute, show_progress)
                safe_rmtree(out_dir / WORK_DIR, out_dir, ignore_errors=True)
                return written
        except DirectoryBusy as exc:
            raise DataError(
                f"teacher cache: {out_dir} is being written by another slmcompress process "
                f"(pid {exc.pid}); wait for it or use another --out"
            ) from None
        except DataError:
            raise
        except Exception as exc:  # safetensors/tokenizers raise their own types for a full disk
            if isinstance(exc, (OSError, SafetensorError)) or is_disk_full(exc):
                raise DataError(
                    f"teacher cache: cannot write {out_dir}: {io_problem(exc)}"
                ) from exc
            raise

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
            self.logits_width,
        )
        shards = _done_shards(out_dir, header)
        if shards is None:
            log.info("teacher cache %s is complete", out_dir)
            return out_dir
        # the cache's identity goes first: a kill before the first shard still resumes
        atomic_write_json(out_dir / PARTIAL, {**header, "shards": shards})
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
    """Create ``out_dir``; refuse a file, or a non-empty directory that is not a cache.

    Without a manifest, only our lock file and our own temp names count as ours (what a
    build killed before it wrote anything leaves); a user's ``.work`` folder does not.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"teacher cache: {out_dir} is a file, not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"teacher cache: cannot create {out_dir}: {exc.strerror or exc}") from None
    names = {e.name for e in out_dir.iterdir()}
    foreign = sorted(n for n in names if n != LOCK_FILE and not is_tmp_name(n))
    if foreign and not names & {MANIFEST, PARTIAL}:
        raise DataError(
            f"teacher cache: {out_dir} is not empty and is not a teacher cache (found "
            f"{foreign[0]!r}); use a new or empty --out"
        )
    refuse_links_inside(out_dir, out_dir / WORK_DIR, "teacher cache: ")
    return out_dir


#: shards verified in this process: (real path, inode, size, mtime, sha256) -> checked
_VERIFIED: set[tuple[str, int, int, int, str]] = set()


def verify_shard(directory: Path, shard: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Check one shard before use; one line naming it when it is missing or does not fit.

    The sha256 is streamed (no whole-file read) and remembered for this process, so a
    shard is hashed once however many readers open it. Then dtypes, shapes, token ids in
    the vocabulary and indices inside the teacher's logit width.
    """
    path = Path(directory) / shard["file"]
    if not path.is_file():
        raise DataError(f"teacher_cache: shard {path} is missing")
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, shard["sha256"])
    if key in _VERIFIED:
        return
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise DataError(f"teacher_cache: shard {path} cannot be read: {exc.strerror}") from None
    if digest != shard["sha256"]:
        raise DataError(
            f"teacher_cache: shard {path} is corrupt or truncated (sha256 {digest[:12]}..., "
            f"the manifest records {shard['sha256'][:12]}...); rebuild the cache"
        )
    problem = _shard_content_problem(path, shard, manifest)
    if problem:
        raise DataError(f"teacher_cache: shard {path} {problem}")
    _VERIFIED.add(key)


def _shard_content_problem(path: Path, shard: dict[str, Any], m: dict[str, Any]) -> str | None:
    """Dtype, shape and value-range checks of one shard (its hash already matched)."""
    n, k = shard["count"], m["top_k"]
    want = {
        "input_ids": ("I32", [n, m["seq_len"]]),
        "values": ({"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[m["values_dtype"]],
                   [n, m["seq_len"], k]),
        "indices": ("I32", [n, m["seq_len"], k]),
    }  # fmt: skip
    try:
        with safe_open(str(path), framework="pt") as handle:
            for name, (dtype, shape) in want.items():
                if name not in handle.keys():
                    return f"has no tensor {name!r}"
                got = handle.get_slice(name)
                if got.get_dtype() != dtype or list(got.get_shape()) != shape:
                    return f"tensor {name} is {got.get_dtype()} {got.get_shape()}, expected {dtype} {shape}"
            ids, indices = handle.get_tensor("input_ids"), handle.get_tensor("indices")
            values = handle.get_tensor("values")
    except SafetensorError as exc:
        return f"is not a safetensors file ({exc})"
    width = m.get("logits_width") or m["vocab_size"]
    for name, tensor, limit in (("input_ids", ids, m["vocab_size"]), ("indices", indices, width)):
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= limit):
            return (
                f"holds {name} from {int(tensor.min())} to {int(tensor.max())}, outside "
                f"[0, {limit}) (the recorded {'vocab_size' if limit == m['vocab_size'] else 'logits_width'})"
            )
    if not bool(torch.isfinite(values).all()):
        return "holds NaN or infinite logit values"
    return None


class TeacherCache:
    """Reads a complete teacher cache: the token ids and the top-k targets of any sequence.

    Each shard is verified (:func:`verify_shard`) before its first use, whatever the reader.
    """

    def __init__(self, directory: Path, verify: bool = False) -> None:
        self.directory = Path(directory)
        manifest = read_manifest(self.directory / MANIFEST)
        if manifest is None:
            partial = (self.directory / PARTIAL).is_file()
            state = (
                "is incomplete (rerun teacher-cache to finish it)"
                if partial
                else "has no manifest.json"
            )
            raise DataError(f"teacher_cache: {self.directory} {state}")
        n_cached = sum(s["count"] for s in manifest["shards"])
        if n_cached != manifest["n_sequences"]:
            raise DataError(
                f"teacher_cache: {self.directory / MANIFEST}: its shards hold {n_cached} "
                f"sequences, n_sequences says {manifest['n_sequences']}"
            )
        self.manifest = manifest
        self.shard_size: int = manifest["shard_size"]
        self._handles: dict[str, Any] = {}
        if verify:
            self.verify()

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

    @property
    def logits_width(self) -> int:
        """Width of the teacher's logits (its padded vocabulary; old caches: the tokenizer's)."""
        return self.manifest.get("logits_width") or self.manifest["vocab_size"]

    def verify(self) -> None:
        """Check every shard now (readers otherwise check each before its first use)."""
        for shard in self.manifest["shards"]:
            verify_shard(self.directory, shard, self.manifest)

    def check_compatible(
        self,
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        where: str,
        vocab_size: int | None = None,
    ) -> None:
        """The student must share the teacher's vocabulary and the training sequence length.

        ``vocab_size``: the student's logit width; a teacher whose logits are wider (a padded
        vocabulary) could name targets the student has no logit for, so it is refused here,
        before training, instead of failing with an index error inside the loss.
        """
        if self.manifest["tokenizer"] != tokenizer_fingerprint(tokenizer):
            raise PassError(
                f"{where}.teacher_cache: built with a different tokenizer "
                f"(vocab {self.manifest['vocab_size']} vs the student's {len(tokenizer)})"
            )
        if vocab_size is not None and self.logits_width > vocab_size:
            raise PassError(
                f"{where}.teacher_cache: the teacher's logits are {self.logits_width} wide (its "
                f"vocabulary is padded past the tokenizer's {self.manifest['vocab_size']}), the "
                f"student's {vocab_size}; its top-k may name tokens the student has no logit for"
            )
        if self.seq_len != seq_len:
            raise PassError(
                f"{where}.seq_len: {seq_len} differs from the teacher cache's seq_len {self.seq_len}"
            )

    def _open(self, shard: dict[str, Any]):
        if shard["file"] not in self._handles:
            verify_shard(self.directory, shard, self.manifest)
            try:
                handle = safe_open(str(self.directory / shard["file"]), framework="pt")
            except (OSError, SafetensorError) as exc:
                raise DataError(
                    f"teacher_cache: shard {self.directory / shard['file']} cannot be read ({exc})"
                ) from None
            self._handles[shard["file"]] = handle
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
