"""``type: distill`` on tiny random Llamas: training, resume, cache, bad input, shipped recipe."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from pydantic import ValidationError
from transformers import LlamaForCausalLM

import slmcompress.distill.trainer as trainer_module
from slmcompress.data import DataSpec
from slmcompress.distill.teacher_cache import build_teacher_cache
from slmcompress.errors import DataError, PassError, SlmError
from slmcompress.passes.distill import DistillConfig, DistillPass
from slmcompress.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random teacher (different weights from the ``tiny_llama`` student)."""
    directory = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(1)
    LlamaForCausalLM(tiny_llama_config(hidden_size=96, intermediate_size=192)).save_pretrained(
        directory
    )
    tokenizer.save_pretrained(directory)
    return directory


def _config(**overrides) -> DistillConfig:
    params = dict(
        type="distill",
        max_steps=4,
        seq_len=32,
        micro_batch_size=2,
        lr=2e-3,
        eval_every=2,
        eval_tokens=256,
        save_every=2,
        temperature=1.0,
    )
    params.update(overrides)
    return DistillConfig(**params)


def _run(config: DistillConfig, student, make_ctx, work: Path):
    ctx = make_ctx(work_dir=work)
    work.mkdir(parents=True, exist_ok=True)
    return DistillPass(config).run(student, ctx), ctx


def test_trains_towards_the_teacher_and_reports(tiny_llama, make_ctx, teacher_dir, tmp_path):
    before = copy.deepcopy(tiny_llama.state_dict())
    model, ctx = _run(_config(teacher=str(teacher_dir)), tiny_llama, make_ctx, tmp_path / "w")
    info = ctx.extra_metrics["distill"]
    assert (
        info["steps"] == 4
        and info["train_tokens"] == 4 * 2 * 32
        and info["teacher"] == str(teacher_dir)
    )
    assert info["final_loss"] < info["first_loss"]
    assert [tokens for tokens, _ in info["eval_ppl_curve"]] == [128, 256]
    assert Path(ctx.artifacts["loss_curve.png"]).read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads(Path(ctx.artifacts["train_history.json"]).read_text())) == 4
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not torch.equal(
        model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"]
    )


def test_max_tokens_sets_the_step_count(tiny_llama, make_ctx, teacher_dir, tmp_path):
    config = _config(
        teacher=str(teacher_dir), max_steps=None, max_tokens=150, save_every=0, eval_every=0
    )
    _, ctx = _run(config, tiny_llama, make_ctx, tmp_path / "w")
    assert ctx.extra_metrics["distill"]["steps"] == 3  # ceil(150 / 64)


@pytest.mark.slow
def test_pass_resumes_after_a_kill(tiny_llama, make_ctx, teacher_dir, tmp_path, monkeypatch):
    config = _config(teacher=str(teacher_dir), max_steps=4, save_every=1, eval_every=0)
    start = copy.deepcopy(tiny_llama)
    _, ref_ctx = _run(config, copy.deepcopy(start), make_ctx, tmp_path / "ref")
    reference = json.loads(Path(ref_ctx.artifacts["train_history.json"]).read_text())

    real_save, saves = trainer_module.save_training_state, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the process dies right after the step-2 checkpoint

    monkeypatch.setattr(trainer_module, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(config, copy.deepcopy(start), make_ctx, tmp_path / "run")
    monkeypatch.setattr(trainer_module, "save_training_state", real_save)
    _, ctx = _run(config, copy.deepcopy(start), make_ctx, tmp_path / "run")
    assert ctx.extra_metrics["distill"]["resumed_from_step"] == 2
    resumed = json.loads(Path(ctx.artifacts["train_history.json"]).read_text())
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference], rel=1e-6)


def test_resume_with_another_student_is_refused(tiny_llama, make_ctx, teacher_dir, tmp_path):
    config = _config(teacher=str(teacher_dir), max_steps=2, save_every=1, eval_every=0)
    _run(config, copy.deepcopy(tiny_llama), make_ctx, tmp_path / "w")
    torch.manual_seed(5)
    other = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(
        PassError, match=r"stages\[0\]: .*different recipe/config \(differs in student\)"
    ):
        _run(config, other, make_ctx, tmp_path / "w")


def test_teacher_cache_trains_without_loading_a_teacher(
    tiny_llama, make_ctx, teacher_dir, tokenizer, tmp_path, monkeypatch
):
    teacher = LlamaForCausalLM.from_pretrained(teacher_dir).eval()
    cache = build_teacher_cache(
        teacher,
        tokenizer,
        DataSpec(source="c4"),
        32,
        16,
        tmp_path / "cache",
        8,
        show_progress=False,
    )

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher must not be loaded")

    monkeypatch.setattr("slmcompress.io.load.load_model", no_teacher)
    config = _config(teacher_cache=str(cache), top_k=8, eval_every=0, save_every=0)
    _, ctx = _run(config, tiny_llama, make_ctx, tmp_path / "w")
    assert ctx.extra_metrics["distill"]["teacher"].startswith("cache:")
    ce_config = _config(alpha=1.0, eval_every=0, save_every=0)
    _, ctx = _run(ce_config, LlamaForCausalLM(tiny_llama_config()), make_ctx, tmp_path / "ce")
    assert ctx.extra_metrics["distill"]["teacher"].startswith("none")


