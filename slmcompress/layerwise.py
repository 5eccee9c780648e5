"""Layer-by-layer execution, written once for GPTQ, importance and depth scoring.

"capture the inputs of decoder layer 0 -> for each layer: move it to the compute device,
let the pass observe/modify it, produce the inputs of the next layer -> move it back".
Peak memory follows one decoder layer plus the calibration activations, never the model,
and nothing needs torch.fx tracing: only forward hooks on ordinary modules.

Usage::

    for step in layerwise(model, tokens, device):
        handles = [...register hooks on step.layer...]
        step.forward()          # run all calibration batches through the layer
        ...modify step.layer... # e.g. quantize its linears
    # the engine recomputes each layer's outputs after the pass is done with it,
    # unless the pass called step.set_outputs() because it did not change the layer.

A pass writes its loop once against :class:`LayerLoop`: iterate the steps, ``commit`` each
layer's result (a resume point when streamed), ``finish`` into the stage output. Two
implementations: :class:`MemoryLoop` here (the model is in memory) and
:class:`slmcompress.streaming.engine.StreamingRun` (layers read from shards, one at a time).
Which one a pass gets is the runner's decision (``ctx.layer_loop``), never the pass's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel

from slmcompress.arch import decoder_layers, layer_type  # noqa: F401 - decoder_layers: re-exported
from slmcompress.errors import PassError

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook to stop the model after layer 0's inputs are known."""


@dataclass
class LayerBatch:
    """Inputs of one decoder layer for one calibration batch.

    ``by_type`` holds the keyword inputs of each attention type (Gemma's sliding and full
    layers get different masks and rotary tables); ``kwargs`` are those of this layer.
    """

    hidden: torch.Tensor  # (B, T, H), kept on the offload device
    kwargs: dict[str, Any] = field(default_factory=dict)
    by_type: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_type(self, kind: str) -> LayerBatch:
        """The same hidden states with the keyword inputs of layers of type ``kind``."""
        return LayerBatch(self.hidden, self.by_type.get(kind, self.kwargs), self.by_type)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _layer_output(out: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers 5) or a tuple whose first item is it."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_layer_inputs(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    device: torch.device,
    batch_size: int = 1,
    offload: torch.device | None = None,
) -> list[LayerBatch]:
    """Run the embedding part of the model and record what decoder layer 0 receives.

    Only the non-layer modules (embeddings, rotary tables) visit ``device``; layer 0 is
    interrupted before it computes anything.
    """
    offload = offload or torch.device("cpu")
    layers = decoder_layers(model)
    moved = _move_non_layer_modules(model, layers, device)
    batches: list[LayerBatch] = []
    firsts = _first_layer_of_each_type(model, len(layers))
    saved = {i: layers[i] for i in firsts}
    try:
        for i, kind in firsts.items():
            layers[i] = _Recorder(kind, stop=i == max(firsts))
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start : start + batch_size].to(device)  # (B, T)
            for i in firsts:
                layers[i].seen = {}
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            first = layers[min(firsts)]
            by_type = {k: _to(v, offload) for k, v in first.seen.items()}
            for i in firsts:
                by_type.update({k: _to(v, offload) for k, v in layers[i].seen.items()})
            hidden = first.hidden.to(offload)
            batches.append(LayerBatch(hidden, by_type[firsts[0]], by_type))
    finally:
        for i, layer in saved.items():
            layers[i] = layer
        for module, original in moved:
            module.to(original)
    return batches


def _first_layer_of_each_type(model: PreTrainedModel, n_layers: int) -> dict[int, str]:
    """Layer index -> attention type, for layer 0 and the first layer of every other type."""
    firsts: dict[int, str] = {}
    for index in range(n_layers):
        kind = layer_type(model.config, index)
        if kind not in firsts.values():
            firsts[index] = kind
    return firsts


class _Recorder(nn.Module):
    """Stands in for a decoder layer while capturing: records its inputs, passes hidden on."""

    def __init__(self, kind: str, stop: bool) -> None:
        super().__init__()
        self.kind, self.stop = kind, stop
        self.attention_type = kind  # some models read it from the layer
        self.seen: dict[str, dict[str, Any]] = {}
        self.hidden: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {
            k: v
            for k, v in kwargs.items()
            if k not in ("hidden_states", "past_key_values", "past_key_value")
        }
        kwargs["use_cache"] = False
        self.hidden = hidden.detach()
        self.seen = {self.kind: kwargs}
        if self.stop:
            raise _StopForward
        return hidden


