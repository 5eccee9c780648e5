"""Streaming engine == in-memory engine, bit for bit; activation spill; disk full."""

from __future__ import annotations

import errno

import pytest
import torch
from _stream_utils import (
    assert_same_importance,
    random_tokens,
    small_config,
    streamed_gptq,
    streamed_importance,
    write_sharded_model,
)

from slmcompress.errors import PassError
from slmcompress.io.checkpoint import load_checkpoint
from slmcompress.streaming.budget import StreamOptions, should_stream
from slmcompress.streaming.engine import StreamingRun

CPU = torch.device("cpu")


@pytest.mark.parametrize("offload", ["cpu", "disk", "auto"])
def test_streamed_minitron_importance_is_bit_exact(tmp_path, offload):
    from slmcompress.prune.importance import activation_importance

    model = write_sharded_model(tmp_path / "m", small_config())
    tokens = random_tokens()
    expected = activation_importance(model, tokens, CPU, batch_size=2)
    options = StreamOptions(batch_size=2, activation_offload=offload, max_memory="8GB")
    got = streamed_importance(tmp_path / "m", tokens, tmp_path / "w", options)
    assert_same_importance(expected, got)


def test_auto_offload_spills_beyond_the_budget(tmp_path):
    write_sharded_model(tmp_path / "m", small_config())
    run = StreamingRun(
        tmp_path / "m",
        random_tokens(),
        CPU,
        tmp_path / "w",
        StreamOptions(max_memory="8GB", resume=False),
    )
    run.activation_budget = 2 * 16 * 64 * 4 * 2  # two (1, 16, 64) fp32 batches per store
    store = run.new_store(1)
    for _ in range(5):
        store.append(torch.randn(1, 16, 64))
    assert store.bytes_in_memory() == 2 * 16 * 64 * 4
    assert len(list((tmp_path / "w/stream/act-00001.partial").glob("*.safetensors"))) == 3
    assert all(torch.isfinite(h).all() for h in store)


def test_streamed_gptq_is_bit_exact_and_reloads(tmp_path, make_ctx, tokenizer):
    gptq = pytest.importorskip("slmcompress.passes.gptq")
    write_sharded_model(
        tmp_path / "m",
        small_config(vocab_size=49152, num_hidden_layers=2),
        tokenizer=tokenizer,
        max_shard_bytes=4_000_000,
    )
    config = gptq.GPTQConfig(
        type="quantize", method="gptq", bits=4, group_size=32, act_order=True, batch_size=2
    )
    reference, _ = load_checkpoint(tmp_path / "m")
    reference = gptq.GPTQPass(config).run(reference, make_ctx(work_dir=tmp_path / "w1"))
    out = streamed_gptq(
        gptq.GPTQPass(config),
        tmp_path / "m",
        make_ctx(work_dir=tmp_path / "w2"),
        StreamOptions(activation_offload="disk", max_memory="8GB", max_shard_bytes=300_000),
    )
    assert len(list(out.glob("model-*.safetensors"))) > 1
    got, _ = load_checkpoint(out)
    expected = reference.state_dict()
    assert set(got.state_dict()) == set(expected)
    for name, tensor in got.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # the per-layer results stay (the resume point) until the runner publishes the stage
    assert any((tmp_path / "w2" / "stream").rglob("*.safetensors"))


def test_disk_full_while_spilling_fails_cleanly(tmp_path, monkeypatch):
    from slmcompress.streaming import activations

    write_sharded_model(tmp_path / "m", small_config())
    calls = {"n": 0}
    real_save = activations.save_file

    def save_file(tensors, path):
        calls["n"] += 1
        if calls["n"] > 8:  # layer 0 inputs fit, a later boundary hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(activations, "save_file", save_file)
    with pytest.raises(PassError, match="disk full while spilling"):
        streamed_importance(
            tmp_path / "m",
            random_tokens(),
            tmp_path / "w",
            StreamOptions(batch_size=1, activation_offload="disk", max_memory="8GB"),
        )
    stream_dir = tmp_path / "w" / "stream"
    assert not list(stream_dir.glob("*.partial"))
    committed = sorted(p.name for p in stream_dir.glob("act-*"))
    import json

    finished = json.loads((stream_dir / "state.json").read_text())["finished"]
    assert committed == [f"act-{finished:05d}"]  # the resume point, complete, nothing else


def test_should_stream_compares_model_with_budget(tmp_path):
    write_sharded_model(tmp_path / "m", small_config())
    assert should_stream(str(tmp_path / "m"), max_memory="1MB").stream
    assert not should_stream(str(tmp_path / "m"), max_memory="64GB").stream


def test_resumed_gptq_keeps_every_layers_rtn_comparison(tmp_path, make_ctx, tokenizer, monkeypatch):
    gptq = pytest.importorskip("slmcompress.passes.gptq")
    write_sharded_model(
        tmp_path / "m", small_config(vocab_size=49152, num_hidden_layers=2), tokenizer=tokenizer
    )
    config = gptq.GPTQConfig(type="quantize", method="gptq", bits=4, group_size=32, batch_size=2)
    options = StreamOptions(max_memory="8GB")
    real_step = gptq.GPTQPass.quantize_step

    def die_at_layer_1(self, step, name, *args):
        if name.endswith(".1"):
            raise KeyboardInterrupt  # the process is killed after layer 0 was committed
        return real_step(self, step, name, *args)

    monkeypatch.setattr(gptq.GPTQPass, "quantize_step", die_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        streamed_gptq(
            gptq.GPTQPass(config), tmp_path / "m", make_ctx(work_dir=tmp_path / "w"), options
        )
    monkeypatch.setattr(gptq.GPTQPass, "quantize_step", real_step)
    resumed = make_ctx(work_dir=tmp_path / "w")  # a new process: layer 0 comes from disk
    streamed_gptq(gptq.GPTQPass(config), tmp_path / "m", resumed, options)
    assert set(resumed.extra_metrics["rtn_layer_errors"]) == {"model.layers.0", "model.layers.1"}
    assert resumed.extra_metrics["gptq_vs_rtn_output_err"]["linears"] == 14
