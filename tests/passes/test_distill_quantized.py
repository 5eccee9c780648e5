"""Quantization-aware distillation: ``type: distill`` on a GPTQ (RTN-packed) tiny student."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config, write_recipe
from transformers import LlamaForCausalLM

import slmcompress.distill.trainer as trainer_module
from slmcompress.data import DataSpec
from slmcompress.distill.teacher_cache import build_teacher_cache
from slmcompress.errors import PassError, RecipeError
from slmcompress.io.checkpoint import load_checkpoint, save_checkpoint
from slmcompress.passes.distill import DistillConfig, DistillPass
from slmcompress.passes.quantize_rtn import RTNConfig, RTNPass
from slmcompress.quant.quant_linear import QuantLinear
from slmcompress.recipe import load_recipe
from slmcompress.runner import run_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("qad-teacher")
    torch.manual_seed(1)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _quantized(tiny_llama, make_ctx, bits=4, group_size=32):
    config = RTNConfig(type="quantize", method="rtn", bits=bits, group_size=group_size)
    return RTNPass(config).run(tiny_llama, make_ctx())


def _config(**overrides) -> DistillConfig:
    params = dict(
        type="distill", max_steps=4, seq_len=32, micro_batch_size=2, lr=5e-3,
        eval_every=0, eval_tokens=256, save_every=2,
    )  # fmt: skip
    params.update(overrides)
    return DistillConfig(**params)


def _run(config, student, make_ctx, work: Path, **ctx_overrides):
    work.mkdir(parents=True, exist_ok=True)
    ctx = make_ctx(work_dir=work, **ctx_overrides)
    return DistillPass(config).run(student, ctx), ctx


def _one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("mode", ["scales", "ste"])
def test_trains_and_writes_a_gptq_checkpoint_that_reloads_identically(
    mode, tiny_llama, make_ctx, teacher_dir, tokenizer, tmp_path
):
    student = _quantized(tiny_llama, make_ctx)
    before = {n: copy.deepcopy(m) for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    lr = 5e-3 if mode == "scales" else 2e-2  # ste must move latent weights across bins
    config = _config(teacher=str(teacher_dir), quantized=mode, lr=lr, eval_every=2)
    model, ctx = _run(config, student, make_ctx, tmp_path / "w")
    info, quant = ctx.extra_metrics["distill"], ctx.extra_metrics["quantized"]
    assert info["final_loss"] < info["first_loss"]
    assert quant["mode"] == mode and quant["quantized_layers"] == len(before) == 14
    assert quant["eval_ppl_vs_teacher"] == pytest.approx(
        quant["final_eval_ppl"] - quant["teacher_eval_ppl"], abs=1e-3
    )
    after = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert after.keys() == before.keys()
    for name, layer in after.items():
        old = before[name]
        assert (layer.bits, layer.group_size) == (old.bits, old.group_size)
        assert torch.equal(layer.g_idx, old.g_idx) and torch.equal(layer.qzeros, old.qzeros)
        assert layer.scales.dtype == torch.float16 and torch.isfinite(layer.scales).all()
        codes_same = torch.equal(layer.qweight, old.qweight)
        assert codes_same if mode == "scales" else torch.equal(layer.scales, old.scales)
    if mode == "scales":
        assert quant["mean_rel_scale_change"] > 0 and quant["codes_changed"] == 0
        assert quant["trainable_params"] == sum(m.scales.numel() for m in after.values()) + sum(
            p.numel() for n, p in model.named_parameters() if "norm" in n
        )
    else:
        assert quant["codes_changed"] > 0 and quant["mean_rel_scale_change"] == 0
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    directory = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert json.loads((directory / "quantize_config.json").read_text())["bits"] == 4
    reloaded, _ = load_checkpoint(directory)
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, QuantLinear)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_trains_from_a_top_k_teacher_cache_without_loading_the_teacher(
    tiny_llama, make_ctx, teacher_dir, tokenizer, tmp_path, monkeypatch
):
    """The 70B-teacher route: the float teacher's top-k logits cached once, the GPTQ student
    trained from them in its format."""
    teacher = LlamaForCausalLM.from_pretrained(teacher_dir).eval()
    cache = build_teacher_cache(
        teacher, tokenizer, DataSpec(source="c4"), 32, 16, tmp_path / "cache", 16,
        show_progress=False,
    )  # fmt: skip

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher must not be loaded")

    monkeypatch.setattr("slmcompress.io.load.load_model", no_teacher)
    student = _quantized(tiny_llama, make_ctx)
    scales_before = {
        n: m.scales.clone() for n, m in student.named_modules() if isinstance(m, QuantLinear)
    }
    config = _config(
        teacher_cache=str(cache), top_k=8, quantized="scales", save_every=0, max_steps=8, lr=2e-3
    )
    model, ctx = _run(config, student, make_ctx, tmp_path / "w")
    info, quant = ctx.extra_metrics["distill"], ctx.extra_metrics["quantized"]
    assert info["teacher"].startswith("cache:") and info["final_loss"] < info["first_loss"]
    assert quant["mode"] == "scales" and quant["codes_changed"] == 0
    moved = [
        not torch.equal(m.scales, scales_before[n])
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
    ]
    assert len(moved) == 14 and all(moved)


def test_lsq_and_float_training_options(tiny_llama, make_ctx, teacher_dir, tmp_path):
    student = _quantized(tiny_llama, make_ctx, bits=3)
    config = _config(teacher=str(teacher_dir), quantized="lsq", train_float="none", max_steps=2)
    model, ctx = _run(config, student, make_ctx, tmp_path / "w")
    quant = ctx.extra_metrics["quantized"]
    weights = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear)
    )
    scales = sum(m.scales.numel() for m in model.modules() if isinstance(m, QuantLinear))
    assert quant["trainable_params"] == weights + scales
    assert model.model.layers[0].mlp.up_proj.bits == 3


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(
    tiny_llama, make_ctx, teacher_dir, tmp_path, monkeypatch
):
    student = _quantized(tiny_llama, make_ctx)
    real_loss, calls = trainer_module.distill_loss, []

    def nan_at_step_3(*args, **kwargs):
        loss, parts = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), parts

    monkeypatch.setattr(trainer_module, "distill_loss", nan_at_step_3)
    config = _config(teacher=str(teacher_dir), save_every=1)
    with pytest.raises(PassError) as exc:
        _run(config, student, make_ctx, tmp_path / "w")
    message = _one_line(exc)
    assert message.startswith("stages[0]: loss nan at step 3; training stopped")
    assert "last good checkpoint (step 2)" in message
    saved = json.loads((tmp_path / "w" / "checkpoint" / "trainer.json").read_text())
    assert saved["step"] == 2


def test_resume_after_a_kill_matches_the_uninterrupted_run(
    tiny_llama, make_ctx, teacher_dir, tmp_path, monkeypatch
):
    student = _quantized(tiny_llama, make_ctx)
    config = _config(teacher=str(teacher_dir), save_every=1)
    _, ref_ctx = _run(config, copy.deepcopy(student), make_ctx, tmp_path / "ref")
    reference = json.loads(Path(ref_ctx.artifacts["train_history.json"]).read_text())
    real_save, saves = trainer_module.save_training_state, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(config, copy.deepcopy(student), make_ctx, tmp_path / "run")
    monkeypatch.setattr(trainer_module, "save_training_state", real_save)
    _, ctx = _run(config, copy.deepcopy(student), make_ctx, tmp_path / "run")
    assert ctx.extra_metrics["distill"]["resumed_from_step"] == 2
    resumed = json.loads(Path(ctx.artifacts["train_history.json"]).read_text())
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference], rel=1e-6)
    other = _config(teacher=str(teacher_dir), save_every=1, quantized="ste")
    with pytest.raises(PassError, match=r"differs in quantized"):
        _run(other, copy.deepcopy(student), make_ctx, tmp_path / "run")


def test_bad_inputs_are_one_line_errors(
    tiny_llama, make_ctx, teacher_dir, tokenizer, tmp_path, monkeypatch
):
    work = tmp_path / "w"
    with pytest.raises(PassError) as exc:  # a float student cannot train "quantized"
        _run(_config(teacher=str(teacher_dir), quantized="scales"), tiny_llama, make_ctx, work)
    assert _one_line(exc).startswith("stages[0].quantized: scales needs a quantized student")
    float_student = LlamaForCausalLM(tiny_llama_config())
    float_student.config.quantization_config = {"quant_method": "awq", "bits": 4}
    with pytest.raises(PassError) as exc:
        _run(_config(teacher=str(teacher_dir)), float_student, make_ctx, work)
    assert _one_line(exc).startswith("stages[0].quantized: the student is quantized as awq")
    student = _quantized(tiny_llama, make_ctx)
    with pytest.raises(PassError) as exc:
        _run(_config(teacher=str(teacher_dir)), student, make_ctx, work, max_memory="1MB")
    assert _one_line(exc).startswith("stages[0].quantized: scales training needs ~")
    other_vocab = tmp_path / "other-vocab"
    LlamaForCausalLM(tiny_llama_config(vocab_size=49153)).save_pretrained(other_vocab)
    changed = copy.deepcopy(tokenizer)
    changed.add_tokens(["<an_extra_token>"])
    changed.save_pretrained(other_vocab)
    with pytest.raises(PassError) as exc:
        _run(_config(teacher=str(other_vocab)), student, make_ctx, work)
    assert _one_line(exc).startswith("stages[0].teacher:") and "tokenizer differs" in str(exc.value)
    monkeypatch.setattr("slmcompress.dist.is_distributed", lambda: True)
    with pytest.raises(PassError) as exc:
        _run(_config(teacher=str(teacher_dir)), student, make_ctx, work)
    assert _one_line(exc).startswith("stages[0].quantized: a quantized student trains in one")


def test_recipe_rules_after_a_quantize_stage(tiny_model_dir, tmp_path):
    def recipe(*stages):
        return write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), list(stages), tmp_path / "o")

    rtn = {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32}
    qad = {"type": "distill", "max_steps": 1, "seq_len": 32}
    assert [s.pass_cls.pass_type for s in load_recipe(recipe(rtn, qad)).stages] == [
        "quantize",
        "distill",
    ]
    nf4 = {"type": "quantize", "method": "bnb-nf4"}
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe(nf4, qad))
    assert _one_line(exc).startswith(
        "stages[1].type: a distill stage cannot train the bnb-nf4 model of stages[0]"
    )
    prune = {"type": "prune", "method": "random", "target": {"ffn_hidden_size": 64}}
    with pytest.raises(RecipeError, match=r"stages\[2\]\.type: a prune stage cannot follow"):
        load_recipe(recipe(rtn, qad, prune))


def test_recipe_quantize_then_qad_end_to_end_with_resume(tiny_model_dir, tmp_path, monkeypatch):
    """RTN-2 then QAD with the original model as teacher; a kill mid-training resumes.

    The tiny random teacher is near-uniform, so per-batch KD losses are ~1e-3 and noisy;
    the held-out perplexity against the RTN input is the signal that training helped.
    """
    stages = [
        {"type": "quantize", "name": "w2", "method": "rtn", "bits": 2, "group_size": 32},
        {"type": "distill", "name": "qad", "max_steps": 3, "seq_len": 32, "micro_batch_size": 2,
         "save_every": 1, "eval_every": 0, "lr": 1e-3},
    ]  # fmt: skip
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), stages, out)
    real_save = trainer_module.save_training_state

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(recipe))
    monkeypatch.setattr(trainer_module, "save_training_state", real_save)
    run_recipe(load_recipe(recipe))
    stage_dir = out / "02-qad"
    report = json.loads((stage_dir / "report.json").read_text())
    info = report["extra"]["distill"]
    assert info["resumed_from_step"] == 1 and info["steps"] == 3
    assert report["extra"]["quantized"]["mode"] == "scales"
    assert report["deltas"]["vs_input"]["wikitext2_ppl"] < 0  # better than the RTN stage
    assert "wikitext2_ppl" in report["deltas"]["vs_original"]
    qcfg = json.loads((stage_dir / "quantize_config.json").read_text())
    assert (qcfg["bits"], qcfg["group_size"]) == (2, 32)
    model, _ = load_checkpoint(stage_dir)
    assert isinstance(model.model.layers[1].self_attn.o_proj, QuantLinear)
    w2, _ = load_checkpoint(out / "01-w2")
    old, new = w2.model.layers[1].self_attn.o_proj, model.model.layers[1].self_attn.o_proj
    assert torch.equal(old.qweight, new.qweight) and not torch.equal(old.scales, new.scales)
