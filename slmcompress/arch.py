"""Architecture descriptions: where each decoder family keeps what compression touches.

Pruning slices tensors by name, GPTQ groups linears by input, streaming maps checkpoint
names to layers: all of it breaks on the layouts families differ in (Phi-3 fuses q|k|v and
gate|up into single linears, Qwen2 has q/k/v biases, Qwen3 and Gemma 3 per-head q/k norms,
Gemma scaled embeddings and four norms per block). One frozen :class:`Family` per family
says where those tensors are; adding a family is one entry in :data:`FAMILIES` plus a test
(``tests/test_families.py``). A model of an unregistered ``model_type`` whose layers have
exactly the plain Llama layout is described by :data:`LLAMA_LAYOUT` (every parameter
accounted for, so nothing is silently left unsliced); anything else fails up front with a
one-line error naming what is missing.

A *logical part* is one of ``q k v o gate up down``. Parts that name the same module are
fused into it, stacked on the output dim in that order (Phi-3: ``q|k|v`` in ``qkv_proj``,
``gate|up`` in ``gate_up_proj``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from slmcompress.errors import PassError

log = logging.getLogger(__name__)

PARTS = ("q", "k", "v", "o", "gate", "up", "down")
#: what each logical part reads: "attn" (attention input), "heads" (attention output),
#: "mlp" (MLP input), "neurons" (MLP activation)
PART_INPUT = {
    "q": "attn",
    "k": "attn",
    "v": "attn",
    "o": "heads",
    "gate": "mlp",
    "up": "mlp",
    "down": "neurons",
}
#: config.json key of each prunable axis (the same in every family so far)
AXIS_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "hidden": "hidden_size",
        "ffn": "intermediate_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "layers": "num_hidden_layers",
        "head_dim": "head_dim",
    }
)


@dataclass(frozen=True)
class Family:
    """Where one decoder family keeps the tensors compression passes read or slice.

    Module paths are relative to one decoder layer. The *layout* of a family, no sizes: the
    three architecture types are named by role -- this one (where tensors live),
    :class:`~slmcompress.memory_model.ModelDims` (the numbers cost is computed from) and
    :class:`~slmcompress.prune.planner.PruneSizes` (the sizes a prune keeps).
    """

    name: str
    model_types: tuple[str, ...]
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"  # its output feeds q/k/v
    mlp_norm: str = "post_attention_layernorm"  # its output feeds gate/up
    hidden_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    head_norms: tuple[str, ...] = ()  # per-head q/k norms (head_dim wide): never sliced
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size) at run time
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight); Gemma: 1
    axis_keys: Mapping[str, str] = field(default_factory=lambda: AXIS_KEYS, hash=False)
    per_layer_keys: tuple[str, ...] = ("layer_types",)  # config lists sliced on depth prune

    def path(self, part: str) -> str:
        return getattr(self, part)

    def modules(self) -> dict[str, tuple[str, ...]]:
        """Module path -> the logical parts it holds, stacked on the output dim in this order."""
        out: dict[str, tuple[str, ...]] = {}
        for part in PARTS:
            out[self.path(part)] = out.get(self.path(part), ()) + (part,)
        return out

    def fused(self) -> dict[str, tuple[str, ...]]:
        """Only the modules holding more than one part (``qkv_proj``: q, k, v)."""
        return {p: parts for p, parts in self.modules().items() if len(parts) > 1}

    def input_groups(self) -> list[list[str]]:
        """Linears sharing one input, in execution order (GPTQ's Hessian groups)."""
        groups: dict[str, list[str]] = {}
        for part in PARTS:
            paths = groups.setdefault(PART_INPUT[part], [])
            if self.path(part) not in paths:
                paths.append(self.path(part))
        return [groups[k] for k in ("attn", "heads", "mlp", "neurons")]

    def norms(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.hidden_norms, *self.head_norms)))


LLAMA_LAYOUT = Family("llama-layout", ())

FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family; a model_type claimed twice is a programming error."""
    for model_type in family.model_types:
        if model_type in FAMILIES:
            raise ValueError(f"model_type {model_type!r} already belongs to family {family.name}")
        FAMILIES[model_type] = family
    return family


register_family(Family("llama", ("llama",)))
register_family(Family("mistral", ("mistral",)))
register_family(Family("qwen2", ("qwen2",)))  # q/k/v biases: sliced with their rows
register_family(Family("qwen3", ("qwen3",), head_norms=("self_attn.q_norm", "self_attn.k_norm")))
register_family(
    Family(
        "gemma3",
        ("gemma3_text",),
        mlp_norm="pre_feedforward_layernorm",
        hidden_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        head_norms=("self_attn.q_norm", "self_attn.k_norm"),
        embed_scale=True,
        norm_offset=1.0,
    )
)
register_family(
    Family(
        "phi3",
        ("phi3",),
        q="self_attn.qkv_proj",
        k="self_attn.qkv_proj",
        v="self_attn.qkv_proj",
        gate="mlp.gate_up_proj",
        up="mlp.gate_up_proj",
    )
)


# ---------------------------------------------------------------- lookup
def model_type_of(config: Any) -> str:
    return str(getattr(config, "model_type", None) or "unknown")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (Llama/Mistral/Qwen/Gemma style, GPT-2 style)."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    for attr in ("layers", "h"):
        if base is not None and isinstance(getattr(base, attr, None), nn.ModuleList):
            return getattr(base, attr)
    raise PassError(f"model: cannot find the decoder layers of {type(model).__name__}")


def layers_prefix(model: nn.Module) -> str:
    """Dotted name of the decoder-layer ModuleList (``model.layers`` for Llama)."""
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def registered_family(config: Any) -> Family | None:
    """The registered family of a config, or None."""
    return FAMILIES.get(model_type_of(config))


def family_for(model: nn.Module) -> Family:
    """The description of ``model`` (registered, or derived from a plain Llama layout).

    Raises:
        PassError: one line naming the model type and the first module it lacks.
    """
    family = registered_family(model.config)
    layers = decoder_layers(model)
    if family is None:
        missing = _uncovered(layers[0], LLAMA_LAYOUT) if len(layers) else []
        if not len(layers) or missing:
            raise PassError(
                f"model: layer 0 ({type(layers[0]).__name__ if len(layers) else '?'}) of "
                f"model_type {model_type_of(model.config)!r} is of no known family "
                f"({', '.join(sorted(set(FAMILIES)))}) and not a Llama-style layer: "
                f"{missing[0]}; describe it in slmcompress/arch.py"
            )
        family = replace(LLAMA_LAYOUT, name=f"{model_type_of(model.config)} (llama layout)")
        log.info("model_type %r: using the plain Llama layout", model_type_of(model.config))
    for index, layer in enumerate(layers):
        problems = _uncovered(layer, family)
        if problems:
            raise PassError(
                f"model: layer {index} ({type(layer).__name__}) does not match the {family.name} "
                f"description: {problems[0]}"
            )
    return family


def _uncovered(layer: nn.Module, family: Family) -> list[str]:
    """What the description names but the layer lacks, then parameters it does not describe."""
    problems = []
    named = dict(layer.named_modules())
    for path in (*family.modules(), *family.norms()):
        if path not in named:
            problems.append(f"no module {path}")
        elif path in family.modules() and not isinstance(named[path], nn.Linear):
            problems.append(f"{path} is a {type(named[path]).__name__}, not an nn.Linear")
    known = set(family.modules()) | set(family.norms())
    for name, _ in layer.named_parameters():
        if name.rsplit(".", 1)[0] not in known:
            problems.append(f"parameter {name} is not described")
    return problems


# ---------------------------------------------------------------- sizes of the parts
def part_rows(config: Any, sizes: Any = None) -> dict[str, int]:
    """Output rows of every logical part, from a :class:`~slmcompress.prune.planner.PruneSizes`-like object or the config."""
    heads = getattr(sizes, "num_attention_heads", None) or config.num_attention_heads
    kv = getattr(sizes, "num_key_value_heads", None) or (
        getattr(config, "num_key_value_heads", None) or heads
    )
    head_dim = getattr(sizes, "head_dim", None) or (
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    ffn = getattr(sizes, "ffn_hidden_size", None) or config.intermediate_size
    hidden = getattr(sizes, "hidden_size", None) or config.hidden_size
    return {
        "q": heads * head_dim,
        "k": kv * head_dim,
        "v": kv * head_dim,
        "o": hidden,
        "gate": ffn,
        "up": ffn,
        "down": hidden,
    }


def segments(family: Family, path: str, rows: Mapping[str, int]) -> list[tuple[str, int, int]]:
    """``(part, start, stop)`` row ranges of each part inside module ``path``."""
    out, start = [], 0
    for part in family.modules()[path]:
        out.append((part, start, start + rows[part]))
        start += rows[part]
    return out


def check_layer_shapes(
    family: Family, layer: nn.Module, config: Any, prefix: str = "layer."
) -> None:
    """Every described linear has the shape the config implies (fused ones: summed rows).

    Raises:
        PassError: naming the tensor, its shape and the expected one.
    """
    rows = part_rows(config)
    cols = {"attn": rows["o"], "mlp": rows["o"], "heads": rows["q"], "neurons": rows["gate"]}
    for path, parts in family.modules().items():
        weight = layer.get_submodule(path).weight
        want = (sum(rows[p] for p in parts), cols[PART_INPUT[parts[0]]])
        if tuple(weight.shape) != want:
            split = " + ".join(f"{p} {rows[p]}" for p in parts)
            raise PassError(
                f"model: {prefix}{path}.weight has shape {tuple(weight.shape)}, the config "
                f"implies {want} ({split} rows)"
            )


@dataclass(frozen=True)
class LayerParts:
    """The modules of one decoder layer that importance scoring reads, fused parts split."""

    family: Family
    layer: nn.Module
    rows: Mapping[str, int]
    n_heads: int
    o: nn.Linear
    down: nn.Linear
    norm_attn: nn.Module
    norm_mlp: nn.Module

    def weight(self, part: str) -> torch.Tensor:
        """(rows, in) weight of one logical part (a view into a fused linear)."""
        path = self.family.path(part)
        weight = self.layer.get_submodule(path).weight
        for name, start, stop in segments(self.family, path, self.rows):
            if name == part:
                return weight[start:stop]
        raise KeyError(part)


def layer_parts(layer: nn.Module, family: Family, config: Any, sizes: Any = None) -> LayerParts:
    """Resolve a layer's parts (``family_for`` has checked they exist)."""
    get = layer.get_submodule
    rows = part_rows(config, sizes)
    heads = getattr(sizes, "num_attention_heads", None) or config.num_attention_heads
    return LayerParts(
        family,
        layer,
        rows,
        heads,
        get(family.o),
        get(family.down),
        get(family.attn_norm),
        get(family.mlp_norm),
    )


def layer_type(config: Any, index: int) -> str:
    """Attention type of layer ``index`` (sliding/full); models pass each type its own mask/rope."""
    types = getattr(config, "layer_types", None)
    return str(types[index]) if types and index < len(types) else "default"
