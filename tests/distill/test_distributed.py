"""Two CPU processes (gloo, FSDP2 student) reproduce the single-process run with the same global batch.

Each rank runs the real :class:`DistillPass` as ``torchrun`` would (the runner calls it on
every rank). Rank 0's run is killed after its first checkpoint and resumed, so the FSDP
checkpoint path (gather on rank 0, reload on every rank) is covered too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _dist_utils import free_port, init_rank
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

STEPS, MICRO, SEQ = 4, 2, 32


def _config(teacher: Path, grad_accum: int, sharding: str = "replicated"):
    from slmcompress.passes.distill import DistillConfig

    return DistillConfig(
        type="distill",
        teacher=str(teacher),
        teacher_sharding=sharding,
        max_steps=STEPS,
        seq_len=SEQ,
        micro_batch_size=MICRO,
        grad_accum=grad_accum,
        lr=2e-3,
        warmup_steps=1,
        eval_every=2,
        eval_tokens=256,
        save_every=2,
        alpha=0.2,
    )


def _ctx(tokenizer, work: Path, texts: Path):
    from slmcompress.data import CalibrationSpec, DataConfig, EvalSpec
    from slmcompress.passes.base import Context

    work.mkdir(parents=True, exist_ok=True)
    # Small local files: every rank tokenizes its data, and the full C4 slice is slow to tokenize.
    data = DataConfig(
        calibration=CalibrationSpec(source=str(texts / "train.txt"), n_samples=8, seq_len=64),
        eval=EvalSpec(source=str(texts / "eval.txt"), max_tokens=512, seq_len=128),
    )
    return Context(
        tokenizer=tokenizer,
        data=data,
        device=torch.device("cpu"),
        dtype=torch.float32,
        original_model="unused",
        teacher=None,
        stage_dir=work / "stage",
        work_dir=work,
        seed=0,
    )


def _student() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def _run_pass(teacher: Path, work: Path, grad_accum: int, sharding: str = "replicated"):
    """Run the pass; return (history, returned model)."""
    from transformers import AutoTokenizer

    from slmcompress.passes.distill import DistillPass

    ctx = _ctx(AutoTokenizer.from_pretrained(teacher), work, teacher.parent)
    model = DistillPass(_config(teacher, grad_accum, sharding)).run(_student(), ctx)
    history = (
        json.loads(Path(ctx.artifacts["train_history.json"]).read_text()) if ctx.artifacts else None
    )
    return history, model


class _Killed(RuntimeError):
    pass


def _worker(rank: int, world: int, port: int, teacher: str, out: str, sharding: str) -> None:
    """One torchrun-like rank: a run killed after its first checkpoint, then resumed."""
    init_rank(rank, world, port)
    import slmcompress.distill.trainer as trainer_module

    real_save = trainer_module.save_training_state

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Killed

    trainer_module.save_training_state = save_then_die
    try:
        _run_pass(Path(teacher), Path(out) / "work", 1, sharding)
    except _Killed:
        pass
    trainer_module.save_training_state = real_save
    history, model = _run_pass(Path(teacher), Path(out) / "work", 1, sharding)
    if rank == 0:
        LlamaForCausalLM.save_pretrained(model, Path(out) / "model")
        (Path(out) / "history.json").write_text(json.dumps(history))
    torch.distributed.destroy_process_group()


@pytest.fixture
def teacher_dir(tmp_path, tokenizer) -> Path:
    """A tiny teacher, with small train/eval text files beside it."""
    from slmcompress.data import DataSpec, load_texts

    docs = load_texts(DataSpec(source="c4"))
    (tmp_path / "train.txt").write_text("\n\n".join(docs[:40]))
    (tmp_path / "eval.txt").write_text("\n\n".join(docs[-20:]))
    directory = tmp_path / "teacher"
    torch.manual_seed(1)
    LlamaForCausalLM(tiny_llama_config(hidden_size=96, intermediate_size=192)).save_pretrained(
        directory
    )
    tokenizer.save_pretrained(directory)
    return directory


def _check_against_single_process(tmp_path: Path, teacher_dir: Path, sharding: str) -> None:
    out = tmp_path / "dist"
    mp.spawn(
        _worker, args=(2, free_port(), str(teacher_dir), str(out), sharding), nprocs=2, join=True
    )
    history = json.loads((out / "history.json").read_text())
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, single_model = _run_pass(teacher_dir, tmp_path / "single", grad_accum=2)
    finally:
        torch.set_num_threads(previous)
    assert [r["step"] for r in history] == list(
        range(1, STEPS + 1)
    )  # the resumed run reports the whole curve
    assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in single], rel=1e-4)
    evals = [r["eval_ppl"] for r in history if "eval_ppl" in r]
    assert len(evals) == 2 and evals == pytest.approx(
        [r["eval_ppl"] for r in single if "eval_ppl" in r], rel=1e-4
    )
    distributed_model = LlamaForCausalLM.from_pretrained(out / "model")
    for (key, a), b in zip(
        single_model.state_dict().items(), distributed_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)


def test_two_gloo_ranks_match_single_process(tmp_path, teacher_dir):
    """FSDP2 student, replicated teacher; rank 0 killed after the step-2 checkpoint and resumed."""
    _check_against_single_process(tmp_path, teacher_dir, "replicated")


@pytest.mark.slow
def test_sharded_teacher_matches_single_process(tmp_path, teacher_dir):
    """The same with the teacher sharded too (all-gathered layer by layer in its forward)."""
    _check_against_single_process(tmp_path, teacher_dir, "sharded")