def _move_non_layer_modules(
    model: PreTrainedModel, layers: nn.ModuleList, device: torch.device
) -> list:
    """Move every top-level submodule of the base model except the layer stack to ``device``."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    moved = []
    for child in base.children():
        if child is layers:
            continue
        original = next((p.device for p in child.parameters()), None) or next(
            (b.device for b in child.buffers()), device
        )
        if original != device:
            moved.append((child, original))
            child.to(device)
    return moved


class LayerStep:
    """One decoder layer during a layer-wise pass, resident on the compute device."""

    def __init__(
        self, index: int, layer: nn.Module, inputs: list[LayerBatch], device: torch.device
    ):
        self.index, self.layer, self.inputs, self.device = index, layer, inputs, device
        self._outputs: list[torch.Tensor] | None = None

    @torch.no_grad()
    def forward(self, keep_outputs: bool = False) -> list[torch.Tensor] | None:
        """Run every calibration batch through the layer (hooks observe it)."""
        outputs = self._output_sink() if keep_outputs else None
        for batch in self.inputs:
            out = _layer_output(
                self.layer(batch.hidden.to(self.device), **_to(batch.kwargs, self.device))
            )
            if not torch.isfinite(out).all():
                self._drop_sink(outputs)
                raise PassError(f"layer {self.index}: NaN/Inf in activations")
            if outputs is not None:
                outputs.append(out.to(batch.hidden.device))
        return outputs

    def _output_sink(self) -> list[torch.Tensor]:
        """Where kept outputs go (a list here; the streaming step's goes to disk beyond a budget)."""
        return []

    def _drop_sink(self, outputs: Any) -> None:
        """Release a sink abandoned because a batch produced NaN/Inf."""

    def set_outputs(self, outputs: list[torch.Tensor]) -> None:
        """Use these as the next layer's inputs (the pass did not change this layer)."""
        self._outputs = outputs

    def next_inputs(self) -> list[LayerBatch]:
        """Inputs of the next layer: given outputs, or a fresh forward of the modified layer."""
        outputs = self._outputs if self._outputs is not None else self.forward(keep_outputs=True)
        return [
            LayerBatch(out, batch.kwargs, batch.by_type)
            for out, batch in zip(outputs, self.inputs, strict=True)
        ]


def layerwise(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    device: torch.device,
    batch_size: int = 1,
    offload: torch.device | None = None,
    layer_indices: list[int] | None = None,
) -> Iterator[LayerStep]:
    """Yield each decoder layer with its calibration inputs, one layer resident at a time.

    Args:
        model: the model (its layers may live on CPU; only one moves to ``device`` at a time).
        tokens: calibration ids ``(N, T)``.
        device: compute device.
        batch_size: calibration batch size for the layer forwards.
        offload: where activations wait between layers (default CPU).
        layer_indices: stop after the last of these (all layers by default).
    """
    was_training = model.training
    model.eval()
    inputs = capture_layer_inputs(model, tokens, device, batch_size, offload)
    layers = decoder_layers(model)
    last = max(layer_indices) if layer_indices else len(layers) - 1
    try:
        for index, layer in enumerate(layers):
            if index > last:
                break
            original = next(layer.parameters()).device
            layer.to(device)
            inputs = [b.for_type(layer_type(model.config, index)) for b in inputs]
            step = LayerStep(index, layer, inputs, device)
            yield step
            if index < last:
                inputs = step.next_inputs()
            layer.to(original)
    finally:
        model.train(was_training)


class LayerLoop(Protocol):
    """Layer-by-layer execution, however the model is held: what every calibrated pass uses.

    ``model`` is the model the steps' layers belong to (a weightless skeleton when streamed:
    passes swap modules into it, e.g. ``QuantLinear``).
    """

    model: PreTrainedModel

    def num_layers(self) -> int:
        """Decoder layers in the model."""

    def steps(self, layer_indices: list[int] | None = None) -> Iterator[LayerStep]:
        """Yield each (unfinished) layer with its calibration inputs."""

    def commit(
        self,
        index: int,
        tensors: dict[str, torch.Tensor] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Keep layer ``index``'s result before the loop moves on (the resume point).

        ``tensors=None``: the result is the layer's own (changed) weights.
        """

    def result(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A committed layer's tensors and metadata."""

    def result_meta(self, index: int) -> dict[str, Any]:
        """A committed layer's metadata only."""

    def finish(self, config_updates: dict[str, Any]) -> PreTrainedModel | WrittenCheckpoint:
        """The stage output once every layer committed its weights (config updated)."""


@dataclass(frozen=True)
class WrittenCheckpoint:
    """A stage output that is a checkpoint directory, not a model: the pass streamed its input.

    The runner moves ``path`` into the stage directory; nothing loads it whole.
    """

    path: Path


class MemoryLoop:
    """:class:`LayerLoop` over a model held in memory (one layer on the device at a time)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokens: torch.Tensor,
        device: torch.device,
        batch_size: int = 1,
        offload: torch.device | None = None,
    ) -> None:
        self.model, self.tokens, self.device = model, tokens, device
        self.batch_size, self.offload = batch_size, offload
        self._results: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}

    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    def steps(self, layer_indices: list[int] | None = None) -> Iterator[LayerStep]:
        yield from layerwise(
            self.model, self.tokens, self.device, self.batch_size, self.offload, layer_indices
        )

    def commit(
        self,
        index: int,
        tensors: dict[str, torch.Tensor] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Keep the result; changed weights already live in the model."""
        self._results[index] = (tensors or {}, meta or {})

    def result(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self._results[index]

    def result_meta(self, index: int) -> dict[str, Any]:
        return self._results[index][1]

    def finish(self, config_updates: dict[str, Any]) -> PreTrainedModel:
        """The model itself: its layers were changed in place."""
        for key, value in config_updates.items():
            setattr(self.model.config, key, value)
        return self.model
