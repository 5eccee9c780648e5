"""GPTQ solver math (pure tensors, no model): exactness, act-order, ragged groups, edge cases."""

from __future__ import annotations

import pytest
import torch

from slmcompress.errors import PassError
from slmcompress.quant.gptq_solver import (
    ClipSearch,
    HessianAccumulator,
    effective_block_size,
    gptq_quantize,
    inverse_hessian_factor,
)
from slmcompress.quant.qparams import (
    clip_grid,
    dequantize_weight,
    n_groups,
    rtn_quantize_weight,
)
from slmcompress.quant.quant_linear import QuantLinear


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Activations with correlated channels and a few large ones (LLM-like)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / d**0.5)
    return x * (1 + 4 * torch.rand(d, generator=g))  # (n, d)


def hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(300):
        acc.add_batch(chunk)
    return acc.H


def output_mse(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float(((x @ (w - q).T) ** 2).mean())


def test_hessian_is_running_mean_of_2xxt():
    x = correlated_inputs(1000, 576)
    acc = HessianAccumulator(576)
    for chunk in x.split(333):  # uneven batches; blocked upper-triangle accumulation
        acc.add_batch(chunk.view(1, -1, 576))
    torch.testing.assert_close(acc.H, 2 * x.T @ x / 1000, rtol=1e-4, atol=1e-4)
    assert torch.equal(acc.H, acc.H.T) and acc.n_tokens == 1000


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_and_dequantizes_exactly(bits, act_order):
    torch.manual_seed(bits)
    w, x = torch.randn(64, 576), correlated_inputs(2048, 576)
    res = gptq_quantize(w, hessian(x), bits, group_size=128, act_order=act_order)
    assert (
        res.codes.dtype == torch.int32 and 0 <= res.codes.min() and res.codes.max() <= 2**bits - 1
    )
    assert res.scales.shape == res.zeros.shape == (5, 64)  # 576 = 4 * 128 + 64: ragged last group
    # the fake-quantized weight is exactly what the checkpoint's dequantization reproduces
    assert torch.equal(dequantize_weight(res.codes, res.scales, res.zeros, res.g_idx), res.weight)
    layer = QuantLinear.from_codes(res.codes, res.scales, res.zeros, res.g_idx, bits, 128)
    assert torch.equal(layer.dequantize(), res.weight)
    rtn = dequantize_weight(*rtn_quantize_weight(w, bits, 128, sym=False))
    assert output_mse(x, w, res.weight) < {2: 1.0}.get(bits, 0.9) * output_mse(x, w, rtn)
    assert res.stats["rel_output_err"] == pytest.approx(
        output_mse(x, w, res.weight) / float(((x @ w.T) ** 2).mean()), rel=1e-3
    )


def test_act_order_g_idx_is_valid_and_not_monotone():
    w, x = torch.randn(32, 576), correlated_inputs(1024, 576, seed=3)
    res = gptq_quantize(w, hessian(x), 4, group_size=128, act_order=True)
    g = res.g_idx.long()
    assert not torch.all(g[1:] >= g[:-1])
    assert torch.bincount(g).tolist() == [128, 128, 128, 128, 64]  # groups follow processing order
    order = torch.argsort(torch.diag(hessian(x)), descending=True, stable=True)
    assert torch.equal(g[order], torch.arange(576) // 128)  # descending diag(H)


def test_static_groups_keep_natural_groups_with_act_order():
    w, x = torch.randn(32, 256), correlated_inputs(1024, 256, seed=4)
    res = gptq_quantize(w, hessian(x), 4, group_size=64, act_order=True, static_groups=True)
    assert torch.equal(res.g_idx, (torch.arange(256) // 64).to(torch.int32))
    assert torch.equal(dequantize_weight(res.codes, res.scales, res.zeros, res.g_idx), res.weight)


@pytest.mark.parametrize("group_size", [-1, 32, 100, 128, 1024])
def test_group_sizes_including_ragged_and_larger_than_layer(group_size):
    w, x = torch.randn(16, 320), correlated_inputs(512, 320, seed=5)
    res = gptq_quantize(w, hessian(x), 4, group_size=group_size, block_size=64)
    assert res.scales.shape[0] == n_groups(
        320, group_size
    )  # 1024 > 320: one group, like per-channel
    assert torch.equal(dequantize_weight(res.codes, res.scales, res.zeros, res.g_idx), res.weight)


def test_effective_block_size_aligns_groups():
    assert effective_block_size(128, 32) == 128
    assert effective_block_size(128, 100) == 100
    assert effective_block_size(128, 256) == 128
    assert effective_block_size(128, 192) == 96
    assert effective_block_size(128, -1) == 128


def test_symmetric_zero_points_are_fixed():
    w, x = torch.randn(16, 128), correlated_inputs(256, 128)
    res = gptq_quantize(w, hessian(x), 4, group_size=32, sym=True)
    assert torch.all(res.zeros == 8)


def test_dead_inputs_get_zero_weight_and_no_nan():
    w, x = torch.randn(16, 128), correlated_inputs(512, 128)
    x[:, [3, 77]] = 0.0  # channels never active in calibration
    res = gptq_quantize(w, hessian(x), 4, group_size=32)
    assert res.stats["dead_inputs"] == 2
    assert torch.all(res.weight[:, [3, 77]] == 0) and torch.isfinite(res.weight).all()


def test_non_positive_definite_hessian_is_retried_with_more_damping():
    x = correlated_inputs(32, 128)  # rank 32 < 128 columns
    H = hessian(x)
    H -= (
        0.05 * torch.diag(H).mean() * torch.eye(128)
    )  # negative eigenvalues: 1% damping is not enough
    res = gptq_quantize(torch.randn(8, 128), H, 4, group_size=32, damp_percent=0.01)
    assert res.stats["damp_retries"] >= 1 and res.stats["damp_percent"] > 0.01
    assert torch.isfinite(res.weight).all()


def test_hopeless_hessian_raises_pass_error():
    H = torch.full((16, 16), float("nan"))
    with pytest.raises(PassError, match="not positive definite"):
        inverse_hessian_factor(H, 0.01)


def test_deterministic():
    w, x = torch.randn(32, 192), correlated_inputs(512, 192)
    a = gptq_quantize(w, hessian(x), 3, group_size=64, act_order=True)
    b = gptq_quantize(w, hessian(x), 3, group_size=64, act_order=True)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def test_stacked_rows_solve_like_separate_rows():
    """q/k/v share H, so the pass solves them as one stacked matrix: rows are independent."""
    w, x = torch.randn(48, 128), correlated_inputs(512, 128)
    H = hessian(x)
    stacked = gptq_quantize(w, H, 4, group_size=32, act_order=True)
    top = gptq_quantize(w[:16], H, 4, group_size=32, act_order=True)
    assert torch.equal(stacked.codes[:16], top.codes)


def outlier_weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return w * (1 + 4 * (torch.rand(rows, cols, generator=g) > 0.98))


@pytest.mark.parametrize("static_groups", [False, True])
def test_clip_search_with_ratio_one_is_the_plain_solver(static_groups):
    w, x = outlier_weights(32, 192), correlated_inputs(512, 192)
    kwargs = dict(group_size=64, act_order=True, static_groups=static_groups)
    plain = gptq_quantize(w, hessian(x), 4, **kwargs)
    same = gptq_quantize(w, hessian(x), 4, clip=ClipSearch((1.0,)), **kwargs)
    assert torch.equal(plain.codes, same.codes) and torch.equal(plain.scales, same.scales)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("static_groups", [False, True])
def test_clip_search_lowers_output_error_and_stays_exact(weighted, static_groups):
    w, x = outlier_weights(64, 256, seed=1), correlated_inputs(2048, 256, seed=1)
    kwargs = dict(group_size=64, act_order=True, static_groups=static_groups)
    plain = gptq_quantize(w, hessian(x), 3, **kwargs)
    clip = ClipSearch(tuple(clip_grid(0.6, 20)), weighted=weighted)
    res = gptq_quantize(w, hessian(x), 3, clip=clip, **kwargs)
    assert torch.equal(dequantize_weight(res.codes, res.scales, res.zeros, res.g_idx), res.weight)
    assert not torch.equal(res.codes, plain.codes)
    assert (res.scales <= plain.scales).float().mean() > 0.5  # mostly shrunken ranges
    assert res.stats["rel_output_err"] < 0.95 * plain.stats["rel_output_err"]
