"""Importance statistics: the Minitron/ModelOpt aggregation, hooks through the calibration engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slmcompress.arch import decoder_layers
from slmcompress.prune.importance import (
    BatchL2,
    activation_importance,
    channel_stat,
    head_scores,
    layers_removed,
    lm_loss,
    loss_depth_scores,
    magnitude_importance,
    projected_head_stat,
    random_importance,
)

CPU = torch.device("cpu")


def test_aggregation_is_mean_abs_over_sequence_then_l2_over_batch():
    x = torch.randn(3, 5, 4)  # (B, T, C)
    acc = BatchL2()
    acc.add(channel_stat(x[:2]))
    acc.add(channel_stat(x[2:]))
    expected = x.abs().mean(dim=1).pow(2).sum(dim=0).sqrt()
    torch.testing.assert_close(acc.value(), expected)
    channels = torch.arange(6.0)
    torch.testing.assert_close(
        head_scores(channels, 2), torch.stack([channels[:3].norm(), channels[3:].norm()])
    )


def _reference_stats(model, tokens):
    """Hooks on a plain full-model forward, one sample at a time (no calib engine)."""
    stats = {
        "o": [BatchL2() for _ in decoder_layers(model)],
        "down": [BatchL2() for _ in decoder_layers(model)],
    }
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        handles.append(
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda _m, a, i=i: stats["o"][i].add(channel_stat(a[0]))
            )
        )
        handles.append(
            layer.mlp.down_proj.register_forward_pre_hook(
                lambda _m, a, i=i: stats["down"][i].add(channel_stat(a[0]))
            )
        )
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    for h in handles:
        h.remove()
    return stats, out.hidden_states


def test_activation_importance_matches_full_forward_hooks(tiny_llama):
    tokens = torch.randint(0, 1000, (4, 16))
    imp = activation_importance(
        tiny_llama, tokens, CPU, batch_size=2, block_size=2, head_metric="attention_output"
    )
    ref, hidden = _reference_stats(tiny_llama, tokens)
    n_heads = tiny_llama.config.num_attention_heads
    for i in range(2):
        torch.testing.assert_close(
            imp.heads[i], head_scores(ref["o"][i].value(), n_heads), rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(imp.neurons[i], ref["down"][i].value(), rtol=1e-4, atol=1e-6)
    cos = F.cosine_similarity(hidden[0], hidden[1], dim=-1)  # layer 0: input vs output
    assert imp.layers[0].item() == pytest.approx((1 - cos).mean().item(), rel=1e-4)
    assert imp.hidden.shape == (64,) and (imp.hidden > 0).all()
    assert imp.blocks.shape == (1,)  # 2 layers, one block of 2


def test_removing_a_layer_is_an_identity_and_restores(tiny_llama):
    tokens = torch.randint(0, 1000, (2, 16))
    base = lm_loss(tiny_llama, tokens)
    original = decoder_layers(tiny_llama)[1]
    with layers_removed(tiny_llama, [1]):
        skipped = lm_loss(tiny_llama, tokens)
    assert decoder_layers(tiny_llama)[1] is original and lm_loss(tiny_llama, tokens) == base
    scores, got_base = loss_depth_scores(tiny_llama, tokens, block_size=1)
    assert got_base == base and scores[1].item() == pytest.approx(skipped - base)
    assert loss_depth_scores(tiny_llama, tokens, block_size=2)[0].shape == (1,)


def test_baselines_have_the_right_shapes_and_are_seeded(tiny_llama):
    mag = magnitude_importance(tiny_llama)
    assert [h.shape for h in mag.heads] == [(4,), (4,)] and mag.neurons[0].shape == (128,)
    assert mag.hidden.shape == (64,) and mag.layers.shape == (2,)
    torch.testing.assert_close(
        random_importance(tiny_llama, 3).hidden, random_importance(tiny_llama, 3).hidden
    )
    assert not torch.equal(
        random_importance(tiny_llama, 3).hidden, random_importance(tiny_llama, 4).hidden
    )


def test_projected_head_stat_is_the_norm_of_each_heads_o_proj_contribution():
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 3 * 4), torch.randn(6, 3 * 4)  # 3 heads of dim 4, hidden 6
    got = projected_head_stat(x, w, 3)
    for h in range(3):
        cols = slice(4 * h, 4 * h + 4)
        contribution = x[..., cols] @ w[:, cols].T  # (B, T, hidden)
        torch.testing.assert_close(got[:, h], contribution.norm(dim=-1).mean(dim=1))


def test_projected_metric_sees_a_head_whose_output_is_discarded(tiny_llama):
    """A head with large attention output but zero o_proj columns writes nothing: only the
    projected metric ranks it last (the attention-output norm cannot see o_proj)."""
    layer = decoder_layers(tiny_llama)[0]
    head_dim = tiny_llama.config.head_dim
    with torch.no_grad():
        layer.self_attn.o_proj.weight[:, :head_dim] = 0  # head 0's contribution is gone
    tokens = torch.randint(0, 1000, (4, 16))
    projected = activation_importance(tiny_llama, tokens, CPU, batch_size=2)
    attention = activation_importance(tiny_llama, tokens, CPU, 2, head_metric="attention_output")
    assert projected.heads[0][0] == 0 and projected.heads[0].argmin() == 0
    assert attention.heads[0][0] > 0
    assert projected.extra["head_metric"] == "projected_output"


def test_unknown_head_metric_is_a_one_line_error(tiny_llama):
    from slmcompress.errors import PassError

    with pytest.raises(PassError, match="head_metric: must be one of"):
        activation_importance(tiny_llama, torch.randint(0, 1000, (1, 8)), CPU, head_metric="x")
