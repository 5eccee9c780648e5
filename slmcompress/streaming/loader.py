"""Streaming loader: a model skeleton with no weights, filled one decoder layer at a time.

A 70B model in bf16 is ~140 GB; it fits neither one GPU nor a 24 GiB host. The skeleton is
built from ``config.json`` alone with parameters on the meta device (buffers such as the
rotary ``inv_freq`` are computed for real on the CPU, exactly as a normal load does), and
each decoder layer is materialised straight from the (sharded) safetensors files when the
calibration loop reaches it, then released again.

Tensors are read with plain positioned file reads instead of ``safe_open``'s mmap: a mmap
of a 5 GB shard counts against an address-space limit (RLIMIT_AS) and its touched pages
count in RSS until unmapped, while a read into a fresh tensor costs exactly its bytes.
The headers are still parsed per the safetensors spec, and every shard is validated up
front so a missing or truncated shard fails before hours of work, naming the file.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from slmcompress.arch import decoder_layers, layers_prefix
from slmcompress.errors import CheckpointError
from slmcompress.io.files import DTYPES, TensorEntry, shard_entries, shard_paths
from slmcompress.io.remote_code import check_local_code, hf_kwargs

log = logging.getLogger(__name__)


class WeightSource:
    """Random access to the tensors of a (sharded) safetensors checkpoint, no mmap."""

    def __init__(self, model_dir: Path, entries: dict[str, TensorEntry] | None = None) -> None:
        """``entries``: the tensors of headers a caller has read already (not read again)."""
        self.model_dir = Path(model_dir)
        if entries is None:
            entries = {}
            for path in shard_paths(self.model_dir):
                entries.update(shard_entries(path))
        self.entries: dict[str, TensorEntry] = entries

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def resolve(self, name: str, fallback: dict[str, str] | None = None) -> str:
        """The stored name of tensor ``name``, or of its ``fallback`` (a tied head's
        embedding); a one-line error naming the checkpoint when neither is stored."""
        return _resolve(name, self, fallback)

    def nbytes(self, prefix: str = "") -> int:
        """Bytes on disk of every tensor whose name starts with ``prefix``."""
        return sum(e.nbytes for n, e in self.entries.items() if n.startswith(prefix))

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (CPU), optionally cast to ``dtype``."""
        entry = self.entries.get(name)
        if entry is None:
            raise CheckpointError(f"checkpoint: {self.model_dir} has no tensor {name!r}")
        raw = torch.empty(entry.nbytes, dtype=torch.uint8, device="cpu")  # pread target
        try:
            got = _pread_into(entry.path, memoryview(raw.numpy()), entry.start)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint: weight shard {entry.path} is missing") from None
        if got != entry.nbytes:
            raise CheckpointError(
                f"checkpoint: weight shard {entry.path} is truncated (reading {name})"
            )
        tensor = raw.view(DTYPES[entry.dtype]).reshape(entry.shape)
        return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def _pread_into(path: Path, buffer: memoryview, offset: int, chunk: int = 1 << 30) -> int:
    """Fill ``buffer`` from ``path`` at ``offset``; chunked because one read stops near 2 GiB."""
    done = 0
    with open(path, "rb", buffering=0) as handle:
        while done < len(buffer):
            got = os.preadv(handle.fileno(), [buffer[done : done + chunk]], offset + done)
            if got == 0:
                break
            done += got
    return done


