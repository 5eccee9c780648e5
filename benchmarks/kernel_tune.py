"""Tune the serving kernels' launch configs on this GPU in one run; write the file to ship.

    python benchmarks/kernel_tune.py OUT_DIR                # GPU: ~3-4 min on an H100/H200
    python benchmarks/kernel_tune.py OUT_DIR --dry-run      # CPU: interpreter, tiny shapes

For every key (bits, group, N, K, M bucket) of the issue's target layers, the full benchmark's
layers and the SmolLM2-135M / Llama-3.2-1B decode layers, every candidate of
:func:`slmcompress.kernels.routes.candidates` (our gemv / mm / dequant kernels and torch's
tinygemm) is checked against the torch reference and timed as it serves (CUDA graph, weight
copies rotated past L2). Writes to ``OUT_DIR``:

* ``<gpu-slug>.json`` — the winners in the shipped format: copy it to
  ``slmcompress/kernels/configs/`` to ship it (or point ``SLMCOMPRESS_KERNEL_CONFIGS`` at it);
* ``kernel-tune-<gpu-slug>.md`` — per key: winner, its time, bf16 cuBLAS, tinygemm, the
  heuristic default, and the compile report (registers, spills, shared memory);
* ``kernel-tune-<gpu-slug>-log.json`` — every candidate's time or error.

Phases: (1) every distinct kernel compiles in parallel worker processes (Triton's on-disk
cache then serves the timing process); (2) keys are timed in priority order until
``--budget-s`` is spent (later keys are listed as skipped, never guessed); (3) within each
model's decode layers, one kernel specialisation is kept where it is within 5% of each
layer's best, so a model compiles fewer kernels before its first token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter flag must be set before Triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slmcompress.kernels import tinygemm  # noqa: E402
from slmcompress.kernels.config_store import document, gpu_slug  # noqa: E402
from slmcompress.kernels.repack import ServingWeight  # noqa: E402
from slmcompress.kernels.routes import Choice, Key, candidates, heuristic  # noqa: E402
from slmcompress.kernels.tune import best, evaluate, reference_out  # noqa: E402
from slmcompress.versions import versions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from random_models import random_serving_weight  # noqa: E402

GROUP = 128
ROTATE_BYTES = 256 * 2**20  # weight copies per key until this many bytes: past any L2
MAX_COPIES = 64
SHARE_WITHIN = 1.05  # a shared kernel may be this much slower than a layer's own best
TARGET = [(8192, 8192), (8192, 28672), (28672, 8192)]  # (K, N), the layers
BENCH = [(4096, 4096), (4096, 11008), (11008, 4096)]  # the rest of benchmarks/kernel.py
SMOLLM2 = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
LLAMA_1B = [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]
DRY = [(256, 128), (256, 64)]


def plan_keys(dry: bool) -> list[tuple[str, Key]]:
    """``(family, key)`` in priority order: what must be tuned first comes first."""
    if dry:
        return [("dry", Key(b, 64, n, k, m)) for b, m in ((4, 1), (3, 1), (4, 16)) for k, n in DRY]
    order = [("target", 4, TARGET, 1), ("target", 3, TARGET, 1)]
    order += [("smollm2", 4, SMOLLM2, 1), ("llama1b", 4, LLAMA_1B, 1), ("smollm2", 4, SMOLLM2, 16)]
    order += [("target", 4, TARGET, m) for m in (16, 64, 256, 4)]
    order += [("llama1b", 4, LLAMA_1B, 16), ("llama1b", 4, LLAMA_1B, 8)]
    order += [("bench", 4, BENCH, m) for m in (1, 16, 64, 256, 4)]
    return [(fam, Key(bits, GROUP, n, k, m)) for fam, bits, shapes, m in order for k, n in shapes]


def random_weight(key: Key, device: str, seed: int) -> ServingWeight:
    return random_serving_weight(key.bits, key.group, key.n, key.k, device, seed)


def copies_for(key: Key, dry: bool) -> int:
    per = key.k * key.n * key.bits // 8
    return 1 if dry else max(1, min(MAX_COPIES, -(-ROTATE_BYTES // per)))


# ---------------------------------------------------------------- phase 1: parallel compile


def _compile_job(job: tuple) -> dict:
    """Worker: compile one kernel specialisation into Triton's disk cache, report its resources."""
    from slmcompress.kernels import triton_qmm

    route, params, bits, group, m, n, k = job
    start = time.perf_counter()
    try:
        kernel = triton_qmm.warmup(route, params, bits, group, False, torch.float16, m, n, k)
        kernel._init_handles()  # loads it: registers and spills are known only then
        info = dict(regs=kernel.n_regs, spills=kernel.n_spills, smem=kernel.metadata.shared)
    except Exception as err:  # noqa: BLE001 - reported per kernel; timing skips it
        info = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return dict(job=list(job), seconds=round(time.perf_counter() - start, 2), **info)


