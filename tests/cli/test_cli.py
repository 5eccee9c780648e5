"""The CLI through typer's CliRunner: happy paths, --json, and one-line errors with exit 2."""

from __future__ import annotations

import json

import pytest
from conftest import write_recipe
from typer.testing import CliRunner

from slmcompress.cli import app

runner = CliRunner()
STAGES = [{"type": "quantize", "method": "rtn", "name": "w4", "bits": 4, "group_size": 32}]


def invoke(*args: str):
    return runner.invoke(app, ["--quiet", *args])


def test_models_and_passes():
    result = invoke("models", "--json")
    assert result.exit_code == 0 and "smollm2-135m" in json.loads(result.stdout)
    result = invoke("recipe", "passes")
    assert result.exit_code == 0 and "quantize" in result.stdout and "rtn" in result.stdout


def test_validate_run_inspect_eval(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), STAGES, tmp_path / "out")
    result = invoke("recipe", "validate", str(recipe))
    assert result.exit_code == 0 and "01-w4" in result.stdout

    result = invoke("run", str(recipe), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["status"] for s in data["stages"]] == ["ran"]
    assert data["stages"][0]["metrics"]["wikitext2_ppl"] > 1

    result = invoke("run", str(recipe))
    assert result.exit_code == 0 and "skipped" in result.stdout and "summary.md" in result.stdout

    result = invoke("inspect", str(tmp_path / "out" / "01-w4"), "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["summary"]["quantization"].startswith("rtn 4-bit, group 32")
    assert len(info["layers"]) == 14
    assert info["layers"][0]["backend"] == "cpu-int4 (int4 CPU kernel)"  # this CPU's serving path

    result = invoke(
        "eval",
        str(tmp_path / "out" / "01-w4"),
        "--tasks",
        "",
        "--ppl-tokens",
        "256",
        "--seq-len",
        "128",
        "--no-speed",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["wikitext2_ppl"] > 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "missing.yaml"], "recipe file missing.yaml does not exist"),
        (["recipe", "validate", "missing.yaml"], "does not exist"),
        (["inspect", "/no/such/dir"], "has no config.json"),
        (["eval", "/no/such/model", "--no-speed"], "model: path /no/such/model does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, expected):
    result = invoke(*args)
    assert result.exit_code == 2
    assert expected in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_recipe_field_and_override(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), STAGES, tmp_path / "out")
    result = invoke("recipe", "validate", str(recipe), "--set", "stages.0.bits=5")
    assert result.exit_code == 2 and "stages[0].bits: must be one of 2, 3, 4, 8" in result.output
