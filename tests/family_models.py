"""Tiny random models of every supported decoder family, built from each real config class.

Sizes are shrunk so a test runs in seconds on CPU, but every layout quirk stays: Phi-3's
fused qkv/gate_up, Qwen2's q/k/v biases, Qwen3/Gemma 3's per-head q/k norms with a head_dim
that is not hidden/heads, Gemma's scaled embeddings, four norms and mixed sliding/full
layers (a window shorter than the calibration sequences, so the masks really differ), tied
and untied heads. The vocabulary is the real tokenizer's, so calibration data works.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 49152
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def family_config(name: str) -> PretrainedConfig:
    """The tiny config of family ``name`` (its real config class)."""
    if name == "llama":
        return LlamaConfig(**COMMON, head_dim=16, tie_word_embeddings=True)
    if name == "mistral":
        return MistralConfig(**COMMON, head_dim=16, tie_word_embeddings=False)
    if name == "qwen2":  # q/k/v biases
        return Qwen2Config(**COMMON, tie_word_embeddings=False)
    if name == "qwen3":  # q/k norms, head_dim 24 != 64 / 4
        return Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=True)
    if name == "gemma3":
        return Gemma3TextConfig(
            **COMMON,
            head_dim=32,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            tie_word_embeddings=True,
        )
    if name == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(**COMMON, tie_word_embeddings=False)
    raise KeyError(name)


FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")


def family_model(name: str, seed: int = 0) -> PreTrainedModel:
    """A seeded random tiny model of the family; norms randomised so slicing errors show."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name)).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.add_(0.2 * torch.randn_like(param))
            elif "bias" in pname:
                param.normal_(0, 0.1)
    return model
