"""Fixtures for GGUF export tests (imported by the test modules: a conftest here would shadow the root one): a tiny byte-level BPE tokenizer and a tiny Llama using it.

A 384-token vocabulary keeps GGUF files small and readers fast (the real 49k vocabulary
costs ~10 s per GGUFReader pass); its pre-tokenizer is llama.cpp's ``gpt-2``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_VOCAB = 384  # > the tokenizer's size: the tail is written as [PAD{i}] UNUSED tokens
# the root conftest's tiny Llama, with this file's vocabulary (importing it here would shadow it)
TINY_CONFIG = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def _train_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["the quick brown fox jumps over the lazy dog", "hello world, 123 tokens"] * 50
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A 320-token byte-level BPE tokenizer (ids 0-2 special) trained in-process."""
    return _train_tokenizer()


@pytest.fixture(scope="session")
def _bpe_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).eval()


@pytest.fixture
def bpe_llama(_bpe_llama) -> LlamaForCausalLM:
    """A fresh copy of a seeded tiny Llama (tied embeddings, GQA 4/2, vocab 384)."""
    return copy.deepcopy(_bpe_llama)
