"""Greedy generation of a tiny RTN-quantized Llama through the torch path, then the kernel.

Run under ``TRITON_INTERPRET=1`` (see ``_interp.py``); prints one JSON object.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from slmcompress.kernels import dispatch, serving
from slmcompress.quant.qparams import rtn_quantize_weight
from slmcompress.quant.quant_linear import QuantLinear


def quantize_linears(model: nn.Module, bits: int, group_size: int) -> None:
    """Swap every nn.Linear for a QuantLinear holding its RTN codes."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                codes, scales, zeros, g_idx = rtn_quantize_weight(
                    child.weight.data, bits, group_size, sym=False
                )
                setattr(
                    parent,
                    name,
                    QuantLinear.from_codes(codes, scales, zeros, g_idx, bits, group_size),
                )


def kernel_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear.forward with its CUDA-only kernel branch taken on CPU (interpreter)."""
    out = (
        dispatch.quant_matmul(x, self)
        if self.backend != "torch"
        else F.linear(x, self.dequantize(x.dtype))
    )
    return out if self.bias is None else out + self.bias.to(out.dtype)


GREEDY = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)


def main(bits: int, group_size: int) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    model = LlamaForCausalLM(config).eval()
    quantize_linears(model, bits, group_size)
    prompt = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        ref = model.generate(prompt, **GREEDY)
        counts = dispatch.set_backends(model, force=True)
        QuantLinear.forward = kernel_forward
        out = model.generate(prompt, **GREEDY)
    logit_diff = max(
        float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits, strict=True)
    )
    print(
        json.dumps(
            {
                "backends": counts,
                "torch_tokens": ref.sequences[0].tolist(),
                "kernel_tokens": out.sequences[0].tolist(),
                "max_logit_diff": logit_diff,
                "routes": sorted({label.split("[")[0] for label in serving.served}),
            }
        )
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
