"""Streamed forward benchmark (issue #16): teacher cache and evaluation of a model larger than memory.

Part 1, a random Llama whose float32 weights exceed the address-space cap of the process
that reads them (RLIMIT_AS, set before anything is imported, as in ``scale.py``):
  a. ``slmcompress teacher-cache`` (top-64 over 64x256 C4 tokens), uninterrupted;
  b. the same command killed with SIGKILL half-way through the decoder layers, then rerun:
     its cache must equal (a) exactly;
  c. ``slmcompress eval --max-memory``: WikiText-2 perplexity, streamed.
  Each row reports peak RSS (``VmHWM``) beside ``slmcompress.plan``'s prediction.
Part 2, the real SmolLM2-135M forced to stream (a tiny ``max_memory``): streamed vs in-memory
perplexity, streamed vs in-memory teacher cache, and a pruned student distilled from each cache.

Usage: ``python benchmarks/stream_forward.py [--layers 40] [--cap 2.5GiB]`` (~1 h on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # random_models
from scale import CHILD, model_config  # noqa: E402  (the scale benchmark's child and model)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument(
        "--vocab", type=int, default=49152, help="SmolLM2's tokenizer is saved with it"
    )
    parser.add_argument("--cap", default="2.5GiB")
    parser.add_argument("--max-memory", default="1.5GiB")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--parts", default="capped,smollm2")
    parser.add_argument("--work", type=Path, default=None)
    return parser.parse_args()


def child(argv: list[str], cap: int, status: Path, kill_when=None) -> dict:
    """Run the CLI capped; ``kill_when()`` true -> SIGKILL (polled every 0.5 s)."""
    status.unlink(missing_ok=True)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cap), str(status), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = False
    while proc.poll() is None:
        if kill_when is not None and kill_when():
            proc.send_signal(signal.SIGKILL)
            killed = True
        time.sleep(0.5)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    peak = json.loads(status.read_text())["peak_rss_bytes"] if status.is_file() else None
    if proc.returncode != 0 and not killed:
        print(out[-2000:], err[-4000:], file=sys.stderr)
    return {
        "rc": proc.returncode,
        "killed": killed,
        "wall_s": round(wall, 1),
        "peak": peak,
        "out": out,
    }


def layers_done(cache_dir: Path) -> int:
    state = cache_dir / ".work" / "shard-00000" / "stream" / "state.json"
    try:
        return json.loads(state.read_text())["finished"]
    except (OSError, ValueError, KeyError):
        return 0


def same_cache(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    names = sorted(p.name for p in a.glob("shard-*.safetensors"))
    if names != sorted(p.name for p in b.glob("shard-*.safetensors")) or not names:
        return False
    for name in names:
        x, y = load_file(a / name), load_file(b / name)
        if set(x) != set(y) or not all(x[k].equal(y[k]) for k in x):
            return False
    return True


def predictions(config: dict, args: argparse.Namespace) -> dict:
    from slmcompress.memory_model import (
        DEFAULT_MEMORY_FRACTION,
        PROFILES,
        ModelDims,
        estimate_streamed_forward,
        parse_bytes,
    )

    arch = ModelDims.from_config(config)
    host = int(parse_bytes(args.max_memory) / DEFAULT_MEMORY_FRACTION)  # the runner's budget rule
    profile = PROFILES["cpu-2core"]
    cache = estimate_streamed_forward(
        arch, args.sequences, args.seq_len, 4, 4, profile, host, top_k=64, chunk_sequences=256
    )
    n_eval = args.eval_tokens // args.seq_len
    evaluation = estimate_streamed_forward(arch, n_eval, args.seq_len, 1, 4, profile, host)
    return {"teacher-cache": cache, "eval": evaluation}


def capped(args: argparse.Namespace, work: Path) -> dict:
    import torch
    from random_models import write_random_checkpoint
    from transformers import AutoTokenizer

    from slmcompress.io.sources import builtin_model_dir
    from slmcompress.memory_model import parse_bytes
    from slmcompress.streaming.loader import WeightSource

    config = model_config(args)  # the scale benchmark's random Llama
    model = work / "model"
    if not (model / "config.json").is_file():
        write_random_checkpoint(config, model, dtype=torch.float32, max_shard_bytes=10**9)
        AutoTokenizer.from_pretrained(builtin_model_dir("smollm2-135m")).save_pretrained(model)
    weights, cap = WeightSource(model).nbytes(), parse_bytes(args.cap)
    common = ["--device", "cpu", "--dtype", "float32", "--max-memory", args.max_memory]
    cache_args = ["teacher-cache", str(model), "--data", "c4", "--top-k", "64"]
    cache_args += ["--seq-len", str(args.seq_len), "--n-sequences", str(args.sequences), *common]
    predicted = predictions(config.to_dict(), args)
    rows = []

    full = child([*cache_args, "--out", str(work / "cache-a")], cap, work / "a.json")
    rows.append(_row("teacher-cache", full, predicted["teacher-cache"]))
    print(json.dumps(rows[-1]), flush=True)

    half = args.layers // 2
    b = work / "cache-b"
    killed = child(
        [*cache_args, "--out", str(b)], cap, work / "b.json", lambda: layers_done(b) >= half
    )
    done_at_kill = layers_done(b)
    resumed = child([*cache_args, "--out", str(b)], cap, work / "b2.json")
    row = _row("teacher-cache, killed then resumed", resumed, predicted["teacher-cache"])
    row.update(
        killed_by_sigkill=killed["killed"] and killed["rc"] == -signal.SIGKILL,
        layers_done_at_kill=done_at_kill,
        identical_to_uninterrupted=same_cache(work / "cache-a", b),
    )
    rows.append(row)
    print(json.dumps(row), flush=True)

    eval_args = ["eval", str(model), "--tasks", "", "--no-speed", "--json"]
    eval_args += ["--ppl-tokens", str(args.eval_tokens), "--seq-len", str(args.seq_len), *common]
    evaluation = child(eval_args, cap, work / "e.json")
    row = _row("eval (streamed ppl)", evaluation, predicted["eval"])
    if evaluation["rc"] == 0:
        result = json.loads(evaluation["out"])
        row.update(ppl=result["metrics"]["wikitext2_ppl"], streamed=result["streamed"])
    rows.append(row)
    print(json.dumps(row), flush=True)
    return {
        "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate},
        "weights_bytes": weights,
        "cap_bytes": cap,
        "max_memory": args.max_memory,
        "tokens": f"{args.sequences}x{args.seq_len}",
        "rows": rows,
    }


def _row(name: str, result: dict, estimate) -> dict:
    return {
        "what": name,
        "ok": result["rc"] == 0,
        "peak_rss_bytes": result["peak"],
        "predicted_peak_bytes": estimate.host_peak,
        "error": (estimate.host_peak / result["peak"] - 1) if result["peak"] else None,
        "wall_s": result["wall_s"],
        "predicted_s": round(estimate.time_s, 1),
    }


def smollm2(work: Path) -> dict:
    """SmolLM2-135M forced to stream: ppl, cache and a distilled student, streamed vs in memory."""
    import torch
    import yaml

    from slmcompress.cli.teacher_cache import teacher_cache_command
    from slmcompress.data import EvalSpec, eval_tokens
    from slmcompress.eval.perplexity import perplexity
    from slmcompress.eval.streamed import streamed_perplexity
    from slmcompress.io.load import load_model
    from slmcompress.io.sources import resolve_model_dir
    from slmcompress.recipe import load_recipe
    from slmcompress.runner import run_recipe

    budget = "800MB"  # SmolLM2 needs ~1.1 GB at fp32 with the runtime: streamed
    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    spec = EvalSpec(max_tokens=8192, seq_len=512)
    start = time.perf_counter()
    reference = perplexity(loaded.model, eval_tokens(loaded.tokenizer, spec), 512).ppl
    memory_s = time.perf_counter() - start
    start = time.perf_counter()
    streamed = streamed_perplexity(
        resolve_model_dir("smollm2-135m"), loaded.tokenizer, spec, torch.device("cpu"),
        torch.float32, work / "ppl", budget,
    ).ppl  # fmt: skip
    streamed_s = time.perf_counter() - start
    caches = {}
    for name, memory in (("in-memory", None), ("streamed", budget)):
        start = time.perf_counter()
        teacher_cache_command(
            "smollm2-135m", "c4", 64, work / name, seq_len=256, n_sequences=32,
            dtype="float32", device="cpu", max_memory=memory or "64GB", show_progress=False,
        )  # fmt: skip
        caches[name] = round(time.perf_counter() - start, 1)
    students = {}
    for name in caches:
        recipe = {
            "name": f"student-{name}",
            "model": "smollm2-135m",
            "output_dir": str(work / f"run-{name}"),
            "data": {"eval": {"max_tokens": 8192, "seq_len": 512}},
            "stages": [
                {"type": "prune", "name": "mlp25", "target": {"ffn_hidden_size": 1152}},
                {
                    "type": "distill",
                    "name": "kd",
                    "teacher_cache": str(work / name),
                    "max_steps": 16,
                    "seq_len": 256,
                    "eval_every": 0,
                    "save_every": 0,
                },
            ],  # fmt: skip
            "eval": {"tasks": [], "speed": False},
        }
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        result = run_recipe(load_recipe(path))
        report = json.loads((result.stages[-1].directory / "report.json").read_text())
        students[name] = report["metrics"]["wikitext2_ppl"]
    return {
        "ppl_in_memory": reference,
        "ppl_streamed": streamed,
        "ppl_rel_diff": abs(streamed - reference) / reference,
        "ppl_in_memory_s": round(memory_s, 1),
        "ppl_streamed_s": round(streamed_s, 1),
        "cache_identical": same_cache(work / "in-memory", work / "streamed"),
        "cache_s": caches,
        "student_ppl": students,
        "budget": budget,
    }


def render_md(data: dict) -> str:
    from slmcompress.memory_model import format_bytes

    lines = ["# Streamed forward: teacher cache and evaluation larger than memory", ""]
    lines += [f"Machine: {data['machine']}; versions: {data['versions']}.", ""]
    lines += [f"Command: `{data['command']}`", ""]
    cap = data.get("capped")
    if cap:
        lines += [
            f"Random Llama, {cap['model']['layers']} layers, hidden {cap['model']['hidden']}, "
            f"float32 weights **{format_bytes(cap['weights_bytes'])}**; each row is the CLI in a child "
            f"whose whole address space is capped (RLIMIT_AS) at **{format_bytes(cap['cap_bytes'])}**, "
            f"`--max-memory {cap['max_memory']}`; teacher cache over {cap['tokens']} C4 tokens, top-64.",
            "",
            "| what | ok | peak RSS | plan | error | wall s | plan s | notes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in cap["rows"]:
            notes = ", ".join(
                f"{k}={r[k]}"
                for k in (
                    "killed_by_sigkill",
                    "layers_done_at_kill",
                    "identical_to_uninterrupted",
                    "ppl",
                )
                if k in r
            )
            err = f"{r['error']:+.0%}" if r["error"] is not None else "-"
            peak = format_bytes(r["peak_rss_bytes"]) if r["peak_rss_bytes"] else "-"
            lines.append(
                f"| {r['what']} | {r['ok']} | {peak} | {format_bytes(r['predicted_peak_bytes'])} | "
                f"{err} | {r['wall_s']} | {r['predicted_s']} | {notes} |"
            )
        lines.append("")
    small = data.get("smollm2")
    if small:
        lines += [
            f"SmolLM2-135M forced to stream (`max_memory: {small['budget']}`), WikiText-2 test, "
            "8,192 tokens in 512-token windows:",
            "",
            f"- perplexity in memory {small['ppl_in_memory']:.6f}, streamed {small['ppl_streamed']:.6f} "
            f"(relative difference {small['ppl_rel_diff']:.1e}; {small['ppl_in_memory_s']} s vs "
            f"{small['ppl_streamed_s']} s)",
            f"- teacher cache (32x256 C4, top-64), streamed identical to in-memory: "
            f"**{small['cache_identical']}** ({small['cache_s']} s)",
            f"- student (MLP pruned 25%, 16 KD steps from each cache), ppl: {small['student_ppl']}",
            "",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    from slmcompress.versions import versions

    work = Path(tempfile.mkdtemp(prefix="slm-stream-", dir=args.work))
    data = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "versions": versions(),
        "command": "python " + " ".join(sys.argv),
    }
    try:
        if "capped" in args.parts:
            data["capped"] = capped(args, work)
        if "smollm2" in args.parts:
            data["smollm2"] = smollm2(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data["load_after"] = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stream_forward.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (RESULTS / "stream_forward.md").write_text(render_md(data))
    print(render_md(data))


if __name__ == "__main__":
    main()
