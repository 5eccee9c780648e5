"""GPTQ math (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", Algorithm 1), as pure tensor functions.

Everything here is model-agnostic: :class:`HessianAccumulator` turns a stream of layer
inputs into ``H = 2/n * sum(x x^T)``, and :func:`gptq_quantize` turns a weight ``(out, in)``
and ``H`` into integer codes and group scales/zeros in the GPTQ v1 checkpoint convention
(``w = scale * (q - zero)``, see :mod:`slmcompress.quant.qparams`).

Rows of ``W`` are quantized independently given ``H``, so linears that share an input
(q/k/v, gate/up) can be solved as one stacked matrix with identical results.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from slmcompress.errors import PassError
from slmcompress.quant.gptq_format import QuantizedWeight
from slmcompress.quant.qparams import (
    compute_qparams,
    dequantize_weight,
    fake_quantize,
    max_code,
    search_qparams,
)

log = logging.getLogger(__name__)

#: smallest positive normal float16: scales are stored as fp16 in the checkpoint
_FP16_TINY = 2.0**-14
#: on CPU, run the per-column loop single-threaded when a block has at most this many weights
_SERIAL_MAX_ELEMENTS = 2**21
#: on CPU, solve weights up to this size single-threaded
_SERIAL_MAX_WEIGHTS = 2**24
#: on CPU, invert Hessians up to this size single-threaded
_SERIAL_MAX_INVERSE = 4096
#: non-PD retries multiply the damping by this, at most this many times
_DAMP_GROWTH, _DAMP_RETRIES = 10.0, 6


class HessianAccumulator:
    """Running ``H = 2/n * X X^T`` over calibration tokens (paper §4, "H = 2XX^T").

    A running mean (not a sum) keeps the float32 values O(activation^2) however many
    tokens stream through, so precision does not degrade with the calibration size.
    Only the upper block triangle is accumulated (H is symmetric): with ``k`` column
    blocks that is ``(k+1)/2k`` of the full product's work, the cost that dominates
    calibration on CPU.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self._upper = torch.zeros(columns, columns, dtype=torch.float32, device=device)  # (in, in)
        self._block = -(-columns // max(1, min(4, columns // 256)))
        self.n_tokens = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Fold one batch of layer inputs ``(..., in)`` into H."""
        x = x.reshape(-1, x.shape[-1]).to(self._upper.device, torch.float32)  # (N, in)
        n = x.shape[0]
        if n == 0:
            return
        self._upper.mul_(self.n_tokens / (self.n_tokens + n))
        self.n_tokens += n
        x = x * math.sqrt(2.0 / self.n_tokens)
        for i in range(0, x.shape[1], self._block):
            rows = slice(i, i + self._block)
            self._upper[rows, i:].addmm_(x[:, rows].T, x[:, i:])  # H[rows, i:] += (2/n) x_r^T x

    @property
    def H(self) -> torch.Tensor:  # noqa: N802 - the paper's name
        """The symmetric Hessian ``(in, in)``."""
        return torch.triu(self._upper) + torch.triu(self._upper, 1).T


@dataclass
class GPTQResult:
    """Output of :func:`gptq_quantize` (all on the device of ``W``)."""

    codes: torch.Tensor  # (out, in) int32 in [0, 2**bits)
    scales: torch.Tensor  # (G, out) float32, exactly representable in fp16
    zeros: torch.Tensor  # (G, out) int32
    g_idx: torch.Tensor  # (in,) int32, group of each input channel (non-monotone with act_order)
    weight: (
        torch.Tensor
    )  # (out, in) float32 fake-quantized weight: scales[g_idx] * (codes - zeros[g_idx])
    stats: dict = field(default_factory=dict)

    def quantized(self, bits: int, group_size: int) -> QuantizedWeight:
        """The codes/scales/zeros/g_idx as the value :func:`install_quant_linear` packs."""
        return QuantizedWeight(self.codes, self.scales, self.zeros, self.g_idx, bits, group_size)


@contextmanager
def _serial_cpu(enabled: bool) -> Iterator[None]:
    """Run torch CPU ops single-threaded inside (results are identical: elementwise ops)."""
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fp16_exact(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to fp16 now, so the solver quantizes with exactly the checkpoint's scales."""
    return scale.clamp(min=_FP16_TINY).half().float()


@dataclass(frozen=True)
class ClipSearch:
    """Clip-ratio search for group scales/zeros (see :func:`~slmcompress.quant.qparams.search_qparams`)."""

    ratios: tuple[float, ...]
    norm: float = 2.4
    weighted: bool = True  # weight each column's error by diag(H)


def _group_qparams(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    clip: ClipSearch | None = None,
    h_diag: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero ``(out, 1)`` of a group of columns ``(out, g)``, scale fp16-exact.

    With ``clip``, the range is searched; ``h_diag`` ``(g,)`` weights the columns' errors.
    """
    if clip is None:
        scale, zero = compute_qparams(w, bits, sym)
        return _fp16_exact(scale), zero
    weight = h_diag if clip.weighted else None
    return search_qparams(w, bits, sym, list(clip.ratios), clip.norm, weight, _fp16_exact)


def prepare_dead_inputs(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Inputs never active in calibration (H[i,i] == 0): set H[i,i] = 1 and W[:, i] = 0.

    Their weight cannot influence the calibration outputs, and a zero diagonal would make
    H singular. Modifies ``W`` and ``H`` in place; returns the dead mask ``(in,)``.
    """
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return dead


def inverse_hessian_factor(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + λI)^-1`` with λ = damp · mean(diag H) (paper §4, "Cholesky reformulation").

    A non-positive-definite H (too few tokens, duplicated channels) is retried with 10x
    more damping each time. Returns ``(U, damp used, retries)``.
    """
    mean_diag = torch.mean(torch.diag(H)).item()
    damp = damp_percent
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for retry in range(_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            # LAPACK's threaded inverse is barrier-bound (3.6 s vs 0.04 s serial at 1536 on
            # a busy 2-core CPU); serial is also fine on a quiet machine at these sizes
            with _serial_cpu(H.device.type == "cpu" and H.shape[0] <= _SERIAL_MAX_INVERSE):
                Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp, retry
        damp = damp * _DAMP_GROWTH if damp > 0 else 1e-4
    raise PassError(
        f"Hessian is not positive definite even with damp_percent={damp / _DAMP_GROWTH:g}"
    )


def effective_block_size(block_size: int, group_size: int) -> int:
    """Block size aligned to groups, so every group starts at a block start or lies inside one.

    Then a group's scale/zero are computed from fully up-to-date weights (the reference
    implementation reads lazily-stale columns when a group starts mid-block).
    """
    if group_size == -1:
        return block_size
    if group_size <= block_size:
        return (block_size // group_size) * group_size
    return max(d for d in range(1, block_size + 1) if group_size % d == 0)


def static_group_params(
    W: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    clip: ClipSearch | None = None,
    h_diag: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales/zeros ``(G, out)`` from the unmodified weight's natural groups (``static_groups``)."""
    step = W.shape[1] if group_size == -1 else group_size
    params = [
        _group_qparams(
            W[:, s : s + step], bits, sym, clip, None if h_diag is None else h_diag[s : s + step]
        )
        for s in range(0, W.shape[1], step)
    ]
    return torch.stack([p[0].squeeze(1) for p in params]), torch.stack(
        [p[1].squeeze(1) for p in params]
    )


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    block_size: int = 128,
    damp_percent: float = 0.01,
    static_groups: bool = False,
    error: bool = True,
    clip: ClipSearch | None = None,
) -> GPTQResult:
    """Quantize a Linear weight ``W (out, in)`` given its input Hessian ``H (in, in)``.

    The paper's Algorithm 1: columns are quantized one at a time in (optionally
    act-ordered) sequence; each column's rounding error, scaled by the inverse-Hessian
    Cholesky row, is spread over the not-yet-quantized columns (OBS update), within a
    block immediately and to later blocks in one lazy batched update.

    Args:
        W: weight ``(out, in)``; not modified.
        H: ``2/n X X^T`` ``(in, in)``; not modified.
        bits: 2, 3, 4 or 8.
        group_size: input channels per scale/zero group, -1 for one group (per-channel).
            A ragged last group (576 channels at 128 -> 5 groups) is fine.
        sym: symmetric codes (zero fixed at ``2**(bits-1)``).
        act_order: process columns by descending ``diag(H)`` ("desc_act"); groups then
            follow processing order, recorded in ``g_idx``.
        block_size: columns per lazy-batch block.
        damp_percent: λ as a fraction of ``mean(diag(H))``; increased on non-PD H.
        static_groups: compute all group params from the original ``W`` up front (groups
            stay contiguous in the original order even with act_order).
        error: compute ``stats["rel_output_err"]``/``["output_mse"]`` (two extra matmuls).
        clip: search each group's clip ratio instead of plain min/max (the "mse" option of
            AutoGPTQ/GPTQModel), its error weighted by ``diag(H)`` if ``clip.weighted``.
    """
    out_features, columns = W.shape
    # small solves on CPU run single-threaded throughout: their ops are too small to gain
    # from threads, and on a busy CPU every thread barrier can wait a whole time slice
    # (measured on a loaded 2-core machine: 35 s vs 0.4 s per SmolLM2 layer); results are
    # identical either way
    serial = W.device.type == "cpu" and W.numel() <= _SERIAL_MAX_WEIGHTS and columns <= 4096
    with _serial_cpu(serial):
        return _gptq_quantize(
            W,
            H,
            bits,
            group_size,
            sym,
            act_order,
            block_size,
            damp_percent,
            static_groups,
            error,
            clip,
        )


