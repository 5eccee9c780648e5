"""Stage reports: the fixed ``report.json`` schema, its one writer and its Markdown renderings.

The same evaluator measures every stage, so numbers are comparable across the summary.
Which evaluator runs (in memory or streamed) is :mod:`slmcompress.eval.artifact`'s decision.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmcompress.data import EvalOptions, EvalSpec, eval_tokens
from slmcompress.eval.perplexity import perplexity
from slmcompress.eval.speed import generation_speed
from slmcompress.eval.tasks import run_tasks  # imports lm-eval itself, only when run
from slmcompress.fsutil import atomic_write_text
from slmcompress.io.checkpoint import CheckpointInfo, bytes_on_disk
from slmcompress.kernels.dispatch import prepare_for_serving
from slmcompress.memory_model import ModelDims
from slmcompress.quant.quant_linear import QuantLinear, cached_dequantization
from slmcompress.streaming.loader import WeightSource

log = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1
METRIC_LABELS = {
    "wikitext2_ppl": "WikiText-2 ppl",
    "hellaswag_acc": "HellaSwag acc",
    "hellaswag_acc_norm": "HellaSwag acc_norm",
    "tokens_per_s": "gen tokens/s",
}
LOWER_IS_BETTER = {"wikitext2_ppl"}
#: how the report warning of a model whose metrics were skipped starts (for readers)
NOT_EVALUATED = "not evaluated:"


@dataclass(frozen=True)
class NotEvaluated:
    """The report field ``not_evaluated``: metrics a report lacks, and why."""

    reason: str  # why the model was not loaded (over the memory budget)
    warning: str  # the line of the report's warnings that says so


def streamed_warning(reason: str) -> str:
    """The report warning of a model evaluated by streaming: which metrics are missing."""
    return (
        f"{NOT_EVALUATED} task accuracy and generation speed ({reason}); "
        "perplexity was measured by a streamed forward, one decoder layer at a time"
    )


def skipped_for_budget(report: dict[str, Any]) -> bool:
    """Metrics skipped for the budget: the typed field, or (reports written before it
    existed) a warning with the old prefix, so resuming an old run still re-evaluates."""
    if "not_evaluated" in report:
        return report["not_evaluated"] is not None
    return any(str(w).startswith(NOT_EVALUATED) for w in report.get("warnings", []))


def previous_warnings(report: dict[str, Any]) -> list[str]:
    """A report's warnings without the one saying its metrics were skipped for the budget
    (what a re-evaluation keeps; the typed field names it, older reports only the prefix)."""
    if "not_evaluated" in report:
        skipped = (report["not_evaluated"] or {}).get("warning")
        return [w for w in report["warnings"] if w != skipped]
    return [w for w in report["warnings"] if not str(w).startswith(NOT_EVALUATED)]


def count_params(model: nn.Module) -> tuple[int, int]:
    """Logical parameter count (a QuantLinear counts its in*out weights) and the non-embedding part."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.in_features * module.out_features
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if head is not None and not tied and isinstance(head, nn.Linear):
        embedding += head.weight.numel()
    return total, total - embedding


def model_summary(model: PreTrainedModel, checkpoint_dir: Path | None) -> dict[str, Any]:
    """Architecture, parameter counts and checkpoint size."""
    cfg = model.config
    params, non_embedding = count_params(model)
    qcfg = getattr(cfg, "quantization_config", None)
    quant = None
    if isinstance(qcfg, dict):
        quant = {k: qcfg.get(k) for k in ("quant_method", "bits", "group_size", "sym", "desc_act")}
        quant["method"] = (qcfg.get("meta") or {}).get("method", qcfg.get("quant_method"))
        quant["quantized_linears"] = sum(isinstance(m, QuantLinear) for m in model.modules())
    arch = {
        "model_type": cfg.model_type,
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None),
        "head_dim": getattr(cfg, "head_dim", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "quantization": quant,
    }
    size = bytes_on_disk(checkpoint_dir) if checkpoint_dir else None
    return {
        "params": params,
        "non_embedding_params": non_embedding,
        "bytes_on_disk": size,
        "arch": arch,
    }


