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


def streamed_importance(model_dir, tokens, work_dir, options=None, head_metric="projected_output"):
    """Minitron importance of a model on disk through the streaming loop (resumable)."""
    from dataclasses import replace

    from slmcompress.prune.importance import activation_importance_of
    from slmcompress.streaming.budget import StreamOptions
    from slmcompress.streaming.engine import StreamingRun

    options = replace(
        options or StreamOptions(batch_size=2, max_memory="8GB"),
        pass_name="importance",
        key={"importance": "minitron-activation", "head_metric": head_metric},
    )
    run = StreamingRun(Path(model_dir), tokens, torch.device("cpu"), work_dir, options)
    return activation_importance_of(run, 1, head_metric)


def streamed_gptq(gptq_pass, model_dir, ctx, options=None, tokens=None, max_layers=None):
    """GPTQ of a model on disk through the streaming loop; the checkpoint dir it wrote."""
    from dataclasses import replace

    from slmcompress.passes.base import RUNTIME_FIELDS
    from slmcompress.streaming.budget import StreamOptions
    from slmcompress.streaming.engine import StreamingRun

    cfg = gptq_pass.config
    if tokens is None:
        tokens = ctx.calibration_tokens(cfg.n_samples, cfg.seq_len)  # (N, T)
    options = replace(
        options or StreamOptions(),
        batch_size=cfg.batch_size,
        pass_name="gptq",
        key={"gptq": cfg.model_dump(exclude=RUNTIME_FIELDS)},
    )
    run = StreamingRun(Path(model_dir), tokens, ctx.device, ctx.work_dir, options, ctx.dtype)
    out = gptq_pass.quantize(run, ctx, max_layers)
    return out.path if out is not None else None


def assert_same_importance(a, b):
    for x, y in zip(a.heads + a.neurons, b.heads + b.neurons, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a.hidden, b.hidden)
    assert torch.equal(a.layers, b.layers)
    assert torch.equal(a.blocks, b.blocks)
