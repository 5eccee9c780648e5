"""User-facing errors: one line, naming the field or file at fault.

The CLI catches :class:`SlmError` and prints ``error: <message>`` with exit code 2,
so every bad input a user can make must surface as one of these, never a traceback.
"""

from __future__ import annotations


class SlmError(Exception):
    """Base class for errors caused by user input (recipes, paths, data, models)."""


class RecipeError(SlmError):
    """The recipe file or one of its fields is invalid."""


class ModelSourceError(SlmError):
    """A model source (alias, directory, .gguf, hub id) cannot be resolved or loaded."""


class DataError(SlmError):
    """A data spec points at missing, empty or too-small data."""


class CheckpointError(SlmError):
    """A checkpoint directory is missing files, truncated or inconsistent."""


class PassError(SlmError):
    """A pass cannot run with this model/config (e.g. a shape it cannot handle)."""


class Terminated(KeyboardInterrupt):  # noqa: N818 - an interrupt, named like KeyboardInterrupt
    """SIGTERM (a job scheduler stopping the job), raised where SIGINT raises KeyboardInterrupt.

    A subclass, so every ``except KeyboardInterrupt`` path (run.json ``interrupted``,
    temp-file cleanup, the CLI's ``interrupted:`` line) treats both signals alike.
    """

    def __init__(self, signum: int = 15) -> None:
        super().__init__(f"terminated by signal {signum} (SIGTERM)")
        self.signum = signum


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text (library errors can span pages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def one_line(text: str) -> str:
    """Collapse a message onto one line, so ``error: ...`` is always exactly one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())