def build_skeleton(
    model_dir: Path, dtype: torch.dtype, allow_quantized: bool = False, code_checked: bool = False
) -> PreTrainedModel:
    """The model from its config alone: parameters on ``meta``, buffers real (rotary tables).

    Built under ``torch.device("meta")`` so no parameter is ever allocated (accelerate's
    ``init_empty_weights`` allocates each one on the CPU first, which an address-space cap
    notices); modules whose buffers are computed at init (rotary ``inv_freq``) are then
    rebuilt on the CPU from the config, exactly as a normal load computes them.
    ``allow_quantized`` builds the float architecture of a quantized checkpoint (a stand-in
    that is never run; streaming itself reads float checkpoints only). ``code_checked``:
    the caller made the remote-code check on this directory already.
    """
    if not code_checked:
        check_local_code(model_dir)
    config = AutoConfig.from_pretrained(model_dir, **hf_kwargs())
    if getattr(config, "quantization_config", None) and allow_quantized:
        del config.quantization_config  # a placeholder for what the config describes, no weights
    elif getattr(config, "quantization_config", None):
        raise CheckpointError(
            f"checkpoint: {model_dir} is already quantized; streaming reads float checkpoints"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, module in list(model.named_modules()):
        if any(b.device.type == "meta" for b in module.buffers(recurse=False)):
            _rebuild_on_cpu(model, name, module, config)
    return model.eval()


def _rebuild_on_cpu(model: nn.Module, name: str, module: nn.Module, config: Any) -> None:
    """Give a module its computed buffers on the CPU, exactly as a normal load does.

    Modules built from the config alone (rotary embeddings) are rebuilt on the CPU; others
    (Gemma's scaled embedding: a weight plus a ``sqrt(hidden)`` buffer) get their buffers
    allocated and filled by the model's own ``_init_weights``, as ``from_pretrained`` does.
    """
    if any(p.device.type != "meta" for p in module.parameters(recurse=False)):
        raise CheckpointError(
            f"model: {name} has both weights and computed buffers; streaming cannot load it"
        )
    try:
        with torch.device("cpu"):
            rebuilt = type(module)(config=getattr(config, "text_config", None) or config)
    except TypeError:  # its constructor does not take the config
        _init_buffers_on_cpu(model, name, module)
        return
    except Exception as exc:  # noqa: BLE001 - any constructor failure means we cannot stream it
        raise CheckpointError(
            f"model: cannot compute the buffers of {name} ({type(module).__name__}) "
            f"without weights: {exc}"
        ) from exc
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, rebuilt)


def _init_buffers_on_cpu(model: nn.Module, name: str, module: nn.Module) -> None:
    """Allocate a module's meta buffers on the CPU and let the model's init fill them."""
    for key, buf in list(module.named_buffers(recurse=False)):
        if buf.device.type == "meta":
            fill = float("nan") if buf.dtype.is_floating_point else 0
            module._buffers[key] = torch.full(buf.shape, fill, dtype=buf.dtype, device="cpu")
    init = getattr(model, "_init_weights", None)
    try:
        if init is None:
            raise AttributeError("the model has no _init_weights")
        init(module)
    except Exception as exc:  # noqa: BLE001 - the buffers stay unknown: refuse to stream
        raise CheckpointError(
            f"model: cannot compute the buffers of {name} ({type(module).__name__}) "
            f"without weights: {exc}"
        ) from exc
    unset = [
        k
        for k, b in module.named_buffers(recurse=False)
        if b.dtype.is_floating_point and b.isnan().any()
    ]
    if unset:
        raise CheckpointError(
            f"model: cannot compute the buffer {name}.{unset[0]} ({type(module).__name__}) "
            "without weights"
        )


def materialise(
    module: nn.Module,
    prefix: str,
    source: WeightSource,
    dtype: torch.dtype,
    device: torch.device,
    fallback: dict[str, str] | None = None,
) -> nn.Module:
    """Fill a meta module's parameters (and persistent buffers) from the checkpoint, in place.

    ``fallback`` maps a missing tensor name to another one (tied ``lm_head`` -> embeddings).
    """
    for name, param in list(module.named_parameters(recurse=True)):
        key = _resolve(prefix + name, source, fallback)
        tensor = source.get(key, dtype).to(device)
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"checkpoint: {key} has shape {tuple(tensor.shape)}, config expects {tuple(param.shape)}"
            )
        _set_tensor(module, name, nn.Parameter(tensor, requires_grad=False))
    for name, buf in list(module.named_buffers(recurse=True)):
        if buf.device.type == "meta":  # only persistent buffers can be on meta here
            key = _resolve(prefix + name, source, fallback)
            # a buffer keeps the dtype its module declares (GPTQ scales stay fp16)
            own = buf.dtype if buf.is_floating_point() else None
            value = source.get(key, own)
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"checkpoint: tensor {key} holds NaN or infinite values")
            _set_tensor(module, name, value.to(device))
        elif buf.device != device:
            _set_tensor(module, name, buf.to(device))
    return module


