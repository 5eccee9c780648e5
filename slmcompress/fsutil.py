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


def replace_problem(target: Path, marker: str) -> str | None:
    """Why :func:`atomic_dir` must not replace ``target``, or ``None`` when it may.

    Only an empty directory or one of our own outputs (it holds ``marker``) may be
    replaced: a mistyped ``--out ~/data`` must never delete the user's files.
    """
    target = Path(target)
    if not target.exists():
        return None
    if not target.is_dir():
        return f"{target} is a file, not a directory"
    if any(target.iterdir()) and not (target / marker).is_file():
        return f"{target} is not empty and was not written by slmcompress (no {marker})"
    return None


#: the lock file an slmcompress writer holds in a directory it owns while it runs
LOCK_FILE = ".slmcompress.lock"


class DirectoryBusy(RuntimeError):
    """Another live process holds the directory's lock (``pid`` is the holder's, if known)."""

    def __init__(self, directory: Path, pid: str) -> None:
        super().__init__(f"{directory} is in use by another slmcompress process (pid {pid})")
        self.directory, self.pid = directory, pid


@contextlib.contextmanager
def exclusive_lock(directory: Path) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``directory`` itself for the block.

    The kernel drops a flock when its holder dies, so a crashed run never leaves a stale
    lock (unlike a pid file alone). Locking the directory's own descriptor, not a lock file,
    means a refused attempt writes nothing into a directory that may be the user's; the
    holder then records its pid in ``.slmcompress.lock`` so a second writer can name it.
    """
    import fcntl

    directory = Path(directory)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryBusy(directory, _lock_holder(directory / LOCK_FILE)) from None
        atomic_write_text(directory / LOCK_FILE, f"{os.getpid()}\n")
        yield directory / LOCK_FILE
    finally:
        os.close(fd)  # releases the flock


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"
