"""Targets -> sizes: GQA-consistent head counts, one-line errors naming the field, param_ratio."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoConfig, LlamaForCausalLM

from slmcompress.errors import PassError
from slmcompress.eval.report import count_params
from slmcompress.prune.planner import (
    PruneSizes,
    param_counts,
    resolve_target,
    select_heads,
    select_layers,
    sizes_for_param_ratio,
    sizes_of,
)

SMOL = PruneSizes(
    hidden_size=576,
    ffn_hidden_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    num_layers=30,
    head_dim=64,
)


def test_within_groups_keeps_kv_heads_and_kv_groups_keeps_ratio():
    within = resolve_target(SMOL, {"num_attention_heads": 6}, "within_groups")
    groups = resolve_target(SMOL, {"num_attention_heads": 6}, "kv_groups")
    assert (within.num_attention_heads, within.num_key_value_heads) == (6, 3)
    assert (groups.num_attention_heads, groups.num_key_value_heads) == (6, 2)
    assert (
        resolve_target(SMOL, {"num_attention_heads": 4, "num_key_value_heads": 2}).heads_per_group
        == 2
    )


@pytest.mark.parametrize(
    ("target", "mode", "field"),
    [
        ({"ffn_hidden_size": 2048}, "within_groups", "target.ffn_hidden_size"),
        ({"num_layers": 31}, "within_groups", "target.num_layers"),
        (
            {"num_attention_heads": 7},
            "within_groups",
            "target.num_attention_heads",
        ),  # 7 % 3 KV heads
        (
            {"num_attention_heads": 4},
            "kv_groups",
            "target.num_attention_heads",
        ),  # not whole groups of 3
        (
            {"num_attention_heads": 6, "num_key_value_heads": 1},
            "within_groups",
            "target.num_key_value_heads",
        ),
        ({"num_key_value_heads": 4}, "within_groups", "target.num_key_value_heads"),
    ],
)
def test_bad_targets_name_the_field(target, mode, field):
    with pytest.raises(PassError) as info:
        resolve_target(SMOL, target, mode)
    message = str(info.value)
    assert message.startswith(field + ":") and "\n" not in message


def test_hidden_size_must_divide_by_heads_as_llama_requires():
    config = tiny_llama_config(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    with pytest.raises(PassError, match=r"^stages\[0\]\.target\.hidden_size: 50 "):
        resolve_target(
            sizes_of(config), {"hidden_size": 50}, where="stages[0].target", config=config
        )
    assert resolve_target(sizes_of(config), {"hidden_size": 48}, config=config).hidden_size == 48


def test_param_counts_match_a_built_model():
    config = tiny_llama_config()
    sizes = resolve_target(
        sizes_of(config), {"ffn_hidden_size": 40, "num_layers": 1, "hidden_size": 32}
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert param_counts(config, sizes_of(config)) == count_params(model)
    assert param_counts(config, sizes)[1] < count_params(model)[1]


@pytest.mark.parametrize("axis", ["mlp", "heads", "hidden", "layers"])
def test_param_ratio_lands_near_the_ratio_on_smollm2(axis):
    from slmcompress.io.sources import builtin_model_dir

    config = AutoConfig.from_pretrained(builtin_model_dir("smollm2-135m"))
    full = param_counts(config, sizes_of(config))[1]
    sizes = sizes_for_param_ratio(config, 0.8, axis, head_pruning="kv_groups")
    got = param_counts(config, sizes)[1] / full
    # granularity: whole KV groups (3 of 9 heads), 72 hidden channels (lcm of 8 and 9 heads)
    tolerance = {"heads": 0.1, "layers": 0.04, "hidden": 0.07}.get(axis, 0.01)
    assert abs(got - 0.8) < tolerance, (axis, sizes, got)
    assert sizes.hidden_size % sizes.num_attention_heads == 0


def test_select_heads_keeps_whole_groups_in_order():
    scores = torch.tensor([0.1, 0.9, 0.5, 5.0, 4.0, 3.0, 0.2, 0.3, 0.4])  # 3 groups of 3
    heads, kv = select_heads(scores, n_kv=3, new_heads=4, new_kv=2)
    assert kv.tolist() == [0, 1]  # group 2 has the lowest summed score
    assert heads.tolist() == [1, 2, 3, 4]  # best 2 of each kept group, group-major
    heads, kv = select_heads(scores, n_kv=3, new_heads=6, new_kv=3)
    assert kv.tolist() == [0, 1, 2] and heads.tolist() == [1, 2, 3, 4, 7, 8]


def test_select_layers_per_layer_and_contiguous():
    scores = torch.tensor([9.0, 0.4, 8.0, 0.5, 0.6, 7.0])
    assert select_layers(scores, 4, "per_layer") == [0, 2, 4, 5]
    assert select_layers(scores, 4, "contiguous") == [0, 1, 2, 5]  # block 3..4 has the lowest sum
    blocks = torch.tensor([5.0, 0.1, 5.0, 5.0, 5.0])  # block scores given directly (k=2)
    assert select_layers(scores, 4, "contiguous", blocks) == [0, 3, 4, 5]


def test_depth_pruned_config_records_the_original_layers_composed_over_stages():
    from dataclasses import replace

    from slmcompress.prune.planner import SOURCE_LAYERS_KEY, pruned_config, sizes_of

    config = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4)).config
    width_only = pruned_config(config, sizes_of(config), [0, 1, 2, 3])
    assert getattr(width_only, SOURCE_LAYERS_KEY, None) is None
    once = pruned_config(config, replace(sizes_of(config), num_layers=3), [0, 2, 3])
    assert getattr(once, SOURCE_LAYERS_KEY) == [0, 2, 3]
    twice = pruned_config(once, replace(sizes_of(once), num_layers=2), [0, 2])
    assert getattr(twice, SOURCE_LAYERS_KEY) == [0, 3]
    again = pruned_config(twice, sizes_of(twice), [0, 1])  # later width-only pruning keeps it
    assert getattr(again, SOURCE_LAYERS_KEY) == [0, 3]
    assert AutoConfig.for_model(**again.to_dict()).to_dict()[SOURCE_LAYERS_KEY] == [0, 3]