def _gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool,
    block_size: int,
    damp_percent: float,
    static_groups: bool,
    error: bool,
    clip: ClipSearch | None,
) -> GPTQResult:
    """:func:`gptq_quantize` without the thread setting."""
    out_features, columns = W.shape
    maxq = max_code(bits)
    W_orig, H_orig = W.detach().float(), H.detach().float()
    W, H = W_orig.clone(), H_orig.clone()
    dead = prepare_dead_inputs(W, H)
    gs = columns if group_size == -1 else group_size
    static = (
        static_group_params(W, bits, group_size, sym, clip, torch.diag(H))
        if static_groups
        else None
    )

    ar = torch.arange(columns, device=W.device)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else ar
    Wt, H = (
        W[:, perm].T.contiguous(),
        H[perm][:, perm],
    )  # (in, out): a column of W is a contiguous row
    # group of each column in processing order: contiguous in processing order, or for
    # static groups contiguous in the original order
    group_of = (perm if static is not None else ar) // gs  # (in,)
    h_diag = torch.diag(H).clone()  # (in,) processing order, for a weighted clip search
    Hinv, damp, retries = inverse_hessian_factor(H, damp_percent)  # (in, in) upper

    codes = torch.zeros_like(Wt)  # (in, out), processing order
    losses = torch.zeros((), device=W.device)
    scales, zeros = [], []
    bs = effective_block_size(block_size, group_size)
    # the column loop's ops are tiny even when the matrix is not (see gptq_quantize)
    serial = W.device.type == "cpu" and bs * out_features <= _SERIAL_MAX_ELEMENTS
    scale = zero = None
    for i1 in range(0, columns, bs):
        i2 = min(i1 + bs, columns)
        W1 = Wt[i1:i2].clone()  # (b, out) block being quantized
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        diag = Hinv1.diagonal().tolist()
        with _serial_cpu(serial):
            for i in range(i2 - i1):
                col = i1 + i
                if static is not None:
                    g = int(group_of[col])
                    scale, zero = static[0][g], static[1][g]
                elif col % gs == 0:
                    # Params from the current (error-compensated) weights of the group; by block
                    # alignment the group lies inside W1 or starts at i == 0 (so Wt[i2:] is current).
                    inside = W1[i : i + gs]
                    group_rows = (  # (g, out)
                        inside
                        if inside.shape[0] == gs
                        else torch.cat([inside, Wt[i2 : i2 + gs - inside.shape[0]]])
                    )
                    params = _group_qparams(group_rows.T, bits, sym, clip, h_diag[col : col + gs])
                    scale, zero = (t.squeeze(1) for t in params)
                    scales.append(scale)
                    zeros.append(zero)
                w = W1[i]  # (out,)
                q = (w / scale).round_().add_(zero).clamp_(0, maxq)
                err = (w - scale * (q - zero)).div_(diag[i])  # (out,)
                codes[col] = q
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # OBS update of the rest of the block
                Err1[i] = err
        losses += Err1.pow(2).sum() / 2
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)  # lazy batch update of later columns

    scales_t, zeros_t = (
        static if static is not None else (torch.stack(scales), torch.stack(zeros))
    )  # (G, out)
    inv = torch.argsort(perm)
    codes = codes[inv].T.contiguous().to(torch.int32)  # (out, in), original order
    g_idx = group_of[inv].to(torch.int32)
    zeros_t = zeros_t.to(torch.int32)
    Q = dequantize_weight(
        codes, scales_t, zeros_t, g_idx
    )  # bit-identical to the checkpoint's dequant
    stats = error_stats(W_orig, Q, H_orig) if error else {}
    if error:
        stats["rtn_rel_output_err"] = rtn_rel_output_err(
            W_orig, H_orig, bits, group_size, sym, stats["output_energy"]
        )
    stats.update(
        obs_loss=float(losses), damp_percent=damp, damp_retries=retries, dead_inputs=int(dead.sum())
    )
    return GPTQResult(codes, scales_t, zeros_t, g_idx, Q, stats)


