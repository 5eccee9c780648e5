"""Backend choice (torch vs Triton), the torch path's numbers, and a tiny Llama end to end."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from _interp import run_interpreted
from random_models import random_quant_linear
from torch import nn

from slmcompress.kernels import dispatch
from slmcompress.kernels.reference import quant_matmul_reference

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(dispatch.KERNEL_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _model(*bits: int) -> nn.Module:
    return nn.Sequential(*[random_quant_linear(64, 64, b, 32) for b in bits])


@pytest.mark.parametrize("bits", [2, 8])
def test_unsupported_bits_stay_on_torch_with_an_info_line(bits, monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even forced, where the kernel could run
    layer = random_quant_linear(64, 64, bits, 32)
    backend, reason = dispatch.explain_backend(layer, "cuda", force=True)
    assert backend == "torch" and f"no {bits}-bit" in reason
    with caplog.at_level(logging.INFO, logger="slmcompress.kernels.dispatch"):
        counts = dispatch.set_backends(_model(bits, bits), force=True)
    assert counts == {"torch": 2}
    assert any(f"no {bits}-bit" in r.getMessage() for r in caplog.records)


def test_cpu_without_force_uses_the_int4_cpu_kernel():
    layer = random_quant_linear(64, 64, 4, 32)
    assert dispatch.explain_backend(layer, "cpu") == ("cpu-int4", "int4 CPU kernel")
    assert dispatch.choose_backend(random_quant_linear(64, 64, 8, 32), "cpu") == "torch-cached"


@needs_triton
@pytest.mark.parametrize("bits", [3, 4])
def test_cuda_and_forced_interpreter_pick_the_kernel(bits, monkeypatch):
    layer = random_quant_linear(64, 64, bits, 32)
    assert dispatch.choose_backend(layer, "cuda") == f"triton-int{bits}"
    # no interpreter: Triton would crash on CPU tensors, the CPU kernel serves instead
    assert dispatch.choose_backend(layer, "cpu", force=True) == "cpu-int4"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose_backend(layer, "cpu", force=True) == f"triton-int{bits}"
    monkeypatch.setenv(dispatch.KERNEL_ENV, "triton")
    assert dispatch.choose_backend(layer, "cpu") == f"triton-int{bits}"


def test_env_switch(monkeypatch):
    layer = random_quant_linear(64, 64, 4, 32)
    monkeypatch.setenv(dispatch.KERNEL_ENV, "torch")
    assert dispatch.explain_backend(layer, "cuda", force=True) == (
        "torch",
        f"{dispatch.KERNEL_ENV}=torch",
    )
    monkeypatch.setenv(dispatch.KERNEL_ENV, "cuda-please")
    with pytest.raises(ValueError, match="use auto, triton or torch"):
        dispatch.choose_backend(layer, "cuda")


def test_missing_triton_falls_back(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    layer = random_quant_linear(64, 64, 4, 32)
    assert dispatch.explain_backend(layer, "cuda") == ("torch", "triton is not installed")


def test_set_backends_counts_layers():
    counts = dispatch.set_backends(_model(4, 3, 8))  # CPU, not forced
    assert counts == {"cpu-int4": 2, "torch-cached": 1}


def test_torch_path_matches_reference():
    layer = random_quant_linear(128, 96, 4, 32, act_order=True)
    x = torch.randn(2, 5, 128)
    torch.testing.assert_close(
        dispatch.quant_matmul(x, layer), quant_matmul_reference(x, layer), rtol=1e-4, atol=1e-4
    )


@needs_triton
def test_group_layout_detects_uniform_single_and_act_order():
    from slmcompress.kernels.int4_matmul import G_GATHER, G_UNIFORM, SINGLE_GROUP

    assert dispatch.group_layout(torch.arange(576) // 128, 128, 576) == (G_UNIFORM, 128)  # ragged
    assert dispatch.group_layout(torch.zeros(256, dtype=torch.int32), -1, 256) == (
        G_UNIFORM,
        SINGLE_GROUP,
    )
    act = random_quant_linear(256, 64, 4, 64, act_order=True).g_idx
    assert dispatch.group_layout(act, 64, 256) == (G_GATHER, 1)


@needs_triton
def test_tiny_llama_generates_the_same_tokens_through_the_kernel():
    bits = 4
    result = run_interpreted(["tests/kernels/_llama_generate.py", str(bits), "32"])
    assert result["backends"] == {f"triton-int{bits}": 15}  # 7 per layer x 2 + lm_head
    assert result["kernel_tokens"] == result["torch_tokens"]
    assert result["max_logit_diff"] < 1e-3
    assert result["routes"] == ["gemv", "mm"]  # prefill (8 tokens) on tl.dot, decode on GEMV


def test_quant_linear_runs_only_the_matmul_the_dispatcher_installed(monkeypatch):
    """QuantLinear never imports the kernels: until set_backends installs a matmul, forward
    is the torch reference; after, it calls exactly the installed one."""
    layer = random_quant_linear(64, 64, 4, 32)
    x = torch.randn(3, 64)
    assert layer.matmul is None
    reference = layer(x)
    dispatch.set_backends(layer)  # CPU: the int4 CPU kernel
    assert layer.backend == "cpu-int4" and layer.matmul is dispatch.quant_matmul
    calls = []
    real = layer.matmul
    layer.matmul = lambda inp, lyr: calls.append(lyr) or real(inp, lyr)
    served = layer(x)
    assert calls == [layer]
    assert (served - reference).abs().max() < 0.02 * reference.abs().max()  # bf16 kernel
