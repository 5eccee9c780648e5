"""Pruning with reconstruction: one layer loop that re-fits what consumes the pruned units.

For each kept decoder layer, on calibration inputs that already went through the pruned and
re-fitted layers before it (sequential, like GPTQ):

1. heads cut: observe ``o_proj``'s input, choose the heads (by output energy, inside each
   KV group, or as the importance plan says), re-fit ``o_proj`` on the kept heads;
2. MLP channels cut: with the re-fitted attention in place, observe ``down_proj``'s input,
   choose the channels, re-fit ``down_proj`` on them;
3. the changed layer's outputs become the next layer's inputs; a layer the plan drops
   passes its inputs through unchanged.

The math is :mod:`slmcompress.prune.reconstruct`. The loop is a
:class:`~slmcompress.layerwise.LayerLoop`, so it runs the same in memory and streamed
(per-layer resume); the input model's own weights are left as they were: the re-fitted
columns are committed per layer and handed to the slicer (:meth:`Refits.weight`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from slmcompress.arch import Family, layer_parts, layers_prefix
from slmcompress.layerwise import LayerLoop, LayerStep, observe_inputs
from slmcompress.prune.planner import KeepPlan, select_heads, top_k
from slmcompress.prune.reconstruct import InputGram, refit_columns, relative_error, unit_energy
from slmcompress.prune.slicing import head_channels

log = logging.getLogger(__name__)

Select = Literal["energy", "importance"]


@dataclass(frozen=True)
class RefitSettings:
    """How consumers are re-fitted (the prune config's ``reconstruct`` section)."""

    damp: float = 0.3
    select: Select = "energy"


@dataclass
class Refits:
    """Re-fitted ``o_proj`` / ``down_proj`` weights, by parameter name, read from the loop.

    Kept columns only are committed (half the bytes of a 25% cut's full weight when
    streamed); :meth:`weight` puts them back at full width, zeros in the removed columns,
    so the slicer's ordinary column rule picks them.
    """

    loop: LayerLoop
    names: dict[str, tuple[int, str]]  # parameter name -> (layer index, committed key)
    shapes: dict[str, tuple[int, int]]
    columns: dict[str, torch.Tensor]

    def weight(self, name: str) -> torch.Tensor | None:
        """The full-width re-fitted weight of ``name``, or None if it was not re-fitted."""
        if name not in self.names:
            return None
        index, key = self.names[name]
        fitted = self.loop.result(index)[0][key]  # (out, K)
        full = torch.zeros(self.shapes[name], dtype=fitted.dtype, device=fitted.device)
        full[:, self.columns[name].to(fitted.device)] = fitted
        return full

    def reader(self, read: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
        """``read`` with the re-fitted weights in place of the parent's."""

        def get(name: str) -> torch.Tensor:
            fitted = self.weight(name)  # in the loop's dtype, that of the weights it replaces
            return read(name) if fitted is None else fitted

        return get


@torch.no_grad()
def reconstruct(loop: LayerLoop, plan: KeepPlan, family: Family, settings: RefitSettings) -> Refits:
    """Run the loop; update ``plan``'s heads/neurons where ``select`` re-chose them.

    Returns the re-fitted weights for the slicer; per-layer errors are in the loop's
    metadata (:func:`summary`).
    """
    model = loop.model
    prefix = layers_prefix(model)
    refits = Refits(loop, {}, {}, {})
    kept = set(plan.layers)
    for step in loop.steps():
        if step.index not in kept:
            step.produce_outputs(lambda _i, hidden: hidden)  # a dropped layer adds nothing
            loop.commit(step.index, {}, {"dropped": True})
            continue
        tensors, meta = _refit_layer(step, model, plan, family, settings)
        loop.commit(step.index, tensors, meta)
    for index in plan.layers:
        meta = loop.result_meta(index)
        base = f"{prefix}.{index}."
        for part, path in (("o", family.o), ("down", family.down)):
            if part not in meta:
                continue
            name = f"{base}{path}.weight"
            refits.names[name] = (index, part)
            refits.shapes[name] = tuple(meta[part]["shape"])
            refits.columns[name] = torch.tensor(meta[part]["columns"], device="cpu")
        if "heads" in meta:
            plan.heads[index] = torch.tensor(meta["heads"], device="cpu")
            plan.kv_heads[index] = torch.tensor(meta["kv_heads"], device="cpu")
        if "neurons" in meta:
            plan.neurons[index] = torch.tensor(meta["neurons"], device="cpu")
    return refits


def _refit_layer(
    step: LayerStep, model: Any, plan: KeepPlan, family: Family, settings: RefitSettings
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Re-fit one layer's consumers in place, take its outputs, then restore its weights."""
    config = model.config
    parts = layer_parts(step.layer, family, config)
    i, sizes = step.index, plan.sizes
    head_dim = sizes.head_dim
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    saved: list[tuple[nn.Linear, torch.Tensor]] = []
    try:
        if plan.heads[i].numel() < config.num_attention_heads:
            gram = _gram_of(step, parts.o)
            heads, kv = plan.heads[i], plan.kv_heads[i]
            if settings.select == "energy":
                heads, kv = select_heads(
                    unit_energy(parts.o.weight, gram, head_dim).cpu(),
                    config.num_key_value_heads,
                    sizes.num_attention_heads,
                    sizes.num_key_value_heads,
                )
            meta["heads"], meta["kv_heads"] = heads.tolist(), kv.tolist()
            cols = head_channels(heads, head_dim)
            tensors["o"], meta["o"] = _apply(parts.o, gram, cols, settings.damp, saved)
        if plan.neurons[i].numel() < parts.down.in_features:
            gram = _gram_of(step, parts.down)  # inputs after the re-fitted attention
            neurons = plan.neurons[i]
            if settings.select == "energy":
                neurons = top_k(unit_energy(parts.down.weight, gram).cpu(), neurons.numel())
            meta["neurons"] = neurons.tolist()
            tensors["down"], meta["down"] = _apply(parts.down, gram, neurons, settings.damp, saved)
        step.outputs()  # the changed layer's outputs: the next layer's inputs
    finally:
        for linear, weight in saved:
            linear.weight.copy_(weight)
    return tensors, meta


def _gram_of(step: LayerStep, linear: nn.Linear) -> torch.Tensor:
    """``E[x x^T]`` of ``linear``'s input over the step's batches (forwards stop there)."""
    gram = InputGram()
    with observe_inputs(linear, gram.add, stop=True):
        step.forward()
    return gram.value()


def _apply(
    linear: nn.Linear,
    gram: torch.Tensor,
    columns: torch.Tensor,
    damp: float,
    saved: list[tuple[nn.Linear, torch.Tensor]],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Re-fit ``linear`` on ``columns``, write it in place (removed columns zero), and
    return the fitted columns and what the report records."""
    weight = linear.weight
    kept = columns.to(weight.device)
    fitted = refit_columns(weight, gram, columns, damp)  # (out, K)
    before = relative_error(weight, weight[:, kept], gram, columns)
    after = relative_error(weight, fitted, gram, columns)
    saved.append((linear, weight.detach().clone()))
    weight.zero_()
    weight[:, kept] = fitted
    info = {
        "shape": list(weight.shape),
        "columns": columns.tolist(),
        "error_deleted": round(before, 5),
        "error_refit": round(after, 5),
    }
    return fitted.contiguous(), info


def summary(loop: LayerLoop, plan: KeepPlan) -> dict[str, Any]:
    """Per-layer relative output errors of the consumers, deleted vs re-fitted (report)."""
    out: dict[str, list[float]] = {}
    for index in plan.layers:
        meta = loop.result_meta(index)
        for part in ("o", "down"):
            if part in meta:
                out.setdefault(f"{part}_error_deleted", []).append(meta[part]["error_deleted"])
                out.setdefault(f"{part}_error_refit", []).append(meta[part]["error_refit"])
    return out
