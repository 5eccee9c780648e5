"""Triton kernels over the serving layout (:mod:`.repack`), one per M regime, and their launchers.

Imported lazily (only once a Triton route is chosen); :mod:`.routes` says which kernel and
launch parameters serve a call, and :mod:`.dispatch` picks them.

* ``gemv`` (M <= 4, decode): CUDA-core multiply-add, GemLite's "reverse split-K" shape: many
  small programs, each a ``BLOCK_N`` column strip times ``STEPS * BLOCK_KB`` packed blocks of
  rows, scales and zero points loaded once per group, ``y += s * sum(x * (q - zero))``, and
  partial sums meeting by a relaxed atomic add. ``CONVERT`` 1 turns a code into fp32 without
  the int->float unit: ``(w & (15 << 4j)) | 0x4B000000`` read as fp32 is
  ``2**23 + q * 16**j``, and one fma (times ``16**-j``, minus ``2**23 * 16**-j + zero``)
  leaves ``q - zero`` exactly, so a weight costs a lop3 and two fmas.
  ``CONVERT`` 2 reads the masked nibble as an fp32 denormal instead (a mask, no or);
  ``CONVERT`` 3 multiplies that denormal straight into the sum (``x`` pre-scaled by
  ``2**(100 - 4j)``, the zero point applied per group as ``zero * sum(x)``): a weight costs a
  mask and one fma.
* ``mm`` (M >= 5): ``tl.dot`` over ``(BLOCK_K, BLOCK_N)`` code tiles converted exactly to the
  activation dtype (small integers), scales applied per K-tile after the dot (a K-tile never
  crosses a group), optional split-K over a runtime ``SPLIT_K`` (atomics into fp32) and
  ``SWAP_AB`` (``out^T = W^T x^T``: the weight becomes the MMA's M side, so small M still gets
  wide MMA tiles). ``UNPACK`` 0 reads one word per row (8x from L1, as GemLite does); 1 loads
  each word once and builds the tile from 8 shifted copies. ``CONVERT`` 2 is the CUDA-only
  ``lop3`` + 0x6400 (fp16) / 0x4300 (bf16) magic-number conversion of a whole word to 8
  halves by inline PTX; ``CONVERT`` 1 is the same arithmetic in plain Triton (what the
  interpreter tests check).
* ``dequant`` (large M): write the dense ``(K, N)`` weight once, then cuBLAS.

Numerics: every kernel accumulates in fp32 and applies scales and zero points in fp32;
:func:`slmcompress.kernels.repack.serving_matmul_reference` is their common reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from slmcompress.kernels.repack import ServingWeight, vals_words

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAGIC_F32 = 0x4B000000  # fp32 2**23: OR a code into its low mantissa bits
TWO_23 = 8388608.0


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _x_cols(perm_ptr, k_idx, k_mask, PERM: tl.constexpr):
    """Input channel of each serving row: ``perm[k]`` (act-order) or ``k`` itself."""
    if PERM:
        cols = tl.load(perm_ptr + k_idx, mask=k_mask, other=0)
    else:
        cols = k_idx
    return cols


@triton.jit
def _code_minus_zero(w, NIB: tl.constexpr, cz, MASK: tl.constexpr, CONVERT: tl.constexpr):
    """fp32 ``q - zero`` for nibble ``NIB`` of words ``w``; ``cz`` from :func:`_zero_consts`.

    CONVERT 1: ``(w & (MASK << 4j)) | 0x4B000000`` read as fp32 is ``2**23 + q * 16**j``
    (``j = NIB % 4``; nibbles 4..7 are first shifted down 16 bits), so one fma by ``16**-j``
    minus ``cz = 2**23 * 16**-j + zero`` gives ``q - zero`` exactly: no int->float unit.
    CONVERT 2: ``w & (MASK << 4j)`` read as fp32 is the denormal ``q * 2**(4j - 149)``; one
    fma by ``2**(126 - 4j)`` minus ``cz = zero * 2**-23`` gives ``(q - zero) * 2**-23``
    exactly (``x`` comes pre-scaled by ``2**23``): a mask, not a mask and an or. Exact only
    where fp32 denormals are not flushed (Triton emits no ``.ftz``); the tuner's correctness
    check guards it.
    CONVERT 3: the denormal itself, ``q * 2**(4j - 149)`` (``x`` is pre-scaled by
    ``2**(100 - 4j)`` and the zero point is applied per group through ``sum(x)``): a mask.
    CONVERT 0: the plain conversion minus ``cz = zero``.
    """
    if CONVERT == 3:
        if NIB < 4:
            src = w
        else:
            src = w >> 16
        q = (src & (MASK << (4 * (NIB % 4)))).to(tl.float32, bitcast=True)
    elif CONVERT == 2:
        if NIB < 4:
            src = w
        else:
            src = w >> 16
        bits = src & (MASK << (4 * (NIB % 4)))
        q = bits.to(tl.float32, bitcast=True) * (2.0 ** (126 - 4 * (NIB % 4))) - cz
    elif CONVERT == 1:
        if NIB < 4:
            src = w
        else:
            src = w >> 16
        bits = (src & (MASK << (4 * (NIB % 4)))) | 0x4B000000
        q = bits.to(tl.float32, bitcast=True) * (1.0 / (16 ** (NIB % 4))) - cz
    else:
        q = ((w >> (4 * NIB)) & MASK).to(tl.float32) - cz
    return q


@triton.jit
def _zero_consts(z, J: tl.constexpr, CONVERT: tl.constexpr):
    """The ``cz`` of nibble position ``J`` (0..3) for zero points ``z`` (see _code_minus_zero)."""
    if CONVERT == 1:
        cz = z + 8388608.0 / (16**J)
    elif CONVERT == 2:
        cz = z * (1.0 / 8388608.0)
    else:
        cz = z
    return cz


@triton.jit
def _nib3_top(w0, w1, w2):
    """The word whose nibble ``i`` holds 3-bit code ``24 + i`` (spare top bits of nib3 words)."""
    return ((w0 >> 3) & 0x11111111) | ((w1 >> 2) & 0x22222222) | ((w2 >> 1) & 0x44444444)


@triton.jit
def _gemv_word(
    acc,
    xs,
    w,
    row3,
    b3,
    c0,
    c1,
    c2,
    c3,
    x_ptr,
    perm_ptr,
    m3,
    mm3,
    stride_xm,
    MASK: tl.constexpr,
    PERM: tl.constexpr,
    CONVERT: tl.constexpr,
):
    """``acc (BM, KB, BN) += x[row3 + i] * (q_i - zero)`` over the 8 nibbles of ``w`` (1, KB, BN).

    Every tensor is 3D in the accumulator's layout: ``x`` is loaded as (BM, KB, 1) and
    broadcast along N in registers, which keeps the compiler from routing a 2D ``x`` through
    shared memory (with barriers) to reach that layout.
    """
    for i in tl.static_range(8):
        k3 = row3 + i  # (1, KB, 1)
        cols = _x_cols(perm_ptr, k3, b3, PERM)
        xv = tl.load(x_ptr + m3 * stride_xm + cols, mask=mm3 & b3, other=0.0).to(tl.float32)
        if CONVERT == 3:
            xs += xv  # (BM, KB, 1): the zero point's share, sum(x) * zero, comes per group
            xv = xv * (2.0 ** (100 - 4 * (i % 4)))  # products come back times 2**-49
        elif CONVERT == 2:
            xv = xv * 8388608.0  # codes come back times 2**-23
        if i % 4 == 0:
            cz = c0
        elif i % 4 == 1:
            cz = c1
        elif i % 4 == 2:
            cz = c2
        else:
            cz = c3
        acc += xv * _code_minus_zero(w, i, cz, MASK, CONVERT)  # (BM, KB, BN)
    return acc, xs


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    perm_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    BITS: tl.constexpr,
    VALS: tl.constexpr,
    WORDS: tl.constexpr,
    GROUP: tl.constexpr,
    PERM: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    STEPS: tl.constexpr,
    GSTEPS: tl.constexpr,
    CONVERT: tl.constexpr,
):
    """y[m-tile, n-strip] (+)= x @ W over ``STEPS * BLOCK_KB`` packed blocks of rows.

    The program's rows split into ``STEPS // GSTEPS`` scale groups of ``GSTEPS`` steps; each
    accumulates ``x * (q - zero)`` and is scaled once: ``y += s * sum_k(...)``.
    """
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    kb = tl.arange(0, BLOCK_KB)  # (KB,)
    n3 = offs_n[None, None, :]  # (1, 1, BN)
    m3 = offs_m[:, None, None]  # (BM, 1, 1)
    nm3, mm3 = n3 < N, m3 < M
    n_blocks = K // VALS
    MASK: tl.constexpr = (1 << BITS) - 1
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for gi in tl.static_range(STEPS // GSTEPS):
        blk0 = pid_k * (STEPS * BLOCK_KB) + gi * (GSTEPS * BLOCK_KB)
        if GROUP == 0:
            g = 0
        else:
            g = blk0 * VALS // GROUP
        meta_mask = nm3 & (n3 * 0 + blk0 < n_blocks)  # a program past K reads no scales
        s = tl.load(s_ptr + g * N + n3, mask=meta_mask, other=0.0).to(tl.float32)  # (1, 1, BN)
        z = tl.load(z_ptr + g * N + n3, mask=meta_mask, other=0.0).to(tl.float32)
        c0 = _zero_consts(z, 0, CONVERT)
        c1 = _zero_consts(z, 1, CONVERT)
        c2 = _zero_consts(z, 2, CONVERT)
        c3 = _zero_consts(z, 3, CONVERT)
        acc = tl.zeros((BLOCK_M, BLOCK_KB, BLOCK_N), dtype=tl.float32)
        xs = tl.zeros((BLOCK_M, BLOCK_KB, 1), dtype=tl.float32)
        for st in range(GSTEPS):
            blk3 = (blk0 + st * BLOCK_KB + kb)[None, :, None]  # (1, KB, 1)
            b3 = blk3 < n_blocks
            w_ptrs = w_ptr + blk3 * (WORDS * N) + n3  # (1, KB, BN)
            w_mask = b3 & nm3
            w0 = tl.load(w_ptrs, mask=w_mask, other=0)  # (1, KB, BN)
            if BITS == 4:
                acc, xs = _gemv_word(
                    acc, xs, w0, blk3 * 8, b3, c0, c1, c2, c3, x_ptr, perm_ptr, m3, mm3, stride_xm,
                    MASK, PERM, CONVERT,
                )  # fmt: skip
            else:
                w1 = tl.load(w_ptrs + N, mask=w_mask, other=0)
                w2 = tl.load(w_ptrs + 2 * N, mask=w_mask, other=0)
                w3 = _nib3_top(w0, w1, w2)
                row3 = blk3 * 32
                acc, xs = _gemv_word(
                    acc, xs, w0, row3, b3, c0, c1, c2, c3, x_ptr, perm_ptr, m3, mm3, stride_xm,
                    MASK, PERM, CONVERT,
                )  # fmt: skip
                acc, xs = _gemv_word(
                    acc, xs, w1, row3 + 8, b3, c0, c1, c2, c3, x_ptr, perm_ptr, m3, mm3, stride_xm,
                    MASK, PERM, CONVERT,
                )  # fmt: skip
                acc, xs = _gemv_word(
                    acc, xs, w2, row3 + 16, b3, c0, c1, c2, c3, x_ptr, perm_ptr, m3, mm3, stride_xm,
                    MASK, PERM, CONVERT,
                )  # fmt: skip
                acc, xs = _gemv_word(
                    acc, xs, w3, row3 + 24, b3, c0, c1, c2, c3, x_ptr, perm_ptr, m3, mm3, stride_xm,
                    MASK, PERM, CONVERT,
                )  # fmt: skip
        s2 = tl.sum(s, axis=1)  # (1, BN); a sum over a size-1 dim keeps the 3D-derived layout
        if CONVERT == 3:
            zsum = tl.sum(xs, axis=1) * tl.sum(z, axis=1)  # (BM, BN): zero * sum(x)
            y += (tl.sum(acc, axis=1) * (2.0**49) - zsum) * s2
        else:
            y += tl.sum(acc, axis=1) * s2  # (BM, BN)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------- tl.dot kernel

# lop3 lut 0xEA = (a & b) | c. Halves of one 32-bit word hold nibbles i and i + 4.
_ASM_F16 = tl.constexpr("""{
.reg .b32 s, t0, t1, t2, t3, magic, m16, c16, c64;
mov.b32 magic, 0x64006400;
mov.b32 c16, 0x2C002C00;
mov.b32 c64, 0xD400D400;
lop3.b32 t0, $8, 0x000F000F, magic, 0xEA;
lop3.b32 t1, $8, 0x00F000F0, magic, 0xEA;
shr.u32 s, $8, 8;
lop3.b32 t2, s, 0x000F000F, magic, 0xEA;
lop3.b32 t3, s, 0x00F000F0, magic, 0xEA;
sub.f16x2 t0, t0, magic;
fma.rn.f16x2 t1, t1, c16, c64;
sub.f16x2 t2, t2, magic;
fma.rn.f16x2 t3, t3, c16, c64;
mov.b32 {$0, $4}, t0;
mov.b32 {$1, $5}, t1;
mov.b32 {$2, $6}, t2;
mov.b32 {$3, $7}, t3;
}""")
# bf16 has 7 mantissa bits, so only a nibble at bit 0 of each half fits under 0x4300 (128.0)
_ASM_BF16 = tl.constexpr("""{
.reg .b32 s, t0, t1, t2, t3, magic, one, c128;
mov.b32 magic, 0x43004300;
mov.b32 one, 0x3F803F80;
mov.b32 c128, 0xC300C300;
lop3.b32 t0, $8, 0x000F000F, magic, 0xEA;
shr.u32 s, $8, 4;
lop3.b32 t1, s, 0x000F000F, magic, 0xEA;
shr.u32 s, $8, 8;
lop3.b32 t2, s, 0x000F000F, magic, 0xEA;
shr.u32 s, $8, 12;
lop3.b32 t3, s, 0x000F000F, magic, 0xEA;
fma.rn.bf16x2 t0, t0, one, c128;
fma.rn.bf16x2 t1, t1, one, c128;
fma.rn.bf16x2 t2, t2, one, c128;
fma.rn.bf16x2 t3, t3, one, c128;
mov.b32 {$0, $4}, t0;
mov.b32 {$1, $5}, t1;
mov.b32 {$2, $6}, t2;
mov.b32 {$3, $7}, t3;
}""")


@triton.jit
def _to_dtype(q, DT: tl.constexpr, CONVERT: tl.constexpr):
    """Small non-negative int codes -> exactly the same values in ``DT`` (fp16/bf16/fp32)."""
    if CONVERT == 0 or DT == tl.float32:
        out = q.to(DT)
    elif DT == tl.float16:  # 0x6400 is fp16 1024.0, whose ulp is 1
        out = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    else:  # 0x4300 is bf16 128.0, whose ulp is 1
        out = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 128.0
    return out


@triton.jit
def _join8(q0, q1, q2, q3, q4, q5, q6, q7):
    """Eight (KB, BN) slices (row ``8 kb + j`` in slice j) -> one (8 KB, BN) tile in row order."""
    t = tl.join(
        tl.join(tl.join(q0, q1), tl.join(q2, q3)), tl.join(tl.join(q4, q5), tl.join(q6, q7))
    )
    KB: tl.constexpr = q0.shape[0]
    BN: tl.constexpr = q0.shape[1]
    # t[kb, n, a, b, c] is slice a + 2b + 4c
    return tl.reshape(tl.permute(t, (0, 4, 3, 2, 1)), (KB * 8, BN))


@triton.jit
def _codes_tile(
    w_ptr,
    kt,
    K,
    offs_n,
    n_mask,
    N,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DT: tl.constexpr,
    UNPACK: tl.constexpr,
    CONVERT: tl.constexpr,
):
    """Codes of K-tile ``kt`` x columns ``offs_n`` as a (BLOCK_K, BN) tile in dtype ``DT``."""
    if UNPACK == 1:  # 4-bit: each word loaded once, 8 shifted slices joined in row order
        KB: tl.constexpr = BLOCK_K // 8
        rows = kt * KB + tl.arange(0, KB)  # (KB,) packed rows of this tile
        w = tl.load(
            w_ptr + rows[:, None] * N + offs_n[None, :],
            mask=(rows < K // 8)[:, None] & n_mask[None, :],
            other=0,
        )  # (KB, BN)
        if CONVERT == 2:
            if DT == tl.float16:
                parts = tl.inline_asm_elementwise(
                    _ASM_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w], (tl.float16,) * 8, True, 1
                )
            else:
                parts = tl.inline_asm_elementwise(
                    _ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w], (tl.bfloat16,) * 8, True, 1
                )
            tile = _join8(
                parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], parts[6], parts[7]
            )  # fmt: skip
        else:
            tile = _join8(
                _to_dtype((w >> 0) & 15, DT, CONVERT),
                _to_dtype((w >> 4) & 15, DT, CONVERT),
                _to_dtype((w >> 8) & 15, DT, CONVERT),
                _to_dtype((w >> 12) & 15, DT, CONVERT),
                _to_dtype((w >> 16) & 15, DT, CONVERT),
                _to_dtype((w >> 20) & 15, DT, CONVERT),
                _to_dtype((w >> 24) & 15, DT, CONVERT),
                _to_dtype((w >> 28) & 15, DT, CONVERT),
            )
    else:  # one word per row (re-read from L1 by the 8 or 32 rows that share it)
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
        mask = (offs_k < K)[:, None] & n_mask[None, :]
        if BITS == 4:
            w = tl.load(w_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :], mask=mask, other=0)
            q = (w >> ((offs_k % 8) * 4)[:, None]) & 15
        else:
            pos = offs_k % 32
            r, i = pos // 8, pos % 8
            base = (offs_k // 32) * 3
            w = tl.load(
                w_ptr + (base + tl.minimum(r, 2))[:, None] * N + offs_n[None, :], mask=mask, other=0
            )
            lo = (w >> (i * 4)[:, None]) & 7
            top = mask & (r == 3)[:, None]  # codes 24..31 need all three words
            w0 = tl.load(w_ptr + base[:, None] * N + offs_n[None, :], mask=top, other=0)
            w1 = tl.load(w_ptr + (base + 1)[:, None] * N + offs_n[None, :], mask=top, other=0)
            w2 = tl.load(w_ptr + (base + 2)[:, None] * N + offs_n[None, :], mask=top, other=0)
            hi = (_nib3_top(w0, w1, w2) >> (i * 4)[:, None]) & 7
            q = tl.where((r == 3)[:, None], hi, lo)
        tile = _to_dtype(q, DT, CONVERT)
    return tile


@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def _mm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    perm_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    SPLIT_K,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    PERM: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UNPACK: tl.constexpr,
    CONVERT: tl.constexpr,
    SWAP_AB: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """One output tile over K-tiles ``pid_k, pid_k + SPLIT_K, ...``; scales after each dot."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)  # grouped order: M-tiles share a weight strip in L2
    first_m = group_id * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * num_pid_n)) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    m_mask, n_mask = offs_m < M, offs_n < N
    if DOT_FP32:  # fp32 activations, and the interpreter (whose bf16 dot is wrong)
        DT: tl.constexpr = tl.float32
    else:
        DT: tl.constexpr = x_ptr.dtype.element_ty
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
        k_mask = offs_k < K
        cols = _x_cols(perm_ptr, offs_k, k_mask, PERM)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(DT)  # (BM, BK)
        q = _codes_tile(
            w_ptr, kt, K, offs_n, n_mask, N, BITS, BLOCK_K, DT, UNPACK, CONVERT
        )  # (BK, BN), exact integers
        g = 0 if GROUP == 0 else kt * BLOCK_K // GROUP  # BLOCK_K divides GROUP
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zs = -s * tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        xsum = tl.sum(x.to(tl.float32), axis=1)  # (BM,)
        if SWAP_AB:
            part = tl.dot(tl.trans(q), tl.trans(x), input_precision="ieee" if DOT_FP32 else None)
            acc += part * s[:, None] + zs[:, None] * xsum[None, :]
        else:
            part = tl.dot(x, q, input_precision="ieee" if DOT_FP32 else None)
            acc += part * s[None, :] + xsum[:, None] * zs[None, :]
    if SWAP_AB:
        out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        out_mask = m_mask[None, :] & n_mask[:, None]
    else:
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        out_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------- dequantize kernel


