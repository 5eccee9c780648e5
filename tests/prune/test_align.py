"""Alignment of pruned widths: rounding, the report line, one-line errors naming the axis."""

from __future__ import annotations

import pytest

from slmcompress.errors import PassError
from slmcompress.prune.align import align_sizes
from slmcompress.prune.planner import PruneSizes

SMOLLM2 = PruneSizes(576, 1536, 9, 3, 30, 64)


def _sizes(**changes):
    from dataclasses import replace

    return replace(SMOLLM2, **changes)


def test_auto_rounds_pruned_widths_to_128_or_64():
    sizes, report = align_sizes(SMOLLM2, _sizes(ffn_hidden_size=1000, hidden_size=500), "auto")
    assert sizes.ffn_hidden_size == 1024  # 1536 is a multiple of 128
    assert sizes.hidden_size == 512  # 576 is a multiple of 64 only
    assert report.multiples == {"ffn_hidden_size": 128, "hidden_size": 64}
    assert report.rounded == {"ffn_hidden_size": [1000, 1024], "hidden_size": [500, 512]}
    assert "ffn_hidden_size 1000->1024" in report.line()


def test_auto_keeps_a_target_that_is_already_a_multiple_of_64():
    sizes, report = align_sizes(SMOLLM2, _sizes(ffn_hidden_size=704), "auto")
    assert sizes.ffn_hidden_size == 704 and report.multiples == {"ffn_hidden_size": 64}
    assert align_sizes(SMOLLM2, _sizes(ffn_hidden_size=704), 128)[0].ffn_hidden_size == 768


def test_aligned_targets_and_untouched_widths_stay():
    target = _sizes(ffn_hidden_size=768, num_attention_heads=6)
    sizes, report = align_sizes(SMOLLM2, target, "auto")
    assert sizes == target and not report.rounded


def test_auto_falls_back_to_64_when_128_prunes_nothing():
    tiny = PruneSizes(64, 128, 4, 2, 2, 16)
    sizes, _ = align_sizes(tiny, _tiny(tiny, ffn_hidden_size=40), "auto")
    assert sizes.ffn_hidden_size == 64


def _tiny(tiny, **changes):
    from dataclasses import replace

    return replace(tiny, **changes)


@pytest.mark.parametrize(
    ("align", "changes", "message"),
    [
        (
            "auto",
            {"hidden_size": 32},
            r"^target\.hidden_size: 32 cannot be rounded to a multiple of 64",
        ),
        (128, {"ffn_hidden_size": 1500}, r"^target\.ffn_hidden_size: 1500 cannot be rounded"),
        (
            128,
            {"num_attention_heads": 3, "num_key_value_heads": 1},
            r"^target\.num_attention_heads: 3 heads x head_dim 64 = 192 channels, not a multiple of 128",
        ),
    ],
)
def test_unreachable_targets_name_the_axis(align, changes, message):
    current = PruneSizes(64, 128, 4, 2, 2, 16) if "hidden_size" in changes else SMOLLM2
    with pytest.raises(PassError, match=message) as info:
        align_sizes(current, _tiny(current, **changes), align)
    assert "\n" not in str(info.value)


def test_none_keeps_targets_exactly():
    target = _sizes(ffn_hidden_size=1000)
    assert align_sizes(SMOLLM2, target, "none")[0] == target
