"""Streamed forward (issue #16): whole-model results with one decoder layer resident.

Streamed perplexity and top-k logits must equal the in-memory model's, for float and GPTQ
checkpoints, whatever the lm_head row chunking; a crash mid-way resumes after the last
finished layer; the streamed teacher cache equals the in-memory one.
"""

from __future__ import annotations

import math

import pytest
import torch
from _stream_utils import random_tokens, small_config, write_sharded_model
from safetensors.torch import load_file

from slmcompress.data import EvalSpec, eval_tokens
from slmcompress.distill.teacher_cache import build_streamed_teacher_cache, build_teacher_cache
from slmcompress.eval.perplexity import perplexity
from slmcompress.eval.streamed import streamed_perplexity
from slmcompress.io.checkpoint import load_checkpoint
from slmcompress.io.load import open_streaming_model
from slmcompress.streaming import loader
from slmcompress.streaming.budget import StreamOptions
from slmcompress.streaming.forward import head_rows, nll_head, streamed_forward, top_k_head

CPU = torch.device("cpu")
OPTIONS = StreamOptions(batch_size=2, max_memory="8GB", pass_name="forward")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fwd") / "m"
    model = write_sharded_model(directory, small_config(num_hidden_layers=4))
    return directory, model


def _reference_nll(model, tokens):
    logits = model(input_ids=tokens).logits.float()  # (N, T, V)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
    )
    return nll.view(tokens.shape[0], -1)  # (N, T-1)


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 4 * 1000 * 5])  # all rows / 5 rows a chunk
def test_streamed_nll_and_top_k_equal_in_memory(sharded, tmp_path, chunk_bytes):
    directory, model = sharded
    tokens = random_tokens(n=6, t=16)
    stream = open_streaming_model(directory, torch.float32)
    rows = streamed_forward(
        stream, tokens, nll_head, CPU, tmp_path / "nll", OPTIONS, chunk_bytes=chunk_bytes
    )
    nll = rows["nll"].view(6, 16)
    assert torch.allclose(nll[:, :-1], _reference_nll(model, tokens), atol=1e-5)
    assert torch.all(nll[:, -1] == 0)  # the last token of a window predicts nothing

    top = streamed_forward(stream, tokens, top_k_head(8), CPU, tmp_path / "top", OPTIONS)
    expected = model(input_ids=tokens).logits.float().topk(8, dim=-1)
    assert torch.equal(top["indices"].view(6, 16, 8), expected.indices.to(torch.int32))
    assert torch.allclose(top["values"].view(6, 16, 8), expected.values, atol=1e-5)


def test_head_rows_bound_the_logits_chunk():
    assert head_rows(262_144, 256 * 2**20) == 256  # Gemma-3's vocabulary: 256 rows = 256 MiB
    assert head_rows(10**9, 1) == 1


def test_a_crash_resumes_after_the_last_finished_layer(sharded, tmp_path, monkeypatch):
    directory, model = sharded
    tokens = random_tokens(n=4, t=16, seed=3)
    real_load = loader.StreamingModel.load_layer
    loaded: list[int] = []

    def crash_at_2(self, index, device):
        if index == 2:
            raise RuntimeError("killed")
        return real_load(self, index, device)

    monkeypatch.setattr(loader.StreamingModel, "load_layer", crash_at_2)
    with pytest.raises(RuntimeError, match="killed"):
        streamed_forward(
            open_streaming_model(directory, torch.float32),
            tokens,
            nll_head,
            CPU,
            tmp_path / "w",
            OPTIONS,
        )

    def counting(self, index, device):
        loaded.append(index)
        return real_load(self, index, device)

    monkeypatch.setattr(loader.StreamingModel, "load_layer", counting)
    rows = streamed_forward(
        open_streaming_model(directory, torch.float32),
        tokens,
        nll_head,
        CPU,
        tmp_path / "w",
        OPTIONS,
    )
    assert loaded == [2, 3]  # layers 0 and 1 were not computed again
    assert torch.allclose(rows["nll"].view(4, 16)[:, :-1], _reference_nll(model, tokens), atol=1e-5)


def test_streamed_perplexity_of_a_gptq_checkpoint(tmp_path, tiny_model_dir, tokenizer):
    """A quantized checkpoint streams through QuantLinear layers to the loader's perplexity."""
    from conftest import write_recipe

    from slmcompress.recipe import load_recipe
    from slmcompress.runner import run_recipe

    stages = [{"type": "quantize", "method": "rtn", "name": "w4", "bits": 4, "group_size": 32}]
    run_recipe(
        load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), stages, tmp_path / "o"))
    )
    checkpoint = tmp_path / "o" / "01-w4"
    spec = EvalSpec(max_tokens=512, seq_len=128)
    model, _ = load_checkpoint(checkpoint)
    expected = perplexity(model, eval_tokens(tokenizer, spec), spec.seq_len)
    got = streamed_perplexity(checkpoint, tokenizer, spec, CPU, torch.float32, tmp_path / "s")
    assert got.n_predictions == expected.n_predictions
    assert math.isclose(got.ppl, expected.ppl, rel_tol=1e-5)


