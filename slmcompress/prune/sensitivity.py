"""Pruning sensitivity: how perplexity degrades as each axis is pruned, before committing to a target.

Minitron (Muralidharan et al. 2024, sec. 4) chose its targets from exactly such sweeps:
prune one axis at several ratios with activation importance and measure the LM; depth
also gets the per-layer importance and the layer-drop curve (Sreenivas et al. 2024).
Everything (CSV, JSON, PNG plots, a Markdown summary) is written atomically into one
output directory.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmcompress.arch import decoder_layers, family_for
from slmcompress.data import CalibrationSpec, EvalSpec, calibration_tokens, eval_tokens
from slmcompress.errors import PassError
from slmcompress.eval.perplexity import perplexity
from slmcompress.eval.report import count_params
from slmcompress.fsutil import atomic_dir, replace_problem
from slmcompress.layerwise import MemoryLoop
from slmcompress.prune.importance import (
    Importance,
    activation_importance,
    check_supported,
    layers_removed,
    loss_depth_scores,
    magnitude_importance,
    model_parts,
    random_importance,
)
from slmcompress.prune.planner import (
    AXES,
    KeepPlan,
    plan_keep,
    select_heads,
    sizes_for_removal,
    sizes_of,
    top_k,
)
from slmcompress.prune.reconstruction import RefitSettings, reconstruct
from slmcompress.prune.slicing import head_channels, slice_model

log = logging.getLogger(__name__)


@dataclass
class SensitivityResult:
    """What :func:`sensitivity` measured and where it wrote it."""

    out_dir: Path
    baseline_ppl: float
    rows: list[dict[str, Any]]  # one per (axis, ratio)
    layer_scores: list[dict[str, Any]]  # one per (axis, layer)
    per_layer: list[dict[str, Any]] = field(default_factory=list)  # one per (axis, layer, ratio)
    notes: list[str] = field(default_factory=list)


def score(
    model: PreTrainedModel,
    calib: torch.Tensor,
    method: str,
    depth_metric: str,
    need_depth: bool,
    device: torch.device,
    batch_size: int,
    seed: int,
) -> Importance:
    """Importance by method; activation depth scores by LM loss when asked."""
    if method == "magnitude":
        return magnitude_importance(model)
    if method == "random":
        return random_importance(model, seed)
    importance = activation_importance(model, calib, device, batch_size)
    if need_depth and depth_metric == "loss":
        importance.layers, _ = loss_depth_scores(model, calib, 1, batch_size)
        importance.extra["depth_metric"] = "loss"
    return importance


@dataclass(frozen=True)
class Refitting:
    """Re-fit the consumers of each candidate as a prune stage with ``reconstruct`` would."""

    settings: RefitSettings
    calib: torch.Tensor  # (N, T) calibration ids
    device: torch.device
    batch_size: int


def pruned_candidate(
    model: PreTrainedModel, plan: KeepPlan, refitting: Refitting | None
) -> PreTrainedModel:
    """The model sliced to ``plan``, its consumers re-fitted first when asked."""
    if refitting is None:
        return slice_model(model, plan)
    loop = MemoryLoop(model, refitting.calib, refitting.device, refitting.batch_size)
    refits = reconstruct(loop, plan, family_for(model), refitting.settings)
    return slice_model(model, plan, refits.reader)


def axis_rows(
    model,
    importance: Importance,
    axis: str,
    ratios: Sequence[float],
    tokens,
    seq_len: int,
    head_pruning: str,
    baseline: float,
    refitting: Refitting | None = None,
) -> list[dict[str, Any]]:
    """Prune the whole model along one axis at each ratio and measure perplexity."""
    current = sizes_of(model.config)
    full = count_params(model)[1]
    rows = []
    for ratio in ratios:
        sizes = sizes_for_removal(current, axis, ratio, head_pruning)
        pruned = pruned_candidate(model, plan_keep(importance, current, sizes), refitting)
        ppl = perplexity(pruned, tokens, seq_len).ppl
        field_name = {
            "mlp": "ffn_hidden_size",
            "hidden": "hidden_size",
            "layers": "num_layers",
            "heads": "num_attention_heads",
        }[axis]
        before, after = getattr(current, field_name), getattr(sizes, field_name)
        rows.append(
            {
                "axis": axis,
                "ratio": ratio,
                "removed": round(1 - after / before, 4),
                "size": after,
                "num_key_value_heads": sizes.num_key_value_heads,
                "non_embedding_ratio": round(count_params(pruned)[1] / full, 4),
                "ppl": round(ppl, 4),
                "ppl_vs_baseline": round(ppl / baseline, 4),
            }
        )
        log.info("sensitivity %s %.2f -> %s=%d ppl %.2f", axis, ratio, field_name, after, ppl)
        del pruned
    return rows


def layer_scores(importance: Importance, axis: str) -> list[dict[str, Any]]:
    """Per-layer importance totals (heads, neurons) or depth scores (layers)."""
    if axis == "heads":
        values = [float(h.sum()) for h in importance.heads]
    elif axis == "mlp":
        values = [float(n.sum()) for n in importance.neurons]
    elif axis == "layers" and importance.layers is not None:
        values = [float(v) for v in importance.layers]
    else:
        return []
    return [{"axis": axis, "layer": i, "score": round(v, 6)} for i, v in enumerate(values)]


@contextlib.contextmanager
def one_layer_pruned(
    model, importance: Importance, axis: str, layer: int, ratio: float, head_pruning: str
) -> Iterator[None]:
    """Zero the least important heads/neurons/the layer itself in one layer only (restored after).

    Zeroing the ``o_proj`` columns of a head or the ``down_proj`` column of a neuron is
    exactly removing it, so a per-layer sweep needs no per-layer architecture.
    """
    if axis == "layers":
        with layers_removed(model, [layer]):
            yield
        return
    current = sizes_of(model.config)
    sizes = sizes_for_removal(current, axis, ratio, head_pruning)
    parts = model_parts(model, decoder_layers(model)[layer], check_supported(model))
    if axis == "heads":
        heads, _ = select_heads(
            importance.heads[layer],
            current.num_key_value_heads,
            sizes.num_attention_heads,
            sizes.num_key_value_heads,
        )
        weight, keep = parts.o.weight, head_channels(heads, current.head_dim)
    else:
        weight, keep = parts.down.weight, top_k(importance.neurons[layer], sizes.ffn_hidden_size)
    saved = weight.data.clone()
    mask = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    mask[keep.to(weight.device)] = False
    try:
        weight.data[:, mask] = 0
        yield
    finally:
        weight.data.copy_(saved)


def per_layer_rows(
    model,
    importance: Importance,
    axis: str,
    ratios: Sequence[float],
    tokens,
    seq_len: int,
    head_pruning: str,
    baseline: float,
) -> list[dict[str, Any]]:
    """ppl with only one layer pruned, for every layer (and ratio; layers: dropped alone)."""
    rows = []
    for ratio in ratios if axis != "layers" else [None]:
        for layer in range(model.config.num_hidden_layers):
            with one_layer_pruned(model, importance, axis, layer, ratio or 0.5, head_pruning):
                ppl = perplexity(model, tokens, seq_len).ppl
            rows.append(
                {
                    "axis": axis,
                    "layer": layer,
                    "ratio": ratio,
                    "ppl": round(ppl, 4),
                    "ppl_vs_baseline": round(ppl / baseline, 4),
                }
            )
    return rows


@torch.no_grad()
def sensitivity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    axis: str | Sequence[str],
    ratios: Sequence[float],
    out_dir: Path,
    per_layer: bool = False,
    method: str = "activation",
    calibration: CalibrationSpec | None = None,
    evaluation: EvalSpec | None = None,
    head_pruning: str = "within_groups",
    depth_metric: str = "loss",
    device: torch.device | None = None,
    batch_size: int = 4,
    seed: int = 0,
    reconstruct: RefitSettings | None = None,
) -> SensitivityResult:
    """Sweep pruning ratios on one or more axes and write CSV/JSON/PNG/Markdown into ``out_dir``.

    Args:
        model: a Llama-style causal LM (left unchanged).
        tokenizer: its tokenizer (calibration and evaluation text).
        axis: ``heads`` | ``mlp`` | ``hidden`` | ``layers``, or several.
        ratios: fractions of the axis to remove, e.g. ``[0.1, 0.25, 0.5]``.
        out_dir: output directory, replaced atomically; an existing one must be an
            earlier sensitivity output (holds ``sensitivity.json``) or empty.
        per_layer: also prune one layer at a time (``layers``: drop each layer alone).
        method: importance: ``activation`` | ``magnitude`` | ``random``.
        calibration: calibration data (default: 16 C4 sequences of 256 tokens).
        evaluation: perplexity data (default: 4096 WikiText-2 test tokens, 512 windows).
        head_pruning: ``within_groups`` | ``kv_groups``.
        depth_metric: ``loss`` | ``cosine`` (activation method, layers axis).
        reconstruct: re-fit each candidate's ``o_proj``/``down_proj`` on the calibration
            data (:mod:`slmcompress.prune.reconstruction`), so the curve shows what a prune
            stage with ``reconstruct`` gives; per-layer rows stay plain deletions.
    """
    axes = [axis] if isinstance(axis, str) else list(axis)
    for name in axes:
        if name not in AXES:
            raise PassError(f"axis: unknown axis {name!r}; valid: {', '.join(AXES)}")
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise PassError(f"ratios: need fractions between 0 and 1, got {list(ratios)}")
    problem = replace_problem(Path(out_dir), "sensitivity.json", OUTPUT_FILES)
    if problem:
        raise PassError(f"out: {problem}")
    calibration = calibration or CalibrationSpec(source="c4", n_samples=16, seq_len=256)
    evaluation = evaluation or EvalSpec(max_tokens=4096, seq_len=512)
    device = device or next(model.parameters()).device
    model.eval()
    calib = calibration_tokens(
        tokenizer, calibration, calibration.n_samples, calibration.seq_len, seed
    )
    tokens = eval_tokens(tokenizer, evaluation)
    baseline = perplexity(model, tokens, evaluation.seq_len).ppl
    importance = score(
        model, calib, method, depth_metric, "layers" in axes, device, batch_size, seed
    )
    result = SensitivityResult(Path(out_dir), round(baseline, 4), [], [])
    refitting = Refitting(reconstruct, calib, device, batch_size) if reconstruct else None
    for name in axes:
        result.rows += axis_rows(
            model,
            importance,
            name,
            ratios,
            tokens,
            evaluation.seq_len,
            head_pruning,
            baseline,
            refitting,
        )
        result.layer_scores += layer_scores(importance, name)
        if per_layer and name == "hidden":
            result.notes.append(
                "hidden: no per-layer sweep (hidden channels are shared by all layers)"
            )
        elif per_layer:
            if reconstruct:
                result.notes.append(f"{name}: per-layer rows delete without re-fitting")
            result.per_layer += per_layer_rows(
                model, importance, name, ratios, tokens, evaluation.seq_len, head_pruning, baseline
            )
    meta = {
        "method": method,
        "head_pruning": head_pruning,
        "depth_metric": depth_metric,
        "reconstruct": asdict(reconstruct) if reconstruct else None,
        "calibration": calibration.model_dump(),
        "evaluation": evaluation.model_dump(),
        "eval_tokens": int(tokens.numel()),
    }
    write_outputs(result, meta)
    return result


# ------------------------------------------------------------------ outputs
#: every file write_outputs may produce: an earlier result holding anything else is refused
OUTPUT_FILES = frozenset(
    {
        "sensitivity.csv",
        "layer_importance.csv",
        "per_layer.csv",
        "sensitivity.json",
        "summary.md",
        "ppl_vs_ratio.png",
        "layer_importance.png",
        "per_layer.png",
    }
)


def write_outputs(result: SensitivityResult, meta: dict[str, Any]) -> None:
    """CSV + JSON + PNG + summary.md, all appearing at once (atomic directory)."""
    with atomic_dir(result.out_dir) as tmp:
        (tmp / "sensitivity.csv").write_text(_csv(result.rows))
        if result.layer_scores:
            (tmp / "layer_importance.csv").write_text(_csv(result.layer_scores))
        if result.per_layer:
            (tmp / "per_layer.csv").write_text(_csv(result.per_layer))
        payload = {
            "baseline_ppl": result.baseline_ppl,
            "rows": result.rows,
            "layer_scores": result.layer_scores,
            "per_layer": result.per_layer,
            "notes": result.notes,
            **meta,
        }
        (tmp / "sensitivity.json").write_text(json.dumps(payload, indent=2) + "\n")
        plots = write_plots(result, tmp)
        (tmp / "summary.md").write_text(summary_markdown(result, meta, plots))


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_plots(result: SensitivityResult, directory: Path) -> list[str]:
    """ppl vs ratio (layers: the layer-drop curve), per-layer importance bars, per-layer sweeps."""
    import matplotlib

    matplotlib.use("Agg")
    names = [_plot_ppl_vs_ratio(result, directory / "ppl_vs_ratio.png")]
    if result.layer_scores:
        names.append(_plot_layer_bars(result.layer_scores, directory / "layer_importance.png"))
    if result.per_layer:
        names.append(
            _plot_per_layer(result.per_layer, result.baseline_ppl, directory / "per_layer.png")
        )
    return names


def _plot_ppl_vs_ratio(result: SensitivityResult, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for axis in dict.fromkeys(r["axis"] for r in result.rows):
        rows = [r for r in result.rows if r["axis"] == axis]
        label = "layers (layer-drop curve)" if axis == "layers" else axis
        ax.plot(
            [0] + [r["removed"] for r in rows],
            [result.baseline_ppl] + [r["ppl"] for r in rows],
            marker="o",
            label=label,
        )
    ax.set(
        xlabel="fraction of the axis removed",
        ylabel="perplexity (log)",
        yscale="log",
        title="Perplexity vs pruning ratio (no distillation)",
    )
    ax.legend()
    return _save(fig, path)


def _plot_layer_bars(scores: list[dict[str, Any]], path: Path) -> str:
    import matplotlib.pyplot as plt

    axes = list(dict.fromkeys(s["axis"] for s in scores))
    fig, plots = plt.subplots(len(axes), 1, figsize=(7, 2.6 * len(axes)), squeeze=False)
    for axis, ax in zip(axes, plots[:, 0], strict=True):
        rows = [s for s in scores if s["axis"] == axis]
        ax.bar([s["layer"] for s in rows], [s["score"] for s in rows])
        ax.set(xlabel="layer", ylabel="importance", title=f"{axis}: importance per layer")
    return _save(fig, path)


def _plot_per_layer(rows: list[dict[str, Any]], baseline: float, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in dict.fromkeys((r["axis"], r["ratio"]) for r in rows):
        sel = [r for r in rows if (r["axis"], r["ratio"]) == key]
        label = (
            f"{key[0]} dropped alone"
            if key[1] is None
            else f"{key[0]} {key[1]:.0%} in this layer only"
        )
        ax.plot([r["layer"] for r in sel], [r["ppl"] for r in sel], marker=".", label=label)
    ax.axhline(baseline, color="grey", linestyle="--", label="unpruned")
    ax.set(
        xlabel="layer", ylabel="perplexity (log)", yscale="log", title="Pruning one layer at a time"
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _reconstruct_line(settings: dict[str, Any] | None) -> str:
    if not settings:
        return "Pruned units are deleted (no re-fit)."
    return (
        f"Each candidate's `o_proj`/`down_proj` re-fitted on the calibration data "
        f"(reconstruct: select {settings['select']}, damp {settings['damp']})."
    )


def summary_markdown(result: SensitivityResult, meta: dict[str, Any], plots: list[str]) -> str:
    """A short human-readable summary linking the plots."""
    lines = [
        "# Pruning sensitivity",
        "",
        f"Importance: **{meta['method']}** (heads: {meta['head_pruning']}, depth: {meta['depth_metric']}); "
        f"perplexity on {meta['eval_tokens']} {meta['evaluation']['source']} tokens, "
        f"baseline **{result.baseline_ppl:.2f}**.",
        "",
        _reconstruct_line(meta.get("reconstruct")),
        "",
        "| axis | ratio asked | removed | size | non-emb params kept | ppl | x baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r['axis']} | {r['ratio']:.2f} | {r['removed']:.1%} | {r['size']} | "
            f"{r['non_embedding_ratio']:.1%} | {r['ppl']:.2f} | {r['ppl_vs_baseline']:.2f} |"
        )
    for axis in dict.fromkeys(s["axis"] for s in result.layer_scores):
        scores = [s for s in result.layer_scores if s["axis"] == axis]
        ranked = sorted(scores, key=lambda s: s["score"])
        lines += [
            "",
            f"{axis}: least important layers {[s['layer'] for s in ranked[:5]]}, "
            f"most important {[s['layer'] for s in ranked[-3:][::-1]]}.",
        ]
    lines += ["", *[f"- {note}" for note in result.notes], "", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)
