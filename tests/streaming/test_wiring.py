"""The GPTQ and prune passes run their one layer loop streamed when the runner says so."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _stream_utils import small_config, write_sharded_model
from conftest import stream_from
from transformers import LlamaForCausalLM

from slmcompress.checkpoint import load_checkpoint
from slmcompress.layerwise import WrittenCheckpoint
from slmcompress.passes.gptq import GPTQConfig, GPTQPass
from slmcompress.passes.prune import PruneConfig, PrunePass


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    write_sharded_model(
        tmp_path / "m",
        small_config(vocab_size=49152, num_hidden_layers=2),
        tokenizer=tokenizer,
        max_shard_bytes=4_000_000,
    )
    return tmp_path / "m"


def _load(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir).eval()


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_streamed_gptq_writes_the_in_memory_checkpoint(model_dir, make_ctx, tmp_path):
    base = dict(type="quantize", method="gptq", bits=4, group_size=32, batch_size=2)
    expected = GPTQPass(GPTQConfig(**base)).run(_load(model_dir), make_ctx(work_dir=tmp_path / "a"))
    skeleton, residency = stream_from(model_dir)
    residency = replace(residency, activation_offload="disk")
    ctx = make_ctx(work_dir=tmp_path / "b", residency=residency)
    out = GPTQPass(GPTQConfig(**base)).run(skeleton, ctx)
    # a skeleton in, a written checkpoint out: never loaded whole
    assert isinstance(out, WrittenCheckpoint) and out.path != model_dir
    got, _ = load_checkpoint(out.path)
    _assert_same(expected, got)
    # the per-layer results are the resume point until the runner publishes the stage
    assert any((tmp_path / "b" / "stream").rglob("*.safetensors"))


def test_prune_streamed_gives_the_same_model(model_dir, make_ctx, tmp_path):
    base = dict(type="prune", target={"ffn_hidden_size": 64}, depth_metric="cosine", batch_size=2)
    expected = PrunePass(PruneConfig(**base)).run(
        _load(model_dir), make_ctx(work_dir=tmp_path / "a")
    )
    skeleton, residency = stream_from(model_dir)
    out = PrunePass(PruneConfig(**base)).run(
        skeleton, make_ctx(work_dir=tmp_path / "b", residency=residency)
    )
    _assert_same(expected, _load(out.path))


def test_can_stream_is_declared_by_the_pass():
    from slmcompress.passes.quantize_rtn import RTNConfig, RTNPass

    assert GPTQPass.can_stream(GPTQConfig(type="quantize", method="gptq"))
    assert PrunePass.can_stream(PruneConfig(type="prune", target={"ffn_hidden_size": 64}))
    magnitude = PruneConfig(type="prune", method="magnitude", target={"ffn_hidden_size": 64})
    assert not PrunePass.can_stream(magnitude)
    assert not RTNPass.can_stream(RTNConfig(type="quantize", method="rtn"))


def test_recipe_with_streaming_gptq_runs_end_to_end(tmp_path, tiny_model_dir):
    from conftest import write_recipe

    from slmcompress.checkpoint import load_checkpoint, read_metadata
    from slmcompress.recipe import load_recipe
    from slmcompress.runner import run_recipe

    stages = [
        {
            "type": "quantize",
            "method": "gptq",
            "bits": 4,
            "group_size": 32,
            "streaming": True,
            "activation_offload": "disk",
            "max_memory": "8GB",
        }
    ]
    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), stages, tmp_path / "out")
    )
    result = run_recipe(recipe)
    stage_dir = result.stages[0].directory
    model, _ = load_checkpoint(stage_dir)
    assert model.config.quantization_config["bits"] == 4
    assert read_metadata(stage_dir)["stage"] == "quantize-gptq"
    assert not (tmp_path / "out" / ".work" / stage_dir.name).exists()
