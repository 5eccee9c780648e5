"""The distillation training loop: AdamW, warmup + cosine, clipping, accumulation, resume.

Data order is a pure function of (seed, step), so "data position" is just the step: a run
killed after step k and resumed from its checkpoint replays exactly the batches of the
uninterrupted run. Under torchrun each rank takes its slice of every global batch, so the
global batch (``micro_batch_size * grad_accum * world_size`` sequences) and hence the loss
curve match a single-process run with the same global batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from slmcompress import dist
from slmcompress.distill.checkpointing import (
    CHECKPOINT_DIR,
    check_fingerprint,
    load_training_state,
    read_trainer_json,
    save_training_state,
)
from slmcompress.distill.hidden import HiddenCapture, hidden_state_loss
from slmcompress.distill.losses import LossName, TopK, distill_loss
from slmcompress.errors import PassError
from slmcompress.progress import progress_bar

log = logging.getLogger(__name__)

#: teacher(sequence ids (B,), input_ids (B, T)) -> full logits (B, T, V), TopK, or None (CE only)
TeacherFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | TopK | None"]


@dataclass(frozen=True)
class TrainSettings:
    """Everything that shapes the loss curve (it is part of the resume fingerprint)."""

    max_steps: int
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    warmup_steps: int = 0
    micro_batch_size: int = 1
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    loss: LossName = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.0
    hidden_weight: float = 0.0
    #: bf16 autocast of the student forward: auto = on CUDA only, bf16 = any device, off = fp32
    autocast: Literal["auto", "bf16", "off"] = "auto"
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0

    def global_batch(self, world: int) -> int:
        return self.micro_batch_size * self.grad_accum * world


@dataclass
class TrainResult:
    """Per-step history (loss, lr, tokens, eval ppl) and throughput of this invocation."""

    history: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0
    resumed_from: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (1-D parameters), as is standard for LMs.

    Parameters flagged ``no_weight_decay`` (quantization step sizes and latent weights,
    see :mod:`slmcompress.quant.trainable`) are never decayed either.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and not getattr(p, "no_weight_decay", False)]
    no_decay = [p for p in params if not any(p is d for d in decay)]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def trainer_autocast(option: str, device: torch.device) -> bool:
    """Whether the student forward runs under bf16 autocast (``auto``: on CUDA only)."""
    return option == "bf16" or (option == "auto" and device.type == "cuda")


def batch_order(n_sequences: int, seed: int) -> torch.Tensor:
    """The seeded visiting order of the training sequences (one epoch, no repeats)."""
    generator = torch.Generator().manual_seed(seed)  # CPU: the same order on every machine
    return torch.randperm(n_sequences, generator=generator, device="cpu")


def micro_batch_ids(order: torch.Tensor, step: int, micro: int, s: TrainSettings) -> torch.Tensor:
    """Sequence ids of this rank's ``micro``-th micro-batch of global step ``step``."""
    world, rank = dist.world_size(), dist.rank()
    start = step * s.global_batch(world) + (micro * world + rank) * s.micro_batch_size
    return order[start : start + s.micro_batch_size]


