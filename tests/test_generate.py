"""``generate``: decode tokens/s from per-token timestamps (prefill excluded)."""

from __future__ import annotations

import math

import pytest

from slmcompress.generate import generate

pytestmark = pytest.mark.usefixtures("single_thread")


def test_generate_times_prefill_and_decode_from_one_call(tiny_llama, tokenizer):
    result = generate(tiny_llama, tokenizer, "The history of", max_new_tokens=6)
    assert result.new_tokens == 6
    assert result.prefill_s > 0 and result.decode_s > 0
    assert math.isfinite(result.tokens_per_s) and result.tokens_per_s > 0
    assert result.tokens_per_s == pytest.approx(5 / result.decode_s)


def test_one_token_has_no_decode_rate(tiny_llama, tokenizer):
    result = generate(tiny_llama, tokenizer, "Hello", max_new_tokens=1)
    assert result.new_tokens == 1 and result.tokens_per_s == 0.0
