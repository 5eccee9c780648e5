"""``QuantLinear``: a Linear whose buffers are exactly the GPTQ v1 packed tensors.

The checkpoint stays independent of the kernel: quantizing produces packed tensors,
loading swaps this module in, and ``forward`` runs the matmul that
:func:`slmcompress.kernels.dispatch.set_backends` installed for the backend it chose
(this module never imports the kernels):
``triton-int3/4`` (CUDA), ``cpu-int4`` (torch's int4 CPU kernel), ``torch-cached``
(dequantized once, kept: CPU layers no kernel takes) or ``torch`` (dequantize + matmul per
call: the reference, and what every layer uses until a backend is set).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from slmcompress.quant.packing import (
    pack_multiple,
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
    unpack_rows,
)
from slmcompress.quant.qparams import n_groups

if TYPE_CHECKING:
    from slmcompress.quant.gptq_format import QuantizedWeight

log = logging.getLogger(__name__)


class QuantLinear(nn.Module):
    """Linear layer stored as GPTQ ``qweight``/``qzeros``/``scales``/``g_idx`` buffers."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        """``device=None`` follows the default device (a ``torch.device(...)`` block), as
        ``nn.Linear`` does."""
        super().__init__()
        for dim, name in ((in_features, "in_features"), (out_features, "out_features")):
            if dim % pack_multiple(bits):
                raise ValueError(
                    f"{name}={dim} is not a multiple of {pack_multiple(bits)} for {bits}-bit packing"
                )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = n_groups(in_features, group_size)
        int32, fp16 = torch.int32, torch.float16
        qweight = torch.zeros(in_features * bits // 32, out_features, dtype=int32, device=device)
        qzeros = torch.zeros(groups, out_features * bits // 32, dtype=int32, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=fp16, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=int32, device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=fp16, device=device) if bias else None
        )
        self.backend = "torch"
        #: ``(x, layer) -> x @ W^T`` of the chosen backend, installed by ``set_backends``
        self.matmul: Callable[[torch.Tensor, QuantLinear], torch.Tensor] | None = None
        self._weight_cache: torch.Tensor | None = None
        self.cache_weight = False  # see cached_dequantization()

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Build from integer codes ``(out, in)``, scales/zeros ``(G, out)`` and ``g_idx`` ``(in,)``.

        The layer lives on ``codes``' device (packed there, no round trip through the host).
        """
        out_features, in_features = codes.shape
        layer = cls(
            in_features, out_features, bits, group_size, bias=bias is not None, device=codes.device
        )
        layer.qweight.copy_(pack_qweight(codes, bits))
        layer.qzeros.copy_(pack_qzeros(zeros, bits))
        layer.scales.copy_(scales.to(torch.float16))
        layer.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            layer.bias.copy_(bias.to(torch.float16))
        return layer

    @classmethod
    def from_quantized(
        cls, weight: QuantizedWeight, bias: torch.Tensor | None = None
    ) -> QuantLinear:
        """Build from a :class:`~slmcompress.quant.gptq_format.QuantizedWeight`."""
        w = weight
        return cls.from_codes(w.codes, w.scales, w.zeros, w.g_idx, w.bits, w.group_size, bias)

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes ``(out, in)``."""
        return unpack_qweight(self.qweight, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """Unpacked zero points ``(G, out)``."""
        return unpack_qzeros(self.qzeros, self.bits, self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight ``(out, in)``: ``scales[g_idx[i], o] * (q[i, o] - zeros[g_idx[i], o])``."""
        g = self.g_idx.long()
        q = unpack_rows(self.qweight, self.bits, self.in_features)  # (in, out), no transpose
        z = unpack_qzeros(self.qzeros, self.bits, self.out_features)  # (G, out)
        w = self.scales.float()[g] * (q.float() - z.float()[g])  # (in, out)
        return w.T.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul is None or self._reference_path(x):
            out = F.linear(x, self._float_weight(x.dtype))
        else:
            out = self.matmul(x, self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def _reference_path(self, x: torch.Tensor) -> bool:
        """Plain torch: no backend set, an evaluation cache is on, or autograd needs the graph."""
        if self.backend in ("torch", "torch-cached") or self.cache_weight:
            return True
        return torch.is_grad_enabled() and (x.requires_grad or self.scales.requires_grad)

    def _float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight: computed per call, or kept (``cache_weight``, ``torch-cached``)."""
        if not (self.cache_weight or self.backend == "torch-cached"):
            return self.dequantize(dtype)
        if self._weight_cache is None or self._weight_cache.dtype != dtype:
            self._weight_cache = self.dequantize(dtype)
        return self._weight_cache

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, backend={self.backend}"
        )


@contextlib.contextmanager
def cached_dequantization(model: nn.Module) -> Iterator[int]:
    """Keep each torch-path ``QuantLinear``'s dequantized weight for the duration of the block.

    The torch path dequantizes on every call, which dominates small-batch CPU inference
    (~4 ms per SmolLM2 linear vs 0.3 ms for its matmul at 8 tokens). Accuracy evaluation
    (perplexity, tasks) runs thousands of forwards over the same weights: caching gives
    bit-identical outputs at float speed, for float memory while the block runs. Speed
    measurements stay outside this block so they time the real serving path.
    Yields the number of layers that cache.
    """
    layers = [  # on a GPU the packed weights are the point: never hold float copies there
        m for m in model.modules() if isinstance(m, QuantLinear) and m.qweight.device.type == "cpu"
    ]
    for layer in layers:
        layer.cache_weight = True
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.cache_weight, layer._weight_cache = False, None
