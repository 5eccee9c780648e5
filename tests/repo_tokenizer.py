"""A byte-level BPE tokenizer trained in-process on the repo's own text (no download).

For machines without the built-in models' cache (a bare GPU machine runs the ``gpu`` tests
and ``benchmarks/gpu_check.py`` with random weights and no hub): the tokenizer is trained
on ``slmcompress/data_files/wikitext2/valid.txt`` (calibration is c4, evaluation the
wikitext-2 test rows, so training text and eval text stay disjoint as KD requires). Its
pre-tokenizer is GPT-2's byte-level split, which llama.cpp knows as ``gpt-2`` (GGUF export
needs ``pre_tokenizer: gpt-2``: the vocabulary's hash is not in llama.cpp's table).

Deterministic: the same merges on every machine for the same text and vocabulary size.
Benchmarks import it with ``tests/`` on ``sys.path``, like ``random_models``.
"""

from __future__ import annotations

import functools
from pathlib import Path

from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "slmcompress" / "data_files" / "wikitext2" / "valid.txt"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: llama.cpp's name for this tokenizer's pre-tokenizer
PRE_TOKENIZER = "gpt-2"


@functools.cache
def repo_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A ``vocab_size``-token byte-level BPE (ids 0-2 special: endoftext, im_start, im_end)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = TEXT.read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.name_or_path = f"repo-bpe-{vocab_size}"  # the data token cache keys on it
    return fast
