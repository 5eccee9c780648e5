"""Streaming loader: skeleton from config, layer materialisation, bad shards named."""

from __future__ import annotations

import json

import pytest
import torch
from _stream_utils import small_config, write_sharded_model
from safetensors import safe_open
from transformers import LlamaForCausalLM

from slmcompress.errors import CheckpointError, PassError
from slmcompress.streaming.budget import StreamOptions
from slmcompress.streaming.engine import StreamingRun
from slmcompress.streaming.loader import StreamingModel, WeightSource


@pytest.fixture
def model_dir(tmp_path):
    write_sharded_model(tmp_path / "m", small_config())
    return tmp_path / "m"


def test_skeleton_has_no_weights_but_real_rotary_tables(model_dir):
    stream = StreamingModel(model_dir)
    assert all(p.device.type == "meta" for p in stream.model.parameters())
    reference = LlamaForCausalLM.from_pretrained(model_dir)
    assert torch.equal(stream.model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


def test_layer_materialises_exactly_and_releases(model_dir):
    reference = LlamaForCausalLM.from_pretrained(model_dir).state_dict()
    stream = StreamingModel(model_dir)
    layer = stream.load_layer(2, torch.device("cpu"))
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, reference[f"model.layers.2.{name}"]), name
    stream.release_layer(2)
    assert all(p.device.type == "meta" for p in stream.layers[2].parameters())


def test_reader_matches_safe_open(model_dir):
    source = WeightSource(model_dir)
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                assert torch.equal(source.get(key), handle.get_tensor(key))


def test_missing_shard_is_named(model_dir):
    shard = sorted(model_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        StreamingModel(model_dir)


def test_truncated_shard_is_named(model_dir):
    shard = sorted(model_dir.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated"):
        StreamingModel(model_dir)


def test_shard_missing_from_index_is_reported(model_dir):
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if ".layers.3." not in k}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.layers.3"):
        StreamingModel(model_dir)


def test_budget_too_small_for_one_layer_says_how_much(model_dir, tmp_path):
    tokens = torch.zeros(2, 16, dtype=torch.long)
    with pytest.raises(PassError, match=r"too small.*needs about [0-9.]+ MiB"):
        StreamingRun(
            model_dir,
            tokens,
            torch.device("cpu"),
            tmp_path / "w",
            StreamOptions(max_memory="100MB"),
        )
