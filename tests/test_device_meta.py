"""Pure tensor functions run on another device (issue #24), without a GPU.

Two stand-ins for CUDA, both raising CUDA's "Expected all tensors to be on the same
device" when a function combines its inputs with a tensor it created on the CPU:

* ``meta`` tensors (shapes only): every function that needs no values. The result must
  stay on ``meta``.
* the simulated device of ``device_sim`` (``meta`` label, real CPU values): functions
  that read values (``.item()``, ``.tolist()``, data-dependent indexing) and those whose
  results should be compared with the CPU run -- bit for bit, since the arithmetic is the
  same CPU arithmetic.

What each test covers is named after the function; the pipeline-level version (passes
with ``ctx.device`` on the simulated device) is tests/test_device_pipeline.py.
"""

from __future__ import annotations

import pytest
import torch
from device_sim import from_sim, is_sim, simulated_device, to_sim
from random_models import random_quant_linear

from slmcompress.distill.losses import TopK, distill_loss, forward_kl, jsd, reverse_kl
from slmcompress.export.gguf_blocks import GptqTensor, gptq_dequantize, gptq_to_blocks
from slmcompress.kernels.reference import dequantize_reference, quant_matmul_reference
from slmcompress.prune import importance, slicing
from slmcompress.quant import packing, qparams
from slmcompress.quant.gptq_solver import HessianAccumulator, gptq_quantize, inverse_hessian_factor
from slmcompress.quant.quant_linear import QuantLinear
from slmcompress.quant.trainable import MODES, TrainableQuantLinear

META = torch.device("meta")
pytestmark = pytest.mark.usefixtures("single_thread")


def meta(t: torch.Tensor) -> torch.Tensor:
    return t.to(META)


def on_meta(*tensors: torch.Tensor) -> bool:
    return all(t.device == META for t in tensors)


