"""Runner: artifacts per stage, resume after a crash, atomicity, refusing foreign runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file

from slmcompress.errors import SlmError
from slmcompress.fsutil import is_tmp_name
from slmcompress.passes.evaluate import EvalPass
from slmcompress.passes.quantize_rtn import RTNPass
from slmcompress.recipe import load_recipe
from slmcompress.runner import run_recipe

STAGES = [
    {"type": "quantize", "method": "rtn", "name": "w4", "bits": 4, "group_size": 32},
    {"type": "eval", "name": "after"},
]


def run(tmp_path, model_dir, out, stages=STAGES, **kwargs):
    recipe = write_recipe(tmp_path / f"{out.name}.yaml", str(model_dir), stages, out)
    return run_recipe(load_recipe(recipe), **kwargs)


def test_each_stage_writes_checkpoint_report_and_manifest(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = run(tmp_path, tiny_model_dir, out)
    assert [s.status for s in result.stages] == ["ran", "ran"]
    for name in ("01-w4", "02-after"):
        stage = out / name
        files = ["report.json", "report.md", "slmcompress.json"]
        if name == "01-w4":
            files += ["config.json", "model.safetensors", "quantize_config.json", "tokenizer.json"]
        for file in files:
            assert (stage / file).is_file(), f"{name}/{file}"
        report = json.loads((stage / "report.json").read_text())
        assert set(report) >= {
            "stage",
            "pass",
            "config",
            "model",
            "metrics",
            "deltas",
            "timings",
            "warnings",
        }
        assert report["metrics"]["wikitext2_ppl"] > 1
        assert report["deltas"]["vs_original"]["wikitext2_ppl"] is not None
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete"
    assert [s["status"] for s in manifest["stages"]] == ["complete", "complete"]
    summary = (out / "summary.md").read_text()
    assert "| input |" in summary and "| w4 |" in summary and "| after |" in summary


def test_resume_after_crash_in_stage_two_matches_uninterrupted_run(
    tmp_path, tiny_model_dir, monkeypatch
):
    reference = tmp_path / "reference"
    run(tmp_path, tiny_model_dir, reference)

    crashed = tmp_path / "crashed"
    calls = []
    rtn_run, eval_run = RTNPass.run, EvalPass.run

    def counting_rtn(self, model, ctx):
        calls.append("w4")
        return rtn_run(self, model, ctx)

    def flaky_eval(self, model, ctx):
        calls.append("after")
        if calls.count("after") == 1:
            raise KeyboardInterrupt  # a kill in the middle of stage 2
        return eval_run(self, model, ctx)

    monkeypatch.setattr(RTNPass, "run", counting_rtn)
    monkeypatch.setattr(EvalPass, "run", flaky_eval)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_model_dir, crashed)
    assert (crashed / "01-w4" / "report.json").is_file()
    assert not (crashed / "02-after").exists()
    stage1_mtime = (crashed / "01-w4" / "model.safetensors").stat().st_mtime_ns

    result = run(tmp_path, tiny_model_dir, crashed)
    assert [s.status for s in result.stages] == ["skipped", "ran"]
    assert calls == ["w4", "after", "after"]  # stage 1 ran once
    assert (crashed / "01-w4" / "model.safetensors").stat().st_mtime_ns == stage1_mtime
    a = load_file(reference / "01-w4" / "model.safetensors")
    b = load_file(crashed / "01-w4" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("01-w4", "02-after"):
        ra = json.loads((reference / name / "report.json").read_text())["metrics"]
        rb = json.loads((crashed / name / "report.json").read_text())["metrics"]
        assert ra["wikitext2_ppl"] == pytest.approx(rb["wikitext2_ppl"], rel=1e-6)


def test_changed_stage_invalidates_later_stages(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    run(tmp_path, tiny_model_dir, out)
    changed = [dict(STAGES[0], bits=8), STAGES[1]]
    result = run(tmp_path, tiny_model_dir, out, stages=changed)
    assert [s.status for s in result.stages] == ["ran", "ran"]
    again = run(tmp_path, tiny_model_dir, out, stages=changed)
    assert [s.status for s in again.stages] == ["skipped", "skipped"]
    forced = run(tmp_path, tiny_model_dir, out, stages=changed, from_stage=2)
    assert [s.status for s in forced.stages] == ["skipped", "ran"]


def test_refuses_output_dir_of_a_different_recipe(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    run(tmp_path, tiny_model_dir, out, stages=STAGES[:1])
    other = write_recipe(
        tmp_path / "other.yaml", str(tiny_model_dir), STAGES[:1], out, name="other"
    )
    with pytest.raises(SlmError, match="output_dir: .* holds a run of a different recipe"):
        run_recipe(load_recipe(other))
    result = run_recipe(load_recipe(other), force=True)
    assert result.stages[0].status == "ran"


def test_write_failure_mid_stage_leaves_no_complete_looking_stage(
    tmp_path, tiny_model_dir, monkeypatch
):
    import slmcompress.runner as runner_module

    real_write = runner_module.write_checkpoint_into

    def failing_write(model, tokenizer, directory, metadata=None, extra_files=None):
        real_write(model, tokenizer, directory, metadata, extra_files)
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner_module, "write_checkpoint_into", failing_write)
    out = tmp_path / "run"
    with pytest.raises(SlmError, match="stage 01-w4: cannot write its output: .*No space left"):
        run(tmp_path, tiny_model_dir, out, stages=STAGES[:1])
    assert not (out / "01-w4").exists()
    assert not [p for p in out.iterdir() if is_tmp_name(p.name)]  # temp dir cleaned
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stages"][0]["status"] == "failed"


def test_scratch_of_another_stage_hash_is_discarded_and_own_scratch_kept(tmp_path):
    from slmcompress.runner import claim_work_dir

    work = tmp_path / ".work" / "01-x"
    claim_work_dir(work, "hash-a")
    (work / "layer-000.safetensors").write_bytes(b"resume state")
    claim_work_dir(work, "hash-a")  # the same stage resumes: its state survives
    assert (work / "layer-000.safetensors").is_file()
    claim_work_dir(work, "hash-b")  # the parent or the config changed: start clean
    assert not (work / "layer-000.safetensors").exists()
    assert (work / "STAGE_HASH").read_text() == "hash-b"
    legacy = tmp_path / ".work" / "02-y"
    legacy.mkdir()
    (legacy / "stale").write_text("no marker")
    claim_work_dir(legacy, "hash-c")
    assert not (legacy / "stale").exists()


def test_reports_skipped_for_the_budget_are_recognised_typed_and_pre_typed():
    """A resumed run re-evaluates a stage skipped for the budget, whether its report has
    the typed ``not_evaluated`` field or only the warning older reports carried; the
    re-evaluated report drops that warning and keeps the others."""
    from slmcompress.eval.report import NOT_EVALUATED, previous_warnings, skipped_for_budget

    warning = f"{NOT_EVALUATED} task accuracy (over budget)"
    typed = {"not_evaluated": {"reason": "r", "warning": warning}, "warnings": ["a", warning]}
    assert skipped_for_budget(typed) and previous_warnings(typed) == ["a"]
    assert not skipped_for_budget({"not_evaluated": None, "warnings": [warning]})
    old = {"warnings": ["other", warning]}  # written before the field
    assert skipped_for_budget(old) and previous_warnings(old) == ["other"]
    assert not skipped_for_budget({"warnings": ["other"]})
