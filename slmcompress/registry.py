"""The pass registry: YAML ``type`` (+ ``method``) -> Pass class, filled by a decorator.

Nothing here imports a pass. The built-in passes register when :mod:`slmcompress.passes`
imports them (the one import site), and the lookups live there, so whoever looks a pass
up has them all. Adding a pass = one module under ``slmcompress/passes/`` decorated with
:func:`register_pass` + its name in ``slmcompress/passes/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slmcompress.passes.base import Pass

_REGISTRY: dict[tuple[str, str | None], type[Pass]] = {}


def register_pass(type_: str, method: str | None = None):
    """Class decorator registering a Pass under ``type`` (and optionally ``method``)."""

    def decorate(cls: type[Pass]) -> type[Pass]:
        key = (type_, method)
        if key in _REGISTRY:
            raise ValueError(f"pass {type_}{'.' + method if method else ''} is registered twice")
        cls.pass_type, cls.pass_method = type_, method
        _REGISTRY[key] = cls
        return cls

    return decorate


def registered() -> Mapping[tuple[str, str | None], type[Pass]]:
    """Every registered pass by ``(type, method)`` (read-only)."""
    return MappingProxyType(_REGISTRY)