def output_energy(W: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(W H W^T)`` = ``||W X||^2`` on the calibration inputs (the relative errors' denominator)."""
    return ((W @ H) * W).sum().item()


def error_stats(
    W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, ref: float | None = None
) -> dict[str, float]:
    """Layer-output reconstruction error on the calibration inputs, from H alone.

    ``||(W - Q) X||^2 / ||W X||^2 = tr(ΔW H ΔW^T) / tr(W H W^T)`` (relative output MSE)
    and ``tr(ΔW H ΔW^T) / (2 out)`` (the mean squared output error per output channel).
    ``ref``: :func:`output_energy` when the caller already has it.
    """
    delta = W - Q  # (out, in)
    err = ((delta @ H) * delta).sum().item()
    ref = output_energy(W, H) if ref is None else ref
    return {
        "rel_output_err": err / ref if ref > 0 else 0.0,
        "output_mse": err / (2 * W.shape[0]),
        "output_energy": ref,
    }


def rtn_rel_output_err(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    ref: float | None = None,
) -> float:
    """:func:`error_stats`' relative output error of plain min/max RTN (contiguous groups).

    GPTQ's baseline on the same ``H``: the ratio shows how much of the layer objective
    GPTQ removed.
    """
    step = W.shape[1] if group_size == -1 else group_size
    Q = torch.empty_like(W)
    for start in range(0, W.shape[1], step):
        block = W[:, start : start + step]  # (out, g)
        scale, zero = compute_qparams(block, bits, sym)
        Q[:, start : start + step] = fake_quantize(block, _fp16_exact(scale), zero, bits)
    return error_stats(W, Q, H, ref)["rel_output_err"]


def error_vs_rtn(
    errors: dict[str, dict[str, float]], rtn: dict[str, dict[str, float]]
) -> dict[str, float | int]:
    """GPTQ's layer-output error as a fraction of plain RTN's, on the same calibration Hessians.

    ``errors``/``rtn``: layer -> linear -> relative output error. The layer objective GPTQ
    minimises; the report shows how much of it was removed (linears without an RTN figure,
    e.g. from resume state of an older version, are left out).
    """
    ratios = sorted(
        e / rtn[layer][name]
        for layer, per in errors.items()
        for name, e in per.items()
        if rtn.get(layer, {}).get(name)
    )
    if not ratios:
        return {"linears": 0}
    return {
        "linears": len(ratios),
        "median_ratio": round(ratios[len(ratios) // 2], 4),
        "mean_ratio": round(sum(ratios) / len(ratios), 4),
        "max_ratio": round(ratios[-1], 4),
    }
