"""Plain-torch reference for the Triton dequant-matmul (random layers to test it with: tests/).

Deliberately independent of the kernel: it unpacks through :mod:`slmcompress.quant.packing`
(the code that writes checkpoints) and computes in float32.
"""

from __future__ import annotations

import torch

from slmcompress.quant.packing import unpack_qzeros, unpack_rows
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
