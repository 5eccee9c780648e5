"""RTN pass options on a tiny random Llama: clip search."""

from __future__ import annotations

import copy

import pytest
import torch

from slmcompress.passes.quantize_rtn import RTNConfig, RTNPass
from slmcompress.quant.qparams import dequantize_weight, rtn_quantize_weight
from slmcompress.quant.quant_linear import QuantLinear


def rtn(**kwargs) -> RTNPass:
    return RTNPass(RTNConfig(type="quantize", bits=4, group_size=32, **kwargs))


def test_clip_search_lowers_weight_error_of_every_linear(tiny_llama, make_ctx):
    originals = {
        n: m.weight.detach().clone()
        for n, m in tiny_llama.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }
    plain = rtn().run(copy.deepcopy(tiny_llama), make_ctx())
    clipped = rtn(clip_search=True).run(tiny_llama, make_ctx())
    plain_q = {n: m for n, m in plain.named_modules() if isinstance(m, QuantLinear)}
    clipped_q = {n: m for n, m in clipped.named_modules() if isinstance(m, QuantLinear)}
    assert set(clipped_q) == set(originals)
    for name, w in originals.items():
        err_plain = (plain_q[name].dequantize() - w).pow(2).sum()
        err_clip = (clipped_q[name].dequantize() - w).pow(2).sum()
        assert err_clip < err_plain, name
        # the installed codes are exactly rtn_quantize_weight's with the configured grid
        codes, scales, zeros, g_idx = rtn_quantize_weight(
            w, 4, 32, False, clip_ratios=RTNConfig(type="quantize", clip_search=True).clip_ratios()
        )
        torch.testing.assert_close(
            clipped_q[name].dequantize(),
            dequantize_weight(codes, scales.half().float(), zeros, g_idx),
        )


def test_clip_options_are_validated():
    assert RTNConfig(type="quantize").clip_ratios() is None
    with pytest.raises(ValueError, match="clip_min_ratio"):
        RTNConfig(type="quantize", clip_search=True, clip_min_ratio=1.5)