@triton.jit
def _dequant_store(
    w, row0, b_mask, s, zs, out_ptr, offs_n, n_mask, N, MASK: tl.constexpr, CONVERT: tl.constexpr
):
    """Store the 8 nibble rows ``row0 + i`` of words ``w`` (KB, BN) as ``s * q + zs``."""
    for i in tl.static_range(8):
        q = _code_minus_zero(w, i, _zero_consts(0.0, i % 4, CONVERT), MASK, CONVERT)  # exact q
        val = q * s[None, :] + zs[None, :]
        tl.store(
            out_ptr + (row0 + i)[:, None] * N + offs_n[None, :],
            val.to(out_ptr.dtype.element_ty),
            mask=b_mask[:, None] & n_mask[None, :],
        )


@triton.jit
def _dequant_kernel(
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    K,
    BITS: tl.constexpr,
    VALS: tl.constexpr,
    WORDS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    CONVERT: tl.constexpr,
):
    """Dense ``(K, N)`` weight in serving row order, in ``out``'s dtype (for cuBLAS at large M)."""
    blk = tl.program_id(0) * BLOCK_KB + tl.arange(0, BLOCK_KB)  # (KB,)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    b_mask, n_mask = blk < K // VALS, offs_n < N
    g = 0 if GROUP == 0 else tl.program_id(0) * BLOCK_KB * VALS // GROUP  # tile in one group
    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    zs = -s * tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    w_ptrs = w_ptr + (blk * WORDS)[:, None] * N + offs_n[None, :]
    w_mask = b_mask[:, None] & n_mask[None, :]
    w0 = tl.load(w_ptrs, mask=w_mask, other=0)
    if BITS == 4:
        _dequant_store(w0, blk * 8, b_mask, s, zs, out_ptr, offs_n, n_mask, N, 15, CONVERT)
    else:
        w1 = tl.load(w_ptrs + N, mask=w_mask, other=0)
        w2 = tl.load(w_ptrs + 2 * N, mask=w_mask, other=0)
        base = blk * 32
        _dequant_store(w0, base, b_mask, s, zs, out_ptr, offs_n, n_mask, N, 7, CONVERT)
        _dequant_store(w1, base + 8, b_mask, s, zs, out_ptr, offs_n, n_mask, N, 7, CONVERT)
        _dequant_store(w2, base + 16, b_mask, s, zs, out_ptr, offs_n, n_mask, N, 7, CONVERT)
        w3 = _nib3_top(w0, w1, w2)
        _dequant_store(w3, base + 24, b_mask, s, zs, out_ptr, offs_n, n_mask, N, 7, CONVERT)


