"""Sensitivity sweeps: rows per axis and ratio, plots and summary written atomically, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from slmcompress.data import CalibrationSpec, EvalSpec
from slmcompress.errors import PassError
from slmcompress.prune.cli_sensitivity import sensitivity_app
from slmcompress.prune.planner import sizes_for_removal, sizes_of
from slmcompress.prune.sensitivity import sensitivity

SMALL = {
    "calibration": CalibrationSpec(source="c4", n_samples=2, seq_len=32),
    "evaluation": EvalSpec(max_tokens=256, seq_len=64),
}


def test_sweep_writes_csv_json_plots_and_summary(tiny_llama, tokenizer, tmp_path):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    result = sensitivity(
        tiny_llama,
        tokenizer,
        ["heads", "mlp", "layers"],
        [0.5],
        tmp_path / "s",
        per_layer=True,
        **SMALL,
    )
    assert [(r["axis"], r["ratio"]) for r in result.rows] == [
        ("heads", 0.5),
        ("mlp", 0.5),
        ("layers", 0.5),
    ]
    assert all(r["ppl"] > 1 and r["non_embedding_ratio"] < 1 for r in result.rows)
    assert (
        len(result.per_layer) == 2 + 2 + 2
    )  # heads, mlp: each layer at 50%; layers: each dropped alone
    files = {p.name for p in (tmp_path / "s").iterdir()}
    assert files == {
        "sensitivity.csv",
        "layer_importance.csv",
        "per_layer.csv",
        "sensitivity.json",
        "summary.md",
        "ppl_vs_ratio.png",
        "layer_importance.png",
        "per_layer.png",
    }
    assert (
        json.loads((tmp_path / "s" / "sensitivity.json").read_text())["baseline_ppl"]
        == result.baseline_ppl
    )
    assert "![ppl_vs_ratio.png]" in (tmp_path / "s" / "summary.md").read_text()
    for (
        key,
        value,
    ) in tiny_llama.state_dict().items():  # masks are restored, nothing sliced in place
        assert torch.equal(value, before[key]), key


def test_bad_axis_or_ratio_is_one_line(tiny_llama, tokenizer, tmp_path):
    with pytest.raises(PassError, match=r"^axis: unknown axis 'width'"):
        sensitivity(tiny_llama, tokenizer, "width", [0.5], tmp_path / "x", **SMALL)
    with pytest.raises(PassError, match=r"^ratios: "):
        sensitivity(tiny_llama, tokenizer, "mlp", [1.5], tmp_path / "x", **SMALL)
    assert not (tmp_path / "x").exists()


def test_removal_rounds_heads_down_to_whole_groups():
    smol = sizes_of(
        type(
            "C",
            (),
            dict(
                hidden_size=576,
                intermediate_size=1536,
                num_attention_heads=9,
                num_key_value_heads=3,
                num_hidden_layers=30,
                head_dim=64,
            ),
        )()
    )
    assert sizes_for_removal(smol, "heads", 0.1).num_attention_heads == 6
    assert sizes_for_removal(smol, "heads", 0.5, "kv_groups").num_key_value_heads == 1
    assert sizes_for_removal(smol, "mlp", 0.25).ffn_hidden_size == 1152
    assert sizes_for_removal(smol, "layers", 0.5).num_layers == 15


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


def test_reconstructed_curve_refits_the_same_candidates_and_says_so(
    tiny_llama, tokenizer, tmp_path
):
    from slmcompress.prune.reconstruction import RefitSettings

    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    plain = sensitivity(tiny_llama, tokenizer, ["heads", "mlp"], [0.5], tmp_path / "a", **SMALL)
    refit = sensitivity(
        tiny_llama,
        tokenizer,
        ["heads", "mlp"],
        [0.5],
        tmp_path / "b",
        reconstruct=RefitSettings(damp=0.3, select="importance"),
        **SMALL,
    )
    # the same candidates (same units: select importance), their consumers re-fitted
    for a, b in zip(plain.rows, refit.rows, strict=True):
        assert (a["axis"], a["size"]) == (b["axis"], b["size"])
        assert b["ppl"] != a["ppl"]
    meta = json.loads((tmp_path / "b" / "sensitivity.json").read_text())
    assert meta["reconstruct"] == {"damp": 0.3, "select": "importance"}
    assert "re-fitted" in (tmp_path / "b" / "summary.md").read_text()
    for key, value in tiny_llama.state_dict().items():
        assert torch.equal(value, before[key]), key
