"""Generation speed: exact token counts, positive rates, prefill split from decode."""

from __future__ import annotations

import pytest

from slmcompress.errors import SlmError
from slmcompress.eval.speed import generation_speed


def test_generation_speed_on_tiny_model(tiny_llama, tokenizer):
    result = generation_speed(tiny_llama, tokenizer, new_tokens=8, warmup=0)
    assert result["new_tokens"] == 8 and result["batch_size"] == 1
    assert result["tokens_per_s"] > 0 and result["e2e_tokens_per_s"] > 0
    assert (
        0 < result["prefill_s"] < result["total_s"] and 0 < result["decode_s"] < result["total_s"]
    )
    assert result["device"] == "cpu"


def test_generation_speed_batched(tiny_llama, tokenizer):
    result = generation_speed(tiny_llama, tokenizer, new_tokens=4, batch_size=2, warmup=1)
    assert result["new_tokens"] == 4 and result["batch_size"] == 2 and result["tokens_per_s"] > 0


def test_generation_speed_rejects_one_token(tiny_llama, tokenizer):
    with pytest.raises(SlmError, match="new_tokens"):
        generation_speed(tiny_llama, tokenizer, new_tokens=1)
