"""The training loop: schedule, determinism, and kill-and-resume reproducing the loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from slmcompress.distill.checkpointing import CHECKPOINT_DIR
from slmcompress.distill.trainer import Trainer, TrainSettings, batch_order, lr_factor, plot_history
from slmcompress.errors import PassError

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("single_thread")


class Killed(RuntimeError):
    """Stands in for SIGKILL: raised from the step callback mid-run."""


def _student(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=512))


@pytest.fixture(scope="module")
def teacher() -> LlamaForCausalLM:
    torch.manual_seed(123)
    return LlamaForCausalLM(
        tiny_llama_config(vocab_size=512, hidden_size=96, intermediate_size=256)
    ).eval()


@pytest.fixture(scope="module")
def sequences() -> torch.Tensor:
    return torch.randint(0, 512, (32, 32), generator=torch.Generator().manual_seed(0))  # (N, T)


def _settings(**overrides) -> TrainSettings:
    params = dict(
        max_steps=6,
        lr=3e-3,
        warmup_steps=2,
        micro_batch_size=2,
        grad_accum=2,
        save_every=2,
        eval_every=3,
        loss="forward_kl",
        temperature=2.0,
        alpha=0.1,
    )
    params.update(overrides)
    return TrainSettings(**params)


def _trainer(
    work_dir: Path, teacher, sequences, settings=None, on_step=None, student=None
) -> Trainer:
    return Trainer(
        student or _student(),
        sequences,
        lambda ids, x: teacher(input_ids=x).logits,
        settings or _settings(),
        work_dir,
        {"run": "test"},
        CPU,
        eval_fn=lambda m: 42.0,
        on_step=on_step,
        show_progress=False,
    )


def _losses(history) -> list[float]:
    return [r["loss"] for r in history]


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.55)
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_batch_order_is_a_seeded_permutation():
    assert torch.equal(batch_order(10, 3), batch_order(10, 3))
    assert sorted(batch_order(10, 3).tolist()) == list(range(10))
    assert not torch.equal(batch_order(10, 3), batch_order(10, 4))


def test_loss_decreases_and_history_has_eval(tmp_path, teacher, sequences):
    result = _trainer(tmp_path, teacher, sequences, _settings(max_steps=8, save_every=0)).train()
    losses = _losses(result.history)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert [r["step"] for r in result.history if "eval_ppl" in r] == [3, 6, 8]
    assert result.history[-1]["tokens"] == 8 * 4 * 32
    assert not (tmp_path / CHECKPOINT_DIR).exists()


def test_kill_and_resume_reproduces_the_uninterrupted_curve(tmp_path, teacher, sequences):
    reference = _trainer(tmp_path / "ref", teacher, sequences).train()

    def kill_at_step_5(step: int) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        _trainer(tmp_path / "run", teacher, sequences, on_step=kill_at_step_5).train()
    meta = json.loads((tmp_path / "run" / CHECKPOINT_DIR / "trainer.json").read_text())
    assert meta["step"] == 4  # last checkpoint before the kill; step 5 is replayed
    resumed = _trainer(tmp_path / "run", teacher, sequences).train()
    assert resumed.resumed_from == 4
    assert _losses(resumed.history) == pytest.approx(_losses(reference.history), rel=1e-6, abs=1e-7)
    assert [r["lr"] for r in resumed.history] == pytest.approx([r["lr"] for r in reference.history])


def test_resumed_weights_equal_uninterrupted(tmp_path, teacher, sequences):
    settings = _settings(max_steps=4, save_every=1, eval_every=0)
    ref_model = _student()
    _trainer(tmp_path / "ref", teacher, sequences, settings, student=ref_model).train()

    def kill(step: int) -> None:
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        _trainer(tmp_path / "run", teacher, sequences, settings, on_step=kill).train()
    model = _student()
    _trainer(tmp_path / "run", teacher, sequences, settings, student=model).train()
    for (name, a), b in zip(
        ref_model.state_dict().items(), model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_is_safetensors_and_json_only(tmp_path, teacher, sequences):
    _trainer(
        tmp_path, teacher, sequences, _settings(max_steps=2, save_every=1, eval_every=0)
    ).train()
    files = sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir())
    assert files == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "trainer.json",
    ]


def test_resume_from_another_config_is_a_one_line_error(tmp_path, teacher, sequences):
    _trainer(
        tmp_path, teacher, sequences, _settings(max_steps=2, save_every=1, eval_every=0)
    ).train()
    with pytest.raises(PassError) as info:
        _trainer(
            tmp_path, teacher, sequences, _settings(max_steps=2, save_every=1, lr=1e-2)
        ).train()
    message = str(info.value)
    assert "different recipe/config" in message and "settings" in message and "\n" not in message


def test_plot_history_writes_png(tmp_path):
    history = [
        {"tokens": 10 * i, "loss": 1.0 / i, **({"eval_ppl": 5.0 / i} if i % 2 == 0 else {})}
        for i in range(1, 7)
    ]
    path = plot_history(history, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("option", "expected"),
    [("auto", torch.float32), ("off", torch.float32), ("bf16", torch.bfloat16)],
)
def test_autocast_option_sets_the_student_forward_dtype(
    tmp_path, teacher, sequences, option, expected
):
    """``autocast: bf16`` asks for bf16 on any device (CPU included); auto is CUDA-only."""
    student = _student()
    seen: list[torch.dtype] = []
    student.lm_head.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    settings = _settings(max_steps=1, save_every=0, eval_every=0, autocast=option)
    result = _trainer(tmp_path, teacher, sequences, settings, student=student).train()
    assert set(seen) == {expected}
    assert all(p.dtype == torch.float32 for p in student.parameters())  # fp32 masters
    assert torch.isfinite(torch.tensor(result.history[0]["loss"]))
