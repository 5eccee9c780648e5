"""Atomic filesystem writes: a directory or file only appears under its final name when complete."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARKER = ".tmp-"


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp directory beside ``target``; rename it to ``target`` only on success.

    A crash (or exception) inside the block leaves at most a ``.<name>.tmp-*`` directory,
    never a directory under the final name, so "exists" always means "complete".
    An existing ``target`` is replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARKER}", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; published dirs follow the umask
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    """Flush file contents so a rename never publishes data still in the page cache only."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARKER}", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON (sorted, indented) atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def clean_stale_tmp(root: Path) -> None:
    """Remove leftovers of interrupted atomic writes below ``root`` (one level)."""
    if not Path(root).is_dir():
        return
    for entry in Path(root).iterdir():
        if entry.name.startswith(".") and (TMP_MARKER in entry.name or ".old-" in entry.name):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(target: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp file path beside ``target``; rename it to ``target`` only on success.

    For writers that open the path themselves (e.g. ``gguf.GGUFWriter``). A failure inside
    the block (an exception, a full disk) removes the temp file, so nothing incomplete is
    ever left under the final name. With ``overwrite=False`` an existing target raises
    FileExistsError before anything is written.
    """
    target = Path(target)
    if not overwrite and target.exists():
        raise FileExistsError(errno.EEXIST, "file exists", str(target))
    fd, name = tempfile.mkstemp(prefix=f".{target.name}{TMP_MARKER}", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
