"""Sharded writer: size limits, index, plain transformers reload, atomicity, disk full."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from _stream_utils import small_config, write_sharded_model
from transformers import LlamaForCausalLM

from slmcompress.errors import CheckpointError
from slmcompress.streaming.sharded_writer import sharded_checkpoint


def test_shards_respect_the_limit_and_reload_with_transformers(tmp_path):
    limit = 120_000
    model = write_sharded_model(tmp_path / "m", small_config(), max_shard_bytes=limit)
    shards = sorted((tmp_path / "m").glob("model-*-of-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    header_reserve = 256 * 1024 + 8
    biggest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    assert all(p.stat().st_size - header_reserve <= max(limit, biggest) for p in shards)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_single_shard_is_model_safetensors(tmp_path):
    with sharded_checkpoint(tmp_path / "c") as writer:
        writer.add("a", torch.arange(6, dtype=torch.int32).reshape(2, 3))
        writer.add("b", torch.ones(3, dtype=torch.bfloat16))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["model.safetensors"]


def test_failure_leaves_nothing_that_looks_complete(tmp_path):
    with (
        pytest.raises(RuntimeError),
        sharded_checkpoint(tmp_path / "c", max_shard_bytes=10) as writer,
    ):
        writer.add("a", torch.zeros(100))
        raise RuntimeError("killed")
    assert not (tmp_path / "c").exists()
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_a_clean_checkpoint_error(tmp_path, monkeypatch):
    from slmcompress.streaming import sharded_writer

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sharded_writer._Shard, "append", full)
    with (
        pytest.raises(CheckpointError, match="disk full"),
        sharded_checkpoint(tmp_path / "c") as writer,
    ):
        writer.add("a", torch.zeros(4))
    assert not (tmp_path / "c").exists()
