"""Offline teacher cache: layout, resume after a kill, and cached-KD == live-KD on a batch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from slmcompress.cli.teacher_cache import parse_data_spec, teacher_cache_command
from slmcompress.data import DataSpec, packed_sequences
from slmcompress.distill import teacher_cache as tc
from slmcompress.distill.losses import LOSSES, top_k_logits
from slmcompress.distill.teacher_cache import TeacherCache, build_teacher_cache
from slmcompress.errors import DataError, PassError

SEQ, K = 32, 8
SPEC = DataSpec(source="c4")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher() -> LlamaForCausalLM:
    torch.manual_seed(7)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def _build(teacher, tokenizer, out, n=6, **kwargs):
    return build_teacher_cache(
        teacher,
        tokenizer,
        SPEC,
        SEQ,
        K,
        out,
        n,
        batch_size=2,
        shard_size=4,
        show_progress=False,
        **kwargs,
    )


def test_layout_and_manifest(tmp_path, teacher, tokenizer):
    _build(teacher, tokenizer, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_sequences"] == 6 and manifest["top_k"] == K
    assert [s["count"] for s in manifest["shards"]] == [4, 2]
    assert not (tmp_path / "manifest.partial.json").exists()
    cache = TeacherCache(tmp_path, verify=True)
    assert torch.equal(cache.tokens(), packed_sequences(tokenizer, SPEC, SEQ)[:6])


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_cached_kd_equals_live_kd_on_the_same_batch(tmp_path, teacher, tokenizer, loss):
    _build(teacher, tokenizer, tmp_path)
    cache = TeacherCache(tmp_path)
    ids = torch.tensor([5, 0, 3])  # crosses a shard boundary, out of order
    input_ids = cache.tokens()[ids]  # (B, T)
    torch.manual_seed(0)
    student_logits = torch.randn(3, SEQ, tokenizer.vocab_size)  # (B, T, V)
    with torch.no_grad():
        live = top_k_logits(teacher(input_ids=input_ids).logits, K)
    cached = cache.targets(ids)
    torch.testing.assert_close(cached.values, live.values)
    assert torch.equal(cached.indices, live.indices)
    fn = LOSSES[loss]
    assert fn(student_logits, cached, 2.0).item() == pytest.approx(
        fn(student_logits, live, 2.0).item(), rel=1e-6
    )


def test_bfloat16_values_are_close(tmp_path, teacher, tokenizer):
    _build(teacher, tokenizer, tmp_path, n=2, values_dtype="bfloat16")
    cache = TeacherCache(tmp_path)
    student = torch.randn(2, SEQ, tokenizer.vocab_size)
    with torch.no_grad():
        live = top_k_logits(teacher(input_ids=cache.tokens()).logits, K)
    exact = LOSSES["forward_kl"](student, live).item()
    assert LOSSES["forward_kl"](
        student, cache.targets(torch.tensor([0, 1]))
    ).item() == pytest.approx(exact, rel=1e-2)


def test_resume_after_kill_skips_written_shards(tmp_path, teacher, tokenizer, monkeypatch):
    calls = []
    real = tc.teacher_top_k

    def dies_on_second_shard(model, ids, top_k, batch_size):
        calls.append(ids.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, ids, top_k, batch_size)

    monkeypatch.setattr(tc, "teacher_top_k", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _build(teacher, tokenizer, tmp_path)
    assert (tmp_path / "manifest.partial.json").is_file() and not (
        tmp_path / "manifest.json"
    ).exists()
    with pytest.raises(DataError, match="incomplete"):
        TeacherCache(tmp_path)
    calls.clear()
    monkeypatch.setattr(tc, "teacher_top_k", real)
    _build(teacher, tokenizer, tmp_path)
    reference = tmp_path / "ref"
    _build(teacher, tokenizer, reference)
    for name in ("shard-00000.safetensors", "shard-00001.safetensors"):
        assert tc.file_sha256(tmp_path / name) == tc.file_sha256(reference / name)


def test_other_settings_in_same_dir_is_an_error(tmp_path, teacher, tokenizer):
    _build(teacher, tokenizer, tmp_path, n=2)
    with pytest.raises(DataError, match="other settings .*top_k"):
        build_teacher_cache(teacher, tokenizer, SPEC, SEQ, K + 1, tmp_path, 2, show_progress=False)


def test_corrupt_shard_detected(tmp_path, teacher, tokenizer):
    _build(teacher, tokenizer, tmp_path, n=2)
    shard = tmp_path / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"xxxxxxxx")
    with pytest.raises(DataError, match="corrupt"):
        TeacherCache(tmp_path, verify=True)


def test_check_compatible(tmp_path, teacher, tokenizer):
    _build(teacher, tokenizer, tmp_path, n=2)
    cache = TeacherCache(tmp_path)
    cache.check_compatible(tokenizer, SEQ, "stages[0]")
    with pytest.raises(PassError, match=r"stages\[0\]\.seq_len"):
        cache.check_compatible(tokenizer, SEQ * 2, "stages[0]")


def test_cli_function(tmp_path, tiny_model_dir):
    cache = teacher_cache_command(
        str(tiny_model_dir),
        "c4",
        4,
        tmp_path / "c",
        seq_len=SEQ,
        n_sequences=3,
        device="cpu",
        dtype="float32",
        show_progress=False,
    )
    assert cache.n_sequences == 3 and cache.manifest["top_k"] == 4
    with pytest.raises(DataError, match="--data: uses the evaluation data"):
        teacher_cache_command(str(tiny_model_dir), "wikitext2:test", 4, tmp_path / "d", seq_len=SEQ)
    assert parse_data_spec("wikitext2:validation") == DataSpec(
        source="wikitext2", split="validation"
    )
