"""Serve a GPTQ layer on the GPU: repack once, pick a route per M bucket, run it, log it.

Called by :func:`slmcompress.kernels.dispatch.quant_matmul` for the Triton backends. Per
layer the GPTQ buffers are repacked once (:func:`.repack.repack`, redone if they change);
per ``(layer, M bucket, dtype)`` the choice is resolved once:

1. a choice forced by :func:`forced_choice` (tests, benchmarks);
2. the config store (:mod:`.config_store`: override file, shipped file, disk cache);
3. on a miss, ``SLMCOMPRESS_KERNEL_TUNE=miss`` (default) tunes the key once on a CUDA GPU
   (not while a CUDA graph is being captured) and caches the winner on disk;
   ``SLMCOMPRESS_KERNEL_TUNE=off`` never tunes (benchmarks' end-to-end runs);
4. else :func:`.routes.heuristic`.

:data:`served` counts calls per route label, so a benchmark can say which route served.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from slmcompress.kernels import tinygemm
from slmcompress.kernels.config_store import ConfigStore
from slmcompress.kernels.execute import execute
from slmcompress.kernels.repack import ServingWeight, repack
from slmcompress.kernels.routes import DEFAULT_SMS, Choice, Key, heuristic, invalid, m_bucket

log = logging.getLogger(__name__)

TUNE_ENV = "SLMCOMPRESS_KERNEL_TUNE"
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: route label -> calls served since the last reset
served: Counter[str] = Counter()
_FORCED: list[Choice] = []
_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RESOLVED: dict[tuple, tuple[Choice, str]] = {}  # (gpu, key, dtype) -> (choice, source)


@dataclass
class LayerState:
    """A layer's serving copy (or why it has none) and its resolved choices."""

    version: tuple
    weight: ServingWeight | None
    reason: str
    choices: dict[tuple[int, torch.dtype], tuple[Choice, str]] = field(default_factory=dict)
    tiny: dict[int, tinygemm.TinyGemmWeight] = field(default_factory=dict)

    def tinygemm_weight(self, inner_k_tiles: int) -> tinygemm.TinyGemmWeight:
        """The layer's tinygemm copy, converted on first use (a second copy of the weight)."""
        if inner_k_tiles not in self.tiny:
            self.tiny[inner_k_tiles] = tinygemm.convert(self.weight, inner_k_tiles)
        return self.tiny[inner_k_tiles]


def _version(layer) -> tuple:
    tensors = (layer.qweight, layer.qzeros, layer.scales, layer.g_idx)
    return tuple((t.data_ptr(), t._version, t.device) for t in tensors)


def layer_state(layer) -> LayerState:
    """The layer's :class:`LayerState`, repacked again only if its buffers changed."""
    version = _version(layer)
    state = _STATES.get(layer)
    if state is not None and state.version == version:
        return state
    packed = repack(
        layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.group_size
    )
    if isinstance(packed, str):
        state = LayerState(version, None, packed)
    else:
        state = LayerState(version, packed, "serving layout")
    _STATES[layer] = state
    return state


@contextlib.contextmanager
def forced_choice(choice: Choice | None) -> Iterator[None]:
    """Serve every call in the block with ``choice`` (None: the normal resolution)."""
    _FORCED.append(choice)
    try:
        yield
    finally:
        _FORCED.pop()


def tune_mode() -> str:
    mode = os.environ.get(TUNE_ENV, "miss").strip().lower() or "miss"
    if mode not in ("miss", "off"):
        raise ValueError(f"{TUNE_ENV}={mode!r}: use miss or off")
    return mode


@functools.cache
def _device_info(device: torch.device) -> tuple[str, int]:
    """``(gpu name, SM count)``; the interpreter runs on CPU tensors."""
    if device.type != "cuda":
        return "cpu-interpreter", DEFAULT_SMS
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count


@functools.cache
def store_for(gpu_name: str) -> ConfigStore:
    return ConfigStore(gpu_name)


def _can_tune(device: torch.device) -> bool:
    if device.type != "cuda" or tune_mode() == "off":
        return False
    return not torch.cuda.is_current_stream_capturing()


def resolve(key: Key, state: LayerState, x_dtype: torch.dtype) -> tuple[Choice, str]:
    """``(choice, source)`` for ``key``: store hit, tuned once on a miss, else the heuristic."""
    w = state.weight
    gpu, sms = _device_info(w.device)
    memo = (gpu, key, x_dtype)
    if memo in _RESOLVED:
        return _RESOLVED[memo]
    compiled, dtype = w.device.type == "cuda", DTYPE_NAMES[x_dtype]
    store = store_for(gpu)
    hit = store.lookup(key)
    if hit is not None and invalid(hit[0], key, dtype, compiled) is None:
        result = hit
    elif _can_tune(w.device):
        from slmcompress.kernels.tune import tune_on_miss

        log.info("kernel config miss for %s on %s: tuning once", key, gpu)
        tuned = tune_on_miss(key, w, x_dtype, state.tinygemm_weight, sms)
        if tuned is None:
            result = (heuristic(key, sms), "heuristic")
        else:
            store.record(key, tuned[0], tuned[1])
            result = (tuned[0], "tuned")
    else:
        result = (heuristic(key, sms), "heuristic")
    if invalid(result[0], key, dtype, compiled) is not None:
        result = (heuristic(key, sms), "heuristic")
    _RESOLVED[memo] = result
    return result


def key_for(w: ServingWeight, m: int) -> Key:
    return Key(w.bits, w.group, w.out_features, w.in_features, m_bucket(m))


def route_for(layer, m: int, x_dtype: torch.dtype) -> tuple[Choice | None, str]:
    """The choice (and its source) that would serve ``m`` rows of ``layer``; None: no layout."""
    state = layer_state(layer)
    if state.weight is None:
        return None, state.reason
    forced = _FORCED[-1] if _FORCED else None
    if forced is not None:
        return forced, "forced"
    bucket = (m_bucket(m), x_dtype)
    if bucket not in state.choices:
        state.choices[bucket] = resolve(key_for(state.weight, m), state, x_dtype)
    return state.choices[bucket]


def matmul(x2d: torch.Tensor, layer) -> torch.Tensor | None:
    """``x2d (M, K) @ W -> (M, N)`` through the resolved route; None if the layer has no layout."""
    choice, _ = route_for(layer, x2d.shape[0], x2d.dtype)
    if choice is None:
        return None
    state = _STATES[layer]
    served[choice.label()] += 1
    return execute(choice, x2d, state.weight, state.tinygemm_weight)


def reset() -> None:
    """Forget resolved choices and call counts (tests; a benchmark between configurations)."""
    _RESOLVED.clear()
    served.clear()
    for state in list(_STATES.values()):
        state.choices.clear()
    store_for.cache_clear()
