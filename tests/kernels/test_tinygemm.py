"""The tinygemm route's weight conversion (the CUDA op itself runs only on a GPU)."""

from __future__ import annotations

import pytest
import torch
from random_models import random_quant_linear

from slmcompress.kernels import tinygemm
from slmcompress.kernels.repack import dequantize_native, repack


@pytest.mark.parametrize("act_order", [False, True])
def test_prepack_encodes_the_same_weight(act_order):
    layer = random_quant_linear(256, 64, 4, 64, act_order, seed=9)
    w = repack(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, 64)
    u8, sz = tinygemm.prepack(w)
    assert u8.dtype == torch.uint8 and u8.shape == (64, 128)
    assert sz.dtype == torch.bfloat16 and sz.shape == (4, 64, 2)
    ref = dequantize_native(w)  # (K, N) in serving (sorted) row order
    got = tinygemm.dequantize_prepacked(u8, sz, 64)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-2  # bf16 scales and zeros


def test_even_input_channel_is_the_high_nibble():
    layer = random_quant_linear(64, 16, 4, 32, seed=10)
    w = repack(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, 32)
    u8, _ = tinygemm.prepack(w)
    codes = layer.codes()  # (N, K)
    assert torch.equal((u8 >> 4).long(), codes[:, 0::2].long())
    assert torch.equal((u8 & 15).long(), codes[:, 1::2].long())


def test_prepack_refuses_what_tinygemm_cannot_hold():
    layer = random_quant_linear(64, 32, 3, 32, seed=11)
    w = repack(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 3, 32)
    with pytest.raises(ValueError, match="4-bit"):
        tinygemm.prepack(w)
