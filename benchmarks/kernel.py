"""Benchmark the int4/int3 serving kernels against cuBLAS bf16/fp16 and torch's tinygemm.

    python benchmarks/kernel.py                  # GPU: full table + end-to-end decode + first token
    python benchmarks/kernel.py --quick          # GPU: the 8192-class layers only (~1-2 min)
    python benchmarks/kernel.py --dry-run        # CPU: tiny shapes under the Triton interpreter
    python benchmarks/kernel.py --compile-check 90   # no GPU: compile every tuning candidate
                                                     # for sm_90; registers, spills, smem

Writes ``kernel-<gpu>.json`` and ``.md`` (two files) to ``--out-dir`` (default
``benchmarks/results``; a fresh temporary directory for ``--dry-run``); ``--compile-check``
writes ``kernel-compile-sm<arch>.json`` and ``.md``. Every "int4/int3 served" number names the
route and launch config that served it (shipped/cached config, or the heuristic default: this
script never tunes; ``benchmarks/kernel_tune.py`` does). See
``benchmarks/results/kernel-README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter flag must be set before Triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("SLMCOMPRESS_KERNEL", "triton")
os.environ["SLMCOMPRESS_KERNEL_TUNE"] = "off"  # never tune here: shipped config or heuristic

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from slmcompress.kernels import dispatch, serving, tinygemm  # noqa: E402
from slmcompress.kernels.execute import execute  # noqa: E402
from slmcompress.kernels.routes import Choice, Key, candidates, m_bucket  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from random_models import random_quant_linear_on, random_serving_weight  # noqa: E402

SHAPES = [
    (4096, 4096),
    (4096, 11008),
    (11008, 4096),
    (8192, 8192),
    (8192, 28672),
    (28672, 8192),
]  # (K, N)
MS = [1, 4, 16, 64, 256]
QUICK_SHAPES, QUICK_MS = [(8192, 8192), (8192, 28672), (28672, 8192)], [1, 16, 64, 256]
DRY_SHAPES, DRY_MS = [(256, 128)], [1, 32]
INT3_MS = (1,)  # the 3-bit target is M = 1
GROUP_SIZE = 128
ROTATE_BYTES = 256 * 2**20  # rotate weight copies until this many bytes: far beyond any L2
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    tie_word_embeddings=True,
    head_dim=16,
)
SMOLLM2 = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, head_dim=64,
    max_position_embeddings=8192, rope_theta=1e5, rms_norm_eps=1e-5,
)  # fmt: skip
LLAMA_1B = dict(  # Llama-3.2-1B's shapes
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
    max_position_embeddings=8192, rope_theta=5e5, rms_norm_eps=1e-5,
)  # fmt: skip


# ---------------------------------------------------------------- timing


def make_timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Microseconds per call: CUDA-graph timing on a GPU (no launch gaps), wall clock on CPU."""
    if device != "cuda":

        def wall(fn: Callable[[], object]) -> float:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e6

        return wall
    import triton.testing as tt

    def gpu(fn: Callable[[], object]) -> float:
        fn()  # compile outside the graph
        torch.cuda.synchronize()
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                return tt.do_bench_cudagraph(fn, rep=100) * 1e3
        except Exception:  # noqa: BLE001 - some ops refuse capture: plain do_bench then
            return tt.do_bench(fn, warmup=25, rep=100) * 1e3

    return gpu


def rotated(fns: list[Callable[[], object]]) -> Callable[[], None]:
    """One call runs every weight copy once; time / len(fns) is a cold-L2 time per call."""

    def run() -> None:
        for fn in fns:
            fn()

    return run


def copy_bandwidth(timer: Callable, device: str) -> float:
    """Device-memory copy bandwidth in GB/s (read + write) of a 1 GiB copy."""
    n = (1 << 30 if device == "cuda" else 1 << 24) // 2
    src, dst = (
        torch.empty(n, dtype=torch.float16, device=device),
        torch.empty(n, dtype=torch.float16, device=device),
    )
    us = timer(lambda: dst.copy_(src))
    return 2 * n * 2 / us / 1e3


# ---------------------------------------------------------------- per-shape ops