# --------------------------------------------------------------------------- host code


def check_shapes(x2d: torch.Tensor, w: ServingWeight) -> None:
    """Raise ``ValueError`` naming the mismatch before anything is launched."""
    k, n = w.in_features, w.out_features
    if x2d.dim() != 2 or x2d.shape[1] != k:
        raise ValueError(f"x must be (M, {k}) for this layer, got {tuple(x2d.shape)}")
    if x2d.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x dtype {x2d.dtype} unsupported: use float16, bfloat16 or float32")
    if x2d.device != w.device:
        raise ValueError(f"x is on {x2d.device} but the weight is on {w.device}")
    if k * n >= 2**31 or x2d.shape[0] * max(k, n) >= 2**31:
        raise ValueError(f"M={x2d.shape[0]}, K={k}, N={n} overflows the kernels' int32 offsets")


def _out(m: int, n: int, like: torch.Tensor, atomic: bool, acc32: bool) -> torch.Tensor:
    """Output buffer: zeroed for atomics (fp32 when partial sums should not round), else empty."""
    dtype = torch.float32 if (atomic and acc32) else like.dtype
    make = torch.zeros if atomic else torch.empty
    return make(m, n, device=like.device, dtype=dtype)  # (M, N)


def _perm(w: ServingWeight) -> torch.Tensor:
    return w.perm if w.perm is not None else w.words  # any int32 pointer: never read


