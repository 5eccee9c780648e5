"""A second device on a CPU-only machine, for tests of device correctness (issue #24).

The ``meta`` device catches a tensor created on the CPU and combined with a caller's tensor
(the same error CUDA raises), but a meta tensor has no values: ``.item()``, ``.tolist()``,
``bool(t)`` and data-dependent shapes fail on it, and nothing can be compared with a CPU
result. :func:`simulated_device` adds what meta lacks: inside it, :func:`to_sim` gives a
tensor that *reports* ``device='meta'`` but holds real CPU values, and a dispatch mode

* refuses an op mixing such a tensor with a non-scalar CPU tensor, with CUDA's message
  (a 0-dim CPU tensor is allowed, as CUDA allows CPU scalars; ``copy_``/``.to`` cross).
  Stricter than CUDA in one respect: CUDA indexes a device tensor with CPU indices (a
  hidden host-to-device copy and sync); here that fails too;
* sends factories asked for ``device=x.device`` (meta) to the simulated device;
* lets ``.item()``/``.tolist()``/``.cpu()`` work as on CUDA, and ``.numpy()`` fail as on CUDA.

So a function that is device-correct runs unchanged and its results can be compared bit
for bit with the CPU run. Not part of the library; tests import it from ``tests/``.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

SIM = torch.device("meta")
#: transformers' switch for the optional hub kernels (see :func:`simulated_device`)
HUB_KERNELS_ENV = "USE_HUB_KERNELS"
#: ops that legitimately take tensors from two devices (copies between them)
_CROSSING = ("copy_", "_to_copy", "_copy_from", "lift_fresh", "_has_compatible_shallow_copy_type")


class SimTensor(torch.Tensor):
    """A CPU tensor that reports ``device='meta'`` (see the module docstring)."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> SimTensor:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            device=SIM,
            requires_grad=inner.requires_grad,
        )

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    def __repr__(self) -> str:  # type: ignore[override]
        return f"SimTensor({self.inner!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:  # reads values without dispatching an op
            return args[0].inner.tolist()
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


class _SimMode(TorchDispatchMode):
    """Routes every op (factories included) through :func:`_dispatch` while active."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


class _SimFactories(TorchFunctionMode):
    """``torch.tensor(data, device=meta)`` never reaches a dispatch mode: catch it here."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _on_sim(kwargs.get("device")):
            return SimTensor(func(*args, **{**kwargs, "device": "cpu"}))
        return func(*args, **kwargs)


def _on_sim(device: Any) -> bool:
    return device is not None and torch.device(device).type == "meta"


def _dispatch(func, args: tuple, kwargs: dict) -> Any:
    leaves, _ = tree_flatten((args, kwargs))
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    sim = [t for t in tensors if isinstance(t, SimTensor)]
    host = [t for t in tensors if not isinstance(t, SimTensor) and t.dim() > 0]
    if sim and host and not func.__name__.startswith(_CROSSING):
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"meta (simulated) and {host[0].device}! ({func})"
        )
    wrap = bool(sim)
    if "device" in kwargs:  # factories and .to(): the device asked for decides
        wrap = _on_sim(kwargs["device"])
        if wrap:
            kwargs = {**kwargs, "device": torch.device("cpu")}
    wrappers = {id(t.inner): t for t in sim}  # in place / out=: the caller's tensor comes back
    args, kwargs = tree_map(lambda t: t.inner if isinstance(t, SimTensor) else t, (args, kwargs))
    out = func(*args, **kwargs)

    def rewrap(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) in wrappers:
            return wrappers[id(t)]
        return SimTensor(t) if wrap else t

    return tree_map(rewrap, out)


@contextlib.contextmanager
def simulated_device() -> Iterator[None]:
    """While active, ``meta`` means the simulated device (real values) for every factory.

    Hugging Face hub kernels (the optional ``kernels`` package, used by models loaded while
    it is installed) pick an implementation per device type and refuse ``meta``; they are
    switched off (``USE_HUB_KERNELS=NO``) for models loaded inside, which then run their
    torch code as on a machine without that package.
    """
    from unittest import mock

    with mock.patch.dict(os.environ, {HUB_KERNELS_ENV: "NO"}), _SimFactories(), _SimMode():
        yield


def to_sim(value: Any) -> Any:
    """``value`` (a tensor, module, or nested tuple/list/dict of tensors) on the simulated device.

    Call inside :func:`simulated_device`. A module is copied first (``module.to`` would move
    the caller's module in place), then moved like ``module.to(device)``.
    """
    if isinstance(value, nn.Module):
        return copy.deepcopy(value).to(SIM)
    return tree_map(lambda t: t.to(SIM) if isinstance(t, torch.Tensor) else t, value)


def from_sim(value: Any) -> Any:
    """The CPU values of a simulated tensor (or nested structure); other values unchanged."""
    return tree_map(lambda t: t.inner if isinstance(t, SimTensor) else t, value)


def is_sim(tensor: Any) -> bool:
    """Whether ``tensor`` lives on the simulated device."""
    return isinstance(tensor, SimTensor)
