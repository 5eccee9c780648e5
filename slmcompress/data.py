"""Data sources: shipped built-ins, local .txt/.jsonl files and ``datasets`` hub ids.

Calibration and training data are tokenized, concatenated (documents separated by EOS)
and cut into fixed-length sequences; a seeded permutation picks the samples, so the same
spec + seed always yields the same tokens. Evaluation text is never used for calibration
or training (:func:`check_disjoint`).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import PreTrainedTokenizerBase

from slmcompress.errors import DataError, SlmError
from slmcompress.fsutil import regular_file_problem

log = logging.getLogger(__name__)

# name -> split -> (file inside slmcompress/data_files, format)
BUILTIN_DATA: dict[str, dict[str, tuple[str, str]]] = {
    "wikitext2": {
        "test": ("wikitext2/test_rows.jsonl", "wikitext_rows"),
        "validation": ("wikitext2/valid.txt", "lines"),
    },
    "c4": {"validation": ("c4/c4_validation_2k.jsonl", "jsonl")},
    "hellaswag": {"validation": ("hellaswag/hellaswag_val_2k.jsonl", "hellaswag")},
}
DEFAULT_SPLIT = {"wikitext2": "validation", "c4": "validation", "hellaswag": "validation"}


class DataSpec(BaseModel):
    """Where text comes from: ``source`` is a built-in name, a local path or a hub id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "c4"
    split: str | None = None
    text_field: str = "text"


class CalibrationSpec(DataSpec):
    """Calibration data: ``n_samples`` packed sequences of ``seq_len`` tokens."""

    n_samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=8)


class EvalSpec(DataSpec):
    """Perplexity data: the first ``max_tokens`` tokens in non-overlapping ``seq_len`` windows."""

    source: str = "wikitext2"
    split: str | None = "test"
    max_tokens: int = Field(16384, ge=16)
    seq_len: int = Field(512, ge=8)


