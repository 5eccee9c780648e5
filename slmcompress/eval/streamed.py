"""Perplexity of a model larger than memory, through the streamed forward.

Same protocol and numbers as :func:`slmcompress.eval.perplexity.perplexity` (non-overlapping
windows, ``seq_len - 1`` predictions each), computed one decoder layer at a time so the
report of a 70B stage has a perplexity instead of "not evaluated". Float and GPTQ
checkpoints both stream.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from slmcompress.data import EvalSpec, eval_tokens
from slmcompress.eval.perplexity import PerplexityResult
from slmcompress.eval.report import METRIC_LABELS
from slmcompress.io.checkpoint import CheckpointInfo
from slmcompress.io.load import open_streaming_model
from slmcompress.streaming.budget import StreamOptions
from slmcompress.streaming.forward import nll_head, streamed_forward


def streamed_perplexity(
    model_dir: Path | CheckpointInfo,
    tokenizer: PreTrainedTokenizerBase,
    spec: EvalSpec,
    device: torch.device,
    dtype: torch.dtype,
    work_dir: Path,
    max_memory: int | str | None = None,
    batch_size: int = 1,
) -> PerplexityResult:
    """WikiText-2 (or ``spec``) perplexity with one decoder layer resident; resumable."""
    tokens = eval_tokens(tokenizer, spec)  # (N,)
    windows = tokens.view(-1, spec.seq_len)  # (W, T)
    checkpoint = model_dir if isinstance(model_dir, CheckpointInfo) else Path(model_dir)
    stream = open_streaming_model(checkpoint, dtype)
    options = StreamOptions(
        max_memory=max_memory,
        batch_size=batch_size,
        pass_name="forward",
        key={"head": "nll", "eval": spec.model_dump()},
    )
    rows = streamed_forward(stream, windows, nll_head, device, work_dir, options)
    per_window = rows["nll"].view(windows.shape)[:, :-1].double()  # last token: no target
    count = per_window.numel()
    mean = float(per_window.sum()) / count
    return PerplexityResult(math.exp(mean), mean, windows.numel(), count, spec.seq_len)


def evaluate_streamed(
    model_dir: Path | CheckpointInfo,
    tokenizer: PreTrainedTokenizerBase,
    spec: EvalSpec,
    options: Any,
    device: torch.device,
    dtype: torch.dtype,
    work_dir: Path,
    max_memory: int | str | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The report metrics a model over the memory budget can have: perplexity, streamed.

    Task accuracy (lm-eval drives the whole model per request) and generation speed
    (a KV cache across all layers) need the model resident; they stay ``None``.
    """
    metrics: dict[str, Any] = dict.fromkeys(METRIC_LABELS)
    timings: dict[str, float] = {}
    if options.ppl:
        start = time.perf_counter()
        result = streamed_perplexity(
            model_dir, tokenizer, spec, device, dtype, work_dir, max_memory
        )
        metrics.update(
            wikitext2_ppl=result.ppl, eval_tokens=result.n_tokens, eval_seq_len=result.seq_len
        )
        timings["ppl_s"] = time.perf_counter() - start
    return metrics, timings
