"""GPTQ -> GGUF block transfer and RTN payloads, checked with gguf's own dequantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slmcompress.errors import PassError
from slmcompress.export.gguf_arch import permute_rows
from slmcompress.export.gguf_blocks import (
    GptqTensor,
    dequantize_payload,
    gptq_dequantize,
    gptq_to_blocks,
    quantize_float,
)

OUT, IN = 8, 96  # 3 blocks per row


def make_gptq(bits: int = 4, sym: bool = False, group_size: int = 32, seed: int = 0) -> GptqTensor:
    gen = torch.Generator().manual_seed(seed)
    top = 2**bits
    codes = torch.randint(0, top, (OUT, IN), generator=gen)
    groups = IN // group_size
    scales = (torch.rand(groups, OUT, generator=gen) * 0.05 + 1e-3).to(torch.float16)
    if sym:
        zeros = torch.full((groups, OUT), top // 2)
    else:
        zeros = torch.randint(0, top, (groups, OUT), generator=gen)
    g_idx = torch.arange(IN) // group_size
    return GptqTensor(codes, scales, zeros, g_idx, bits, group_size)


def readback(payload: np.ndarray, type_name: str) -> torch.Tensor:
    return torch.from_numpy(dequantize_payload(payload, type_name))


@pytest.mark.parametrize(
    ("bits", "sym", "type_name"),
    [(4, True, "q4_0"), (8, True, "q8_0"), (4, False, "q8_0"), (4, True, "q8_0")],
)
def test_transfer_is_exact(bits, sym, type_name):
    tensor = make_gptq(bits, sym)
    payload = gptq_to_blocks("layer", tensor, type_name)
    assert payload.dtype == np.uint8 and payload.shape[0] == OUT
    assert torch.equal(readback(payload, type_name), gptq_dequantize(tensor))


@pytest.mark.parametrize("sym", [False, True])
def test_q4_1_transfer_is_exact_up_to_fp16_min(sym):
    tensor = make_gptq(4, sym)
    ours = readback(gptq_to_blocks("layer", tensor, "q4_1"), "q4_1")
    reference = gptq_dequantize(tensor)
    m = tensor.scales.float() * tensor.zeros.float()  # (G, OUT): |m| bounds its fp16 rounding
    bound = float(m.abs().max()) * 2**-11 + 1e-7
    assert (ours - reference).abs().max() <= bound
    assert (ours - reference).abs().max() > 0 or sym  # rounding of m is the only loss


def test_nibble_layout_matches_ggml():
    """Element j is the low nibble of byte j, element j + 16 its high nibble."""
    codes = torch.arange(32).remainder(16).view(1, 32)
    tensor = GptqTensor(
        codes, torch.ones(1, 1, dtype=torch.float16), torch.zeros(1, 1), torch.zeros(32), 4, 32
    )
    payload = gptq_to_blocks("layer", tensor, "q4_1")
    qs = payload[0, 4:]  # after fp16 d, fp16 m
    assert list(qs) == [j | (j << 4) for j in range(16)]
    assert np.frombuffer(payload[0, :2].tobytes(), np.float16)[0] == 1.0


def test_asymmetric_codes_refused_for_q4_0():
    with pytest.raises(PassError, match=r"^blk\.0\.attn_q\.weight: .*Q4_0 needs symmetric"):
        gptq_to_blocks("blk.0.attn_q.weight", make_gptq(4, sym=False), "q4_0")


def test_group_size_128_refused():
    tensor = make_gptq(4, group_size=IN)
    with pytest.raises(PassError, match=r"^w: GPTQ group_size 96 does not map"):
        gptq_to_blocks("w", tensor, "q4_1")


def test_act_order_g_idx_refused():
    tensor = make_gptq(4)
    shuffled = GptqTensor(tensor.codes, tensor.scales, tensor.zeros, tensor.g_idx.flip(0), 4, 32)
    with pytest.raises(PassError, match="g_idx is not contiguous"):
        gptq_to_blocks("w", shuffled, "q4_1")


def test_8bit_asymmetric_refused_for_q8_0():
    tensor = make_gptq(8, sym=False)
    with pytest.raises(PassError, match=r"Q8_0 needs q - zero in \[-128, 127\]"):
        gptq_to_blocks("w", tensor, "q8_0")


@pytest.mark.parametrize("type_name", ["f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1"])
def test_rtn_payload_round_trips(type_name):
    weight = torch.randn(OUT, IN)
    back = readback(quantize_float(weight, type_name), type_name).view(OUT, IN)
    bound = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 0.02, "q5_0": 0.2, "q5_1": 0.2}.get(type_name, 0.4)
    assert (back - weight).abs().max() < bound


def test_q4_1_rtn_of_q4_1_weights_is_lossless():
    """Re-quantizing a Q4_1-dequantized row reproduces it: RTN follows llama.cpp's min/max rule."""
    weight = torch.randn(OUT, IN)
    once = readback(quantize_float(weight, "q4_1"), "q4_1")
    twice = readback(quantize_float(once, "q4_1"), "q4_1")
    assert torch.allclose(once, twice, atol=2e-3)


def test_permutation_is_undone_by_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)  # 4 heads of dim 16
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 4})
    back = processor._reverse_permute_weights(permute_rows(rows, 4), 4, 4)
    assert np.array_equal(back, rows)
    assert not np.array_equal(permute_rows(rows, 4), rows)
