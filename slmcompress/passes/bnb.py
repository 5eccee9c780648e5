"""bitsandbytes baselines: ``type: quantize, method: bnb-nf4`` and ``method: bnb-int8``.

Data-free, round-to-nearest style quantization (NF4 blocks of 64 / LLM.int8() rows) done
by transformers' own bitsandbytes integration, so the stage checkpoint is the standard
Hugging Face bnb format (config.json ``quantization_config.quant_method: bitsandbytes``)
that ``from_pretrained`` reloads without extra code. bitsandbytes >= 0.45 runs both
layer types on CPU; int8 casts activations to fp16 inside its matmul (it logs that).
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import Literal

import torch
from pydantic import Field
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from slmcompress.errors import PassError
from slmcompress.passes.base import Context, Pass, PassConfig
from slmcompress.quant.install import ensure_not_quantized
from slmcompress.registry import register_pass


class BnbNF4Config(PassConfig):
    """``type: quantize, method: bnb-nf4`` (4-bit NormalFloat, blocks of 64 weights)."""

    method: Literal["bnb-nf4"] = "bnb-nf4"
    double_quant: bool = False
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])


class BnbInt8Config(PassConfig):
    """``type: quantize, method: bnb-int8`` (LLM.int8(): per-row absmax int8, fp16 outliers)."""

    method: Literal["bnb-int8"] = "bnb-int8"
    threshold: float = Field(6.0, ge=0)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])


def _bnb_config(cfg: BnbNF4Config | BnbInt8Config) -> BitsAndBytesConfig:
    """The transformers quantization config for a stage config."""
    if isinstance(cfg, BnbNF4Config):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
            llm_int8_skip_modules=cfg.ignore,
        )
    return BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_threshold=cfg.threshold, llm_int8_skip_modules=cfg.ignore
    )


def quantize_with_bnb(
    model: PreTrainedModel, cfg: BnbNF4Config | BnbInt8Config, ctx: Context
) -> PreTrainedModel:
    """Round-trip the float model through a scratch directory, loading it back bnb-quantized.

    Going through ``from_pretrained`` (rather than swapping modules by hand) is what makes
    the result save and reload as a regular HF bnb checkpoint.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PassError(f"method: {cfg.method} needs bitsandbytes (pip install 'slmcompress[bnb]')")
    ensure_not_quantized(model)
    scratch = ctx.work_dir / f"{cfg.method}-float"
    model.save_pretrained(scratch, safe_serialization=True)
    device = ctx.device if ctx.device.type in ("cpu", "cuda") else torch.device("cpu")
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            scratch,
            quantization_config=_bnb_config(cfg),
            device_map={"": str(device)},
            dtype=model.dtype,
            trust_remote_code=False,  # our own float copy: no code to run
        )
    except Exception as exc:  # noqa: BLE001 - bnb backends fail in many ways; report one line
        raise PassError(
            f"method: {cfg.method} failed on {device}: {str(exc).splitlines()[0]}"
        ) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    n = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in quantized.modules())
    ctx.extra_metrics["quantized_linears"] = n
    return quantized.eval()


@register_pass("quantize", "bnb-nf4")
class BnbNF4Pass(Pass):
    """bitsandbytes NF4 weights (data-free baseline)."""

    Config = BnbNF4Config

    @torch.no_grad()
    def run(self, model: PreTrainedModel, ctx: Context) -> PreTrainedModel:
        return quantize_with_bnb(model, self.config, ctx)


@register_pass("quantize", "bnb-int8")
class BnbInt8Pass(Pass):
    """bitsandbytes LLM.int8() weights (data-free baseline)."""

    Config = BnbInt8Config

    @torch.no_grad()
    def run(self, model: PreTrainedModel, ctx: Context) -> PreTrainedModel:
        return quantize_with_bnb(model, self.config, ctx)
