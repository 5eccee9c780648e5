"""Serving-kernel cases, run as a script under ``TRITON_INTERPRET=1`` (see ``_interp.py``).

``python tests/kernels/_serving_cases.py '<json list of cases>'`` prints one JSON object:
case id -> ``{"serving": err, "gptq": err}``, the relative max error of the route's output
against the serving-layout reference and against the GPTQ reference
(:func:`slmcompress.kernels.reference.quant_matmul_reference`, independent of the repack).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SHORT = {"block_": "", "num_": "", "split_k": "sk", "convert": "c", "unpack": "u", "swap_ab": "sw"}


def case_id(case: dict) -> str:
    """``gemv-b4-m1-k576-n96-g128-ao-fp16-n32kb1s2...``: route, layer, dtype, parameters."""
    params = "".join(f"{k}{v}" for k, v in case["params"].items() if k not in ("acc32",))
    for long, short in SHORT.items():
        params = params.replace(long, short)
    ao = "-ao" if case.get("act_order") else ""
    return (
        f"{case['route']}-b{case['bits']}-m{case['m']}-k{case['k']}-n{case['n']}"
        f"-g{case['group_size']}{ao}-{case['dtype']}-{params}"
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def run_case(case: dict) -> dict:
    from slmcompress.kernels.execute import execute  # imports Triton: interpreter already on
    from slmcompress.kernels.reference import quant_matmul_reference
    from slmcompress.kernels.repack import repack, serving_matmul_reference
    from slmcompress.kernels.routes import Choice

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: random_models
    from random_models import random_quant_linear

    layer = random_quant_linear(
        case["k"], case["n"], case["bits"], case["group_size"], case.get("act_order", False),
        seed=case.get("seed", 0),
    )  # fmt: skip
    w = repack(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.group_size)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(case["m"], case["k"], generator=gen).to(DTYPES[case["dtype"]])  # (M, K)
    out = execute(Choice.make(case["route"], **case["params"]), x, w)
    assert out.dtype == x.dtype and out.shape == (case["m"], case["n"])
    return {
        "serving": relative_error(out, serving_matmul_reference(x, w)),
        "gptq": relative_error(out, quant_matmul_reference(x, layer)),
    }


def main() -> None:
    cases = json.loads(sys.argv[1])
    print(json.dumps({case_id(case): run_case(case) for case in cases}))


if __name__ == "__main__":
    main()
