"""Tokenizer metadata (``tokenizer.ggml.*``, chat template) as llama.cpp's converter writes it.

Only byte-level BPE tokenizers (llama.cpp's ``gpt2`` tokenizer model: SmolLM, Llama 3,
Qwen2, ...) are handled. llama.cpp picks its pre-tokenizer regex from
``tokenizer.ggml.pre``, which the converter identifies by hashing the token ids of a fixed
probe text; the table of known hashes ships in ``pretokenizers.json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import gguf
from transformers import PreTrainedTokenizerBase

from slmcompress.errors import PassError

_TABLE = Path(__file__).with_name("pretokenizers.json")


@functools.cache
def _pretokenizer_table() -> dict[str, Any]:
    return json.loads(_TABLE.read_text(encoding="utf-8"))


def pretokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """llama.cpp's ``chkhsh``: sha256 of the token ids of its probe text."""
    ids = tokenizer.encode(_pretokenizer_table()["chktxt"])
    return hashlib.sha256(str(ids).encode()).hexdigest()


def detect_pretokenizer(tokenizer: PreTrainedTokenizerBase, override: str | None) -> str:
    """``tokenizer.ggml.pre``: the override, else the known name of this tokenizer's hash."""
    if override:
        if override not in _pretokenizer_table()["names"]:
            raise PassError(
                f"pre_tokenizer: llama.cpp does not know {override!r} "
                "(e.g. gpt-2, llama-bpe, qwen2, smollm; see export/pretokenizers.json)"
            )
        return override
    digest = pretokenizer_hash(tokenizer)
    name = _pretokenizer_table()["hashes"].get(digest)
    if name is None:
        raise PassError(
            f"tokenizer: pre-tokenizer not recognised (llama.cpp hash {digest[:12]}...); "
            "name llama.cpp's pre-tokenizer with pre_tokenizer / --pre-tokenizer "
            "(e.g. llama-bpe, qwen2, smollm)"
        )
    return name


def _check_byte_level_bpe(tokenizer: PreTrainedTokenizerBase) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    is_bpe = (spec.get("model") or {}).get("type") == "BPE"
    if not is_bpe or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise PassError(
            "tokenizer: GGUF export handles byte-level BPE tokenizers only (llama.cpp 'gpt2'); "
            f"this one is {type(tokenizer).__name__} with model {(spec.get('model') or {}).get('type')}"
        )


def vocab_tokens(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int
) -> tuple[list[str], list[int]]:
    """Tokens by id and their types, padded to the model's vocab size (``get_vocab_base``)."""
    reverse = {idx: tok for tok, idx in tokenizer.get_vocab().items()}
    if reverse and max(reverse) >= vocab_size:
        raise PassError(
            f"tokenizer: has token id {max(reverse)} but the model's vocab_size is {vocab_size}"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding prepends BOS; measured, since configs disagree about where it is set."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def write_tokenizer(
    writer: gguf.GGUFWriter,
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    pre_tokenizer: str | None = None,
) -> str:
    """Write tokens, types, merges, special ids, add_bos and the chat template; return ``pre``."""
    _check_byte_level_bpe(tokenizer)
    pre = detect_pretokenizer(tokenizer, pre_tokenizer)
    tokens, types = vocab_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="slm-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)  # SpecialVocab reads merges/specials/template from files
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    special.add_special_token = {"bos": adds_bos(tokenizer), "eos": False}
    special.add_to_gguf(writer, quiet=True)
    return pre
