"""Library side of ``slmcompress teacher-cache MODEL --data SPEC --top-k 64 --out DIR``.

The typer command only parses its options and calls :func:`teacher_cache_command`; the
same function is the Python API (notebooks, benchmarks).
"""

from __future__ import annotations

import logging
from pathlib import Path

from slmcompress.data import DataSpec, EvalSpec, check_disjoint, check_spec
from slmcompress.distill.teacher_cache import VALUE_DTYPES, TeacherCache, build_teacher_cache
from slmcompress.errors import DataError
from slmcompress.models import load_model

log = logging.getLogger(__name__)


def parse_data_spec(spec: str) -> DataSpec:
    """``c4`` | ``wikitext2:validation`` | ``path/to/file.jsonl`` | ``hub/id:split`` -> DataSpec."""
    source, _, split = (
        spec.partition(":") if not spec.startswith(("/", ".", "~")) else (spec, "", "")
    )
    if not source:
        raise DataError(f"--data: empty data spec {spec!r}")
    return DataSpec(source=source, split=split or None)


def teacher_cache_command(
    model: str,
    data: str,
    top_k: int,
    out: Path,
    *,
    seq_len: int = 512,
    n_sequences: int | None = None,
    batch_size: int = 4,
    shard_size: int = 256,
    values_dtype: str = "float32",
    device: str = "auto",
    dtype: str = "auto",
    show_progress: bool = True,
) -> TeacherCache:
    """Load ``model``, cache its top-k logits on ``data`` into ``out`` (resuming), return the reader.

    Refuses the evaluation split (WikiText-2 test): training on it would leak into every report.
    """
    spec = parse_data_spec(data)
    check_spec(spec, "--data")
    check_disjoint(spec, EvalSpec(), "--data")
    if top_k < 1:
        raise DataError("--top-k: must be at least 1")
    if values_dtype not in VALUE_DTYPES:
        raise DataError(f"--values-dtype: must be one of {', '.join(VALUE_DTYPES)}")
    loaded = load_model(model, dtype=dtype, device=device)
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DataError(f"--seq-len: {seq_len} exceeds {model}'s max_position_embeddings {limit}")
    build_teacher_cache(
        loaded.model,
        loaded.tokenizer,
        spec,
        seq_len,
        top_k,
        Path(out),
        n_sequences,
        batch_size=batch_size,
        shard_size=shard_size,
        values_dtype=values_dtype,
        model_name=model,
        show_progress=show_progress,
    )
    return TeacherCache(Path(out), verify=True)