def _launch_opts(p: dict) -> dict:
    return {} if INTERPRET else dict(num_warps=p["num_warps"], num_stages=p["num_stages"])


def gemv_meta(w: ServingWeight, p: dict) -> dict:
    """Compile-time arguments of ``_gemv_kernel`` for weight ``w`` and parameters ``p``."""
    vals, words = vals_words(w.bits)
    rows = p["block_kb"] * vals
    gsteps = p["steps"] if w.group == 0 else min(p["steps"], w.group // rows)
    return dict(
        BITS=w.bits, VALS=vals, WORDS=words, GROUP=w.group, PERM=w.perm is not None,
        BLOCK_M=p["block_m"], BLOCK_N=p["block_n"], BLOCK_KB=p["block_kb"], STEPS=p["steps"],
        GSTEPS=gsteps, CONVERT=p["convert"],
    )  # fmt: skip


def gemv(x2d: torch.Tensor, w: ServingWeight, p: dict) -> torch.Tensor:
    """``x2d (M, K) @ W -> (M, N)`` with the CUDA-core split-K kernel (decode, M <= 4)."""
    check_shapes(x2d, w)
    m, n, k = x2d.shape[0], w.out_features, w.in_features
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    vals, _ = vals_words(w.bits)
    span = p["block_kb"] * vals * p["steps"]
    grid = (triton.cdiv(n, p["block_n"]), triton.cdiv(k, span), triton.cdiv(m, p["block_m"]))
    atomic = grid[1] > 1
    out = _out(m, n, x2d, atomic, p["acc32"])
    if m:
        _gemv_kernel[grid](
            x2d, w.words, w.scales, w.zeros, _perm(w), out, m, n, k, x2d.stride(0), out.stride(0),
            ATOMIC=atomic, **gemv_meta(w, p), **_launch_opts(p),
        )  # fmt: skip
    return out.to(x2d.dtype)


def mm_meta(w: ServingWeight, p: dict, x_dtype: torch.dtype) -> dict:
    """Compile-time arguments of ``_mm_kernel`` (``ATOMIC`` aside)."""
    return dict(
        BITS=w.bits, GROUP=w.group, PERM=w.perm is not None, BLOCK_M=p["block_m"],
        BLOCK_N=p["block_n"], BLOCK_K=p["block_k"], GROUP_M=p.get("group_m", 8),
        UNPACK=p["unpack"], CONVERT=p["convert"], SWAP_AB=bool(p["swap_ab"]),
        DOT_FP32=INTERPRET or x_dtype == torch.float32,
    )  # fmt: skip


def mm(x2d: torch.Tensor, w: ServingWeight, p: dict) -> torch.Tensor:
    """``x2d (M, K) @ W -> (M, N)`` with the ``tl.dot`` kernel (split-K when ``split_k`` > 1)."""
    check_shapes(x2d, w)
    if p["convert"] == 2 and (INTERPRET or x2d.dtype == torch.float32):
        raise ValueError("convert=2 (inline PTX) needs a CUDA GPU and fp16/bf16 activations")
    m, n, k = x2d.shape[0], w.out_features, w.in_features
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    split = max(1, min(p["split_k"], triton.cdiv(k, p["block_k"])))
    grid = (triton.cdiv(m, p["block_m"]) * triton.cdiv(n, p["block_n"]), split)
    out = _out(m, n, x2d, split > 1, True)
    if m:
        _mm_kernel[grid](
            x2d, w.words, w.scales, w.zeros, _perm(w), out, m, n, k, x2d.stride(0), out.stride(0),
            split, ATOMIC=split > 1, **mm_meta(w, p, x2d.dtype), **_launch_opts(p),
        )  # fmt: skip
    return out.to(x2d.dtype)


def dequant_meta(w: ServingWeight, p: dict) -> dict:
    vals, words = vals_words(w.bits)
    return dict(
        BITS=w.bits, VALS=vals, WORDS=words, GROUP=w.group, BLOCK_N=p["block_n"],
        BLOCK_KB=p["block_kb"], CONVERT=p["convert"],
    )  # fmt: skip


def dequantize(w: ServingWeight, dtype: torch.dtype, p: dict) -> torch.Tensor:
    """Dense ``(K, N)`` weight in serving row order and ``dtype`` (one pass, no temporaries)."""
    vals, _ = vals_words(w.bits)
    k, n = w.in_features, w.out_features
    out = torch.empty(k, n, device=w.device, dtype=dtype)  # (K, N)
    grid = (triton.cdiv(k // vals, p["block_kb"]), triton.cdiv(n, p["block_n"]))
    _dequant_kernel[grid](
        w.words, w.scales, w.zeros, out, n, k, **dequant_meta(w, p), **_launch_opts(p)
    )
    return out


def dequant_mm(x2d: torch.Tensor, w: ServingWeight, p: dict) -> torch.Tensor:
    """Large M: dequantize once, then cuBLAS (``x[:, perm] @ W``)."""
    check_shapes(x2d, w)
    x = x2d if w.perm is None else x2d.index_select(1, w.perm)
    return x @ dequantize(w, x2d.dtype, p)  # (M, N)


# --------------------------------------------------------------------------- ahead of time

_TL_NAMES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
_ALIGNED_INTS = ("N", "K", "stride_xm", "stride_om")  # multiples of 16 for the target shapes


def compile_choice(
    route: str, p: dict, bits: int, group: int, perm: bool, x_dtype: str = "fp16", arch: int = 90
):
    """Compile a route's kernel for ``sm_<arch>`` without a GPU; returns Triton's compiled kernel.

    Specialised as the JIT specialises a launch on aligned tensors with ``N``, ``K`` and the
    strides multiples of 16 (``M`` and ``split_k`` are never specialised), so the registers,
    spills and shared memory read off it are those the GPU will run.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fake = ServingWeight(None, None, None, True if perm else None, bits, 0, 0, group)
    if route == "gemv":
        kernel, meta = _gemv_kernel, gemv_meta(fake, p)
        meta["ATOMIC"] = True
        out = "fp32" if p["acc32"] else x_dtype
    elif route == "mm":
        kernel = _mm_kernel
        meta = mm_meta(fake, p, torch.float32 if x_dtype == "fp32" else torch.float16)
        meta.update(DOT_FP32=x_dtype == "fp32", ATOMIC=p["split_k"] > 1)
        out = "fp32" if p["split_k"] > 1 else x_dtype
    elif route == "dequant":
        kernel, meta, out = _dequant_kernel, dequant_meta(fake, p), x_dtype
    else:
        raise ValueError(f"route {route!r} has no Triton kernel")
    ptrs = dict(x_ptr=x_dtype, w_ptr="i32", s_ptr="fp16", z_ptr="fp16", perm_ptr="i32")
    ptrs["out_ptr"] = out
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in meta:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + _TL_NAMES.get(ptrs[name], ptrs[name])
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in _ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=meta, attrs=attrs)
    options = dict(num_warps=p["num_warps"], num_stages=p["num_stages"])
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def warmup(
    route: str, p: dict, bits: int, group: int, perm: bool, x_dtype: torch.dtype, m: int, n: int,
    k: int,
):  # fmt: skip
    """Compile (without launching) exactly what serving ``m x k @ k x n`` with ``p`` launches.

    Argument types and values mirror :func:`gemv`, :func:`mm` and :func:`dequantize`, so the
    binary lands in Triton's on-disk cache under the key the real launch looks up: the tuning
    sweep compiles all candidates in parallel processes, then times them in one. Needs a GPU.
    Returns Triton's compiled kernel.
    """
    fake = ServingWeight(None, None, None, True if perm else None, bits, k, n, group)
    vals, _ = vals_words(bits)
    i32, f16 = torch.int32, torch.float16
    if route == "gemv":
        atomic = triton.cdiv(k, p["block_kb"] * vals * p["steps"]) > 1
        out = torch.float32 if atomic and p["acc32"] else x_dtype
        args = (x_dtype, i32, f16, f16, i32, out, m, n, k, k, n)
        meta = dict(ATOMIC=atomic, **gemv_meta(fake, p))
        return _gemv_kernel.warmup(*args, grid=(1,), **meta, **_launch_opts(p))
    if route == "mm":
        split = max(1, min(p["split_k"], triton.cdiv(k, p["block_k"])))
        out = torch.float32 if split > 1 else x_dtype
        args = (x_dtype, i32, f16, f16, i32, out, m, n, k, k, n, split)
        meta = dict(ATOMIC=split > 1, **mm_meta(fake, p, x_dtype))
        return _mm_kernel.warmup(*args, grid=(1,), **meta, **_launch_opts(p))
    if route == "dequant":
        args = (i32, f16, f16, x_dtype, n, k)
        return _dequant_kernel.warmup(*args, grid=(1,), **dequant_meta(fake, p), **_launch_opts(p))
    raise ValueError(f"route {route!r} has no Triton kernel")


def compile_identity(
    route: str, p: dict, bits: int, group: int, perm: bool, m: int, n: int, k: int
):
    """What decides whether two launches share one compiled kernel (``split_k``, M, N, K do
    not, beyond N/K divisibility by 16 and whether the launch uses atomics)."""
    vals, _ = vals_words(bits)
    if route == "gemv":
        atomic = triton.cdiv(k, p["block_kb"] * vals * p["steps"]) > 1
        fixed = {n: v for n, v in p.items()}
    elif route == "mm":
        atomic = max(1, min(p["split_k"], triton.cdiv(k, p["block_k"]))) > 1
        fixed = {n: v for n, v in p.items() if n != "split_k"}
    else:
        atomic, fixed = False, dict(p)
    return (
        route,
        bits,
        group,
        perm,
        atomic,
        n % 16 == 0,
        k % 16 == 0,
        tuple(sorted(fixed.items())),
    )
