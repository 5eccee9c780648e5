"""GPTQ v1 ("gptq" checkpoint format) bit packing, as AutoGPTQ/GPTQModel write it.

``qweight`` int32 ``[in * bits / 32, out]``: codes packed along the input dim, lowest bits
first, as one little-endian bit stream per 32 inputs (for 3 bits, 32 values span 3 words
and some values straddle two words, exactly AutoGPTQ's layout). ``qzeros`` int32
``[n_groups, out * bits / 32]`` packs ``zero - 1`` (the v1 offset) the same way along ``out``.
"""

from __future__ import annotations

import torch

from slmcompress.errors import PassError
from slmcompress.quant.qparams import SUPPORTED_BITS, max_code


def pack_multiple(bits: int) -> int:
    """Rows must be a multiple of this to pack: 32 values per ``bits`` words."""
    return 32 if bits == 3 else 32 // bits


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint32 values held in int64 as int32 (two's complement)."""
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(R, C)`` in ``[0, 2**bits)`` into int32 ``(R * bits / 32, C)``."""
    if bits not in SUPPORTED_BITS:
        raise PassError(f"bits: cannot pack {bits}-bit values; use one of {SUPPORTED_BITS}")
    rows, cols = values.shape
    if rows % pack_multiple(bits):
        raise PassError(
            f"cannot pack {rows} rows at {bits} bits: need a multiple of {pack_multiple(bits)}"
        )
    v = values.to(torch.int64) & max_code(bits)
    device = values.device  # index tensors live where the codes are (CUDA, meta, ...)
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (torch.arange(per, dtype=torch.int64, device=device) * bits).view(1, per, 1)
        words = (v.view(rows // per, per, cols) << shifts).sum(dim=1)  # disjoint bits: sum == or
        return _to_int32(words)
    # 3 bits: 32 values form a 96-bit little-endian stream stored in 3 consecutive words.
    blocks = rows // 32
    bit_pos = torch.arange(32 * bits, dtype=torch.int64, device=device)  # stream bit index
    src = (bit_pos // bits).view(1, -1, 1)  # which value in the block
    src_bit = (bit_pos % bits).view(1, -1, 1)  # which bit of that value
    stream = (v.view(blocks, 32, cols).gather(1, src.expand(blocks, -1, cols)) >> src_bit) & 1
    stream = stream.view(blocks, bits, 32, cols)  # (block, word, bit, col)
    shifts = torch.arange(32, dtype=torch.int64, device=device).view(1, 1, 32, 1)
    words = (stream << shifts).sum(dim=2)  # (block, word, col)
    return _to_int32(words.reshape(blocks * bits, cols))


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``(rows * bits / 32, C)`` -> int32 codes ``(rows, C)``."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    cols, device = packed.shape[1], packed.device
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (torch.arange(per, dtype=torch.int64, device=device) * bits).view(1, per, 1)
        vals = (words.unsqueeze(1) >> shifts) & max_code(bits)  # (R/per, per, C)
        return vals.reshape(-1, cols)[:rows].to(torch.int32)
    blocks = rows // 32
    shifts = torch.arange(32, dtype=torch.int64, device=device).view(1, 1, 32, 1)
    stream = (words.view(blocks, bits, 1, cols) >> shifts) & 1  # (block, word, bit, col)
    stream = stream.reshape(blocks, 32, bits, cols)  # value-major: 3 consecutive stream bits
    weights = (2 ** torch.arange(bits, dtype=torch.int64, device=device)).view(1, 1, bits, 1)
    return (stream * weights).sum(dim=2).reshape(rows, cols).to(torch.int32)


def pack_qweight(codes_out_in: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of a Linear weight ``(out, in)`` -> ``qweight`` ``(in * bits / 32, out)``."""
    return pack_rows(codes_out_in.T.contiguous(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """``qweight`` -> codes ``(out, in)``."""
    return unpack_rows(qweight, bits, in_features).T.contiguous()


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points ``(G, out)`` -> ``qzeros`` ``(G, out * bits / 32)`` storing ``zero - 1``."""
    return pack_rows((zeros.to(torch.int64) - 1).T.contiguous(), bits).T.contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """``qzeros`` -> zero points ``(G, out)`` (adds the v1 offset back)."""
    return unpack_rows(qzeros.T.contiguous(), bits, out_features).T.contiguous() + 1
