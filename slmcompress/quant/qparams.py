"""Uniform affine quantization math shared by RTN and GPTQ (pure tensor functions).

Conventions (those of the GPTQ checkpoint format): an integer code ``q`` in ``[0, 2**bits - 1]``
dequantizes to ``scale * (q - zero)``. Symmetric quantization fixes ``zero = 2**(bits-1)``.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def max_code(bits: int) -> int:
    """Largest integer code for ``bits``."""
    return 2**bits - 1


def compute_qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero for a ``(rows, cols)`` block of weights.

    The range always includes 0 (so exact zeros stay exact), as in the GPTQ reference.
    Asymmetric zeros are clamped to ``>= 1``: the v1 checkpoint format stores ``zero - 1``
    in ``bits`` bits, so a zero of 0 would wrap around and every v1 reader would decode
    it as ``2**bits``; clamping keeps our checkpoint readable by all of them.

    Returns:
        ``scale`` and ``zero``, each ``(rows, 1)`` float32.
    """
    maxq = max_code(bits)
    w = w.float()
    xmin = torch.clamp(w.amin(dim=1), max=0.0)  # (rows,)
    xmax = torch.clamp(w.amax(dim=1), min=0.0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 1, maxq)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Integer codes ``clamp(round(w / scale) + zero)`` (float tensor holding integers)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)``."""
    return scale * (q - zero)


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Quantize then dequantize (what the checkpoint will reproduce)."""
    return dequantize_codes(quantize_codes(w, scale, zero, bits), scale, zero)


def n_groups(in_features: int, group_size: int) -> int:
    """Number of input groups; a ragged last group is allowed (576 / 128 -> 5)."""
    if group_size == -1:
        return 1
    return -(-in_features // group_size)


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """Group index of each input channel without act-order: ``i // group_size``."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // group_size).to(torch.int32)


def rtn_quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of a ``(out, in)`` Linear weight, group-wise along ``in``.

    Returns:
        ``codes`` (out, in) int32, ``scales`` (n_groups, out) float32,
        ``zeros`` (n_groups, out) int32, ``g_idx`` (in,) int32.
    """
    out_features, in_features = weight.shape
    step = in_features if group_size == -1 else group_size
    codes = torch.empty(out_features, in_features, dtype=torch.int32)
    scales, zeros = [], []
    for start in range(0, in_features, step):
        block = weight[:, start : start + step].float()  # (out, g)
        scale, zero = compute_qparams(block, bits, sym)
        codes[:, start : start + step] = quantize_codes(block, scale, zero, bits).to(torch.int32)
        scales.append(scale.squeeze(1))
        zeros.append(zero.squeeze(1))
    g_idx = default_g_idx(in_features, group_size)
    return codes, torch.stack(scales), torch.stack(zeros).to(torch.int32), g_idx


def dequantize_weight(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """Float ``(out, in)`` weight from codes ``(out, in)``, per-group scales/zeros ``(G, out)``."""
    g = g_idx.long()
    return scales[g].T.float() * (codes.float() - zeros[g].T.float())
