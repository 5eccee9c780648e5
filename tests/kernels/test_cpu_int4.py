"""The int4 CPU kernel path against the plain-torch reference, and its fallbacks."""

from __future__ import annotations

import pytest
import torch
from random_models import random_quant_linear

from slmcompress.kernels import cpu_int4, dispatch
from slmcompress.kernels.reference import quant_matmul_reference
from slmcompress.quant.quant_linear import QuantLinear, cached_dequantization

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(not cpu_int4.available(), reason="this torch has no int4 CPU kernel"),
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(dispatch.KERNEL_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # the same draws whatever ran before: a 2x128 bf16-rounded input's SQNR varies by a few dB
    torch.manual_seed(0)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` (torchao's compute_error)."""
    ref, out = ref.double(), out.double()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


def served(layer: QuantLinear) -> QuantLinear:
    dispatch.set_backends(layer)
    return layer


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_int4_kernel_matches_reference(group_size, act_order, sym):
    layer = served(random_quant_linear(256, 96, 4, group_size, act_order=act_order, sym=sym))
    assert layer.backend == "cpu-int4"
    for shape in [(1, 256), (3, 7, 256)]:  # decode (batch 1) and a batch of sequences
        x = torch.randn(*shape)
        out, ref = layer(x), quant_matmul_reference(x, layer)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert sqnr_db(ref, out) > 40  # bf16 activations and scales: ~2^-9 relative
        torch.testing.assert_close(out, ref, rtol=0.05, atol=0.02 * ref.abs().max().item())


@pytest.mark.parametrize(
    ("in_features", "out_features", "bits", "group_size", "kernel_group"),
    [
        (576, 48, 4, 128, 64),  # ragged 576 = 4 x 128 + 64: kernel groups of 64, scales repeated
        (96, 16, 4, 32, 32),  # odd widths
        (256, 32, 4, -1, 256),  # per-channel: one group spanning K
        (96, 32, 4, -1, 32),
        (192, 32, 3, 64, 64),  # 3-bit codes in the 4-bit container, exact
        (128, 32, 2, 32, 32),
    ],
)
def test_layouts_the_kernel_serves(in_features, out_features, bits, group_size, kernel_group):
    for act_order in (False, True):
        layer = served(random_quant_linear(in_features, out_features, bits, group_size, act_order))
        assert layer.backend == "cpu-int4"
        assert dispatch.cpu_weight(layer).group_size == kernel_group
        x = torch.randn(2, in_features)
        # 2/3-bit codes sit in the 4-bit container with zero 8: the kernel's bf16 zero term
        # s*(8 - z) is several times the weight s*(q - z), so its rounding costs a few dB
        floor = 40 if bits == 4 else 35
        assert sqnr_db(quant_matmul_reference(x, layer), layer(x)) > floor


@pytest.mark.parametrize(
    ("layer", "why"),
    [
        (random_quant_linear(64, 64, 8, 32), "no 8-bit CPU kernel"),
        (random_quant_linear(64, 24, 4, 32), "output width 24 is not a multiple of 16"),
        (random_quant_linear(64, 64, 4, 16), "group sizes [16] are not multiples of 32"),
        (random_quant_linear(80, 64, 4, 64), "group sizes [16, 64] are not multiples of 32"),
    ],
)
def test_shapes_the_kernel_cannot_take_fall_back_to_the_cached_reference(layer, why):
    backend, reason = dispatch.explain_backend(layer, "cpu")
    assert backend == "torch-cached" and why in reason
    served(layer)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), quant_matmul_reference(x, layer), rtol=1e-5, atol=1e-5)
    assert layer._weight_cache is not None  # dequantized once, kept


def test_env_torch_keeps_the_per_call_reference(monkeypatch):
    monkeypatch.setenv(dispatch.KERNEL_ENV, "torch")
    layer = served(random_quant_linear(64, 64, 4, 32))
    assert layer.backend == "torch"
    layer(torch.randn(1, 64))
    assert layer._weight_cache is None


def test_evaluation_cache_and_autograd_take_the_exact_reference():
    layer = served(random_quant_linear(128, 64, 4, 32))
    x = torch.randn(4, 128)
    reference = quant_matmul_reference(x, layer)
    with cached_dequantization(layer):
        torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    out = layer(x)
    assert out.grad_fn is not None
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_conversion_is_redone_when_the_weights_change():
    layer = served(random_quant_linear(128, 64, 4, 32))
    x = torch.randn(2, 128)
    before = layer(x)
    first = dispatch.cpu_weight(layer)
    assert dispatch.cpu_weight(layer) is first  # converted once
    layer.scales.mul_(2)
    torch.testing.assert_close(layer(x), 2 * before, rtol=1e-2, atol=1e-3)
    assert dispatch.cpu_weight(layer) is not first


def test_bf16_and_fp16_activations_keep_their_dtype():
    layer = served(random_quant_linear(128, 64, 4, 32))
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(2, 128, dtype=dtype)
        out = layer(x)
        assert out.dtype == dtype
        assert sqnr_db(quant_matmul_reference(x.float(), layer), out.float()) > 30


def test_tiny_llama_logits_and_greedy_tokens_match_the_reference(tiny_llama, make_ctx):
    from slmcompress.passes.quantize_rtn import RTNConfig, RTNPass

    model = RTNPass(RTNConfig(type="quantize", bits=4, group_size=32)).run(tiny_llama, make_ctx())
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        counts = dispatch.set_backends(model)
        kernel = model(ids).logits
    assert counts == {"cpu-int4": 14}  # 7 linears x 2 layers; the tied head stays float
    assert sqnr_db(reference, kernel) > 35
    tokens = {}
    for backend in ("cpu-int4", "torch"):
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.backend = backend
        tokens[backend] = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens["cpu-int4"], tokens["torch"])
