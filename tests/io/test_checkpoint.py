"""Checkpoints: safetensors only, corrupt files detected, GPTQ checkpoints round-trip exactly."""

from __future__ import annotations

import json

import pytest
import torch

from slmcompress.errors import SlmError
from slmcompress.io.checkpoint import load_checkpoint, save_checkpoint
from slmcompress.passes.quantize_rtn import RTNConfig, RTNPass
from slmcompress.quant.quant_linear import QuantLinear


@pytest.fixture
def saved(tiny_llama, tokenizer, tmp_path):
    return save_checkpoint(tiny_llama, tokenizer, tmp_path / "ckpt", {"stage": "t"})


def test_truncated_safetensors_is_reported(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SlmError, match=r"model.safetensors is corrupt or truncated"):
        load_checkpoint(saved)


def test_garbage_safetensors_is_reported(saved):
    (saved / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(SlmError, match="corrupt or truncated"):
        load_checkpoint(saved)


def test_missing_weights_and_pickle_only(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(SlmError, match="has no model.safetensors"):
        load_checkpoint(saved)
    (saved / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(SlmError, match="pickle"):
        load_checkpoint(saved)


def test_gptq_checkpoint_round_trip_is_exact(tiny_llama, tokenizer, make_ctx, tmp_path):
    reference = RTNPass(RTNConfig(type="quantize", bits=4, group_size=32)).run(
        tiny_llama, make_ctx()
    )
    save_checkpoint(reference, tokenizer, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["quantization_config"]["checkpoint_format"] == "gptq"
    assert json.loads((tmp_path / "q" / "quantize_config.json").read_text())["bits"] == 4
    loaded, _ = load_checkpoint(tmp_path / "q")
    ref_layers = {n: m for n, m in reference.named_modules() if isinstance(m, QuantLinear)}
    new_layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert ref_layers.keys() == new_layers.keys() and len(ref_layers) == 14
    for name, layer in ref_layers.items():
        assert torch.equal(layer.dequantize(), new_layers[name].dequantize()), name
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)


def test_load_model_serves_gptq_on_the_int4_cpu_kernel(
    tiny_llama, tokenizer, make_ctx, tmp_path, monkeypatch
):
    from slmcompress.data import EvalOptions
    from slmcompress.eval.report import evaluate
    from slmcompress.io.load import load_model

    reference = RTNPass(RTNConfig(type="quantize", bits=4)).run(tiny_llama, make_ctx())
    save_checkpoint(reference, tokenizer, tmp_path / "q")
    loaded = load_model(str(tmp_path / "q"), device="cpu")
    backends = {m.backend for m in loaded.model.modules() if isinstance(m, QuantLinear)}
    assert backends == {"cpu-int4"}
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        ref, served = reference(ids).logits, loaded.model(ids).logits
    torch.testing.assert_close(served, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    options = EvalOptions(ppl=False, tasks=[], speed=True, speed_tokens=4)
    metrics, _ = evaluate(reference, tokenizer, None, options)  # speed times the kernel path
    assert metrics["speed_backends"] == {"cpu-int4": 14} and metrics["tokens_per_s"] > 0
    monkeypatch.setenv("SLMCOMPRESS_KERNEL", "torch")
    plain = load_model(str(tmp_path / "q"), device="cpu").model
    assert {m.backend for m in plain.modules() if isinstance(m, QuantLinear)} == {"torch"}
