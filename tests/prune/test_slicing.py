"""Slicing: a genuinely smaller model that computes what masking computes, and reloads."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from slmcompress.arch import decoder_layers
from slmcompress.errors import PassError
from slmcompress.eval.report import count_params
from slmcompress.prune.importance import check_supported, layers_removed, random_importance
from slmcompress.prune.planner import param_counts, plan_keep, resolve_target, sizes_of
from slmcompress.prune.slicing import head_channels, slice_model

TOKENS = torch.randint(0, 1000, (2, 12))


def _prune(model, target, mode="within_groups", depth_mode="per_layer", seed=0):
    current = sizes_of(model.config)
    sizes = resolve_target(current, target, mode, config=model.config)
    plan = plan_keep(random_importance(model, seed), current, sizes, depth_mode)
    return slice_model(model, plan), plan


def _masked(model, plan):
    """Zero the o_proj columns of removed heads and down_proj columns of removed neurons."""
    masked = copy.deepcopy(model)
    head_dim = model.config.head_dim
    for i, layer in enumerate(decoder_layers(masked)):
        o_keep = torch.zeros(layer.self_attn.o_proj.in_features, dtype=torch.bool)
        o_keep[head_channels(plan.heads[i], head_dim)] = True
        layer.self_attn.o_proj.weight.data[:, ~o_keep] = 0
        n_keep = torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.bool)
        n_keep[plan.neurons[i]] = True
        layer.mlp.down_proj.weight.data[:, ~n_keep] = 0
    return masked


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize(
    ("target", "mode"),
    [
        ({"num_attention_heads": 2}, "within_groups"),  # 4/2 -> 2/2: one query head per group
        ({"num_attention_heads": 2}, "kv_groups"),  # 4/2 -> 2/1: a whole KV group
        ({"ffn_hidden_size": 40}, "within_groups"),
        (
            {"ffn_hidden_size": 40, "num_attention_heads": 2, "num_key_value_heads": 1},
            "within_groups",
        ),
    ],
)
def test_width_slicing_equals_masking(tiny_llama, target, mode):
    pruned, plan = _prune(tiny_llama, target, mode)
    torch.testing.assert_close(
        _logits(pruned), _logits(_masked(tiny_llama, plan)), rtol=1e-4, atol=1e-5
    )
    assert count_params(pruned) == param_counts(tiny_llama.config, plan.sizes)
    assert count_params(pruned)[1] < count_params(tiny_llama)[1]


def test_layer_slicing_equals_skipping(tiny_llama):
    pruned, plan = _prune(tiny_llama, {"num_layers": 1})
    dropped = [i for i in range(2) if i not in plan.layers]
    with layers_removed(tiny_llama, dropped):
        expected = _logits(tiny_llama)
    torch.testing.assert_close(_logits(pruned), expected)
    assert pruned.config.num_hidden_layers == 1 and len(decoder_layers(pruned)) == 1


def test_hidden_slicing_shrinks_every_tensor_and_keeps_embeddings_tied(tiny_llama):
    pruned, plan = _prune(tiny_llama, {"hidden_size": 32})
    emb = pruned.get_input_embeddings().weight
    assert emb.shape == (49152, 32) and pruned.get_output_embeddings().weight is emb
    torch.testing.assert_close(emb, tiny_llama.get_input_embeddings().weight[:, plan.hidden])
    layer = decoder_layers(pruned)[0]
    assert layer.self_attn.q_proj.weight.shape == (64, 32) and layer.mlp.down_proj.weight.shape == (
        32,
        128,
    )
    assert pruned.config.head_dim == 16 and torch.isfinite(_logits(pruned)).all()


@pytest.mark.parametrize(
    "target",
    [
        {"num_attention_heads": 2, "num_key_value_heads": 1},
        {"ffn_hidden_size": 24},
        {"hidden_size": 32},
        {"num_layers": 1},
    ],
)
def test_every_axis_reloads_with_plain_transformers(tiny_llama, tmp_path, target):
    pruned, _ = _prune(tiny_llama, target)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(pruned))
    assert count_params(reloaded) == count_params(pruned)


def test_qwen2_with_biases_and_layer_types_reloads(tmp_path):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    pruned, plan = _prune(model, {"num_attention_heads": 2, "ffn_hidden_size": 48, "num_layers": 2})
    assert pruned.config.layer_types == [config.layer_types[i] for i in plan.layers]
    assert decoder_layers(pruned)[0].self_attn.q_proj.bias.shape == (32,)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(pruned))


def test_unsupported_architecture_is_one_line():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    with pytest.raises(
        PassError,
        match=r"^model: layer 0 \(GPT2Block\) of model_type 'gpt2' is of no known family .*"
        r"not a Llama-style layer: no module self_attn\.q_proj",
    ) as info:
        check_supported(model)
    assert "\n" not in str(info.value)