def test_config_validation():
    with pytest.raises(ValidationError, match="exactly one of max_steps or max_tokens"):
        DistillConfig(type="distill")
    with pytest.raises(ValidationError, match="exactly one of max_steps or max_tokens"):
        DistillConfig(type="distill", max_steps=1, max_tokens=10)
    with pytest.raises(ValidationError):
        DistillConfig(type="distill", max_steps=1, loss="kl")
    with pytest.raises(ValidationError):
        DistillConfig(type="distill", max_steps=1, lr_max=1.0)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_bad_inputs_are_one_line_errors(tiny_llama, make_ctx, teacher_dir, tokenizer, tmp_path):
    work = tmp_path / "w"
    with pytest.raises(PassError) as exc:
        _run(_config(teacher=str(teacher_dir), seq_len=1024), tiny_llama, make_ctx, work)
    assert _one_line(exc).startswith(
        "stages[0].seq_len: 1024 exceeds the student's max_position_embeddings 512"
    )
    with pytest.raises(DataError) as exc:
        _run(
            _config(teacher=str(teacher_dir), max_steps=None, max_tokens=10**9),
            tiny_llama,
            make_ctx,
            work,
        )
    assert _one_line(exc).startswith("stages[0].max_tokens: the training data")
    small = tmp_path / "small.txt"
    small.write_text("just a few words of text")
    with pytest.raises(DataError) as exc:
        _run(
            _config(teacher=str(teacher_dir), data=DataSpec(source=str(small))),
            tiny_llama,
            make_ctx,
            work,
        )
    assert "has 0 sequences" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        _run(
            _config(teacher=str(teacher_dir), data=DataSpec(source="wikitext2", split="test")),
            tiny_llama,
            make_ctx,
            work,
        )
    assert _one_line(exc).startswith("stages[0].data: uses the evaluation data")


def test_teacher_vocab_mismatch(tiny_llama, make_ctx, tokenizer, tmp_path):
    other_vocab = tmp_path / "other-vocab"
    torch.manual_seed(2)
    LlamaForCausalLM(tiny_llama_config(vocab_size=49153)).save_pretrained(other_vocab)
    changed = copy.deepcopy(tokenizer)
    changed.add_tokens(["<an_extra_token>"])
    changed.save_pretrained(other_vocab)
    with pytest.raises(PassError) as exc:
        _run(_config(teacher=str(other_vocab)), tiny_llama, make_ctx, tmp_path / "w")
    assert _one_line(exc).startswith("stages[0].teacher:") and "tokenizer differs" in str(exc.value)


def test_shipped_recipe_validates():
    resolved = load_recipe(RECIPES / "smollm2-minitron-width-kd.yaml")
    assert [s.pass_cls.pass_type for s in resolved.stages] == ["prune", "distill"]
    assert resolved.stages[1].config.loss == "forward_kl"


def test_recipe_refuses_training_on_eval_text():
    with pytest.raises(SlmError, match=r"stages\[1\]\.data: uses the evaluation data"):
        load_recipe(
            RECIPES / "smollm2-minitron-width-kd.yaml",
            ["stages.1.data.source=wikitext2", "stages.1.data.split=test"],
        )


def test_recipe_rerun_after_a_kill_continues_training(
    tiny_model_dir, teacher_dir, tmp_path, monkeypatch
):
    """The runner keeps .work/<stage> after a crash; rerunning the recipe resumes the distill stage."""
    from conftest import write_recipe

    from slmcompress.runner import run_recipe

    stages = [
        {
            "type": "distill",
            "name": "heal",
            "max_steps": 3,
            "seq_len": 32,
            "micro_batch_size": 2,
            "save_every": 1,
            "eval_every": 0,
            "lr": 1e-3,
        }
    ]
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml", str(tiny_model_dir), stages, out, teacher=str(teacher_dir)
    )
    real_save = trainer_module.save_training_state

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(recipe))
    assert (out / ".work" / "01-heal" / "checkpoint" / "trainer.json").is_file()
    monkeypatch.setattr(trainer_module, "save_training_state", real_save)
    run_recipe(load_recipe(recipe))
    report = json.loads((out / "01-heal" / "report.json").read_text())
    assert (
        report["extra"]["distill"]["resumed_from_step"] == 1
        and report["extra"]["distill"]["steps"] == 3
    )
    assert (out / "01-heal" / "loss_curve.png").is_file() and not (
        out / ".work" / "01-heal"
    ).exists()
