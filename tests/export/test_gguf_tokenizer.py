"""Our tokenizer metadata vs the SmolLM2 GGUF that llama.cpp's own converter wrote.

The built-in smollm2-135m ships as a llama.cpp-made GGUF; its HF tokenizer was rebuilt from
that file by transformers. Writing it back must reproduce llama.cpp's tokenizer fields:
tokens, token types, merges, special ids, add_bos, pre-tokenizer and chat template.
"""

from __future__ import annotations

import gguf
import pytest
from transformers import AutoTokenizer

from slmcompress.export.gguf_tokenizer import write_tokenizer
from slmcompress.io.sources import builtin_gguf_path, builtin_model_dir

FIELDS = [
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
]


def read_fields(path) -> dict:
    fields = gguf.GGUFReader(path).fields
    return {key: fields[key].contents() for key in FIELDS if key in fields}


@pytest.fixture(scope="module")
def reference() -> dict:
    return read_fields(builtin_gguf_path("smollm2-135m"))


def test_tokenizer_fields_match_llama_cpp_converter(tmp_path, reference):
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir("smollm2-135m"))
    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    assert write_tokenizer(writer, tokenizer, 49152) == "smollm"  # detected by hash
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = read_fields(path)
    for key in FIELDS:
        assert ours.get(key) == reference.get(key), key
