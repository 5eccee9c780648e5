"""Architecture facts for GGUF: which HF families llama.cpp runs, their tensor names and hparams.

Tensor names come from the gguf package's own HF -> GGUF map (the one llama.cpp's converter
uses), so adding a family is one :class:`ArchSpec` entry plus its hparam quirks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from transformers import PretrainedConfig

from slmcompress.errors import PassError


@dataclass(frozen=True)
class ArchSpec:
    """How one HF ``model_type`` is written for llama.cpp."""

    arch: gguf.MODEL_ARCH
    #: llama.cpp's converter permutes q/k rows (HF rotate_half -> GGML interleaved rope)
    permute_qk: bool


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
}


def arch_spec(config: PretrainedConfig) -> ArchSpec:
    """The spec of a model's family, or a one-line error naming the unsupported ``model_type``."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise PassError(
            f"model: GGUF export does not support model_type {model_type!r} "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[model_type]


def arch_name(spec: ArchSpec) -> str:
    """The ``general.architecture`` string (``llama``)."""
    return gguf.MODEL_ARCH_NAMES[spec.arch]


def tensor_name(spec: ArchSpec, n_blocks: int, hf_name: str) -> str:
    """HF parameter name -> GGUF tensor name (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``)."""
    mapping = gguf.get_tensor_name_map(spec.arch, n_blocks)
    name = mapping.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise PassError(f"{hf_name}: no GGUF tensor name for it in the {arch_name(spec)} layout")
    return name


def head_counts(config: PretrainedConfig) -> tuple[int, int]:
    """(query heads, key/value heads)."""
    n_head = int(config.num_attention_heads)
    return n_head, int(getattr(config, "num_key_value_heads", None) or n_head)


def qk_permutation(spec: ArchSpec, config: PretrainedConfig, gguf_name: str) -> int | None:
    """Head count to permute this tensor's rows by (llama.cpp's ``LlamaModel.permute``), if any."""
    if not spec.permute_qk:
        return None
    n_head, n_kv = head_counts(config)
    if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
        return n_head
    if gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
        return n_kv
    return None


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder output rows per head from HF's half-split rope to GGML's pairwise rope.

    Rows are independent GGUF blocks, so this applies equally to float rows and to
    already-quantized byte rows ``(out, bytes)``.
    """
    out = rows.shape[0]
    shaped = rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:])  # (H, 2, D/2, ...)
    return np.ascontiguousarray(shaped.swapaxes(1, 2).reshape(rows.shape))  # (H, D/2, 2, ...)


def write_hparams(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    """Architecture metadata (``llama.*`` keys) the way llama.cpp's converter writes them."""
    n_head, n_kv = head_counts(config)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != config.hidden_size:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    _write_rope_scaling(writer, rope)


def rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    """transformers 5 keeps rope settings in ``rope_parameters``; older configs in ``rope_theta``."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def _write_rope_scaling(writer: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    kind = rope.get("rope_type") or "default"
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return
    raise PassError(f"model: rope_type {kind!r} is not supported by the GGUF export yet")
