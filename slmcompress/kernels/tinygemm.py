"""torch's CUDA int4 kernel (tinygemm, ``aten._weight_int4pack_mm``) as a serving route.

Its contract (torch 2.5+, as torchao's tensor-core tiled layout uses it): codes ``(N, K)`` in
``[0, 16)`` packed two per byte, the even input channel in the high nibble, as uint8
``(N, K/2)``; ``_convert_weight_to_int4pack(u8, inner_k_tiles)`` tiles them once;
``w = (q - 8) * scale + zero`` with scales and zeros as one bf16 ``(K/g, N, 2)`` tensor;
activations bf16 ``(M, K)``. GPTQ's ``w = s * (q - z)`` gives ``zero = s * (8 - z)``. Act-order
is served by reading ``x[:, perm]`` (the serving layout already sorted the rows).

Scales and zeros are rounded to bf16 and the product is computed in bf16, so this route is
less exact than the Triton ones; the dispatcher picks it only where the tuning data says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slmcompress.kernels.repack import ServingWeight, unpack_native


def available() -> bool:
    """This torch build has the CUDA int4 kernel and its weight packer."""
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm") and hasattr(ops, "_convert_weight_to_int4pack")


@dataclass(frozen=True)
class TinyGemmWeight:
    """The tensors one tinygemm call needs (a converted copy of the layer)."""

    packed: torch.Tensor  # tinygemm's tiled int32 layout
    scales_and_zeros: torch.Tensor  # (G, N, 2) bf16
    group: int
    perm: torch.Tensor | None  # (K,) int32
    out_features: int


def prepack(w: ServingWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u8 (N, K/2), scales_and_zeros (G, N, 2) bf16)``: the op's inputs before its own tiling."""
    if w.bits != 4 or w.group == 0:
        raise ValueError("tinygemm serves 4-bit weights with grouped scales only")
    codes = unpack_native(w.words, 4, w.in_features).T  # (N, K) int64
    u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
    s = w.scales.float()  # (G, N)
    zero = s * (8.0 - w.zeros.float())
    return u8, torch.stack([s, zero], dim=-1).to(torch.bfloat16).contiguous()


def convert(w: ServingWeight, inner_k_tiles: int) -> TinyGemmWeight:
    """Tile ``w`` for the CUDA kernel (once per layer and ``inner_k_tiles``)."""
    u8, sz = prepack(w)
    packed = torch.ops.aten._convert_weight_to_int4pack(u8, inner_k_tiles)
    return TinyGemmWeight(packed, sz, w.group, w.perm, w.out_features)


def dequantize_prepacked(u8: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """float32 ``(K, N)`` from :func:`prepack`'s tensors, by tinygemm's formula (tests' reference)."""
    n = u8.shape[0]
    codes = torch.stack([u8 >> 4, u8 & 15], dim=-1).reshape(n, -1).T.float()  # (K, N)
    g = torch.arange(codes.shape[0], device=u8.device) // group
    return (codes - 8.0) * sz[g, :, 0].float() + sz[g, :, 1].float()


def matmul(x2d: torch.Tensor, tw: TinyGemmWeight) -> torch.Tensor:
    """``x2d (M, K) @ W -> (M, N)`` in ``x2d.dtype`` (computed in bf16)."""
    x = x2d if tw.perm is None else x2d.index_select(1, tw.perm)
    out = torch.ops.aten._weight_int4pack_mm(
        x.to(torch.bfloat16).contiguous(), tw.packed, tw.group, tw.scales_and_zeros
    )  # (M, N) bf16
    return out.to(x2d.dtype)
