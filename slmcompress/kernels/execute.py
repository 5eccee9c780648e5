"""Run one :class:`~slmcompress.kernels.routes.Choice` on a serving weight.

Shared by the dispatcher (serving), the on-miss tuner and the tuning sweep, so what is timed
is exactly what serves. Triton is imported only when a Triton route runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slmcompress.kernels import tinygemm
from slmcompress.kernels.repack import ServingWeight
from slmcompress.kernels.routes import Choice

TinyGetter = Callable[[int], tinygemm.TinyGemmWeight]


def execute(
    choice: Choice, x2d: torch.Tensor, w: ServingWeight, tiny: TinyGetter | None = None
) -> torch.Tensor:
    """``x2d (M, K) @ W -> (M, N)`` through ``choice``'s route (bias not added).

    ``tiny``: returns the layer's tinygemm copy for an ``inner_k_tiles`` (converted once by
    the caller); needed only for the tinygemm route.
    """
    p = choice.p
    if choice.route == "tinygemm":
        tw = tiny(p["inner_k_tiles"]) if tiny else tinygemm.convert(w, p["inner_k_tiles"])
        return tinygemm.matmul(x2d, tw)
    from slmcompress.kernels import triton_qmm

    if choice.route == "gemv":
        return triton_qmm.gemv(x2d, w, p)
    if choice.route == "mm":
        return triton_qmm.mm(x2d, w, p)
    if choice.route == "dequant":
        return triton_qmm.dequant_mm(x2d, w, p)
    raise ValueError(f"unknown route {choice.route!r}")
