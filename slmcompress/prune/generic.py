"""Structured pruning of a non-Llama architecture (GPT-2) with torch-pruning's dependency graph.

The Llama path (:mod:`slmcompress.prune.slicing`) knows its tensors by name. For other
architectures, torch-pruning (Fang et al. 2023, "DepGraph") traces one forward pass and
groups every parameter that must lose the same channels. What it gives on HF GPT-2
(transformers 5.23, torch-pruning 1.6.1), measured:

* GPT-2 uses ``transformers.pytorch_utils.Conv1D``; with a custom Conv1D pruner the
  graph loses the Conv1D's inner ``view``/``addmm`` chain and every MLP/attention group is
  a singleton (``c_fc`` out is not coupled to ``c_proj`` in). Swapping Conv1D for an
  equivalent ``nn.Linear`` before tracing fixes this, so we do that and swap back.
* Residual stream (``n_embd``): one correct group -- wte, wpe, every ln_1/ln_2/ln_f,
  the input of c_attn/c_fc, the output of both c_proj, and lm_head. The tied lm_head
  would be sliced twice through its shared Parameter, so it is untied while pruning.
* MLP (``n_inner``): a correct group c_fc out -> GELU -> c_proj in.
* Attention: **not usable**. The fused q|k|v output goes through ``split`` and SDPA, which
  torch-pruning treats as element-wise, so it couples *query* channel j with ``c_proj``
  input j (a *value* channel) -- a wrong model. And HF's GPT2Attention has no separate
  attention width: ``head_dim = n_embd / n_head`` and ``c_proj`` is ``n_embd x n_embd``, so
  removing whole heads at fixed ``n_embd`` cannot be written as a GPT2Config at all.
  Therefore: ``num_attention_heads`` is refused for GPT-2; a smaller ``hidden_size`` must
  divide by ``n_head``, and each head's q/k and v/c_proj channels are cut by hand to the
  new ``head_dim`` (same channels for q and k of a head, same for v and c_proj's input).

Importance here is weight magnitude (torch-pruning's ``GroupMagnitudeImportance``): the
activation collectors of :mod:`slmcompress.prune.importance` are Llama-specific.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.pytorch_utils import Conv1D

from slmcompress.errors import PassError

log = logging.getLogger(__name__)

_CONV_NAMES = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


def _tp():
    try:
        import torch_pruning
    except ImportError as exc:  # pragma: no cover - an optional extra
        raise PassError(
            "model: pruning non-Llama models needs torch-pruning (pip install 'slmcompress[prune]')"
        ) from exc
    return torch_pruning


def _to_linear(conv: Conv1D) -> nn.Linear:
    """Conv1D stores (in, out) weights; an equivalent Linear stores (out, in)."""
    linear = nn.Linear(conv.weight.shape[0], conv.nf)
    linear.weight.data = conv.weight.data.t().contiguous()
    linear.bias.data = conv.bias.data.clone()
    return linear


def _convs_to_linear(model: PreTrainedModel) -> None:
    """Replace every Conv1D of the blocks by an equivalent Linear (traceable by torch-pruning)."""
    for block in model.transformer.h:
        for parent_name, name in _CONV_NAMES:
            parent = getattr(block, parent_name)
            setattr(parent, name, _to_linear(getattr(parent, name)))


def check_gpt2_target(
    config,
    hidden_size: int | None,
    ffn_hidden_size: int | None,
    num_attention_heads: int | None = None,
) -> None:
    """One-line errors for targets GPT-2 cannot express."""
    if num_attention_heads is not None and num_attention_heads != config.n_head:
        raise PassError(
            "target.num_attention_heads: GPT-2 ties attention width to n_embd (head_dim = n_embd / "
            "n_head), so heads cannot be removed at a fixed hidden size; prune hidden_size instead"
        )
    if hidden_size is not None and (hidden_size > config.n_embd or hidden_size % config.n_head):
        raise PassError(
            f"target.hidden_size: {hidden_size} must be <= {config.n_embd} and divisible by "
            f"n_head {config.n_head} (GPT-2 derives head_dim from it)"
        )
    inner = config.n_inner or 4 * config.n_embd
    if ffn_hidden_size is not None and not 0 < ffn_hidden_size <= inner:
        raise PassError(f"target.ffn_hidden_size: {ffn_hidden_size} must be in 1..{inner}")


def _prune_group(graph, importance, module: nn.Module, fn, n_total: int, n_keep: int) -> None:
    """Score a whole dependency group and remove its lowest-scoring channels."""
    group = graph.get_pruning_group(module, fn, idxs=list(range(n_total)))
    scores = importance(group)  # (n_total,)
    drop = scores.argsort()[: n_total - n_keep].tolist()
    graph.get_pruning_group(module, fn, idxs=drop).prune()


def _shrink_heads(
    attn_linear: nn.Linear, proj_linear: nn.Linear, n_head: int, new_head_dim: int
) -> None:
    """Cut each head to ``new_head_dim`` channels: q/k jointly, v with c_proj's matching inputs.

    A head's logits are sum_j q_j k_j, so q and k lose the same j (ranked by |q_j||k_j|);
    its output channel j of v feeds c_proj input j (ranked by |v_j||c_proj[:, j]|).
    """
    width = attn_linear.out_features // 3
    head_dim = width // n_head
    w = attn_linear.weight.data.view(3, n_head, head_dim, -1)  # (qkv, heads, head_dim, in)
    b = attn_linear.bias.data.view(3, n_head, head_dim)
    qk = (
        (w[0].norm(dim=-1) * w[1].norm(dim=-1)).topk(new_head_dim, dim=1).indices.sort(dim=1).values
    )  # (heads, d')
    proj = proj_linear.weight.data.view(
        proj_linear.out_features, n_head, head_dim
    )  # (out, heads, head_dim)
    v_score = w[2].norm(dim=-1) * proj.norm(dim=0)  # (heads, head_dim)
    v = v_score.topk(new_head_dim, dim=1).indices.sort(dim=1).values
    pick = [qk, qk, v]
    attn_linear.weight.data = torch.stack(
        [w[i].gather(1, pick[i][..., None].expand(-1, -1, w.shape[-1])) for i in range(3)]
    ).reshape(3 * n_head * new_head_dim, -1)
    attn_linear.bias.data = torch.stack([b[i].gather(1, pick[i]) for i in range(3)]).reshape(-1)
    proj_linear.weight.data = proj.gather(2, v[None].expand(proj.shape[0], -1, -1)).reshape(
        proj.shape[0], -1
    )


def prune_gpt2(
    model: PreTrainedModel,
    hidden_size: int | None = None,
    ffn_hidden_size: int | None = None,
    num_attention_heads: int | None = None,
) -> PreTrainedModel:
    """Prune a GPT-2 (``GPT2LMHeadModel``) to smaller ``n_embd`` / ``n_inner``; returns a new model.

    The result is a plain ``GPT2LMHeadModel`` built from the updated config, so
    ``from_pretrained`` reloads it with no custom code.
    """
    if getattr(model.config, "model_type", None) != "gpt2":
        raise PassError(f"model: prune_gpt2 handles GPT-2 only, got {model.config.model_type!r}")
    config = model.config
    check_gpt2_target(config, hidden_size, ffn_hidden_size, num_attention_heads)
    tp = _tp()
    work = copy.deepcopy(model).float().eval()
    _convs_to_linear(work)
    work.lm_head.weight = nn.Parameter(work.lm_head.weight.detach().clone())  # untie while pruning
    example = {"input_ids": torch.zeros(1, 8, dtype=torch.long, device=work.device)}
    with torch.enable_grad():  # torch-pruning traces the autograd graph
        graph = tp.DependencyGraph().build_dependency(
            work, example_inputs=example, forward_fn=lambda m, x: m(**x, use_cache=False).logits
        )
    with torch.no_grad():
        _prune_work(work, graph, tp, config, hidden_size, ffn_hidden_size)
    inner = config.n_inner or 4 * config.n_embd
    return _rebuild(model, work, hidden_size or config.n_embd, ffn_hidden_size or inner)


def _prune_work(
    work, graph, tp, config, hidden_size: int | None, ffn_hidden_size: int | None
) -> None:
    """MLP groups per block, then the residual-stream group and the per-head attention cut."""
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    inner = config.n_inner or 4 * config.n_embd
    if ffn_hidden_size is not None and ffn_hidden_size < inner:
        for block in work.transformer.h:
            _prune_group(
                graph,
                importance,
                block.mlp.c_fc,
                tp.prune_linear_out_channels,
                inner,
                ffn_hidden_size,
            )
    if hidden_size is not None and hidden_size < config.n_embd:
        _prune_group(
            graph,
            importance,
            work.transformer.wte,
            tp.prune_embedding_out_channels,
            config.n_embd,
            hidden_size,
        )
        for block in work.transformer.h:
            _shrink_heads(
                block.attn.c_attn, block.attn.c_proj, config.n_head, hidden_size // config.n_head
            )


def _rebuild(
    original: PreTrainedModel, work: PreTrainedModel, n_embd: int, n_inner: int
) -> PreTrainedModel:
    """A fresh GPT2LMHeadModel of the new sizes holding the pruned weights (Conv1D layout)."""
    data = original.config.to_dict()
    data.update(n_embd=n_embd, n_inner=n_inner)
    config = original.config.__class__.from_dict(data)
    state = {}
    linears = {f"transformer.h.{i}.{p}.{n}" for i in range(config.n_layer) for p, n in _CONV_NAMES}
    for key, tensor in work.state_dict().items():
        module = key.rsplit(".", 1)[0]
        state[key] = (
            tensor.t().contiguous() if module in linears and key.endswith(".weight") else tensor
        )
    if getattr(config, "tie_word_embeddings", True):
        state["lm_head.weight"] = state["transformer.wte.weight"]
    with no_init_weights():
        new = original.__class__(config)
    try:
        new.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PassError(
            f"model: pruned GPT-2 tensors do not fit its config: {str(exc).splitlines()[1].strip()}"
        ) from exc
    new.tie_weights()
    log.info("pruned GPT-2 n_embd %d -> %d, n_inner -> %d", original.config.n_embd, n_embd, n_inner)
    return new.to(dtype=next(original.parameters()).dtype).eval()
