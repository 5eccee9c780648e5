"""Atomic filesystem writes: a directory or file only appears under its final name when complete.

Temporary names are unmistakably ours: ``.slmcompress-tmp.<pid>.<8 hex>.<target name>``
(:func:`tmp_name`). Cleanup (:func:`clean_stale_tmp`) deletes only entries with exactly that
shape, whose writer process is gone, that are plain files or real directories (never a
symbolic link), and a directory only if it still holds our owner marker or is empty. A
user's ``.env.old-backup`` or ``.photos.tmp-2024/`` is never taken for ours.

Nothing is ever deleted through a symbolic link: :func:`safe_rmtree` refuses a path with a
linked component below the directory we own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slmcompress.errors import SlmError, first_line

#: every temp file or directory we create starts with this (then pid, random token, target)
TMP_PREFIX = ".slmcompress-tmp"
#: kept for readers of older code: the substring every temp name of ours contains
TMP_MARKER = TMP_PREFIX
#: the file inside a temp (or trash) directory that proves it is ours until it is published
OWNER_FILE = ".slmcompress-tmp-owner"
_TMP_NAME = re.compile(r"\.slmcompress-tmp\.([1-9][0-9]{0,9})\.([0-9a-f]{8})\.(.+)", re.DOTALL)
_LABEL_BYTES = 100  # keeps a temp name under NAME_MAX (255 bytes) for any target name


class UnsafePath(SlmError):
    """A path we would delete or replace under runs through a symbolic link."""


def _label(name: str) -> str:
    """The target name as it appears in a temp name (cut to fit NAME_MAX)."""
    return name.encode("utf-8", "surrogateescape")[:_LABEL_BYTES].decode("utf-8", "ignore") or "x"


def tmp_name(target_name: str) -> str:
    """A fresh temp name for ``target_name``: fixed prefix, our pid, a random token."""
    return f"{TMP_PREFIX}.{os.getpid()}.{secrets.token_hex(4)}.{_label(target_name)}"


def parse_tmp_name(name: str) -> tuple[int, str] | None:
    """``(pid, target label)`` of one of our temp names, ``None`` for any other name."""
    match = _TMP_NAME.fullmatch(name)
    return (int(match.group(1)), match.group(3)) if match else None


def is_tmp_name(name: str) -> bool:
    """Whether ``name`` has exactly the shape of one of our temp names."""
    return parse_tmp_name(name) is not None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # our own temp files are in use, never stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's process) or cannot tell: keep it
    return True


def new_tmp_file(target: Path) -> Path:
    """Create an empty temp file beside ``target`` (exclusive create) and return its path."""
    target = Path(target)
    while True:
        path = target.parent / tmp_name(target.name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return path


def new_tmp_dir(target: Path) -> Path:
    """Create a temp directory beside ``target`` holding our owner marker; return its path."""
    target = Path(target)
    while True:
        path = target.parent / tmp_name(target.name)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        try:
            (path / OWNER_FILE).write_text(f"{os.getpid()}\n")
        except BaseException:  # a full disk: leave nothing behind
            shutil.rmtree(path, ignore_errors=True)
            raise
        return path


def _publishable(tmp: Path) -> None:
    """Drop the owner marker just before a temp directory takes its final name."""
    (tmp / OWNER_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp directory beside ``target``; rename it to ``target`` only on success.

    A crash (or exception) inside the block leaves at most a temp directory of ours (see
    :func:`tmp_name`), never a directory under the final name, so "exists" always means
    "complete". An existing ``target`` is replaced: moved into a marked trash directory
    first, so a crash mid-swap leaves something a rerun recognises and removes. A
    ``target`` that is a symbolic link is replaced as a link; what it points at is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_tmp_dir(target)
    os.chmod(tmp, 0o777 & ~_umask())  # published dirs follow the umask
    try:
        yield tmp
        _publishable(tmp)
        _fsync_tree(tmp)
        if target.exists() or target.is_symlink():
            trash = new_tmp_dir(target)
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)  # rmtree never follows links inside
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
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_tmp_file(path)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "w", encoding="utf-8") as handle:
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


def stale_tmp_entries(root: Path, target_name: str | None = None) -> list[Path]:
    """Leftovers of our interrupted atomic writes directly in ``root`` (see the module docstring).

    ``target_name``: only the temps of that target (a directory that is not ours, such as
    the folder of an ``export --out`` file, where other writers may be at work).
    """
    root = Path(root)
    if root.is_symlink() and not root.is_dir():
        return []
    try:
        entries = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    label = _label(target_name) if target_name is not None else None
    stale = []
    for entry in entries:
        parsed = parse_tmp_name(entry.name)
        if parsed is None or (label is not None and parsed[1] != label):
            continue
        if not _pid_alive(parsed[0]) and _provably_ours(entry):
            stale.append(entry)
    return stale


def _provably_ours(entry: Path) -> bool:
    """A plain file, or a real directory holding our owner marker (or nothing at all)."""
    try:
        mode = entry.lstat().st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISREG(mode):
        return True
    if not stat.S_ISDIR(mode):
        return False  # symbolic links, FIFOs, sockets: we never create those
    marker = entry / OWNER_FILE
    return (marker.is_file() and not marker.is_symlink()) or not any(entry.iterdir())


def clean_stale_tmp(root: Path, target_name: str | None = None) -> list[Path]:
    """Remove :func:`stale_tmp_entries` of ``root``; return what was removed."""
    removed = []
    for entry in stale_tmp_entries(root, target_name):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_file(target: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp file path beside ``target``; rename it to ``target`` only on success.

    For writers that open the path themselves (e.g. ``gguf.GGUFWriter``). A failure inside
    the block (an exception, a full disk) removes the temp file, so nothing incomplete is
    ever left under the final name; the temp of an earlier writer of the same target that
    was killed (``kill -9``) is removed first. With ``overwrite=False`` an existing target
    raises FileExistsError before anything is written.
    """
    target = Path(target)
    if not overwrite and target.exists():
        raise FileExistsError(errno.EEXIST, "file exists", str(target))
    clean_stale_tmp(target.parent, target.name)
    tmp = new_tmp_file(target)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- deleting safely
