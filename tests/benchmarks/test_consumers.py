"""Our GPTQ v1 checkpoints load in transformers' GPTQ integration (optimum + gptqmodel, CPU).

Needs gptqmodel 7.6 + optimum beside torch's CPU build (a separate venv: gptqmodel 7.7 pulls a
CUDA torch); skipped with that reason elsewhere. ``benchmarks/consumers.py`` runs the same
check on SmolLM2-135M with real calibration; this test keeps it from rotting on a tiny Llama.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module", autouse=True)
def consumer():
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    pytest.importorskip("optimum", reason="transformers' GPTQ loading needs optimum")
    pytest.importorskip("gptqmodel", reason="needs gptqmodel 7.6 (CPU torch) + optimum")


def quantized_dir(tiny_llama, tokenizer, make_ctx, tmp_path, **options):
    from slmcompress.io.checkpoint import save_checkpoint
    from slmcompress.passes.gptq import GPTQConfig, GPTQPass

    model = GPTQPass(GPTQConfig(type="quantize", **options)).run(tiny_llama, make_ctx())
    return save_checkpoint(model, tokenizer, tmp_path / "ckpt")


def logits_both_ways(directory) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours on the exact reference path, transformers + gptqmodel) on the same ids."""
    from transformers import AutoModelForCausalLM

    from slmcompress.io.checkpoint import load_checkpoint
    from slmcompress.quant.quant_linear import cached_dequantization

    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, _ = load_checkpoint(directory)
    theirs = AutoModelForCausalLM.from_pretrained(str(directory), device_map="cpu").eval()
    with torch.no_grad(), cached_dequantization(ours):
        return ours(ids).logits, theirs(ids).logits.float()


@pytest.mark.parametrize(
    "options",
    [
        {"bits": 4, "act_order": False},
        {"bits": 4, "act_order": True},
        {"bits": 8, "act_order": False},
        {"bits": 3, "act_order": False},
        {"bits": 4, "act_order": True, "sym": True},
    ],
    ids=["w4", "w4-act", "w8", "w3", "w4-act-sym"],
)
def test_consumer_logits_match_ours(tiny_llama, tokenizer, make_ctx, tmp_path, options):
    directory = quantized_dir(tiny_llama, tokenizer, make_ctx, tmp_path, **options)
    ours, theirs = logits_both_ways(directory)  # group_size auto: 64 for widths 64/128
    scale = ours.abs().max().item()
    assert (ours - theirs).abs().max().item() < 0.02 * scale  # bf16 kernels on their side
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


def test_consumer_refuses_a_ragged_group_size(tiny_llama, tokenizer, make_ctx, tmp_path):
    # 128 over input widths of 64: what g128 does to SmolLM2's 576 (4 x 128 + a ragged 64)
    directory = quantized_dir(tiny_llama, tokenizer, make_ctx, tmp_path, bits=4, group_size=128)
    with pytest.raises(RuntimeError, match="expect K to be divisible by qGroupSize"):
        logits_both_ways(directory)
