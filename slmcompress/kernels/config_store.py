"""Tuned kernel choices: shipped per GPU in the package, tuned-on-miss ones cached on disk.

Lookup order for a :class:`~slmcompress.kernels.routes.Key` on a GPU:

1. ``$SLMCOMPRESS_KERNEL_CONFIGS`` (a file in the shipped format; how a fresh tuning sweep
   is tried before it is committed);
2. the shipped file ``slmcompress/kernels/configs/<gpu-slug>.json`` (an exact slug, else the
   longest shipped slug the device's slug starts with: ``nvidia-h100`` serves
   ``nvidia-h100-80gb-hbm3``);
3. the machine's cache ``<cache>/kernels/<gpu-slug>.json`` (``$SLMCOMPRESS_CACHE`` or
   ``~/.cache/slmcompress``), written once per key when a miss is tuned, under a file lock
   and by atomic rename, and never re-tuned.

A hit costs a dict lookup: nothing is benchmarked. A file that cannot be read, or an entry
that names an unknown route, is skipped with one warning; serving never fails on it.

File format (what ``benchmarks/kernel_tune.py`` writes)::

    {"format": 1, "gpu": "NVIDIA H200", "slug": "nvidia-h200", "torch": ..., "triton": ...,
     "entries": {"b4-g128-n8192-k8192-m1": {"route": "gemv", "block_n": 256, ..., "us": 9.1}}}
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from slmcompress.fsutil import atomic_write_json
from slmcompress.io.sources import cache_dir
from slmcompress.kernels.routes import Choice, Key

log = logging.getLogger(__name__)

FORMAT = 1
SHIPPED_DIR = Path(__file__).parent / "configs"
OVERRIDE_ENV = "SLMCOMPRESS_KERNEL_CONFIGS"


def gpu_slug(name: str) -> str:
    """``NVIDIA H200`` -> ``nvidia-h200`` (file names of shipped and cached configs)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_entries(data: object, where: str) -> dict[Key, Choice]:
    """The valid entries of a config file's JSON; bad ones are skipped with a warning."""
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        log.warning("%s: not a kernel config file (no 'entries' mapping); ignored", where)
        return {}
    out: dict[Key, Choice] = {}
    for text, entry in data["entries"].items():
        try:
            key = Key.parse(text)
            out[key] = Choice.from_json(entry)
        except (ValueError, TypeError, AttributeError) as err:
            log.warning("%s: entry %s skipped: %s", where, text, err)
    return out


def read_file(path: Path) -> dict[Key, Choice]:
    """Entries of one config file ({} when it is missing or unreadable)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable kernel config (%s); ignored", path, err)
        return {}
    return parse_entries(data, str(path))


def shipped_file(slug: str, directory: Path = SHIPPED_DIR) -> Path | None:
    """The shipped file for ``slug``: exact, else the longest shipped slug that prefixes it."""
    exact = directory / f"{slug}.json"
    if exact.is_file():
        return exact
    prefixes = [p for p in directory.glob("*.json") if slug.startswith(p.stem + "-")]
    return max(prefixes, key=lambda p: len(p.stem), default=None)


class ConfigStore:
    """Choices for one GPU: override file, shipped file, then the on-disk cache."""

    def __init__(
        self, gpu_name: str, shipped_dir: Path = SHIPPED_DIR, cache_root: Path | None = None
    ) -> None:
        self.gpu_name, self.slug = gpu_name, gpu_slug(gpu_name)
        self.cache_path = (cache_root or cache_dir() / "kernels") / f"{self.slug}.json"
        shipped = shipped_file(self.slug, shipped_dir)
        override = os.environ.get(OVERRIDE_ENV)
        self.layers: list[tuple[str, dict[Key, Choice]]] = [
            ("override", read_file(Path(override)) if override else {}),
            ("shipped", read_file(shipped) if shipped else {}),
            ("cache", read_file(self.cache_path)),
        ]

    def lookup(self, key: Key) -> tuple[Choice, str] | None:
        """``(choice, source)`` for ``key``, or None on a miss."""
        for source, entries in self.layers:
            if key in entries:
                return entries[key], source
        return None

    def record(self, key: Key, choice: Choice, info: dict | None = None) -> None:
        """Add a tuned entry to the cache file (locked read-modify-write, atomic rename)."""
        from filelock import FileLock

        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.cache_path) + ".lock"):
            data = _load_json(self.cache_path) or {}
            entries = data.get("entries") if isinstance(data.get("entries"), dict) else {}
            entries[str(key)] = {**choice.to_json(), **(info or {})}
            data.update(format=FORMAT, gpu=self.gpu_name, slug=self.slug, entries=entries)
            atomic_write_json(self.cache_path, data)
        self.layers[-1][1][key] = choice


def _load_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def document(gpu_name: str, entries: dict[Key, dict], **meta: object) -> dict:
    """A config file's JSON (sorted keys): what the sweep writes and the store reads."""
    return {
        "format": FORMAT,
        "gpu": gpu_name,
        "slug": gpu_slug(gpu_name),
        **meta,
        "entries": {str(k): entries[k] for k in sorted(entries)},
    }
