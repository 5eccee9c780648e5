"""``slmcompress sensitivity``: the command on a tiny model directory, --reconstruct."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from slmcompress.cli.sensitivity import sensitivity_app


def test_cli_command_on_a_tiny_model_dir(tiny_model_dir, tmp_path):
    out = tmp_path / "cli"
    args = [
        str(tiny_model_dir),
        "--axis",
        "mlp,layers",
        "--ratios",
        "0.5",
        "--out",
        str(out),
        "--n-samples",
        "2",
        "--seq-len",
        "32",
        "--eval-tokens",
        "256",
        "--eval-seq-len",
        "64",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(sensitivity_app, args)
    assert result.exit_code == 0, result.output
    assert (out / "summary.md").is_file() and "baseline ppl" in result.output
    bad = CliRunner().invoke(sensitivity_app, [*args[:4], "--ratios", "0.5,x"])
    assert bad.exit_code != 0


def test_cli_reconstruct_flag_refits_and_records_it(tiny_model_dir, tmp_path):
    common = [str(tiny_model_dir), "--axis", "mlp", "--ratios", "0.5", "--n-samples", "2"]
    common += ["--seq-len", "32", "--eval-tokens", "256", "--eval-seq-len", "64"]
    result = CliRunner().invoke(
        sensitivity_app,
        [*common, "--out", str(tmp_path / "r"), "--reconstruct", "--reconstruct-damp", "0.5"],
    )
    assert result.exit_code == 0, result.output
    assert "re-fit" in result.output
    meta = json.loads((tmp_path / "r" / "sensitivity.json").read_text())
    assert meta["reconstruct"] == {"damp": 0.5, "select": "energy"}
    bad = CliRunner().invoke(
        sensitivity_app,
        [*common, "--out", str(tmp_path / "b"), "--reconstruct", "--reconstruct-damp", "0"],
    )
    # the bare sub-app raises; slmcompress's app turns it into one `error:` line, exit 2
    assert bad.exit_code != 0 and str(bad.exception).startswith("--reconstruct-damp:")
    assert not (tmp_path / "b").exists()
