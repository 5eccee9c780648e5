"""QuantLinear's torch path: dequantize per call, or cache for an evaluation block."""

from __future__ import annotations

import torch
from torch import nn

from slmcompress.quant.qparams import default_g_idx
from slmcompress.quant.quant_linear import QuantLinear, cached_dequantization


def _layer(in_features=256, out_features=64, bits=4, group_size=64) -> QuantLinear:
    gen = torch.Generator().manual_seed(0)
    groups = in_features // group_size
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen)
    zeros = torch.randint(1, 2**bits, (groups, out_features), generator=gen)
    scales = torch.rand(groups, out_features, generator=gen) * 0.01 + 0.001
    return QuantLinear.from_codes(
        codes, scales, zeros, default_g_idx(in_features, group_size), bits, group_size
    )


def test_cached_dequantization_gives_identical_outputs_and_frees_the_cache():
    model = nn.Sequential(_layer(), nn.ReLU(), _layer(64, 256, group_size=32))
    x = torch.randn(3, 5, 256)
    expected = model(x)
    with cached_dequantization(model) as n:
        assert n == 2
        first, second = model(x), model(x)
        assert model[0]._weight_cache is not None  # kept between calls
        torch.testing.assert_close(model[0]._weight_cache, model[0].dequantize(torch.float32))
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert model[0]._weight_cache is None and not model[0].cache_weight


def test_cache_follows_the_activation_dtype():
    layer = _layer()
    with cached_dequantization(layer):
        layer(torch.randn(2, 256))
        out = layer(torch.randn(2, 256, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16 and layer._weight_cache.dtype == torch.bfloat16
