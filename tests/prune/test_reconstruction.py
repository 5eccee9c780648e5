"""``reconstruct`` on prune stages: the layer loop, in memory and streamed, on GQA and depth."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import stream_from
from transformers import AutoModelForCausalLM, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "streaming"))
from _stream_utils import small_config, write_sharded_model  # noqa: E402

from slmcompress.passes.prune import PruneConfig, PrunePass  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _prune(model, ctx, **config):
    cfg = dict(type="prune", n_samples=8, seq_len=32, batch_size=4, depth_metric="cosine")
    return PrunePass(PruneConfig(**(cfg | config))).run(model, ctx)


def _block_error(parent, child, tokens) -> float:
    """Relative error of the final hidden states on held-out tokens."""
    with torch.no_grad():
        a = parent(tokens, output_hidden_states=True).hidden_states[-1]
        b = child(tokens, output_hidden_states=True).hidden_states[-1]
    return float((a - b).pow(2).sum() / a.pow(2).sum())


@pytest.mark.parametrize(
    "target",
    [
        {"ffn_hidden_size": 64},
        {"num_attention_heads": 2},  # within groups: 2 of 4 query heads, both KV heads kept
        {"ffn_hidden_size": 64, "num_attention_heads": 2, "num_layers": 1},
    ],
)
def test_reconstruction_repairs_what_deleting_loses(tiny_llama, make_ctx, target):
    parent = copy.deepcopy(tiny_llama)
    held_out = torch.randint(0, 5000, (2, 48), generator=torch.Generator().manual_seed(1))
    deleted = _prune(tiny_llama, make_ctx(), target=target, align="none")
    ctx = make_ctx()
    rebuilt = _prune(tiny_llama, ctx, target=target, align="none", reconstruct=True)
    # the input model is left as it was (sensitivity sweeps prune one model many times)
    for name, tensor in parent.state_dict().items():
        assert torch.equal(tensor, tiny_llama.state_dict()[name]), name
    assert rebuilt.config.to_dict() == deleted.config.to_dict()
    report = ctx.extra_metrics["prune"]["reconstruct"]
    for part in ("o", "down"):
        if f"{part}_error_refit" in report:
            assert all(
                r <= d + 1e-6
                for r, d in zip(
                    report[f"{part}_error_refit"], report[f"{part}_error_deleted"], strict=True
                )
            )
    assert _block_error(parent, rebuilt, held_out) < _block_error(parent, deleted, held_out)


def test_energy_selection_needs_no_scoring_pass_and_keeps_kv_groups_whole(tiny_llama, make_ctx):
    ctx = make_ctx()
    pruned = _prune(
        tiny_llama,
        ctx,
        target={"num_attention_heads": 2},
        head_pruning="kv_groups",
        align="none",
        reconstruct={"select": "energy", "damp": 1.0},
    )
    summary = ctx.extra_metrics["prune"]
    assert summary["importance"]["method"].startswith("energy")
    assert not (ctx.work_dir / "importance").exists()  # no activation-importance loop ran
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 1)
    assert (
        summary["reconstruct"]["damp"] == 1.0 and summary["reconstruct"]["tokens"] == 8 * 64
    )  # the recipe calibration


def test_select_importance_keeps_the_importance_choice(tiny_llama, make_ctx):
    a = _prune(tiny_llama, make_ctx(), target={"ffn_hidden_size": 64}, align="none")
    b = _prune(
        tiny_llama,
        make_ctx(),
        target={"ffn_hidden_size": 64},
        align="none",
        reconstruct={"select": "importance"},
    )
    # same kept channels: gate/up rows identical, down_proj re-fitted
    for i in range(2):
        la, lb = a.model.layers[i].mlp, b.model.layers[i].mlp
        assert torch.equal(la.gate_proj.weight, lb.gate_proj.weight)
        assert not torch.equal(la.down_proj.weight, lb.down_proj.weight)


def test_recipe_flag_and_mapping_validate():
    assert PruneConfig(type="prune", target={"ffn_hidden_size": 8}, reconstruct=True).reconstruct
    assert (
        PruneConfig(type="prune", target={"ffn_hidden_size": 8}, reconstruct=False).reconstruct
        is None
    )
    with pytest.raises(ValueError, match="damp"):
        PruneConfig(type="prune", target={"ffn_hidden_size": 8}, reconstruct={"damp": 0})
    with pytest.raises(ValueError, match="extra"):
        PruneConfig(type="prune", target={"ffn_hidden_size": 8}, reconstruct={"dampp": 1})


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    write_sharded_model(
        tmp_path / "m",
        small_config(vocab_size=49152, num_hidden_layers=3),
        tokenizer=tokenizer,
        max_shard_bytes=4_000_000,
    )
    return tmp_path / "m"


def test_streamed_reconstruction_writes_the_in_memory_checkpoint(model_dir, make_ctx, tmp_path):
    """Same loop streamed (layers from shards, per-layer results on disk): the same tensors,
    and a checkpoint plain transformers reloads."""
    cfg = dict(
        target={"ffn_hidden_size": 64, "num_attention_heads": 2, "num_layers": 2},
        reconstruct=True,
    )
    expected = _prune(
        LlamaForCausalLM.from_pretrained(model_dir).eval(), make_ctx(work_dir=tmp_path / "a"), **cfg
    )
    skeleton, residency = stream_from(model_dir)
    out = _prune(skeleton, make_ctx(work_dir=tmp_path / "b", residency=residency), **cfg)
    got = AutoModelForCausalLM.from_pretrained(out.path).eval()
    want, have = expected.state_dict(), got.state_dict()
    assert set(want) == set(have)
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=0, atol=0, msg=name)


def test_cli_run_with_reconstruct_set_from_the_command_line(tiny_model_dir, tmp_path):
    """``slmcompress run recipe --set stages.0.reconstruct=...`` end to end: the report
    records the re-fit and the checkpoint reloads in plain transformers."""
    import json

    from conftest import write_recipe
    from typer.testing import CliRunner

    from slmcompress.cli import app

    stage = {"type": "prune", "name": "mlp", "target": {"ffn_hidden_size": 64}, "align": "none"}
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), [stage], tmp_path / "out")
    setting = "stages.0.reconstruct={n_samples: 4, seq_len: 32, damp: 0.5}"
    result = CliRunner().invoke(app, ["--quiet", "run", str(recipe), "--set", setting])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "01-mlp" / "report.json").read_text())
    recon = report["extra"]["prune"]["reconstruct"]
    assert recon["tokens"] == 4 * 32 and recon["damp"] == 0.5
    assert sum(recon["down_error_refit"]) < sum(recon["down_error_deleted"])
    assert report["extra"]["prune"]["importance"] == {"method": "energy (chosen while re-fitting)"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "01-mlp")
    assert model.config.intermediate_size == 64
