"""Round-to-nearest weight quantization: the baseline every smarter quantizer must beat.

Writes the same packed GPTQ v1 checkpoint as the GPTQ pass, so RTN and GPTQ results load
and serve through the same code and differ only in the chosen integer codes.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from transformers import PreTrainedModel

from slmcompress.passes.base import Context, Pass, PassConfig
from slmcompress.progress import progress_bar
from slmcompress.quant.clip_search import ClipSearchOptions
from slmcompress.quant.gptq_format import QuantizedWeight
from slmcompress.quant.install import (
    check_group_size,
    ensure_not_quantized,
    gptq_quantization_config,
    install_quant_linear,
    quantizable_linears,
    resolve_group_size,
)
from slmcompress.quant.qparams import rtn_quantize_weight
from slmcompress.registry import register_pass


class RTNConfig(ClipSearchOptions, PassConfig):
    """``type: quantize, method: rtn`` (``group_size: auto``: see :func:`auto_group_size`)."""

    method: Literal["rtn"] = "rtn"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int | Literal["auto"] = "auto"
    sym: bool = False
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    _check_group = field_validator("group_size", mode="before")(
        classmethod(lambda cls, v: check_group_size(v))
    )


@register_pass("quantize", "rtn")
class RTNPass(Pass):
    """Quantize every eligible Linear independently with round-to-nearest codes."""

    Config = RTNConfig

    @torch.no_grad()
    def run(self, model: PreTrainedModel, ctx: Context) -> PreTrainedModel:
        ensure_not_quantized(model)
        choice = resolve_group_size(self.config, model)
        ctx.record(choice.warnings, group_size=choice.report)
        cfg: RTNConfig = choice.config
        targets, skipped = quantizable_linears(model, cfg.ignore, cfg.bits)
        for message in skipped:
            ctx.warn(message)
        with progress_bar(f"rtn w{cfg.bits}", total=len(targets)) as advance:
            for name, linear in targets.items():
                codes, scales, zeros, g_idx = rtn_quantize_weight(
                    linear.weight.detach(),  # on the model's device: CUDA rounds it there
                    cfg.bits,
                    cfg.group_size,
                    cfg.sym,
                    clip_ratios=cfg.clip_ratios(),
                    clip_norm=cfg.clip_norm,
                )
                weight = QuantizedWeight(codes, scales, zeros, g_idx, cfg.bits, cfg.group_size)
                install_quant_linear(model, name, weight)
                advance(info=name)
        model.config.quantization_config = gptq_quantization_config(
            cfg.bits, cfg.group_size, cfg.sym, desc_act=False, damp_percent=0.01, method="rtn"
        )
        ctx.extra_metrics["quantized_linears"] = len(targets)
        return model
