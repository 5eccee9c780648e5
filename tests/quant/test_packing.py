"""GPTQ v1 packing: round trips, AutoGPTQ's 3-bit layout, and an independent unpacker.

The "independent" reader below is written from the documented GPTQ v1 layout only (README, "Output layout and formats":
codes packed along the input dim as one little-endian bit stream per 32 inputs, ``qzeros``
storing ``zero - 1``), using Python integers, so it shares no code with ``packing.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slmcompress.quant.gptq_solver import HessianAccumulator, gptq_quantize
from slmcompress.quant.packing import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from slmcompress.quant.quant_linear import QuantLinear


def autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's ``QuantLinear.pack`` loop (rows = packed dim), transcribed for the test."""
    intweight = intweight.astype(np.uint32)
    rows = intweight.shape[0] // 32 * bits
    out = np.zeros((rows, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < rows:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 10 values per word, the 11th straddles the word boundary
            for j in range(i, i + 10):
                out[row] |= intweight[j] << (3 * (j - i))
            i += 10
            out[row] |= intweight[i] << 30
            row += 1
            out[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                out[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            out[row] |= intweight[i] << 31
            row += 1
            out[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                out[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return out


def independent_unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Read ``rows`` values per column from the documented little-endian bit stream."""
    words = packed.numpy().astype(np.uint32)
    out = np.zeros((rows, words.shape[1]), dtype=np.int64)
    per_block = bits  # 32 values occupy ``bits`` words
    for col in range(words.shape[1]):
        for block in range(rows // 32):
            stream = 0
            for k in range(per_block):
                stream |= int(words[block * per_block + k, col]) << (32 * k)
            for v in range(32):
                out[block * 32 + v, col] = (stream >> (v * bits)) & (2**bits - 1)
    return torch.from_numpy(out)


def independent_dequantize(layer: QuantLinear) -> torch.Tensor:
    """``w[i, o] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1))`` -> ``(out, in)``."""
    q = independent_unpack_rows(layer.qweight, layer.bits, layer.in_features)  # (in, out)
    z = (
        independent_unpack_rows(layer.qzeros.T.contiguous(), layer.bits, layer.out_features).T + 1
    )  # (G, out)
    g = layer.g_idx.long()
    return (layer.scales.float()[g] * (q.float() - z.float()[g])).T


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96, 192), generator=g, dtype=torch.int32)  # (out, in)
    qweight = pack_qweight(codes, bits)
    assert qweight.shape == (192 * bits // 32, 96) and qweight.dtype == torch.int32
    assert torch.equal(unpack_qweight(qweight, bits, 192), codes)
    zeros = torch.randint(1, 2**bits, (3, 96), generator=g, dtype=torch.int32)  # v1-safe: >= 1
    qzeros = pack_qzeros(zeros, bits)
    assert qzeros.shape == (3, 96 * bits // 32)
    assert torch.equal(unpack_qzeros(qzeros, bits, 96), zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_equals_autogptq_loop(bits):
    g = torch.Generator().manual_seed(10 + bits)
    codes = torch.randint(0, 2**bits, (64, 128), generator=g, dtype=torch.int32)  # (out, in)
    ours = pack_qweight(codes, bits).numpy().view(np.uint32)
    theirs = autogptq_pack_rows(codes.T.numpy(), bits)
    assert np.array_equal(ours, theirs)
    zeros = torch.randint(1, 2**bits, (4, 64), generator=g, dtype=torch.int32)
    ours_z = pack_qzeros(zeros, bits).numpy().view(np.uint32)
    theirs_z = autogptq_pack_rows(
        (zeros - 1).T.numpy(), bits
    ).T  # qzeros pack along out, store zero-1
    assert np.array_equal(ours_z, theirs_z)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_independent_unpacker_reproduces_gptq_weights(bits):
    torch.manual_seed(bits)
    w = torch.randn(64, 160)
    acc = HessianAccumulator(160)
    acc.add_batch(torch.randn(512, 160))
    res = gptq_quantize(w, acc.H, bits, group_size=64, act_order=True)  # ragged: 160 = 64 + 64 + 32
    layer = QuantLinear.from_codes(res.codes, res.scales, res.zeros, res.g_idx, bits, 64)
    assert torch.equal(independent_dequantize(layer), res.weight)
