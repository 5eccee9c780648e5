"""The serving layout (repack at load) against the GPTQ v1 packing code that writes checkpoints."""

from __future__ import annotations

import pytest
import torch
from random_models import random_quant_linear

from slmcompress.kernels import repack as R
from slmcompress.kernels.reference import dequantize_reference
from slmcompress.quant.packing import unpack_qzeros, unpack_rows


@pytest.mark.parametrize("bits", [3, 4])
def test_native_pack_round_trips(bits):
    codes = torch.randint(0, 2**bits, (96, 40), generator=torch.Generator().manual_seed(0))
    words = R.pack_native(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (96 * bits // 32, 40)
    assert torch.equal(R.unpack_native(words, bits, 96), codes)


def test_nib3_bit_positions():
    """Word r holds code 8r+i in bits [4i, 4i+3) and bit r of code 24+i in bit 4i+3."""
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[8 * 2 + 5] = 6  # word 2, nibble 5
    codes[24 + 3] = 0b101  # bits 0 and 2 -> words 0 and 2, bit 4*3+3
    w = R.pack_native(codes, 3).view(-1).tolist()
    assert w == [1 << 15, 0, (6 << 20) | (1 << 15)]


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_unpacking_matches_the_checkpoint_code(bits):
    layer = random_quant_linear(128, 64, bits, 32, seed=2)
    assert torch.equal(
        R.unpack_gptq_rows(layer.qweight, bits, 128), unpack_rows(layer.qweight, bits, 128).long()
    )
    assert torch.equal(
        R.unpack_gptq_zeros(layer.qzeros, bits, 64), unpack_qzeros(layer.qzeros, bits, 64).long()
    )


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize(
    ("k", "group_size", "act_order", "group"),
    [(256, 128, False, 128), (256, 64, True, 64), (256, -1, False, 0), (576, 128, False, 128)],
)
def test_repack_serves_the_same_weight(bits, k, group_size, act_order, group):
    layer = random_quant_linear(k, 96, bits, group_size, act_order, seed=3)
    w = R.repack(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, group_size)
    assert isinstance(w, R.ServingWeight) and w.group == group
    assert (w.perm is not None) == act_order
    ref = dequantize_reference(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits)
    rows = ref if w.perm is None else ref[w.perm.long()]
    torch.testing.assert_close(R.dequantize_native(w), rows, rtol=0, atol=1e-6)
    x = torch.randn(3, k)
    torch.testing.assert_close(
        R.serving_matmul_reference(x, w), x @ ref, rtol=1e-5, atol=1e-5
    )  # act-order: x is gathered, so the permutation cancels


def test_act_order_rows_become_contiguous_groups():
    layer = random_quant_linear(256, 32, 4, 64, act_order=True, seed=4)
    w = R.repack(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, 64)
    g = layer.g_idx.long()[w.perm.long()]
    assert torch.equal(g, torch.arange(256) // 64)


def test_4bit_without_act_order_serves_the_checkpoint_words():
    layer = random_quant_linear(128, 32, 4, 32, seed=5)
    w = R.repack(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, 32)
    assert w.words.data_ptr() == layer.qweight.data_ptr()  # no copy
    assert w.zeros.dtype == torch.float16 and w.scales.dtype == torch.float16


@pytest.mark.parametrize(
    ("g_idx", "group_size", "expected"),
    [
        (torch.arange(576) // 128, 128, (None, 128)),  # ragged last group
        (torch.zeros(64, dtype=torch.int32), -1, (None, 0)),
        (torch.tensor([0, 0, 1, 1, 1, 2]), 2, "groups of unequal sizes [1, 2, 3]"),
        (torch.tensor([0, 0, 2, 2]), 2, "group ids are not 0, 1, 2"),
        (torch.arange(64) // 32, 16, "rows per group 32 differ from the declared group_size 16"),
    ],
)
def test_plan_rows(g_idx, group_size, expected):
    plan = R.plan_rows(g_idx, group_size, g_idx.shape[0])
    if isinstance(expected, str):
        assert isinstance(plan, str) and plan.startswith(expected)
    else:
        assert plan == expected


def test_repack_refuses_unsupported_bits():
    with pytest.raises(ValueError, match="no serving layout for 2-bit"):
        R.vals_words(2)
