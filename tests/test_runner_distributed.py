"""``torchrun`` through the runner: every rank takes the same decisions as rank 0.

Two gloo processes run :func:`run_recipe` on the same recipe (as ``torchrun -m slmcompress
run`` would). The distill stage runs on both ranks, only rank 0 writes; over the memory
budget, *every* rank refuses it with the same one-line error instead of rank 1 loading the
model and waiting forever in FSDP's first collective.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _dist_utils import free_port, init_rank
from conftest import write_recipe

DISTILL = {
    "type": "distill",
    "name": "heal",
    "max_steps": 2,
    "seq_len": 32,
    "micro_batch_size": 1,
    "eval_every": 0,
    "save_every": 1,
}


def _rank(rank: int, world: int, port: int, recipe: str, out: str) -> None:
    init_rank(rank, world, port)
    from slmcompress.errors import SlmError
    from slmcompress.recipe import load_recipe
    from slmcompress.runner import run_recipe

    try:
        result = run_recipe(load_recipe(recipe))
        message = "ok " + " ".join(s.status for s in result.stages)
    except SlmError as exc:
        message = f"error: {exc}"
    Path(out, f"rank{rank}.txt").write_text(message)
    torch.distributed.destroy_process_group()


def _run_two_ranks(recipe: Path, out: Path, timeout_s: float = 300) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    context = mp.spawn(_rank, args=(2, free_port(), str(recipe), str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(
                f"ranks still running after {timeout_s} s (a rank is stuck in a collective)"
            )
    return [(out / f"rank{r}.txt").read_text() for r in range(2)]


@pytest.fixture
def texts(tmp_path) -> dict:
    """Small local train/eval files (every rank tokenizes its data)."""
    from slmcompress.data import DataSpec, load_texts

    docs = load_texts(DataSpec(source="c4"))
    (tmp_path / "train.txt").write_text("\n\n".join(docs[:40]))
    (tmp_path / "eval.txt").write_text("\n\n".join(docs[-20:]))
    return {
        "calibration": {"source": str(tmp_path / "train.txt"), "n_samples": 4, "seq_len": 32},
        "eval": {"source": str(tmp_path / "eval.txt"), "max_tokens": 256, "seq_len": 64},
    }


def test_over_budget_distill_is_refused_on_every_rank(tmp_path, tiny_model_dir, texts):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        str(tiny_model_dir),
        [DISTILL],
        tmp_path / "run",
        max_memory="1KB",
        data=texts,
    )
    messages = _run_two_ranks(recipe, tmp_path / "ranks")
    for message in messages:
        assert message.startswith("error: stage 01-heal: the model is over the memory budget")
        assert "distill cannot stream it" in message and "\n" not in message


@pytest.mark.slow
def test_distill_stage_runs_on_both_ranks_and_rank0_writes(tmp_path, tiny_model_dir, texts):
    recipe = write_recipe(
        tmp_path / "r.yaml", str(tiny_model_dir), [DISTILL], tmp_path / "run", data=texts
    )
    assert _run_two_ranks(recipe, tmp_path / "ranks") == ["ok ran", "ok followed"]
    stage = tmp_path / "run" / "01-heal"
    assert (stage / "report.json").is_file() and list(stage.glob("*.safetensors"))
