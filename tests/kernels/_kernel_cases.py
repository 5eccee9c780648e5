"""Kernel-vs-reference cases, run as a script under ``TRITON_INTERPRET=1`` (see ``_interp.py``).

``python tests/kernels/_kernel_cases.py '<json list of cases>'`` prints one JSON object:
case id -> relative max error of the Triton result against the float32 torch reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def case_id(case: dict) -> str:
    """Readable id: ``b4-m3-k384-n256-g32-ao-fp16-4x64x32s1`` (config part ``auto`` if none)."""
    cfg = (
        "x".join(map(str, case["config"][:3])) + f"s{case['config'][3]}"
        if case.get("config")
        else "auto"
    )
    ao = "-ao" if case.get("act_order") else ""
    return (
        f"{case.get('kind', 'mm')}-b{case['bits']}-m{case['m']}-k{case['k']}-n{case['n']}"
        f"-g{case['group_size']}{ao}-{case['dtype']}-{cfg}"
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def run_case(case: dict) -> float:
    """Relative max error of the kernel (or dequant / dense path) for one case."""
    from slmcompress.kernels import int4_matmul as km  # imports Triton: interpreter already on
    from slmcompress.kernels.dispatch import packed_weight

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: random_models
    from random_models import random_quant_linear

    from slmcompress.kernels.reference import dequantize_reference, quant_matmul_reference

    layer = random_quant_linear(
        case["k"],
        case["n"],
        case["bits"],
        case["group_size"],
        case.get("act_order", False),
        seed=case.get("seed", 0),
    )
    w = packed_weight(layer)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(case["m"], case["k"], generator=gen).to(DTYPES[case["dtype"]])  # (M, K)
    kind = case.get("kind", "mm")
    if kind == "dequant":
        ref = dequantize_reference(
            layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits
        )
        return relative_error(km.dequantize(w, torch.float32), ref)
    if kind == "dense":  # large-M route: dequantize once, then torch matmul
        return relative_error(
            km.quant_matmul(x, w, dense_min_m=case["m"] - 1), quant_matmul_reference(x, layer)
        )
    config = km.KernelConfig(*case["config"]) if case.get("config") else None
    return relative_error(km.fused_matmul(x, w, config), quant_matmul_reference(x, layer))


def main() -> None:
    cases = json.loads(sys.argv[1])
    print(json.dumps({case_id(case): run_case(case) for case in cases}))


if __name__ == "__main__":
    main()
