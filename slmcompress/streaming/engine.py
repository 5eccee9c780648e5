"""Streaming (out-of-core) layer-wise execution: the model never has to fit in memory.

:class:`StreamingRun` is the :class:`~slmcompress.layerwise.LayerLoop` of a model that stays
on disk -- passes receive :class:`~slmcompress.layerwise.LayerStep` objects with ``.index``,
``.layer``, ``.inputs``, ``.forward()``, ``.set_outputs()`` -- but each layer is read from the
safetensors shards when reached and dropped afterwards, calibration activations live in an
:class:`ActivationStore` (memory up to a budget, disk beyond), every committed layer is a
resume point, and ``finish`` assembles the sharded checkpoint from the committed layers::

    run = StreamingRun(model_dir, tokens, device, work_dir, StreamOptions(max_memory="3GB"))
    for step in run.steps():
        ...process step.layer...
        run.commit(step.index)          # the layer's weights, or commit(i, {...scores...})
    out = run.finish({"quantization_config": ...})   # a WrittenCheckpoint
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmcompress.arch import layer_type
from slmcompress.errors import PassError
from slmcompress.io.files import new_metadata, write_metadata, write_quantize_config
from slmcompress.layerwise import (
    LayerStep,
    WrittenCheckpoint,
    capture_layer_inputs,
    release_freed_memory_eagerly,
)
from slmcompress.memory_model import (
    BASE_RSS,
    SLACK,
    ModelDims,
    capture_peak_bytes,
    format_bytes,
    layer_peak_bytes,
)
from slmcompress.streaming.activations import ActivationStore, BatchView
from slmcompress.streaming.budget import StreamOptions, device_budget, resolve_budget
from slmcompress.streaming.loader import StreamingModel
from slmcompress.streaming.resume import ResumeState, tokens_digest
from slmcompress.streaming.sharded_writer import copy_side_files, sharded_checkpoint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- steps
class StreamingLayerStep(LayerStep):
    """A :class:`LayerStep` whose kept outputs go to an :class:`ActivationStore`, not a list."""

    def __init__(
        self,
        index: int,
        layer: nn.Module,
        inputs: BatchView,
        device: torch.device,
        run: StreamingRun,
    ):
        super().__init__(index, layer, inputs, device)  # type: ignore[arg-type]
        self._run = run
        self.next_store: ActivationStore | None = None
        self.created: list[ActivationStore] = []

    def _output_sink(self) -> ActivationStore:  # type: ignore[override]
        """Kept outputs stream into a store (memory up to the budget, disk beyond)."""
        return self._new_store()

    def _drop_sink(self, outputs: ActivationStore | None) -> None:
        if outputs is not None:
            outputs.discard()

    def _new_store(self) -> ActivationStore:
        store = self._run.new_store(self.index + 1)
        self.created.append(store)
        return store

    def discard_unused(self) -> None:
        """Drop stores the pass created but the loop does not carry to the next layer."""
        for store in self.created:
            if store is self.next_store:
                continue
            if self.next_store is None:
                store.discard()  # last layer: nothing on disk is needed
            else:
                store.drop_memory()  # same directory as next_store: keep the files

    def next_inputs(self) -> BatchView:  # type: ignore[override]
        """The next layer's inputs as a store-backed view (given outputs are stored first)."""
        outputs = self.outputs()
        if not isinstance(outputs, ActivationStore):
            store = self._new_store()
            for out in outputs:
                store.append(out)
            outputs = store
        self.next_store = outputs
        return BatchView(outputs, self.inputs.kwargs)


