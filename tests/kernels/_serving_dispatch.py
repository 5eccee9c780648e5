"""Route resolution through :mod:`slmcompress.kernels.serving`, under ``TRITON_INTERPRET=1``.

``python tests/kernels/_serving_dispatch.py CONFIG_PATH`` writes a config file (the format
the sweep ships) to ``CONFIG_PATH``, points ``SLMCOMPRESS_KERNEL_CONFIGS`` at it, serves a
few calls and prints one JSON object: which choice and source served each call, the routes
counted, and each output's error against the GPTQ reference.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: random_models
from random_models import random_quant_linear  # noqa: E402

from slmcompress.kernels import config_store, dispatch, serving  # noqa: E402
from slmcompress.kernels.reference import quant_matmul_reference  # noqa: E402
from slmcompress.kernels.routes import Choice, Key  # noqa: E402

MM = Choice.make(
    "mm", block_m=16, block_n=32, block_k=64, split_k=2, group_m=8, num_warps=4, num_stages=2,
    unpack=0, convert=0, swap_ab=1,
)  # fmt: skip
DEQUANT = Choice.make("dequant", block_n=64, block_kb=4, num_warps=4, num_stages=1, convert=1)


def err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def main(config_path: str) -> None:
    layer = random_quant_linear(256, 64, 4, 64, act_order=True, seed=7)
    key16 = Key(4, 64, 64, 256, 16)
    Path(config_path).write_text(
        json.dumps(config_store.document("cpu-interpreter", {key16: MM.to_json()}))
    )
    os.environ[config_store.OVERRIDE_ENV] = config_path
    dispatch.set_backends(layer, force=True)
    result = {"backend": layer.backend, "calls": {}}
    for name, m, forced in (("m1", 1, None), ("m12", 12, None), ("forced", 3, DEQUANT)):
        x = torch.randn(m, 256)
        with serving.forced_choice(forced):
            choice, source = serving.route_for(layer, m, x.dtype)
            out = dispatch.quant_matmul(x, layer)
        result["calls"][name] = {
            "label": choice.label(), "source": source, "err": err(out, quant_matmul_reference(x, layer)),
        }  # fmt: skip
    odd = random_quant_linear(64, 32, 4, 16, seed=8)
    odd.g_idx.copy_(torch.tensor([0, 0, 0] + [1, 0] * 30 + [1], dtype=torch.int32))  # 33 + 31 rows
    dispatch.set_backends(odd, force=True)
    x = torch.randn(2, 64)
    result["generic"] = {
        "route": serving.route_for(odd, 2, x.dtype),
        "err": err(dispatch.quant_matmul(x, odd), quant_matmul_reference(x, odd)),
    }
    result["served"] = dict(serving.served)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
