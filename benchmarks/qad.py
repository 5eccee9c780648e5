"""Quantization-aware distillation benchmark (issue #17): GPTQ, then KD in the quantized format.

Quality rows run a shipped recipe through the real CLI (``slmcompress run``: GPTQ stage, then
a ``distill`` stage with ``quantized: scales``) and read the stage reports, so the numbers are
those of the written GPTQ v1 checkpoints, reloaded. Every row evaluates on the tokens of
``benchmarks/results/quantize.md`` (WikiText-2 test, first 8,192 tokens in 512-token windows),
whose RTN rows (32x512 calibration; RTN uses none) give the targets' reference:
Δppl(QAD) <= 1/3 of RTN-4 g128's, <= 1/5 of RTN-3 g128's.

Cost rows train the same distill stage for COST_TOKENS tokens from one quality row's GPTQ
checkpoint (``--cost-from``) in each parameterisation (``scales``, ``ste``, ``lsq``, same lr)
and, for comparison, ordinary float KD from the float model, each in its own process:
training tokens/s from the stage report, the process's peak RSS from ``wait4``, and the
perplexity reached on the quality rows' tokens -- the equal-budget parameterisation comparison.

A run directory that is already complete is read, not rerun (the CLI resumes), so rows can
be added one at a time:

    python benchmarks/qad.py --work /work/qad-runs --only w4g128 w3g128
    ->  benchmarks/results/qad.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cli_runs import (
    RESULTS,
    provenance,
    run_cli,
    run_complete,
    run_row,
    stage_reports,
    summarise,
)

QKD_RECIPE = "recipes/smollm2-gptq-w4g128-qkd.yaml"

#: id -> (recipe, --set overrides, RTN reference row in quantize.json, target fraction of RTN Δppl)
ROWS: dict[str, tuple[str, list[str], str | None, float | None]] = {
    "w4g128": (QKD_RECIPE, ["eval.limit=500"], "rtn-4-128", 1 / 3),
    # ppl only: HellaSwag on 500 items through the CPU int4/int3 path took ~40 min a stage on
    # 2 shared cores (`slmcompress eval <checkpoint> --limit 500` measures it separately)
    "w3g128": (
        QKD_RECIPE,
        ["stages.0.bits=3", "stages.1.lr=2.0e-4", "eval.tasks=[]"],
        "rtn-3-128",
        1 / 5,
    ),
    "w2g64": (
        QKD_RECIPE,
        ["stages.0.bits=2", "stages.0.group_size=64", "stages.1.lr=5.0e-4", "eval.limit=100"],
        None,
        None,
    ),
    "quickstart": ("recipes/smollm2-quickstart-qkd.yaml", [], None, None),
}

#: cost rows: id -> (model: "float" or "gptq" (the --cost-from row's GPTQ stage), overrides)
COST_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "kd-float": ("float", {}),
    "qad-scales": ("gptq", {"quantized": "scales"}),
    "qad-ste": ("gptq", {"quantized": "ste"}),
    # ste's latent weights start at their bin's centre and must move s/2 to flip a code: give
    # it the chance a higher learning rate offers (w3g128's lr x 10)
    "qad-ste-lr2e-3": ("gptq", {"quantized": "ste", "lr": 2.0e-3}),
    "qad-lsq": ("gptq", {"quantized": "lsq"}),
}
COST_TOKENS = 16384


def quality_row(row_id: str, work: Path, reference: dict[str, dict]) -> dict[str, Any]:
    recipe, sets, rtn_row, target = ROWS[row_id]
    argv = ["run", recipe]
    for s in sets:
        argv += ["--set", s]
    row: dict[str, Any] = {**run_row(row_id, work, argv), "recipe": recipe}
    stages = row["stages"]
    float_ppl = reference["fp32"]["ppl"]
    final, before = stages[-1], stages[-2]
    row["ppl_before_qad"], row["ppl_after_qad"] = before["ppl"], final["ppl"]
    if rtn_row:
        rtn_delta = reference[rtn_row]["ppl"] - float_ppl
        row["rtn_ppl"] = reference[rtn_row]["ppl"]
        row["target_ppl"] = round(float_ppl + target * rtn_delta, 2)
        row["frac_of_rtn_delta_before"] = round((before["ppl"] - float_ppl) / rtn_delta, 3)
        row["frac_of_rtn_delta_after"] = round((final["ppl"] - float_ppl) / rtn_delta, 3)
        row["target_met"] = final["ppl"] <= row["target_ppl"]
    if row_id == "quickstart":  # float (healed) stage = the last stage before the GPTQ stage
        healed = stages[-3]
        row["healed_ppl"] = healed["ppl"]
        row["vs_healed_pct"] = round(100 * (final["ppl"] / healed["ppl"] - 1), 2)
        row["target_met"] = row["vs_healed_pct"] <= 5.0
    return row


def cost_row(row_id: str, work: Path, gptq_row: str) -> dict[str, Any]:
    """Train COST_TOKENS tokens in a fresh process: tokens/s, peak RSS, the ppl it reaches."""
    source, overrides = COST_ROWS[row_id]
    model = "smollm2-135m"
    lr = 1.0e-4
    if source == "gptq":
        gptq = [d for d in sorted((work / gptq_row).iterdir()) if d.name.startswith("01-")]
        if not gptq:
            raise SystemExit(f"error: --cost-from {gptq_row}: no GPTQ stage in {work / gptq_row}")
        model = str(gptq[0])
        lr = _row_qad_lr(work / gptq_row)
    stage = {
        "type": "distill",
        "name": "train",
        "loss": "forward_kl",
        "max_tokens": COST_TOKENS,
        "seq_len": 512,
        "micro_batch_size": 4,
        "lr": lr,
        "warmup_steps": 1,
        "eval_every": 0,
        "save_every": 0,
        **overrides,
    }
    recipe = {
        "name": f"qad-cost-{row_id}",
        "model": model,
        "teacher": "smollm2-135m",
        "data": {
            "calibration": {"source": "c4", "n_samples": 16, "seq_len": 512},
            "eval": {"source": "wikitext2", "split": "test", "max_tokens": 8192, "seq_len": 512},
        },
        "stages": [stage],
        "eval": {"tasks": [], "speed": False},
    }
    recipe_path = work / f"cost-{row_id}.yaml"
    run_dir = work / f"cost-{row_id}"
    measured = work / f"cost-{row_id}.process.json"  # a complete run of this recipe is read
    if (
        measured.is_file()
        and run_complete(run_dir)
        and json.loads(recipe_path.read_text()) == recipe
    ):
        proc = json.loads(measured.read_text())
    else:
        recipe_path.write_text(json.dumps(recipe, indent=2))  # JSON is YAML
        proc = run_cli(
            ["run", str(recipe_path), "--output-dir", str(run_dir), "--force"],
            work / f"cost-{row_id}.log",
        )
        measured.write_text(json.dumps(proc, indent=2))
    stages = [summarise(r) for r in stage_reports(run_dir).values()]
    return {
        "id": row_id,
        "model": model,
        "ppl_before": stages[0]["ppl"],
        **stages[-1],
        "train_stage": stage,  # after the report's fields, whose "stage" is the stage's name
        "process": proc,
    }


def _row_qad_lr(run_dir: Path) -> float:
    """The QAD learning rate a quality row's run trained with: its last stage's, as resolved."""
    manifest = json.loads((run_dir / "run.json").read_text())
    return float(manifest["resolved_recipe"]["stages"][-1]["lr"])


def _hellaswag(before: Any, after: Any, n: Any) -> str:
    return "not run" if after is None else f"{before} → {after} ({n})"


def _quality_cells(row: dict[str, Any]) -> list[str]:
    """One quality row's table cells: from its stage reports, or from the fields of a row
    assembled by hand from a run whose directory is gone (``w4g128``, an earlier session)."""
    if "stages" not in row:
        hs = row["hellaswag_acc_norm_n500"]
        return [
            row["id"],
            f"{row['gptq_ppl']:.2f}",
            f"{row['qad_ppl']:.2f}",
            f"{row['float_ppl']:.2f}",
            str(row["rtn_ppl"]),
            str(row["target_ppl"]),
            f"{100 * row['frac_of_rtn_delta_gptq']:.0f}% → {100 * row['frac_of_rtn_delta_qad']:.0f}%",
            "yes" if row["target_met"] else "NO",
            f"{hs['gptq']} → {hs['qad'] if hs['qad'] is not None else 'not run'} (500)",
            str(row["qad"]["tokens"]),
            "0.0",
            f"{row['size_bytes']['qad'] / 1e6:.1f}",
        ]
    st = row["stages"]
    first, before, after = st[0], st[-2], st[-1]
    frac = (
        f"{100 * row['frac_of_rtn_delta_before']:.0f}% → {100 * row['frac_of_rtn_delta_after']:.0f}%"
        if "frac_of_rtn_delta_after" in row
        else ""
    )
    target = row.get("target_ppl") or (
        f"≤ 5% over healed {row['healed_ppl']:.2f}" if "healed_ppl" in row else ""
    )
    met = {True: "yes", False: "NO"}.get(row.get("target_met"), "(no target)")
    if "vs_healed_pct" in row:
        met += f" ({row['vs_healed_pct']:+.1f}% vs healed)"
    q = after.get("qad", {})
    return [
        row["id"],
        f"{before['ppl']:.2f}",
        f"{after['ppl']:.2f}",
        f"{first['ppl']:.2f}",
        f"{row['rtn_ppl']:.2f}" if "rtn_ppl" in row else "",
        str(target),
        frac,
        met,
        _hellaswag(before["hellaswag_acc_norm"], after["hellaswag_acc_norm"], after["hellaswag_n"]),
        str(after.get("train_tokens")),
        str(q.get("codes_changed")),
        str(after["size_mb"]),
    ]


def render_md(result: dict[str, Any]) -> str:
    lines = [
        "# Quantization-aware distillation (issue #17): SmolLM2-135M",
        "",
        f"Machine: {result['machine']}; {result['versions']}. Command: `{result['command']}`.",
        "WikiText-2 test, first 8,192 tokens in 512-token windows (the tokens of quantize.md); "
        "GPTQ calibration C4 128x512 (seed 0); QAD trains on C4 validation text, never on "
        "the eval split.",
        "",
        "| row | GPTQ ppl | + QAD ppl | float ppl | RTN ppl | target ppl | % of RTN Δppl before → after "
        "| target met | HellaSwag acc_norm GPTQ → QAD (n) | QAD tokens | codes changed | size MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append("| " + " | ".join(_quality_cells(row)) + " |")
    if result.get("cost"):
        lines += [
            "",
            f"Training cost and the equal-budget parameterisation comparison ({COST_TOKENS} "
            "tokens, 4x512 micro-batches, one fresh process each; ppl on the rows' tokens):",
            "",
            "| row | model | lr | ppl before → after | codes changed | train tokens/s "
            "| process peak RSS GB | wall s | load avg before/after |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in result["cost"]:
            p = row["process"]
            q = row.get("qad") or {}
            lines.append(
                f"| {row['id']} | {Path(row['model']).name} | {row['train_stage']['lr']} "
                f"| {row['ppl_before']:.2f} → {row['ppl']:.2f} | {q.get('codes_changed', '')} "
                f"| {row['train_tokens_per_s']} | {p['peak_rss_gb']} "
                f"| {p['wall_s']} | {p['load_average']} |"
            )
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-qad"))
    parser.add_argument("--only", nargs="*", choices=list(ROWS), help="quality rows to run")
    parser.add_argument("--cost", nargs="*", choices=list(COST_ROWS), default=[])
    parser.add_argument(
        "--cost-from", default="w3g128", choices=list(ROWS), help="whose GPTQ stage cost rows train"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    reference = {r["id"]: r for r in json.loads((RESULTS / "quantize.json").read_text())["rows"]}
    path = args.out / "qad.json"
    result = json.loads(path.read_text()) if path.is_file() else {"rows": [], "cost": []}
    for row_id in args.only if args.only is not None else list(ROWS):
        row = quality_row(row_id, args.work, reference)
        result["rows"] = [r for r in result["rows"] if r["id"] != row_id] + [row]
        print(json.dumps({k: v for k, v in row.items() if k != "stages"}, indent=1))
    for row_id in args.cost:
        row = cost_row(row_id, args.work, args.cost_from)
        result["cost"] = [r for r in result.get("cost", []) if r["id"] != row_id] + [row]
        print(json.dumps(row, indent=1))
    order = list(ROWS)
    result["rows"].sort(key=lambda r: order.index(r["id"]))
    result.update(provenance())
    result.setdefault("notes", [])
    path.write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "qad.md").write_text(render_md(result))


if __name__ == "__main__":
    main()
