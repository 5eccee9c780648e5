"""Repack GPTQ v1 tensors at load into the layout the serving kernels read.

The checkpoint on disk stays GPTQ v1 (and :class:`~slmcompress.quant.quant_linear.QuantLinear`
keeps those buffers, so its ``state_dict`` is unchanged); this is a derived, per-device copy,
as vLLM (Marlin) and torchao (tinygemm) repack at load.

What changes, and why:

* **Act-order rows sorted by group.** GPTQ act-order writes a ``g_idx`` that is not monotone,
  so every row of a K-tile may need a different scale. Sorting the input channels by group
  (``perm``) makes each group a contiguous run of ``group`` rows; the kernels then read
  ``x[:, perm]`` (a gather on the small activation, not on the weight) and load each group's
  scales once per tile.
* **Zero points unpacked to fp16** (exact small integers) next to the fp16 scales: a kernel
  folds them once per tile, ``zs = -zero * scale`` so ``w = s * q + zs`` is one fma (dequant,
  ``tl.dot`` tiles), or into the int->float conversion constant of the GEMV, so that
  ``q - zero`` costs nothing extra there.
* **4-bit words stay as GPTQ packs them** (8 consecutive inputs per int32, lowest nibble
  first): one 32-bit load already yields 8 codes with constant shifts. Without act-order the
  GPTQ ``qweight`` itself is served, no copy.
* **3-bit codes move to a nibble layout ("nib3").** GPTQ packs 32 codes as one 96-bit stream
  in 3 words, so codes 10 and 21 straddle two words. nib3 keeps 3 words per 32 inputs (the
  same bytes, 3/4 of 4-bit) but word ``r`` holds code ``8r + i`` in bits ``[4i, 4i+3)`` of
  nibble ``i``, and the spare top bit of each nibble holds one bit of codes 24..31: bit ``r``
  of code ``24 + i`` is bit ``4i + 3`` of word ``r``. Codes 0..23 unpack exactly like 4-bit
  codes (shift, mask 7); the last 8 come from one word rebuilt with 3 shifts and 3 masks.

Everything here is plain torch on the tensors' own device; :func:`unpack_native` and
:func:`dequantize_native` are the references the kernel tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SERVED_BITS = (3, 4)
NIB3_HI_MASKS = (0x11111111, 0x22222222, 0x44444444)  # bit r of each nibble (codes 24..31)


@dataclass(frozen=True)
class ServingWeight:
    """One layer in the serving layout (see the module docstring).

    ``group`` is the number of consecutive serving rows sharing a scale row; 0 means one
    group for all rows (per-channel scales). Serving row ``r`` is input channel ``perm[r]``
    (``perm`` None: the identity).
    """

    words: torch.Tensor  # 4-bit: (K/8, N) int32; 3-bit: (K/32*3, N) int32 (nib3)
    scales: torch.Tensor  # (G, N) fp16
    zeros: torch.Tensor  # (G, N) fp16 zero points (exact integers)
    perm: torch.Tensor | None  # (K,) int32
    bits: int
    in_features: int
    out_features: int
    group: int

    @property
    def device(self) -> torch.device:
        return self.words.device


def vals_words(bits: int) -> tuple[int, int]:
    """``(VALS, WORDS)``: one packed block holds ``VALS`` consecutive rows in ``WORDS`` int32 rows."""
    if bits not in SERVED_BITS:
        raise ValueError(f"no serving layout for {bits}-bit weights (supported: {SERVED_BITS})")
    return (8, 1) if bits == 4 else (32, 3)


# --------------------------------------------------------------------------- group plan


def plan_rows(
    g_idx: torch.Tensor, group_size: int, in_features: int
) -> tuple[torch.Tensor | None, int] | str:
    """``(perm, group)`` that makes every group a contiguous run of ``group`` rows, or a reason.

    Per-channel (every ``g_idx`` 0) is group 0. Groups of one size except a shorter last one
    (576 inputs at group 128) are fine; anything irregular returns a string (the dispatcher
    then serves the layer with the generic GPTQ kernel, which gathers ``g_idx`` per row).
    """
    g = g_idx.long()  # (K,)
    if not bool((g != 0).any()):
        return None, 0
    perm = None
    if bool((g[1:] < g[:-1]).any()):  # act-order: sort rows by group, keep order inside one
        perm = torch.argsort(g, stable=True).to(torch.int32)
        g = g[perm.long()]
    sizes = torch.unique_consecutive(g, return_counts=True)[1]
    size = int(sizes[0])
    if bool((sizes[:-1] != size).any()) or int(sizes[-1]) > size:
        return f"groups of unequal sizes {sorted(set(sizes.tolist()))}"
    expected = torch.arange(in_features, device=g.device) // size
    if not torch.equal(g, expected):
        return "group ids are not 0, 1, 2, ... in row order"
    if group_size > 0 and size != group_size:
        return f"rows per group {size} differ from the declared group_size {group_size}"
    return perm, size


# --------------------------------------------------------------------------- GPTQ v1 unpacking


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_gptq_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """GPTQ v1 words ``(rows * bits / 32, C)`` -> int64 codes ``(rows, C)`` (any device)."""
    words = packed.to(torch.int64).contiguous() & 0xFFFFFFFF
    cols, dev = packed.shape[1], packed.device
    if bits == 4:
        shifts = (torch.arange(8, device=dev, dtype=torch.int64) * 4).view(1, 8, 1)
        return ((words.unsqueeze(1) >> shifts) & 15).reshape(rows, cols)
    blocks = rows // 32  # 3 bits: a 96-bit little-endian stream per 32 rows
    bit = torch.arange(96, device=dev, dtype=torch.int64)  # stream bit index
    stream = (words.view(blocks, 3, cols)[:, bit // 32, :] >> (bit % 32).view(1, 96, 1)) & 1
    weights = (1 << torch.arange(3, device=dev, dtype=torch.int64)).view(1, 1, 3, 1)
    return (stream.view(blocks, 32, 3, cols) * weights).sum(dim=2).reshape(rows, cols)


def unpack_gptq_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """``qzeros`` ``(G, N * bits / 32)`` -> zero points ``(G, N)`` int64 (v1 offset added back)."""
    return unpack_gptq_rows(qzeros.T, bits, out_features).T + 1


# --------------------------------------------------------------------------- serving layout


def pack_native(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``(K, N)`` in ``[0, 2**bits)`` -> serving words (4-bit: GPTQ order; 3-bit: nib3)."""
    k, n = codes.shape
    vals, _ = vals_words(bits)
    if k % vals:
        raise ValueError(f"{k} rows cannot be packed at {bits} bits: need a multiple of {vals}")
    c = codes.to(torch.int64)
    nib = (torch.arange(8, device=c.device, dtype=torch.int64) * 4).view(1, 8, 1)
    if bits == 4:
        return _to_int32((c.view(k // 8, 8, n) << nib).sum(dim=1))  # disjoint bits: sum == or
    c = c.view(k // 32, 32, n)
    lo = ((c[:, :24] & 7).view(-1, 3, 8, n) << nib.unsqueeze(1)).sum(dim=2)  # (B, 3, N)
    hi = c[:, 24:]  # (B, 8, N): bit r of code 24+i -> bit 4i+3 of word r
    r = torch.arange(3, device=c.device, dtype=torch.int64).view(1, 3, 1, 1)
    top = (((hi.unsqueeze(1) >> r) & 1) << (nib.unsqueeze(1) + 3)).sum(dim=2)  # (B, 3, N)
    return _to_int32((lo | top).reshape(-1, n))


def unpack_native(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_native`: serving words -> int64 codes ``(rows, N)``."""
    n = words.shape[1]
    w = words.to(torch.int64) & 0xFFFFFFFF
    nib = (torch.arange(8, device=w.device, dtype=torch.int64) * 4).view(1, 8, 1)
    if bits == 4:
        return ((w.unsqueeze(1) >> nib) & 15).reshape(rows, n)
    w = w.view(rows // 32, 3, n)
    lo = (w.unsqueeze(2) >> nib.unsqueeze(1)) & 7  # (B, 3, 8, N): codes 0..23
    top = (w.unsqueeze(2) >> (nib.unsqueeze(1) + 3)) & 1  # (B, 3, 8, N): bit r of code 24+i
    r = torch.arange(3, device=w.device, dtype=torch.int64).view(1, 3, 1, 1)
    hi = (top << r).sum(dim=1)  # (B, 8, N)
    return torch.cat([lo.reshape(-1, 24, n), hi], dim=1).reshape(rows, n)


def repack(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int,
) -> ServingWeight | str:
    """GPTQ v1 tensors -> :class:`ServingWeight` on their device, or why the layout cannot serve."""
    vals, words_per = vals_words(bits)
    k, n = g_idx.shape[0], scales.shape[1]
    if k % vals:
        return f"in_features={k} is not a multiple of {vals}"
    plan = plan_rows(g_idx, group_size, k)
    if isinstance(plan, str):
        return plan
    perm, group = plan
    if bits == 4 and perm is None:
        words = qweight  # the GPTQ words are the serving words: no copy
    else:
        codes = unpack_gptq_rows(qweight, bits, k)  # (K, N)
        words = pack_native(codes if perm is None else codes[perm.long()], bits)
    zeros = unpack_gptq_zeros(qzeros, bits, n).to(torch.float16)  # (G, N), exact
    return ServingWeight(
        words.contiguous(), scales.to(torch.float16).contiguous(), zeros.contiguous(),
        perm, bits, k, n, group,
    )  # fmt: skip


def dequantize_native(w: ServingWeight) -> torch.Tensor:
    """Float32 ``(K, N)`` weight in serving row order: ``s[g] * (q - z[g])``, ``g = r // group``."""
    q = unpack_native(w.words, w.bits, w.in_features).float()  # (K, N)
    rows = torch.arange(w.in_features, device=q.device)
    g = rows // w.group if w.group else torch.zeros_like(rows)
    return w.scales.float()[g] * (q - w.zeros.float()[g])


def serving_matmul_reference(x2d: torch.Tensor, w: ServingWeight) -> torch.Tensor:
    """``x2d (M, K) @ W`` through the serving layout, float32 (what every serving kernel computes)."""
    x = x2d.float() if w.perm is None else x2d.float()[:, w.perm.long()]
    return x @ dequantize_native(w)