def linked_component(root: Path, path: Path) -> Path | None:
    """The first component of ``path`` below ``root`` that is a symbolic link, if any.

    ``root`` itself may be a link (an output directory placed on another disk is the
    user's choice); below it, every component must be a real directory or file.
    """
    root, path = Path(root), Path(path)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise UnsafePath(f"{path} is not inside {root}; slmcompress deletes only its own") from None
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            return current
    return None


def refuse_links(root: Path, path: Path, what: str = "") -> None:
    """Raise :class:`UnsafePath` (one line) if ``path`` runs through a link below ``root``."""
    link = linked_component(root, path)
    if link is not None:
        raise UnsafePath(
            f"{what}{link} is a symbolic link (to {os.readlink(link)}); slmcompress never "
            "deletes or writes scratch files through a link: make it a real directory, or "
            "point the whole output directory at the other disk"
        )


def refuse_links_inside(root: Path, tree: Path, what: str = "") -> None:
    """:func:`refuse_links` for ``tree`` and for every entry below it (no link is followed)."""
    refuse_links(root, tree, what)
    if not Path(tree).is_dir():
        return
    for parent, dirs, files in os.walk(tree, followlinks=False):
        for name in dirs + files:
            if os.path.islink(os.path.join(parent, name)):
                refuse_links(root, Path(parent) / name, what)


def safe_rmtree(path: Path, root: Path, ignore_errors: bool = False) -> None:
    """``shutil.rmtree(path)`` after checking that no component below ``root`` is a link.

    ``rmtree`` itself never follows links inside the tree; this guards the components
    above it (a ``.work`` linked to a scratch disk must not lose that disk's files).
    """
    refuse_links(root, path)
    if Path(path).exists():
        shutil.rmtree(path, ignore_errors=ignore_errors)


# ---------------------------------------------------------------- reading files we or the user wrote
def regular_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (missing, a directory, a FIFO or device), or None.

    A FIFO or ``/dev/zero`` would block or never end; they are refused before opening.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        return f"is {kind}, not a regular file"
    return None


def read_json_file(
    path: Path, what: str, error: type[SlmError] = SlmError, max_bytes: int = 1 << 30
) -> Any:
    """Parse a JSON file; every failure is one line ``<what>: <path> ...`` of type ``error``."""
    path = Path(path)
    problem = regular_file_problem(path)
    if problem:
        raise error(f"{what}: {path} {problem}")
    try:
        if path.stat().st_size > max_bytes:
            raise error(f"{what}: {path} is larger than {max_bytes} bytes")
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise error(f"{what}: {path} is not valid JSON ({first_line(exc)})") from None
    except OSError as exc:
        raise error(f"{what}: {path} cannot be read ({exc.strerror or exc})") from None


#: a short write (numpy's ``tofile``: "3145728 requested and 1114832 written") means the
#: device or the file-size limit is full; the errno is lost on the way
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def io_problem(exc: BaseException) -> str:
    """One line for an I/O failure; a full disk says so, whichever library raised it."""
    text = first_line(exc)
    errno_ = getattr(exc, "errno", None)
    full = (
        errno_ in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        or any(
            word in text for word in ("No space left", "File too large", "FileTooLarge", "quota")
        )
        or bool(_SHORT_WRITE.search(text))
    )
    if full:
        return f"disk full or file size limit hit ({text})"
    return text


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError or a library's wrapper of one) is a full disk or quota."""
    return io_problem(exc).startswith("disk full")


def replace_problem(target: Path, marker: str, outputs: frozenset[str] | None = None) -> str | None:
    """Why :func:`atomic_dir` must not replace ``target``, or ``None`` when it may.

    Only an empty directory or one of our own outputs (it holds ``marker``) may be
    replaced: a mistyped ``--out ~/data`` must never delete the user's files. With
    ``outputs`` (every name the writer produces), an earlier output that the user has
    since added files to is refused too, naming the first foreign entry.
    """
    target = Path(target)
    if not target.exists():
        return None
    if not target.is_dir():
        return f"{target} is a file, not a directory"
    names = sorted(e.name for e in target.iterdir())
    if names and not (target / marker).is_file():
        return f"{target} is not empty and was not written by slmcompress (no {marker})"
    foreign = [n for n in names if outputs is not None and n not in outputs]
    if foreign:
        return (
            f"{target} holds {foreign[0]!r}, which slmcompress did not write; replacing the "
            "directory would delete it"
        )
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
