"""Task accuracy through the lm-eval harness, fully offline.

Tasks are local lm-eval YAMLs (``lm_eval_tasks/*.yaml.in``) that read the jsonl slices shipped
in ``slmcompress/data_files``. A YAML cannot hold a runtime path portably, so each template is
rendered with absolute paths into a temporary directory that ``TaskManager(include_path=...)``
indexes; the harness then scores the in-memory model (float, pruned or ``QuantLinear``-based)
exactly as ``lm_eval --tasks hellaswag`` would, without touching a hub.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from string import Template
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmcompress.data import data_file
from slmcompress.errors import SlmError

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
# user-facing name -> (lm-eval task name, template file, {placeholder: shipped data file})
TASKS: dict[str, tuple[str, str, dict[str, str]]] = {
    "hellaswag": (
        "hellaswag_slm",
        "hellaswag_slm.yaml.in",
        {"data_file": "hellaswag/hellaswag_val_2k.jsonl"},
    ),
}
METRICS = ("acc", "acc_norm", "acc_bytes")
EXPECTED_WARNINGS = (
    "`pretrained` model kwarg is not of type",
    "Passed an already-initialized model",
)
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
NOISY_LOGGERS = (
    "lm_eval",
    "lm-eval",
    "datasets",
    "evaluate",
    "fsspec",
    "filelock",
    "httpx",
    "urllib3",
)


def available_tasks() -> list[str]:
    """Names accepted by :func:`run_tasks`."""
    return sorted(TASKS)


def _check_tasks(tasks: list[str]) -> list[str]:
    """Map user names to lm-eval task names; unknown names fail in one line."""
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise SlmError(
            f"eval: unknown task(s) {', '.join(map(repr, unknown))}; "
            f"valid tasks: {', '.join(available_tasks())}"
        )
    return [TASKS[task][0] for task in tasks]


def render_task_yaml(task: str) -> str:
    """The lm-eval YAML of ``task`` with the shipped data files' absolute paths filled in."""
    _, template, files = TASKS[task]
    # JSON strings are valid YAML double-quoted scalars: safe for any path characters.
    paths = {key: json.dumps(str(data_file(rel).resolve())) for key, rel in files.items()}
    return Template((TASK_DIR / template).read_text()).substitute(paths)


def _write_task_dir(directory: Path, tasks: list[str]) -> None:
    for task in tasks:
        (directory / f"{TASKS[task][0]}.yaml").write_text(render_task_yaml(task))


@contextmanager
def _environment(updates: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block and restore the previous values after it."""
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _drop_expected_warnings(record: logging.LogRecord) -> bool:
    """HFLM warns on every in-memory model (the documented way we call it); drop those two."""
    return not str(record.msg).startswith(EXPECTED_WARNINGS)


@contextmanager
def _quiet_logging(level: int = logging.WARNING) -> Iterator[None]:
    """Raise lm-eval's (and its dependencies') loggers to ``level`` for the block."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    hf_logger.addFilter(_drop_expected_warnings)
    try:
        yield
    finally:
        hf_logger.removeFilter(_drop_expected_warnings)
        for logger, old in zip(loggers, saved, strict=True):
            logger.setLevel(old)


@contextmanager
def _without_quantization_config(model: PreTrainedModel) -> Iterator[None]:
    """Hide ``config.quantization_config`` from HFLM for the block.

    HFLM parses that dict with transformers' quantizer classes, which is only needed when it
    loads a model itself and can fail for our in-memory ``QuantLinear`` models.
    """
    config = model.config
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is None:
        yield
        return
    del config.quantization_config
    try:
        yield
    finally:
        config.quantization_config = qcfg


def _collect(results: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Flatten lm-eval's ``results`` into ``{task: {acc, acc_norm, ..., n}}`` per user name."""
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        name = TASKS[task][0]
        raw = results["results"][name]
        values: dict[str, float] = {}
        for metric in METRICS:
            if f"{metric},none" in raw:
                values[metric] = float(raw[f"{metric},none"])
                stderr = raw.get(f"{metric}_stderr,none")
                if isinstance(stderr, (int, float)):
                    values[f"{metric}_stderr"] = float(stderr)
        values["n"] = int(results["n-samples"][name]["effective"])
        out[task] = values
    return out


@torch.no_grad()
def run_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of ``model`` on ``tasks`` via ``lm_eval.simple_evaluate``, offline.

    Args:
        model: A causal LM on any device (the harness uses ``model.device``).
        tokenizer: Its tokenizer.
        tasks: User-facing names from :func:`available_tasks` (e.g. ``["hellaswag"]``).
        limit: Score only the first ``limit`` items of each task (all when ``None``).
        batch_size: Log-likelihood requests per forward pass.
        seed: Seed for lm-eval's python/numpy/torch RNGs (zero-shot scoring uses none).

    Returns:
        ``{"hellaswag": {"acc": .., "acc_norm": .., "acc_bytes": .., "<metric>_stderr": .., "n": ..}}``.
    """
    names = _check_tasks(tasks)
    if not names:
        return {}
    with (
        _environment(OFFLINE_ENV),
        _quiet_logging(),
        tempfile.TemporaryDirectory(prefix="slm-tasks-") as tmp,
        _without_quantization_config(model),
    ):
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        _write_task_dir(Path(tmp), tasks)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        # float32 log-softmax keeps bf16/fp16 models' scores comparable with float ones.
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            softmax_dtype=torch.float32,
        )
        log.info(
            "lm-eval: %s on %s (limit=%s, batch_size=%d)",
            ", ".join(tasks),
            lm.device,
            limit,
            batch_size,
        )
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            limit=limit,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    return _collect(results, tasks)
