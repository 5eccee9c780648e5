"""Explicit pass registry: YAML ``type`` (+ ``method``) -> Pass class.

Adding a pass = one module under ``slmcompress/passes/`` decorated with
:func:`register_pass` + one import line in ``slmcompress/passes/__init__.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slmcompress.errors import RecipeError

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


def _load_builtin_passes() -> None:
    import slmcompress.passes  # noqa: F401  (registers the built-in passes)


def pass_types() -> list[str]:
    """All registered ``type`` values."""
    _load_builtin_passes()
    return sorted({t for t, _ in _REGISTRY})


def methods_of(type_: str) -> list[str]:
    """Registered methods of a type (empty when the type takes no method key)."""
    _load_builtin_passes()
    return sorted(m for t, m in _REGISTRY if t == type_ and m is not None)


def streamable_passes() -> list[str]:
    """What the passes that can stream are called in messages (``quantize.gptq``, ``prune ...``)."""
    _load_builtin_passes()
    names = [
        (t + (f".{m}" if m else ""), cls.streaming_note)
        for (t, m), cls in _REGISTRY.items()
        if cls.supports_streaming
    ]
    return [name + note for name, note in sorted(names, reverse=True)]


def get_pass(type_: str, method: str | None, where: str = "stage") -> type[Pass]:
    """Look up a pass class; unknown names list the valid ones in the error."""
    _load_builtin_passes()
    if (type_, None) in _REGISTRY:
        return _REGISTRY[(type_, None)]
    methods = methods_of(type_)
    if not methods:
        raise RecipeError(
            f"{where}.type: unknown pass type {type_!r}; valid: {', '.join(pass_types())}"
        )
    if method is None:
        raise RecipeError(f"{where}.method: {type_} needs a method; one of {', '.join(methods)}")
    if (type_, method) not in _REGISTRY:
        raise RecipeError(
            f"{where}.method: unknown {type_} method {method!r}; valid: {', '.join(methods)}"
        )
    return _REGISTRY[(type_, method)]
