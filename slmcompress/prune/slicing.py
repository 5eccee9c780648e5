"""Build the genuinely smaller model: slice every tensor to a :class:`KeepPlan`.

Masking would leave the parameter count unchanged; Minitron (Muralidharan et al. 2024)
exports a smaller dense architecture. We slice the state dict (q/k/v/o by whole heads,
gate/up/down by neuron, every norm, the embedding and the tied lm_head by hidden
channel, and drop layers), write the new sizes into the config (``head_dim`` explicit,
``layer_types`` sliced) and load the result into a freshly built model of the same
class, so ``load_state_dict(strict=True)`` proves the checkpoint matches its config and
plain ``AutoModelForCausalLM.from_pretrained`` reloads it.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from slmcompress.arch import PART_INPUT, Family, decoder_layers, family_for, part_rows, segments
from slmcompress.errors import PassError
from slmcompress.prune.planner import KeepPlan, pruned_config

log = logging.getLogger(__name__)

#: index kind of each logical part's output rows and input columns; None = keep all
_ROW_AXIS = {
    "q": "q",
    "k": "kv",
    "v": "kv",
    "o": "hidden",
    "gate": "neurons",
    "up": "neurons",
    "down": "hidden",
}
_COL_AXIS = {"attn": "hidden", "mlp": "hidden", "heads": "q", "neurons": "neurons"}

Rule = tuple[tuple[torch.Tensor | None, ...], Callable[[torch.Tensor], torch.Tensor] | None]


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(n,) head indices -> (n * head_dim,) channel indices, head-major."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def _take(tensor: torch.Tensor, dims: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
    """Index ``tensor`` along each dim where an index tensor is given."""
    for dim, index in enumerate(dims):
        if index is not None:
            tensor = tensor.index_select(dim, index.to(tensor.device))
    return tensor.contiguous()


def _fused_rows(
    family: Family, path: str, rows: dict[str, int], index: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Kept rows of a (possibly fused) linear: each part's kept rows, offset to its segment."""
    return torch.cat(
        [index[_ROW_AXIS[part]] + start for part, start, _ in segments(family, path, rows)]
    )


def _layer_rules(
    layer: nn.Module, old_index: int, plan: KeepPlan, family: Family, config
) -> dict[str, tuple]:
    """Suffix (inside the layer) -> per-dim indices for this layer's sliced tensors."""
    head_dim = plan.sizes.head_dim
    index = {
        "hidden": plan.hidden,
        "q": head_channels(plan.heads[old_index], head_dim),
        "kv": head_channels(plan.kv_heads[old_index], head_dim),
        "neurons": plan.neurons[old_index],
    }
    rows = part_rows(config)  # the unpruned segment sizes
    rules: dict[str, tuple] = {}
    for path, parts in family.modules().items():
        kept = _fused_rows(family, path, rows, index)
        rules[f"{path}.weight"] = (kept, index[_COL_AXIS[PART_INPUT[parts[0]]]])
        rules[f"{path}.bias"] = (kept,)
    for norm in family.hidden_norms:  # per-head q/k norms are head_dim wide: never sliced
        rules[f"{norm}.weight"] = (plan.hidden,)
        rules[f"{norm}.bias"] = (plan.hidden,)
    return rules


