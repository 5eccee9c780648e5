"""Pick and run the serving path of each :class:`QuantLinear`: a kernel or plain torch.

CUDA: the Triton kernels (3/4-bit), per call through :mod:`.serving` (repacked layout, one
route per M bucket from the shipped/cached configs, tinygemm where it was tuned faster); a
layer whose groups cannot be made contiguous falls back to the GPTQ-layout kernel
(:mod:`.int4_matmul`) with a fixed launch config. CPU: torch's int4 kernel (:mod:`.cpu_int4`, codes of
<= 4 bits, shapes it accepts), else ``torch-cached`` (dequantized once and kept: float speed
and float memory, e.g. 8-bit). Triton is imported only when its kernel is chosen, so the
package works without it. ``SLMCOMPRESS_KERNEL`` overrides the choice: ``torch`` (the
reference: dequantize per call, no kernel), ``triton`` (use it wherever the bit width is
supported, CPU tensors included when ``TRITON_INTERPRET=1``; how the tests run the kernel
without a GPU), ``auto`` (default).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import weakref
from collections import Counter
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from slmcompress.kernels import cpu_int4
from slmcompress.quant.quant_linear import QuantLinear

log = logging.getLogger(__name__)

KERNEL_ENV = "SLMCOMPRESS_KERNEL"
KERNEL_BITS = (3, 4)
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (key, PackedWeight)
_CPU_PACKED: weakref.WeakKeyDictionary = (
    weakref.WeakKeyDictionary()
)  # layer -> (key, CpuInt4Weight)


def triton_available() -> bool:
    """Triton installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's CPU interpreter is on (must be set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_mode(force: bool = False) -> str:
    """``auto``, ``triton`` or ``torch`` from ``force`` and ``SLMCOMPRESS_KERNEL``."""
    mode = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"{KERNEL_ENV}={mode!r}: use auto, triton or torch")
    return "triton" if force and mode == "auto" else mode


def explain_backend(
    layer: QuantLinear, device: torch.device | str, force: bool = False
) -> tuple[str, str]:
    """``(backend, reason)`` for ``layer`` on ``device``.

    Backends: ``triton-int3``/``triton-int4``, ``cpu-int4``, ``torch-cached`` (CPU), ``torch``.
    """
    device = torch.device(device)
    mode = kernel_mode(force)
    if mode == "torch":
        return "torch", f"{KERNEL_ENV}=torch"
    if device.type == "cpu" and not (mode == "triton" and interpreting()):
        return explain_cpu_backend(layer)
    if layer.bits not in KERNEL_BITS:
        return "torch", f"no {layer.bits}-bit Triton kernel (supported: {KERNEL_BITS})"
    if not triton_available():
        return "torch", "triton is not installed"
    if device.type != "cuda" and not (mode == "triton" and interpreting()):
        return (
            "torch",
            "no CUDA device (the kernel runs on CPU only forced under TRITON_INTERPRET=1)",
        )
    return f"triton-int{layer.bits}", "forced" if mode == "triton" else "CUDA + Triton"


def explain_cpu_backend(layer: QuantLinear) -> tuple[str, str]:
    """``cpu-int4`` where torch's int4 kernel serves the layer exactly, else ``torch-cached``."""
    if not cpu_int4.available():
        return "torch-cached", "this torch has no int4 CPU kernel; dequantized once"
    layout, reason = cpu_int4.plan_layout(layer.g_idx, layer.bits, layer.out_features)
    if layout is None:
        return "torch-cached", f"{reason}; dequantized once"
    return "cpu-int4", reason


def choose_backend(layer: QuantLinear, device: torch.device | str, force: bool = False) -> str:
    """The backend name only (see :func:`explain_backend` for why)."""
    return explain_backend(layer, device, force)[0]


def set_backends(model: nn.Module, force: bool = False) -> dict[str, int]:
    """Set ``backend`` on every QuantLinear of ``model``; returns how many layers got each.

    Logs one info line per distinct (backend, reason), e.g. why 8-bit layers stay on torch.
    Also repacks each Triton layer into the serving layout (:mod:`.serving`), so the first
    forward (or a CUDA-graph capture) does no host synchronisation, and converts each
    ``cpu-int4`` layer once.
    """
    counts: Counter[str] = Counter()
    reasons: Counter[tuple[str, str]] = Counter()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            backend, reason = explain_backend(module, module.qweight.device, force)
            module.backend, module.matmul = backend, quant_matmul
            if backend.startswith("triton"):
                _prepare_triton(module)
            elif backend == "cpu-int4":
                cpu_weight(module)  # convert now: first-token latency and timings stay clean
            counts[backend] += 1
            reasons[(f"{backend} ({module.bits}-bit)", reason)] += 1
    for (backend, reason), count in reasons.items():
        log.info("%d quantized layers -> %s: %s", count, backend, reason)
    return dict(counts)


