"""A GPTQ v1 weight as one value: codes, scales, zeros and ``g_idx`` before packing.

What a GPTQ checkpoint must say and hold on disk is checked where it is read,
:mod:`slmcompress.io.gptq_checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """One linear's quantized weight before packing (GPTQ v1 semantics; the layout is in the
    README, "Output layout and formats").

    ``w[o, i] = scales[g_idx[i], o] * (codes[o, i] - zeros[g_idx[i], o])``.
    """

    codes: torch.Tensor  # (out, in) int32 in [0, 2**bits)
    scales: torch.Tensor  # (G, out) float
    zeros: torch.Tensor  # (G, out) int32
    g_idx: torch.Tensor  # (in,) int32 group of each input channel
    bits: int
    group_size: int

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight with every tensor on ``device``."""
        tensors = (self.codes, self.scales, self.zeros, self.g_idx)
        return QuantizedWeight(*(t.to(device) for t in tensors), self.bits, self.group_size)

    def cpu(self) -> QuantizedWeight:
        return self.to("cpu")
