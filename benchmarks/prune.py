"""Structured-pruning benchmark on SmolLM2-135M: activation vs magnitude vs random importance.

For each width axis (attention heads -- within KV groups and whole KV groups --, MLP
neurons, hidden channels) at ~25% and ~50% removal, and for depth at 8 and 15 of 30
layers, the WikiText-2 test perplexity of the pruned model (no distillation) with the
three importance methods at the same target. Depth also gets the curve "ppl vs layers
dropped" for best-k (per-layer LM-loss increase, Minitron), best-k by cosine block
importance, the best contiguous block by cosine, and last-k.

    python benchmarks/prune.py  ->  benchmarks/results/prune.{json,md}

One run, seed 0; ~20-30 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from slmcompress.data import CalibrationSpec, EvalSpec, calibration_tokens, eval_tokens
from slmcompress.eval.perplexity import perplexity
from slmcompress.eval.report import count_params
from slmcompress.fsutil import atomic_write_json, atomic_write_text
from slmcompress.io.load import load_model
from slmcompress.prune.importance import (
    Importance,
    activation_importance,
    loss_depth_scores,
    magnitude_importance,
    random_importance,
)
from slmcompress.prune.planner import plan_keep, resolve_target, sizes_for_removal, sizes_of
from slmcompress.prune.slicing import slice_model

log = logging.getLogger("benchmarks.prune")
RESULTS = Path(__file__).parent / "results"
CPU = torch.device("cpu")

#: (row label, axis, head_pruning); SmolLM2: 9 heads / 3 KV groups, ffn 1536, hidden 576
WIDTH_AXES = [
    ("heads (within groups)", "heads", "within_groups"),
    ("heads (kv groups)", "heads", "kv_groups"),
    ("mlp", "mlp", "within_groups"),
    ("hidden", "hidden", "within_groups"),
]
REMOVALS = [0.25, 0.50]
DEPTH_METHOD_KS = [8, 15]  # ~25% and 50% of 30 layers
DEPTH_CURVE_KS = [2, 4, 8, 15]


def ppl_of(
    model,
    importance: Importance,
    target: dict,
    tokens: torch.Tensor,
    seq_len: int,
    head_pruning: str = "within_groups",
    depth_mode: str = "per_layer",
) -> dict[str, Any]:
    """Prune a copy to ``target`` with these scores and measure it."""
    current = sizes_of(model.config)
    sizes = resolve_target(current, target, head_pruning, config=model.config)
    pruned = slice_model(model, plan_keep(importance, current, sizes, depth_mode))
    start = time.perf_counter()
    result = perplexity(pruned, tokens, seq_len)
    log.info(
        "  %s %s -> ppl %.2f (%.0fs)",
        importance.method,
        target,
        result.ppl,
        time.perf_counter() - start,
    )
    return {
        "ppl": round(result.ppl, 3),
        "sizes": sizes.as_dict(),
        "non_embedding_params": count_params(pruned)[1],
    }


def with_layers(
    importance: Importance,
    scores: torch.Tensor,
    name: str,
    blocks: torch.Tensor | None = None,
    block_size: int = 1,
) -> Importance:
    """The same width scores with other depth scores (for the depth strategies)."""
    return Importance(
        importance.heads, importance.neurons, importance.hidden, scores, blocks, block_size, name
    )


def width_rows(model, scores: dict[str, Importance], tokens, seq_len) -> list[dict[str, Any]]:
    full = count_params(model)[1]
    current = sizes_of(model.config)
    rows = []
    for label, axis, mode in WIDTH_AXES:
        for removal in REMOVALS:
            sizes = sizes_for_removal(current, axis, removal, mode)
            target = {k: v for k, v in sizes.as_dict().items() if v != getattr(current, k)}
            log.info("width %s %.0f%% -> %s", label, removal * 100, target)
            row: dict[str, Any] = {"axis": label, "nominal_removal": removal, "target": target}
            for method, imp in scores.items():
                out = ppl_of(model, imp, target, tokens, seq_len, mode)
                row[method] = out["ppl"]
                row["sizes"], row["non_embedding_ratio"] = (
                    out["sizes"],
                    round(out["non_embedding_params"] / full, 4),
                )
            rows.append(row)
    return rows


def depth_rows(
    model,
    scores: dict[str, Importance],
    loss_scores: torch.Tensor,
    depth_tokens,
    tokens,
    seq_len,
    method_ks: list[int],
    curve_ks: list[int],
):
    """Per-method rows at 25/50% and the ppl-vs-k curve for several layer-selection strategies."""
    n_layers = model.config.num_hidden_layers
    act = with_layers(scores["activation"], loss_scores, "activation")
    methods = {"activation": act, "magnitude": scores["magnitude"], "random": scores["random"]}
    method_rows = []
    for k in method_ks:
        log.info("depth k=%d by method", k)
        target = {"num_layers": n_layers - k}
        row = {"axis": "layers", "nominal_removal": round(k / n_layers, 3), "target": target}
        row.update(
            {m: ppl_of(model, imp, target, tokens, seq_len)["ppl"] for m, imp in methods.items()}
        )
        blocks, _ = loss_depth_scores(model, depth_tokens, block_size=k, batch_size=4)
        contiguous = with_layers(act, loss_scores, "activation-contiguous", blocks, k)
        row["activation_contiguous_loss"] = ppl_of(
            model, contiguous, target, tokens, seq_len, depth_mode="contiguous"
        )["ppl"]
        method_rows.append(row)
    cosine = with_layers(act, scores["activation"].layers, "cosine")
    last = with_layers(act, torch.arange(n_layers, 0, -1).float(), "last-k")
    known = {n_layers - r["target"]["num_layers"]: r["activation"] for r in method_rows}
    curve = []
    for k in curve_ks:
        log.info("depth curve k=%d", k)
        target = {"num_layers": n_layers - k}
        block = activation_importance(model, depth_tokens, CPU, batch_size=4, block_size=k)
        point = {"k": k, "layers_kept": n_layers - k}
        point["best_k_loss"] = known.get(k) or ppl_of(model, act, target, tokens, seq_len)["ppl"]
        point["best_k_cosine"] = ppl_of(model, cosine, target, tokens, seq_len)["ppl"]
        contiguous = with_layers(act, block.layers, "contiguous-cosine", block.blocks, k)
        point["contiguous_cosine"] = ppl_of(
            model, contiguous, target, tokens, seq_len, depth_mode="contiguous"
        )["ppl"]
        point["last_k"] = ppl_of(model, last, target, tokens, seq_len)["ppl"]
        curve.append(point)
    return method_rows, curve


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """Where activation importance wins and where it does not (computed, not hand-written)."""
    lines = []
    for rival in ("random", "magnitude"):
        lost = [
            f"{r['axis']} {r['nominal_removal']:.0%}" for r in rows if r["activation"] >= r[rival]
        ]
        won = len(rows) - len(lost)
        text = f"activation beats {rival} in {won}/{len(rows)} cases"
        lines.append(text + (f"; not in: {', '.join(lost)}" if lost else ""))
    return lines


def render_md(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"# Structured pruning on {cfg['model']} (no distillation)",
        "",
        f"WikiText-2 test, first {cfg['eval_tokens']} tokens in {cfg['eval_seq_len']}-token windows; importance "
        f"from {cfg['calib_samples']}x{cfg['calib_seq_len']} C4 tokens; depth LM-loss scores from "
        f"{cfg['depth_samples']}x{cfg['calib_seq_len']} tokens. One run, seed 0, CPU "
        f"({result['wall_s'] / 60:.0f} min). Baseline ppl **{result['baseline_ppl']:.2f}**.",
        "",
        "## Importance method at the same target (ppl, lower is better)",
        "",
        "| axis | nominal removal | sizes after | non-emb params kept | activation | magnitude | random |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["width"]:
        s = r["sizes"]
        size = (
            f"{s['num_attention_heads']}/{s['num_key_value_heads']} heads"
            if "heads" in r["axis"]
            else f"ffn {s['ffn_hidden_size']}"
            if r["axis"] == "mlp"
            else f"hidden {s['hidden_size']}"
        )
        lines.append(
            f"| {r['axis']} | {r['nominal_removal']:.0%} | {size} | {r['non_embedding_ratio']:.1%} | "
            f"{_b(r, 'activation')} | {_b(r, 'magnitude')} | {_b(r, 'random')} |"
        )
    for r in result["depth"]:
        lines.append(
            f"| layers | {r['nominal_removal']:.0%} | {r['target']['num_layers']} layers | | "
            f"{_b(r, 'activation')} | {_b(r, 'magnitude')} | {_b(r, 'random')} |"
        )
    lines += [
        "",
        "Heads: SmolLM2 has 9 query heads in 3 KV groups, so the feasible counts are 6 and 3 "
        "(33% / 67% of heads); 'within groups' keeps the 3 KV heads, 'kv groups' removes whole groups. "
        "Depth 'activation' = drop the k layers whose single removal raises the LM loss least.",
        "",
        "## Findings",
        "",
    ]
    lines += [f"- {line}" for line in result["findings"]]
    lines += [
        "",
        "## Depth: ppl vs layers dropped",
        "",
        "| layers dropped | kept | best-k (loss) | best-k (cosine) | best contiguous (cosine) | last-k |",
        "|---|---|---|---|---|---|",
    ]
    for p in result["depth_curve"]:
        lines.append(
            f"| {p['k']} | {p['layers_kept']} | {p['best_k_loss']:.1f} | {p['best_k_cosine']:.1f} | "
            f"{p['contiguous_cosine']:.1f} | {p['last_k']:.1f} |"
        )
    lines += [
        "",
        "Best contiguous block by LM loss: "
        + ", ".join(
            f"k={result['n_layers'] - r['target']['num_layers']}: "
            f"{r['activation_contiguous_loss']:.1f}"
            for r in result["depth"]
        )
        + ".",
        "",
        f"Depth LM-loss increase per removed layer: {result['depth_loss_increase']}",
        "",
    ]
    return "\n".join(lines)


def _b(row: dict[str, Any], key: str) -> str:
    """Bold the best method in a row."""
    best = min(row[m] for m in ("activation", "magnitude", "random"))
    value = f"{row[key]:.1f}" if math.isfinite(row[key]) else "inf"
    return f"**{value}**" if row[key] == best else value


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--depth-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--model", default="smollm2-135m", help="(a tiny directory for a smoke run)"
    )
    parser.add_argument("--depth-ks", default=",".join(map(str, DEPTH_METHOD_KS)))
    parser.add_argument("--curve-ks", default=",".join(map(str, DEPTH_CURVE_KS)))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    loaded = load_model(args.model, dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    calib = calibration_tokens(
        tok, CalibrationSpec(source="c4"), args.calib_samples, args.seq_len, 0
    )
    depth_tokens = calib[: args.depth_samples]
    tokens = eval_tokens(tok, EvalSpec(max_tokens=args.eval_tokens, seq_len=args.eval_seq_len))
    baseline = perplexity(model, tokens, args.eval_seq_len).ppl
    log.info("baseline ppl %.3f; scoring", baseline)
    scores = {
        "activation": activation_importance(model, calib, CPU, batch_size=4),
        "magnitude": magnitude_importance(model),
        "random": random_importance(model, seed=0),
    }
    loss_scores, base_loss = loss_depth_scores(model, depth_tokens, block_size=1, batch_size=4)
    width = width_rows(model, scores, tokens, args.eval_seq_len)
    depth, curve = depth_rows(
        model,
        scores,
        loss_scores,
        depth_tokens,
        tokens,
        args.eval_seq_len,
        _ints(args.depth_ks),
        _ints(args.curve_ks),
    )
    result = {
        "config": {
            "model": args.model,
            "calib_samples": args.calib_samples,
            "calib_seq_len": args.seq_len,
            "depth_samples": args.depth_samples,
            "eval_tokens": int(tokens.numel()),
            "eval_seq_len": args.eval_seq_len,
            "seed": 0,
        },
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "n_layers": model.config.num_hidden_layers,
        "baseline_ppl": round(baseline, 3),
        "calibration_loss": round(base_loss, 4),
        "depth_loss_increase": [round(float(v), 4) for v in loss_scores],
        "width": width,
        "depth": depth,
        "depth_curve": curve,
        "findings": findings(width + depth),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(args.out / "prune.json", result)
    atomic_write_text(args.out / "prune.md", render_md(result))
    log.info("wrote %s", args.out / "prune.md")


if __name__ == "__main__":
    main()
