"""Logit-matching distillation losses: pure tensor functions, no models.

Shapes: ``B`` batch, ``T`` positions, ``V`` vocabulary, ``K`` kept teacher logits (top-k).
Every loss is a sum over the vocabulary (or the teacher's top-k support) and a mean over
the unmasked positions, scaled by ``T**2`` (Hinton et al. 2015) so the gradient size does
not shrink as the temperature grows.

A teacher is given either as full logits ``(B, T, V)`` or as :class:`TopK` targets (the
values and vocabulary indices of its ``K`` largest logits, what an offline cache stores).
For top-k the teacher's distribution is the softmax over its ``K`` values (renormalised);
the student's log-probabilities come from a log-softmax over the *full* vocabulary gathered
at those indices, so mass the student puts outside the teacher's top-k is still penalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LossName = Literal["forward_kl", "reverse_kl", "jsd"]


@dataclass(frozen=True)
class TopK:
    """The teacher's ``K`` largest logits per position (raw, temperature 1)."""

    values: torch.Tensor  # (B, T, K) float
    indices: torch.Tensor  # (B, T, K) int64


def top_k_logits(teacher_logits: torch.Tensor, k: int) -> TopK:
    """Keep the teacher's ``k`` largest logits per position (sorted, descending)."""
    values, indices = torch.topk(teacher_logits.float(), k, dim=-1)  # (B, T, K)
    return TopK(values=values, indices=indices)


def log_probs(
    student_logits: torch.Tensor, teacher: torch.Tensor | TopK, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities on the teacher's support.

    Returns ``(log_p, log_q, log_q_renorm)``: teacher, student (full-vocab log-softmax) and
    the student renormalised on the support (equal to ``log_q`` for full logits).
    """
    log_q_full = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    if isinstance(teacher, TopK):
        log_p = F.log_softmax(teacher.values.float() / temperature, dim=-1)  # (B, T, K)
        log_q = log_q_full.gather(-1, teacher.indices)  # (B, T, K)
        return log_p, log_q, log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)  # (B, T, V)
    return log_p, log_q_full, log_q_full


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a ``(B, T)`` tensor over positions where ``mask`` is true."""
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


#: fp32 bytes of one row chunk of the fused forward KL's temporaries (a few such live at once)
KL_CHUNK_BYTES = 64 * 2**20


class _FusedForwardKL(torch.autograd.Function):
    """T² · mean KL(softmax(t/T) ‖ softmax(s/T)) over rows, with its gradient made in the forward.

    Autograd through the plain expression keeps ~7 vocabulary-wide fp32 tensors per token
    (two log-softmaxes, the teacher's probabilities, their difference, the product, then the
    backward's own) -- 7.5 GB at Gemma 3's 262k vocabulary for 4x256 tokens. Here rows are
    done a chunk at a time and only the gradient ``T·w·(softmax(s/T) − p)`` is kept: one
    logits-sized tensor beyond the logits themselves (Liger-Kernel's fused-loss idea).
    """

    @staticmethod
    def forward(ctx, student, teacher, weights, temperature: float):  # type: ignore[override]
        vocab = student.shape[-1]
        s, t = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
        grad = torch.empty_like(s) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        rows = max(1, KL_CHUNK_BYTES // (4 * vocab))
        for i in range(0, s.shape[0], rows):
            log_q = F.log_softmax(s[i : i + rows].float() / temperature, dim=-1)
            log_p = F.log_softmax(t[i : i + rows].float() / temperature, dim=-1)
            p = log_p.exp()
            w = weights[i : i + rows]
            total += ((p * (log_p - log_q)).sum(-1) * w).sum()
            if grad is not None:
                grad[i : i + rows] = ((log_q.exp_() - p) * (w * temperature)[:, None]).to(
                    grad.dtype
                )
        ctx.save_for_backward(grad if grad is not None else s.new_empty(0))
        ctx.shape, ctx.used = student.shape, False
        return total * temperature**2

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if ctx.used:
            raise RuntimeError("the fused KD loss's backward runs once (no retain_graph)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        # in place: a second logits-sized tensor here would undo half the saving
        return grad.mul_(grad_out).reshape(ctx.shape), None, None, None


def _row_weights(
    shape: torch.Size, mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Per-row weights of a masked mean over ``(B, T)`` positions, flattened."""
    if mask is None:
        n = shape[0] * shape[1]
        return torch.full((n,), 1.0 / n, device=device)
    m = mask.reshape(-1).to(device=device, dtype=torch.float32)
    return m / m.sum().clamp_min(1.0)


def forward_kl(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_teacher || q_student): mean-seeking, the Minitron default.

    Full teacher logits take the fused path (:class:`_FusedForwardKL`, same value and
    gradient, a fraction of the memory); top-k targets are already small.
    """
    if not isinstance(teacher, TopK):
        weights = _row_weights(student_logits.shape, mask, student_logits.device)
        return _FusedForwardKL.apply(student_logits, teacher.detach(), weights, temperature)
    log_p, log_q, _ = log_probs(student_logits, teacher, temperature)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
    return _masked_mean(per_position, mask) * temperature**2


def reverse_kl(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(q_student || p_teacher): mode-seeking (on the top-k support when given TopK)."""
    log_p, _, log_q = log_probs(student_logits, teacher, temperature)
    per_position = (log_q.exp() * (log_q - log_p)).sum(-1)  # (B, T)
    return _masked_mean(per_position, mask) * temperature**2


def jsd(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence with mixture ``m = beta*p + (1-beta)*q``, 0 < beta < 1."""
    log_p, _, log_q = log_probs(student_logits, teacher, temperature)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))  # (B, T, V|K)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)  # (B, T)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)  # (B, T)
    return _masked_mean(beta * kl_pm + (1 - beta) * kl_qm, mask) * temperature**2


LOSSES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}


def next_token_ce(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Causal LM cross-entropy: position t predicts token t+1 (the last position has no label)."""
    logits = student_logits[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def distill_loss(
    student_logits: torch.Tensor,
    input_ids: torch.Tensor,
    teacher: torch.Tensor | TopK | None,
    loss: LossName = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``(1 - alpha) * KD + alpha * CE``; ``alpha = 1`` (or no teacher) is plain fine-tuning.

    Returns the scalar loss and its parts (floats, for logging).
    """
    ce = next_token_ce(student_logits, input_ids) if alpha > 0 or teacher is None else None
    if teacher is None or alpha >= 1.0:
        return ce, {"ce": ce.item()}
    kd = LOSSES[loss](student_logits, teacher, temperature)
    if ce is None:
        return kd, {"kd": kd.item()}
    total = (1.0 - alpha) * kd + alpha * ce
    return total, {"kd": kd.item(), "ce": ce.item()}
