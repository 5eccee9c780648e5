"""Remote-code policy: a checkpoint's own Python code never runs unless the user opts in.

transformers runs a model's ``auto_map`` modules when ``trust_remote_code`` is true, and
*asks on stdin* when it is left unset, so an unattended ``echo y |`` could execute a
downloaded ``.py``. Every slmcompress loader passes :func:`hf_kwargs` (``False`` unless the
recipe's ``trust_remote_code: true`` or the CLI's ``--trust-remote-code`` is in force) and
checks a local directory first with :func:`check_local_code`, so refusing is one clear line
instead of transformers' multi-line prompt text.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from slmcompress.errors import ModelSourceError

_ALLOWED: ContextVar[bool] = ContextVar("slmcompress_trust_remote_code", default=False)
#: how the user opts in where they are (a flag or a recipe key); None: they cannot here
_OPT_IN: ContextVar[str | None] = ContextVar("slmcompress_remote_code_opt_in", default=None)

#: the opt-in of a recipe (``run``, ``plan``, ``recipe validate``)
RECIPE_OPT_IN = "the recipe key 'trust_remote_code: true'"

#: files whose ``auto_map`` names code that transformers would import
_CODE_FILES = ("config.json", "tokenizer_config.json")


@contextlib.contextmanager
def remote_code(allowed: bool, opt_in: str | None = None) -> Iterator[None]:
    """Allow (or forbid) model-supplied code for the loads inside the block.

    ``opt_in``: how the user can allow it here (``--trust-remote-code``, or
    :data:`RECIPE_OPT_IN`), named in the refusal; a command that has no opt-in never
    advises one.
    """
    token = _ALLOWED.set(bool(allowed))
    how = _OPT_IN.set(opt_in) if opt_in is not None else None
    try:
        yield
    finally:
        _ALLOWED.reset(token)
        if how is not None:
            _OPT_IN.reset(how)


def allowed() -> bool:
    """Whether model-supplied code may run in the current context."""
    return _ALLOWED.get()


def hf_kwargs() -> dict[str, Any]:
    """Keyword arguments every ``from_pretrained`` call gets: never ``None`` (the prompt)."""
    return {"trust_remote_code": allowed()}


def check_local_code(directory: Path, what: str = "model") -> None:
    """Refuse a directory whose config or tokenizer ships code, unless opted in."""
    if allowed():
        return
    for name in _CODE_FILES:
        path = Path(directory) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError):
            continue  # an unreadable file is reported by the loader that needs it
        if isinstance(data, dict) and data.get("auto_map"):
            how = _OPT_IN.get()
            advice = (
                f"unless you opt in with {how}"
                if how
                else "and this command has no opt-in (eval, generate, teacher-cache and "
                "recipes have one)"
            )
            raise ModelSourceError(
                f"{what}: {path} names custom code (auto_map); slmcompress never runs a "
                f"checkpoint's code {advice}"
            )
