"""GGUF tensor payloads as pure functions: float -> blocks (RTN) and GPTQ codes -> blocks.

GGUF quantizes each row (output channel) in blocks of 32 contiguous input channels
(llama.cpp ``ggml-common.h``)::

    Q8_0: fp16 d, 32 x int8 q            w = d * q
    Q4_0: fp16 d, 16 bytes of nibbles    w = d * (q - 8)
    Q4_1: fp16 d, fp16 m, 16 bytes       w = d * q + m

and in the 16 nibble bytes, element ``j`` is the low nibble of byte ``j`` and ``j + 16``
its high nibble. A GPTQ group of 32 contiguous inputs has one scale ``s`` and zero ``z``
per output channel and ``w = s * (q - z)``, so its codes move into these blocks unchanged:
Q4_0/Q8_0 are exact, Q4_1 up to the fp16 rounding of ``m = -s * z``.

Round-to-nearest from float uses ``gguf.quants``, which is bit-exact with llama.cpp's
reference quantizers; only the GPTQ transfer is packed here (the package has no API for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

from slmcompress.errors import PassError

QK = 32  # GGUF block width (input channels) of every type handled here

#: user-facing type name -> (tensor type, general.file_type)
GGUF_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_0": (GGMLQuantizationType.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (GGMLQuantizationType.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}
FLOAT_TYPES = ("f32", "f16", "bf16")
#: types a GPTQ group of 32 maps onto without re-quantizing
GPTQ_TRANSFER_TYPES = ("q4_0", "q4_1", "q8_0")


@dataclass(frozen=True)
class GptqTensor:
    """One GPTQ linear, unpacked: ``w[o, i] = scales[g_idx[i], o] * (codes[o, i] - zeros[g_idx[i], o])``."""

    codes: torch.Tensor  # (out, in) int
    scales: torch.Tensor  # (G, out) fp16
    zeros: torch.Tensor  # (G, out) int, the real zero point (v1 offset already added back)
    g_idx: torch.Tensor  # (in,) int
    bits: int
    group_size: int


def gguf_type(name: str) -> GGMLQuantizationType:
    """The tensor type of a user-facing name (``q4_1`` -> ``Q4_1``)."""
    return GGUF_TYPES[name][0]


def quantize_float(weight: torch.Tensor, type_name: str) -> np.ndarray:
    """Float ``(rows, cols)`` -> GGUF payload with llama.cpp's round-to-nearest block rules.

    Returns float32/float16 arrays for float types, else uint8 ``(rows, cols / 32 * type_size)``.
    """
    data = weight.detach().cpu().to(torch.float32).numpy()  # host first: no fp32 copy on device
    return gguf_quants.quantize(data, gguf_type(type_name))


def can_block_quantize(cols: int, type_name: str) -> bool:
    """Whether a row of ``cols`` values fits whole blocks of this type."""
    block, _ = GGML_QUANT_SIZES[gguf_type(type_name)]
    return cols % block == 0


def dequantize_payload(payload: np.ndarray, type_name: str) -> np.ndarray:
    """GGUF payload -> float32 ``(rows, cols)`` via the gguf package (the reference reader)."""
    return np.asarray(gguf_quants.dequantize(payload, gguf_type(type_name)), dtype=np.float32)


def check_contiguous_groups(name: str, tensor: GptqTensor) -> None:
    """GGUF blocks are 32 contiguous inputs: refuse any GPTQ grouping that is not exactly that."""
    in_features = tensor.codes.shape[1]
    if tensor.group_size != QK:
        raise PassError(
            f"{name}: GPTQ group_size {tensor.group_size} does not map onto GGUF's {QK}-wide "
            f"blocks; quantize with group_size {QK} or export with requantize: true"
        )
    if in_features % QK:
        raise PassError(f"{name}: in_features {in_features} is not a multiple of {QK}")
    g_idx = tensor.g_idx.to(torch.int64)
    expected = torch.arange(in_features, dtype=torch.int64, device=g_idx.device) // QK
    if not torch.equal(g_idx, expected):
        raise PassError(
            f"{name}: g_idx is not contiguous (act-order without static groups); "
            "GGUF blocks need monotone groups: re-quantize with static_groups or requantize: true"
        )


def gptq_to_blocks(name: str, tensor: GptqTensor, type_name: str) -> np.ndarray:
    """Move GPTQ codes into GGUF blocks: uint8 ``(out, in / 32 * type_size)``.

    Raises PassError naming the tensor when the codes do not fit the type losslessly
    (e.g. asymmetric zeros into Q4_0). Tensors on any device; the payload is host memory.
    """
    check_contiguous_groups(name, tensor)
    out_features, in_features = tensor.codes.shape
    n_blocks = in_features // QK
    q = tensor.codes.to("cpu", torch.int32).view(out_features, n_blocks, QK)  # (O, B, 32)
    z = tensor.zeros.to("cpu", torch.int32).T.unsqueeze(-1)  # (O, B, 1): group g == block g
    s = tensor.scales.to("cpu", torch.float16).T.contiguous()  # (O, B)
    if type_name == "q4_1":
        _check_range(name, q, 0, 15, "Q4_1 needs codes in [0, 15] (at most 4 bits)")
        m = (-s.float() * z.squeeze(-1).float()).to(torch.float16)  # fp16 rounding: the only loss
        return _assemble([s, m], _pack_nibbles(q))
    if type_name == "q4_0":
        centered = q - z + 8  # Q4_0 stores q' with w = d * (q' - 8)
        _check_range(name, centered, 0, 15, "Q4_0 needs symmetric codes (q - zero in [-8, 7])")
        return _assemble([s], _pack_nibbles(centered))
    if type_name == "q8_0":
        centered = q - z
        _check_range(name, centered, -128, 127, "Q8_0 needs q - zero in [-128, 127]")
        qs = centered.to(torch.int8).cpu().numpy().view(np.uint8)  # (O, B, 32)
        return _assemble([s], qs)
    raise PassError(
        f"{name}: GPTQ codes move losslessly only into {', '.join(GPTQ_TRANSFER_TYPES)}, not "
        f"{type_name}; export with requantize: true to re-quantize the dequantized weights"
    )


def _check_range(name: str, values: torch.Tensor, low: int, high: int, why: str) -> None:
    lo, hi = int(values.min()), int(values.max())
    if lo < low or hi > high:
        raise PassError(f"{name}: cannot transfer losslessly: {why}; found [{lo}, {hi}]")


def _pack_nibbles(q: torch.Tensor) -> np.ndarray:
    """Codes ``(O, B, 32)`` in [0, 15] -> bytes ``(O, B, 16)``: low nibble j, high nibble j + 16."""
    q = q.to(torch.uint8)
    packed = q[..., : QK // 2] | (q[..., QK // 2 :] << 4)  # (O, B, 16)
    return packed.cpu().numpy()


def _assemble(halves: list[torch.Tensor], qs: np.ndarray) -> np.ndarray:
    """Concatenate per-block fp16 fields ``(O, B)`` and the quant bytes ``(O, B, n)`` into rows."""
    out_features, n_blocks = qs.shape[:2]
    fields = [
        h.cpu().numpy().astype(np.float16).view(np.uint8).reshape(out_features, n_blocks, 2)
        for h in halves
    ]
    blocks = np.concatenate([*fields, qs], axis=-1)  # (O, B, type_size)
    return np.ascontiguousarray(blocks.reshape(out_features, -1))


def gptq_dequantize(tensor: GptqTensor) -> torch.Tensor:
    """The GPTQ checkpoint's own float weight ``(out, in)`` (the transfer's reference)."""
    g = tensor.g_idx.long()
    scales = tensor.scales.float()[g].T  # (out, in)
    zeros = tensor.zeros.float()[g].T  # (out, in)
    return scales * (tensor.codes.float() - zeros)