def precompile(plan: list[tuple[str, Key, list[Choice]]], workers: int) -> dict[tuple, dict]:
    """Compile each distinct kernel once, ``workers`` processes at a time."""
    import multiprocessing as mp

    from slmcompress.kernels.triton_qmm import compile_identity

    jobs: dict[tuple, tuple] = {}
    for _, key, pool in plan:
        for c in pool:
            if c.route == "tinygemm":
                continue
            ident = compile_identity(c.route, c.p, key.bits, key.group, False, key.m, key.n, key.k)
            jobs.setdefault(ident, (c.route, c.p, key.bits, key.group, key.m, key.n, key.k))
    print(f"compiling {len(jobs)} kernels in {workers} processes", flush=True)
    with mp.get_context("spawn").Pool(workers) as pool:
        results = pool.map(_compile_job, list(jobs.values()), chunksize=1)
    return dict(zip(jobs, results, strict=True))


# ---------------------------------------------------------------- phase 2: timing


def cpu_time_us(fn) -> float:
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def bf16_us(key: Key, device: str, dry: bool, timer) -> float:
    """cuBLAS bf16 ``F.linear`` on the same shape and M, weights rotated the same way."""
    copies = max(1, min(MAX_COPIES, -(-ROTATE_BYTES // (key.k * key.n * 2)))) if not dry else 1
    ws = [torch.randn(key.n, key.k, device=device, dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(key.m, key.k, device=device, dtype=torch.bfloat16)
    return timer(lambda: [F.linear(x, w) for w in ws]) / copies


def tune_key(key: Key, pool: list[Choice], device: str, dry: bool, timer) -> dict:
    """Check and time every candidate of ``key``; return its log record."""
    weights = [random_weight(key, device, seed) for seed in range(copies_for(key, dry))]
    tiny: list[dict] = [{} for _ in weights]

    def getter(i: int):
        def get(inner: int) -> tinygemm.TinyGemmWeight:
            if inner not in tiny[i]:
                tiny[i][inner] = tinygemm.convert(weights[i], inner)
            return tiny[i][inner]

        return get

    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(key.m, key.k, generator=gen, device=device).half()
    ref = reference_out(x, weights[0])
    kwargs = {} if timer is None else {"timer": timer}
    rows = evaluate(pool, x, weights, [getter(i) for i in range(len(weights))], ref, **kwargs)
    return dict(key=str(key), copies=len(weights), rows=rows)


# ---------------------------------------------------------------- phase 3: pick and share


def winners(records: dict[str, dict], families: dict[str, str]) -> dict[str, dict]:
    """Per key the fastest correct row; per (family, bits, group, M) one kernel if it can be shared."""
    from slmcompress.kernels.triton_qmm import compile_identity

    picked = {k: best(r["rows"]) for k, r in records.items()}
    groups: dict[tuple, list[str]] = {}
    for text in records:
        key = Key.parse(text)
        groups.setdefault((families[text], key.bits, key.group, key.m), []).append(text)
    for members in groups.values():
        if len(members) < 2 or any(picked[t] is None for t in members):
            continue
        per_ident: dict[tuple, dict[str, dict]] = {}
        for text in members:
            key = Key.parse(text)
            for row in records[text]["rows"]:
                if "us" not in row:
                    continue
                c = Choice.from_json(row["choice"])
                ident = ("tinygemm",) if c.route == "tinygemm" else compile_identity(
                    c.route, c.p, key.bits, key.group, False, 0, 16, 16
                )  # fmt: skip
                slot = per_ident.setdefault(ident, {})
                if text not in slot or row["us"] < slot[text]["us"]:
                    slot[text] = row
        shared = [
            (max(slot[t]["us"] / picked[t]["us"] for t in members), ident)
            for ident, slot in per_ident.items()
            if len(slot) == len(members)
        ]
        if shared:
            worst, ident = min(shared)
            if worst <= SHARE_WITHIN:
                for t in members:
                    row = per_ident[ident][t]
                    picked[t] = {**row, "shared": row["label"] != picked[t]["label"]}
    return picked


# ---------------------------------------------------------------- report


def render_md(meta: dict, summary: list[dict], compiles: list[dict]) -> str:
    lines = [
        f"# Kernel tuning sweep: {meta['gpu']}",
        "",
        f"`{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}; "
        f"{meta['seconds']:.0f} s ({meta['compile_seconds']:.0f} s compiling "
        f"{len(compiles)} kernels). Times are µs per layer call, CUDA graph, weight copies "
        "rotated past L2 (small layers fit in L2 anyway); fp16 activations.",
        "",
        "| key | family | winner | µs | bf16 cuBLAS µs | vs bf16 | tinygemm µs | heuristic µs | ok/timed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        if s.get("skipped"):
            lines.append(f"| {s['key']} | {s['family']} | skipped: {s['skipped']} | | | | | | |")
            continue
        lines.append(
            f"| {s['key']} | {s['family']} | {s['winner']}{' (shared)' if s.get('shared') else ''} | "
            f"{s['us']} | {s['bf16_us']} | {s['vs_bf16']}x | {s.get('tinygemm_us', '-')} | "
            f"{s.get('heuristic_us', '-')} | {s['ok']}/{s['timed']} |"
        )
    lines += [
        "",
        "## Compiled kernels (on this GPU)",
        "",
        "| kernel | regs | spills | smem B | s |",
    ]
    lines += ["|---|---|---|---|---|"]
    for c in compiles:
        name = Choice.make(c["job"][0], **c["job"][1]).label() + f" b{c['job'][2]}"
        if "error" in c:
            lines.append(f"| {name} | error: {c['error']} | | | |")
        else:
            lines.append(f"| {name} | {c['regs']} | {c['spills']} | {c['smem']} | {c['seconds']} |")
    return "\n".join(lines) + "\n"


def summarize(fam: str, key: Key, rec: dict, pick: dict | None, bf16: float) -> dict:
    rows = rec["rows"]
    out = dict(key=str(key), family=fam, ok=sum("us" in r for r in rows), timed=len(rows))
    if pick is None:
        return {**out, "skipped": "no candidate ran correctly"}
    tiny = [r["us"] for r in rows if "us" in r and r["choice"]["route"] == "tinygemm"]
    heur = heuristic(key).label()
    heur_us = [r["us"] for r in rows if r["label"] == heur and "us" in r]
    out.update(winner=pick["label"], us=round(pick["us"], 2), bf16_us=round(bf16, 2))
    out.update(vs_bf16=round(bf16 / pick["us"], 2), shared=pick.get("shared", False))
    if tiny:
        out["tinygemm_us"] = round(min(tiny), 2)
    if heur_us:
        out["heuristic_us"] = round(heur_us[0], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop timing new keys after")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU: use --dry-run")
    import triton

    start = time.perf_counter()
    gpu = "cpu-interpreter" if args.dry_run else torch.cuda.get_device_name()
    sms = 132 if args.dry_run else torch.cuda.get_device_properties(0).multi_processor_count
    plan = []
    for fam, key in plan_keys(args.dry_run):
        pool = candidates(key, "fp16", compiled=not args.dry_run, sms=sms)
        plan.append((fam, key, pool[:3] if args.dry_run else pool))
    compiles = {} if args.dry_run else precompile(plan, args.workers)
    compile_s = time.perf_counter() - start
    timer = cpu_time_us if args.dry_run else None
    records, families, summary, bf16 = {}, {}, [], {}
    for fam, key, pool in plan:
        if time.perf_counter() - start > args.budget_s:
            summary.append(dict(key=str(key), family=fam, skipped="time budget spent"))
            continue
        if str(key) in records:
            continue
        records[str(key)] = tune_key(key, pool, device, args.dry_run, timer)
        families[str(key)] = fam
        bf16[str(key)] = bf16_us(key, device, args.dry_run, timer or _gpu_timer())
        top = best(records[str(key)]["rows"])
        print(f"{key} {fam}: {top['label'] if top else 'none'} "
              f"{top['us'] if top else float('nan'):.1f} us (bf16 {bf16[str(key)]:.1f})", flush=True)  # fmt: skip
    picks = winners(records, families)
    summary = [
        summarize(families[k], Key.parse(k), records[k], picks[k], bf16[k]) for k in records
    ] + [s for s in summary if s.get("skipped")]
    entries = {
        Key.parse(k): {**p["choice"], "us": round(p["us"], 2)}
        for k, p in picks.items()
        if p is not None
    }
    command = "python benchmarks/kernel_tune.py " + " ".join(sys.argv[1:])
    meta = dict(
        gpu=gpu, command=command, torch=torch.__version__, triton=triton.__version__,
        seconds=time.perf_counter() - start, compile_seconds=compile_s,
        versions=versions(),
    )  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = gpu_slug(gpu)
    doc = document(
        gpu, entries, torch=torch.__version__, triton=triton.__version__, made_by=command
    )
    (args.out_dir / f"{slug}.json").write_text(json.dumps(doc, indent=1) + "\n")
    log = dict(meta=meta, records=records, compiles=list(compiles.values()), summary=summary)
    (args.out_dir / f"kernel-tune-{slug}-log.json").write_text(json.dumps(log, indent=1) + "\n")
    md = render_md(meta, summary, list(compiles.values()))
    (args.out_dir / f"kernel-tune-{slug}.md").write_text(md)
    print(md[: md.find("## Compiled")])
    print(f"wrote {args.out_dir}/{slug}.json (ship: copy to slmcompress/kernels/configs/)")
    return 0


def _gpu_timer():
    from slmcompress.kernels.tune import cuda_time_us

    return cuda_time_us


if __name__ == "__main__":
    sys.exit(main())
