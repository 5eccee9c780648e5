"""RTN math and QuantLinear numerics (tensor functions, no model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slmcompress.quant.qparams import (
    clip_grid,
    compute_qparams,
    dequantize_weight,
    fake_quantize,
    rtn_quantize_weight,
    search_qparams,
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


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """LLM-like weights: Gaussian bulk plus a few large outliers per row."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * (
        1 + 3 * (torch.rand(rows, cols, generator=g) > 0.98)
    )


def test_clip_grid_runs_from_one_down_to_the_minimum():
    assert clip_grid(0.8, 4) == pytest.approx([1.0, 0.95, 0.9, 0.85, 0.8])
    assert clip_grid(0.7, 15)[0] == 1.0 and len(clip_grid(0.7, 15)) == 16


@pytest.mark.parametrize("sym", [False, True])
def test_search_with_only_ratio_one_is_plain_min_max(sym):
    w = heavy_tailed(32, 64)
    scale, zero = search_qparams(w, 4, sym, [1.0])
    expected = compute_qparams(w, 4, sym)
    assert torch.equal(scale, expected[0]) and torch.equal(zero, expected[1])


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_never_increases_each_rows_error(bits, sym):
    w = heavy_tailed(64, 128, seed=bits)
    weight = torch.rand(128) + 0.1

    def row_err(scale, zero, col_weight=None):
        err = (fake_quantize(w, scale, zero, bits) - w).abs().pow(2.4)
        return err @ col_weight if col_weight is not None else err.sum(1)

    plain = compute_qparams(w, bits, sym)
    for col_weight in (None, weight):
        scale, zero = search_qparams(w, bits, sym, clip_grid(0.6, 20), col_weight=col_weight)
        assert torch.all(scale <= plain[0] + 1e-12)  # only ever shrinks the range
        before, after = row_err(*plain, col_weight), row_err(scale, zero, col_weight)
        assert torch.all(after <= before)
        assert after.sum() < 0.95 * before.sum()  # outliers: clipping pays off
        if not sym:
            assert zero.min() >= 1  # still v1-safe


def test_rtn_with_clip_search_dequantizes_to_the_searched_fake_quant():
    w = heavy_tailed(48, 160)  # ragged: 160 = 64 + 64 + 32
    ratios = clip_grid(0.7, 15)
    codes, scales, zeros, g_idx = rtn_quantize_weight(w, 4, 64, False, clip_ratios=ratios)
    expected = torch.empty_like(w)
    for start in range(0, 160, 64):
        block = w[:, start : start + 64]
        expected[:, start : start + 64] = fake_quantize(
            block, *search_qparams(block, 4, False, ratios), 4
        )
    torch.testing.assert_close(dequantize_weight(codes, scales, zeros, g_idx), expected)
    plain = dequantize_weight(*rtn_quantize_weight(w, 4, 64, False))
    assert (expected - w).pow(2).sum() < 0.95 * (plain - w).pow(2).sum()
