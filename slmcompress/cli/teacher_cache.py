"""Library side of ``slmcompress teacher-cache MODEL --data SPEC --top-k 64 --out DIR``.

The typer command only parses its options and calls :func:`teacher_cache_command`; the
same function is the Python API (notebooks, benchmarks).
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoConfig

from slmcompress.data import DataSpec, EvalSpec, check_context, check_disjoint, check_spec
from slmcompress.distill.teacher_cache import (
    VALUE_DTYPES,
    TeacherCache,
    build_streamed_teacher_cache,
    build_teacher_cache,
)
from slmcompress.errors import DataError
from slmcompress.io.load import load_model
from slmcompress.io.remote_code import hf_kwargs
from slmcompress.io.sources import (
    check_model_source,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
)
from slmcompress.streaming.budget import machine_budget, should_stream
from slmcompress.streaming.publish import load_tokenizer

log = logging.getLogger(__name__)


def parse_data_spec(spec: str) -> DataSpec:
    """``c4`` | ``wikitext2:validation`` | ``path/to/file.jsonl`` | ``hub/id:split`` -> DataSpec."""
    source, _, split = (
        spec.partition(":") if not spec.startswith(("/", ".", "~")) else (spec, "", "")
    )
    if not source:
        raise DataError(f"--data: empty data spec {spec!r}")
    return DataSpec(source=source, split=split or None)


def check_top_k(top_k: int, vocab_size: int | None) -> None:
    """``--top-k`` cannot exceed the teacher's logits (torch.topk would fail mid-build)."""
    if isinstance(vocab_size, int) and top_k > vocab_size:
        raise DataError(f"--top-k: {top_k} exceeds the teacher's vocabulary ({vocab_size} logits)")


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
    max_memory: str | None = None,
    show_progress: bool = True,
) -> TeacherCache:
    """Cache ``model``'s top-k logits on ``data`` into ``out`` (resuming), return the reader.

    A teacher over ``max_memory`` (default: the runner's share of this machine's RAM) is
    never loaded: each shard is one streamed forward, one decoder layer resident at a time.
    Refuses the evaluation split (WikiText-2 test): training on it would leak into every report.
    """
    spec = parse_data_spec(data)
    check_spec(spec, "--data")
    check_disjoint(spec, EvalSpec(), "--data")
    if top_k < 1:
        raise DataError("--top-k: must be at least 1")
    for option, value, least in (("--seq-len", seq_len, 2), ("--batch-size", batch_size, 1)):
        if value < least:
            raise DataError(f"{option}: must be at least {least}, got {value}")
    if n_sequences is not None and n_sequences < 1:
        raise DataError(f"--n-sequences: must be at least 1, got {n_sequences}")
    if values_dtype not in VALUE_DTYPES:
        raise DataError(f"--values-dtype: must be one of {', '.join(VALUE_DTYPES)}")
    check_model_source(model)
    dev = resolve_device(device, "--device")
    torch_dtype = resolve_dtype(dtype, dev)
    decision = should_stream(model, max_memory or machine_budget(), torch_dtype)
    common = dict(
        batch_size=batch_size,
        shard_size=shard_size,
        values_dtype=values_dtype,
        model_name=model,
        show_progress=show_progress,
    )
    if decision.stream:
        log.info("teacher %s: %s; streaming it one layer at a time", model, decision.reason)
        directory = resolve_model_dir(model)
        tokenizer = load_tokenizer(directory)
        config = AutoConfig.from_pretrained(directory, **hf_kwargs())
        check_context(getattr(config, "max_position_embeddings", None), seq_len, "--seq-len")
        check_top_k(top_k, getattr(config, "vocab_size", None))
        build_streamed_teacher_cache(
            directory, tokenizer, spec, seq_len, top_k, Path(out), n_sequences,
            device=dev, dtype=torch_dtype, max_memory=max_memory or machine_budget(), **common,
        )  # fmt: skip
    else:
        loaded = load_model(model, dtype=dtype, device=device)
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
        check_context(limit, seq_len, "--seq-len")
        check_top_k(top_k, getattr(loaded.model.config, "vocab_size", None))
        build_teacher_cache(
            loaded.model, loaded.tokenizer, spec, seq_len, top_k, Path(out), n_sequences, **common
        )
    return TeacherCache(Path(out), verify=True)
