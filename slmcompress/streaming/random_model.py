"""Random Llama checkpoints of any size, written shard by shard (never whole in memory).

Used by the scale benchmark and the capped-memory test: a model larger than the memory
cap of the process that later streams it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from slmcompress.streaming.sharded_writer import DEFAULT_SHARD_BYTES, sharded_checkpoint


def write_random_checkpoint(
    config: PretrainedConfig,
    target: Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
    std: float = 0.02,
) -> int:
    """Write N(0, std) weights (norms = 1) for ``config`` to ``target``; return the weight bytes."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    tied = getattr(config, "tie_word_embeddings", False)
    with sharded_checkpoint(Path(target), max_shard_bytes) as writer:
        for name, param in skeleton.named_parameters(remove_duplicate=False):
            if tied and name == "lm_head.weight":
                continue
            if name.endswith("norm.weight"):
                tensor = torch.ones(param.shape, dtype=dtype)
            else:
                tensor = (torch.randn(param.shape, generator=gen) * std).to(dtype)
            writer.add(name, tensor)
            del tensor
        config.dtype = str(dtype).removeprefix("torch.")
        (writer.directory / "config.json").write_text(config.to_json_string())
    return writer.total_bytes
