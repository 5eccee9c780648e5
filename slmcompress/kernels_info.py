"""Which serving path a quantized layer takes (used by ``slmcompress inspect``)."""

from __future__ import annotations

import importlib.util

import torch


def backend_for_bits(bits: int | None) -> str:
    """The backend QuantLinear uses here: a Triton kernel on CUDA for 4/3-bit, else plain torch."""
    triton_ok = importlib.util.find_spec("triton") is not None and torch.cuda.is_available()
    if bits in (3, 4) and triton_ok:
        return f"triton-int{bits}"
    reason = "no CUDA" if bits in (3, 4) else f"no {bits}-bit kernel"
    return f"torch ({reason})"
