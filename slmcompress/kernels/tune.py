"""Time kernel choices on a CUDA GPU: the on-miss tuner and ``benchmarks/kernel_tune.py`` share it.

A choice is timed as it serves: :func:`~slmcompress.kernels.execute.execute` (output
allocation, zeroing for atomics, casts and gathers included), captured in a CUDA graph so
launch gaps do not count, and run over several weight copies so the weights come from HBM
rather than L2 when the copies outgrow it. Before it is timed, its output is checked against
the plain-torch reference; a wrong or failing choice is reported, never picked.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence

import torch

from slmcompress.kernels.execute import TinyGetter, execute
from slmcompress.kernels.repack import ServingWeight, serving_matmul_reference
from slmcompress.kernels.routes import Choice, Key, candidates

log = logging.getLogger(__name__)

#: relative max error (vs max |reference|) a choice may show; tinygemm computes in bf16
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}


def reference_out(x2d: torch.Tensor, w: ServingWeight, chunk: int = 4096) -> torch.Tensor:
    """fp32 ``x2d @ W`` by the torch reference, ``chunk`` output columns at a time (memory)."""
    outs = []
    for a in range(0, w.out_features, chunk):
        b = min(a + chunk, w.out_features)
        part = ServingWeight(
            w.words[:, a:b], w.scales[:, a:b], w.zeros[:, a:b], w.perm, w.bits, w.in_features,
            b - a, w.group,
        )  # fmt: skip
        outs.append(serving_matmul_reference(x2d, part))
    return torch.cat(outs, dim=1)  # (M, N)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.float() - ref).abs().max()
    return float(diff / ref.abs().max().clamp_min(1e-12))


def cuda_time_us(fn: Callable[[], object], reps: int = 10, rounds: int = 3) -> float:
    """Median microseconds of one ``fn()``: CUDA-graph replays timed by events (plain if capture fails)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm: compile, allocator, tinygemm/graph-unsafe first-use work
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception as err:  # noqa: BLE001 - some ops refuse capture: time them plainly
        log.debug("graph capture failed (%s); timing without a graph", err)
        torch.cuda.synchronize()
        run = fn
    run()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times)


def evaluate(
    choices: Sequence[Choice],
    x2d: torch.Tensor,
    weights: Sequence[ServingWeight],
    tinies: Sequence[TinyGetter],
    ref: torch.Tensor,
    timer: Callable[[Callable[[], object]], float] = cuda_time_us,
) -> list[dict]:
    """Check, then time (``timer``: µs of one call), each choice over the weight copies.

    Row: ``choice`` (JSON), ``label``, and ``us`` (per layer call, averaged over the copies)
    or ``error`` (an exception, or an output off the reference by more than the tolerance).
    """
    tol = TOLERANCE[x2d.dtype]
    rows = []
    for choice in choices:
        row: dict = {"choice": choice.to_json(), "label": choice.label()}
        try:
            err = relative_error(execute(choice, x2d, weights[0], tinies[0]), ref)
            row["rel_err"] = err
            if not err <= tol:  # NaN fails too
                row["error"] = f"relative error {err:.2e} > {tol:.0e}"
            else:
                pairs = list(zip(weights, tinies, strict=True))
                fn = lambda c=choice, p=pairs: [execute(c, x2d, w, t) for w, t in p]  # noqa: E731
                row["us"] = timer(fn) / len(pairs)
        except Exception as exc:  # noqa: BLE001 - a config that fails is data, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
    return rows


def best(rows: Sequence[dict]) -> dict | None:
    """The fastest row that ran correctly."""
    timed = [r for r in rows if "us" in r]
    return min(timed, key=lambda r: r["us"]) if timed else None


def tune_on_miss(
    key: Key, w: ServingWeight, x_dtype: torch.dtype, tiny: TinyGetter, sms: int, limit: int = 24
) -> tuple[Choice, dict] | None:
    """Tune ``key`` once on this layer's own weight (one copy, so small layers sit in L2).

    Times the heuristic choice and up to ``limit - 1`` other candidates spread over the list.
    Returns the best ``(choice, row)``, or None when nothing ran.
    """
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    pool = candidates(key, names[x_dtype], compiled=True, sms=sms)
    stride = max(1, len(pool) // max(1, limit - 1))
    picked = [pool[0], *pool[1::stride]][:limit]
    gen = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(key.m, w.in_features, generator=gen, device=w.device).to(x_dtype)
    rows = evaluate(picked, x, [w], [tiny], reference_out(x, w))
    top = best(rows)
    if top is None:
        return None
    return Choice.from_json(top["choice"]), {"us": round(top["us"], 2), "tuned": "on-miss"}
