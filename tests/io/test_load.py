"""Model sources: the built-in real model, local dirs, .gguf, hub ids, and their errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from slmcompress.errors import SlmError
from slmcompress.io.checkpoint import save_checkpoint
from slmcompress.io.load import load_model
from slmcompress.io.sources import BUILTIN_MODELS, builtin_gguf_path, resolve_dtype


def test_builtin_model_is_the_real_smollm2(real_model):
    cfg = real_model.model.config
    assert (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    ) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings
    assert sum(p.numel() for p in real_model.model.parameters()) == 134_515_008
    assert getattr(cfg, "quantization_config", None) is None
    assert builtin_gguf_path("smollm2-135m").name == BUILTIN_MODELS["smollm2-135m"].gguf_file


def test_builtin_model_answers_a_factual_prompt(real_model):
    tok = real_model.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    out = real_model.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1] :])


def test_saved_checkpoint_reloads_with_plain_transformers(real_model, tmp_path):
    save_checkpoint(real_model.model, real_model.tokenizer, tmp_path / "ckpt", {"stage": "test"})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    ids = real_model.tokenizer("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, real_model.model(ids).logits)
    assert (tmp_path / "ckpt" / "slmcompress.json").is_file()
    assert not list((tmp_path / "ckpt").glob("*.bin"))


def test_local_dir_and_gguf_sources(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert loaded.model.config.hidden_size == 64 and loaded.local_dir == tiny_model_dir
    gguf = load_model(str(builtin_gguf_path("smollm2-135m")), dtype="float32", device="cpu")
    assert gguf.model.config.num_hidden_layers == 30


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("./no/such/model", "model: path ./no/such/model does not exist"),
        ("/tmp/does-not-exist.gguf", "does not exist"),
        (
            "someorg/some-model-that-is-not-cached",
            "cannot load hub id 'someorg/some-model-that-is-not-cached'",
        ),
    ],
)
def test_bad_sources_give_one_line_errors(source, message):
    with pytest.raises(SlmError) as info:
        load_model(source, device="cpu")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_dir_without_config(tmp_path):
    with pytest.raises(SlmError, match="has no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(SlmError, match="dtype"):
        resolve_dtype("float128")


@pytest.mark.slow
def test_second_builtin_is_the_real_gemma3_270m():
    """Assembled from four chunk packages (sha256 checked) and converted once; a real model:
    Gemma 3's shape, sensible text, a WikiText-2 perplexity a broken conversion would not get."""
    from slmcompress.data import EvalSpec, eval_tokens
    from slmcompress.eval.perplexity import perplexity

    loaded = load_model("gemma3-270m", dtype="float32", device="cpu")
    cfg = loaded.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim, cfg.vocab_size) == (
        18,
        640,
        256,
        262144,
    )
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 1)
    assert "sliding_attention" in cfg.layer_types
    path = builtin_gguf_path("gemma3-270m")
    assert path.with_name(path.name + ".sha256").read_text().strip() == (
        BUILTIN_MODELS["gemma3-270m"].sha256
    )
    tok = loaded.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    out = loaded.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "France" in tok.decode(out[0][ids["input_ids"].shape[1] :])
    ppl = perplexity(loaded.model, eval_tokens(tok, EvalSpec(max_tokens=1024, seq_len=512)), 512)
    assert 5 < ppl.ppl < 150, ppl  # 61.5 on the first 2,048 tokens
