"""Trainable views of a GPTQ ``QuantLinear`` for quantization-aware distillation (QAD).

Three parameterisations, all of which convert back to a ``QuantLinear`` with the same
bits, group size, ``g_idx`` and zero points, so the checkpoint stays a standard GPTQ v1
one:

* ``scales`` -- EfficientQAT's E2E-QP (Chen et al. 2024, §3.3): integer codes and zeros
  frozen, the per-group step sizes trained: ``w = s[g_idx] * (q - z)``. Output: the same
  codes, new scales.
* ``ste`` -- QAT with a clipped straight-through estimator: a float latent weight, started
  at the dequantized weight, is fake-quantized with the *fixed* scales/zeros
  ``s * (clamp(round(w / s) + z, 0, 2^b - 1) - z)``; the gradient passes ``round``
  unchanged and stops where ``clamp`` saturates. Output: re-rounded codes, same scales.
* ``lsq`` -- ``ste`` plus trainable scales; through the same expression autograd gives
  exactly LSQ's step-size gradient ``round(w/s) - w/s`` (Esser et al. 2020, eq. 3) without
  its gradient-scale factor (Adam normalises the step size per parameter anyway).

Scales are fp32 master copies, but every forward uses them rounded to fp16 (with a
straight-through gradient), so the model trained is exactly the checkpoint written.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from slmcompress.arch import replace_module
from slmcompress.errors import PassError
from slmcompress.quant.qparams import max_code
from slmcompress.quant.quant_linear import QuantLinear

Mode = Literal["scales", "ste", "lsq"]
MODES: tuple[str, ...] = ("scales", "ste", "lsq")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward, identity gradient (exact: ``round(x) - x`` is representable)."""
    return x + (torch.round(x) - x).detach()


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16 (the checkpoint's scale precision), identity gradient."""
    return x + (x.half().float() - x).detach()


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Clipped-STE fake quantization ``s * (clamp(round(w / s) + z, 0, maxq) - z)``.

    All arguments broadcast to ``w``'s shape ``(out, in)``. Gradient to ``w``: 1 inside the
    grid, 0 where clamped; to ``scale``: LSQ's ``round(w/s) - w/s`` inside, the clamped
    code ``q - z`` outside.
    """
    q = torch.clamp(round_ste(w / scale) + zero, 0, max_code(bits))
    return scale * (q - zero)


def expand_groups(per_group: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """``(G, out)`` per-group values -> ``(out, in)`` per-weight values via ``g_idx`` ``(in,)``."""
    return per_group[g_idx].T


class TrainableQuantLinear(nn.Module):
    """A ``QuantLinear`` opened up for training in one of :data:`MODES` (see module docstring)."""

    def __init__(self, layer: QuantLinear, mode: Mode) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.bits, self.group_size = mode, layer.bits, layer.group_size
        self.in_features, self.out_features = layer.in_features, layer.out_features
        g_idx = layer.g_idx.long()
        zeros = layer.zeros()  # (G, out) int32
        scales = layer.scales.float()  # (G, out), fp16 values held exactly
        self.register_buffer("g_idx", g_idx)
        self.register_buffer("qzeros_int", zeros)  # kept exact for the back-conversion
        bias = layer.bias.float() if layer.bias is not None else None
        self.register_buffer("bias", bias)
        if mode == "scales":
            centred = layer.codes() - expand_groups(zeros, g_idx)  # (out, in) in [-maxq, maxq]
            small = torch.int8 if self.bits < 8 else torch.int16
            self.register_buffer("centred", centred.to(small))
        else:
            self.weight = nn.Parameter(layer.dequantize(torch.float32))  # (out, in) latent
        if mode == "ste":
            self.register_buffer("scales", scales)
        else:
            self.scales = nn.Parameter(scales)
            self.scales.no_weight_decay = True  # decay would shrink every step size towards 0
        if mode != "scales":
            self.weight.no_weight_decay = True  # decay would pull codes towards the zero point

    def effective_scales(self) -> torch.Tensor:
        """The fp16-rounded scales ``(G, out)`` the forward (and the checkpoint) uses."""
        return fp16_ste(self.scales) if isinstance(self.scales, nn.Parameter) else self.scales

    def quantized_weight(self) -> torch.Tensor:
        """The float weight ``(out, in)`` the layer computes with (differentiable)."""
        scales = expand_groups(self.effective_scales(), self.g_idx)  # (out, in)
        if self.mode == "scales":
            return scales * self.centred.float()
        zeros = expand_groups(self.qzeros_int, self.g_idx).float()  # (out, in)
        return fake_quant(self.weight, scales, zeros, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight().to(x.dtype)  # (out, in)
        out = F.linear(x, w)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """Integer codes ``(out, in)`` of the current state (frozen ones in ``scales`` mode)."""
        zeros = expand_groups(self.qzeros_int, self.g_idx)  # (out, in)
        if self.mode == "scales":
            return self.centred.to(torch.int32) + zeros
        scales = expand_groups(self.effective_scales(), self.g_idx)
        q = torch.round(self.weight / scales) + zeros
        return torch.clamp(q, 0, max_code(self.bits)).to(torch.int32)

    @torch.no_grad()
    def to_quant(self, where: str = "quantized") -> QuantLinear:
        """The packed ``QuantLinear`` of the current state (fp16 scales; codes in range)."""
        scales = self.effective_scales().detach()
        if not torch.isfinite(scales).all():
            raise PassError(f"{where}: {self.mode} training left non-finite scales")
        bias = self.bias.detach() if self.bias is not None else None
        return QuantLinear.from_codes(  # packed where the layer trained (its codes' device)
            self.codes(),
            scales.half(),
            self.qzeros_int,
            self.g_idx,
            self.bits,
            self.group_size,
            bias,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, mode={self.mode}"
        )


def to_trainable(model: nn.Module, mode: Mode) -> int:
    """Replace every ``QuantLinear`` in ``model`` by a :class:`TrainableQuantLinear` in place.

    Returns the number of layers converted.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, layer in found:
        replace_module(model, name, TrainableQuantLinear(layer, mode))
    return len(found)


def to_quant(model: nn.Module, where: str = "quantized") -> int:
    """Replace every :class:`TrainableQuantLinear` by its packed ``QuantLinear`` in place."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableQuantLinear)]
    for name, layer in found:
        replace_module(model, name, layer.to_quant(where))
    return len(found)


def quant_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the model's :class:`TrainableQuantLinear` layers."""
    return [
        p
        for m in model.modules()
        if isinstance(m, TrainableQuantLinear)
        for p in m.parameters(recurse=False)
    ]


def cast_float_parts(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` that leaves ``QuantLinear`` buffers alone (scales stay fp16).

    A plain ``.to(bfloat16)`` would round the fp16 scales through bf16 and store them in
    a dtype no GPTQ reader expects.
    """

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    for module in model.modules():
        if not isinstance(module, QuantLinear):
            module._apply(cast, recurse=False)
    return model
