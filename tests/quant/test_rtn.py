"""RTN math and QuantLinear numerics (tensor functions, no model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slmcompress.quant.qparams import (
    compute_qparams,
    dequantize_weight,
    fake_quantize,
    rtn_quantize_weight,
)
from slmcompress.quant.quant_linear import QuantLinear


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - approx).pow(2).sum()))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_codes_dequantize_to_the_fake_quantized_weight(bits, group_size, sym):
    torch.manual_seed(bits)
    weight = torch.randn(64, 576)  # 576 = 4.5 groups of 128: the ragged SmolLM2 case
    codes, scales, zeros, g_idx = rtn_quantize_weight(weight, bits, group_size, sym)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert scales.shape[0] == (1 if group_size == -1 else -(-576 // group_size))
    expected = torch.empty_like(weight)
    step = 576 if group_size == -1 else group_size
    for start in range(0, 576, step):
        block = weight[:, start : start + step]
        scale, zero = compute_qparams(block, bits, sym)
        expected[:, start : start + step] = fake_quantize(block, scale, zero, bits)
    torch.testing.assert_close(dequantize_weight(codes, scales, zeros, g_idx), expected)
    layer = QuantLinear.from_codes(codes, scales, zeros, g_idx, bits, group_size)
    # fp16 scales in the checkpoint: exact up to fp16 rounding of the scale
    torch.testing.assert_close(layer.dequantize(), expected, rtol=1e-3, atol=1e-3)
    assert sqnr_db(weight, layer.dequantize()) > {2: 3, 3: 9, 4: 15, 8: 38}[bits]


def test_zero_points_are_v1_safe():
    weight = torch.rand(8, 64)  # all positive: a naive zero point would be 0 (wraps in v1)
    _, _, zeros, _ = rtn_quantize_weight(weight, 4, 32, sym=False)
    assert zeros.min() >= 1


def test_quant_linear_forward_matches_dequantized_matmul():
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 128), torch.randn(96)
    codes, scales, zeros, g_idx = rtn_quantize_weight(weight, 4, 64, False)
    layer = QuantLinear.from_codes(codes, scales, zeros, g_idx, 4, 64, bias=bias)
    x = torch.randn(3, 5, 128)
    expected = F.linear(x, layer.dequantize(), bias.half().float())
    torch.testing.assert_close(layer(x), expected)