def _top_rules(model: PreTrainedModel, plan: KeepPlan, family: Family) -> dict[str, Rule]:
    """Embedding (V, H), lm_head (V, H) and final norm (H,) sliced by hidden channel.

    A family that scales embeddings by sqrt(hidden_size) (Gemma) would scale the kept
    channels by sqrt(H') after pruning: the embedding is rescaled by sqrt(H / H') so the
    residual stream starts with the same values, and with a tied head the final norm is
    divided by that factor so the logits stay the same too.
    """
    names = {id(m): n for n, m in model.named_modules()}
    old, new = model.config.hidden_size, plan.sizes.hidden_size
    factor = (old / new) ** 0.5 if family.embed_scale and new != old else None
    scale = (lambda t: (t.float() * factor).to(t.dtype)) if factor else None
    embed = f"{names[id(model.get_input_embeddings())]}.weight"
    rules: dict[str, Rule] = {embed: ((None, plan.hidden), scale)}
    head = model.get_output_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if head is not None:  # a tied head is the same tensor as the embedding: the same rule
        rules[f"{names[id(head)]}.weight"] = ((None, plan.hidden), scale if tied else None)
        rules[f"{names[id(head)]}.bias"] = ((None,), None)
    norm = getattr(getattr(model, "model", None), "norm", None)
    offset = family.norm_offset
    unscale = (
        (lambda t: (((t.float() + offset) / factor) - offset).to(t.dtype))
        if factor and tied
        else None
    )
    if norm is not None:
        rules[f"{names[id(norm)]}.weight"] = ((plan.hidden,), unscale)
        rules[f"{names[id(norm)]}.bias"] = ((plan.hidden,), None)
    return rules


def iter_sliced(
    model: PreTrainedModel, plan: KeepPlan, get: Callable[[str], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The pruned model's tensors, one at a time: kept layers renumbered 0.., each sliced.

    ``model`` only supplies names and structure (a weightless meta skeleton will do);
    ``get(name)`` supplies each tensor, so a streamed run reads one tensor at a time.
    """
    layers = decoder_layers(model)
    layer_names = {id(m): n for n, m in model.named_modules()}
    prefix = layer_names[id(layers)]  # e.g. "model.layers"
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    renumber = {old: new for new, old in enumerate(plan.layers)}
    family = family_for(model)
    rules = {old: _layer_rules(layers[old], old, plan, family, model.config) for old in plan.layers}
    top = _top_rules(model, plan, family)
    for key in model.state_dict():
        match = pattern.match(key)
        if match is None:
            dims, post = top.get(key, ((), None))
            tensor = _take(get(key), dims)
            yield (
                key,
                (post(tensor) if post is not None and tensor.device.type != "meta" else tensor),
            )
            continue
        old, suffix = int(match.group(1)), match.group(2)
        if old in renumber:
            yield f"{prefix}.{renumber[old]}.{suffix}", _take(get(key), rules[old].get(suffix, ()))


Reader = Callable[[str], torch.Tensor]


def slice_state_dict(
    model: PreTrainedModel, plan: KeepPlan, wrap: Callable[[Reader], Reader] | None = None
) -> dict[str, torch.Tensor]:
    """The pruned model's state dict (in memory); ``wrap`` may replace what is read
    (e.g. re-fitted consumers, :meth:`~slmcompress.prune.reconstruction.Refits.reader`)."""
    read = model.state_dict().__getitem__
    return dict(iter_sliced(model, plan, wrap(read) if wrap else read))


@torch.no_grad()
def slice_model(
    model: PreTrainedModel, plan: KeepPlan, wrap: Callable[[Reader], Reader] | None = None
) -> PreTrainedModel:
    """Return a new, smaller model of the same class holding the kept units.

    Raises:
        PassError: the sliced tensors do not fit the pruned config (an architecture
            whose layout this slicer does not know) -- never a model that fails to reload.
    """
    config = pruned_config(model.config, plan.sizes, plan.layers)
    state = slice_state_dict(model, plan, wrap)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    with no_init_weights():
        new = model.__class__(config)
    try:
        new.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise PassError(
            f"model: pruned tensors do not match the pruned {type(model).__name__} config: "
            f"{first[1].strip() if len(first) > 1 else first[0]}"
        ) from exc
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    new.generation_config = copy.deepcopy(model.generation_config)
    new.name_or_path = model.name_or_path
    log.info("pruned %s -> %s", _arch(model.config), _arch(config))
    return new.to(device=device, dtype=dtype).eval()


def _arch(config) -> str:
    return (
        f"L{config.num_hidden_layers} H{config.hidden_size} ffn{config.intermediate_size} "
        f"heads{config.num_attention_heads}/{config.num_key_value_heads}"
    )
