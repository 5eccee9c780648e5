"""Perplexity equals an independent computation with plain transformers on the same tokens."""

from __future__ import annotations

import math

import torch

from slmcompress.data import EvalSpec, eval_tokens
from slmcompress.eval.perplexity import perplexity


def test_perplexity_matches_transformers_loss_on_real_model(real_model):
    tokens = eval_tokens(real_model.tokenizer, EvalSpec(max_tokens=1024, seq_len=256))
    result = perplexity(real_model.model, tokens, seq_len=256)
    losses = []
    with torch.no_grad():
        for window in tokens.view(-1, 256):
            losses.append(real_model.model(window[None], labels=window[None]).loss.item())
    independent = math.exp(sum(losses) / len(losses))  # equal-length windows: mean of means
    assert result.n_predictions == 4 * 255
    assert result.ppl == __import__("pytest").approx(independent, rel=1e-5)
    assert 10 < result.ppl < 80  # SmolLM2-135M is ~36.6 at 8k tokens / 512 windows


def test_batching_does_not_change_perplexity(tiny_llama, tokenizer):
    tokens = eval_tokens(tokenizer, EvalSpec(max_tokens=512, seq_len=64))
    a = perplexity(tiny_llama, tokens, seq_len=64, batch_size=1)
    b = perplexity(tiny_llama, tokens, seq_len=64, batch_size=4)
    assert abs(a.ppl - b.ppl) / a.ppl < 1e-4
