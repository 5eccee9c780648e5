"""Proof in llama.cpp itself: exported tiny models load, generate, and give our logits.

Needs the optional ``llamacpp`` extra (llama-cpp-python builds llama.cpp from source, 10+ min
on 2 cores), so it is a slow test and skips with a reason where the package is absent.
llama.cpp multiplies quantized weights with activations it rounds to 8 bits (Q8_0/Q8_1),
so quantized files are compared with a tolerance that covers that rounding, against our
model holding exactly the dequantized weights of the file.
"""

from __future__ import annotations

from pathlib import Path

import gguf_fixtures
import numpy as np
import pytest
import torch
from test_gguf_export import gptq_model, logits, same_weights_reference

from slmcompress.export.gguf_writer import GgufOptions, export_gguf

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python not installed (pip install 'slmcompress[llamacpp]')"
)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]
_bpe_llama = gguf_fixtures._bpe_llama
bpe_llama = gguf_fixtures.bpe_llama
bpe_tokenizer = gguf_fixtures.bpe_tokenizer

IDS = torch.randint(3, 320, (1, 32), generator=torch.Generator().manual_seed(0))


def llama_cpp_logits(path: Path, ids: torch.Tensor) -> np.ndarray:
    """Logits ``(T, V)`` of llama.cpp for every position of ``ids`` (1, T)."""
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids[0].tolist())
    scores = np.array(llm.scores[: ids.shape[1]])
    llm.close()
    return scores


@pytest.mark.parametrize(
    ("outtype", "embedding_type", "atol"),
    [("f16", "f16", 2e-3), ("q8_0", "q8_0", 2e-2), ("q4_0", "q8_0", 2e-2), ("q4_1", "q8_0", 2e-2)],
)
def test_float_export_runs_in_llama_cpp(
    tmp_path, bpe_llama, bpe_tokenizer, outtype, embedding_type, atol
):
    path = tmp_path / f"m-{outtype}.gguf"
    options = GgufOptions(outtype, embedding_type=embedding_type, pre_tokenizer="gpt-2")
    export_gguf(bpe_llama, bpe_tokenizer, path, options)
    reference = (
        bpe_llama
        if outtype == "f16"
        else same_weights_reference(bpe_llama, outtype, embedding_type)
    )
    ours = logits(reference, IDS)[0].numpy()  # (T, V)
    got = llama_cpp_logits(path, IDS)
    assert np.abs(got - ours).max() < atol
    assert (got.argmax(-1) == ours.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize(("sym", "outtype"), [(False, "q4_1"), (True, "q4_0")])
def test_gptq_export_runs_in_llama_cpp(tmp_path, bpe_llama, bpe_tokenizer, sym, outtype):
    model = gptq_model(bpe_llama, bpe_tokenizer, sym)
    path = tmp_path / "gptq.gguf"
    options = GgufOptions(outtype, embedding_type="f16", pre_tokenizer="gpt-2")
    export_gguf(model, bpe_tokenizer, path, options)
    ours = logits(model, IDS)[0].numpy()  # the GPTQ checkpoint's own forward (QuantLinear)
    got = llama_cpp_logits(path, IDS)
    assert np.abs(got - ours).max() < 2e-2


def test_tokenizer_and_generation_in_llama_cpp(tmp_path, bpe_llama, bpe_tokenizer):
    path = tmp_path / "m.gguf"
    export_gguf(bpe_llama, bpe_tokenizer, path, GgufOptions("q8_0", pre_tokenizer="gpt-2"))
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False, n_threads=1)
    text = "the quick brown fox, 123"
    assert llm.tokenize(text.encode(), add_bos=False) == bpe_tokenizer.encode(text)
    out = llm.create_completion("the quick", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    llm.close()
