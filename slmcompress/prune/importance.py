"""Importance scores for structured pruning: activation-based (Minitron), magnitude, random.

Minitron (Muralidharan et al. 2024, sec. 2.2) ranks every prunable unit by the size of
the activations it produces on a small calibration set, computed with forward hooks
only (no gradients): attention heads by their output, MLP neurons by their activation,
embedding channels by the LayerNorm outputs. We follow NVIDIA ModelOpt's statistic:
per channel, mean |x| over the sequence, then L2 over the batch; heads take the L2 of
their ``head_dim`` channels of the ``o_proj`` input (``head_metric: attention_output``) or,
by default, the norm of their contribution after ``o_proj`` (``projected_output``: with
GQA it ranks heads within a KV group far better, see :class:`_LayerHooks`); hidden channels sum the statistic
of every input / post-attention norm output over layers. Depth is scored by the LM-loss
increase when a layer (or block) is removed, or by block importance 1 - cos(input,
output) (Men et al. 2024 "ShortGPT"; used by ModelOpt and Sreenivas et al. 2024).

Scores are "higher = more important" everywhere. All activation statistics come from one
pass of a :class:`~slmcompress.layerwise.LayerLoop`, so memory follows one decoder layer
(in memory or streamed from disk: the loop below is written once for both).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from slmcompress.arch import (
    Family,
    LayerParts,
    check_layer_shapes,
    decoder_layers,
    family_for,
    layer_parts,
    layers_prefix,
)
from slmcompress.errors import PassError
from slmcompress.layerwise import LayerLoop, LayerStep, MemoryLoop
from slmcompress.prune.planner import sizes_of

log = logging.getLogger(__name__)


@dataclass
class Importance:
    """Per-unit scores of one model (higher = keep). Lists are indexed by layer.

    Scores are small host (CPU) tensors whatever device computed them: planning and
    slicing index with them, and the report reads them.
    """

    heads: list[torch.Tensor]  # each (n_heads,)
    neurons: list[torch.Tensor]  # each (ffn,)
    hidden: torch.Tensor  # (H,)
    layers: torch.Tensor | None = None  # (L,) depth score of each single layer
    blocks: torch.Tensor | None = None  # (L - k + 1,) score of each contiguous block of k layers
    block_size: int = 1
    method: str = "activation"
    extra: dict[str, Any] = field(default_factory=dict)
    placeholder: bool = False  # equal scores standing in for units another step chooses

    def summary(self) -> dict[str, Any]:
        """Compact per-layer numbers for the stage report (none for a placeholder)."""
        if self.placeholder:
            return {"method": self.method} | self.extra
        out: dict[str, Any] = {
            "method": self.method,
            "head_score_per_layer": [round(float(h.sum()), 4) for h in self.heads],
            "neuron_score_per_layer": [round(float(n.sum()), 4) for n in self.neurons],
            "hidden_score_top5_channels": self.hidden.topk(
                min(5, self.hidden.numel())
            ).indices.tolist(),
        }
        if self.layers is not None:
            out["layer_scores"] = [round(float(v), 5) for v in self.layers]
        return out | self.extra


# ------------------------------------------------------------------ pure statistics
def channel_stat(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B, C): mean |x| over the sequence, the per-sample statistic."""
    return x.detach().float().abs().mean(dim=1)


class BatchL2:
    """Accumulates the L2 norm over samples of a per-sample statistic (B, C) -> (C,)."""

    def __init__(self) -> None:
        self.sumsq: torch.Tensor | None = None

    def add(self, stat: torch.Tensor) -> None:
        sq = stat.pow(2).sum(dim=0).cpu()  # (C,)
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq

    def value(self) -> torch.Tensor:
        if self.sumsq is None:
            raise PassError("importance: no calibration batch reached the hooks")
        return self.sumsq.sqrt()


def head_scores(channel_scores: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads * head_dim,) -> (n_heads,): L2 over each head's channels."""
    return channel_scores.view(n_heads, -1).norm(dim=1)


