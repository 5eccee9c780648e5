"""Triton dequant-matmul ``y = x @ dequant(W)`` straight from GPTQ v1 packed tensors (4- and 3-bit).

Imported lazily (only by :mod:`slmcompress.kernels.dispatch` once Triton is known to be
installed); nothing else in the package imports this module.

Layout (see :mod:`slmcompress.quant.packing`): ``qweight`` int32 ``(K * bits / 32, N)`` packs
the input dim as one little-endian bit stream per *block* of ``VALS`` inputs held in
``WORDS`` words (4-bit: 8 values in 1 word; 3-bit: 32 values in 3 words). ``qzeros``
``(G, N * bits / 32)`` packs ``zero - 1`` the same way along ``N``; ``scales`` ``(G, N)``.

Why the kernel is shaped this way:

* Two inner loops, picked by ``BLOCK_M`` at compile time. Decode (``BLOCK_M`` < 16) is
  memory-bound, so ``_packed_step`` loads each packed word exactly once: a K-tile covers
  ``KB = BLOCK_K / VALS`` blocks, a static loop over the ``VALS`` positions of a block
  extracts one ``(KB, BLOCK_N)`` code slice per position (compile-time shifts) and multiplies
  it with the matching strided ``(BLOCK_M, KB)`` slice of ``x`` by broadcast-multiply-sum (no
  tensor-core padding). Same sum, permuted K order. ``BLOCK_M`` >= 16 uses ``_tile_step``:
  one ``(BLOCK_K, BLOCK_N)`` code tile (words re-read from L1 per row) and one ``tl.dot``.
* Groups: with ``g_idx == i // group_size`` and ``group_size % BLOCK_K == 0`` a K-tile lies in
  one group, so its scale/zero rows are loaded once and the scale is applied after the sum
  (``G_UNIFORM``; per-channel is ``group_size = SINGLE_GROUP``). Anything else (act-order,
  small groups, ragged tails) gathers scales/zeros per row (``G_GATHER`` reads ``g_idx``):
  slower, always correct.
* Split-K adds fp32 partial sums atomically so a layer with few output tiles still fills
  every SM at decode; tiles go in grouped order for L2 reuse; above ``DENSE_MIN_M`` rows the
  weight is dequantized once and cuBLAS does the GEMM.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_BITS = (3, 4)
# M above this: dequantize to x.dtype once and let cuBLAS do the GEMM (prefill); tune with
# benchmarks/kernel.py, which times both paths.
DENSE_MIN_M = int(os.environ.get("SLMCOMPRESS_DENSE_MIN_M", "1024"))

G_GATHER, G_UNIFORM = 0, 1  # G_MODE: groups via g_idx, or g = i // group_size
SINGLE_GROUP = 1 << 30  # group_size meaning "one group" (per-channel): i // 2**30 == 0


@dataclass(frozen=True)
class PackedWeight:
    """The packed GPTQ tensors of one layer plus how its groups are laid out.

    ``g_mode``: ``G_UNIFORM`` when ``g_idx == i // group_size`` (``group_size`` is
    ``SINGLE_GROUP`` for per-channel scales), else ``G_GATHER`` (e.g. act-order), which reads
    ``g_idx`` and ignores ``group_size``.
    """

    qweight: torch.Tensor  # (K * bits / 32, N) int32
    qzeros: torch.Tensor  # (G, N * bits / 32) int32
    scales: torch.Tensor  # (G, N) fp16
    g_idx: torch.Tensor  # (K,) int32
    bits: int
    in_features: int
    out_features: int
    g_mode: int
    group_size: int


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration (what ``@triton.autotune`` would pick on a GPU)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def pack_geometry(bits: int) -> tuple[int, int]:
    """``(VALS, WORDS)``: a packed block holds ``VALS`` codes in ``WORDS`` int32 words."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"no Triton kernel for {bits}-bit weights (supported: {KERNEL_BITS})")
    return (8, 1) if bits == 4 else (32, 3)


# --------------------------------------------------------------------------- device code


