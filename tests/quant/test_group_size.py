"""``group_size: auto``: one group size every consumer's kernel accepts, and ragged warnings."""

from __future__ import annotations

import json

import pytest

from slmcompress.io.checkpoint import save_checkpoint
from slmcompress.passes.gptq import GPTQConfig
from slmcompress.passes.quantize_rtn import RTNConfig, RTNPass
from slmcompress.quant.install import (
    auto_group_size,
    ragged_group_warning,
    unsupported_group_warning,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    ("widths", "expected"),
    [
        ([576, 1536], 64),  # SmolLM2: 576 = 4.5 x 128
        ([1152, 576], 64),  # the quickstart's pruned MLP
        ([2048, 8192], 128),
        ([96, 64], 32),
        ([80], 128),  # nothing divides: 128, and the pass warns
    ],
)
def test_auto_is_the_largest_of_128_64_32_dividing_every_width(widths, expected):
    assert auto_group_size(widths) == expected


def test_ragged_warning_names_the_widths_and_the_consumers():
    widths = {"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536}
    message = ragged_group_warning(128, widths)
    assert "input widths 576 (e.g. model.layers.0.self_attn.q_proj)" in message
    assert "gptqmodel" in message and "Marlin" in message and "would pick 64" in message
    assert ragged_group_warning(64, widths) is None
    assert ragged_group_warning(-1, widths) is None  # per-channel: no ragged group


def test_auto_is_the_default_and_validates():
    assert GPTQConfig(type="quantize").group_size == "auto"
    assert RTNConfig(type="quantize").group_size == "auto"
    with pytest.raises(ValueError, match="'auto', -1"):
        RTNConfig(type="quantize", group_size="big")


def test_auto_resolves_into_the_checkpoint_and_the_report(
    tiny_llama, tokenizer, make_ctx, tmp_path
):
    ctx = make_ctx()
    model = RTNPass(RTNConfig(type="quantize", bits=4)).run(tiny_llama, ctx)  # widths 64, 128
    assert model.config.quantization_config["group_size"] == 64
    assert ctx.extra_metrics["group_size"] == {
        "requested": "auto",
        "resolved": 64,
        "input_widths": [64, 128],
        "ragged": False,
    }
    assert not ctx.warnings
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["quantization_config"]["group_size"] == 64
    assert json.loads((tmp_path / "ckpt" / "quantize_config.json").read_text())["group_size"] == 64


def test_a_forced_ragged_group_size_is_kept_and_warned(tiny_llama, make_ctx):
    ctx = make_ctx()
    model = RTNPass(RTNConfig(type="quantize", bits=4, group_size=48)).run(tiny_llama, ctx)
    assert model.config.quantization_config["group_size"] == 48
    assert ctx.extra_metrics["group_size"]["ragged"]
    assert any("group_size 48: input widths 64, 128" in w for w in ctx.warnings)
    assert any("accept only -1, 16, 32, 64" in w for w in ctx.warnings)  # 48: refused anyway


def test_group_sizes_the_consumer_refuses_whatever_the_widths():
    assert unsupported_group_warning(64) is None and unsupported_group_warning(-1) is None
    assert "only slmcompress will load" in unsupported_group_warning(48)
