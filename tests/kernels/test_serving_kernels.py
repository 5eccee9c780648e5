"""Serving kernels (gemv, mm, dequant routes) vs the plain-torch references, under the interpreter.

All cases run in one interpreted subprocess (``TRITON_INTERPRET=1`` must precede the Triton
import); each case is its own test and checks two references: the serving-layout one (same
fp16 scales and zero points, tight) and the GPTQ one (:mod:`slmcompress.kernels.reference`,
which never sees the repack). The inline-PTX conversion (``convert=2`` of ``mm``) cannot run
in the interpreter: it is compiled for sm_90 below, and the tuner checks its numbers on a GPU
before it may be picked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from _interp import REPO, run_interpreted
from _serving_cases import case_id

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def gemv(bm, bn, kb, steps, convert, acc32=1):
    return dict(block_m=bm, block_n=bn, block_kb=kb, steps=steps, num_warps=1, num_stages=1,
                convert=convert, acc32=acc32)  # fmt: skip


def mm(bm, bn, bk, split, unpack, convert, swap):
    return dict(block_m=bm, block_n=bn, block_k=bk, split_k=split, group_m=8, num_warps=4,
                num_stages=2, unpack=unpack, convert=convert, swap_ab=swap)  # fmt: skip


def dq(bn, kb, convert):
    return dict(block_n=bn, block_kb=kb, num_warps=4, num_stages=1, convert=convert)


def case(route, params, bits, m, k, n, group_size, dtype, act_order=False):
    return dict(route=route, params=params, bits=bits, m=m, k=k, n=n, group_size=group_size,
                dtype=dtype, act_order=act_order)  # fmt: skip


CASES = [
    # gemv: every conversion, ragged last group (576 = 4.5 x 128), N tail, programs past K
    case("gemv", gemv(1, 64, 2, 2, 3), 4, 1, 576, 96, 128, "fp16"),
    case("gemv", gemv(1, 64, 2, 8, 2), 4, 1, 576, 96, 128, "fp32"),
    case("gemv", gemv(1, 32, 1, 4, 1), 4, 1, 256, 64, 64, "bf16", act_order=True),
    case("gemv", gemv(1, 32, 1, 2, 0, 0), 4, 1, 256, 64, -1, "fp16"),  # fp16 atomics
    case("gemv", gemv(2, 32, 2, 1, 3), 4, 3, 256, 64, 32, "fp32"),  # M tiles, group 32
    case("gemv", gemv(4, 32, 1, 16, 3), 4, 4, 256, 64, 32, "fp16", act_order=True),  # 4 groups
    case("gemv", gemv(1, 64, 1, 2, 3), 3, 1, 576, 96, 128, "fp16"),
    case("gemv", gemv(1, 32, 1, 4, 2), 3, 1, 256, 64, 64, "fp32", act_order=True),
    case("gemv", gemv(2, 32, 1, 1, 1), 3, 3, 256, 64, -1, "bf16"),
    case("gemv", gemv(1, 32, 1, 8, 0), 3, 1, 256, 64, 32, "fp32"),
    # mm: both unpackings and conversions, split-K, swapped operands, M/N/K tails
    case("mm", mm(16, 32, 64, 1, 1, 1, 0), 4, 5, 576, 96, 128, "fp16"),
    case("mm", mm(16, 32, 64, 3, 1, 0, 1), 4, 20, 256, 64, 64, "fp32", act_order=True),
    case("mm", mm(32, 64, 32, 2, 0, 1, 0), 4, 33, 256, 96, 32, "bf16"),
    case("mm", mm(16, 32, 64, 2, 0, 0, 1), 4, 16, 256, 64, -1, "fp16"),
    case("mm", mm(16, 32, 32, 1, 0, 1, 1), 3, 7, 576, 96, 128, "fp32"),
    case("mm", mm(32, 32, 64, 4, 0, 0, 0), 3, 40, 256, 64, 64, "fp16", act_order=True),
    # dequant + matmul (large M)
    case("dequant", dq(64, 8, 1), 4, 40, 576, 96, 128, "fp16"),
    case("dequant", dq(32, 4, 0), 4, 9, 256, 64, 32, "fp32", act_order=True),
    case("dequant", dq(64, 2, 1), 3, 9, 576, 96, 128, "bf16"),
    case("dequant", dq(32, 1, 0), 3, 9, 256, 64, -1, "fp32"),
]
SERVING_TOL = {"fp32": 1e-5, "fp16": 3e-3, "bf16": 2e-2}  # relative to max |reference|
GPTQ_TOL = {"fp32": 1e-5, "fp16": 3e-3, "bf16": 2e-2}


@pytest.fixture(scope="module")
def errors() -> dict:
    return run_interpreted(["tests/kernels/_serving_cases.py", json.dumps(CASES)])


@pytest.mark.parametrize("spec", CASES, ids=case_id)
def test_route_matches_references(errors, spec):
    got = errors[case_id(spec)]
    assert got["serving"] <= SERVING_TOL[spec["dtype"]], got
    assert got["gptq"] <= GPTQ_TOL[spec["dtype"]], got


def test_routes_resolve_from_configs_force_and_fall_back(tmp_path):
    """Shipped/override config hit, heuristic miss (no tuning off the GPU), a forced choice,
    and a layer with irregular groups on the generic kernel; every call counted by route."""
    result = run_interpreted(["tests/kernels/_serving_dispatch.py", str(tmp_path / "cfg.json")])
    calls = result["calls"]
    assert result["backend"] == "triton-int4"
    assert calls["m1"]["source"] == "heuristic" and calls["m1"]["label"].startswith("gemv[")
    assert calls["m12"]["source"] == "override" and calls["m12"]["label"].startswith("mm[m16 n32")
    assert calls["forced"]["source"] == "forced" and calls["forced"]["label"].startswith("dequant")
    assert all(c["err"] < 1e-5 for c in calls.values()), calls
    choice, reason = result["generic"]["route"]
    assert choice is None and "differ from the declared group_size 16" in reason
    assert result["generic"]["err"] < 1e-5
    assert sum(result["served"].values()) == 3


COMPILE = """
import json, sys
from slmcompress.kernels import triton_qmm as Q
from slmcompress.kernels.routes import Choice
out = {}
for route, params, bits, group, perm, dtype in json.loads(sys.argv[1]):
    k = Q.compile_choice(route, params, bits, group, perm, dtype)
    out[f"{route}-{bits}-{dtype}-{params.get('convert')}"] = [k.metadata.shared, "wgmma" in k.asm["ptx"]]
