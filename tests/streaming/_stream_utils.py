"""Helpers shared by the streaming tests: tiny sharded models and a CPU context."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slmcompress.streaming.sharded_writer import save_state_sharded


def small_config(**overrides) -> LlamaConfig:
    """A tiny Llama with a small vocabulary (random-token tests need no tokenizer)."""
    params = dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def write_sharded_model(
    directory: Path,
    config: LlamaConfig,
    max_shard_bytes: int = 100_000,
    tokenizer=None,
    seed: int = 0,
) -> LlamaForCausalLM:
    """Save a seeded random model as several shards (+ index); return the in-memory model."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    save_state_sharded(
        state, directory, max_shard_bytes, extra_files={"config.json": config.to_json_string()}
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return model


def random_tokens(n: int = 6, t: int = 16, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))  # (N, T)
