"""Module transforms shared by weight-quantization passes (RTN, GPTQ).

The tensor math lives in ``qparams``/``gptq_solver``; this file only decides *which*
Linear layers are quantized and swaps them for :class:`QuantLinear`.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from slmcompress.checkpoint import replace_module
from slmcompress.errors import PassError
from slmcompress.quant.packing import pack_multiple
from slmcompress.quant.quant_linear import QuantLinear


def gptq_quantization_config(
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    damp_percent: float = 0.01,
    method: str = "gptq",
    true_sequential: bool = True,
    static_groups: bool = False,
) -> dict[str, Any]:
    """The ``quantization_config`` (and ``quantize_config.json``) of a v1 GPTQ checkpoint."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": damp_percent,
        "true_sequential": true_sequential,
        "static_groups": static_groups,
        "checkpoint_format": "gptq",
        "meta": {"quantizer": ["slmcompress"], "method": method},
    }


def is_ignored(name: str, ignore: list[str]) -> bool:
    """``ignore`` entries match a module name exactly, by suffix, or as a glob pattern."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatch(name, p) for p in ignore)


def quantizable_linears(
    model: PreTrainedModel, ignore: list[str], bits: int
) -> tuple[dict[str, nn.Linear], list[str]]:
    """Linear layers to quantize, and one warning per layer skipped for a reason other than ``ignore``.

    Tied output heads are never quantized: they are the embedding matrix.
    """
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    chosen: dict[str, nn.Linear] = {}
    skipped: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or is_ignored(name, ignore):
            continue
        if name == "lm_head" and tied:
            skipped.append("lm_head: tied to the input embeddings; kept in float")
            continue
        multiple = pack_multiple(bits)
        if module.in_features % multiple or module.out_features % multiple:
            skipped.append(
                f"{name}: {module.in_features}x{module.out_features} cannot be packed at {bits} bits "
                f"(dims must be multiples of {multiple}); kept in float"
            )
            continue
        chosen[name] = module
    return chosen, skipped


def install_quant_linear(
    model: nn.Module,
    name: str,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int,
) -> QuantLinear:
    """Replace ``model.<name>`` (an nn.Linear) with the packed QuantLinear of these codes."""
    linear = model.get_submodule(name)
    bias = linear.bias.detach() if linear.bias is not None else None
    layer = QuantLinear.from_codes(
        codes.cpu(), scales.cpu(), zeros.cpu(), g_idx.cpu(), bits, group_size, bias
    )
    replace_module(model, name, layer.to(linear.weight.device))
    return layer


def ensure_not_quantized(model: nn.Module) -> None:
    """Quantizing packed weights again would silently do nothing: refuse instead."""
    if quantized_layer_count(model) or getattr(model.config, "quantization_config", None):
        raise PassError(
            "model: is already quantized; quantize a float model (put quantize stages last)"
        )


def quantized_layer_count(model: nn.Module) -> int:
    """Number of QuantLinear modules in a model."""
    return sum(isinstance(m, QuantLinear) for m in model.modules())
