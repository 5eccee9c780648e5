"""Which serving path a quantized layer takes (used by ``slmcompress inspect``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def backend_for_bits(bits: int | None) -> str:
    """The backend QuantLinear would use here, with the dispatcher's own reason."""
    from slmcompress.kernels.dispatch import explain_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend, reason = explain_backend(SimpleNamespace(bits=bits), device)  # only .bits is read
    return f"{backend} ({reason})"
