"""``slmcompress export``: happy path, and every bad input as one ``error:`` line, exit 2, no file."""

from __future__ import annotations

import errno
from pathlib import Path

import gguf
import gguf_fixtures
import pytest
import torch
from typer.testing import CliRunner

from slmcompress.cli import app
from slmcompress.io.checkpoint import save_checkpoint
from slmcompress.passes.base import Context
from slmcompress.passes.quantize_rtn import RTNConfig, RTNPass

pytestmark = pytest.mark.usefixtures("single_thread")
_bpe_llama = gguf_fixtures._bpe_llama
bpe_llama = gguf_fixtures.bpe_llama
bpe_tokenizer = gguf_fixtures.bpe_tokenizer

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["--quiet", "export", *args])


def assert_one_line_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0]
    assert "Traceback" not in result.output


def no_gguf_left(directory: Path) -> bool:
    """Neither a final .gguf nor a temp file of an interrupted write."""
    return not [p for p in directory.iterdir() if ".gguf" in p.name]


@pytest.fixture
def float_dir(tmp_path, bpe_llama, bpe_tokenizer) -> Path:
    return save_checkpoint(bpe_llama, bpe_tokenizer, tmp_path / "float")


@pytest.fixture
def rtn_g128_dir(tmp_path, bpe_llama, bpe_tokenizer) -> Path:
    ctx = Context(
        bpe_tokenizer, None, torch.device("cpu"), torch.float32, "t", None, Path(), Path()
    )
    model = RTNPass(RTNConfig(type="quantize", bits=4, group_size=128)).run(bpe_llama, ctx)
    return save_checkpoint(model, bpe_tokenizer, tmp_path / "rtn-g128")


def test_export_float_checkpoint(tmp_path, float_dir):
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    result = invoke(str(float_dir), "--out", str(out), "--type", "q8_0", "--pre-tokenizer", "gpt-2")
    assert result.exit_code == 0, result.output
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} == {"Q8_0", "F32"}
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]


def test_unknown_architecture(tmp_path, bpe_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=384, n_embd=32, n_layer=1, n_head=2))
    source = save_checkpoint(model, bpe_tokenizer, tmp_path / "gpt2")
    result = invoke(str(source), "--out", str(tmp_path / "x.gguf"))
    assert_one_line_error(result, "GGUF export does not support model_type 'gpt2'")
    assert no_gguf_left(tmp_path)


def test_group_128_cannot_map_to_q4_1(tmp_path, rtn_g128_dir):
    result = invoke(str(rtn_g128_dir), "--out", str(tmp_path / "x.gguf"), "--type", "q4_1")
    assert_one_line_error(result, "model.layers.0.self_attn.q_proj.weight: GPTQ group_size 128")
    assert no_gguf_left(tmp_path)


def test_existing_output_needs_force(tmp_path, float_dir):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"keep me")
    assert_one_line_error(invoke(str(float_dir), "--out", str(out)), "exists; pass --force")
    assert out.read_bytes() == b"keep me"
    result = invoke(str(float_dir), "--out", str(out), "--force", "--pre-tokenizer", "gpt-2")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"GGUF"


def test_unwritable_directory(tmp_path, float_dir):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = invoke(str(float_dir), "--out", str(blocker / "x.gguf"), "--pre-tokenizer", "gpt-2")
    assert_one_line_error(result, "is not a directory")


def test_disk_full_mid_write_leaves_no_file(tmp_path, float_dir, monkeypatch):
    def full_disk(self, *args, **kwargs):
        self.fout[0].write(b"\0" * 4096)  # some tensor bytes made it to disk...
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    out = tmp_path / "x.gguf"
    result = invoke(str(float_dir), "--out", str(out), "--pre-tokenizer", "gpt-2")
    assert_one_line_error(result, "No space left on device")
    assert no_gguf_left(tmp_path)


def test_unknown_format(tmp_path, float_dir):
    result = invoke(str(float_dir), "--out", str(tmp_path / "x.onnx"), "--format", "onnx")
    assert_one_line_error(result, "unknown export format 'onnx'")
