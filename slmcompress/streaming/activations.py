"""Calibration activations between decoder layers: in memory up to a budget, on disk beyond.

For a 70B model, 128 x 2048 calibration tokens at hidden 8192 are 4.3 GB (bf16) per layer
boundary, and the layer loop holds two boundaries at once (inputs being read, outputs
being written). ``activation_offload`` picks where they live:

- ``cpu``: all in host memory (fastest; the in-memory engine's behaviour);
- ``disk``: every batch in a safetensors file under the work dir, read back one at a time;
- ``auto``: memory until the store's byte budget is spent, disk for the rest.

With ``persist=True`` every batch is also written to disk so a killed run can resume from
this boundary; a store's directory is written under a temp name and renamed by
:meth:`ActivationStore.commit`, so a directory under its final name is always complete.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slmcompress.errors import PassError
from slmcompress.layerwise import LayerBatch

log = logging.getLogger(__name__)

OffloadMode = Literal["auto", "cpu", "disk"]
TMP_SUFFIX = ".partial"


class ActivationStore(Sequence[torch.Tensor]):
    """The hidden states ``(B, T, H)`` of every calibration batch at one layer boundary."""

    def __init__(
        self,
        directory: Path | None,
        mode: OffloadMode = "auto",
        budget_bytes: int | None = None,
        persist: bool = False,
    ) -> None:
        if mode != "cpu" and directory is None:
            raise PassError(f"activation_offload={mode!r} needs a work directory to spill to")
        self.directory, self.mode, self.persist = directory, mode, persist
        self.budget = budget_bytes if mode == "auto" else (None if mode == "cpu" else 0)
        self._memory: dict[int, torch.Tensor] = {}
        self._count = 0
        self._bytes_in_memory = 0
        self._committed = False

    # ------------------------------------------------------------ writing
    def append(self, hidden: torch.Tensor) -> None:
        """Add the next batch; keep it in memory while the budget allows, write it otherwise."""
        index = self._count
        nbytes = hidden.numel() * hidden.element_size()
        keep = self.budget is None or self._bytes_in_memory + nbytes <= self.budget
        if self.persist or not keep:
            self._write(index, hidden)
        if keep:
            self._memory[index] = hidden
            self._bytes_in_memory += nbytes
        self._count += 1

    def _write(self, index: int, hidden: torch.Tensor) -> None:
        tmp = self._tmp_dir()
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            save_file({"hidden": hidden.contiguous()}, str(tmp / _batch_file(index)))
        except OSError as exc:
            self.discard()
            what = "disk full" if exc.errno == errno.ENOSPC else "cannot write"
            raise PassError(
                f"{what} while spilling calibration activations to {tmp}: {exc.strerror or exc}"
            ) from exc

    def commit(self) -> None:
        """Publish the on-disk copy under its final name (the resume point of this boundary)."""
        if self._committed or self.directory is None or not self._tmp_dir().exists():
            self._committed = True
            return
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self._tmp_dir().rename(self.directory)
        self._committed = True

    def drop_memory(self) -> None:
        self._memory.clear()
        self._bytes_in_memory = 0

    def discard(self) -> None:
        """Delete this store's files (temp and final) and drop its memory."""
        self._memory.clear()
        for path in (self._tmp_dir(), self.directory):
            if path is not None and path.exists():
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------ reading
    @classmethod
    def open(
        cls, directory: Path, mode: OffloadMode = "auto", budget_bytes: int | None = None
    ) -> ActivationStore:
        """A committed store on disk (resume); batches are read lazily."""
        store = cls(directory, mode, budget_bytes, persist=True)
        store._count = len(list(directory.glob("b*.safetensors")))
        store._committed = True
        return store

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(index)
        if index in self._memory:
            return self._memory[index]
        path = self._current_dir() / _batch_file(index)
        try:
            return load_file(str(path))["hidden"]
        except (OSError, SafetensorError, KeyError) as exc:
            raise PassError(
                f"resume: spilled activations {path} cannot be read ({exc}); delete "
                f"{path.parent.parent} to start the stage over"
            ) from None

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(self._count))

    def bytes_in_memory(self) -> int:
        return self._bytes_in_memory

    def _tmp_dir(self) -> Path:
        assert self.directory is not None
        return self.directory.with_name(self.directory.name + TMP_SUFFIX)

    def _current_dir(self) -> Path:
        return self.directory if self._committed else self._tmp_dir()


def _batch_file(index: int) -> str:
    return f"b{index:06d}.safetensors"


class BatchView(Sequence[LayerBatch]):
    """``LayerStep.inputs`` backed by a store: one batch materialised at a time."""

    def __init__(self, store: Sequence[torch.Tensor], kwargs: list[dict[str, Any]]) -> None:
        if len(store) != len(kwargs):
            raise PassError(
                f"activations: {len(store)} stored batches but {len(kwargs)} batch kwargs"
            )
        self.store, self.kwargs = store, kwargs

    def __len__(self) -> int:
        return len(self.kwargs)

    def __getitem__(self, index: int) -> LayerBatch:  # type: ignore[override]
        return LayerBatch(self.store[index], self.kwargs[index])

    def __iter__(self) -> Iterator[LayerBatch]:
        return (self[i] for i in range(len(self)))