print(json.dumps(out))
"""
AOT = [
    ("mm", mm(16, 128, 64, 2, 1, 2, 1) | dict(num_warps=4), 4, 128, False, "fp16"),
    ("mm", mm(16, 128, 64, 2, 1, 2, 1), 4, 128, True, "bf16"),
    ("gemv", gemv(1, 512, 1, 4, 3) | dict(num_warps=2), 3, 128, True, "fp16"),
    ("dequant", dq(256, 8, 1), 4, 128, False, "bf16"),
]


def test_inline_ptx_and_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compile (PTX + cubin): the lop3/0x6400 and 0x4300 PTX assembles, and
    swapped small-M tiles reach Hopper's wgmma."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend here")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(AOT)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out) == len(AOT) and all(0 <= smem <= 227 * 1024 for smem, _ in out.values())
    assert out["mm-4-fp16-2"][1] and out["mm-4-bf16-2"][1]  # wgmma with the weight as A


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("m", [1, 4, 16, 256, 1024])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_every_candidate_on_gpu(bits, m, dtype):
    """On a GPU: the candidates with GPU-only numerics (inline PTX, denormal conversion,
    tinygemm), the heuristic and a spread of the rest, vs the reference."""
    import torch
    from random_models import random_quant_linear

    from slmcompress.kernels.execute import execute
    from slmcompress.kernels.reference import quant_matmul_reference
    from slmcompress.kernels.repack import repack
    from slmcompress.kernels.routes import Key, candidates, m_bucket

    layer = random_quant_linear(1024, 768, bits, 128, act_order=True).cuda()
    w = repack(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, 128)
    x = torch.randn(m, 1024, device="cuda").to(
        {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    )
    ref = quant_matmul_reference(x, layer).float()
    bad = {}
    pool = candidates(Key(bits, 128, 768, 1024, m_bucket(m)), dtype)
    special = [c for c in pool if c.route == "tinygemm" or c.p.get("convert", 0) >= 2]
    for choice in dict.fromkeys([pool[0], *special[:6], *pool[1 :: max(1, len(pool) // 6)]]):
        out = execute(choice, x, w).float()
        err = float((out - ref).abs().max() / ref.abs().max())
        if not err < (2e-2 if dtype == "bf16" or choice.route == "tinygemm" else 5e-3):
            bad[choice.label()] = err
    assert not bad, bad
