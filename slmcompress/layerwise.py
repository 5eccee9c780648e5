"""Layer-by-layer execution, written once for GPTQ, importance and depth scoring.

"capture the inputs of decoder layer 0 -> for each layer: move it to the compute device,
let the pass observe/modify it, produce the inputs of the next layer -> move it back".
Peak memory follows one decoder layer plus the calibration activations, never the model,
and nothing needs torch.fx tracing: only forward hooks on ordinary modules.

Usage::

    for step in loop.steps():
        with observe_inputs(step.layer.mlp.down_proj, gram.add):  # a hook per batch
            outputs = step.forward(keep_outputs=True)             # every calibration batch
        ...modify step.layer...                                   # e.g. quantize its linears
        loop.commit(step.index)
    # the loop recomputes each layer's outputs after the pass is done with it (step.outputs()),
    # unless the pass called step.set_outputs() because it knows them.

The :class:`LayerStep` surface a pass uses, the same in memory and streamed:
``forward``, ``outputs``, ``set_outputs``, ``capture_inputs``, ``batches``,
``input_groups``, ``fits`` and ``shortcut_outputs``; module-level :func:`observe_inputs`
(a hook context manager), :func:`input_of`, :class:`StopForward` (a hook ends a batch
early) and :class:`ResidualBlock` (a pre-norm layer taken apart at its linears' inputs).

A pass writes its loop once against :class:`LayerLoop`: iterate the steps, ``commit`` each
layer's result (a resume point when streamed), ``finish`` into the stage output. Two
implementations: :class:`MemoryLoop` here (the model is in memory) and
:class:`slmcompress.streaming.engine.StreamingRun` (layers read from shards, one at a time).
Which one a pass gets is the runner's decision (``ctx.layer_loop``), never the pass's.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel

from slmcompress.arch import Family, decoder_layers, layer_type
from slmcompress.errors import PassError

log = logging.getLogger(__name__)

#: activations a step may keep for every calibration token (fp32), e.g. a linear's inputs
KEEP_MAX_BYTES = 2 * 2**30


class StopForward(Exception):
    """Raised by a hook to end the current forward: the rest of the batch is not needed."""


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


def to_device(value: Any, device: torch.device) -> Any:
    """A layer's keyword inputs (tensors, tuples such as rotary tables, dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def layer_output(out: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers 5) or a tuple whose first item is it."""
    return out[0] if isinstance(out, (tuple, list)) else out


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def release_freed_memory_eagerly() -> None:
    """Make glibc return every freed tensor (>64 KiB) to the OS at once.

    glibc raises its mmap threshold after large frees, so later layer-sized tensors come
    from the heap, which fragments and never shrinks: measured +100-200 MB of RSS per
    streamed layer size without this, +0 with it. A fixed threshold keeps it at one layer.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        pass


@contextmanager
def observe_inputs(
    module: nn.Module, fn: Callable[[torch.Tensor], None], stop: bool = False
) -> Iterator[None]:
    """While open, ``fn(x)`` sees the input ``x`` of ``module`` on every call.

    ``stop``: end the forward right after (:class:`StopForward`), e.g. when nothing after
    ``module`` is needed for this pass over the batches.
    """

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        fn(args[0] if args else kwargs["input"])
        if stop:
            raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def input_of(module: nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """The input ``module`` receives during ``run()``, which is stopped right there."""
    seen: list[torch.Tensor] = []
    try:
        with observe_inputs(module, seen.append, stop=True):
            run()
    except StopForward:
        pass
    if not seen:
        raise PassError(f"{type(module).__name__}: never ran in its block's forward")
    return seen[0]


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
            except StopForward:
                pass
            first = layers[min(firsts)]
            by_type = {k: to_device(v, offload) for k, v in first.seen.items()}
            for i in firsts:
                by_type.update({k: to_device(v, offload) for k, v in layers[i].seen.items()})
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
            raise StopForward
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
    """One decoder layer during a layer-wise pass, resident on the compute device.

    ``inputs`` holds the layer's calibration batches (a list in memory; streamed, a view
    that reads one batch at a time from memory or disk). The methods below are all a pass
    needs to observe, change and re-run the layer; their results are the same whether the
    model is in memory or streamed.
    """

    def __init__(
        self, index: int, layer: nn.Module, inputs: Sequence[LayerBatch], device: torch.device
    ):
        self.index, self.layer, self.inputs, self.device = index, layer, inputs, device
        self._outputs: Sequence[torch.Tensor] | None = None

    # ------------------------------------------------------------ running the layer
    def batches(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """Each batch's hidden states ``(B, T, H)`` and keyword inputs, on the device (for
        passes that run pieces of the layer themselves, e.g. with :class:`ResidualBlock`)."""
        for batch in self.inputs:
            yield batch.hidden.to(self.device), to_device(batch.kwargs, self.device)

    @torch.no_grad()
    def forward(self, keep_outputs: bool = False) -> Sequence[torch.Tensor] | None:
        """Run every calibration batch through the layer as it is now (hooks observe it).

        A hook may raise :class:`StopForward` to end a batch early; such a forward keeps no
        outputs, so ``keep_outputs`` needs forwards that run to the end.

        Returns:
            the outputs ``(B, T, H)`` per batch when ``keep_outputs`` (in memory a list;
            streamed a store that spills to disk beyond the budget), else ``None``.
        """
        outputs = self._output_sink() if keep_outputs else None
        for batch in self.inputs:
            hidden = batch.hidden.to(self.device)
            try:
                out = layer_output(self.layer(hidden, **to_device(batch.kwargs, self.device)))
            except StopForward:
                if outputs is not None:
                    self._drop_sink(outputs)
                    raise PassError(f"layer {self.index}: a hook stopped a kept forward") from None
                continue
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

    def capture_inputs(
        self, module: nn.Module, stop: bool = True, offload: torch.device | None = None
    ) -> list[torch.Tensor]:
        """The input of ``module`` (a submodule of the layer) for every batch.

        ``stop``: each forward ends at ``module`` (nothing after it runs). ``offload``: where
        the captured tensors are kept (default: the compute device).
        """
        captured: list[torch.Tensor] = []
        keep = captured.append if offload is None else lambda x: captured.append(x.to(offload))
        with observe_inputs(module, lambda x: keep(x.detach()), stop=stop):
            self.forward()
        return captured

    def input_groups(self, modules: dict[str, nn.Module]) -> list[list[str]]:
        """``modules`` (name -> module) grouped by the very tensor they receive, in execution
        order: one batch is run with hooks (q/k/v share one input, gate/up another)."""
        seen: list[tuple[str, torch.Tensor]] = []
        with contextlib.ExitStack() as hooks:
            for name, module in modules.items():
                hooks.enter_context(observe_inputs(module, lambda x, n=name: seen.append((n, x))))
            hidden, kwargs = next(self.batches())
            self.layer(hidden, **kwargs)
        groups: list[list[str]] = []
        for i, (name, x) in enumerate(seen):
            if any(name in g for g in groups):
                continue  # a module called twice keeps its first position
            if i and x is seen[i - 1][1] and seen[i - 1][0] in groups[-1]:
                groups[-1].append(name)
            else:
                groups.append([name])
        missing = [n for n in modules if not any(n in g for g in groups)]
        if missing:
            raise PassError(
                f"layer {self.index}: {', '.join(missing)} never ran in the layer's forward"
            )
        return groups

    def num_tokens(self) -> int:
        """Calibration tokens the layer sees (over all batches)."""
        return sum(b.hidden.shape[:-1].numel() for b in self.inputs)

    def fits(self, width: int, max_bytes: int = KEEP_MAX_BYTES) -> bool:
        """Whether keeping a ``width``-wide fp32 activation for every token stays in ``max_bytes``."""
        return self.num_tokens() * width * 4 <= max_bytes

    # ------------------------------------------------------------ outputs = next inputs
    def outputs(self) -> Sequence[torch.Tensor]:
        """The layer's outputs per batch: those set by the pass, else one forward of the
        layer as it is now. They become the next layer's inputs: call it once the layer is
        final (a later change is not seen)."""
        if self._outputs is None:
            self._outputs = self.forward(keep_outputs=True)
        return self._outputs

    def set_outputs(self, outputs: Sequence[torch.Tensor]) -> None:
        """Use these as the next layer's inputs (the pass did not change this layer, or it
        computed the outputs of the changed layer itself)."""
        self._outputs = outputs

    def shortcut_outputs(
        self,
        outputs: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        delta: torch.Tensor,
    ) -> bool:
        """Set the outputs after a linear's weight changed by ``delta`` ``(out, in)``,
        without running the layer again: ``Y' = Y + X delta^T``.

        Holds when the linear's output is added straight to the layer output (the residual
        of Llama-style MLPs, ``down_proj``); ``outputs`` are the layer's outputs before the
        change and ``inputs`` the linear's inputs, per batch. Checked against a real
        forward on the first batch; returns ``False`` (nothing set, so the loop re-runs the
        layer) when it does not hold, e.g. behind a post-MLP norm.
        """
        if len(outputs) != len(self.inputs) or len(inputs) != len(outputs):
            return False
        delta = delta.to(self.device)
        updated = [
            y + (x.to(self.device).to(delta.dtype) @ delta.T).to(y.dtype).to(y.device)
            for y, x in zip(outputs, inputs, strict=True)
        ]  # (B, T, H) each
        hidden, kwargs = next(self.batches())
        check = layer_output(self.layer(hidden, **kwargs))
        tol = 1e-4 * check.abs().max().item() + 1e-5
        if (check.to(updated[0].device) - updated[0]).abs().max().item() > tol:
            return False
        for y in updated:
            if not torch.isfinite(y).all():
                raise PassError(f"layer {self.index}: NaN/Inf in its changed outputs")
        self.set_outputs(updated)
        return True

    def produce_outputs(self, compute: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        """Set the outputs from ``compute(i, hidden_i)`` (batch ``i``'s input on the device).

        Each output replaces its input as it is written (in memory, where ``inputs`` is the
        loop's own list; a throwaway entry when streamed), so this never holds a third
        layer boundary.
        """
        outputs = []
        for i, batch in enumerate(self.inputs):
            y = compute(i, batch.hidden.to(self.device))  # (B, T, H)
            if not torch.isfinite(y).all():
                raise PassError(f"layer {self.index}: NaN/Inf in its changed outputs")
            y = y.to(batch.hidden.device)
            batch.hidden = y
            outputs.append(y)
        self.set_outputs(outputs)

    def next_inputs(self) -> list[LayerBatch]:
        """Inputs of the next layer: given outputs, or a fresh forward of the modified layer."""
        return [
            LayerBatch(out, batch.kwargs, batch.by_type)
            for out, batch in zip(self.outputs(), self.inputs, strict=True)
        ]


class ResidualBlock:
    """A pre-norm residual decoder layer taken apart at its linears' inputs.

    ``h2 = h + o_proj(attention(attn_norm(h)))`` and ``y = h2 + down_proj(mlp(mlp_norm(h2)))``
    (Llama, Mistral, Qwen, Phi-3), with module paths from the layer's :class:`Family`. A
    pass can then compute what ``o_proj`` or ``down_proj`` reads, or the layer output, from
    pieces it keeps instead of re-running the whole layer. :meth:`matches` checks the
    decomposition against the layer's own forward (Gemma's post-norms fail it).
    """

    def __init__(self, layer: nn.Module, family: Family) -> None:
        self.layer = layer
        self.o_proj = layer.get_submodule(family.o)
        self.down_proj = layer.get_submodule(family.down)
        self.attn_norm = layer.get_submodule(family.attn_norm)
        self.mlp_norm = layer.get_submodule(family.mlp_norm)

    @staticmethod
    def applies(layer: nn.Module, family: Family) -> bool:
        """Whether ``layer`` has the parts (norms, ``self_attn``, ``mlp``) by ``family``'s names."""
        names = dict(layer.named_modules())
        return all(p in names for p in (family.attn_norm, "self_attn", family.mlp_norm, "mlp"))

    def o_input(self, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """What ``o_proj`` reads: attention output of ``attn_norm(h)``."""
        attn = self.layer.self_attn
        return input_of(self.o_proj, lambda: attn(hidden_states=self.attn_norm(h), **kwargs))

    def down_input(self, h2: torch.Tensor) -> torch.Tensor:
        """What ``down_proj`` reads, given the residual stream after attention."""
        return input_of(self.down_proj, lambda: self.layer.mlp(self.mlp_norm(h2)))

    def forward(self, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The layer's output, assembled from the pieces."""
        h2 = h + self.o_proj(self.o_input(h, kwargs))
        return h2 + self.down_proj(self.down_input(h2))

    def matches(self, step: LayerStep) -> bool:
        """Whether the assembled forward equals the layer's own, bit for bit, on the first batch."""
        hidden, kwargs = next(step.batches())
        return torch.equal(self.forward(hidden, kwargs), layer_output(self.layer(hidden, **kwargs)))


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
        release_freed_memory_eagerly()  # layer-sized temporaries must not pile up in the heap
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
