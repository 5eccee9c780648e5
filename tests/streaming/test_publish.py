"""The GPTQ and prune passes run their one layer loop streamed when the runner says so."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _stream_utils import small_config, write_sharded_model
from conftest import stream_from
from transformers import LlamaForCausalLM

from slmcompress.io.checkpoint import load_checkpoint
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


def test_a_streamed_stage_input_is_the_one_skeleton_its_pass_and_loop_use(
    model_dir, make_ctx, tmp_path, monkeypatch
):
    """One skeleton per stage: the group size is resolved and the QuantLinears installed on
    the very object the runner built, and the layer loop builds none of its own."""
    import slmcompress.passes.gptq as gptq_module
    from slmcompress.streaming import loader, residency
    from slmcompress.streaming.residency import Residency, StageInput

    built, installed = [], []
    build = loader.build_skeleton

    def counting(*args, **kwargs):
        built.append(args[0])
        return build(*args, **kwargs)

    monkeypatch.setattr(loader, "build_skeleton", counting)
    monkeypatch.setattr(residency, "build_skeleton", counting)
    install = gptq_module.install_quant_linear
    monkeypatch.setattr(
        gptq_module,
        "install_quant_linear",
        lambda model, *a: installed.append(model) or install(model, *a),
    )
    stage_input = StageInput.on_disk(Residency("streamed", model_dir), torch.float32)
    loop = stage_input.residency.layer_loop(
        stage_input.model, torch.zeros(2, 8, dtype=torch.long), torch.device("cpu"),
        torch.float32, tmp_path / "loop", 1, "gptq", {},
    )  # fmt: skip
    assert loop.model is stage_input.model
    ctx = make_ctx(work_dir=tmp_path / "w", residency=stage_input.residency)
    config = GPTQConfig(type="quantize", method="gptq", bits=4, batch_size=2)
    GPTQPass(config).run(stage_input.model, ctx)
    assert built == [model_dir]  # StageInput.on_disk's, nothing else
    assert installed and all(m is stage_input.model for m in installed)
    assert ctx.extra_metrics["group_size"]["resolved"] == 64  # auto, on that same object


def test_can_stream_is_declared_by_the_pass():
    from slmcompress.passes.quantize_rtn import RTNConfig, RTNPass

    assert GPTQPass.can_stream(GPTQConfig(type="quantize", method="gptq"))
    assert PrunePass.can_stream(PruneConfig(type="prune", target={"ffn_hidden_size": 64}))
    magnitude = PruneConfig(type="prune", method="magnitude", target={"ffn_hidden_size": 64})
    assert not PrunePass.can_stream(magnitude)
    # contiguous depth blocks compare inputs of layers a stream has already dropped
    blocks = dict(type="prune", depth_mode="contiguous")
    assert not PrunePass.can_stream(PruneConfig(**blocks, target={"num_layers": 2}))
    assert PrunePass.can_stream(PruneConfig(**blocks, target={"num_layers": 2}, method="random"))
    assert PrunePass.can_stream(PruneConfig(**blocks, target={"ffn_hidden_size": 64}))
    assert not RTNPass.can_stream(RTNConfig(type="quantize", method="rtn"))


def test_a_streamed_prune_ranks_depth_by_cosine_and_says_so():
    """The loss depth ranking runs the whole model; the runner adapts the config up front."""
    by_loss = PruneConfig(type="prune", target={"num_layers": 1})
    config, warnings = PrunePass.for_streaming(by_loss)
    assert config.depth_metric == "cosine" and "depth_metric: loss" in warnings[0]
    width_only = PruneConfig(type="prune", target={"ffn_hidden_size": 64})
    assert PrunePass.for_streaming(width_only) == (width_only, [])
    assert GPTQPass.for_streaming(GPTQConfig(type="quantize", method="gptq"))[1] == []


def test_recipe_with_streaming_gptq_runs_end_to_end(tmp_path, tiny_model_dir):
    from conftest import write_recipe

    from slmcompress.io.checkpoint import load_checkpoint
    from slmcompress.io.files import read_metadata
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
