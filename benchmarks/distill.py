"""Distillation benchmark: heal a width-pruned SmolLM2-135M with CE vs KD at equal tokens.

SmolLM2-135M is pruned to ~50% of its non-embedding parameters (Minitron activation
importance: MLP 1536 -> 768, heads 9 -> 6, KV heads 3 -> 2), then trained on C4
validation text with the same token budget four ways:

- ``pruned-only``: no training;
- ``ce``: next-token cross-entropy fine-tuning (``alpha: 1``);
- ``kd``: forward KL to the live teacher (the original model), Minitron's recipe;
- ``kd-cache``: forward KL to the teacher's top-k logits read from an offline cache.

Columns: WikiText-2 test perplexity, HellaSwag acc_norm, training tokens, wall time and
tokens/s (training only; the cache build time is reported in the Markdown notes).

    python benchmarks/distill.py  ->  benchmarks/results/distill.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from slmcompress.data import CalibrationSpec, DataConfig, DataSpec, EvalSpec, eval_tokens
from slmcompress.distill.teacher_cache import build_teacher_cache
from slmcompress.eval.perplexity import perplexity
from slmcompress.eval.report import count_params
from slmcompress.fsutil import atomic_write_json, atomic_write_text
from slmcompress.io.load import load_model
from slmcompress.passes.base import Context
from slmcompress.passes.distill import DistillConfig, DistillPass
from slmcompress.passes.prune import PruneConfig, PrunePass

log = logging.getLogger("benchmarks.distill")
RESULTS = Path(__file__).parent / "results"
CPU = torch.device("cpu")
TARGET = {"ffn_hidden_size": 768, "num_attention_heads": 6, "num_key_value_heads": 2}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=98304, help="training tokens per variant")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--hellaswag-limit", type=int, default=100)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-distill"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["pruned-only", "ce", "kd", "kd-cache"],
        choices=["pruned-only", "ce", "kd", "kd-hidden", "kd-cache"],
    )
    parser.add_argument(
        "--append", action="store_true", help="keep the other variants' rows (same setup)"
    )
    return parser.parse_args()


def make_ctx(tokenizer, work: Path, name: str, calib_samples: int) -> Context:
    data = DataConfig(
        calibration=CalibrationSpec(source="c4", n_samples=calib_samples, seq_len=256),
        eval=EvalSpec(source="wikitext2", split="test", max_tokens=8192, seq_len=512),
    )
    return Context(
        tokenizer=tokenizer,
        data=data,
        device=CPU,
        dtype=torch.float32,
        original_model="smollm2-135m",
        teacher=None,
        stage_dir=work / name / "stage",
        work_dir=work / name / "work",
        seed=0,
    )


def measure(model, tokenizer, eval_ids: torch.Tensor, limit: int) -> dict[str, Any]:
    """WikiText-2 ppl (512-token windows) and HellaSwag acc_norm (None when tasks are unavailable)."""
    ppl = perplexity(model, eval_ids, 512).ppl
    acc = None
    try:
        from slmcompress.eval.tasks import run_tasks

        acc = run_tasks(model, tokenizer, ["hellaswag"], limit=limit)["hellaswag"]["acc_norm"]
    except ImportError as exc:
        log.warning("HellaSwag skipped: %s", exc)
    return {"ppl": round(ppl, 4), "hellaswag_acc_norm": None if acc is None else round(acc, 4)}


def prune(teacher, tokenizer, args) -> torch.nn.Module:
    ctx = make_ctx(tokenizer, args.work, "prune", args.calib_samples)
    config = PruneConfig(type="prune", method="activation", target=TARGET)
    pruned = PrunePass(config).run(copy.deepcopy(teacher), ctx)
    before, after = count_params(teacher)[1], count_params(pruned)[1]
    log.info("pruned non-embedding params %d -> %d (%.1f%%)", before, after, 100 * after / before)
    return pruned


def train(
    variant: str, pruned, tokenizer, args, **overrides
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """One healing run from a copy of the pruned model; returns the model and its timing row."""
    ctx = make_ctx(tokenizer, args.work, variant, args.calib_samples)
    shutil.rmtree(ctx.work_dir, ignore_errors=True)
    ctx.work_dir.mkdir(parents=True)
    config = DistillConfig(
        type="distill",
        name=variant,
        max_tokens=args.tokens,
        seq_len=args.seq_len,
        micro_batch_size=args.micro_batch,
        lr=args.lr,
        warmup_steps=args.warmup,
        eval_every=0,
        eval_tokens=1024,
        save_every=0,
        **overrides,
    )
    start = time.perf_counter()
    model = DistillPass(config).run(copy.deepcopy(pruned), ctx)
    wall = time.perf_counter() - start
    info = ctx.extra_metrics["distill"]
    shutil.copy2(ctx.artifacts["loss_curve.png"], args.out / f"distill_{variant}_curve.png")
    row = {
        "tokens": info["train_tokens"],
        "wall_s": round(wall, 1),
        "tokens_per_s": round(info["train_tokens"] / wall, 1),
        "device": "cpu",
        "_train_tokens_per_s": info["train_tokens_per_s"],
        "_first_loss": info["first_loss"],
        "_final_loss": info["final_loss"],
    }
    return model, row


#: variant -> DistillConfig overrides (pruned-only and kd-cache are handled specially)
VARIANTS: dict[str, dict[str, Any]] = {
    "ce": {"alpha": 1.0},
    "kd": {"loss": "forward_kl"},
    "kd-hidden": {"loss": "forward_kl", "hidden_weight": 1.0},
    "kd-cache": {"loss": "forward_kl"},
}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    teacher_loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    teacher, tokenizer = teacher_loaded.model, teacher_loaded.tokenizer
    eval_ids = eval_tokens(tokenizer, EvalSpec(max_tokens=args.eval_tokens, seq_len=512))
    previous = load_previous(args) if args.append else {"rows": [], "details": {}}
    rows: list[dict[str, Any]] = [r for r in previous["rows"] if r["variant"] not in args.variants]
    details: dict[str, Any] = previous["details"]
    if previous.get("teacher") and args.append:
        teacher_metrics = previous["teacher"]
    else:
        t0 = time.perf_counter()
        teacher_metrics = measure(teacher, tokenizer, eval_ids, args.hellaswag_limit)
        log.info("teacher %s (%.0fs)", teacher_metrics, time.perf_counter() - t0)
    pruned = prune(teacher, tokenizer, args)
    if "pruned-only" in args.variants:
        rows.append(
            {
                "variant": "pruned-only",
                **measure(pruned, tokenizer, eval_ids, args.hellaswag_limit),
                "tokens": 0,
                "wall_s": 0.0,
                "tokens_per_s": 0.0,
                "device": "cpu",
            }
        )
        log.info("%s", rows[-1])
    details.setdefault("load_average", {})
    for variant in [v for v in VARIANTS if v in args.variants]:
        load_before = os.getloadavg()[0]
        overrides = dict(VARIANTS[variant])
        if variant == "kd-cache":
            overrides["teacher_cache"] = str(build_cache(teacher, tokenizer, args, details))
        model, row = train(variant, pruned, tokenizer, args, **overrides)
        details[variant] = {k[1:]: row.pop(k) for k in list(row) if k.startswith("_")}
        rows.append(
            {"variant": variant, **measure(model, tokenizer, eval_ids, args.hellaswag_limit), **row}
        )
        log.info("%s", rows[-1])
        details["load_average"][variant] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        del model
    order = ["pruned-only", *VARIANTS]
    rows.sort(key=lambda r: order.index(r["variant"]))
    details["setup"] = setup_line(args)
    write_results(args, teacher_metrics, teacher, pruned, rows, details)


def build_cache(teacher, tokenizer, args, details: dict[str, Any]) -> Path:
    """The top-k teacher cache over exactly the sequences the trainings visit."""
    cache_dir = args.work / "teacher-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    n_seq = -(-args.tokens // (args.seq_len * args.micro_batch)) * args.micro_batch
    start = time.perf_counter()
    build_teacher_cache(
        teacher,
        tokenizer,
        DataSpec(source="c4"),
        args.seq_len,
        args.top_k,
        cache_dir,
        n_sequences=n_seq,
        batch_size=args.micro_batch,
        model_name="smollm2-135m",
    )
    details["cache_build_s"] = round(time.perf_counter() - start, 1)
    details["cache_bytes"] = sum(p.stat().st_size for p in cache_dir.iterdir())
    return cache_dir


def load_previous(args) -> dict[str, Any]:
    """The committed results, to add or replace variants trained with the same setup."""
    path = args.out / "distill.json"
    if not path.exists():
        return {"rows": [], "details": {}}
    previous = json.loads(path.read_text())
    old_setup = previous.get("details", {}).get("setup")
    if old_setup != setup_line(args):
        raise SystemExit(f"--append: {path} was made with another setup ({old_setup})")
    return {
        "rows": previous["rows"],
        "details": previous.get("details", {}),
        "teacher": previous.get("teacher"),
    }


def setup_line(args) -> str:
    return (
        f"tokens={args.tokens} seq_len={args.seq_len} micro_batch={args.micro_batch} lr={args.lr} "
        f"warmup={args.warmup} top_k={args.top_k} eval_tokens={args.eval_tokens} "
        f"hellaswag_limit={args.hellaswag_limit} calib_samples={args.calib_samples}"
    )


def recovery(rows: list[dict[str, Any]], teacher_ppl: float, variant: str) -> float:
    """(ppl_pruned - ppl_variant) / (ppl_pruned - ppl_teacher), in percent."""
    by = {r["variant"]: r["ppl"] for r in rows}
    return 100 * (by["pruned-only"] - by[variant]) / (by["pruned-only"] - teacher_ppl)


def write_results(args, teacher_metrics, teacher, pruned, rows, details) -> None:
    atomic_write_json(
        args.out / "distill.json",
        {
            "teacher_ppl": teacher_metrics["ppl"],
            "rows": rows,
            "teacher": teacher_metrics,
            "details": details,
        },
    )
    atomic_write_text(
        args.out / "distill.md", render_md(args, teacher_metrics, teacher, pruned, rows, details)
    )


def render_md(args, teacher_metrics, teacher, pruned, rows, details) -> str:
    t_ppl = teacher_metrics["ppl"]
    ne_before, ne_after = count_params(teacher)[1], count_params(pruned)[1]
    trained = [r["variant"] for r in rows if r["variant"] in details]
    lines = [
        "# Distillation benchmark: healing a width-pruned SmolLM2-135M",
        "",
        f"Teacher: SmolLM2-135M, WikiText-2 ppl **{t_ppl:.2f}**, HellaSwag acc_norm "
        f"{teacher_metrics['hellaswag_acc_norm']} (first {args.hellaswag_limit} items).",
        f"Student: activation-importance width pruning to {TARGET}: non-embedding params "
        f"{ne_before / 1e6:.1f}M -> {ne_after / 1e6:.1f}M ({100 * ne_after / ne_before:.1f}%).",
        f"Training: C4 validation text, {args.tokens} tokens per variant (seq_len {args.seq_len}, "
        f"micro-batch {args.micro_batch}, AdamW lr {args.lr}, {args.warmup} warmup steps, cosine to 10%), "
        f"forward KL at T=1 for KD, top-{args.top_k} cache for kd-cache. Eval: WikiText-2 test, first "
        f"{args.eval_tokens} tokens in 512-token windows.",
        "",
        "| variant | WikiText-2 ppl | recovery % | HellaSwag acc_norm | tokens | wall s | tokens/s | device |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rec = "" if r["variant"] == "pruned-only" else f"{recovery(rows, t_ppl, r['variant']):.1f}"
        lines.append(
            f"| {r['variant']} | {r['ppl']:.2f} | {rec} | {r['hellaswag_acc_norm']} | {r['tokens']} "
            f"| {r['wall_s']} | {r['tokens_per_s']} | {r['device']} |"
        )
    lines += [
        "",
        "recovery % = (ppl_pruned - ppl_variant) / (ppl_pruned - ppl_teacher).",
    ]
    if "cache_build_s" in details:
        lines.append(
            f"Teacher cache build (teacher forward + top-k, not in kd-cache's wall s): "
            f"{details['cache_build_s']} s, {details['cache_bytes'] / 1e6:.1f} MB on disk."
        )
    lines += [
        "Train loss first -> last step: "
        + ", ".join(
            f"{v} {details[v]['first_loss']:.3f} -> {details[v]['final_loss']:.3f}" for v in trained
        ),
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; 1-minute load average at start/end of each variant's "
        f"run: {details.get('load_average', {})}.",
        "Loss curves: " + ", ".join(f"`distill_{v}_curve.png`" for v in trained),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
