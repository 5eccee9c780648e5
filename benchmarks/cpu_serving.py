"""Batch-1 CPU decode speed: float vs GPTQ (old torch path vs int4 CPU kernel).

-> benchmarks/results/cpu_serving.{json,md}. Uses the project's own speed code
(:func:`slmcompress.eval.speed.generation_speed`: greedy decode with a KV cache, prefill
excluded) on SmolLM2-135M and on GPTQ checkpoints of it (by default those
``benchmarks/consumers.py`` wrote). Each model is measured on:

- ``serving``: what ``load_model`` / ``slmcompress generate`` / the stage report use now
  (``cpu-int4`` where torch's int4 kernel applies, ``torch-cached`` elsewhere);
- ``old``: the previous CPU path, every QuantLinear dequantizing its weight on each call.

The machine is shared (2 cores, other jobs): every configuration is measured in ``--rounds``
interleaved rounds and the median is reported, with ``os.getloadavg()`` around each.

    python benchmarks/cpu_serving.py                       # defaults
    python benchmarks/cpu_serving.py --threads 1 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("bench.cpu_serving")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # this checkout's slmcompress, whatever the venv has installed
CONSUMERS_WORK = Path("/tmp/slmcompress-consumers")
DEFAULT_MODELS = ["w4-g64", "w4-g64-act", "w4-g128-ragged", "w3-g64", "w8-g64"]


def load(source: str):
    """A model on its serving backends (``load_model`` picks them for GPTQ checkpoints)."""
    from slmcompress.io.load import load_model

    loaded = load_model(source, dtype="float32", device="cpu")
    return loaded.model, loaded.tokenizer


def set_old_path(model, old: bool) -> dict[str, int]:
    """Put every QuantLinear on the per-call torch path (``old``) or back on its serving backend."""
    from slmcompress.kernels.dispatch import set_backends
    from slmcompress.quant.quant_linear import QuantLinear

    if not old:
        return set_backends(model)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.backend, layer._weight_cache = "torch", None
    return {"torch": len(layers)} if layers else {}


def measure(model, tokenizer, new_tokens: int) -> dict:
    """One timed greedy generation (after one warm-up) with the load average around it."""
    from slmcompress.eval.speed import generation_speed

    before = os.getloadavg()[0]
    speed = generation_speed(model, tokenizer, new_tokens=new_tokens, warmup=1)
    return {
        "tokens_per_s": speed["tokens_per_s"],
        "prefill_s": speed["prefill_s"],
        "loadavg_1m": [round(before, 2), round(os.getloadavg()[0], 2)],
    }


def configurations(models: dict[str, str]) -> list[tuple[str, str, bool]]:
    """(label, source, old path) for the float model and every checkpoint."""
    configs = [("float32", "smollm2-135m", False)]
    for name, source in models.items():
        configs += [(f"{name} serving", source, False), (f"{name} old", source, True)]
    return configs


def run_threads(models: dict[str, str], threads: int, rounds: int, new_tokens: int) -> list[dict]:
    """Interleaved rounds over every configuration at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    loaded = {source: load(source) for source in {s for _, s, _ in configurations(models)}}
    rows: dict[str, dict] = {}
    for round_index in range(rounds):
        for label, source, old in configurations(models):
            model, tokenizer = loaded[source]
            backends = set_old_path(model, old)
            tokens = 4 if old else new_tokens  # the old path is slow: 3 decode steps suffice
            result = measure(model, tokenizer, tokens)
            row = rows.setdefault(label, {"model": label, "backends": backends, "runs": []})
            row["runs"].append(result)
            log.info(
                "threads %d round %d %s: %.2f tok/s",
                threads,
                round_index,
                label,
                result["tokens_per_s"],
            )
    for row in rows.values():
        row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in row["runs"])
        row["threads"] = threads
    return list(rows.values())


def cli_generate(source: str, threads: int) -> dict:
    """``slmcompress generate --json`` (this checkout) on ``source``: the user's serving path."""
    code = (
        f"import torch; torch.set_num_threads({threads}); from slmcompress.cli import main; main()"
    )
    cmd = [sys.executable, "-c", code, "generate", source, "--max-new-tokens", "32", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    result = json.loads(out.stdout[out.stdout.index("{") :])
    return {k: result[k] for k in ("tokens_per_s", "new_tokens", "backends")}


def render_md(report: dict) -> str:
    lines = [
        "# CPU serving: batch-1 decode tokens/s, SmolLM2-135M float vs GPTQ",
        "",
        f"Command: `{report['command']}`  ",
        f"Versions: {report['versions']}  ",
        f"Machine: {report['machine']}  ",
        f"Median of {report['rounds']} interleaved rounds, {report['new_tokens']} new tokens "
        "(old path: 4), prefill excluded, one untimed warm-up each; load average (1 min) "
        "before/after each run in the JSON.",
        "",
        "| threads | model | backends | tokens/s (median) | vs float | runs | loadavg range |",
        "|---:|---|---|---:|---:|---|---|",
    ]
    for threads in sorted({r["threads"] for r in report["rows"]}):
        rows = [r for r in report["rows"] if r["threads"] == threads]
        base = next(r["tokens_per_s"] for r in rows if r["model"] == "float32")
        for r in rows:
            runs = ", ".join(f"{x['tokens_per_s']:.2f}" for x in r["runs"])
            loads = [v for x in r["runs"] for v in x["loadavg_1m"]]
            lines.append(
                f"| {threads} | {r['model']} | {r['backends'] or 'float'} | "
                f"{r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base:.2f}x | {runs} | "
                f"{min(loads):.1f}-{max(loads):.1f} |"
            )
    if report.get("cli"):
        lines += ["", f"`slmcompress generate --json` (32 tokens): {report['cli']}"]
    lines += ["", *[f"- {n}" for n in report.get("notes", [])]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS, help="name or name=dir")
    parser.add_argument("--threads", nargs="*", type=int, default=[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_serving")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    models = {}
    for item in args.models:
        name, _, source = item.partition("=")
        models[name] = source or str(CONSUMERS_WORK / name / "ckpt")
    from consumers import machine, versions  # benchmarks/ is this script's sys.path[0]

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": versions(),
        "machine": {**machine(), "torch_threads": args.threads},
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "models": models,
        "rows": [],
    }
    start = time.perf_counter()
    for threads in args.threads:
        report["rows"] += run_threads(models, threads, args.rounds, args.new_tokens)
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - start, 1)
    write(report, args.out)
    first = next(iter(models.values()))
    report["cli"] = {"source": first, **cli_generate(first, args.threads[0])}
    write(report, args.out)


def write(report: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_md(report))


if __name__ == "__main__":
    main()
