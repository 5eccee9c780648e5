"""Publishing a streamed stage: its tokenizer, and moving its sharded output into place.

A streamed pass returns a :class:`~slmcompress.layerwise.WrittenCheckpoint` under its work
dir; the runner moves those files into the stage's temp dir (a rename per file, so a 70B
result is never copied or loaded) and merges the stage metadata.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from slmcompress.errors import PassError
from slmcompress.io.files import new_metadata, read_metadata, write_metadata
from slmcompress.io.remote_code import hf_kwargs


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a checkpoint (streamed stages never load the model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, **hf_kwargs())


def move_streamed_checkpoint(
    streamed: Path | None, target: Path, metadata: dict[str, Any], work_dir: Path
) -> None:
    """Put a pass's sharded output into the stage's temp dir; merge the stage metadata.

    Output the pass wrote under ``work_dir`` is moved (a rename per file). A checkpoint
    outside it (a pass that changed nothing) is hard-linked or copied: the input directory
    is never touched.
    """
    if streamed is None or not (Path(streamed) / "config.json").is_file():
        raise PassError("streaming: the pass returned no streamed checkpoint to move into place")
    streamed = Path(streamed).resolve()
    owned = streamed.is_relative_to(Path(work_dir).resolve())
    meta = read_metadata(streamed)
    for path in streamed.iterdir():
        if not path.is_file():
            continue
        if owned:
            os.replace(path, Path(target) / path.name)
        elif path.name not in ("report.json", "report.md"):
            try:
                os.link(path, Path(target) / path.name)
            except OSError:  # another filesystem
                shutil.copy2(path, Path(target) / path.name)
    meta.update(new_metadata(metadata))
    write_metadata(
        target, meta
    )  # replaces a hard link to the input's file, never writes through it
    if owned:
        shutil.rmtree(streamed, ignore_errors=True)
