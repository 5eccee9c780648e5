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

#: files whose ``auto_map`` names code that transformers would import
_CODE_FILES = ("config.json", "tokenizer_config.json")


@contextlib.contextmanager
def remote_code(allowed: bool) -> Iterator[None]:
    """Allow (or forbid) model-supplied code for the loads inside the block."""
    token = _ALLOWED.set(bool(allowed))
    try:
        yield
    finally:
        _ALLOWED.reset(token)


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
            raise ModelSourceError(
                f"{what}: {path} names custom code (auto_map); slmcompress never runs a "
                "checkpoint's code unless you opt in with the recipe key "
                "'trust_remote_code: true' or --trust-remote-code"
            )
