"""Sensitivity sweeps: rows per axis and ratio, plots and summary written atomically (the
command: tests/cli/test_sensitivity_command.py)."""

from __future__ import annotations

import json

import pytest
import torch

from slmcompress.data import CalibrationSpec, EvalSpec
from slmcompress.errors import PassError
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