def prepare_for_serving(model: nn.Module) -> dict[str, int]:
    """Pick the fastest backend per quantized layer; returns how many layers got each.

    Triton kernel on CUDA; on CPU torch's int4 kernel, or a dequantized copy made once where
    it cannot serve (8-bit, odd shapes). Float models: ``{}``. Idempotent.
    """
    return set_backends(model) or {}


def _prepare_triton(layer: QuantLinear) -> None:
    """Repack for the serving kernels; a layer they cannot take gets the GPTQ-layout kernel."""
    from slmcompress.kernels import serving

    state = serving.layer_state(layer)
    if state.weight is None:
        log.info("layer %dx%d: %s; generic GPTQ kernel", layer.in_features, layer.out_features,
                 state.reason)  # fmt: skip
        packed_weight(layer)


def group_layout(g_idx: torch.Tensor, group_size: int, in_features: int) -> tuple[int, int]:
    """``(g_mode, group_size)`` for the kernel: ``i // group_size`` (one group: a huge size) or gather."""
    from slmcompress.kernels.int4_matmul import G_GATHER, G_UNIFORM, SINGLE_GROUP

    g_idx = g_idx.to("cpu", torch.int64)
    if bool((g_idx == 0).all()):
        return G_UNIFORM, SINGLE_GROUP
    if group_size > 0 and torch.equal(
        g_idx, torch.arange(in_features, device=g_idx.device) // group_size
    ):
        return G_UNIFORM, group_size
    return G_GATHER, 1


def packed_weight(layer: QuantLinear):
    """The layer's tensors as an ``int4_matmul.PackedWeight`` (group layout cached per layer)."""
    from slmcompress.kernels.int4_matmul import PackedWeight

    key = (
        layer.qweight.data_ptr(),
        layer.g_idx.data_ptr(),
        layer.g_idx._version,
        layer.scales.data_ptr(),
    )
    cached = _PACKED.get(layer)
    if cached is not None and cached[0] == key:
        return cached[1]
    g_mode, group_size = group_layout(layer.g_idx, layer.group_size, layer.in_features)
    packed = PackedWeight(
        layer.qweight,
        layer.qzeros,
        layer.scales,
        layer.g_idx,
        layer.bits,
        layer.in_features,
        layer.out_features,
        g_mode,
        group_size,
    )
    _PACKED[layer] = (key, packed)
    return packed


def cpu_weight(layer: QuantLinear) -> cpu_int4.CpuInt4Weight:
    """The layer converted for the int4 CPU kernel, once (redone if its tensors change)."""
    tensors = (layer.qweight, layer.qzeros, layer.scales, layer.g_idx)
    key = tuple((t.data_ptr(), t._version) for t in tensors)
    cached = _CPU_PACKED.get(layer)
    if cached is not None and cached[0] == key:
        return cached[1]
    layout, reason = cpu_int4.plan_layout(layer.g_idx, layer.bits, layer.out_features)
    if layout is None:
        raise ValueError(f"cpu-int4 backend on a layer the kernel cannot serve: {reason}")
    weight = cpu_int4.convert(layer.qweight, layer.qzeros, layer.scales, layer.bits, layout)
    _CPU_PACKED[layer] = (key, weight)
    return weight


def quant_matmul(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """``x (..., K) @ dequant(W)`` -> ``(..., N)`` through ``layer.backend`` (bias not added)."""
    if layer.backend == "cpu-int4" and x.device.type == "cpu":
        return cpu_int4.matmul(x, cpu_weight(layer), layer.out_features)
    if layer.backend.startswith("triton") and not (x.is_cuda or interpreting()):
        return F.linear(x, layer.dequantize(x.dtype))  # a kernel layer whose input is on CPU
    if not layer.backend.startswith("triton") or layer.bits not in KERNEL_BITS:
        return F.linear(x, layer.dequantize(x.dtype))  # the reference (e.g. cpu-int4 off CPU)
    from slmcompress.kernels import serving

    x2d = x.reshape(-1, layer.in_features)  # (M, K)
    out = serving.matmul(x2d, layer)  # (M, N)
    if out is None:  # groups the serving layout cannot hold: GPTQ-layout kernel, no autotune
        out = _generic_matmul(x2d, layer)
    return out.reshape(*x.shape[:-1], layer.out_features)


def _generic_matmul(x2d: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """The GPTQ-layout kernel with its bucket's first config (never ``@triton.autotune``)."""
    from slmcompress.kernels import int4_matmul as km

    m = x2d.shape[0]
    config = None
    if not interpreting() and m <= km.DENSE_MIN_M:
        config = km.bucket_configs(km.m_bucket(m), layer.bits)[0]
    return km.quant_matmul(x2d, packed_weight(layer), config=config)


def backend_for_layer(bits: int | None, out_features: int, g_idx: torch.Tensor) -> str:
    """The backend a QuantLinear of this shape would use here, with the dispatcher's reason.

    Used by ``slmcompress inspect`` (no QuantLinear is built: the dispatcher reads only these).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layer = SimpleNamespace(bits=bits, out_features=out_features, g_idx=g_idx)
    backend, reason = explain_backend(layer, device)
    return f"{backend} ({reason})"
