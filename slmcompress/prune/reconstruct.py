"""Closed-form repair of what a structured prune cuts: refit the projection that consumes it.

Removing MLP channels (or attention heads) deletes columns of the linear that reads them,
``down_proj`` (or ``o_proj``). The kept columns can then be re-fitted so the layer's output
on calibration data stays as close as possible to its parent's, the way GPTQ repairs
quantization error (Frantar et al. 2022) and SlimGPT (Ling et al. 2024) or ZipLM (Kurtic et
al. 2023) repair structured pruning::

    min_W'  E_t || W' x_t[K] - W x_t ||^2  +  damp * || (W' - W[:, K]) D^1/2 ||^2

``x`` is the linear's input (all channels, computed by the parent's weights), ``K`` the kept
channels and ``D = diag(E[x_K x_K^T])``. The damping term pulls towards the parent's own
weights, per channel, not towards zero by the mean diagonal as GPTQ's does: it interpolates
between deleting (``damp -> inf``) and the plain refit (``damp -> 0``), whatever a channel's
scale. It is the same as shrinking the Gram matrix towards its diagonal by
``damp / (1 + damp)`` (Ledoit-Wolf style), which is what a Gram matrix estimated from few
tokens needs: on SmolLM2's quickstart cut a plain refit from 4k tokens made held-out
perplexity worse than deleting (98.8 vs 80.6), the damped one better (69.2); see
``benchmarks/results/prune_reconstruct.md``.

Everything here is a pure tensor function; the layer loop lives in
:mod:`slmcompress.prune.reconstruction`.
"""

from __future__ import annotations

import torch

from slmcompress.errors import PassError


class InputGram:
    """Accumulates ``E[x x^T]`` of one linear's input over calibration tokens.

    ``skip_first`` positions of every sequence are left out: the first token of a window
    (the attention sink) has activations unlike any other token's, and a few such tokens
    would otherwise dominate the fit.
    """

    def __init__(self, skip_first: int = 1) -> None:
        self.skip_first = skip_first
        self.sum: torch.Tensor | None = None  # (C, C) fp32, on the inputs' device
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` (B, T, C)."""
        x = x.detach()[:, self.skip_first :].float().reshape(-1, x.shape[-1])  # (N, C)
        update = x.T @ x  # (C, C)
        self.sum = update if self.sum is None else self.sum + update
        self.count += x.shape[0]

    def value(self) -> torch.Tensor:
        """The second moment ``(C, C)``, fp32."""
        if self.sum is None or self.count == 0:
            raise PassError("reconstruct: no calibration tokens reached the layer")
        return self.sum / self.count


def unit_energy(weight: torch.Tensor, gram: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """Output energy each unit adds, ``E||W[:, u] x_u||^2``: (units,), higher = keep.

    Args:
        weight: the consuming linear's weight (out, C).
        gram: ``E[x x^T]`` of its input (C, C).
        unit: input channels per unit (1 for MLP neurons, ``head_dim`` for heads).
    """
    w = weight.detach().float()
    if unit == 1:
        return gram.diagonal() * w.pow(2).sum(0)  # (C,)
    n = w.shape[1] // unit
    wu = w.view(w.shape[0], n, unit)  # (out, units, unit)
    blocks = torch.stack(
        [gram[i * unit : (i + 1) * unit, i * unit : (i + 1) * unit] for i in range(n)]
    )
    # trace(W_u G_uu W_u^T) for each unit u
    return torch.einsum("oud,ude,oue->u", wu, blocks, wu)


def refit_columns(
    weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float
) -> torch.Tensor:
    """Least-squares weights on the kept input channels, damped towards the parent's.

    Args:
        weight: the parent linear's weight (out, C).
        gram: ``E[x x^T]`` of its input (C, C), from :class:`InputGram`.
        keep: kept input channels (K,), ascending.
        damp: > 0; relative to each kept channel's own second moment.

    Returns:
        (out, K) weights in the dtype of ``weight``.
    """
    if damp <= 0:
        raise PassError("reconstruct.damp: must be > 0")
    keep = keep.to(gram.device)
    w = weight.detach().to(device=gram.device, dtype=torch.float64)  # (out, C)
    g = gram.double()
    g_kk = g.index_select(0, keep).index_select(1, keep)  # (K, K)
    diag = g_kk.diagonal()  # (K,) a dead channel's is 0: give it a floor, never a 0 pivot
    diag = torch.maximum(diag, 1e-12 * diag.max().clamp_min(1e-30))
    a = g_kk + torch.diag(damp * diag)  # (K, K)
    rhs = w @ g.index_select(1, keep) + w.index_select(1, keep) * (damp * diag)  # (out, K)
    fitted = torch.linalg.solve(a, rhs.T).T  # a is symmetric: (a^-1 rhs^T)^T = rhs a^-1
    return fitted.to(device=weight.device, dtype=weight.dtype)


def relative_error(
    weight: torch.Tensor, new_columns: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor
) -> float:
    """``E||W' x_K - W x||^2 / E||W x||^2`` under ``gram`` (the fit's own objective)."""
    keep = keep.to(gram.device)
    w = weight.detach().to(device=gram.device, dtype=torch.float64)
    delta = w.clone()
    delta[:, keep] -= new_columns.to(device=gram.device, dtype=torch.float64)
    g = gram.double()
    return float(torch.einsum("oc,cd,od->", delta, g, delta) / torch.einsum("oc,cd,od->", w, g, w))