def test_streamed_teacher_cache_equals_the_in_memory_cache(tmp_path, tiny_model_dir, tokenizer):
    from slmcompress.data import DataSpec
    from slmcompress.io.load import load_model

    spec = DataSpec(source="c4")
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    common = {"shard_size": 2, "show_progress": False}
    build_teacher_cache(loaded.model, tokenizer, spec, 64, 8, tmp_path / "mem", 5, **common)
    build_streamed_teacher_cache(
        tiny_model_dir, tokenizer, spec, 64, 8, tmp_path / "str", 5,
        device=CPU, dtype=torch.float32, max_memory="8GB", **common,
    )  # fmt: skip
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        a, b = load_file(tmp_path / "mem" / name), load_file(tmp_path / "str" / name)
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["indices"], b["indices"])
        assert torch.allclose(a["values"], b["values"], atol=1e-5)
    assert not (tmp_path / "str" / ".work").exists()


def test_distill_from_a_teacher_over_the_budget_streams_its_cache(tmp_path, tokenizer):
    """The teacher never loads: a top-k cache is streamed first, and the student trains on it
    to the same result as with the teacher in memory."""
    import json

    from conftest import write_recipe

    from slmcompress.errors import SlmError
    from slmcompress.recipe import load_recipe
    from slmcompress.runner import run_recipe
    from slmcompress.streaming.budget import should_stream

    teacher = tmp_path / "teacher"
    write_sharded_model(
        teacher,
        small_config(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=4),
        max_shard_bytes=4_000_000,
        tokenizer=tokenizer,
    )
    student = tmp_path / "student"
    write_sharded_model(
        student, small_config(vocab_size=49152, num_hidden_layers=2), tokenizer=tokenizer
    )
    budget = str(should_stream(teacher, "1TB").model_bytes - 1)
    assert not should_stream(student, budget).stream
    stage = {
        "type": "distill", "name": "kd", "top_k": 16, "max_steps": 3, "seq_len": 64,
        "eval_every": 0, "save_every": 0,
    }  # fmt: skip

    def run(name, stages, **extra):
        recipe = write_recipe(
            tmp_path / f"{name}.yaml", str(student), stages, tmp_path / name,
            teacher=str(teacher), **extra,
        )  # fmt: skip
        return run_recipe(load_recipe(recipe))

    streamed = run("s", [stage], max_memory=budget)
    in_memory = run("m", [stage])

    def report(result):
        return json.loads((result.stages[0].directory / "report.json").read_text())

    assert report(streamed)["extra"]["distill"]["teacher"].startswith("cache:")
    assert report(in_memory)["extra"]["distill"]["teacher"] == str(teacher)
    assert report(streamed)["metrics"]["wikitext2_ppl"] == pytest.approx(
        report(in_memory)["metrics"]["wikitext2_ppl"], rel=1e-4
    )
    without_top_k = {k: v for k, v in stage.items() if k != "top_k"}
    with pytest.raises(SlmError, match=r"stages\[0\]\.top_k: the teacher .* is over the memory"):
        run("e", [without_top_k], max_memory=budget)


def test_eval_cli_streams_a_model_over_its_budget(tiny_model_dir):
    import json

    from typer.testing import CliRunner

    from slmcompress.cli import app
    from slmcompress.streaming.budget import should_stream

    budget = str(should_stream(tiny_model_dir, "1TB").model_bytes - 1)
    args = ["--quiet", "eval", str(tiny_model_dir), "--tasks", "", "--no-speed", "--json"]
    args += ["--ppl-tokens", "512", "--seq-len", "128"]
    streamed = CliRunner().invoke(app, [*args, "--max-memory", budget])
    in_memory = CliRunner().invoke(app, args)
    assert streamed.exit_code == 0 and in_memory.exit_code == 0, streamed.output
    s, m = json.loads(streamed.stdout), json.loads(in_memory.stdout)
    assert s["streamed"] and not m["streamed"]
    assert s["metrics"]["wikitext2_ppl"] == pytest.approx(m["metrics"]["wikitext2_ppl"], rel=1e-5)
    assert s["summary"]["params"] == m["summary"]["params"]
