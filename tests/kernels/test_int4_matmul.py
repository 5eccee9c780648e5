"""Triton int4/int3 dequant-matmul vs the plain-torch reference (CPU, Triton interpreter).

All interpreter cases run in one subprocess (``TRITON_INTERPRET=1`` must precede the Triton
import); each case is still its own test. Configs are explicit because ``@triton.autotune``
cannot run in the interpreter; they cover both code paths (FMA tiles for ``block_m < 16``,
``tl.dot`` tiles above), split-K, ragged tails in K and N, and every group layout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from _interp import REPO, run_interpreted
from _kernel_cases import case_id

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def case(bits, m, k, n, group_size, dtype, config=None, act_order=False, kind="mm"):
    return dict(
        bits=bits,
        m=m,
        k=k,
        n=n,
        group_size=group_size,
        dtype=dtype,
        config=config,
        act_order=act_order,
        kind=kind,
    )


CASES = [
    # 4-bit. config = (block_m, block_n, block_k, split_k)
    case(4, 1, 1024, 256, 128, "fp16", (1, 256, 128, 1)),  # decode GEMV, tile-uniform groups
    case(4, 1, 512, 512, -1, "fp32", (1, 256, 128, 4)),  # per-channel, split-K atomics
    case(4, 1, 256, 128, 64, "fp16", (1, 128, 64, 1), act_order=True),  # g_idx gather
    case(4, 1, 200, 128, 32, "fp32", (1, 128, 64, 1)),  # K tail (200 = 3.1 tiles), gs < block_k
    case(4, 3, 384, 256, 32, "fp32", (4, 256, 128, 1)),  # small-M FMA tile
    case(4, 3, 256, 320, 128, "fp16", (16, 128, 64, 2), act_order=True),  # dot + split-K, N tail
    case(4, 16, 1024, 128, 64, "bf16", (16, 64, 128, 1)),  # bf16, gs < block_k: per-row groups
    case(4, 16, 576, 256, 128, "fp16", (16, 64, 64, 1)),  # ragged last group (576 = 4.5 x 128)
    case(4, 64, 128, 1024, 32, "fp32", (64, 128, 64, 1)),
    case(4, 64, 512, 256, 128, "fp16", act_order=True),  # default config
    case(4, 5, 200, 128, -1, "fp32", (16, 64, 64, 1)),  # M and K tails on the dot path
    case(4, 16, 200, 64, 32, "fp32", (16, 64, 64, 1)),  # K tail with per-row groups (dot path)
    # 3-bit (AutoGPTQ bit stream: 32 values in 3 words)
    case(3, 1, 512, 256, 128, "fp16", (1, 256, 256, 1)),
    case(3, 1, 1024, 128, 64, "fp32", (1, 128, 512, 2), act_order=True),
    case(3, 3, 384, 160, 32, "fp16", (4, 256, 128, 1)),  # N tail (160 of 256)
    case(3, 16, 256, 256, -1, "fp32", (16, 64, 64, 1)),
    case(3, 64, 640, 96, 128, "fp16", (64, 64, 32, 1), act_order=True),
    case(3, 3, 96, 64, 32, "bf16", (16, 32, 32, 1)),
    # dequantize kernel and the large-M (dequantize + torch matmul) route
    case(4, 1, 256, 128, 64, "fp32", act_order=True, kind="dequant"),
    case(3, 1, 256, 96, 32, "fp32", kind="dequant"),
    case(4, 20, 256, 128, 128, "fp32", kind="dense"),
]
TOLERANCE = {"fp32": 1e-5, "fp16": 3e-3, "bf16": 2e-2}  # relative to max |reference|


@pytest.fixture(scope="module")
def errors() -> dict:
    return run_interpreted(["tests/kernels/_kernel_cases.py", json.dumps(CASES)])


@pytest.mark.parametrize("spec", CASES, ids=case_id)
def test_kernel_matches_reference(errors, spec):
    assert errors[case_id(spec)] <= TOLERANCE[spec["dtype"]]


# ---- shape and config errors (pure Python checks; Triton imported, nothing launched)


def _packed(k, n, bits, groups=1):
    from slmcompress.kernels.int4_matmul import G_UNIFORM, SINGLE_GROUP, PackedWeight

    words = k * bits // 32
    return PackedWeight(
        torch.zeros(words, n, dtype=torch.int32),
        torch.zeros(groups, n * bits // 32, dtype=torch.int32),
        torch.ones(groups, n, dtype=torch.float16),
        torch.zeros(k, dtype=torch.int32),
        bits,
        k,
        n,
        G_UNIFORM,
        SINGLE_GROUP,
    )


@pytest.mark.parametrize(
    ("k", "n", "bits", "x_shape", "message"),
    [
        (128, 64, 4, (2, 96), "x must be"),
        (100, 64, 4, (2, 100), "in_features=100 is not a multiple of 8"),
        (128, 60, 4, (2, 128), "out_features=60"),
        (48, 64, 3, (2, 48), "in_features=48 is not a multiple of 32"),
        (128, 48, 3, (2, 128), "out_features=48"),
        (128, 64, 2, (2, 128), "no Triton kernel for 2-bit"),
    ],
)
def test_bad_shapes_raise_clear_errors(k, n, bits, x_shape, message):
    from slmcompress.kernels.int4_matmul import fused_matmul

    with pytest.raises(ValueError, match=message):
        fused_matmul(torch.zeros(x_shape), _packed(k, n, bits))


def test_bad_dtype_and_packed_shapes_raise():
    from slmcompress.kernels.int4_matmul import PackedWeight, validate

    w = _packed(128, 64, 4)
    with pytest.raises(ValueError, match="dtype"):
        validate(torch.zeros(2, 128, dtype=torch.int32), w)
    bad = PackedWeight(
        w.qweight[:8],
        *[
            getattr(w, f)
            for f in (
                "qzeros",
                "scales",
                "g_idx",
                "bits",
                "in_features",
                "out_features",
                "g_mode",
                "group_size",
            )
        ],
    )
    with pytest.raises(ValueError, match="qweight has shape"):
        validate(torch.zeros(2, 128), bad)


@pytest.mark.parametrize(
    ("config", "bits", "message"),
    [
        ((16, 64, 8, 1), 4, "needs block_k >= 16"),
        ((1, 64, 8, 1), 4, "at least|>= 2 packed blocks"),
        ((1, 64, 32, 1), 3, ">= 2 packed blocks of 32"),
        ((1, 96, 64, 1), 4, "block_n=96 must be a power of two"),
        ((4, 64, 64, 3), 4, "split_k=3"),
    ],
)
def test_bad_configs_raise(config, bits, message):
    from slmcompress.kernels.int4_matmul import KernelConfig, check_config

    with pytest.raises(ValueError, match=message):
        check_config(KernelConfig(*config), bits)


def test_autotune_buckets_hold_valid_configs():
    from slmcompress.kernels.int4_matmul import bucket_configs, check_config, m_bucket

    assert [m_bucket(m) for m in (1, 3, 16, 64, 256)] == [
        "gemv",
        "tiny",
        "small",
        "medium",
        "large",
    ]
    for bits in (3, 4):
        for bucket in ("gemv", "tiny", "small", "medium", "large"):
            for cfg in bucket_configs(bucket, bits):
                check_config(cfg, bits)


COMPILE_CHECK = """
import json, sys
from slmcompress.kernels import int4_matmul as km
out = {}
for bits, g_mode, gs, cfg, dtype in [(4, km.G_UNIFORM, 128, km.KernelConfig(1, 128, 64, 4), "fp16"),
                                     (3, km.G_GATHER, 1, km.KernelConfig(16, 64, 64, 1, 4, 3), "bf16")]:
    out[f"{bits}-{cfg.block_m}"] = km.compile_for(90, bits, g_mode, gs, cfg, dtype).metadata.shared
print(json.dumps(out))
"""


def test_kernel_compiles_for_sm90_without_a_gpu():
    """Ahead-of-time compile (PTX + cubin) of an FMA and a tl.dot variant: catches code that
    the interpreter accepts but the compiler rejects, on machines without a GPU."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend here")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_CHECK],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(0 <= b <= 227 * 1024 for b in shared.values()), shared


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("m", [1, 3, 16, 64, 256, 2048])
@pytest.mark.parametrize("act_order", [False, True])
def test_autotuned_kernel_on_gpu(bits, m, act_order):
    from random_models import random_quant_linear

    from slmcompress.kernels import int4_matmul as km
    from slmcompress.kernels.dispatch import packed_weight
    from slmcompress.kernels.reference import quant_matmul_reference

    layer = random_quant_linear(1024, 768, bits, 128, act_order).cuda()
    x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
    out = km.quant_matmul(x, packed_weight(layer))
    ref = quant_matmul_reference(x, layer)
    assert float((out.float() - ref.float()).abs().max() / ref.float().abs().max()) < 5e-3