class Trainer:
    """Trains ``model`` on ``sequences`` (N, T) against ``teacher``; resumable from ``work_dir``."""

    def __init__(
        self,
        model: nn.Module,
        sequences: torch.Tensor,
        teacher: TeacherFn,
        settings: TrainSettings,
        work_dir: Path,
        fingerprint: dict[str, Any],
        device: torch.device,
        *,
        eval_fn: Callable[[nn.Module], float] | None = None,
        on_step: Callable[[int], None] | None = None,
        show_progress: bool = True,
        where: str = "distill",
        teacher_hidden: HiddenCapture | None = None,
    ) -> None:
        self.model, self.sequences, self.teacher, self.s = model, sequences, teacher, settings
        self.work_dir, self.device, self.eval_fn, self.on_step = (
            Path(work_dir),
            device,
            eval_fn,
            on_step,
        )
        shaping = {
            k: v for k, v in asdict(settings).items() if k not in ("eval_every", "save_every")
        }
        self.fingerprint = {**fingerprint, "settings": shaping, "world_size": dist.world_size()}
        self.show_progress = show_progress and dist.is_main()
        self.where = where
        self.teacher_hidden = teacher_hidden  # hooks on the teacher layers matched to the student's
        self.student_hidden: HiddenCapture | None = None
        if settings.hidden_weight > 0 and teacher_hidden is None:
            raise ValueError("hidden_weight > 0 needs the teacher's hidden-state capture")
        self.order = batch_order(sequences.shape[0], settings.seed)
        self.optimizer = make_optimizer(model, settings.lr, settings.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, self._lr_lambda)
        self.autocast = trainer_autocast(settings.autocast, device)

    def _lr_lambda(self, step: int) -> float:
        return lr_factor(step, self.s.warmup_steps, self.s.max_steps, self.s.min_lr_ratio)

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        """Run (or resume) to ``max_steps``; return the full history (resumed steps included)."""
        result = TrainResult()
        meta = check_fingerprint(self.work_dir, self.fingerprint, self.where)
        if meta is not None:
            meta = load_training_state(self.work_dir, self.model, self.optimizer, self.scheduler)
            result.history, result.resumed_from = meta["history"], meta["step"]
            log.info("resuming distillation from step %d (%s)", meta["step"], self.work_dir)
        tokens_per_step = self.s.global_batch(dist.world_size()) * self.sequences.shape[1]
        self.model.train()
        if self.teacher_hidden is not None:
            self.student_hidden = HiddenCapture(self.model, grad_only=True)
        try:
            self._loop(result, tokens_per_step)
        finally:
            if self.student_hidden is not None:
                self.student_hidden.remove()
                self.student_hidden = None
        self.model.eval()
        return result

    def _loop(self, result: TrainResult, tokens_per_step: int) -> None:
        with progress_bar("distill", total=self.s.max_steps, enabled=self.show_progress) as advance:
            advance(result.resumed_from)
            for step in range(result.resumed_from, self.s.max_steps):
                start = time.perf_counter()
                record = self._step(step)
                result.train_seconds += time.perf_counter() - start
                result.tokens += tokens_per_step
                record.update(tokens=(step + 1) * tokens_per_step)
                self._maybe_eval(step, record)
                result.history.append(record)
                self._maybe_save(step, result)
                advance(1, info=f"loss {record['loss']:.4f}  {result.tokens_per_s:,.0f} tok/s")
                if self.on_step is not None:
                    self.on_step(step + 1)

    def _step(self, step: int) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches."""
        totals: dict[str, float] = {}
        for micro in range(self.s.grad_accum):
            ids = micro_batch_ids(self.order, step, micro, self.s)
            input_ids = self.sequences[ids].to(self.device)  # (B, T)
            with torch.no_grad():
                targets = self.teacher(ids, input_ids)
            teacher_states = self.teacher_hidden.pop() if self.teacher_hidden else None
            kind = self.device.type if self.autocast else "cpu"  # autocast knows no "meta"
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
            loss, parts = distill_loss(
                logits, input_ids, targets, self.s.loss, self.s.temperature, self.s.alpha
            )
            if teacher_states is not None and self.student_hidden is not None:
                hidden = hidden_state_loss(self.student_hidden.pop(), teacher_states)
                loss = loss + self.s.hidden_weight * hidden
                parts["hidden"] = hidden.item()
            (loss / self.s.grad_accum).backward()
            for name, value in {"loss": loss.item(), **parts}.items():
                totals[name] = totals.get(name, 0.0) + value / self.s.grad_accum
        totals = _mean_over_ranks(totals, self.device)
        grad_norm = self._clip()
        self._check_finite(step, totals["loss"], grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "step": step + 1,
            **totals,
            "lr": lr,
            "grad_norm": grad_norm,
        }

    def _check_finite(self, step: int, loss: float, grad_norm: float) -> None:
        """Stop before a NaN/inf update reaches the weights; the last checkpoint stays valid.

        Checked on rank-averaged values, so every rank stops at the same step.
        """
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        saved = read_trainer_json(self.work_dir)
        kept = (
            f"the last good checkpoint (step {saved['step']}) is kept in "
            f"{self.work_dir / CHECKPOINT_DIR}"
            if saved
            else "no checkpoint was saved yet"
        )
        raise PassError(
            f"{self.where}: {what} at step {step + 1}; training stopped before that update, "
            f"{kept} (a rerun resumes from it; a lower lr starts over)"
        )

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.s.grad_clip if self.s.grad_clip else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _maybe_eval(self, step: int, record: dict[str, Any]) -> None:
        """Held-out ppl every ``eval_every`` steps (0: never mid-run) and always after the last step."""
        periodic = self.s.eval_every and (step + 1) % self.s.eval_every == 0
        if self.eval_fn is None or not (periodic or step + 1 == self.s.max_steps):
            return
        record["eval_ppl"] = float(self.eval_fn(self.model))
        self.model.train()
        log.info(
            "step %d: train loss %.4f, held-out ppl %.3f",
            step + 1,
            record["loss"],
            record["eval_ppl"],
        )

    def _maybe_save(self, step: int, result: TrainResult) -> None:
        done = step + 1
        if not self.s.save_every or (done % self.s.save_every and done != self.s.max_steps):
            return
        state = {"fingerprint": self.fingerprint, "step": done, "history": result.history}
        save_training_state(self.work_dir, self.model, self.optimizer, self.scheduler, state)


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average logged scalars over ranks (gloo has no AVG op: sum, then divide)."""
    if not dist.is_distributed():
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return dict(zip(keys, (tensor / dist.world_size()).tolist(), strict=True))


def plot_history(history: list[dict[str, Any]], path: Path, title: str = "distillation") -> Path:
    """Loss (left) and held-out perplexity (right) against training tokens, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["tokens"] for r in history]
    evals = [(r["tokens"], r["eval_ppl"]) for r in history if "eval_ppl" in r]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(tokens, [r["loss"] for r in history], lw=1)
    ax_loss.set(xlabel="training tokens", ylabel="train loss", title=title)
    if evals:
        ax_ppl.plot(*zip(*evals, strict=True), marker="o")
    ax_ppl.set(xlabel="training tokens", ylabel="held-out ppl", title="held-out perplexity")
    for axis in (ax_loss, ax_ppl):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