def release(module: nn.Module) -> None:
    """Send a module's parameters back to ``meta`` so their memory is freed (buffers stay)."""
    for name, param in list(module.named_parameters()):
        meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
        _set_tensor(module, name, nn.Parameter(meta, requires_grad=False))


def _resolve(key: str, source: WeightSource, fallback: dict[str, str] | None) -> str:
    if key in source:
        return key
    if fallback and key in fallback and fallback[key] in source:
        return fallback[key]
    raise CheckpointError(
        f"checkpoint: {source.model_dir} has no tensor {key!r} (shards or index incomplete?)"
    )


def _set_tensor(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if isinstance(value, nn.Parameter):
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value


class StreamingModel:
    """A meta skeleton plus its weight source; materialises parts on demand."""

    def __init__(
        self,
        model_dir: Path,
        dtype: torch.dtype = torch.float32,
        prepare: Callable[[nn.Module, WeightSource], None] | None = None,
        skeleton: PreTrainedModel | None = None,
        source: WeightSource | None = None,
    ) -> None:
        """``prepare`` may swap modules of the meta skeleton before any weight is read (a
        quantized checkpoint's ``QuantLinear``s); without it only float checkpoints load.
        ``skeleton``: the :func:`build_skeleton` of ``model_dir`` someone already holds (the
        stage's model), filled in place instead of building a second one. ``source``: the
        :class:`WeightSource` of ``model_dir`` from headers a caller read already."""
        self.model_dir = Path(model_dir)
        self.source = source or WeightSource(self.model_dir)  # validates every shard up front
        self.dtype = dtype
        if skeleton is None:
            skeleton = build_skeleton(self.model_dir, dtype, allow_quantized=prepare is not None)
        self.model = skeleton
        if prepare is not None:
            with torch.device("meta"):
                prepare(self.model, self.source)
        self.layers = decoder_layers(self.model)
        self.layer_prefix = layers_prefix(self.model) + "."
        self._pristine = [copy.deepcopy(layer) for layer in self.layers]  # meta: costs no memory
        self._check_layer_keys()

    @property
    def config(self):
        return self.model.config

    def num_layers(self) -> int:
        return len(self.layers)

    def load_layer(self, index: int, device: torch.device) -> nn.Module:
        """Materialise decoder layer ``index`` on ``device``."""
        layer = self.layers[index]
        return materialise(layer, f"{self.layer_prefix}{index}.", self.source, self.dtype, device)

    def release_layer(self, index: int) -> None:
        """Put the pristine meta layer back: frees weights and whatever a pass swapped in."""
        self.layers[index] = copy.deepcopy(self._pristine[index])

    def load_non_layer(self, device: torch.device) -> None:
        """Materialise embeddings, final norm and rotary tables (not ``lm_head``)."""
        base_prefix = self.layer_prefix.rsplit(".", 2)[0]
        base = self.model.get_submodule(base_prefix)
        for name, child in base.named_children():
            if child is not self.layers:
                materialise(child, f"{base_prefix}.{name}.", self.source, self.dtype, device)

    def release_non_layer(self) -> None:
        base = self.model.get_submodule(self.layer_prefix.rsplit(".", 2)[0])
        for child in base.children():
            if child is not self.layers:
                release(child)

    def non_layer_names(self) -> list[str]:
        """Checkpoint tensor names outside the decoder layers (embeddings, norm, lm_head)."""
        return [n for n in self.source.entries if not n.startswith(self.layer_prefix)]

    def _check_layer_keys(self) -> None:
        """Fail fast when the index names no shard for some layer (a shard left out of the index)."""
        for index in range(self.num_layers()):
            prefix = f"{self.layer_prefix}{index}."
            layer = self.layers[index]
            loaded = [n for n, b in layer.named_buffers() if b.device.type == "meta"]
            for name in [n for n, _ in layer.named_parameters()] + loaded:
                if prefix + name not in self.source:
                    raise CheckpointError(
                        f"checkpoint: {self.model_dir} has no tensor {prefix + name!r} (a shard is missing from the index?)"
                    )
