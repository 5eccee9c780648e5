"""Perplexity on non-overlapping windows: the GPTQ-paper protocol, written out so it is exact.

Each window of ``seq_len`` tokens is scored independently; the first token of a window has
no context and is not predicted, so a window contributes ``seq_len - 1`` predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from slmcompress.progress import progress_bar


@dataclass(frozen=True)
class PerplexityResult:
    """exp(mean NLL) over ``n_predictions`` next-token predictions."""

    ppl: float
    nll: float
    n_tokens: int
    n_predictions: int
    seq_len: int


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    seq_len: int,
    batch_size: int = 1,
    show_progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``tokens`` (N,), cut into ``N // seq_len`` windows."""
    device = next(model.parameters()).device
    windows = tokens[: tokens.numel() // seq_len * seq_len].view(-1, seq_len)  # (W, T)
    total_nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    with progress_bar("perplexity", total=windows.shape[0], enabled=show_progress) as advance:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)  # (B, T)
            logits = model(input_ids=batch, use_cache=False).logits.float()  # (B, T, V)
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            total_nll += nll.item()
            count += batch[:, 1:].numel()
            advance(batch.shape[0])
    model.train(was_training)
    mean = total_nll / count
    return PerplexityResult(math.exp(mean), mean, windows.numel(), count, seq_len)
