"""Per-layer resume: a killed calibration run restarts from its last finished layer.

Layout under ``<work_dir>/stream/``::

    state.json          {"key": {...}, "key_hash": ..., "finished": n, "num_layers": L}
    layers/00000.safetensors   pass result of each finished layer (codes, scores, ...)
    act-00005/          inputs of layer ``finished`` (the next one to run)

Commit order after layer i: result file (temp + rename) -> next inputs ``act-{i+1}``
(temp dir + rename) -> ``state.json`` (atomic) -> delete ``act-{i}``. A crash between any
two steps leaves ``state.json`` pointing at a boundary whose files are all present, so the
restarted run redoes at most the layer it was in.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from slmcompress.errors import PassError
from slmcompress.fsutil import atomic_write_json, read_json_file
from slmcompress.io.files import read_header

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


def key_hash(key: dict[str, Any]) -> str:
    """Stable short hash of everything that determines a layer's result."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokens_digest(tokens: torch.Tensor) -> str:
    """Hash of the calibration ids (different data must not resume old activations)."""
    data = tokens.to("cpu", torch.int64).contiguous().numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


class ResumeState:
    """The on-disk progress of one streaming run."""

    def __init__(self, root: Path, key: dict[str, Any], num_layers: int) -> None:
        self.root = Path(root)
        self.key, self.hash, self.num_layers = key, key_hash(key), num_layers
        self.finished = 0
        self._load_or_create()

    def _load_or_create(self) -> None:
        path = self.root / STATE_FILE
        if not path.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            self._save()
            return
        state = read_json_file(path, "resume", PassError)
        if (
            not isinstance(state, dict)
            or not isinstance(state.get("finished"), int)
            or not isinstance(state.get("key", {}), dict)
        ):
            raise PassError(
                f"resume: {path} is not a resume state (no 'finished' count); delete "
                f"{self.root} to start over"
            )
        if state.get("key_hash") != self.hash:
            diff = sorted(
                k
                for k in set(state.get("key", {})) | set(self.key)
                if state.get("key", {}).get(k) != self.key.get(k)
            )
            raise PassError(
                f"resume: {self.root} holds a run with a different configuration "
                f"(differs in: {', '.join(diff) or 'key'}); delete that directory to start over"
            )
        self.finished = int(state["finished"])
        if (
            self.finished
            and not self.activations_dir(self.finished).is_dir()
            and self.finished < self.num_layers
        ):
            raise PassError(
                f"resume: {self.root}: inputs of layer {self.finished} are missing; delete it to start over"
            )
        if self.finished:
            log.info(
                "resuming after %d/%d finished layers from %s",
                self.finished,
                self.num_layers,
                self.root,
            )

    def _save(self) -> None:
        atomic_write_json(
            self.root / STATE_FILE,
            {
                "key": self.key,
                "key_hash": self.hash,
                "finished": self.finished,
                "num_layers": self.num_layers,
            },
        )

    # ------------------------------------------------------------ paths
    def activations_dir(self, layer: int) -> Path:
        return self.root / f"act-{layer:05d}"

    def result_path(self, layer: int) -> Path:
        return self.root / "layers" / f"{layer:05d}.safetensors"

    # ------------------------------------------------------------ results
    def save_result(
        self, layer: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> None:
        """Write one layer's pass result atomically (temp file + rename)."""
        path = self.result_path(layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        try:
            save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta or {}, default=str)})
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            what = "disk full" if exc.errno == errno.ENOSPC else "cannot write"
            raise PassError(
                f"{what} while saving the result of layer {layer} to {path}: {exc.strerror or exc}"
            ) from exc

    def load_result(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata saved for ``layer``."""
        path = self._existing_result(layer)
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {}).get("meta", "{}"))
                return {k: handle.get_tensor(k) for k in handle.keys()}, meta
        except (OSError, ValueError, SafetensorError) as exc:
            raise PassError(
                f"resume: result of layer {layer} ({path}) cannot be read ({exc}); delete "
                f"{self.root} to start over"
            ) from None

    def load_meta(self, layer: int) -> dict[str, Any]:
        """Only the metadata saved for ``layer`` (its header; no tensor is read)."""
        _, header = read_header(self._existing_result(layer))
        return json.loads(header.get("__metadata__", {}).get("meta", "{}"))

    def _existing_result(self, layer: int) -> Path:
        path = self.result_path(layer)
        if not path.is_file():
            raise PassError(f"resume: result of layer {layer} is missing ({path})")
        return path

    # ------------------------------------------------------------ progress
    def mark_finished(self, layer: int) -> None:
        """Layer ``layer`` is done: its result and the next layer's inputs are on disk."""
        if layer != self.finished:
            raise PassError(
                f"resume: layer {layer} finished out of order (expected {self.finished})"
            )
        self.finished = layer + 1
        self._save()
        old = self.activations_dir(layer)
        if old.exists():
            import shutil

            shutil.rmtree(old, ignore_errors=True)
