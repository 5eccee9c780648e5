"""The GPTQ and prune passes hand their loops to the streaming engine on request."""

from __future__ import annotations

import pytest
import torch
from _stream_utils import small_config, write_sharded_model
from transformers import LlamaForCausalLM

from slmcompress.checkpoint import load_checkpoint
from slmcompress.passes.gptq import GPTQConfig, GPTQPass
from slmcompress.passes.prune import PruneConfig, PrunePass
from slmcompress.streaming.wiring import is_lazy, lazy_model_for, source_dir


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


def test_gptq_streaming_true_equals_in_memory(model_dir, make_ctx, tmp_path):
    base = dict(type="quantize", method="gptq", bits=4, group_size=32, batch_size=2)
    expected = GPTQPass(GPTQConfig(**base)).run(_load(model_dir), make_ctx(work_dir=tmp_path / "a"))
    ctx = make_ctx(work_dir=tmp_path / "b")
    got = GPTQPass(GPTQConfig(**base, streaming=True, activation_offload="disk")).run(
        _load(model_dir), ctx
    )
    _assert_same(expected, got)
    assert "streamed_from" in ctx.extra_metrics
    # the per-layer results are the resume point until the runner publishes the stage
    assert any((tmp_path / "b" / "stream").rglob("*.safetensors"))


def test_runner_skeleton_streams_automatically(model_dir, make_ctx, tmp_path):
    config = GPTQConfig(type="quantize", method="gptq", bits=4, group_size=32, batch_size=2)
    assert (
        lazy_model_for(model_dir, config.model_copy(update={"max_memory": "64GB"}), torch.float32)
        is None
    )
    skeleton = lazy_model_for(
        model_dir, config.model_copy(update={"max_memory": "1KB"}), torch.float32
    )
    assert skeleton is not None and is_lazy(skeleton)
    expected = GPTQPass(config).run(_load(model_dir), make_ctx(work_dir=tmp_path / "a"))
    result = GPTQPass(config).run(skeleton, make_ctx(work_dir=tmp_path / "b"))
    # a skeleton in, a skeleton out: it points at the sharded checkpoint, never loaded whole
    assert is_lazy(result) and source_dir(result) != model_dir
    got, _ = load_checkpoint(source_dir(result))
    _assert_same(expected, got)


def test_prune_streamed_importance_gives_the_same_model(model_dir, make_ctx, tmp_path):
    base = dict(type="prune", target={"ffn_hidden_size": 64}, depth_metric="cosine", batch_size=2)
    expected = PrunePass(PruneConfig(**base)).run(
        _load(model_dir), make_ctx(work_dir=tmp_path / "a")
    )
    got = PrunePass(PruneConfig(**base, streaming=True)).run(
        _load(model_dir), make_ctx(work_dir=tmp_path / "b")
    )
    _assert_same(expected, got)


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
