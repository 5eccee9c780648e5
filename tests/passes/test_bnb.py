"""bitsandbytes nf4 / int8 baselines on CPU: quantize, run, save and reload as a HF checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from slmcompress.errors import PassError, RecipeError
from slmcompress.io.checkpoint import load_checkpoint, save_checkpoint
from slmcompress.recipe import parse_recipe

bnb = pytest.importorskip("bitsandbytes")

from slmcompress.passes.bnb import BnbInt8Config, BnbInt8Pass, BnbNF4Config, BnbNF4Pass  # noqa: E402


@pytest.mark.parametrize(
    ("pass_cls", "config", "layer_type"),
    [
        (BnbNF4Pass, BnbNF4Config(type="quantize"), "Linear4bit"),
        (BnbInt8Pass, BnbInt8Config(type="quantize"), "Linear8bitLt"),
    ],
)
def test_quantizes_runs_and_reloads_on_cpu(
    tiny_llama, make_ctx, tokenizer, tmp_path, pass_cls, config, layer_type
):
    ids = torch.randint(0, 1000, (1, 16))
    reference = tiny_llama(ids).logits
    ctx = make_ctx()
    model = pass_cls(config).run(tiny_llama, ctx)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == layer_type
    assert ctx.extra_metrics["quantized_linears"] == 14  # lm_head is tied and ignored
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    rel = (logits - reference).norm() / reference.norm()
    assert rel < 0.2, rel
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    config_json = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config_json["quantization_config"]["quant_method"] == "bitsandbytes"
    reloaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert type(reloaded.model.layers[0].mlp.down_proj).__name__ == layer_type
    torch.testing.assert_close(reloaded(ids).logits, logits)


def test_refuses_an_already_quantized_model(tiny_llama, make_ctx):
    model = BnbNF4Pass(BnbNF4Config(type="quantize")).run(tiny_llama, make_ctx())
    with pytest.raises(PassError, match="already quantized"):
        BnbNF4Pass(BnbNF4Config(type="quantize")).run(model, make_ctx())


def test_bad_config_names_the_field():
    stage = {"type": "quantize", "method": "bnb-nf4", "bits": 4}
    with pytest.raises(RecipeError, match=r"stages\[0\]\.bits: unknown key"):
        parse_recipe(
            {"name": "x", "model": "smollm2-135m", "output_dir": "runs/x", "stages": [stage]}
        )
