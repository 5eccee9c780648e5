"""Versions of the libraries that shape results, recorded in every checkpoint and run."""

from __future__ import annotations

import platform
from importlib import metadata


def versions() -> dict[str, str]:
    """Installed versions of slmcompress and its key dependencies."""
    out = {"python": platform.python_version()}
    for dist in ("slmcompress", "torch", "transformers", "safetensors", "lm_eval", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
