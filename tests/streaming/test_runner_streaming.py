"""A recipe over a model above ``max_memory`` runs streamed end to end and matches in-memory.

The runner never loads the over-budget model: prune and GPTQ get weightless skeletons,
stream layer by layer, and their sharded outputs are moved into the stage directories;
perplexity is measured by a streamed forward (tasks and speed are skipped, with the reason
in the report). The same recipe without the budget
runs in memory; every checkpoint tensor must be identical.
"""

from __future__ import annotations

import json

import pytest
import torch
from _stream_utils import small_config, write_sharded_model
from conftest import write_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from slmcompress.io.checkpoint import load_checkpoint
from slmcompress.recipe import load_recipe
from slmcompress.runner import run_recipe
from slmcompress.streaming.budget import should_stream

PRUNE = {
    "type": "prune",
    "name": "mlp",
    "target": {"ffn_hidden_size": 64},
    "depth_metric": "cosine",
}
GPTQ = {"type": "quantize", "name": "w4", "method": "gptq", "bits": 4, "group_size": 32}
EVAL = {"type": "eval", "name": "final"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("over-budget") / "m"
    config = small_config(
        vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=6
    )
    write_sharded_model(directory, config, max_shard_bytes=2_000_000, tokenizer=tokenizer)
    return directory


def _tensors(directory):
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _assert_same_tensors(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


def _run_both(model_dir, tmp_path, stages):
    """The recipe just over budget (streamed) and without a budget (in memory)."""
    budget = str(should_stream(model_dir, "1TB").model_bytes - 1)  # a layer fits easily
    streamed = run_recipe(
        load_recipe(
            write_recipe(
                tmp_path / "s.yaml", str(model_dir), stages, tmp_path / "s", max_memory=budget
            )
        )
    )
    in_memory = run_recipe(
        load_recipe(write_recipe(tmp_path / "m.yaml", str(model_dir), stages, tmp_path / "m"))
    )
    return streamed, in_memory


def _report(directory):
    return json.loads((directory / "report.json").read_text())


def test_over_budget_gptq_streams_and_its_streamed_ppl_matches_in_memory(model_dir, tmp_path):
    streamed, in_memory = _run_both(model_dir, tmp_path, [GPTQ, EVAL])

    def ppl(directory):
        return _report(directory)["metrics"]["wikitext2_ppl"]

    input_report = _report(tmp_path / "s" / "00-input")
    assert ppl(tmp_path / "s" / "00-input") == pytest.approx(
        ppl(tmp_path / "m" / "00-input"), rel=1e-4
    )
    assert input_report["metrics"]["tokens_per_s"] is None  # needs the model resident
    assert any(
        "perplexity was measured by a streamed forward" in w for w in input_report["warnings"]
    )
    for outcome, reference in zip(streamed.stages, in_memory.stages, strict=True):
        # the quantized model is still over the (float) budget: its ppl is streamed too
        report = _report(outcome.directory)
        assert ppl(outcome.directory) == pytest.approx(ppl(reference.directory), rel=1e-4)
        assert any(w.startswith("not evaluated: task accuracy") for w in report["warnings"])
        # typed, not parsed back from the warning: why, and the warning that says so
        assert "exceeds the budget" in report["not_evaluated"]["reason"]
        assert report["not_evaluated"]["warning"] in report["warnings"]

    gptq_s, gptq_m = streamed.stages[0].directory, in_memory.stages[0].directory
    assert json.loads((gptq_s / "slmcompress.json").read_text())["streamed"] is True
    _assert_same_tensors(gptq_s, gptq_m)
    quant = _report(gptq_s)["model"]["arch"]["quantization"]
    assert quant["bits"] == 4 and quant["quantized_linears"] == 6 * 7
    assert _report(gptq_s)["model"]["bytes_on_disk"] > 0
    ids = torch.tensor([[1, 2, 3, 4]])
    quantized, _ = load_checkpoint(gptq_s)
    reference, _ = load_checkpoint(gptq_m)
    assert torch.equal(quantized(ids).logits, reference(ids).logits)
    assert _report(gptq_m)["metrics"]["wikitext2_ppl"] > 1  # in memory: evaluated


def test_over_budget_prune_streams_then_the_smaller_model_is_evaluated(model_dir, tmp_path):
    streamed, in_memory = _run_both(model_dir, tmp_path, [PRUNE, GPTQ])
    prune_s, prune_m = streamed.stages[0].directory, in_memory.stages[0].directory
    assert json.loads((prune_s / "slmcompress.json").read_text())["streamed"] is True
    _assert_same_tensors(prune_s, prune_m)
    pruned = AutoModelForCausalLM.from_pretrained(prune_s)  # plain transformers reloads it
    assert pruned.config.intermediate_size == 64
    # the pruned model fits the budget: it is evaluated, and GPTQ runs on it in memory
    assert _report(prune_s)["metrics"]["wikitext2_ppl"] == pytest.approx(
        _report(prune_m)["metrics"]["wikitext2_ppl"], rel=1e-5
    )
    _assert_same_tensors(streamed.stages[1].directory, in_memory.stages[1].directory)


@pytest.mark.parametrize(
    ("stage", "name"),
    [
        ({"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32}, "quantize.rtn"),
        # changes nothing but reads every weight (Pass.needs_weights): refused up front too
        ({"type": "export", "outtype": "f32", "runtime_eval": "off"}, "export"),
    ],
)
def test_over_budget_model_refuses_a_pass_that_cannot_stream(model_dir, tmp_path, stage, name):
    from slmcompress.errors import SlmError

    need = should_stream(model_dir, "1TB").model_bytes
    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml", str(model_dir), [stage], tmp_path / "o", max_memory=str(need - 1)
        )
    )
    with pytest.raises(SlmError, match=f"{name} cannot stream it; only quantize.gptq and prune"):
        run_recipe(recipe)
    assert not list((tmp_path / "o").glob("01-*"))


def test_a_streamed_prune_that_changes_nothing_leaves_its_input_intact(model_dir, tmp_path):
    """The pass hands back the skeleton of its input: the runner must link, never move."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(model_dir, source)
    before = sorted(p.name for p in source.iterdir())
    budget = str(should_stream(source, "1TB").model_bytes - 1)
    noop = {"type": "prune", "target": {"ffn_hidden_size": 256}, "depth_metric": "cosine"}
    result = run_recipe(
        load_recipe(
            write_recipe(
                tmp_path / "r.yaml", str(source), [noop], tmp_path / "o", max_memory=budget
            )
        )
    )
    assert sorted(p.name for p in source.iterdir()) == before
    _assert_same_tensors(result.stages[0].directory, source)
    assert any("nothing pruned" in w for w in _report(result.stages[0].directory)["warnings"])


def test_budget_check_does_not_stream_architectures_it_does_not_know(tmp_path):
    from transformers import GPT2Config

    (tmp_path / "gpt2").mkdir()
    GPT2Config(n_layer=2, n_embd=64, n_head=4).to_json_file(tmp_path / "gpt2" / "config.json")
    decision = should_stream(tmp_path / "gpt2", "1KB")
    assert not decision.stream and "not understood" in decision.reason


def test_raising_max_memory_evaluates_the_stages_that_were_skipped(model_dir, tmp_path):
    budget = str(should_stream(model_dir, "1TB").model_bytes - 1)
    out = tmp_path / "o"
    recipe = write_recipe(tmp_path / "r.yaml", str(model_dir), [GPTQ], out, max_memory=budget)
    first = run_recipe(load_recipe(recipe))
    streamed_ppl = _report(first.stages[0].directory)["metrics"]["wikitext2_ppl"]
    assert _report(first.stages[0].directory)["metrics"]["tokens_per_s"] is None
    checkpoint = _tensors(first.stages[0].directory)

    recipe = write_recipe(tmp_path / "r.yaml", str(model_dir), [GPTQ], out, max_memory="64GB")
    second = run_recipe(load_recipe(recipe))
    assert second.stages[0].status == "skipped"  # the pass did not run again ...
    report = _report(second.stages[0].directory)
    # ... but its checkpoint was evaluated in memory, to the streamed perplexity
    assert report["metrics"]["wikitext2_ppl"] == pytest.approx(streamed_ppl, rel=1e-4)
    assert not any(w.startswith("not evaluated") for w in report["warnings"])
    assert report["not_evaluated"] is None
    assert _report(out / "00-input")["metrics"]["wikitext2_ppl"] > 1
    after = _tensors(second.stages[0].directory)
    assert set(after) == set(checkpoint) and all(
        torch.equal(after[k], checkpoint[k]) for k in after
    )
    assert not (out / ".work").exists() or not any((out / ".work").iterdir())
