"""Quantization-aware distillation (QAD): a GPTQ student trained in its own format.

The distill pass calls :meth:`QuantizedStudent.open` before training and
:meth:`QuantizedStudent.close` after it: every ``QuantLinear`` becomes a
:class:`~slmcompress.quant.trainable.TrainableQuantLinear` and back, so the stage's output
is again a GPTQ v1 checkpoint with the input's bits, group size, ``g_idx`` and zeros.
The parameterisations and their papers are in :mod:`slmcompress.quant.trainable`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from slmcompress.errors import PassError
from slmcompress.memory_model import format_bytes
from slmcompress.quant.packing import unpack_qweight
from slmcompress.quant.quant_linear import QuantLinear
from slmcompress.quant.trainable import (
    Mode,
    TrainableQuantLinear,
    cast_float_parts,
    quant_parameters,
    to_quant,
    to_trainable,
)

QuantizedOption = Literal["auto", "scales", "ste", "lsq"]
TrainFloat = Literal["none", "norms", "all"]
#: what ``quantized: auto`` trains (the reasons are in docs/qad.md)
DEFAULT_MODE: Mode = "scales"
#: bytes per trainable parameter beyond the weights: fp32 gradient + two AdamW moments
OPTIMIZER_BYTES = 12


def student_format(model: nn.Module) -> str | None:
    """``"gptq"`` for QuantLinear students, another format's name, or None for a float model."""
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        return "gptq"
    names = {type(m).__name__ for m in model.modules()}
    if names & {"Linear4bit", "Linear8bitLt", "Params4bit"}:
        return "bitsandbytes (" + ", ".join(sorted(names & {"Linear4bit", "Linear8bitLt"})) + ")"
    qcfg = getattr(model.config, "quantization_config", None)
    if qcfg is None:
        return None
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else qcfg.quant_method
    return str(getattr(method, "value", method))


def resolve_mode(option: QuantizedOption, model: nn.Module, where: str) -> Mode | None:
    """The parameterisation for this student, None for a float one; refuse what cannot train."""
    fmt = student_format(model)
    if fmt is None:
        if option != "auto":
            raise PassError(
                f"{where}.quantized: {option} needs a quantized student (a GPTQ/RTN checkpoint "
                "or a quantize stage before this one); the student is a float model"
            )
        return None
    if fmt != "gptq":
        raise PassError(
            f"{where}.quantized: the student is quantized as {fmt}, which quantized "
            "distillation cannot train; quantize with method gptq or rtn (GPTQ v1 format)"
        )
    return DEFAULT_MODE if option == "auto" else option


@dataclass
class QuantizedStudent:
    """The QAD state of one run: the mode and the input's packed tensors (for the report)."""

    mode: Mode
    train_float: TrainFloat
    where: str
    before: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    trainable_params: int = 0
    layers: int = 0

    @classmethod
    def open(
        cls, model: nn.Module, mode: Mode, train_float: TrainFloat, where: str
    ) -> QuantizedStudent:
        """Swap in trainable layers (in place) and set which parameters train."""
        state = cls(mode, train_float, where)
        state.before = {
            name: (m.qweight, m.scales)
            for name, m in model.named_modules()
            if isinstance(m, QuantLinear)
        }
        bits = {(m.bits, m.group_size) for m in model.modules() if isinstance(m, QuantLinear)}
        if len(bits) > 1:
            raise PassError(f"{where}.quantized: layers differ in bits/group_size {sorted(bits)}")
        state.layers = to_trainable(model, mode)
        model.float()  # fp32 masters for the float parts; quant buffers are integer or fp32
        state.trainable_params = state._set_trainable(model)
        return state

    def _set_trainable(self, model: nn.Module) -> int:
        """Quantization parameters always; float ones as ``train_float`` says. Returns the count."""
        model.requires_grad_(False)
        chosen = quant_parameters(model)
        if self.train_float != "none":
            inside = {id(p) for p in chosen}
            for module in model.modules():
                if isinstance(module, TrainableQuantLinear):
                    continue
                for p in module.parameters(recurse=False):
                    if id(p) not in inside and (self.train_float == "all" or p.dim() == 1):
                        chosen.append(p)
        for p in chosen:
            p.requires_grad_(True)
        return sum(p.numel() for p in {id(p): p for p in chosen}.values())

    def check_memory(self, model: nn.Module, budget_bytes: int) -> None:
        """Student tensors + gradient and AdamW state of the trainable ones must fit the budget."""

        tensors = [*model.parameters(), *model.buffers()]
        held = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
        need = held + self.trainable_params * OPTIMIZER_BYTES
        if need > budget_bytes:
            hint = "" if self.mode == "scales" else "; quantized: scales trains far fewer"
            raise PassError(
                f"{self.where}.quantized: {self.mode} training needs ~{format_bytes(need)} for "
                f"the student and its optimizer state, over the memory budget "
                f"{format_bytes(budget_bytes)}{hint}"
            )

    def close(self, model: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
        """Pack the trained layers back into QuantLinears; the float parts go back to ``dtype``."""
        to_quant(model, f"{self.where}.quantized")
        cast_float_parts(model, dtype)
        return model.eval().requires_grad_(False), self.summary(model)

    @torch.no_grad()
    def summary(self, model: nn.Module) -> dict[str, Any]:
        """What changed: fraction of codes moved, mean relative scale change."""
        changed = total = 0
        rel, groups = 0.0, 0
        for name, (qweight, scales) in self.before.items():
            layer = model.get_submodule(name)
            if self.mode != "scales":
                old_codes = unpack_qweight(qweight, layer.bits, layer.in_features)  # (out, in)
                changed += int((layer.codes() != old_codes).sum())
            total += layer.in_features * layer.out_features
            old = scales.float()
            rel += float(((layer.scales.float() - old).abs() / old.abs().clamp_min(1e-8)).sum())
            groups += old.numel()
        return {
            "mode": self.mode,
            "train_float": self.train_float,
            "trainable_params": self.trainable_params,
            "quantized_layers": self.layers,
            "codes_changed": round(changed / max(total, 1), 6),
            "mean_rel_scale_change": round(rel / max(groups, 1), 6),
        }