@triton.jit
def _word_shift(idx, BITS: tl.constexpr):
    """Word offset and bit shift of element ``idx`` along a packed dim."""
    if BITS == 4:
        word = idx // 8
        shift = (idx % 8) * 4
    else:
        pos = (idx % 32) * 3  # bit position inside the 96-bit stream of a 32-value block
        word = (idx // 32) * 3 + pos // 32
        shift = pos % 32
    return word, shift


@triton.jit
def _extract(ptrs, step, shift, mask, BITS: tl.constexpr):
    """Code at bit ``shift`` of word ``*ptrs``; a 3-bit code may continue in ``*(ptrs + step)``."""
    w0 = tl.load(ptrs, mask=mask, other=0)
    if BITS == 4:
        q = (w0 >> shift) & 15
    else:
        lo_bits = tl.minimum(32 - shift, 3)  # bits held by the first word (< 3: straddles)
        w1 = tl.load(ptrs + step, mask=mask & (lo_bits < 3), other=0)
        q = ((w0 >> shift) & ((1 << lo_bits) - 1)) | ((w1 << lo_bits) & 7)
    return q


@triton.jit
def _code(w0, w1, w2, BIT: tl.constexpr, BITS: tl.constexpr):
    """Code starting at static stream bit ``BIT`` of a block's words (all shifts compile-time)."""
    if BIT // 32 == 0:
        lo, hi = w0, w1
    elif BIT // 32 == 1:
        lo, hi = w1, w2
    else:
        lo, hi = w2, w2
    if BIT % 32 + BITS <= 32:
        q = (lo >> (BIT % 32)) & ((1 << BITS) - 1)
    else:  # 3-bit values 10 and 21 of a block: low bits end one word, high bits start the next
        q = ((lo >> (BIT % 32)) & ((1 << (32 - BIT % 32)) - 1)) | (
            (hi << (32 - BIT % 32)) & ((1 << BITS) - 1)
        )
    return q


@triton.jit
def _zeros(qz_ptr, g_col, offs_n, n_mask, N, BITS: tl.constexpr):
    """Zero points of groups ``g_col`` ((R, 1) or scalar) x columns ``offs_n`` -> (R, BN) or (1, BN)."""
    word, shift = _word_shift(offs_n, BITS)
    z_ptrs = qz_ptr + g_col * (N * BITS // 32) + word[None, :]
    return _extract(z_ptrs, 1, shift[None, :], n_mask[None, :], BITS) + 1  # v1 stores zero - 1


@triton.jit
def _scales(s_ptr, g_col, offs_n, n_mask, N):
    """fp32 scales of groups ``g_col`` x columns ``offs_n``."""
    return tl.load(s_ptr + g_col * N + offs_n[None, :], mask=n_mask[None, :], other=0.0).to(
        tl.float32
    )


@triton.jit
def _group_col(g_ptr, k_idx, k_mask, G_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """Group of each input row ``k_idx`` (R,) -> (R, 1): gathered via g_idx or ``k // GROUP_SIZE``."""
    if G_MODE == 0:
        g = tl.load(g_ptr + k_idx, mask=k_mask, other=0)
    else:
        g = tl.where(k_mask, k_idx // GROUP_SIZE, 0)  # rows past K would index a missing group
    return g[:, None]


@triton.jit
def _dequant_rows(
    q,
    k_idx,
    k_mask,
    g_ptr,
    s_ptr,
    qz_ptr,
    offs_n,
    n_mask,
    N,
    BITS: tl.constexpr,
    G_MODE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
):
    """fp32 ``scale * (q - zero)`` for codes ``q`` (R, BN) of input rows ``k_idx`` (R,)."""
    g = _group_col(g_ptr, k_idx, k_mask, G_MODE, GROUP_SIZE)  # (R, 1)
    z = _zeros(qz_ptr, g, offs_n, n_mask, N, BITS)  # (R, BN)
    return (q - z).to(tl.float32) * _scales(s_ptr, g, offs_n, n_mask, N)


@triton.jit
def _dot(x, w, DOT_FP32: tl.constexpr):
    """``x (BM, BK) @ w (BK, BN)`` on tensor cores, fp32 result."""
    if DOT_FP32:  # fp32 inputs, and the interpreter (whose bf16 dot is wrong)
        out = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(x, w.to(x.dtype))
    return out


@triton.jit
def _fma(x, w):
    """``x (BM, KB) @ w (KB, BN)`` as broadcast multiply-sum: tiny M, no tensor-core padding."""
    return tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _tile_step(
    acc,
    kt,
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    offs_m,
    m_mask,
    offs_n,
    n_mask,
    N,
    K,
    stride_xm,
    BITS: tl.constexpr,
    G_MODE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``tl.dot`` path (BLOCK_M >= 16): unpack a (BK, BN) code tile, dequantize, one dot."""
    offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
    k_mask = offs_k < K
    x = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
        mask=m_mask[:, None] & k_mask[None, :],
        other=0.0,
    )  # (BM, BK)
    word, shift = _word_shift(offs_k, BITS)
    q = _extract(
        qw_ptr + word[:, None] * N + offs_n[None, :],
        N,
        shift[:, None],
        k_mask[:, None] & n_mask[None, :],
        BITS,
    )  # (BK, BN)
    if G_MODE == 1 and GROUP_SIZE % BLOCK_K == 0:  # tile inside one group: scale after the dot
        g = kt * BLOCK_K // GROUP_SIZE
        z = _zeros(qz_ptr, g, offs_n, n_mask, N, BITS)  # (1, BN)
        acc += _dot(x, q - z, DOT_FP32) * _scales(s_ptr, g, offs_n, n_mask, N)
    else:
        w = _dequant_rows(
            q, offs_k, k_mask, g_ptr, s_ptr, qz_ptr, offs_n, n_mask, N, BITS, G_MODE, GROUP_SIZE
        )
        acc += _dot(x, w, DOT_FP32)
    return acc


@triton.jit
def _packed_step(
    acc,
    kt,
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    offs_m,
    m_mask,
    offs_n,
    n_mask,
    N,
    K,
    stride_xm,
    BITS: tl.constexpr,
    VALS: tl.constexpr,
    WORDS: tl.constexpr,
    G_MODE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """FMA path (BLOCK_M < 16, decode): load each packed word once, static loop over positions.

    Position ``j`` of the ``KB`` blocks in this tile is the (KB, BN) slice of rows
    ``block * VALS + j``; it meets the matching strided (BM, KB) slice of ``x``.
    """
    KB: tl.constexpr = BLOCK_K // VALS
    blk = kt * KB + tl.arange(0, KB)  # (KB,) packed blocks of this K-tile
    b_mask = blk < K // VALS
    w_mask = b_mask[:, None] & n_mask[None, :]
    w_ptrs = qw_ptr + (blk * WORDS)[:, None] * N + offs_n[None, :]  # (KB, BN)
    w0 = tl.load(w_ptrs, mask=w_mask, other=0)
    if WORDS == 3:
        w1 = tl.load(w_ptrs + N, mask=w_mask, other=0)
        w2 = tl.load(w_ptrs + 2 * N, mask=w_mask, other=0)
    else:
        w1, w2 = w0, w0
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (blk * VALS)[None, :]  # (BM, KB) at j = 0
    x_mask = m_mask[:, None] & b_mask[None, :]
    if G_MODE == 1 and GROUP_SIZE % BLOCK_K == 0:  # tile inside one group: scale after the sum
        g = kt * BLOCK_K // GROUP_SIZE
        z = _zeros(qz_ptr, g, offs_n, n_mask, N, BITS)  # (1, BN)
        part = tl.zeros(acc.shape, dtype=tl.float32)
        for j in tl.static_range(VALS):
            xj = tl.load(x_ptrs + j, mask=x_mask, other=0.0)
            part += _fma(xj, _code(w0, w1, w2, j * BITS, BITS) - z)
        acc += part * _scales(s_ptr, g, offs_n, n_mask, N)
    else:
        for j in tl.static_range(VALS):
            q = _code(w0, w1, w2, j * BITS, BITS)  # (KB, BN)
            w = _dequant_rows(
                q,
                blk * VALS + j,
                b_mask,
                g_ptr,
                s_ptr,
                qz_ptr,
                offs_n,
                n_mask,
                N,
                BITS,
                G_MODE,
                GROUP_SIZE,
            )
            acc += _fma(tl.load(x_ptrs + j, mask=x_mask, other=0.0), w)
    return acc


@triton.jit
def _qmm_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    M_BUCKET,
    BITS: tl.constexpr,
    VALS: tl.constexpr,
    WORDS: tl.constexpr,
    G_MODE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile over the K-tiles ``pid_k, pid_k + SPLIT_K, ...``."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row-tiles share each weight column-tile while it is in L2
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * num_pid_n)) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        if BLOCK_M >= 16:
            acc = _tile_step(
                acc,
                kt,
                x_ptr,
                qw_ptr,
                qz_ptr,
                s_ptr,
                g_ptr,
                offs_m,
                m_mask,
                offs_n,
                n_mask,
                N,
                K,
                stride_xm,
                BITS,
                G_MODE,
                GROUP_SIZE,
                DOT_FP32,
                BLOCK_K,
            )
        else:
            acc = _packed_step(
                acc,
                kt,
                x_ptr,
                qw_ptr,
                qz_ptr,
                s_ptr,
                g_ptr,
                offs_m,
                m_mask,
                offs_n,
                n_mask,
                N,
                K,
                stride_xm,
                BITS,
                VALS,
                WORDS,
                G_MODE,
                GROUP_SIZE,
                BLOCK_K,
            )

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@triton.jit
def _dequant_kernel(
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    out_ptr,
    N,
    K,
    BITS: tl.constexpr,
    G_MODE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Write the dense ``(K, N)`` weight in ``out``'s dtype (for the cuBLAS path at large M)."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    k_mask, n_mask = offs_k < K, offs_n < N
    mask = k_mask[:, None] & n_mask[None, :]
    word, shift = _word_shift(offs_k, BITS)
    q = _extract(
        qw_ptr + word[:, None] * N + offs_n[None, :], N, shift[:, None], mask, BITS
    )  # (BK, BN)
    w = _dequant_rows(
        q, offs_k, k_mask, g_ptr, s_ptr, qz_ptr, offs_n, n_mask, N, BITS, G_MODE, GROUP_SIZE
    )
    tl.store(
        out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask
    )


# --------------------------------------------------------------------------- host code


def validate(x2d: torch.Tensor, w: PackedWeight) -> None:
    """Raise ``ValueError`` naming the offending shape/dtype before anything is launched."""
    vals, words = pack_geometry(w.bits)
    k, n = w.in_features, w.out_features
    if x2d.dim() != 2 or x2d.shape[1] != k:
        raise ValueError(f"x must be (M, {k}) for this layer, got {tuple(x2d.shape)}")
    if x2d.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x dtype {x2d.dtype} unsupported: use float16, bfloat16 or float32")
    if k % vals:
        raise ValueError(f"in_features={k} is not a multiple of {vals} ({w.bits}-bit packing)")
    if n % (vals if w.bits == 3 else 32 // w.bits):
        raise ValueError(
            f"out_features={n} is not a multiple of {32 // w.bits if w.bits == 4 else 32} "
            f"({w.bits}-bit qzeros packing)"
        )
    groups = w.scales.shape[0]
    expected = {
        "qweight": (k // vals * words, n),
        "qzeros": (groups, n * w.bits // 32),
        "scales": (groups, n),
        "g_idx": (k,),
    }
    for name, shape in expected.items():
        if tuple(getattr(w, name).shape) != shape:
            raise ValueError(f"{name} has shape {tuple(getattr(w, name).shape)}, expected {shape}")
    if k * n >= 2**31 or x2d.shape[0] * max(k, n) >= 2**31:
        raise ValueError(
            f"shape M={x2d.shape[0]}, K={k}, N={n} overflows the kernel's int32 offsets"
        )


def check_config(cfg: KernelConfig, bits: int) -> None:
    """Tiles are powers of two; ``tl.dot`` tiles (block_m >= 16) need 16+; FMA tiles whole blocks."""
    vals, _ = pack_geometry(bits)
    sizes = {
        "block_m": cfg.block_m,
        "block_n": cfg.block_n,
        "block_k": cfg.block_k,
        "split_k": cfg.split_k,
    }
    for name, size in sizes.items():
        if size < 1 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two")
    if cfg.block_m >= 16 and (cfg.block_k < 16 or cfg.block_n < 16):
        raise ValueError(
            f"block_m={cfg.block_m} uses tl.dot: needs block_k >= 16 and block_n >= 16"
        )
    if cfg.block_m < 16 and (cfg.block_k % vals or cfg.block_k // vals < 2):
        raise ValueError(
            f"block_k={cfg.block_k} must hold >= 2 packed blocks of {vals} ({bits}-bit)"
        )


def interpreter_config(m: int, n: int, k: int, bits: int) -> KernelConfig:
    """Few, large tiles: the interpreter's cost grows with the number of tiles, not their size."""
    vals, _ = pack_geometry(bits)
    block_m = 1 if m == 1 else 4 if m <= 4 else 16 if m <= 16 else 64
    block_n = min(triton.next_power_of_2(n), 256)
    cap = 128 if block_m >= 16 else 16 * vals
    block_k = max(min(triton.next_power_of_2(k), cap), 16 if block_m >= 16 else 2 * vals)
    return KernelConfig(block_m, block_n, block_k)


def m_bucket(m: int) -> str:
    """Autotune bucket: decode GEMV, tiny and small batches, medium, large (prefill-ish)."""
    if m == 1:
        return "gemv"
    if m <= 4:
        return "tiny"
    if m <= 16:
        return "small"
    return "medium" if m <= 64 else "large"


def bucket_configs(bucket: str, bits: int) -> list[KernelConfig]:
    """Candidate configs per M bucket; split-K where the grid would not fill the GPU.

    FMA tiles (block_m < 16) read each packed word once and suit decode; tl.dot tiles pay
    tensor-core padding but win as M grows. Check shared memory after editing with
    ``benchmarks/kernel.py --compile-check 90`` (ahead-of-time compile, no GPU needed).
    """
    vals, _ = pack_geometry(bits)
    if bucket == "gemv":
        return [
            KernelConfig(1, bn, kb * vals, sk, 4, 2)
            for bn in (64, 128, 256)
            for kb in (4, 8)
            for sk in (1, 4)
        ]
    if bucket == "tiny":
        return [KernelConfig(4, bn, 4 * vals, sk, 4, 2) for bn in (64, 128) for sk in (1, 4)] + [
            KernelConfig(16, bn, 64, sk, 4, 2) for bn in (64, 128) for sk in (1, 4)
        ]
    if bucket == "small":
        return [
            KernelConfig(16, bn, bk, sk, 4, st)
            for bn in (64, 128)
            for bk in (64, 128)
            for sk in (1, 4)
            for st in (2, 3)
        ]
    if bucket == "medium":
        return [
            KernelConfig(bm, bn, 64, sk, 4, 3)
            for bm in (32, 64)
            for bn in (64, 128)
            for sk in (1, 2)
        ]
    return [
        KernelConfig(bm, bn, bk, 1, warps, 3)
        for bm, bn, bk, warps in (
            (64, 128, 64, 4),
            (128, 128, 64, 8),
            (128, 256, 64, 8),
            (64, 256, 32, 4),
            (128, 64, 64, 4),
            (128, 128, 32, 4),
        )
    ]


def _uses_split_k(bucket: str, bits: int) -> bool:
    return any(cfg.split_k > 1 for cfg in bucket_configs(bucket, bits))


@functools.cache
def _autotuned(bucket: str, bits: int):
    """``@triton.autotune`` over the bucket's configs (one tuner per bucket: M-bucketed configs)."""
    configs = [
        triton.Config(
            {
                "BLOCK_M": c.block_m,
                "BLOCK_N": c.block_n,
                "BLOCK_K": c.block_k,
                "SPLIT_K": c.split_k,
            },
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
        for c in bucket_configs(bucket, bits)
    ]
    reset = ["out_ptr"] if _uses_split_k(bucket, bits) else None
    tuner = triton.autotune(
        configs=configs, key=["M_BUCKET", "N", "K", "G_MODE", "GROUP_SIZE"], reset_to_zero=reset
    )
    return tuner(_qmm_kernel)


def _launch(
    x2d: torch.Tensor, w: PackedWeight, out: torch.Tensor, cfg: KernelConfig | None
) -> None:
    """Run ``_qmm_kernel`` with ``cfg``, or autotuned when ``cfg`` is None."""
    m, k = x2d.shape
    n = w.out_features
    vals, words = pack_geometry(w.bits)
    args = (
        x2d,
        w.qweight,
        w.qzeros,
        w.scales,
        w.g_idx,
        out,
        m,
        n,
        k,
        x2d.stride(0),
        out.stride(0),
        triton.next_power_of_2(m),
    )
    meta = dict(
        BITS=w.bits,
        VALS=vals,
        WORDS=words,
        G_MODE=w.g_mode,
        GROUP_SIZE=max(w.group_size, 1),
        DOT_FP32=INTERPRET or x2d.dtype == torch.float32,
        GROUP_M=8,
    )

    def grid(opt: dict) -> tuple[int, int]:
        return (triton.cdiv(m, opt["BLOCK_M"]) * triton.cdiv(n, opt["BLOCK_N"]), opt["SPLIT_K"])

    if cfg is None:
        _autotuned(m_bucket(m), w.bits)[grid](*args, **meta)
        return
    check_config(cfg, w.bits)
    tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k)
    launch_opts = {} if INTERPRET else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _qmm_kernel[grid(tiles)](*args, **meta, **tiles, **launch_opts)


def fused_matmul(
    x2d: torch.Tensor, w: PackedWeight, config: KernelConfig | None = None
) -> torch.Tensor:
    """``x2d (M, K) @ dequant(W) (K, N)`` in one kernel; ``config`` None = autotune (GPU only)."""
    validate(x2d, w)
    m, n = x2d.shape[0], w.out_features
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    if config is None and INTERPRET:
        config = interpreter_config(m, n, w.in_features, w.bits)
    split = config.split_k > 1 if config is not None else _uses_split_k(m_bucket(m), w.bits)
    out = (
        torch.zeros(m, n, device=x2d.device, dtype=torch.float32)
        if split
        else torch.empty(m, n, device=x2d.device, dtype=x2d.dtype)
    )  # (M, N)
    if m:
        _launch(x2d, w, out, config)
    return out.to(x2d.dtype)


def dequantize(w: PackedWeight, dtype: torch.dtype, block_n: int = 128) -> torch.Tensor:
    """Dense ``(K, N)`` weight in ``dtype`` (one pass over the packed tensors, no temporaries)."""
    pack_geometry(w.bits)  # raises for unsupported bits
    k, n = w.in_features, w.out_features
    out = torch.empty(k, n, device=w.qweight.device, dtype=dtype)  # (K, N)
    block_k = 64
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](
        w.qweight,
        w.qzeros,
        w.scales,
        w.g_idx,
        out,
        n,
        k,
        BITS=w.bits,
        G_MODE=w.g_mode,
        GROUP_SIZE=max(w.group_size, 1),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out


def quant_matmul(
    x2d: torch.Tensor,
    w: PackedWeight,
    config: KernelConfig | None = None,
    dense_min_m: int = DENSE_MIN_M,
) -> torch.Tensor:
    """Fused kernel up to ``dense_min_m`` rows; above, dequantize once and use cuBLAS (prefill)."""
    if config is None and x2d.shape[0] > dense_min_m:
        validate(x2d, w)
        return x2d @ dequantize(w, x2d.dtype)  # (M, N)
    return fused_matmul(x2d, w, config)


def compile_for(
    arch: int, bits: int, g_mode: int, group_size: int, cfg: KernelConfig, x_dtype: str = "fp16"
):
    """Compile ``_qmm_kernel`` ahead of time for ``sm_<arch>`` (no GPU needed).

    Why: this machine may have no GPU, yet a config that does not compile or needs more shared
    memory than the GPU has would only fail at autotune time there. Returns Triton's compiled
    kernel (``.metadata.shared`` is its shared memory in bytes).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    vals, words = pack_geometry(bits)
    out_dtype = "fp32" if cfg.split_k > 1 else x_dtype
    ptrs = dict(
        x_ptr=x_dtype, qw_ptr="i32", qz_ptr="i32", s_ptr="fp16", g_ptr="i32", out_ptr=out_dtype
    )
    signature = {name: f"*{dtype}" for name, dtype in ptrs.items()}
    signature.update(dict.fromkeys(("M", "N", "K", "stride_xm", "stride_om", "M_BUCKET"), "i32"))
    constexprs = dict(
        BITS=bits,
        VALS=vals,
        WORDS=words,
        G_MODE=g_mode,
        GROUP_SIZE=group_size,
        DOT_FP32=x_dtype == "fp32",
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        GROUP_M=8,
    )
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fn=_qmm_kernel, signature=signature, constexprs=constexprs)
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
