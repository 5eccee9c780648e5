"""The whole chain on a tiny model through the runner: prune -> distill -> GPTQ -> eval."""

from __future__ import annotations

import json

from conftest import write_recipe

from slmcompress.io.load import load_model
from slmcompress.quant.quant_linear import QuantLinear
from slmcompress.recipe import load_recipe
from slmcompress.runner import run_recipe

STAGES = [
    {
        "type": "prune",
        "name": "mlp50",
        "method": "activation",
        "target": {"ffn_hidden_size": 64},
        "n_samples": 4,
        "seq_len": 64,
    },
    {
        "type": "distill",
        "name": "heal",
        "max_tokens": 1024,
        "seq_len": 64,
        "micro_batch_size": 2,
        "lr": 1.0e-3,
        "eval_every": 4,
        "save_every": 4,
        "eval_tokens": 256,
    },
    {
        "type": "quantize",
        "name": "w4",
        "method": "gptq",
        "bits": 4,
        "group_size": 32,
        "act_order": True,
    },
    {"type": "eval", "name": "final"},
]


def test_prune_distill_gptq_chain(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "chain.yaml", str(tiny_model_dir), STAGES, out)
    result = run_recipe(load_recipe(recipe))
    assert [s.status for s in result.stages] == ["ran"] * 4
    pruned = json.loads((out / "01-mlp50" / "config.json").read_text())
    assert pruned["intermediate_size"] == 64
    heal = json.loads((out / "02-heal" / "report.json").read_text())
    distill = heal["extra"]["distill"]
    assert (
        distill["train_tokens"] == 1024 and distill["steps"] == 8
    )  # 1024 tokens / (2 x 64) per step
    assert (out / "02-heal" / "loss_curve.png").is_file()
    final = load_model(str(out / "03-w4"), device="cpu").model
    assert sum(isinstance(m, QuantLinear) for m in final.modules()) == 14
    assert final.config.intermediate_size == 64
    summary = (out / "summary.md").read_text()
    for stage in ("mlp50", "heal", "w4", "final"):
        assert f"| {stage} |" in summary