class StreamingRun:
    """One streaming pass over a model directory; see the module docstring."""

    def __init__(
        self,
        model: Path | StreamingModel,
        tokens: torch.Tensor,
        device: torch.device,
        work_dir: Path,
        options: StreamOptions | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.options = options or StreamOptions()
        release_freed_memory_eagerly()
        self.stream = (
            model if isinstance(model, StreamingModel) else StreamingModel(Path(model), dtype)
        )
        self.tokens, self.device = tokens, torch.device(device)
        self.work_dir = Path(work_dir)
        self.root = self.work_dir / "stream"
        self.budget = resolve_budget(self.options.max_memory)
        self.activation_budget = self._check_budget()
        if not self.options.resume and self.root.exists():
            shutil.rmtree(self.root)
        self.state = ResumeState(self.root, self._key(), self.stream.num_layers())

    # ------------------------------------------------------------ budget
    def _check_budget(self) -> int:
        """Raise if one layer cannot fit; return the bytes left for activations in memory."""
        arch = ModelDims.from_config(self.stream.config.to_dict())
        elem = self.stream.dtype.itemsize
        seq_len = int(self.tokens.shape[1])
        batch_tokens = self.options.batch_size * seq_len
        layer = layer_peak_bytes(arch, elem, batch_tokens, seq_len, self.options.pass_name)
        capture = capture_peak_bytes(arch, elem, batch_tokens)
        on_host = max(layer, capture) if self.device.type == "cpu" else capture
        needed = BASE_RSS + int(on_host * SLACK)
        if self.budget < needed:
            raise PassError(
                f"max_memory {format_bytes(self.budget)} is too small to stream this model: one decoder "
                f"layer with one calibration batch needs about {format_bytes(needed)} "
                f"(layer {format_bytes(layer)}, embeddings {format_bytes(capture)}, runtime {format_bytes(BASE_RSS)}); "
                f"raise max_memory or lower batch_size/seq_len"
            )
        free = device_budget(self.device)
        if free is not None and free < layer:
            raise PassError(
                f"device {self.device}: {format_bytes(free)} free, one layer needs {format_bytes(layer)}"
            )
        return max(int(self.budget / SLACK) - needed, 0)

    def _key(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.stream.model_dir.resolve()),
            "config": self.stream.config.to_json_string(),
            "dtype": str(self.stream.dtype),
            "tokens": tokens_digest(self.tokens),
            "batch_size": self.options.batch_size,
            "pass": self.options.key,
        }

    # ------------------------------------------------------------ stores
    def new_store(self, layer: int) -> ActivationStore:
        """The store for the inputs of ``layer`` (two boundaries live at once: half the budget each)."""
        directory = self.state.activations_dir(layer)
        store = ActivationStore(
            directory,
            self.options.activation_offload,
            self.activation_budget // 2,
            persist=self.options.resume,
        )
        store.discard()  # leftovers of an interrupted attempt at this boundary
        return store

    # ------------------------------------------------------------ loop
    def steps(self, layer_indices: list[int] | None = None) -> Iterator[StreamingLayerStep]:
        """Yield each unfinished layer with its inputs; commit a resume point after each."""
        last = max(layer_indices) if layer_indices else self.stream.num_layers() - 1
        start = self.state.finished
        if start > last:
            return
        kwargs, inputs = self._initial_inputs(start)
        for index in range(start, last + 1):
            layer = self.stream.load_layer(index, self.device)
            kind = layer_type(self.stream.config, index)
            view = BatchView(inputs, [by_type[kind] for by_type in kwargs])
            step = StreamingLayerStep(index, layer, view, self.device, self)
            yield step
            next_store = None
            if index < last:
                step.next_inputs()
                next_store = step.next_store
                next_store.commit()
            step.discard_unused()
            self.state.mark_finished(index)
            inputs.discard()
            del step, layer
            self.stream.release_layer(index)
            inputs = next_store
            log.info("layer %d/%d done", index + 1, self.stream.num_layers())

    def _initial_inputs(
        self, start: int
    ) -> tuple[list[dict[str, dict[str, Any]]], ActivationStore]:
        """Capture layer 0's inputs, or (resuming) reopen the saved inputs of layer ``start``."""
        kwargs, store = self._capture(keep_hidden=start == 0)
        if start == 0:
            store.commit()
            return kwargs, store
        saved = ActivationStore.open(
            self.state.activations_dir(start),
            self.options.activation_offload,
            self.activation_budget // 2,
        )
        if len(saved) != len(kwargs):
            raise PassError(
                f"resume: {saved.directory} has {len(saved)} batches, expected {len(kwargs)}"
            )
        return kwargs, saved

    @torch.no_grad()
    def _capture(
        self, keep_hidden: bool
    ) -> tuple[list[dict[str, dict[str, Any]]], ActivationStore]:
        """Embeddings on the device, one batch at a time (identical to the in-memory capture).

        Returns each batch's keyword inputs per attention type, and the hidden states.
        """
        self.stream.load_non_layer(self.device)
        store = self.new_store(0)
        kwargs: list[dict[str, dict[str, Any]]] = []
        bs = self.options.batch_size
        try:
            for start in range(0, self.tokens.shape[0], bs):
                (batch,) = capture_layer_inputs(
                    self.stream.model, self.tokens[start : start + bs], self.device, bs
                )
                kwargs.append(batch.by_type)
                if keep_hidden:
                    store.append(batch.hidden)
        finally:
            self.stream.release_non_layer()
        return kwargs, store

    # ------------------------------------------------------------ results (LayerLoop)
    @property
    def model(self) -> nn.Module:
        """The skeleton the streamed layers belong to (passes swap modules into it)."""
        return self.stream.model

    def num_layers(self) -> int:
        return self.stream.num_layers()

    def commit(
        self,
        index: int,
        tensors: dict[str, torch.Tensor] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Persist a layer's result before the loop moves on (it is the resume point).

        ``tensors=None``: the layer's own weights, under their names in the model.
        """
        if tensors is None:
            name = f"{self.stream.layer_prefix.rstrip('.')}.{index}"
            layer = self.stream.model.get_submodule(name)
            tensors = {f"{name}.{k}": v for k, v in layer.state_dict().items()}
        self.state.save_result(index, tensors, meta)

    def result(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.state.load_result(index)

    def result_meta(self, index: int) -> dict[str, Any]:
        """A committed layer's metadata only (no tensor is read)."""
        return self.state.load_meta(index)

    def finish(
        self, config_updates: dict[str, Any], out_dir: Path | None = None
    ) -> WrittenCheckpoint:
        """Non-layer tensors from the source + every committed layer -> sharded HF checkpoint."""
        out = Path(out_dir) if out_dir else self.work_dir / "streamed-checkpoint"
        stream = self.stream
        config = stream.config.to_dict()
        config.update(config_updates, torch_dtype=str(stream.dtype).removeprefix("torch."))
        with sharded_checkpoint(out, self.options.max_shard_bytes) as writer:
            for name in stream.non_layer_names():
                writer.add(name, stream.source.get(name, stream.dtype))
            for index in range(stream.num_layers()):
                tensors, _meta = self.result(index)
                writer.add_many(tensors)
                del tensors
            copy_side_files(stream.model_dir, writer.directory)
            (writer.directory / "config.json").write_text(
                json.dumps(config, indent=2, sort_keys=True) + "\n"
            )
            write_quantize_config(writer.directory, config_updates.get("quantization_config"))
            write_metadata(writer.directory, new_metadata(streamed=True))
        return WrittenCheckpoint(out)
