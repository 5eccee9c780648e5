"""The built-in passes, and the lookups over the pass registry.

Importing this package registers every built-in pass: the one import site (as torchao's
quantization package imports the modules that register its handlers). The lookups live
here, so whoever looks a pass up has them all registered; :mod:`slmcompress.registry` only
holds the table and the decorator, and imports no pass.
"""

from slmcompress.errors import RecipeError
from slmcompress.passes import bnb, distill, evaluate, export_gguf, gptq, prune, quantize_rtn
from slmcompress.passes.base import Pass
from slmcompress.registry import registered

#: the modules whose import registers the built-in passes
BUILTIN = (bnb, distill, evaluate, export_gguf, gptq, prune, quantize_rtn)


def pass_types() -> list[str]:
    """All registered ``type`` values."""
    return sorted({t for t, _ in registered()})


def methods_of(type_: str) -> list[str]:
    """Registered methods of a type (empty when the type takes no method key)."""
    return sorted(m for t, m in registered() if t == type_ and m is not None)


def streamable_passes() -> list[str]:
    """What the passes that can stream are called in messages (``quantize.gptq``, ``prune ...``)."""
    names = [
        (t + (f".{m}" if m else ""), cls.streaming_note)
        for (t, m), cls in registered().items()
        if cls.supports_streaming
    ]
    return [name + note for name, note in sorted(names, reverse=True)]


def get_pass(type_: str, method: str | None, where: str = "stage") -> type[Pass]:
    """Look up a pass class; unknown names list the valid ones in the error."""
    table = registered()
    if (type_, None) in table:
        return table[(type_, None)]
    methods = methods_of(type_)
    if not methods:
        raise RecipeError(
            f"{where}.type: unknown pass type {type_!r}; valid: {', '.join(pass_types())}"
        )
    if method is None:
        raise RecipeError(f"{where}.method: {type_} needs a method; one of {', '.join(methods)}")
    if (type_, method) not in table:
        raise RecipeError(
            f"{where}.method: unknown {type_} method {method!r}; valid: {', '.join(methods)}"
        )
    return table[(type_, method)]
