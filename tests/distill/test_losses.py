"""KD losses against hand-written references on small random logits (no models)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import slmcompress.distill.losses as losses_module
from slmcompress.distill.losses import (
    LOSSES,
    distill_loss,
    forward_kl,
    jsd,
    next_token_ce,
    reverse_kl,
    top_k_logits,
)

B, T, V = 2, 5, 11


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(B, T, V, generator=generator)  # (B, T, V)
    teacher = 2 * torch.randn(B, T, V, generator=generator)  # (B, T, V)
    return student, teacher


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Reference KL(p || q) per position with explicit loops, averaged over positions."""
    total = 0.0
    for b in range(p.shape[0]):
        for t in range(p.shape[1]):
            total += sum(
                float(p[b, t, v] * (math.log(p[b, t, v]) - math.log(q[b, t, v])))
                for v in range(p.shape[2])
            )
    return total / (p.shape[0] * p.shape[1])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_match_reference(logits, temperature):
    student, teacher = logits
    p = F.softmax(teacher / temperature, -1)
    q = F.softmax(student / temperature, -1)
    scale = temperature**2
    assert forward_kl(student, teacher, temperature).item() == pytest.approx(
        _kl(p, q) * scale, rel=1e-5
    )
    assert reverse_kl(student, teacher, temperature).item() == pytest.approx(
        _kl(q, p) * scale, rel=1e-5
    )


def test_forward_kl_equals_torch_kl_div(logits):
    student, teacher = logits
    ref = F.kl_div(
        F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none"
    )
    assert forward_kl(student, teacher).item() == pytest.approx(ref.sum(-1).mean().item(), rel=1e-6)


def test_jsd_reference_symmetric_and_bounded(logits):
    student, teacher = logits
    p, q = F.softmax(teacher, -1), F.softmax(student, -1)
    m = 0.5 * (p + q)
    expected = 0.5 * _kl(p, m) + 0.5 * _kl(q, m)
    assert jsd(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert jsd(student, teacher).item() == pytest.approx(jsd(teacher, student).item(), rel=1e-5)
    assert 0 < jsd(student, teacher).item() <= math.log(2)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_when_student_equals_teacher(logits, name):
    _, teacher = logits
    assert abs(LOSSES[name](teacher.clone(), teacher).item()) < 1e-6
    assert (
        abs(LOSSES[name](teacher.clone(), top_k_logits(teacher, 4)).item()) < 0.5
    )  # support differs


def test_top_k_with_full_vocab_equals_full_loss(logits):
    student, teacher = logits
    full = top_k_logits(teacher, V)
    for name, fn in LOSSES.items():
        assert fn(student, full, 1.5).item() == pytest.approx(
            fn(student, teacher, 1.5).item(), rel=1e-5
        ), name


def test_top_k_forward_kl_reference(logits):
    """Teacher's top-k renormalised; student log-softmax over the full vocab, gathered."""
    student, teacher = logits
    k = 3
    values, indices = teacher.topk(k, -1)  # (B, T, K)
    p = F.softmax(values, -1)
    log_q = F.log_softmax(student, -1).gather(-1, indices)
    expected = (p * (p.log() - log_q)).sum(-1).mean()
    assert forward_kl(student, top_k_logits(teacher, k)).item() == pytest.approx(
        expected.item(), rel=1e-6
    )
    assert forward_kl(student, top_k_logits(teacher, k)).item() > 0


def test_mask_averages_only_kept_positions(logits):
    student, teacher = logits
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, :2] = True
    expected = forward_kl(student[:, :2], teacher[:, :2])
    assert forward_kl(student, teacher, mask=mask).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_alpha_mixes_ce_and_kd(logits):
    student, teacher = logits
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    ce = next_token_ce(student, ids).item()
    kd = forward_kl(student, teacher).item()
    assert distill_loss(student, ids, teacher, alpha=0.0)[0].item() == pytest.approx(kd)
    assert distill_loss(student, ids, teacher, alpha=1.0)[0].item() == pytest.approx(ce)
    mixed, parts = distill_loss(student, ids, teacher, alpha=0.25)
    assert mixed.item() == pytest.approx(0.75 * kd + 0.25 * ce, rel=1e-6)
    assert parts == pytest.approx({"kd": kd, "ce": ce})
    assert distill_loss(student, ids, None)[0].item() == pytest.approx(ce)


def test_gradients_flow_only_to_student(logits):
    student, teacher = logits
    student = student.clone().requires_grad_(True)
    for fn in LOSSES.values():
        fn(student, teacher, 2.0).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert not teacher.requires_grad


def _plain_forward_kl(student, teacher, temperature, mask=None):
    """The unfused expression, differentiated by autograd: the fused loss's reference."""
    log_q = F.log_softmax(student.float() / temperature, -1)
    log_p = F.log_softmax(teacher.float() / temperature, -1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is not None:
        m = mask.float()
        return (per_position * m).sum() / m.sum() * temperature**2
    return per_position.mean() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_forward_kl_has_the_plain_value_and_gradient(monkeypatch, temperature, masked):
    """Rows in chunks of 3 (a chunk boundary inside the batch), masked and not."""
    monkeypatch.setattr(losses_module, "KL_CHUNK_BYTES", 3 * 4 * 50)
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(3, 7, 50, generator=gen)
    teacher = 3 * torch.randn(3, 7, 50, generator=gen)
    mask = torch.rand(3, 7, generator=gen) > 0.3 if masked else None
    a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    fused = forward_kl(a, teacher, temperature, mask)
    plain = _plain_forward_kl(b, teacher, temperature, mask)
    (2.5 * fused).backward()
    (2.5 * plain).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)


def test_fused_forward_kl_in_bfloat16_keeps_the_logits_dtype():
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 4, 64, generator=gen).bfloat16().requires_grad_(True)
    teacher = torch.randn(2, 4, 64, generator=gen).bfloat16()
    forward_kl(student, teacher).backward()
    reference = student.detach().float().requires_grad_(True)
    _plain_forward_kl(reference, teacher.float(), 1.0).backward()
    assert student.grad.dtype == torch.bfloat16
    torch.testing.assert_close(student.grad.float(), reference.grad, rtol=2e-2, atol=1e-4)


def test_fused_forward_kl_saves_one_logits_sized_tensor_for_backward():
    """The memory claim, as far as autograd shows it: the plain loss saves two (B, T, V) fp32
    tensors for backward (and makes ~5 transient ones); the fused loss saves only its gradient.
    The peak itself is measured by benchmarks/kd_loss_memory.py."""
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(2, 8, 1000, generator=gen).requires_grad_(True)
    teacher = torch.randn(2, 8, 1000, generator=gen)

    def saved_bytes(fn) -> int:
        held: list[int] = []

        def pack(t):
            held.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(student, teacher, 1.0)
        return sum(held)

    logits_bytes = student.numel() * 4
    assert saved_bytes(forward_kl) <= logits_bytes + 1024
    assert saved_bytes(_plain_forward_kl) >= 2 * logits_bytes


def test_fused_forward_kl_refuses_a_second_backward():
    student = torch.randn(1, 2, 9).requires_grad_(True)
    loss = forward_kl(student, torch.randn(1, 2, 9))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()
