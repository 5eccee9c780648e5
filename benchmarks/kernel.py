"""Benchmark the Triton int4 dequant-matmul against cuBLAS fp16/bf16 and torch's tinygemm.

    python benchmarks/kernel.py                 # GPU: full table + end-to-end decode tokens/s
    python benchmarks/kernel.py --dry-run       # CPU: tiny shapes under the Triton interpreter
    python benchmarks/kernel.py --compile-check 90   # no GPU: compile every autotune config for
                                                     # sm_90 and report its shared memory

Writes ``kernel-<gpu>.json`` and ``.md`` to ``--out-dir`` (default ``benchmarks/results``;
a fresh temporary directory for ``--dry-run``). See ``benchmarks/results/kernel-README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter flag must be set before Triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("SLMCOMPRESS_KERNEL", "triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from slmcompress.kernels import dispatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from random_models import random_quant_linear  # noqa: E402

from slmcompress.quant.qparams import rtn_quantize_weight  # noqa: E402
from slmcompress.quant.quant_linear import QuantLinear  # noqa: E402

SHAPES = [
    (4096, 4096),
    (4096, 11008),
    (11008, 4096),
    (8192, 8192),
    (8192, 28672),
    (28672, 8192),
]  # (K, N)
MS = [1, 4, 16, 64, 256]
DRY_SHAPES, DRY_MS = [(256, 128)], [1, 32]
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
        fn()  # autotune + compile outside the graph
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
    """Measured device-memory copy bandwidth in GB/s (read + write): the roofline we report against."""
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


def int4_bytes(k: int, n: int, m: int) -> int:
    """Bytes a perfect kernel moves: packed weights + fp16 scales + qzeros + activations in/out."""
    groups = -(-k // GROUP_SIZE)
    return k * n // 2 + groups * n * 2 + groups * n // 2 + m * (k + n) * 2


def dense_bytes(k: int, n: int, m: int) -> int:
    return k * n * 2 + m * (k + n) * 2


def tinygemm_ops(k: int, n: int, copies: int, device: str):
    """``(x_bf16, [packed weights])`` builder for torch's int4 tinygemm, or a reason it is missing."""
    if device != "cuda":
        return None, "tinygemm: CUDA only here"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return None, "tinygemm: torch.ops.aten._weight_int4pack_mm not in this torch"
    try:
        weights = []
        for _ in range(copies):
            q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=device)
            packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (N, K/2)
            packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
            sz = torch.rand(k // GROUP_SIZE, n, 2, dtype=torch.bfloat16, device=device)
            weights.append((packed, sz))
        return weights, None
    except Exception as err:  # noqa: BLE001 - report, don't crash the whole table
        return None, f"tinygemm: {type(err).__name__}: {err}"


def tinygemm(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm(x, weight[0], GROUP_SIZE, weight[1])


def bench_shape(
    k: int,
    n: int,
    ms: list[int],
    timer: Callable,
    device: str,
    dry: bool,
    bw: float,
    notes: list[str],
) -> list[dict]:
    """Rows for one (K, N): every M x every implementation."""
    from slmcompress.kernels import int4_matmul as km

    layers = [
        random_quant_linear(k, n, 4, GROUP_SIZE, seed=i).to(device)
        for i in range(n_copies(int4_bytes(k, n, 1), dry))
    ]
    packed = [dispatch.packed_weight(layer) for layer in layers]
    dense = {
        dt: [
            torch.randn(n, k, dtype=dt, device=device) * 0.02
            for _ in range(n_copies(dense_bytes(k, n, 1), dry))
        ]
        for dt in (torch.float16, torch.bfloat16)
    }
    tiny, why = tinygemm_ops(k, n, n_copies(int4_bytes(k, n, 1), dry), device)
    if why and why not in notes:
        notes.append(why)
    rows = []
    for m in ms:
        x = torch.randn(m, k, dtype=torch.float16, device=device)
        xb = x.to(torch.bfloat16)
        impls = {
            "fp16 cuBLAS": (
                [lambda w=w, x=x: F.linear(x, w) for w in dense[torch.float16]],
                dense_bytes(k, n, m),
            ),
            "bf16 cuBLAS": (
                [lambda w=w, x=xb: F.linear(x, w) for w in dense[torch.bfloat16]],
                dense_bytes(k, n, m),
            ),
            "int4 triton fused": (
                [lambda w=w, x=x: km.fused_matmul(x, w) for w in packed],
                int4_bytes(k, n, m),
            ),
            "int4 dequant+cuBLAS": (
                [lambda w=w, x=x: km.quant_matmul(x, w, dense_min_m=0) for w in packed],
                int4_bytes(k, n, m),
            ),
        }
        if tiny:
            impls["int4 tinygemm (bf16)"] = (
                [lambda w=w, x=xb: tinygemm(x, w) for w in tiny],
                int4_bytes(k, n, m),
            )
        times = {name: timer(rotated(fns)) / len(fns) for name, (fns, _) in impls.items()}
        for name, (_, nbytes) in impls.items():
            us = times[name]
            rows.append(
                dict(
                    K=k,
                    N=n,
                    M=m,
                    impl=name,
                    us=round(us, 2),
                    speedup_vs_fp16=round(times["fp16 cuBLAS"] / us, 3),
                    speedup_vs_bf16=round(times["bf16 cuBLAS"] / us, 3),
                    GBps=round(nbytes / us / 1e3, 1),
                    roofline_pct=round(100 * nbytes / us / 1e3 / bw, 1),
                )
            )
    return rows


# ---------------------------------------------------------------- end to end


def quantize_model(model: nn.Module, bits: int = 4) -> nn.Module:
    """Swap decoder Linear layers for RTN-quantized QuantLinears (lm_head stays tied to embeddings)."""
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                codes, scales, zeros, g_idx = rtn_quantize_weight(
                    child.weight.data.float().cpu(), bits, GROUP_SIZE, False
                )
                layer = QuantLinear.from_codes(codes, scales, zeros, g_idx, bits, GROUP_SIZE)
                setattr(parent, name, layer.to(child.weight.device))
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

    timed(2)  # warm-up: autotune, compile, allocator
    decode = max(timed(new_tokens) - timed(1), 1e-9)
    return batch * (new_tokens - 1) / decode


def bench_e2e(device: str, dry: bool) -> list[dict]:
    """SmolLM2-135M-shaped Llama (random weights): fp16 vs GPTQ-4bit through the kernel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmcompress.memory_model import PUBLISHED_CONFIGS

    dtype = torch.float32 if dry else torch.float16
    config = LlamaConfig(**(TINY if dry else {**PUBLISHED_CONFIGS["smollm2-135m"], "head_dim": 64}))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    new_tokens, rows = (3 if dry else 128), []
    with torch.no_grad():
        for batch in (1,) if dry else (1, 8):
            rows.append(
                dict(
                    model="fp16" if not dry else "fp32",
                    batch=batch,
                    tokens_per_s=round(decode_tokens_per_s(model, batch, new_tokens, device), 1),
                )
            )
        backends = dispatch.set_backends(quantize_model(model))
        for batch in (1,) if dry else (1, 8):
            rows.append(
                dict(
                    model=f"gptq-4bit g{GROUP_SIZE}",
                    batch=batch,
                    backends=backends,
                    tokens_per_s=round(decode_tokens_per_s(model, batch, new_tokens, device), 1),
                )
            )
    return rows


# ---------------------------------------------------------------- compile check


def compile_check(arch: int, smem_limit: int) -> int:
    """Compile every autotune config ahead of time; list shared memory; exit 1 if one cannot fit."""
    from slmcompress.kernels import int4_matmul as km

    over = 0
    for bits in km.KERNEL_BITS:
        for bucket in ("gemv", "tiny", "small", "medium", "large"):
            for cfg in km.bucket_configs(bucket, bits):
                for g_mode, gs in ((km.G_UNIFORM, 128), (km.G_GATHER, 1)):
                    smem = km.compile_for(arch, bits, g_mode, gs, cfg, "bf16").metadata.shared
                    over += smem > smem_limit
                    flag = "  OVER" if smem > smem_limit else ""
                    print(
                        f"int{bits} {bucket:6} g_mode={g_mode} {cfg}: {smem / 1024:.1f} KiB{flag}",
                        flush=True,
                    )
    print(f"{over} config(s) over {smem_limit / 1024:.0f} KiB (autotune skips them on that GPU)")
    return 1 if over else 0


# ---------------------------------------------------------------- report


def gpu_name(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu-interpreter"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def render_md(report: dict) -> str:
    lines = [
        f"# Int4 dequant-matmul benchmark: {report['device']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}; group size {GROUP_SIZE}; "
        f"copy bandwidth (roofline) {report['copy_GBps']:.0f} GB/s; times are cold-L2 (rotated weights).",
        "",
        "| K | N | M | impl | µs | vs fp16 | vs bf16 | GB/s | % roofline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['K']} | {r['N']} | {r['M']} | {r['impl']} | {r['us']} | {r['speedup_vs_fp16']}x | "
        f"{r['speedup_vs_bf16']}x | {r['GBps']} | {r['roofline_pct']} |"
        for r in report["rows"]
    ]
    lines += [
        "",
        "## End-to-end greedy decode",
        "",
        "| model | batch | tokens/s |",
        "|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['batch']} | {r['tokens_per_s']} |" for r in report["e2e"]]
    if report["notes"]:
        lines += ["", "Notes:", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on CPU under the Triton interpreter"
    )
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument(
        "--compile-check", type=int, metavar="ARCH", help="e.g. 90 (H100) or 80 (A100)"
    )
    parser.add_argument("--smem-limit", type=int, default=227 * 1024)
    args = parser.parse_args(argv)
    if args.compile_check:
        return compile_check(args.compile_check, args.smem_limit)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU: use --dry-run (CPU interpreter) or --compile-check")
    import triton

    out_dir = args.out_dir or (
        Path(tempfile.mkdtemp(prefix="kernel-bench-"))
        if args.dry_run
        else Path(__file__).parent / "results"
    )
    timer, notes = make_timer(device), []
    bw = copy_bandwidth(timer, device)
    rows = []
    for k, n in DRY_SHAPES if args.dry_run else SHAPES:
        rows += bench_shape(
            k, n, DRY_MS if args.dry_run else MS, timer, device, args.dry_run, bw, notes
        )
        print(f"K={k} N={n} done", flush=True)
    if args.dry_run:
        notes.append(
            "dry run: CPU interpreter timings are meaningless; this only proves the script runs"
        )
    report = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
        torch=torch.__version__,
        triton=triton.__version__,
        copy_GBps=round(bw, 1),
        rows=rows,
        e2e=[] if args.skip_e2e else bench_e2e(device, args.dry_run),
        notes=notes,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"kernel-{gpu_name(device)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(render_md(report))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