def n_copies(bytes_per_copy: int, dry: bool) -> int:
    return 1 if dry else max(1, min(64, -(-ROTATE_BYTES // bytes_per_copy)))


def quant_bytes(k: int, n: int, m: int, bits: int = 4) -> int:
    """Bytes a perfect kernel moves: packed weights + fp16 scales and zeros + activations."""
    groups = -(-k // GROUP_SIZE)
    return k * n * bits // 8 + groups * n * 4 + m * (k + n) * 2


def dense_bytes(k: int, n: int, m: int) -> int:
    return k * n * 2 + m * (k + n) * 2


def served_choice(key: Key, weight, dtype: torch.dtype) -> tuple[Choice, str]:
    """The route serving would use for ``key`` here: shipped/cached config, else heuristic."""
    state = serving.LayerState((), weight, "benchmark")
    return serving.resolve(key, state, dtype)


def tiny_getter(weight):
    cache: dict = {}

    def get(inner: int):
        if inner not in cache:
            cache[inner] = tinygemm.convert(weight, inner)
        return cache[inner]

    return get


def bench_shape(
    k: int, n: int, ms: list[int], timer: Callable, device: str, dry: bool, notes: list[str]
) -> list[dict]:
    """Rows for one (K, N): every M x every implementation, with the route behind each."""
    weights = {
        bits: [
            random_serving_weight(bits, GROUP_SIZE, n, k, device, seed=i)
            for i in range(n_copies(quant_bytes(k, n, 1, bits), dry))
        ]
        for bits in (4, 3)
    }
    dense = {
        dt: [
            torch.randn(n, k, dtype=dt, device=device) * 0.02
            for _ in range(n_copies(dense_bytes(k, n, 1), dry))
        ]
        for dt in (torch.float16, torch.bfloat16)
    }
    tiny_choice = Choice.make("tinygemm", inner_k_tiles=8)
    tiny_ok = device == "cuda" and tinygemm.available() and k % 128 == 0
    if not tiny_ok and "tinygemm: CUDA only" not in " ".join(notes):
        notes.append("tinygemm: CUDA only (and K % 128 == 0); not timed here")
    rows = []
    for m in ms:
        x = torch.randn(m, k, dtype=torch.float16, device=device)
        xb = x.to(torch.bfloat16)
        impls: dict[str, tuple[list, int, str]] = {
            "fp16 cuBLAS": (
                [lambda w=w, x=x: F.linear(x, w) for w in dense[torch.float16]],
                dense_bytes(k, n, m), "F.linear",
            ),
            "bf16 cuBLAS": (
                [lambda w=w, x=xb: F.linear(x, w) for w in dense[torch.bfloat16]],
                dense_bytes(k, n, m), "F.linear",
            ),
        }  # fmt: skip
        for bits in (4, 3) if m in INT3_MS else (4,):
            key = Key(bits, GROUP_SIZE, n, k, m_bucket(m))
            choice, source = served_choice(key, weights[bits][0], x.dtype)
            getters = [tiny_getter(w) for w in weights[bits]]
            impls[f"int{bits} served"] = (
                [
                    lambda w=w, g=g, c=choice, x=x: execute(c, x, w, g)
                    for w, g in zip(weights[bits], getters, strict=True)
                ],
                quant_bytes(k, n, m, bits),
                f"{choice.label()} ({source})",
            )
        dq = next(c for c in candidates(Key(4, GROUP_SIZE, n, k, 1024)) if c.route == "dequant")
        impls["int4 dequant+cuBLAS"] = (
            [lambda w=w, x=x, c=dq: execute(c, x, w) for w in weights[4]],
            quant_bytes(k, n, m),
            dq.label(),
        )
        if tiny_ok:
            getters = [tiny_getter(w) for w in weights[4]]
            impls["int4 tinygemm (bf16)"] = (
                [lambda w=w, g=g, x=xb: execute(tiny_choice, x, w, g) for w, g in zip(weights[4], getters, strict=True)],
                quant_bytes(k, n, m), "aten._weight_int4pack_mm",
            )  # fmt: skip
        times = {name: timer(rotated(fns)) / len(fns) for name, (fns, _, _) in impls.items()}
        for name, (_, nbytes, route) in impls.items():
            us = times[name]
            rows.append(
                dict(
                    K=k, N=n, M=m, impl=name, route=route, us=round(us, 2),
                    speedup_vs_fp16=round(times["fp16 cuBLAS"] / us, 3),
                    speedup_vs_bf16=round(times["bf16 cuBLAS"] / us, 3),
                    GBps=round(nbytes / us / 1e3, 1),
                )
            )  # fmt: skip
    return rows


def add_roofline(rows: list[dict], copy_gbps: float) -> float:
    """Roofline bandwidth = max(1 GiB copy, best dense GEMV); each row's % of it."""
    gemv = [r["GBps"] for r in rows if r["M"] == 1 and "cuBLAS" in r["impl"]]
    bw = max([copy_gbps, *gemv])
    for r in rows:
        r["roofline_pct"] = round(100 * r["GBps"] / bw, 1)
    return bw


# ---------------------------------------------------------------- end to end


def random_gptq_llama(config: dict, device: str, dtype: torch.dtype, bits: int = 4) -> nn.Module:
    """A Llama with random fp weights whose decoder linears are random GPTQ QuantLinears."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                layer = random_quant_linear_on(
                    child.in_features, child.out_features, bits, GROUP_SIZE, device
                )
                setattr(parent, name, layer)
    return model


def decode_tokens_per_s(model: nn.Module, batch: int, new_tokens: int, device: str) -> float:
    """Greedy decode speed (prefill of a 16-token prompt excluded)."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, 16), device=device)
    kwargs = dict(do_sample=False, pad_token_id=0)

    def timed(n: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(2)  # warm-up: compile, allocator
    decode = max(timed(new_tokens) - timed(1), 1e-9)
    return batch * (new_tokens - 1) / decode


def bench_e2e(device: str, dry: bool) -> list[dict]:
    """Float vs GPTQ-4 decode tokens/s: SmolLM2-135M- and Llama-3.2-1B-shaped, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.float32 if dry else torch.float16
    models = [("tiny", TINY, (1,))] if dry else [("smollm2-135m", SMOLLM2, (1, 8)), ("llama-1b", LLAMA_1B, (1,))]  # fmt: skip
    new_tokens, rows = (3 if dry else 64), []
    with torch.no_grad():
        for name, config, batches in models:
            torch.manual_seed(0)
            with torch.device(device):
                model = LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()
            for batch in batches:
                tps = decode_tokens_per_s(model, batch, new_tokens, device)
                rows.append(dict(model=name, weights=str(dtype).removeprefix("torch."), batch=batch, tokens_per_s=round(tps, 1)))  # fmt: skip
            del model
            quant = random_gptq_llama(config, device, dtype)
            serving.served.clear()
            backends = dispatch.set_backends(quant, force=dry)
            for batch in batches:
                tps = decode_tokens_per_s(quant, batch, new_tokens, device)
                rows.append(dict(model=name, weights=f"gptq-4bit g{GROUP_SIZE}", batch=batch, tokens_per_s=round(tps, 1), backends=backends, routes=dict(serving.served)))  # fmt: skip
            del quant
    return rows


FIRST_TOKEN = """
import json, os, sys, time
start = time.perf_counter()
import torch
sys.path.insert(0, "benchmarks")
import kernel as kb
from slmcompress.kernels import dispatch
model = kb.random_gptq_llama(kb.SMOLLM2, "cuda", torch.float16)
torch.cuda.synchronize()
built = time.perf_counter()
dispatch.prepare_for_serving(model)
prompt = torch.randint(0, 49152, (1, 12), device="cuda")
with torch.no_grad():
    model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)
torch.cuda.synchronize()
end = time.perf_counter()
print(json.dumps({"process_s": round(end - start, 2), "serve_to_first_token_s": round(end - built, 2)}))
"""


def first_token(out_dir: Path) -> list[dict]:
    """Model on the GPU -> repack -> first token, in fresh processes: cold, then warm Triton cache.

    Excludes reading a checkpoint (the model is built with random weights on the GPU): it
    measures what the kernels add before the first token (repack, config lookup, compiles).
    """
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache, "SLMCOMPRESS_KERNEL_TUNE": "off"}
        for state in ("cold Triton cache", "warm Triton cache"):
            proc = subprocess.run(
                [sys.executable, "-c", FIRST_TOKEN], cwd=Path(__file__).resolve().parents[1],
                env=env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            if proc.returncode:
                rows.append(dict(state=state, error=proc.stderr.strip().splitlines()[-1][:300]))
            else:
                rows.append(dict(state=state, **json.loads(proc.stdout.strip().splitlines()[-1])))
    return rows


# ---------------------------------------------------------------- compile check


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack (spill) bytes, local memory from ``cuobjdump --dump-resource-usage``."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout  # fmt: skip
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in fields.items()}


def _sass(cubin: bytes) -> list[tuple[int, str]]:
    """``(address, instruction)`` of a cubin's SASS (``cuobjdump -sass``)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    return [(int(a, 16), i) for a, i in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", text)]


def loop_instructions(cubin: bytes) -> int | None:
    """Instructions in the innermost loop body (a backward branch's span), None without a loop."""
    sass = _sass(cubin)
    index = {addr: i for i, (addr, _) in enumerate(sass)}
    spans = []
    for i, (addr, ins) in enumerate(sass):
        target = re.search(r"BRA\s+(?:\S+\s+)?(0x[0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            spans.append(i + 1 - index[int(target.group(1), 16)])
    return min(spans) if spans else None


def gemv_weights_per_iteration(p: dict, bits: int) -> int:
    """Codes one thread handles per inner-loop step (columns per thread x rows per step)."""
    cols = max(1, p["block_n"] // (32 * p["num_warps"]))
    return cols * p["block_kb"] * (8 if bits == 4 else 32) * p["block_m"]


def compile_check(arch: int, smem_limit: int, out_dir: Path) -> int:
    """Compile every tuning candidate of the sweep's keys for ``sm_<arch>``; report resources.

    One row per distinct kernel specialisation (what the GPU would compile), fp16 and bf16
    activations. Exit 1 if one spills or needs more shared memory than ``smem_limit``.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    import triton
    from kernel_tune import plan_keys

    from slmcompress.kernels import triton_qmm

    seen, rows = set(), []
    for _, key in plan_keys(False):
        for c in candidates(key):
            if c.route == "tinygemm":
                continue
            ident = triton_qmm.compile_identity(c.route, c.p, key.bits, key.group, False, key.m, key.n, key.k)  # fmt: skip
            for dtype in ("fp16", "bf16"):
                if (ident, dtype) in seen or (dtype == "bf16" and c.route != "mm"):
                    continue
                seen.add((ident, dtype))
                start = time.perf_counter()
                kernel = triton_qmm.compile_choice(c.route, c.p, key.bits, key.group, False, dtype, arch)  # fmt: skip
                usage = resource_usage(kernel.asm["cubin"])
                per_weight = None
                if c.route == "gemv" and (body := loop_instructions(kernel.asm["cubin"])):
                    per_weight = round(body / gemv_weights_per_iteration(c.p, key.bits), 2)
                rows.append(dict(
                    kernel=c.label(), bits=key.bits, group=key.group, x_dtype=dtype,
                    regs=usage.get("reg"), spill_bytes=usage.get("stack", 0) + usage.get("local", 0),
                    triton_smem=kernel.metadata.shared, wgmma="wgmma" in kernel.asm["ptx"],
                    sass_per_weight=per_weight,
                    seconds=round(time.perf_counter() - start, 2),
                ))  # fmt: skip
                print(rows[-1], flush=True)
    bad = [r for r in rows if r["spill_bytes"] or r["triton_smem"] > smem_limit]
    from triton.backends.nvidia.compiler import get_ptxas_version

    ptxas = get_ptxas_version(arch).strip().splitlines()[-1]
    report = dict(arch=arch, triton=triton.__version__, ptxas=ptxas, command="python benchmarks/kernel.py " + " ".join(sys.argv[1:]), smem_limit=smem_limit, rows=rows)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"kernel-compile-sm{arch}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render_compile_md(report))
    print(
        f"{len(rows)} kernels; {len(bad)} spill or exceed {smem_limit} B of shared memory; wrote {stem}.md"
    )
    return 1 if bad else 0


def render_compile_md(report: dict) -> str:
    rows = report["rows"]
    lines = [
        f"# Serving kernels compiled for sm_{report['arch']} (no GPU)",
        "",
        f"`{report['command']}`, triton {report['triton']}, ptxas {report['ptxas']}. Every tuning "
        "candidate of `benchmarks/kernel_tune.py`'s keys, once per distinct specialisation, "
        "as the JIT specialises a launch (N, K, strides multiples of 16). regs = registers "
        "per thread; spill = stack + local bytes; smem = Triton's shared memory in bytes "
        "(the 1 KiB the driver reserves not counted); wgmma = Hopper warpgroup MMA in the PTX; "
        "instr/weight = SASS instructions of the GEMV's inner loop per weight a thread handles "
        "(blank: the loop is fully unrolled). At M = 1, K = N = 8192 on 132 SMs issuing 128 "
        "thread-instructions per clock at 1.98 GHz, 1 instr/weight is ~2 µs against an ~8 µs "
        "memory floor.",
        "",
        f"{len(rows)} kernels; spilling: {sum(1 for r in rows if r['spill_bytes'])}; "
        f"max registers {max(r['regs'] for r in rows)}; max smem {max(r['triton_smem'] for r in rows)} B.",
        "",
        "| kernel | bits | group | x | regs | spill B | smem B | wgmma | instr/weight |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['kernel']} | {r['bits']} | {r['group']} | {r['x_dtype']} | {r['regs']} | "
        f"{r['spill_bytes']} | {r['triton_smem']} | {'yes' if r['wgmma'] else ''} | "
        f"{r['sass_per_weight'] or ''} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- report


def gpu_name(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu-interpreter"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def render_md(report: dict) -> str:
    lines = [
        f"# Int4/int3 serving-kernel benchmark: {report['device']}",
        "",
        f"`{report['command']}`; torch {report['torch']}, triton {report['triton']}; group size "
        f"{GROUP_SIZE}; fp16 activations (bf16 for bf16 cuBLAS and tinygemm); times are cold-L2 "
        f"(rotated weights), CUDA graphs. Roofline bandwidth {report['roofline_GBps']:.0f} GB/s = "
        f"max(1 GiB copy {report['copy_GBps']:.0f}, best dense GEMV). Configs: "
        f"{report['configs']}.",
        "",
        "| K | N | M | impl | route | µs | vs fp16 | vs bf16 | GB/s | % roofline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['K']} | {r['N']} | {r['M']} | {r['impl']} | {r['route']} | {r['us']} | "
        f"{r['speedup_vs_fp16']}x | {r['speedup_vs_bf16']}x | {r['GBps']} | {r['roofline_pct']} |"
        for r in report["rows"]
    ]
    if report["e2e"]:
        lines += ["", "## End-to-end greedy decode", "", "| model | weights | batch | tokens/s | routes |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {r['model']} | {r['weights']} | {r['batch']} | {r['tokens_per_s']} | {', '.join(r.get('routes', {}))} |"
            for r in report["e2e"]
        ]  # fmt: skip
    if report["first_token"]:
        lines += ["", "## SmolLM2-shaped GPTQ-4: model on GPU -> first token (fresh process)", ""]
        lines += [f"- {r}" for r in report["first_token"]]
    if report["notes"]:
        lines += ["", "Notes:", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU interpreter")
    parser.add_argument("--quick", action="store_true", help="8192-class layers only, no e2e")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--compile-check", type=int, metavar="ARCH", help="e.g. 90 (H100/H200)")
    parser.add_argument("--smem-limit", type=int, default=227 * 1024)
    args = parser.parse_args(argv)
    if args.compile_check:
        out = args.out_dir or Path(__file__).parent / "results"
        return compile_check(args.compile_check, args.smem_limit, out)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU: use --dry-run (CPU interpreter) or --compile-check")
    import triton

    out_dir = args.out_dir or (
        Path(tempfile.mkdtemp(prefix="kernel-bench-")) if args.dry_run else Path(__file__).parent / "results"
    )  # fmt: skip
    timer, notes = make_timer(device), []
    copy_gbps = copy_bandwidth(timer, device)
    shapes, ms = (DRY_SHAPES, DRY_MS) if args.dry_run else (QUICK_SHAPES, QUICK_MS) if args.quick else (SHAPES, MS)  # fmt: skip
    rows = []
    for k, n in shapes:
        rows += bench_shape(k, n, ms, timer, device, args.dry_run, notes)
        print(f"K={k} N={n} done", flush=True)
    bw = add_roofline(rows, copy_gbps)
    if args.dry_run:
        notes.append(
            "dry run: CPU interpreter timings are meaningless; this only proves the script runs"
        )
    store = serving.store_for("cpu-interpreter" if args.dry_run else torch.cuda.get_device_name())
    sources = [name for name, entries in store.layers if entries]
    e2e = [] if (args.skip_e2e or args.quick) else bench_e2e(device, args.dry_run)
    first = [] if (args.quick or args.dry_run or args.skip_e2e) else first_token(out_dir)
    report = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
        command="python benchmarks/kernel.py " + " ".join(sys.argv[1:] if argv is None else argv),
        torch=torch.__version__, triton=triton.__version__, copy_GBps=round(copy_gbps, 1),
        roofline_GBps=round(bw, 1), configs=", ".join(sources) or "none (heuristic defaults)",
        rows=rows, e2e=e2e, first_token=first, notes=notes,
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"kernel-{gpu_name(device)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(render_md(report))
    print(render_md(report))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
