"""Streamed forward: whole-model results for a model larger than memory, one layer at a time.

The calibration engine (:class:`~slmcompress.streaming.engine.StreamingRun`) already carries
the hidden states of a token set through the decoder layers with one layer resident,
activations spilled to disk and a resume point per layer. A forward adds the head: after
the last layer, final norm + ``lm_head`` run on a bounded number of rows at a time, so a
128k-262k vocabulary never materialises ``(tokens, vocab)`` logits, and a small *head
function* reduces each row chunk to what the caller keeps (per-token NLL for perplexity,
top-k logits for a teacher cache). Its result is the last layer's resume point.

Every weight is read once per call, so callers pass token chunks large enough that
reading the model costs less than computing on the chunk (see ``plan``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slmcompress.errors import PassError
from slmcompress.layerwise import layer_output, to_device
from slmcompress.streaming.budget import StreamOptions
from slmcompress.streaming.engine import StreamingLayerStep, StreamingRun
from slmcompress.streaming.loader import StreamingModel, materialise, release

#: (logits (r, V) float32, next-token targets (r,) with -1 where none) -> tensors per row
Head = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]

#: default bytes of float32 logits one head chunk may hold
HEAD_CHUNK_BYTES = 256 * 2**20


def nll_head(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row negative log-likelihood of the next token (0 where there is none)."""
    nll = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")  # (r,)
    return {"nll": torch.where(targets >= 0, nll, torch.zeros_like(nll))}


def top_k_head(k: int) -> Head:
    """Per-row top-k logits (values descending, as ``torch.topk`` orders them)."""

    def head(logits: torch.Tensor, _targets: torch.Tensor) -> dict[str, torch.Tensor]:
        values, indices = logits.topk(k, dim=-1)  # (r, k)
        return {"values": values, "indices": indices.to(torch.int32)}

    return head


def head_rows(vocab: int, chunk_bytes: int = HEAD_CHUNK_BYTES) -> int:
    """Rows of float32 logits that fit ``chunk_bytes`` (at least one)."""
    return max(1, chunk_bytes // (4 * vocab))


@torch.no_grad()
def streamed_forward(
    stream: StreamingModel,
    tokens: torch.Tensor,
    head: Head,
    device: torch.device,
    work_dir: Path,
    options: StreamOptions | None = None,
    chunk_bytes: int = HEAD_CHUNK_BYTES,
) -> dict[str, torch.Tensor]:
    """Run ``tokens`` ``(N, T)`` through the whole model; return the head's rows ``(N*T, ...)``.

    Resumable: a killed call restarts after the last finished layer (the key covers the
    model, tokens and ``options.key``, which must name the head and its settings).
    """
    run = StreamingRun(stream, tokens, device, work_dir, options, stream.dtype)
    last = stream.num_layers() - 1
    for step in run.steps():
        if step.index == last:
            rows = _final_rows(stream, step, tokens, head, device, chunk_bytes)
            run.commit(last, rows)
    tensors, _meta = run.result(last)
    return tensors


def _final_rows(
    stream: StreamingModel,
    step: StreamingLayerStep,
    tokens: torch.Tensor,
    head: Head,
    device: torch.device,
    chunk_bytes: int,
) -> dict[str, torch.Tensor]:
    """Last layer + final norm + lm_head, batch by batch, ``lm_head`` on bounded row chunks."""
    norm, lm_head = _load_head(stream, device)
    softcap = getattr(stream.config, "final_logit_softcapping", None)
    rows = head_rows(lm_head.out_features, chunk_bytes)
    pieces: dict[str, list[torch.Tensor]] = {}
    start = 0
    try:
        for batch in step.inputs:
            out = step.layer(batch.hidden.to(device), **to_device(batch.kwargs, device))
            hidden = norm(layer_output(out))  # (B, T, H)
            if not torch.isfinite(hidden).all():
                raise PassError(f"layer {step.index}: NaN/Inf in activations")
            ids = tokens[start : start + hidden.shape[0]]  # (B, T)
            start += hidden.shape[0]
            targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], 1).reshape(-1)
            flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
            for r0 in range(0, flat.shape[0], rows):
                logits = lm_head(flat[r0 : r0 + rows]).float()  # (r, V)
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                for key, value in head(logits, targets[r0 : r0 + rows].to(device)).items():
                    pieces.setdefault(key, []).append(value.cpu())
    finally:
        release(norm)
        release(lm_head)
    return {key: torch.cat(values) for key, values in pieces.items()}


def _load_head(stream: StreamingModel, device: torch.device) -> tuple[nn.Module, nn.Linear]:
    """Materialise the final norm and ``lm_head`` (the embeddings stand in when tied)."""
    base_prefix = stream.layer_prefix.rsplit(".", 2)[0]
    base = stream.model.get_submodule(base_prefix)
    norm = getattr(base, "norm", None)
    lm_head = stream.model.get_output_embeddings()
    if norm is None or lm_head is None:
        raise PassError(
            f"model: {type(stream.model).__name__} has no final 'norm' or output embeddings; "
            "a streamed forward cannot compute its logits"
        )
    embed = f"{base_prefix}.embed_tokens.weight"
    materialise(norm, f"{base_prefix}.norm.", stream.source, stream.dtype, device)
    head_prefix = _name_of(stream.model, lm_head)
    fallback = {f"{head_prefix}.weight": embed}  # tied embeddings store no lm_head
    materialise(lm_head, f"{head_prefix}.", stream.source, stream.dtype, device, fallback)
    return norm, lm_head


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)
