"""Evaluate one artifact -- a model in memory or a checkpoint directory -- within a budget.

The one place that decides how an artifact is measured: a model in memory is evaluated as
it is; a checkpoint that fits the host budget is loaded and evaluated (the loaded model
comes back, so a caller can keep it); one over the budget gets a perplexity by a streamed
forward, one decoder layer resident, and the report says what was not measured and why
(:class:`~slmcompress.eval.report.NotEvaluated`). The runner (input model, every stage,
resume) and ``slmcompress eval`` all call :func:`evaluate_artifact`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmcompress.data import EvalOptions, EvalSpec
from slmcompress.errors import PassError
from slmcompress.eval.report import (
    METRIC_LABELS,
    NOT_EVALUATED,
    NotEvaluated,
    evaluate,
    model_summary,
    streamed_warning,
    summary_from_checkpoint,
)
from slmcompress.eval.streamed import evaluate_streamed
from slmcompress.io.checkpoint import CheckpointInfo, load_checkpoint
from slmcompress.kernels.dispatch import prepare_for_serving
from slmcompress.streaming.publish import load_tokenizer
from slmcompress.streaming.residency import over_budget

log = logging.getLogger(__name__)

#: loads a checkpoint (directory or what was read of it) that fits the budget
Loader = Callable[[Any], tuple[PreTrainedModel, PreTrainedTokenizerBase]]


@dataclass(frozen=True)
class EvalBudget:
    """Where an artifact is evaluated, and the host memory it may take."""

    max_memory: int | str | None  # over it, a checkpoint is streamed (None: auto)
    device: torch.device
    dtype: torch.dtype
    work_dir: Path  # scratch of a streamed evaluation, removed afterwards


@dataclass
class Evaluation:
    """The typed report of one artifact: ``report.json``'s ``model``, ``metrics``,
    ``timings`` and ``not_evaluated`` (metrics left out for the budget, and why)."""

    metrics: dict[str, Any]
    timings: dict[str, float]
    summary: dict[str, Any]
    not_evaluated: NotEvaluated | None = None
    # the model loaded to evaluate a checkpoint (None when streamed or given): keep it
    model: PreTrainedModel | None = field(default=None, repr=False)
    tokenizer: PreTrainedTokenizerBase | None = field(default=None, repr=False)

    @property
    def streamed(self) -> bool:
        """Whether the artifact was over the budget (perplexity streamed, or not measured)."""
        return self.not_evaluated is not None

    @property
    def warnings(self) -> list[str]:
        """The report warnings this evaluation adds (what it could not measure)."""
        return [self.not_evaluated.warning] if self.not_evaluated else []

    notes = warnings  # what ``slmcompress eval`` prints under its table


def load_for_eval(
    checkpoint: Path | CheckpointInfo, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A written checkpoint on ``device``; on CUDA its GPTQ layers on the Triton kernel, so
    reports measure the served path (CPU keeps the torch reference)."""
    model, tokenizer = load_checkpoint(checkpoint, dtype=dtype)
    model.to(device).eval()
    if device.type == "cuda":
        prepare_for_serving(model)
    return model, tokenizer


def evaluate_artifact(
    artifact: PreTrainedModel | Path | CheckpointInfo,
    spec: EvalSpec,
    options: EvalOptions,
    budget: EvalBudget,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    checkpoint_dir: Path | None = None,
    load: Loader | None = None,
    stream: bool = True,
) -> Evaluation | None:
    """Measure ``artifact`` as ``options`` asks, in memory when it fits ``budget``.

    Args:
        artifact: a model in memory (with its ``tokenizer``), or a checkpoint: its
            directory, or the :class:`~slmcompress.io.checkpoint.CheckpointInfo` a caller
            read (handed down to the load, streamed or not, instead of read again).
        spec: the perplexity data. options: what to measure. budget: where and within what.
        tokenizer: the tokenizer of a model given in memory.
        checkpoint_dir: where a model given in memory is stored (its size on disk), if anywhere.
        load: how a checkpoint that fits is loaded (default :func:`load_for_eval`); it
            gets ``artifact`` as given.
        stream: ``False`` returns ``None`` for a directory over the budget instead of
            streaming it (a resumed run keeps the report it has: nothing new to measure).

    A budget too small for even one streamed layer leaves the metrics ``None`` with both
    reasons in ``not_evaluated``: evaluation reports, it never fails a run.
    """
    if isinstance(artifact, PreTrainedModel):
        metrics, timings = evaluate(artifact, tokenizer, spec, options)
        return Evaluation(metrics, timings, model_summary(artifact, checkpoint_dir))
    directory = artifact.directory if isinstance(artifact, CheckpointInfo) else Path(artifact)
    reason = over_budget(directory, budget.max_memory, budget.dtype)
    if reason is None:
        model, tokenizer = (load or _default_loader(budget))(artifact)
        metrics, timings = evaluate(model, tokenizer, spec, options)
        return Evaluation(metrics, timings, model_summary(model, directory), None, model, tokenizer)
    if not stream:
        return None
    checkpoint = artifact if isinstance(artifact, CheckpointInfo) else directory
    return _streamed(
        checkpoint, spec, options, budget, f"{reason}; raise max_memory to evaluate it"
    )


def _default_loader(budget: EvalBudget) -> Loader:
    return lambda checkpoint: load_for_eval(checkpoint, budget.device, budget.dtype)


def _streamed(
    checkpoint: Path | CheckpointInfo,
    spec: EvalSpec,
    options: EvalOptions,
    budget: EvalBudget,
    reason: str,
) -> Evaluation:
    """Perplexity of a checkpoint over the budget, one layer resident at a time."""
    directory = checkpoint.directory if isinstance(checkpoint, CheckpointInfo) else checkpoint
    log.warning("%s: %s %s", directory, NOT_EVALUATED, reason)
    summary = summary_from_checkpoint(checkpoint)
    try:
        metrics, timings = evaluate_streamed(
            checkpoint,
            load_tokenizer(directory),
            spec,
            options,
            budget.device,
            budget.dtype,
            budget.work_dir,
            budget.max_memory,
        )
    except PassError as exc:
        log.warning("streamed evaluation: %s", exc)
        warning = f"{NOT_EVALUATED} {reason}; streaming it does not fit: {exc}"
        return Evaluation(dict.fromkeys(METRIC_LABELS), {}, summary, NotEvaluated(reason, warning))
    finally:
        shutil.rmtree(budget.work_dir, ignore_errors=True)
    return Evaluation(metrics, timings, summary, NotEvaluated(reason, streamed_warning(reason)))
