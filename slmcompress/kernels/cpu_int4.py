"""CPU serving of GPTQ layers through torch's int4 kernel (``aten._weight_int4pack_mm_for_cpu``).

Decode at batch 1 is memory-bound, so a kernel that reads 4-bit codes beats float32 matmul,
while the torch path (dequantize the whole weight on every call) is ~9x slower than float.
This is the kernel gptqmodel's CPU path uses. Its contract (torch 2.13):

- weight: int32 codes ``(N, K)`` in ``[0, 16)``, packed once by
  ``_convert_weight_to_int4pack_for_cpu`` into uint8 ``(N, K/2)``; ``N % 16 == 0``;
- ``w = (q - 8) * scale + zero`` with scales/zeros as one bf16 tensor ``(K/g, N, 2)``,
  ``g`` in {32, 64, 128, 256}, ``K % g == 0``, groups contiguous along ``K``;
- activations bf16 (the only x86 AVX512/AVX2-vectorised dtype; fp16/fp32 run a scalar loop).

GPTQ dequantizes as ``w = s * (q - z)`` = ``(q - 8) * s + s * (8 - z)``: the zero in the
float domain is ``s * (8 - z)``. 2- and 3-bit codes fit the 4-bit container unchanged.
Act-order layers (non-monotone ``g_idx``) are served by sorting input channels by group
once at conversion and gathering ``x``'s columns in that order per call. A GPTQ group that
is a multiple of a kernel group (ragged 576 = 4 x 128 + 64 included) is served with the
largest kernel group dividing every GPTQ group, its scales repeated.

The checkpoint stays GPTQ v1: this is a runtime conversion (gpt-fast's ``convert_for_runtime``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slmcompress.quant.packing import unpack_qzeros, unpack_rows

KERNEL_GROUPS = (256, 128, 64, 32)
#: the kernel packs output channels in blocks of this many
N_MULTIPLE = 16
MAX_KERNEL_BITS = 4


def available() -> bool:
    """Whether this torch build has the CPU int4 kernel and its weight packer."""
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(
        ops, "_convert_weight_to_int4pack_for_cpu"
    )


@dataclass(frozen=True)
class Int4Layout:
    """How a GPTQ layer maps onto the kernel: kernel group, channel order, group of each block."""

    group_size: int  # kernel group g' (divides every GPTQ group)
    perm: torch.Tensor | None  # (K,) input channel order (act-order), None = as stored
    block_groups: torch.Tensor  # (K/g',) GPTQ group of each kernel group


@dataclass(frozen=True)
class CpuInt4Weight:
    """The converted tensors one call of the kernel needs."""

    packed: torch.Tensor  # (N, K/2) uint8, kernel layout
    scales_and_zeros: torch.Tensor  # (K/g', N, 2) bf16
    group_size: int
    perm: torch.Tensor | None  # (K,) int64


def plan_layout(g_idx: torch.Tensor, bits: int, out_features: int) -> tuple[Int4Layout | None, str]:
    """``(layout, reason)``; layout is None when the kernel cannot serve the layer exactly."""
    if bits > MAX_KERNEL_BITS:
        return None, f"no {bits}-bit CPU kernel (torch's int4 kernel holds codes of <= 4 bits)"
    if out_features % N_MULTIPLE:
        return None, f"output width {out_features} is not a multiple of {N_MULTIPLE}"
    g = g_idx.to("cpu", torch.int64)  # (K,)
    perm = None
    if bool((g[1:] < g[:-1]).any()):  # act-order: make each group's channels contiguous
        perm = torch.argsort(g, stable=True)
        g = g[perm]
    sizes = torch.unique_consecutive(g, return_counts=True)[1]  # contiguous runs, in order
    common = math.gcd(*sizes.tolist())
    kernel_group = next((k for k in KERNEL_GROUPS if common % k == 0), None)
    if kernel_group is None:
        return None, f"group sizes {sorted(set(sizes.tolist()))} are not multiples of 32"
    reason = "int4 CPU kernel" + (", act-order channels gathered" if perm is not None else "")
    return Int4Layout(kernel_group, perm, g[::kernel_group].clone()), reason


@torch.no_grad()
def convert(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    layout: Int4Layout,
) -> CpuInt4Weight:
    """GPTQ v1 tensors -> the kernel's packed weight and bf16 scales/zeros (once per layer)."""
    k, n = qweight.shape[0] * 32 // bits, scales.shape[1]
    codes = unpack_rows(qweight.cpu(), bits, k)  # (K, N) int32
    if layout.perm is not None:
        codes = codes[layout.perm]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.T.contiguous(), 1)
    groups = layout.block_groups
    s = scales.cpu().float()[groups]  # (K/g', N)
    z = unpack_qzeros(qzeros.cpu(), bits, n).float()[groups]  # (K/g', N)
    scales_and_zeros = torch.stack([s, s * (8 - z)], dim=-1).to(torch.bfloat16)  # (K/g', N, 2)
    return CpuInt4Weight(packed, scales_and_zeros.contiguous(), layout.group_size, layout.perm)


def matmul(x: torch.Tensor, weight: CpuInt4Weight, out_features: int) -> torch.Tensor:
    """``x (..., K) @ W^T`` -> ``(..., N)`` in ``x.dtype``, computed in bf16 by the kernel."""
    x2d = x.reshape(-1, x.shape[-1])  # (M, K)
    if weight.perm is not None:
        x2d = x2d.index_select(1, weight.perm)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2d.to(torch.bfloat16).contiguous(),
        weight.packed,
        weight.group_size,
        weight.scales_and_zeros,
    )  # (M, N) bf16
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)
