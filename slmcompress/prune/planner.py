"""Pruning targets -> the architecture to export, validated before any weight changes.

Minitron (Muralidharan et al. 2024; Sreenivas et al. 2024) prunes in one shot to a fixed
target architecture, expressed like NVIDIA ModelOpt's export config: ``hidden_size``,
``ffn_hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``num_layers``.
This module turns such a target (or a ``param_ratio`` on one axis) into :class:`PruneSizes`
and rejects targets a Llama-style checkpoint cannot express: sizes larger than the model,
head counts that break GQA grouping, a hidden size the attention shape cannot divide.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from slmcompress.arch import LLAMA_LAYOUT, registered_family
from slmcompress.errors import PassError
from slmcompress.eval.report import count_params

Axis = Literal["heads", "mlp", "hidden", "layers"]
AXES: tuple[str, ...] = ("heads", "mlp", "hidden", "layers")
TARGET_KEYS = (
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_layers",
)


@dataclass(frozen=True)
class PruneSizes:
    """The prunable sizes of a decoder-only transformer (uniform over layers, as HF configs are).

    A prune's current and target sizes, named like NVIDIA ModelOpt's export config (the
    ``target:`` keys and the report's ``sizes_before``/``sizes_after``). Cost estimates use
    :class:`~slmcompress.memory_model.ModelDims` (which adds the vocabulary and tying).
    """

    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_layers: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def sizes_of(config: PretrainedConfig) -> PruneSizes:
    """Read the prunable sizes of a decoder config (one-line error on an impossible GQA)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv:
        raise PassError(
            f"config.num_attention_heads: {heads} is not a multiple of num_key_value_heads {kv}"
        )
    return PruneSizes(
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        num_layers=config.num_hidden_layers,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


def resolve_target(
    current: PruneSizes,
    target: dict[str, int | None],
    head_pruning: str = "within_groups",
    where: str = "target",
    config: PretrainedConfig | None = None,
) -> PruneSizes:
    """Fill unspecified target sizes and validate the result against ``current``.

    With ``head_pruning: kv_groups`` and no ``num_key_value_heads``, whole KV groups are
    removed so the query heads per group stay as they are (9/3 -> 6/2); with
    ``within_groups`` the KV heads stay and each group loses query heads (9/3 -> 6/3).
    """
    get = {k: v for k, v in target.items() if v is not None}
    heads = get.get("num_attention_heads", current.num_attention_heads)
    kv = get.get("num_key_value_heads")
    if kv is None:
        kv = current.num_key_value_heads
        if head_pruning == "kv_groups" and heads != current.num_attention_heads:
            kv = _kv_for_whole_groups(current, heads, where)
    sizes = PruneSizes(
        hidden_size=get.get("hidden_size", current.hidden_size),
        ffn_hidden_size=get.get("ffn_hidden_size", current.ffn_hidden_size),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_layers=get.get("num_layers", current.num_layers),
        head_dim=current.head_dim,
    )
    check_sizes(current, sizes, where)
    if config is not None:
        check_config(config, sizes, where)
    return sizes


def _kv_for_whole_groups(current: PruneSizes, heads: int, where: str) -> int:
    per_group = current.heads_per_group
    if heads % per_group:
        raise PassError(
            f"{where}.num_attention_heads: {heads} is not a multiple of {per_group} query heads per KV group; "
            "head_pruning: kv_groups removes whole groups (or set num_key_value_heads)"
        )
    return heads // per_group


def check_sizes(current: PruneSizes, new: PruneSizes, where: str = "target") -> None:
    """Raise a one-line PassError naming the first target field the model cannot take."""
    names = {
        "num_layers": "num_layers",
        "ffn_hidden_size": "ffn_hidden_size",
        "hidden_size": "hidden_size",
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": "num_key_value_heads",
    }
    for key, field in names.items():
        value, limit = getattr(new, key), getattr(current, key)
        if value < 1:
            raise PassError(f"{where}.{field}: must be at least 1, got {value}")
        if value > limit:
            raise PassError(
                f"{where}.{field}: {value} is larger than the model's {limit}; pruning only shrinks"
            )
    _check_gqa(current, new, where)


def _check_gqa(current: PruneSizes, new: PruneSizes, where: str) -> None:
    """Query heads must split evenly over KV groups, and a group can only lose heads."""
    heads, kv = new.num_attention_heads, new.num_key_value_heads
    if heads % kv:
        raise PassError(
            f"{where}.num_attention_heads: {heads} is not a multiple of num_key_value_heads {kv} "
            "(every KV group needs the same number of query heads)"
        )
    if heads // kv > current.heads_per_group:
        raise PassError(
            f"{where}.num_key_value_heads: {kv} groups of {heads // kv} query heads cannot be cut from "
            f"{current.num_key_value_heads} groups of {current.heads_per_group}; keep at least "
            f"{math.ceil(heads / current.heads_per_group)} KV heads"
        )


# ---------------------------------------------------------------- parameter counts
#: config.json key listing, after depth pruning, the original layer index of every layer
#: (distillation matches the student's hidden states to those teacher layers)
SOURCE_LAYERS_KEY = "slmcompress_source_layers"


def pruned_config(
    config: PretrainedConfig, sizes: PruneSizes, kept_layers: list[int] | None = None
) -> PretrainedConfig:
    """A copy of ``config`` describing the pruned architecture (head_dim kept explicit).

    Built through ``from_dict`` so the config class's own validation (e.g. Llama's
    ``hidden_size % num_attention_heads``) runs here, not at reload time.
    """
    family = registered_family(config) or LLAMA_LAYOUT
    keys = family.axis_keys
    data = config.to_dict()
    data.update(
        {
            keys["hidden"]: sizes.hidden_size,
            keys["ffn"]: sizes.ffn_hidden_size,
            keys["heads"]: sizes.num_attention_heads,
            keys["kv_heads"]: sizes.num_key_value_heads,
            # no longer hidden_size // heads once either changes
            keys["head_dim"]: sizes.head_dim,
            keys["layers"]: sizes.num_layers,
        }
    )
    keep = kept_layers if kept_layers is not None else list(range(sizes.num_layers))
    for key in family.per_layer_keys:  # e.g. Gemma's sliding/full layer_types
        if isinstance(data.get(key), list):
            data[key] = [data[key][i] for i in keep]
    origin = data.get(SOURCE_LAYERS_KEY)
    if kept_layers is not None and (origin or kept_layers != list(range(config.num_hidden_layers))):
        # which layers of the *unpruned* model survive, composed over repeated depth pruning
        data[SOURCE_LAYERS_KEY] = [origin[i] for i in kept_layers] if origin else list(kept_layers)
    return config.__class__.from_dict(data)


def check_config(config: PretrainedConfig, sizes: PruneSizes, where: str = "target") -> None:
    """The architecture's own rules (e.g. Llama: hidden_size divisible by the head count)."""
    try:
        pruned_config(config, sizes)
    except Exception as exc:  # noqa: BLE001 - strict-dataclass errors wrap the ValueError
        cause = exc.__cause__ or exc
        message = str(cause).strip().splitlines()[-1].strip()
        raise PassError(
            f"{where}.hidden_size: {sizes.hidden_size} is not allowed by {type(config).__name__} "
            f"with {sizes.num_attention_heads} heads: {message}"
        ) from exc


def param_counts(config: PretrainedConfig, sizes: PruneSizes) -> tuple[int, int]:
    """(total, non-embedding) parameters of the pruned architecture, counted on the meta device."""

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(pruned_config(config, sizes))
    return count_params(model)


def sizes_for_param_ratio(
    config: PretrainedConfig,
    ratio: float,
    axis: str,
    head_pruning: str = "within_groups",
    count: str = "non_embedding",
    round_to: int = 8,
) -> PruneSizes:
    """Shrink one axis until the model keeps ``ratio`` of its (non-embedding) parameters.

    Every count is linear in any single axis, so two meta-device counts give the line and
    the size is solved for, then rounded to what the axis allows (whole KV groups /
    query heads per group, multiples of ``round_to`` channels, whole layers).
    """
    current = sizes_of(config)
    field = {
        "mlp": "ffn_hidden_size",
        "hidden": "hidden_size",
        "layers": "num_layers",
        "heads": "num_attention_heads",
    }
    if axis not in field:
        raise PassError(f"axis: unknown axis {axis!r}; valid: {', '.join(AXES)}")
    pick = 0 if count == "total" else 1
    size = getattr(current, field[axis])
    step = _axis_step(current, axis, head_pruning, round_to)
    full = param_counts(config, current)[pick]
    probe = step if axis != "hidden" else current.num_attention_heads  # any valid smaller size
    per_unit = (
        full - param_counts(config, _with_axis(current, axis, size - probe, head_pruning))[pick]
    ) / probe
    want = size - (1 - ratio) * full / per_unit
    value = max(step, min(size - step, int(round(want / step)) * step))
    if value < 1 or value >= size:
        raise PassError(f"param_ratio: {ratio} cannot be reached by pruning {axis} alone")
    return _with_axis(current, axis, value, head_pruning)


def _axis_step(current: PruneSizes, axis: str, head_pruning: str, round_to: int) -> int:
    """Granularity of an axis: channels in multiples (hidden also divisible by heads), whole heads."""
    if axis == "mlp":
        return round_to
    if axis == "hidden":
        return math.lcm(round_to, current.num_attention_heads)
    if axis == "layers":
        return 1
    return current.heads_per_group if head_pruning == "kv_groups" else current.num_key_value_heads


def _with_axis(current: PruneSizes, axis: str, value: int, head_pruning: str) -> PruneSizes:
    if axis == "mlp":
        return replace(current, ffn_hidden_size=value)
    if axis == "hidden":
        return replace(current, hidden_size=value)
    if axis == "layers":
        return replace(current, num_layers=value)
    return resolve_target(
        current, {"num_attention_heads": value}, head_pruning, where="param_ratio"
    )


# ---------------------------------------------------------------- which units stay
@dataclass
class KeepPlan:
    """Indices (ascending, in original numbering) of everything the pruned model keeps."""

    sizes: PruneSizes
    hidden: torch.Tensor  # (H',)
    heads: dict[int, torch.Tensor]  # original layer -> kept query heads (nh',)
    kv_heads: dict[int, torch.Tensor]  # original layer -> kept KV heads (nkv',)
    neurons: dict[int, torch.Tensor]  # original layer -> kept MLP neurons (ffn',)
    layers: list[int]  # kept original layers, ascending


def plan_digest(plan: KeepPlan) -> str:
    """sha256 of every kept index: what a resumed per-layer result must have been made for."""
    digest = hashlib.sha256(repr(plan.sizes).encode())
    for part in (plan.heads, plan.kv_heads, plan.neurons):
        for layer in sorted(part):
            digest.update(f"{layer}:{part[layer].tolist()}".encode())
    digest.update(f"{plan.hidden.tolist()}{plan.layers}".encode())
    return digest.hexdigest()


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ascending (so kept units keep their order)."""
    return scores.float().topk(k).indices.sort().values


def select_heads(
    scores: torch.Tensor, n_kv: int, new_heads: int, new_kv: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep whole KV groups (by summed head score), then the best query heads in each.

    HF's ``repeat_kv`` serves query head j from KV head ``j // (heads / kv)``, so every kept
    group must keep the same number of query heads, listed group by group.
    """
    per_group = scores.numel() // n_kv
    grouped = scores.view(n_kv, per_group)  # (n_kv, heads per group)
    kv = top_k(grouped.sum(dim=1), new_kv)
    keep_per_group = new_heads // new_kv
    heads = [g * per_group + top_k(grouped[g], keep_per_group) for g in kv.tolist()]
    return torch.cat(heads), kv


def select_layers(
    scores: torch.Tensor, n_keep: int, mode: str, blocks: torch.Tensor | None = None
) -> list[int]:
    """Drop the least important layers: the lowest single scores, or the lowest contiguous block.

    ``blocks[s]`` scores removing layers ``s .. s+k-1`` together (k = layers to drop); when
    absent it is the sum of the single-layer scores in the window.
    """
    n_layers = scores.numel()
    n_drop = n_layers - n_keep
    if n_drop == 0:
        return list(range(n_layers))
    if mode == "per_layer":
        return top_k(scores, n_keep).tolist()
    if blocks is None or blocks.numel() != n_layers - n_drop + 1:
        blocks = scores.float().unfold(0, n_drop, 1).sum(dim=1)  # (L - k + 1,)
    start = int(blocks.argmin())
    return [i for i in range(n_layers) if not start <= i < start + n_drop]


def plan_keep(
    importance: Any, current: PruneSizes, sizes: PruneSizes, depth_mode: str = "per_layer"
) -> KeepPlan:
    """Turn importance scores and target sizes into the indices to keep."""
    layers = list(range(current.num_layers))
    if sizes.num_layers < current.num_layers:
        if importance.layers is None:
            raise PassError("target.num_layers: no depth scores were computed")
        blocks = (
            importance.blocks
            if importance.block_size == current.num_layers - sizes.num_layers
            else None
        )
        layers = select_layers(importance.layers, sizes.num_layers, depth_mode, blocks)
    heads, kv = {}, {}
    for i in layers:
        heads[i], kv[i] = select_heads(
            importance.heads[i],
            current.num_key_value_heads,
            sizes.num_attention_heads,
            sizes.num_key_value_heads,
        )
    return KeepPlan(
        sizes=sizes,
        hidden=top_k(importance.hidden, sizes.hidden_size),
        heads=heads,
        kv_heads=kv,
        neurons={i: top_k(importance.neurons[i], sizes.ffn_hidden_size) for i in layers},
        layers=layers,
    )


def sizes_for_removal(
    current: PruneSizes,
    axis: str,
    ratio: float,
    head_pruning: str = "within_groups",
    round_to: int = 8,
) -> PruneSizes:
    """Remove about ``ratio`` of one axis's units (at least one step, whole heads/groups, whole layers).

    Heads round the kept count down (9 heads in 3 groups at 10% -> 6), since smaller steps
    do not exist; channels round to the axis step, layers to the nearest whole layer.
    """
    if axis not in AXES:
        raise PassError(f"axis: unknown axis {axis!r}; valid: {', '.join(AXES)}")
    if not 0 < ratio < 1:
        raise PassError(f"ratios: {ratio} must be between 0 and 1 (the fraction removed)")
    field = {
        "mlp": "ffn_hidden_size",
        "hidden": "hidden_size",
        "layers": "num_layers",
        "heads": "num_attention_heads",
    }
    size = getattr(current, field[axis])
    step = _axis_step(current, axis, head_pruning, round_to)
    keep = size * (1 - ratio) / step
    units = math.floor(keep + 1e-9) if axis == "heads" else round(keep)
    value = max(step, min(size - step, units * step))
    if value >= size:
        raise PassError(f"axis: {axis} of size {size} cannot be pruned in steps of {step}")
    return _with_axis(current, axis, value, head_pruning)