def summary_from_checkpoint(checkpoint: Path | CheckpointInfo) -> dict[str, Any]:
    """:func:`model_summary` from config.json and the shard headers alone (model never loaded).

    For checkpoints too big for the memory budget (streamed stages, the 70B path);
    ``checkpoint``: a directory, or the :class:`CheckpointInfo` a caller already read.
    """
    if isinstance(checkpoint, CheckpointInfo):
        cfg, entries, size = checkpoint.config, checkpoint.entries(), checkpoint.bytes_on_disk()
    else:
        directory = Path(checkpoint)
        cfg = json.loads((directory / "config.json").read_text())
        entries, size = None, bytes_on_disk(directory)
    arch = ModelDims.from_config(cfg)
    params = arch.params()
    qcfg = cfg.get("quantization_config")
    quant = None
    if isinstance(qcfg, dict):
        quant = {k: qcfg.get(k) for k in ("quant_method", "bits", "group_size", "sym", "desc_act")}
        quant["method"] = (qcfg.get("meta") or {}).get("method", qcfg.get("quant_method"))
        if entries is None:
            entries = WeightSource(directory).entries
        quant["quantized_linears"] = sum(n.endswith(".qweight") for n in entries)
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
    return {
        "params": params,
        "non_embedding_params": params - arch.embed_params() * (1 if arch.tied else 2),
        "bytes_on_disk": size,
        "arch": {
            "model_type": cfg.get("model_type"),
            **{("num_layers" if k == "num_hidden_layers" else k): cfg.get(k) for k in keys},
            "num_key_value_heads": cfg.get("num_key_value_heads"),
            "head_dim": arch.head_dim,
            "vocab_size": cfg.get("vocab_size"),
            "quantization": quant,
        },
    }


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_spec: EvalSpec,
    options: EvalOptions,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Measure perplexity, task accuracy and generation speed of a model in memory.

    Returns:
        ``(metrics, timings)``; metrics absent from the options are ``None``.
    """
    metrics: dict[str, Any] = dict.fromkeys(METRIC_LABELS)
    timings: dict[str, float] = {}
    if options.ppl:
        start = time.perf_counter()
        tokens = eval_tokens(tokenizer, eval_spec)
        # the exact reference (even where a kernel backend is set), at float speed
        with cached_dequantization(model):
            result = perplexity(model, tokens, eval_spec.seq_len, show_progress=True)
        metrics["wikitext2_ppl"] = result.ppl
        metrics["eval_tokens"] = result.n_tokens
        metrics["eval_seq_len"] = result.seq_len
        timings["ppl_s"] = time.perf_counter() - start
    if options.tasks:
        start = time.perf_counter()
        with cached_dequantization(model):
            results = run_tasks(
                model, tokenizer, options.tasks, limit=options.limit, batch_size=options.batch_size
            )
        for task, values in results.items():
            for key, value in values.items():
                metrics[f"{task}_{key}"] = value
        timings["tasks_s"] = time.perf_counter() - start
    if options.speed:
        start = time.perf_counter()
        backends = prepare_for_serving(model)  # time the serving path, not the reference
        speed = generation_speed(model, tokenizer, new_tokens=options.speed_tokens)
        metrics["tokens_per_s"] = speed["tokens_per_s"]
        if backends:
            metrics["speed_backends"] = backends
        timings["speed_s"] = time.perf_counter() - start
    return metrics, timings


def deltas(metrics: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, float] | None:
    """Per-metric differences ``metrics - reference`` for the headline metrics."""
    if not reference:
        return None
    out = {}
    for key in METRIC_LABELS:
        a, b = metrics.get(key), reference.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            out[key] = a - b
    return out


def build_report(
    stage: str,
    pass_name: str,
    config: dict[str, Any],
    model: dict[str, Any],
    metrics: dict[str, Any],
    input_metrics: dict[str, Any] | None,
    original_metrics: dict[str, Any] | None,
    timings: dict[str, float],
    warnings: list[str],
    extra: dict[str, Any] | None = None,
    not_evaluated: NotEvaluated | None = None,
) -> dict[str, Any]:
    """Assemble ``report.json`` (the fixed schema: README, "Output layout and formats")."""
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "stage": stage,
        "pass": pass_name,
        "config": config,
        "model": model,
        "metrics": metrics,
        "deltas": {
            "vs_input": deltas(metrics, input_metrics),
            "vs_original": deltas(metrics, original_metrics),
        },
        "timings": timings,
        "warnings": warnings,
        # metrics left out because the model is over the memory budget: {reason, warning}
        "not_evaluated": asdict(not_evaluated) if not_evaluated else None,
        "extra": extra or {},
    }


def write_report(directory: Path, report: dict[str, Any]) -> None:
    """``report.json`` and ``report.md`` into ``directory``, each replaced atomically."""
    atomic_write_text(directory / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(directory / "report.md", render_report_md(report))


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _fmt_delta(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4g}"


def _deployment_md(dep: dict[str, Any] | None, metrics: dict, deltas: dict) -> list[str]:
    """An export stage's file measured in its runtime, beside our torch numbers."""
    if not dep:
        return []
    lines = ["", "## Deployment", "", f"File: {_fmt(dep['file_bytes'])} bytes."]
    if not dep.get("runtime"):
        return lines + [f"Not measured in its runtime: {dep.get('skipped')}."]
    ours = metrics.get("wikitext2_ppl")
    delta = (deltas.get("vs_original") or {}).get("wikitext2_ppl")  # ours - original
    original = ours - delta if ours is not None and delta is not None else None
    rows = [
        ("WikiText-2 ppl in the runtime", f"{dep['wikitext2_ppl']:.2f}"),
        ("same weights in torch (this report)", f"{ours:.2f}" if ours is not None else "n/a"),
        ("runtime ppl vs the original float model",
         f"{100 * (dep['wikitext2_ppl'] / original - 1):+.1f}%" if original else "n/a"),
        ("decode tokens/s (batch 1)", _fmt(dep["decode_tokens_per_s"])),
        ("RSS to load", f"{dep['load_rss_bytes'] / 2**20:.0f} MiB"),
        ("threads", str(dep["threads"])),
    ]  # fmt: skip
    return lines + [
        f"Measured in {dep['runtime']}:",
        "",
        "| | value |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]


def render_report_md(report: dict[str, Any]) -> str:
    """Human-readable rendering of one stage report."""
    m, model = report["metrics"], report["model"]
    vs_in = report["deltas"]["vs_input"] or {}
    vs_orig = report["deltas"]["vs_original"] or {}
    lines = [
        f"# Stage `{report['stage']}` ({report['pass']})",
        "",
        "| metric | value | Δ vs input | Δ vs original |",
        "|---|---:|---:|---:|",
    ]
    for key, label in METRIC_LABELS.items():
        lines.append(
            f"| {label} | {_fmt(m.get(key))} | {_fmt_delta(vs_in.get(key))} | {_fmt_delta(vs_orig.get(key))} |"
        )
    arch = model["arch"]
    lines += [
        "",
        "| model | value |",
        "|---|---:|",
        f"| params | {_fmt(model['params'])} |",
        f"| non-embedding params | {_fmt(model['non_embedding_params'])} |",
        f"| bytes on disk | {_fmt(model['bytes_on_disk'])} |",
    ]
    for key in (
        "num_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
    ):
        lines.append(f"| {key} | {_fmt(arch.get(key))} |")
    if arch.get("quantization"):
        q = arch["quantization"]
        lines.append(
            f"| quantization | {q['method']} {q['bits']}-bit g{q['group_size']} ({q['quantized_linears']} linears) |"
        )
    if m.get("eval_tokens"):
        lines += [
            "",
            f"Perplexity on {m['eval_tokens']:,} tokens in {m['eval_seq_len']}-token windows.",
        ]
    if m.get("speed_backends"):
        used = ", ".join(f"{name} x{n}" for name, n in m["speed_backends"].items())
        lines += ["", f"Decode speed measured on the serving backends: {used}."]
    lines += _deployment_md(report.get("extra", {}).get("deployment"), m, report["deltas"])
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items())]
    if report["warnings"]:
        lines += ["", "## Warnings", *[f"- {w}" for w in report["warnings"]]]
    return "\n".join(lines) + "\n"


def render_summary_md(recipe_name: str, rows: list[dict[str, Any]]) -> str:
    """One table: the input model and every stage side by side."""
    header = (
        "| stage | pass | params | non-emb params | MB on disk | "
        + " | ".join(METRIC_LABELS.values())
        + " |"
    )
    lines = [f"# Run summary: {recipe_name}", "", header, "|" + "---|" * (5 + len(METRIC_LABELS))]
    for row in rows:
        model = row["model"]
        size = model.get("bytes_on_disk")
        cells = [
            row["stage"],
            row["pass"],
            _fmt(model["params"]),
            _fmt(model["non_embedding_params"]),
            "—" if size is None else f"{size / 1e6:.1f}",
        ]
        cells += [_fmt(row["metrics"].get(k)) for k in METRIC_LABELS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
