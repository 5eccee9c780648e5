"""Installing quantized linears: which Linear layers a weight-quantization pass (RTN, GPTQ)
changes, at which group size, the :class:`QuantLinear` put in their place, and the
``quantization_config`` the model then carries.

The tensor math lives in ``qparams``/``gptq_solver``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from slmcompress.arch import replace_module
from slmcompress.errors import PassError
from slmcompress.quant.gptq_format import QuantizedWeight
from slmcompress.quant.packing import pack_multiple
from slmcompress.quant.quant_linear import QuantLinear

#: ``group_size: auto`` candidates, largest first: consumers expect one size per checkpoint
AUTO_GROUP_SIZES = (128, 64, 32)
#: who refuses a group size that does not divide a linear's input width (a ragged last group)
STRICT_CONSUMERS = (
    "transformers' GPTQ loading with gptqmodel 7.6 on CPU (torch int4 kernel; tested: "
    "benchmarks/results/consumers.md) and vLLM's Marlin kernels (per their source)"
)


#: group sizes gptqmodel 7.6's kernels accept (its TorchLinear refuses others at load; tested)
CONSUMER_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)


def auto_group_size(widths: Iterable[int]) -> int:
    """The largest of 128/64/32 dividing every input width (SmolLM2's 576 -> 64).

    Widths none of them divides (not multiples of 32) get 128 and a ragged-group warning.
    """
    widths = list(widths)
    return next(
        (g for g in AUTO_GROUP_SIZES if all(w % g == 0 for w in widths)), AUTO_GROUP_SIZES[0]
    )


def ragged_group_warning(group_size: int, widths: dict[str, int]) -> str | None:
    """A report warning when ``group_size`` leaves a ragged last group in some linear."""
    ragged = {n: w for n, w in widths.items() if group_size > 0 and w % group_size}
    if not ragged:
        return None
    sizes = ", ".join(str(w) for w in sorted(set(ragged.values())))
    example = next(iter(ragged))
    return (
        f"group_size {group_size}: input widths {sizes} (e.g. {example}) are not multiples of it, "
        f"so their last group is ragged. slmcompress loads and serves this checkpoint, but "
        f"{STRICT_CONSUMERS} refuse it; group_size: auto would pick "
        f"{auto_group_size(widths.values())} for this model"
    )


def unsupported_group_warning(group_size: int) -> str | None:
    """A report warning when the consumers refuse ``group_size`` whatever the widths."""
    if group_size in CONSUMER_GROUP_SIZES:
        return None
    return (
        f"group_size {group_size}: gptqmodel's kernels (transformers' GPTQ loading) accept only "
        f"{', '.join(map(str, CONSUMER_GROUP_SIZES))}; only slmcompress will load this checkpoint"
    )


@dataclass(frozen=True)
class GroupSizeChoice:
    """``group_size: auto`` resolved for a model, and what the stage report says about it."""

    config: Any  # the pass config with the resolved integer group size
    warnings: list[str]  # ragged groups, sizes the consumers refuse
    report: dict[str, Any]  # requested and resolved values, input widths, ragged or not


def resolve_group_size(config: Any, model: nn.Module) -> GroupSizeChoice:
    """``config`` with ``group_size: auto`` resolved for ``model``, with report warnings.

    The checkpoint's ``quantization_config`` gets the resolved integer; the report records
    the requested and resolved values (the pass puts them into its context).
    """
    chosen, _ = quantizable_linears(model, config.ignore, config.bits)
    widths = {name: linear.in_features for name, linear in chosen.items()}
    auto = config.group_size == "auto"
    group = auto_group_size(widths.values()) if auto else config.group_size
    ragged = ragged_group_warning(group, widths)
    warnings = [w for w in (ragged, unsupported_group_warning(group)) if w]
    report = {
        "requested": config.group_size,
        "resolved": group,
        "input_widths": sorted(set(widths.values())),
        "ragged": ragged is not None,
    }
    return GroupSizeChoice(config.model_copy(update={"group_size": group}), warnings, report)


def check_group_size(value: Any) -> int | str:
    """``auto``, -1 (one group per output row: per-channel) or a positive size (a "before"
    validator: one clear message for any other value, strings such as ``--set`` gives too)."""
    if value == "auto":
        return value
    try:
        value = int(value)
    except (TypeError, ValueError):
        value = 0
    if value == 0 or value < -1:
        raise ValueError("must be 'auto', -1 (per-channel) or a positive group size")
    return value


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


def install_quant_linear(model: nn.Module, name: str, weight: QuantizedWeight) -> QuantLinear:
    """Replace ``model.<name>`` (an nn.Linear) with the packed QuantLinear of ``weight``."""
    linear = model.get_submodule(name)
    bias = linear.bias.detach() if linear.bias is not None else None
    # packed where the linear lives (no host round trip: on a GPU packing is a few kernels)
    layer = QuantLinear.from_quantized(weight.to(linear.weight.device), bias)
    replace_module(model, name, layer)
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