def cosine_importance(inputs: torch.Tensor, outputs: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of 1 - cos(input, output) and the token count; (B, T, H) each."""
    cos = F.cosine_similarity(
        inputs.float().flatten(0, 1), outputs.float().flatten(0, 1), dim=-1
    )  # (B*T,)
    return float((1 - cos).sum()), cos.numel()


# ------------------------------------------------------------------ module lookup
def check_supported(model: PreTrainedModel) -> Family:
    """The model's :class:`~slmcompress.arch.Family`; a one-line PassError if it has none.

    Also checks every layer's (fused) linears against the config, naming a misshapen tensor.
    """
    family = family_for(model)
    sizes_of(model.config)  # a head count that does not split over the KV heads fails here
    prefix = layers_prefix(model)
    for i, layer in enumerate(decoder_layers(model)):
        check_layer_shapes(family, layer, model.config, f"{prefix}.{i}.")
    return family


def model_parts(model: PreTrainedModel, layer: nn.Module, family: Family) -> LayerParts:
    """One layer's parts, sized by the model's config."""
    return layer_parts(layer, family, model.config)


# ------------------------------------------------------------------ activation collector
HEAD_METRICS = ("projected_output", "attention_output")


def projected_head_stat(x: torch.Tensor, o_weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, n_heads * head_dim) o_proj input -> (B, n_heads): mean over the sequence of
    ``|| W_o[:, head] @ x_head ||``, the size of what each head writes into the residual stream.

    Computed as ``sqrt(x_h^T (W_h^T W_h) x_h)`` with each head's (head_dim, head_dim) Gram
    matrix, so memory stays the size of ``x`` (never B x T x heads x hidden).
    """
    x = x.detach().float()
    batch, seq, channels = x.shape
    w = o_weight.detach().float().view(o_weight.shape[0], n_heads, channels // n_heads)
    gram = torch.einsum("hnd,hne->nde", w, w)  # (n_heads, head_dim, head_dim)
    xh = x.view(batch, seq, n_heads, -1)
    sq = torch.einsum("btnd,nde,btne->btn", xh, gram, xh)
    return sq.clamp_min(0).sqrt().mean(dim=1)


class _LayerHooks:
    """Forward hooks on one layer accumulating the Minitron statistics.

    Heads: ``attention_output`` is Minitron's statistic (the head's attention output, before
    ``o_proj``); ``projected_output`` (default) measures the head's contribution after
    ``o_proj``. With GQA the heads of one KV group share their values, so their attention
    outputs have similar norms and ranking them within a group by that norm is no better
    than chance on SmolLM2 (benchmarks/results/prune.md); the projected norm separates them.
    """

    def __init__(
        self, parts: LayerParts, n_heads: int, head_metric: str = "projected_output"
    ) -> None:
        if head_metric not in HEAD_METRICS:
            raise PassError(f"head_metric: must be one of {', '.join(HEAD_METRICS)}")
        self.parts, self.n_heads, self.head_metric = parts, n_heads, head_metric
        self.heads, self.neurons, self.hidden = BatchL2(), BatchL2(), BatchL2()
        self.handles = [
            parts.o.register_forward_pre_hook(
                lambda m, a: self.heads.add(self._head_stat(m, a[0]))
            ),
            parts.down.register_forward_pre_hook(
                lambda _m, a: self.neurons.add(channel_stat(a[0]))
            ),
            parts.norm_attn.register_forward_hook(
                lambda _m, _a, out: self.hidden.add(channel_stat(out))
            ),
            parts.norm_mlp.register_forward_hook(
                lambda _m, _a, out: self.hidden.add(channel_stat(out))
            ),
        ]

    def _head_stat(self, o_proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.head_metric == "projected_output":
            return projected_head_stat(x, o_proj.weight, self.n_heads)  # (B, n_heads)
        return channel_stat(x)  # (B, n_heads * head_dim)

    def head_values(self) -> torch.Tensor:
        """(n_heads,) scores, higher = more important."""
        value = self.heads.value()
        return value if self.head_metric == "projected_output" else head_scores(value, self.n_heads)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _BlockCosine:
    """1 - cos(input of layer s, output of layer s+k-1) for every block of k layers.

    Keeps the inputs of the last k layers (a ring buffer), so memory is k activations.
    """

    def __init__(self, block_size: int) -> None:
        self.k = block_size
        self.window: deque[list[torch.Tensor]] = deque(maxlen=block_size)
        self.scores: list[float] = []

    def add(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        self.window.append(inputs)
        if len(self.window) < self.k:
            return
        total, count = 0.0, 0
        for x, y in zip(self.window[0], outputs, strict=True):
            s, n = cosine_importance(x, y)
            total, count = total + s, count + n
        self.scores.append(total / count)


@torch.no_grad()
def activation_importance(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    device: torch.device,
    batch_size: int = 1,
    block_size: int = 1,
    head_metric: str = "projected_output",
) -> Importance:
    """Minitron importance of heads, neurons and hidden channels, plus cosine depth scores.

    Args:
        model: a Llama-style causal LM (in memory).
        tokens: calibration ids ``(N, T)``.
        device: compute device (one layer at a time lives there).
        batch_size: calibration batch size.
        block_size: also score every contiguous block of this many layers by 1 - cos.
        head_metric: ``projected_output`` or ``attention_output`` (see :class:`_LayerHooks`).
    """
    loop = MemoryLoop(model, tokens, device, batch_size)
    return activation_importance_of(loop, block_size, head_metric)


@torch.no_grad()
def activation_importance_of(
    loop: LayerLoop, block_size: int = 1, head_metric: str = "projected_output"
) -> Importance:
    """:func:`activation_importance` over any :class:`~slmcompress.layerwise.LayerLoop`.

    Each layer's scores are committed (a resume point when streamed); the per-layer cosine
    sum is kept as a float in the metadata, so the depth scores are the same division
    whether the loop ran in one process or was resumed.
    """
    model = loop.model
    family = check_supported(model)
    n_heads = model.config.num_attention_heads
    block = _BlockCosine(block_size) if block_size > 1 else None
    for step in loop.steps():
        tensors, meta, outputs = score_layer(
            step, model_parts(model, step.layer, family), n_heads, head_metric
        )
        if block is not None:  # in memory only: keeps the inputs of the last k layers
            block.add([b.hidden for b in step.inputs], outputs)
        loop.commit(step.index, tensors, meta)
    heads, neurons, cos, hidden = [], [], [], None
    for index in range(loop.num_layers()):
        tensors, meta = loop.result(index)
        heads.append(tensors["heads"])
        neurons.append(tensors["neurons"])
        hidden = tensors["hidden"] if hidden is None else hidden + tensors["hidden"]
        cos.append(meta["cos_total"] / meta["cos_count"])
    return Importance(
        heads=heads,
        neurons=neurons,
        hidden=hidden,
        layers=torch.tensor(cos, device="cpu"),
        blocks=torch.tensor(block.scores if block is not None else cos, device="cpu"),
        block_size=block_size,
        method="activation",
        extra={"depth_metric": "cosine", "head_metric": head_metric},
    )


@torch.no_grad()
def score_layer(
    step: LayerStep, parts: LayerParts, n_heads: int, head_metric: str = "projected_output"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Sequence[torch.Tensor]]:
    """One layer's Minitron statistics, its 1 - cos sum and token count, and its outputs.

    The layer did not change, so its outputs become the next layer's inputs as they are.
    """
    hooks = _LayerHooks(parts, n_heads, head_metric)
    try:
        outputs = step.forward(keep_outputs=True)
    finally:
        hooks.remove()
    step.set_outputs(outputs)
    total, count = 0.0, 0
    for batch, out in zip(step.inputs, outputs, strict=True):  # lazily: streamed inputs
        s, n = cosine_importance(batch.hidden, out)
        total, count = total + s, count + n
    tensors = {
        "heads": hooks.head_values(),
        "neurons": hooks.neurons.value(),
        "hidden": hooks.hidden.value(),
    }
    return tensors, {"cos_total": total, "cos_count": count}, outputs


# ------------------------------------------------------------------ baselines
@torch.no_grad()
def magnitude_importance(model: PreTrainedModel) -> Importance:
    """Weight-norm baseline: the L2 norm of all weights removed together with each unit.

    A head owns its q rows and o columns, a neuron its gate/up rows and down column, a
    hidden channel its embedding column, norm weights, the input columns of q/k/v/gate/up
    and the output rows of o/down in every layer; a layer owns all its weights.
    """
    family = check_supported(model)
    n_heads = model.config.num_attention_heads
    heads, neurons, layers = [], [], []
    hidden_sq = model.get_input_embeddings().weight.float().pow(2).sum(dim=0)  # (H,)
    for layer in decoder_layers(model):
        p = model_parts(model, layer, family)
        q_sq = p.weight("q").float().pow(2).sum(dim=1) + p.o.weight.float().pow(2).sum(
            dim=0
        )  # (nh*hd,)
        heads.append(q_sq.view(n_heads, -1).sum(dim=1).sqrt())
        n_sq = (
            p.weight("gate").float().pow(2).sum(1)
            + p.weight("up").float().pow(2).sum(1)
            + p.down.weight.float().pow(2).sum(0)
        )
        neurons.append(n_sq.sqrt())
        for part in ("q", "k", "v", "gate", "up"):
            hidden_sq = hidden_sq + p.weight(part).float().pow(2).sum(dim=0)
        for lin in (p.o, p.down):
            hidden_sq = hidden_sq + lin.weight.float().pow(2).sum(dim=1)
        for norm in family.hidden_norms:
            hidden_sq = hidden_sq + layer.get_submodule(norm).weight.float().pow(2)
        layers.append(sum(float(w.float().pow(2).sum()) for w in layer.parameters()) ** 0.5)
    return Importance(
        heads=[h.cpu() for h in heads],
        neurons=[n.cpu() for n in neurons],
        hidden=hidden_sq.sqrt().cpu(),
        layers=torch.tensor(layers, device="cpu"),
        method="magnitude",
    )


def uniform_importance(model: PreTrainedModel, method: str) -> Importance:
    """Equal scores everywhere: a placeholder plan for units another step chooses (the
    reconstruction's energy selection), named by ``method`` in the report."""
    check_supported(model)
    cfg = model.config
    n_layers = len(decoder_layers(model))
    return Importance(
        heads=[torch.ones(cfg.num_attention_heads, device="cpu") for _ in range(n_layers)],
        neurons=[torch.ones(cfg.intermediate_size, device="cpu") for _ in range(n_layers)],
        hidden=torch.ones(cfg.hidden_size, device="cpu"),
        layers=torch.ones(n_layers, device="cpu"),
        method=method,
        placeholder=True,
    )


def random_importance(model: PreTrainedModel, seed: int = 0) -> Importance:
    """Seeded uniform scores: the floor any importance metric must beat."""
    check_supported(model)
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)  # a CPU generator: the same scores everywhere
    n_layers = len(decoder_layers(model))

    def rand(n: int) -> torch.Tensor:
        return torch.rand(n, generator=gen, device="cpu")

    return Importance(
        heads=[rand(cfg.num_attention_heads) for _ in range(n_layers)],
        neurons=[rand(cfg.intermediate_size) for _ in range(n_layers)],
        hidden=rand(cfg.hidden_size),
        layers=rand(n_layers),
        method="random",
    )


# ------------------------------------------------------------------ depth by LM loss
class _SkipLayer(nn.Module):
    """Stands in for a removed decoder layer: returns its input unchanged."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.attention_type = getattr(original, "attention_type", None)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def layers_removed(model: PreTrainedModel, indices: list[int]) -> Iterator[None]:
    """Temporarily replace the given decoder layers by identities (weights untouched)."""
    layers = decoder_layers(model)
    saved = {i: layers[i] for i in indices}
    try:
        for i in indices:
            layers[i] = _SkipLayer(saved[i])
        yield
    finally:
        for i, layer in saved.items():
            layers[i] = layer


@torch.no_grad()
def lm_loss(model: PreTrainedModel, tokens: torch.Tensor, batch_size: int = 1) -> float:
    """Mean next-token cross-entropy of ``model`` on ``tokens`` (N, T)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        ids = tokens[start : start + batch_size].to(device)  # (B, T)
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total, count = total + float(nll), count + ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def loss_depth_scores(
    model: PreTrainedModel, tokens: torch.Tensor, block_size: int = 1, batch_size: int = 1
) -> tuple[torch.Tensor, float]:
    """LM-loss increase when each block of ``block_size`` contiguous layers is removed.

    Minitron (Muralidharan et al. 2024, sec. 2.2 "Layer (depth) importance") drops one
    layer (or a contiguous block) at a time and measures the LM loss; a small increase
    means the block is unimportant. Returns ``(scores (L - k + 1,), baseline loss)``.
    """
    model.eval()
    base = lm_loss(model, tokens, batch_size)
    n_layers = len(decoder_layers(model))
    scores = []
    for start in range(n_layers - block_size + 1):
        with layers_removed(model, list(range(start, start + block_size))):
            scores.append(lm_loss(model, tokens, batch_size) - base)
        log.debug(
            "depth: removing layers %d..%d: loss +%.4f", start, start + block_size - 1, scores[-1]
        )
    return torch.tensor(scores, device="cpu"), base
