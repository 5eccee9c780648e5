"""Perplexity of a model larger than memory, through the streamed forward.

Same protocol and numbers as :func:`slmcompress.eval.perplexity.perplexity` (non-overlapping
windows, ``seq_len - 1`` predictions each), computed one decoder layer at a time so the
report of a 70B stage has a perplexity instead of "not evaluated". Float and GPTQ
checkpoints both stream.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from slmcompress.checkpoint import open_streaming_model
from slmcompress.data import EvalSpec, eval_tokens
from slmcompress.eval.perplexity import PerplexityResult
from slmcompress.streaming.engine import StreamOptions
from slmcompress.streaming.forward import nll_head, streamed_forward

#: report metrics a streamed evaluation measures; the others need the model in memory
STREAMED_METRICS = ("wikitext2_ppl",)


def streamed_perplexity(
    model_dir: Path,
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
    stream = open_streaming_model(Path(model_dir), dtype)
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
