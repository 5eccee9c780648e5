"""Uniform affine quantization math shared by RTN and GPTQ (pure tensor functions).

Conventions (those of the GPTQ checkpoint format): an integer code ``q`` in ``[0, 2**bits - 1]``
dequantizes to ``scale * (q - zero)``. Symmetric quantization fixes ``zero = 2**(bits-1)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def max_code(bits: int) -> int:
    """Largest integer code for ``bits``."""
    return 2**bits - 1


def compute_qparams(
    w: torch.Tensor, bits: int, sym: bool, shrink: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero for a ``(rows, cols)`` block of weights.

    The range always includes 0 (so exact zeros stay exact), as in the GPTQ reference.
    Asymmetric zeros are clamped to ``>= 1``: the v1 checkpoint format stores ``zero - 1``
    in ``bits`` bits, so a zero of 0 would wrap around and every v1 reader would decode
    it as ``2**bits``; clamping keeps our checkpoint readable by all of them.

    Args:
        shrink: scale the min/max range by this factor (``< 1`` clips the outermost
            weights; see :func:`search_qparams`).

    Returns:
        ``scale`` and ``zero``, each ``(rows, 1)`` float32.
    """
    maxq = max_code(bits)
    w = w.float()
    xmin = torch.clamp(w.amin(dim=1), max=0.0)  # (rows,)
    xmax = torch.clamp(w.amax(dim=1), min=0.0)
    if shrink != 1.0:
        xmin, xmax = xmin * shrink, xmax * shrink
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


def clip_grid(min_ratio: float, steps: int) -> list[float]:
    """The shrink factors a clip search tries: ``steps + 1`` values from 1.0 down to ``min_ratio``."""
    return [1.0 - (1.0 - min_ratio) * k / steps for k in range(steps + 1)]


def search_qparams(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    ratios: list[float],
    norm: float = 2.4,
    col_weight: torch.Tensor | None = None,
    round_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale/zero minimising the quantization error over shrunken min/max ranges.

    The "mse" quantizer of AutoGPTQ/GPTQModel: for each ratio ``p`` the range
    ``[p*min, p*max]`` is quantized, and each row keeps the ``p`` with the smallest
    ``sum_j col_weight[j] * |w_ij - q(w_ij)|^norm`` (plain sum without ``col_weight``).
    Ties keep the earlier ratio, so ``ratios=[1.0]`` is exactly :func:`compute_qparams`.

    Args:
        w: ``(rows, cols)`` block.
        ratios: shrink factors to try, first one preferred on ties (see :func:`clip_grid`).
        norm: error exponent (AutoGPTQ uses 2.4: between MSE and max error).
        col_weight: ``(cols,)`` non-negative importance of each column, e.g. ``diag(H)``.
        round_scale: applied to each candidate scale before measuring its error (fp16
            rounding in GPTQ, so the chosen scale is the stored one).

    Returns:
        ``scale`` and ``zero``, each ``(rows, 1)`` float32.
    """
    w = w.float()
    best_scale = best_zero = best_err = None
    for p in ratios:
        scale, zero = compute_qparams(w, bits, sym, shrink=p)
        if round_scale is not None:
            scale = round_scale(scale)
        err = fake_quantize(w, scale, zero, bits).sub_(w).abs_().pow_(norm)  # (rows, cols)
        err = err @ col_weight.float() if col_weight is not None else err.sum(dim=1)  # (rows,)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better[:, None], scale, best_scale)
        best_zero = torch.where(better[:, None], zero, best_zero)
    return best_scale, best_zero


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


def default_g_idx(
    in_features: int, group_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Group index of each input channel without act-order: ``i // group_size``, on ``device``."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32, device=device)
    return (torch.arange(in_features, device=device) // group_size).to(torch.int32)


def rtn_quantize_weight(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    clip_ratios: list[float] | None = None,
    clip_norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of a ``(out, in)`` Linear weight, group-wise along ``in``.

    Args:
        clip_ratios: if given, each group's range is chosen by :func:`search_qparams`
            (unweighted error ``|w - q|^clip_norm``) instead of plain min/max.

    Returns:
        ``codes`` (out, in) int32, ``scales`` (n_groups, out) float32,
        ``zeros`` (n_groups, out) int32, ``g_idx`` (in,) int32.
    """
    out_features, in_features = weight.shape
    step = in_features if group_size == -1 else group_size
    codes = torch.empty(out_features, in_features, dtype=torch.int32, device=weight.device)
    scales, zeros = [], []
    for start in range(0, in_features, step):
        block = weight[:, start : start + step].float()  # (out, g)
        if clip_ratios:
            scale, zero = search_qparams(block, bits, sym, clip_ratios, clip_norm)
        else:
            scale, zero = compute_qparams(block, bits, sym)
        codes[:, start : start + step] = quantize_codes(block, scale, zero, bits).to(torch.int32)
        scales.append(scale.squeeze(1))
        zeros.append(zero.squeeze(1))
    g_idx = default_g_idx(in_features, group_size, weight.device)
    return codes, torch.stack(scales), torch.stack(zeros).to(torch.int32), g_idx


def dequantize_weight(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """Float ``(out, in)`` weight from codes ``(out, in)``, per-group scales/zeros ``(G, out)``."""
    g = g_idx.long()
    return scales[g].T.float() * (codes.float() - zeros[g].T.float())
