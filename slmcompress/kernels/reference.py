"""Plain-torch reference for the Triton dequant-matmul, and random GPTQ layers to test it with.

Deliberately independent of the kernel: it unpacks through :mod:`slmcompress.quant.packing`
(the code that writes checkpoints) and computes in float32.
"""

from __future__ import annotations

import torch

from slmcompress.quant.packing import unpack_qzeros, unpack_rows
from slmcompress.quant.qparams import n_groups
from slmcompress.quant.quant_linear import QuantLinear


def dequantize_reference(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """Float32 ``(K, N)``: ``w[i, o] = scales[g_idx[i], o] * (q[i, o] - zeros[g_idx[i], o])``."""
    k, n = g_idx.shape[0], scales.shape[1]
    q = unpack_rows(qweight, bits, k).float()  # (K, N)
    z = unpack_qzeros(qzeros, bits, n).float()  # (G, N), v1 offset added back
    g = g_idx.long()
    return scales.float()[g] * (q - z[g])  # (K, N)


def quant_matmul_reference(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """``x (..., K) @ W (K, N)`` in float32, returned in ``x.dtype`` (bias not added)."""
    w = dequantize_reference(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits)
    return (x.float() @ w.to(x.device)).to(x.dtype)


def act_order_g_idx(in_features: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """``g_idx`` as GPTQ act-order writes it: groups follow a random column permutation."""
    step = in_features if group_size == -1 else group_size
    perm = torch.randperm(in_features, generator=generator)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_features) // step).to(torch.int32)
    return g_idx  # (K,), not monotone


def random_quant_linear(
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int,
    act_order: bool = False,
    seed: int = 0,
    sym: bool = False,
) -> QuantLinear:
    """A QuantLinear with random codes, zeros and positive scales (``group_size`` -1 = per channel).

    ``sym``: every zero point is ``2**(bits-1)``, as symmetric GPTQ writes them.
    """
    gen = torch.Generator().manual_seed(seed)
    groups = n_groups(in_features, group_size)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 2**bits, (groups, out_features), generator=gen, dtype=torch.int32)
    if sym:
        zeros = torch.full_like(zeros, 2 ** (bits - 1))
    scales = torch.rand(groups, out_features, generator=gen) * 0.02 + 0.001  # (G, N)
    if act_order:
        g_idx = act_order_g_idx(in_features, group_size, gen)
    else:
        step = in_features if group_size == -1 else group_size
        g_idx = (torch.arange(in_features) // step).to(torch.int32)
    return QuantLinear.from_codes(codes, scales, zeros, g_idx, bits, group_size)
