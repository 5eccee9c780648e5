"""Data specs: deterministic packing, eval/calibration separation, clear errors."""

from __future__ import annotations

import pytest
import torch

from slmcompress.data import (
    CalibrationSpec,
    DataSpec,
    EvalSpec,
    calibration_tokens,
    check_disjoint,
    eval_tokens,
)
from slmcompress.errors import SlmError


def test_calibration_tokens_are_deterministic_per_seed(tokenizer):
    spec = CalibrationSpec(source="c4", n_samples=4, seq_len=64)
    a = calibration_tokens(tokenizer, spec, 4, 64, seed=0)
    b = calibration_tokens(tokenizer, spec, 4, 64, seed=0)
    c = calibration_tokens(tokenizer, spec, 4, 64, seed=1)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_wikitext_validation_and_test_do_not_overlap(tokenizer):
    test = eval_tokens(tokenizer, EvalSpec(max_tokens=2048, seq_len=512))
    valid = calibration_tokens(
        tokenizer, CalibrationSpec(source="wikitext2", split="validation"), 64, 32, 0
    )
    test_windows = {tuple(w.tolist()) for w in test.view(-1, 32)}
    assert not test_windows & {tuple(w.tolist()) for w in valid}
    with pytest.raises(SlmError, match="evaluation data"):
        check_disjoint(DataSpec(source="wikitext2", split="test"), EvalSpec())


def test_too_small_calibration_and_local_files(tokenizer, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("just a few words of text")
    with pytest.raises(SlmError, match="only 0 sequences"):
        calibration_tokens(tokenizer, DataSpec(source=str(small)), 2, 64, 0)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "hello world"}\n{"body": "no text field"}\n')
    with pytest.raises(SlmError, match="has no field 'text'"):
        calibration_tokens(tokenizer, DataSpec(source=str(rows)), 1, 8, 0)


def test_eval_tokens_respect_budget(tokenizer):
    tokens = eval_tokens(tokenizer, EvalSpec(max_tokens=1000, seq_len=256))
    assert tokens.numel() == 768  # whole windows only
