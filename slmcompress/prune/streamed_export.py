"""Export a pruned model without ever holding the unpruned one: slice tensor by tensor.

The in-memory prune pass slices a loaded model (:func:`slmcompress.prune.slicing.slice_model`).
For a model that exceeds the memory budget the same slicing rules run over a weightless
skeleton, reading each tensor from the source shards, slicing it and appending it to the
output shard straight away, so memory holds one tensor at a time whatever the model size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from slmcompress.errors import PassError
from slmcompress.io.files import new_metadata, write_metadata
from slmcompress.prune.planner import KeepPlan, pruned_config
from slmcompress.prune.slicing import iter_sliced
from slmcompress.streaming.sharded_writer import (
    DEFAULT_SHARD_BYTES,
    copy_side_files,
    sharded_checkpoint,
)

if TYPE_CHECKING:  # handed in by the stage's residency (Residency.rewrite)
    from slmcompress.streaming.loader import WeightSource

log = logging.getLogger(__name__)


def tied_fallback(model: PreTrainedModel) -> dict[str, str]:
    """``lm_head.weight`` -> embedding name when the checkpoint stores a tied head once."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None:
        return {}
    return {f"{names[id(head)]}.weight": f"{names[id(embed)]}.weight"}


@torch.no_grad()
def export_pruned_streamed(
    skeleton: PreTrainedModel,
    source: WeightSource,
    plan: KeepPlan,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: dict[str, Any] | None = None,
    wrap: Callable[[Callable[[str], torch.Tensor]], Callable[[str], torch.Tensor]] | None = None,
) -> Path:
    """Write the pruned checkpoint of ``source`` (the input's shards) into ``out_dir``
    (atomic, sharded).

    The result is a plain float HF checkpoint: ``from_pretrained`` loads it when it fits.
    ``wrap`` may replace what is read (re-fitted consumers of a reconstructing prune).
    """
    fallback = tied_fallback(skeleton)
    shapes = {name: t.shape for name, t in skeleton.state_dict().items()}

    def read(name: str) -> torch.Tensor:
        if name in fallback:  # tied head: not stored, so not read (a meta stand-in, skipped below)
            return torch.empty(shapes[name], device="meta")
        return source.get(source.resolve(name, fallback), dtype)

    config = pruned_config(skeleton.config, plan.sizes, plan.layers)
    with torch.device("meta"):  # the shapes the pruned config implies, to check every tensor
        expected = AutoModelForCausalLM.from_config(config).state_dict()
    with sharded_checkpoint(Path(out_dir), max_shard_bytes) as writer:
        for name, tensor in iter_sliced(skeleton, plan, wrap(read) if wrap else read):
            if name in fallback:  # tied head: stored once, as from_pretrained expects
                continue
            if name not in expected or tuple(expected[name].shape) != tuple(tensor.shape):
                raise PassError(
                    f"model: pruned tensor {name} {tuple(tensor.shape)} does not match the pruned "
                    f"{type(skeleton).__name__} config"
                )
            writer.add(name, tensor)
            del tensor
        copy_side_files(source.model_dir, writer.directory)
        config.torch_dtype = str(dtype).removeprefix("torch.")
        config.to_json_file(writer.directory / "config.json")
        write_metadata(writer.directory, new_metadata(metadata, streamed=True))
    log.info("prune: streamed export written to %s", out_dir)
    return Path(out_dir)
