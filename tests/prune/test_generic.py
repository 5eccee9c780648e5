"""torch-pruning on GPT-2: MLP and hidden width pruned, plain transformers reload; heads refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from slmcompress.errors import PassError
from slmcompress.prune.generic import prune_gpt2

pytest.importorskip("torch_pruning")


@pytest.fixture
def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=64,
        n_head=4,
        n_layer=2,
        n_inner=128,
        vocab_size=1000,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize(
    ("target", "expect"),
    [
        ({"ffn_hidden_size": 48}, {"n_inner": 48, "n_embd": 64}),
        ({"hidden_size": 48}, {"n_inner": 128, "n_embd": 48}),
        ({"hidden_size": 32, "ffn_hidden_size": 64}, {"n_inner": 64, "n_embd": 32}),
    ],
)
def test_gpt2_width_pruning_reloads_with_plain_transformers(gpt2, tmp_path, target, expect):
    pruned = prune_gpt2(gpt2, **target)
    for key, value in expect.items():
        assert getattr(pruned.config, key) == value
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in gpt2.parameters())
    assert pruned.lm_head.weight is pruned.transformer.wte.weight
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is GPT2LMHeadModel
    ids = torch.randint(0, 1000, (2, 10))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pruned, ids))
    assert torch.isfinite(_logits(reloaded, ids)).all()


def test_mlp_pruning_equals_zeroing_the_dropped_neurons(gpt2):
    pruned = prune_gpt2(gpt2, ffn_hidden_size=96)
    masked = GPT2LMHeadModel(gpt2.config).eval()
    masked.load_state_dict(gpt2.state_dict())
    for old, new in zip(masked.transformer.h, pruned.transformer.h, strict=True):
        # kept neurons = columns of the old c_fc weight (in, out) present in the new one
        kept = [
            int((old.mlp.c_fc.weight.T == row).all(dim=1).nonzero()[0])
            for row in new.mlp.c_fc.weight.T
        ]
        drop = torch.ones(128, dtype=torch.bool)
        drop[kept] = False
        old.mlp.c_proj.weight.data[drop] = 0  # Conv1D (in, out): rows are the MLP neurons
    ids = torch.randint(0, 1000, (1, 12))
    torch.testing.assert_close(_logits(pruned, ids), _logits(masked, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ({"num_attention_heads": 2}, "target.num_attention_heads"),
        ({"hidden_size": 50}, "target.hidden_size"),
        ({"ffn_hidden_size": 512}, "target.ffn_hidden_size"),
    ],
)
def test_targets_gpt2_cannot_express_are_one_line(gpt2, target, field):
    with pytest.raises(PassError, match=rf"^{field}: "):
        prune_gpt2(gpt2, **target)
