"""Which serving path a quantized layer takes (used by ``slmcompress inspect``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def backend_for_layer(bits: int | None, out_features: int, g_idx: torch.Tensor) -> str:
    """The backend a QuantLinear of this shape would use here, with the dispatcher's reason."""
    from slmcompress.kernels.dispatch import explain_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layer = SimpleNamespace(bits=bits, out_features=out_features, g_idx=g_idx)  # all it reads
    backend, reason = explain_backend(layer, device)
    return f"{backend} ({reason})"
