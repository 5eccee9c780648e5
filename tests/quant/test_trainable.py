"""Trainable QuantLinear views (scales / ste / lsq): exact forward, gradients, back-conversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slmcompress.errors import PassError
from slmcompress.quant.qparams import default_g_idx
from slmcompress.quant.quant_linear import QuantLinear
from slmcompress.quant.trainable import (
    TrainableQuantLinear,
    cast_float_parts,
    fake_quant,
    quant_parameters,
    round_ste,
    to_quant,
    to_trainable,
)


def _layer(in_features=128, out_features=64, bits=4, group_size=32, act_order=False, bias=False):
    gen = torch.Generator().manual_seed(bits)
    groups = in_features // group_size
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen)
    zeros = torch.randint(1, 2**bits, (groups, out_features), generator=gen)
    scales = torch.rand(groups, out_features, generator=gen) * 0.05 + 0.01
    g_idx = default_g_idx(in_features, group_size)
    if act_order:  # a permuted, non-monotone g_idx as act-order GPTQ writes it
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    b = torch.randn(out_features, generator=gen) if bias else None
    return QuantLinear.from_codes(codes, scales, zeros, g_idx, bits, group_size, b)


def _x(in_features=128) -> torch.Tensor:
    return torch.randn(3, 5, in_features, generator=torch.Generator().manual_seed(7))  # (B, T, in)


@pytest.mark.parametrize("mode", ["scales", "ste", "lsq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_conversion_keeps_the_forward_exactly(mode, bits):
    layer = _layer(bits=bits, act_order=True, bias=True)
    trainable = TrainableQuantLinear(layer, mode)
    assert torch.equal(trainable(_x()), layer(_x()))
    back = trainable.to_quant()
    for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        assert torch.equal(getattr(back, name), getattr(layer, name)), name
    assert back.scales.dtype == torch.float16 and (back.bits, back.group_size) == (bits, 32)


def test_scales_mode_trains_scales_only_and_keeps_codes():
    layer = _layer(act_order=True)
    trainable = TrainableQuantLinear(layer, "scales")
    assert [n for n, _ in trainable.named_parameters()] == ["scales"]
    trainable(_x()).pow(2).sum().backward()
    assert trainable.scales.grad is not None and trainable.scales.grad.abs().sum() > 0
    with torch.no_grad():
        trainable.scales.mul_(1.1)
    back = trainable.to_quant()
    assert torch.equal(back.qweight, layer.qweight) and torch.equal(back.qzeros, layer.qzeros)
    assert not torch.equal(back.scales, layer.scales)
    torch.testing.assert_close(back.scales.float(), layer.scales.float() * 1.1, rtol=1e-3, atol=0)
    assert torch.equal(back(_x()), trainable(_x()))  # the forward already used fp16 scales


def test_scale_gradient_is_the_analytic_one():
    layer = _layer(in_features=64, out_features=8, group_size=32)
    trainable = TrainableQuantLinear(layer, "scales")
    x = _x(64)
    grad_out = torch.randn(3, 5, 8)
    (trainable(x) * grad_out).sum().backward()
    # d/ds[g, o] of sum_bt grad_out[o] * sum_{i in g} s[g,o] (q - z)[o, i] x[i]
    grad_w = grad_out.reshape(-1, 8).T @ x.reshape(-1, 64)  # (out, in)
    centred = (layer.codes() - layer.zeros()[layer.g_idx.long()].T).float()
    expected = (grad_w * centred).reshape(8, 2, 32).sum(-1).T  # (G, out)
    torch.testing.assert_close(trainable.scales.grad, expected, rtol=1e-4, atol=1e-4)


def test_ste_forward_is_fake_quant_and_gradient_is_clipped_identity():
    layer = _layer(bits=3, in_features=64, out_features=32)
    trainable = TrainableQuantLinear(layer, "ste")
    assert [n for n, _ in trainable.named_parameters()] == ["weight"]
    with torch.no_grad():
        trainable.weight.add_(torch.randn_like(trainable.weight) * 0.02)
        trainable.weight[0, 0] = 100.0  # far outside the grid: clamped
    g = layer.g_idx.long()
    scales, zeros = layer.scales.float()[g].T, layer.zeros().float()[g].T  # (out, in)
    q = torch.clamp(torch.round(trainable.weight / scales) + zeros, 0, 7)
    expected_w = scales * (q - zeros)
    torch.testing.assert_close(trainable.quantized_weight(), expected_w, rtol=0, atol=0)
    trainable.quantized_weight().sum().backward()
    unclamped = torch.round(trainable.weight / scales) + zeros
    inside = ((unclamped >= 0) & (unclamped <= 7)).float()
    assert trainable.weight.grad[0, 0] == 0 and torch.equal(trainable.weight.grad, inside)
    assert torch.equal(trainable.to_quant().codes(), q.to(torch.int32))


def test_round_ste_is_exact_and_lsq_gradient_matches_the_paper():
    x = torch.linspace(-300, 300, 100_003)
    assert torch.equal(round_ste(x), torch.round(x))
    w = torch.tensor([0.026, -0.074, 5.0])
    s = torch.tensor(0.1, requires_grad=True)
    fake_quant(w, s, torch.tensor(2.0), bits=2).sum().backward()  # codes 0..3, zero 2
    # LSQ (Esser et al. 2020, eq. 3): round(w/s) - w/s inside the grid, q - z where clamped
    expected = (0 - 0.26) + (-1 + 0.74) + (3 - 2)
    assert s.grad.item() == pytest.approx(expected, abs=1e-5)


def test_model_round_trip_and_trainable_parameters():
    model = nn.Sequential(_layer(), nn.LayerNorm(64), _layer(64, 128, bits=3))
    model[1].float()
    assert to_trainable(model, "lsq") == 2
    names = sorted(n for n, _ in model.named_parameters())
    assert names == ["0.scales", "0.weight", "1.bias", "1.weight", "2.scales", "2.weight"]
    assert len(quant_parameters(model)) == 4
    assert all(getattr(p, "no_weight_decay", False) for p in quant_parameters(model))
    out = model(_x())
    assert to_quant(model) == 2 and isinstance(model[2], QuantLinear) and model[2].bits == 3
    assert torch.equal(model(_x()), out)


def test_cast_float_parts_keeps_quant_buffers_fp16():
    model = nn.Sequential(_layer(bias=True), nn.LayerNorm(64))
    cast_float_parts(model, torch.bfloat16)
    assert model[1].weight.dtype == torch.bfloat16
    assert model[0].scales.dtype == torch.float16 and model[0].bias.dtype == torch.float16


def test_non_finite_scales_are_refused():
    trainable = TrainableQuantLinear(_layer(), "scales")
    with torch.no_grad():
        trainable.scales[0, 0] = float("nan")
    with pytest.raises(PassError, match=r"^stages\[1\]\.quantized: scales training left"):
        trainable.to_quant("stages[1].quantized")