# ------------------------------------------------------------------ packing
def test_the_issue_reproducer_runs_on_meta():
    out = packing.unpack_rows(torch.zeros(16, 8, dtype=torch.int32, device="meta"), 4, 128)
    assert out.device == META and out.shape == (128, 8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_and_unpack_stay_on_meta(bits):
    codes = torch.randint(0, 2**bits, (64, 96), dtype=torch.int32)  # (out, in)
    zeros = torch.randint(1, 2**bits, (3, 64), dtype=torch.int32)  # (G, out)
    qweight = packing.pack_qweight(meta(codes), bits)
    qzeros = packing.pack_qzeros(meta(zeros), bits)
    assert qweight.shape == (96 * bits // 32, 64) and qzeros.shape == (3, 64 * bits // 32)
    unpacked = packing.unpack_qweight(qweight, bits, 96)
    zeros_back = packing.unpack_qzeros(qzeros, bits, 64)
    assert on_meta(qweight, qzeros, unpacked, zeros_back)
    assert unpacked.shape == (64, 96) and zeros_back.shape == (3, 64)


@pytest.mark.parametrize("bits", [3, 4])
def test_pack_round_trip_is_exact_on_the_simulated_device(bits):
    codes = torch.randint(0, 2**bits, (64, 96), dtype=torch.int32)
    with simulated_device():
        qweight = packing.pack_qweight(to_sim(codes), bits)
        back = packing.unpack_qweight(qweight, bits, 96)
        assert is_sim(qweight) and is_sim(back)
        assert torch.equal(from_sim(qweight), packing.pack_qweight(codes, bits))
        assert torch.equal(from_sim(back), codes)


# ------------------------------------------------------------------ qparams
def test_qparams_stay_on_meta():
    w = meta(torch.randn(32, 64))
    for sym in (False, True):
        scale, zero = qparams.compute_qparams(w, 4, sym)
        assert on_meta(scale, zero) and scale.shape == (32, 1)
    scale, zero = qparams.search_qparams(w, 4, False, qparams.clip_grid(0.8, 4))
    q = qparams.fake_quantize(w, scale, zero, 4)
    assert on_meta(scale, zero, q)
    assert qparams.default_g_idx(64, 16, META).device == META
    assert qparams.default_g_idx(64, -1, META).device == META


def test_rtn_quantize_weight_on_the_simulated_device_equals_cpu():
    w = torch.randn(32, 96)
    expected = qparams.rtn_quantize_weight(w, 4, 32, False, clip_ratios=[1.0, 0.9])
    with simulated_device():
        got = qparams.rtn_quantize_weight(to_sim(w), 4, 32, False, clip_ratios=[1.0, 0.9])
        assert all(is_sim(t) for t in got)
        codes, scales, zeros, g_idx = from_sim(got)
        deq = qparams.dequantize_weight(*got)
        assert is_sim(deq)
    for a, b in zip((codes, scales, zeros, g_idx), expected, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ GPTQ
def test_hessian_accumulation_stays_on_meta():
    acc = HessianAccumulator(64, META)
    acc.add_batch(meta(torch.randn(2, 8, 64)))
    assert acc.H.device == META and acc.H.shape == (64, 64)


@pytest.mark.parametrize(
    ("act_order", "static_groups"), [(False, False), (True, False), (True, True)]
)
def test_gptq_solve_on_the_simulated_device_is_bit_identical(act_order, static_groups):
    """The whole solver (damping retries read ``info``, the column loop reads ``.tolist()``)."""
    gen = torch.Generator().manual_seed(0)
    W, X = torch.randn(24, 64, generator=gen), torch.randn(256, 64, generator=gen)
    X[:, 5] = 0  # a dead input: H[i, i] == 0 takes the in-place masked path
    kwargs = dict(group_size=16, act_order=act_order, static_groups=static_groups)
    cpu = HessianAccumulator(64)
    cpu.add_batch(X)
    expected = gptq_quantize(W, cpu.H, 4, **kwargs)
    with simulated_device():
        acc = HessianAccumulator(64, META)
        acc.add_batch(to_sim(X))
        got = gptq_quantize(to_sim(W), acc.H, 4, **kwargs)
        assert all(is_sim(t) for t in (got.codes, got.scales, got.zeros, got.g_idx, got.weight))
        U, _, _ = inverse_hessian_factor(acc.H, 0.01)
        assert is_sim(U)
    for name in ("codes", "scales", "zeros", "g_idx", "weight"):
        assert torch.equal(from_sim(getattr(got, name)), getattr(expected, name)), name
    assert got.stats == expected.stats


# ------------------------------------------------------------------ dequantization
@pytest.mark.parametrize(("bits", "act_order"), [(4, False), (3, True)])
def test_dequant_reference_and_quant_linear_stay_on_meta(bits, act_order):
    layer = random_quant_linear(64, 32, bits, 16, act_order).to(META)
    ref = dequantize_reference(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits)
    assert ref.device == META and ref.shape == (64, 32)
    x = meta(torch.randn(3, 64))
    assert quant_matmul_reference(x, layer).device == META
    assert on_meta(layer.dequantize(), layer.codes(), layer.zeros(), layer(x))


def test_quant_linear_built_from_codes_lives_on_their_device():
    codes = meta(torch.zeros(32, 64, dtype=torch.int32))
    scales, zeros = meta(torch.ones(4, 32)), meta(torch.full((4, 32), 8, dtype=torch.int32))
    layer = QuantLinear.from_codes(codes, scales, zeros, qparams.default_g_idx(64, 16, META), 4, 16)
    assert all(b.device == META for b in layer.buffers())
    with torch.device("meta"):  # device=None follows the default device, like nn.Linear
        assert QuantLinear(64, 32, 4, 16, bias=True).qweight.device == META


def test_quant_linear_on_the_simulated_device_equals_cpu():
    layer = random_quant_linear(64, 32, 4, 16, act_order=True)
    x = torch.randn(3, 64)
    with simulated_device():
        sim = to_sim(layer)
        out = sim(to_sim(x))
        assert is_sim(out)
        assert torch.equal(from_sim(out), layer(x))


# ------------------------------------------------------------------ pruning
def test_head_channels_and_slicing_stay_on_meta():
    heads = meta(torch.tensor([0, 2]))
    channels = slicing.head_channels(heads, 16)
    assert channels.device == META and channels.shape == (32,)
    weight = meta(torch.randn(64, 48))
    kept = slicing._take(weight, (channels, torch.arange(8)))  # CPU indices follow the tensor
    assert kept.device == META and kept.shape == (32, 8)


def test_importance_statistics_stay_on_meta():
    x = meta(torch.randn(2, 5, 64))  # (B, T, heads * head_dim)
    o_weight = meta(torch.randn(32, 64))
    assert importance.channel_stat(x).device == META
    assert importance.projected_head_stat(x, o_weight, 4).shape == (2, 4)
    assert importance.head_scores(meta(torch.rand(64)), 4).device == META


def test_importance_on_the_simulated_device_lands_on_the_host():
    """Scores are host tensors whatever computed them (the planner indexes with them)."""
    x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    with simulated_device():
        acc = importance.BatchL2()
        acc.add(importance.channel_stat(to_sim(x)))
        assert not is_sim(acc.value())
        cos, count = importance.cosine_importance(to_sim(x), to_sim(y))
    assert torch.equal(acc.value(), importance.channel_stat(x).pow(2).sum(0).sqrt())
    assert (cos, count) == importance.cosine_importance(x, y)


def test_magnitude_importance_of_a_model_on_the_simulated_device(tiny_llama):
    expected = importance.magnitude_importance(tiny_llama)
    with simulated_device():
        got = importance.magnitude_importance(to_sim(tiny_llama))
    assert not any(is_sim(t) for t in [*got.heads, *got.neurons, got.hidden, got.layers])
    assert torch.allclose(got.hidden, expected.hidden)
    assert all(torch.allclose(a, b) for a, b in zip(got.heads, expected.heads, strict=True))


# ------------------------------------------------------------------ GGUF blocks
def _gptq_tensor(bits: int, sym: bool) -> GptqTensor:
    layer = random_quant_linear(96, 32, bits, 32, sym=sym)
    return GptqTensor(layer.codes(), layer.scales, layer.zeros(), layer.g_idx, bits, 32)


@pytest.mark.parametrize(
    ("bits", "sym", "type_name"), [(4, True, "q4_0"), (4, False, "q4_1"), (8, True, "q8_0")]
)
def test_gguf_blocks_from_the_simulated_device_equal_cpu(bits, sym, type_name):
    """The payload is host memory (numpy) wherever the codes were: no ``.numpy()`` on device."""
    tensor = _gptq_tensor(bits, sym)
    expected = gptq_to_blocks("w", tensor, type_name)
    with simulated_device():
        sim = GptqTensor(
            *to_sim([tensor.codes, tensor.scales, tensor.zeros, tensor.g_idx]), bits, 32
        )
        got = gptq_to_blocks("w", sim, type_name)
        assert is_sim(gptq_dequantize(sim))
    assert (got == expected).all()


def test_gguf_dequantize_stays_on_meta():
    tensor = _gptq_tensor(4, False)
    moved = GptqTensor(
        *(meta(t) for t in (tensor.codes, tensor.scales, tensor.zeros, tensor.g_idx)), 4, 32
    )
    assert gptq_dequantize(moved).device == META


# ------------------------------------------------------------------ KD losses
@pytest.mark.parametrize("loss", [forward_kl, reverse_kl, jsd])
@pytest.mark.parametrize("top_k", [None, 4])
def test_kd_losses_and_gradients_stay_on_meta(loss, top_k):
    student = meta(torch.randn(2, 5, 32)).requires_grad_(True)
    logits = meta(torch.randn(2, 5, 32))
    teacher = TopK(*torch.topk(logits, top_k, dim=-1)) if top_k else logits
    mask = meta(torch.ones(2, 5, dtype=torch.bool))
    value = loss(student, teacher, 2.0, mask)
    value.backward()
    assert value.device == META and student.grad.device == META


def test_distill_loss_on_the_simulated_device_equals_cpu():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 32, generator=gen), torch.randn(2, 6, 32, generator=gen)
    ids = torch.randint(0, 32, (2, 6), generator=gen)
    expected, parts = distill_loss(student, ids, teacher, "forward_kl", 1.0, alpha=0.3)
    with simulated_device():
        got, got_parts = distill_loss(*to_sim([student, ids, teacher]), "forward_kl", 1.0, 0.3)
        assert is_sim(got)
    assert torch.equal(from_sim(got), expected) and got_parts == parts


# ------------------------------------------------------------------ QAD parameterisation
@pytest.mark.parametrize("mode", MODES)
def test_qad_forward_and_backward_stay_on_meta(mode):
    layer = random_quant_linear(64, 32, 4, 16, act_order=True).to(META)
    trainable = TrainableQuantLinear(layer, mode)
    assert all(t.device == META for t in [*trainable.parameters(), *trainable.buffers()])
    x = meta(torch.randn(3, 64))
    trainable(x).sum().backward()
    assert all(p.grad.device == META for p in trainable.parameters())
    assert trainable.codes().device == META


@pytest.mark.parametrize("mode", MODES)
def test_qad_back_to_quant_linear_on_the_simulated_device(mode):
    layer = random_quant_linear(64, 32, 4, 16, act_order=True)
    expected = TrainableQuantLinear(layer, mode).to_quant()
    with simulated_device():
        packed = TrainableQuantLinear(to_sim(layer), mode).to_quant()
        assert all(is_sim(b) for b in packed.buffers())
        got = {k: from_sim(v) for k, v in packed.state_dict().items()}
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