class DataConfig(BaseModel):
    """The recipe's ``data:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calibration: CalibrationSpec = CalibrationSpec()
    eval: EvalSpec = EvalSpec()


def data_file(relative: str) -> Path:
    """Path of a shipped data file."""
    return Path(__file__).parent / "data_files" / relative


def resolved_split(spec: DataSpec) -> str | None:
    if spec.source in BUILTIN_DATA:
        return spec.split or DEFAULT_SPLIT[spec.source]
    return spec.split


def spec_identity(spec: DataSpec) -> tuple[str, str | None]:
    """What makes two specs the same text (for overlap checks)."""
    source = spec.source
    if source not in BUILTIN_DATA and Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())
    return source, resolved_split(spec)


def check_disjoint(train: DataSpec, evaluation: DataSpec, what: str = "data.calibration") -> None:
    """Refuse calibrating/training on the evaluation text."""
    if spec_identity(train) == spec_identity(evaluation):
        raise DataError(
            f"{what}: uses the evaluation data ({train.source}/{resolved_split(train)}); "
            "calibrate and train on validation/C4, evaluate on test"
        )


def check_spec(spec: DataSpec, where: str) -> None:
    """Cheap validation before any weights load: the source exists and the split is known."""
    if spec.source in BUILTIN_DATA:
        split = resolved_split(spec)
        if split not in BUILTIN_DATA[spec.source]:
            valid = ", ".join(BUILTIN_DATA[spec.source])
            raise DataError(f"{where}.split: {spec.source} has no split {split!r}; valid: {valid}")
        return
    path = Path(spec.source).expanduser()
    if (
        path.suffix in (".txt", ".jsonl", ".json")
        or path.exists()
        or spec.source.startswith((".", "/", "~"))
    ):
        if path.is_dir():
            raise DataError(f"{where}.source: {spec.source} is a directory, not a data file")
        problem = regular_file_problem(path)  # a FIFO or /dev/zero would block or never end
        if problem:
            raise DataError(f"{where}.source: data file {spec.source} {problem}")
        if path.stat().st_size == 0:
            raise DataError(f"{where}.source: data file {spec.source} is empty")


def load_texts(spec: DataSpec) -> list[str]:
    """The documents of a data spec, in file order."""
    return list(_load_texts_cached(spec.source, resolved_split(spec), spec.text_field))


@lru_cache(maxsize=16)
def _load_texts_cached(source: str, split: str | None, text_field: str) -> tuple[str, ...]:
    if source in BUILTIN_DATA:
        relative, fmt = BUILTIN_DATA[source][split]
        return tuple(_read_file(data_file(relative), fmt, text_field))
    path = Path(source).expanduser()
    if path.is_file():
        fmt = "jsonl" if path.suffix in (".jsonl", ".json") else "text"
        texts = _read_file(path, fmt, text_field)
        if not any(t.strip() for t in texts):
            raise DataError(f"data: {path} contains no text")
        return tuple(texts)
    return tuple(_load_hub_texts(source, split or "train", text_field))


def _read_file(path: Path, fmt: str, text_field: str) -> list[str]:
    if path.is_dir():
        raise DataError(f"data: {path} is a directory, not a data file")
    if not path.is_file():
        raise DataError(f"data: file {path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data: {path} is not UTF-8 text (byte {exc.start} cannot be decoded); "
            "give a .txt or .jsonl text file"
        ) from None
    except OSError as exc:
        raise DataError(f"data: cannot read {path}: {exc.strerror or exc}") from None
    if not raw.strip():
        raise DataError(f"data: file {path} is empty")
    if fmt == "text":
        return [raw]
    if fmt == "lines":
        return ["".join(raw.splitlines(keepends=True))]
    rows = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"data: {path}:{number} is not valid JSON") from exc
        if not isinstance(record, dict):
            raise DataError(
                f"data: {path}:{number} is a JSON {type(record).__name__}, not an object "
                f"with a {text_field!r} field"
            )
        if fmt == "hellaswag":
            rows.append(record["ctx"] + " " + record["endings"][record["label"]])
        elif text_field not in record:
            raise DataError(f"data: {path}:{number} has no field {text_field!r}")
        elif not isinstance(record[text_field], str):
            kind = type(record[text_field]).__name__
            raise DataError(f"data: {path}:{number}: field {text_field!r} is a {kind}, not text")
        else:
            rows.append(record[text_field])
    if fmt == "wikitext_rows":
        # The GPTQ/SparseGPT evaluation string: rows joined by blank lines.
        return ["\n\n".join(rows)]
    return rows


def _load_hub_texts(source: str, split: str, text_field: str) -> list[str]:
    try:
        import datasets

        dataset = datasets.load_dataset(source, split=split)
    except Exception as exc:  # noqa: BLE001
        raise DataError(
            f"data: cannot load dataset {source!r} split {split!r} (offline or unknown; use a "
            f"built-in name: {', '.join(BUILTIN_DATA)}, or a local .txt/.jsonl): {str(exc).splitlines()[0]}"
        ) from exc
    if text_field not in dataset.column_names:
        raise DataError(f"data: dataset {source!r} has no column {text_field!r}")
    return list(dataset[text_field])


def token_stream(tokenizer: PreTrainedTokenizerBase, spec: DataSpec) -> torch.Tensor:
    """All documents tokenized and concatenated, EOS between documents: ``(N,)`` int64."""
    return _token_stream_cached(tokenizer, spec.source, resolved_split(spec), spec.text_field)


_STREAM_CACHE: dict[tuple, torch.Tensor] = {}


def _token_stream_cached(
    tokenizer, source: str, split: str | None, text_field: str
) -> torch.Tensor:
    key = (tokenizer.name_or_path, len(tokenizer), source, split, text_field)
    if key not in _STREAM_CACHE:
        texts = list(_load_texts_cached(source, split, text_field))
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            if eos is not None and len(texts) > 1:
                ids.append(eos)
        # host memory: passes move the batches they use
        _STREAM_CACHE[key] = torch.tensor(ids, dtype=torch.long, device="cpu")
    return _STREAM_CACHE[key]


def packed_sequences(
    tokenizer: PreTrainedTokenizerBase, spec: DataSpec, seq_len: int
) -> torch.Tensor:
    """The token stream cut into non-overlapping ``(n_chunks, seq_len)`` sequences (tail dropped)."""
    stream = token_stream(tokenizer, spec)
    n_chunks = stream.numel() // seq_len
    return stream[: n_chunks * seq_len].view(n_chunks, seq_len)


def calibration_tokens(
    tokenizer: PreTrainedTokenizerBase, spec: DataSpec, n_samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """``n_samples`` packed sequences chosen by a seeded permutation: ``(n_samples, seq_len)``."""
    chunks = packed_sequences(tokenizer, spec, seq_len)
    if chunks.shape[0] < n_samples:
        raise DataError(
            f"data.calibration: {spec.source} has only {chunks.shape[0]} sequences of {seq_len} tokens, "
            f"{n_samples} requested"
        )
    generator = torch.Generator().manual_seed(seed)  # CPU: the same samples on every machine
    order = torch.randperm(chunks.shape[0], generator=generator, device="cpu")[:n_samples]
    return chunks[order].clone()


def eval_tokens(tokenizer: PreTrainedTokenizerBase, spec: EvalSpec) -> torch.Tensor:
    """The first ``max_tokens`` tokens of the evaluation text, ``(N,)``; N is a multiple of seq_len."""
    stream = token_stream(tokenizer, spec)
    usable = min(spec.max_tokens, stream.numel()) // spec.seq_len * spec.seq_len
    if usable == 0:
        raise DataError(f"data.eval: {spec.source} has fewer than {spec.seq_len} tokens")
    return stream[:usable].clone()


class EvalOptions(BaseModel):
    """The recipe's ``eval:`` section: what every stage report measures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ppl: bool = True
    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    speed: bool = True
    speed_tokens: int = Field(32, ge=1)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        known = {"hellaswag"}
        for task in tasks:
            if task not in known:
                raise ValueError(f"unknown task {task!r}; valid: {', '.join(sorted(known))}")
        return tasks


def check_context(limit: Any, length: int, option: str) -> None:
    """Refuse a window longer than the model was built for (rope would silently extrapolate)."""
    if isinstance(limit, int) and 0 < limit < length:
        raise SlmError(f"{option}: {length} exceeds the model's context of {limit} tokens")
