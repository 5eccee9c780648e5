"""``evaluate_artifact``: one entry point decides in memory vs streamed, typed not_evaluated."""

from __future__ import annotations

import json

import pytest
import torch

from slmcompress.data import EvalOptions, EvalSpec
from slmcompress.eval.artifact import EvalBudget, evaluate_artifact, load_for_eval
from slmcompress.eval.report import NOT_EVALUATED, build_report, write_report
from slmcompress.streaming.budget import should_stream

SPEC = EvalSpec(max_tokens=256, seq_len=64)
OPTIONS = EvalOptions(tasks=[], speed=False)
CPU = torch.device("cpu")


def _budget(tmp_path, max_memory="64GB"):
    return EvalBudget(max_memory, CPU, torch.float32, tmp_path / "eval-work")


def test_a_model_in_memory_is_measured_as_it_is(tiny_model_dir, tmp_path):
    model, tokenizer = load_for_eval(tiny_model_dir, CPU, torch.float32)
    result = evaluate_artifact(model, SPEC, OPTIONS, _budget(tmp_path), tokenizer=tokenizer)
    assert result.metrics["wikitext2_ppl"] > 1 and result.not_evaluated is None
    assert not result.streamed and result.warnings == []
    assert result.summary["bytes_on_disk"] is None  # no checkpoint_dir given
    assert result.model is None  # nothing was loaded


def test_a_directory_that_fits_is_loaded_and_the_model_comes_back(tiny_model_dir, tmp_path):
    loads = []

    def load(directory):
        loads.append(directory)
        return load_for_eval(directory, CPU, torch.float32)

    result = evaluate_artifact(tiny_model_dir, SPEC, OPTIONS, _budget(tmp_path), load=load)
    assert loads == [tiny_model_dir]
    assert result.model is not None and result.tokenizer is not None
    assert result.summary["bytes_on_disk"] > 0 and result.not_evaluated is None


def test_over_the_budget_the_perplexity_is_streamed_and_equal(tiny_model_dir, tmp_path):
    budget = should_stream(tiny_model_dir, "1TB").model_bytes - 1
    in_memory = evaluate_artifact(tiny_model_dir, SPEC, OPTIONS, _budget(tmp_path))

    def never(_directory):
        raise AssertionError("a model over the budget must not be loaded")

    streamed = evaluate_artifact(
        tiny_model_dir, SPEC, OPTIONS, _budget(tmp_path, budget), load=never
    )
    assert streamed.streamed and streamed.model is None
    assert streamed.metrics["wikitext2_ppl"] == pytest.approx(
        in_memory.metrics["wikitext2_ppl"], rel=1e-5
    )
    assert "exceeds the budget" in streamed.not_evaluated.reason
    assert streamed.warnings == [streamed.not_evaluated.warning]
    assert streamed.summary["params"] == in_memory.summary["params"]
    assert not (tmp_path / "eval-work").exists()  # the streamed scratch is removed
    # a resumed run asks not to stream again: nothing new to measure
    kept = evaluate_artifact(
        tiny_model_dir, SPEC, OPTIONS, _budget(tmp_path, budget), load=never, stream=False
    )
    assert kept is None


def test_a_budget_too_small_to_stream_reports_instead_of_failing(tiny_model_dir, tmp_path):
    result = evaluate_artifact(tiny_model_dir, SPEC, OPTIONS, _budget(tmp_path, "1MB"))
    assert result.metrics["wikitext2_ppl"] is None
    assert result.not_evaluated.warning.startswith(NOT_EVALUATED)
    assert "streaming it does not fit" in result.not_evaluated.warning


def test_the_typed_field_reaches_report_json_through_build_report(tiny_model_dir, tmp_path):
    result = evaluate_artifact(tiny_model_dir, SPEC, OPTIONS, _budget(tmp_path, "1MB"))
    report = build_report(
        "s", "eval", {}, result.summary, result.metrics, None, None, result.timings,
        result.warnings, not_evaluated=result.not_evaluated,
    )  # fmt: skip
    write_report(tmp_path, report)
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["not_evaluated"] == {
        "reason": result.not_evaluated.reason,
        "warning": result.not_evaluated.warning,
    }
    assert result.not_evaluated.warning in (tmp_path / "report.md").read_text()
