"""Hidden-state matching: layer mapping, capture hooks, the cosine loss and its use in training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from slmcompress.distill.hidden import HiddenCapture, hidden_state_loss, layer_map
from slmcompress.distill.trainer import Trainer, TrainSettings
from slmcompress.errors import PassError
from slmcompress.passes.distill import DistillConfig, DistillPass

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("single_thread")


def _llama(seed: int, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=512, **overrides)).eval()


def test_layer_map_is_identity_without_depth_pruning_and_spreads_otherwise():
    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(2, 4) == [1, 3]
    assert layer_map(3, 30)[-1] == 29
    with pytest.raises(ValueError, match="more layers"):
        layer_map(5, 4)


def test_capture_records_each_decoder_layer_output():
    model = _llama(0)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, output_hidden_states=True)  # lets transformers install its own hooks
    hooks_before = [len(layer._forward_hooks) for layer in model.model.layers]
    capture = HiddenCapture(model)
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
        states = capture.pop()
    n_layers = model.config.num_hidden_layers
    assert len(states) == n_layers and capture.pop() == []
    # entry 0 of HF's tuple is the embedding output, entry i+1 follows layer i (the last may be normed)
    for i in range(n_layers - 1):
        torch.testing.assert_close(states[i], reference[i + 1])
    capture.remove()
    with torch.no_grad():
        model(input_ids=ids)
    assert capture.pop() == []
    assert [len(layer._forward_hooks) for layer in model.model.layers] == hooks_before


def test_hidden_loss_is_zero_for_equal_states_scale_free_and_differentiable():
    a = [torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    assert hidden_state_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state_loss([3.0 * a[0]], [a[0]]).item() == pytest.approx(0.0, abs=1e-6)
    student = [torch.randn(2, 5, 8, requires_grad=True)]
    loss = hidden_state_loss(student, [torch.randn(2, 5, 8)])
    loss.backward()
    assert 0 < loss.item() < 2 and student[0].grad.abs().sum() > 0
    with pytest.raises(ValueError):
        hidden_state_loss(a, a[:1])


def _trainer(student, teacher, work: Path, hidden_weight: float) -> Trainer:
    sequences = torch.randint(0, 512, (16, 16), generator=torch.Generator().manual_seed(0))
    capture = HiddenCapture(teacher) if hidden_weight else None
    settings = TrainSettings(
        max_steps=4, lr=3e-3, micro_batch_size=2, hidden_weight=hidden_weight, loss="forward_kl"
    )
    return Trainer(
        student,
        sequences,
        lambda ids, x: teacher(input_ids=x).logits,
        settings,
        work,
        {"run": "hidden"},
        CPU,
        show_progress=False,
        teacher_hidden=capture,
    )


def test_training_with_hidden_loss_logs_it_reduces_it_and_removes_the_student_hooks(tmp_path):
    teacher, student = _llama(1), _llama(2)
    with torch.no_grad():
        student(input_ids=torch.zeros(1, 4, dtype=torch.long), output_hidden_states=True)
    hooks_before = [len(layer._forward_hooks) for layer in student.model.layers]
    plain = _trainer(copy.deepcopy(student), teacher, tmp_path / "plain", 0.0).train().history
    trainer = _trainer(student, teacher, tmp_path / "hidden", 1.0)
    history = trainer.train().history
    assert "hidden" not in plain[0]
    assert all("hidden" in r for r in history) and history[-1]["hidden"] < history[0]["hidden"]
    # the logged loss is KD + weight * hidden, and the KD part starts where the plain run started
    assert history[0]["loss"] == pytest.approx(history[0]["kd"] + history[0]["hidden"], rel=1e-5)
    assert history[0]["kd"] == pytest.approx(plain[0]["kd"], rel=1e-5)
    assert [len(layer._forward_hooks) for layer in student.model.layers] == hooks_before


def test_identical_student_has_zero_hidden_loss(tmp_path):
    teacher = _llama(1)
    history = _trainer(copy.deepcopy(teacher), teacher, tmp_path, 1.0).train().history
    assert history[0]["hidden"] == pytest.approx(0.0, abs=1e-5)


def test_hidden_weight_needs_a_live_teacher():
    with pytest.raises(ValidationError, match="hidden_weight needs a live teacher"):
        DistillConfig(type="distill", max_steps=1, hidden_weight=1.0, teacher_cache="/x")
    with pytest.raises(ValidationError, match="hidden_weight needs a live teacher"):
        DistillConfig(type="distill", max_steps=1, hidden_weight=1.0, alpha=1.0)


def test_hidden_size_mismatch_is_a_one_line_error():
    teacher, student = _llama(1, hidden_size=96), _llama(2)
    with pytest.raises(PassError, match=r"stages\[0\]\.hidden_weight: the student's hidden_size"):
        DistillPass._hidden_capture(teacher, student, "stages[0]")


def test_grad_only_capture_ignores_evaluation_forwards():
    model = _llama(0)
    capture = HiddenCapture(model, grad_only=True)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        model(input_ids=ids)
    assert capture.pop() == []
    model(input_ids=ids)
    assert len(capture.pop()) == model.config.num_hidden_layers
    capture.remove()


def test_layer_map_follows_the_layers_depth_pruning_kept():
    assert layer_map(2, 4, [0, 3]) == [0, 3]
    with pytest.raises(ValueError, match="do not fit"):
        layer_map(2, 4, [0, 4])


def test_student_pruned_from_the_teacher_is_matched_to_its_source_layers():
    from slmcompress.prune.planner import SOURCE_LAYERS_KEY

    teacher = _llama(1, num_hidden_layers=4)
    student = _llama(2, num_hidden_layers=2)
    setattr(student.config, SOURCE_LAYERS_KEY, [0, 1])
    ids = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        reference = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    capture = DistillPass._hidden_capture(teacher, student, "s", pruned_from_teacher=True)
    with torch.no_grad():
        teacher(input_ids=ids)
    states = capture.pop()
    torch.testing.assert_close(states[0], reference[1])  # teacher layers 0 and 1, not 1 and 3
    torch.testing.assert_close(states[1], reference[2])
    capture.remove()
    other = DistillPass._hidden_capture(teacher, student, "s", pruned_from_teacher=False)
    with torch.no_grad():
        teacher(input_ids=ids)
    torch.testing.assert_close(other.pop()[0], reference[2])  # evenly spaced: layers 1 and 3
