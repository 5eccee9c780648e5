"""Keys, choices, heuristics and tuning candidates (pure Python: no Triton, no GPU)."""

from __future__ import annotations

import pytest

from slmcompress.kernels.routes import (
    PARAMS,
    Choice,
    Key,
    candidates,
    heuristic,
    invalid,
    m_bucket,
)

SHAPES = [(8192, 8192), (28672, 8192), (8192, 28672), (576, 576), (192, 576), (576, 1536)]


def test_m_bucket():
    assert [m_bucket(m) for m in (1, 2, 3, 4, 5, 16, 17, 64, 200, 5000)] == [
        1, 2, 4, 4, 8, 16, 32, 64, 256, 1024,
    ]  # fmt: skip


def test_key_round_trip_and_bad_text():
    key = Key(4, 128, 8192, 28672, 16)
    assert str(key) == "b4-g128-n8192-k28672-m16" and Key.parse(str(key)) == key
    with pytest.raises(ValueError, match="not a kernel key"):
        Key.parse("b4-g128-n8192")


def test_choice_json_round_trip_and_validation():
    choice = Choice.make("tinygemm", inner_k_tiles=8)
    assert Choice.from_json(choice.to_json()) == choice
    assert choice.label() == "tinygemm[ik8]"
    with pytest.raises(ValueError, match="unknown route 'fast'"):
        Choice.make("fast")
    with pytest.raises(ValueError, match="do not match"):
        Choice.make("dequant", block_n=64)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group", [0, 32, 128])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 64, 256, 1024])
def test_heuristic_and_candidates_are_valid(bits, group, m):
    for n, k in SHAPES:
        if k % (32 if bits == 3 else 8):
            continue
        key = Key(bits, group, n, k, m)
        default = heuristic(key)
        assert invalid(default, key) is None, (key, default)
        pool = candidates(key)
        assert pool[0] == default and len(pool) == len(set(pool))
        assert all(invalid(c, key) is None for c in pool)
        assert all(set(c.p) == set(PARAMS[c.route]) for c in pool)


def test_buckets_pick_the_kernel_for_their_regime():
    routes = {m: heuristic(Key(4, 128, 8192, 8192, m)).route for m in (1, 4, 8, 64, 256, 1024)}
    assert routes == {1: "gemv", 4: "gemv", 8: "mm", 64: "mm", 256: "mm", 1024: "dequant"}


def test_the_heuristic_is_safe_and_shape_independent_where_it_can_be():
    """No denormal/PTX tricks without a correctness check; one mm compile for all shapes."""
    defaults = [heuristic(Key(4, 128, n, k, 16)) for n, k in SHAPES]
    assert all(c.p["convert"] == 1 for c in defaults)
    compile_keys = {tuple(v for n, v in c.params if n != "split_k") for c in defaults}
    assert len(compile_keys) == 1  # split_k is a runtime argument


@pytest.mark.parametrize(
    ("choice", "key", "why"),
    [
        (Choice.make("tinygemm", inner_k_tiles=8), Key(3, 128, 64, 256, 1), "4-bit weights"),
        (Choice.make("tinygemm", inner_k_tiles=8), Key(4, 128, 64, 64, 1), "K % 128"),
        (
            Choice.make("mm", block_m=16, block_n=64, block_k=64, split_k=1, group_m=8,
                        num_warps=4, num_stages=2, unpack=1, convert=1, swap_ab=0),
            Key(4, 32, 64, 256, 16),
            "does not divide the group of 32",
        ),
        (
            Choice.make("mm", block_m=16, block_n=64, block_k=32, split_k=1, group_m=8,
                        num_warps=4, num_stages=2, unpack=1, convert=1, swap_ab=0),
            Key(3, 32, 64, 256, 16),
            "4-bit only",
        ),
        (
            Choice.make("gemv", block_m=1, block_n=64, block_kb=2, steps=1, num_warps=1,
                        num_stages=1, convert=1, acc32=1),
            Key(3, 32, 64, 256, 1),
            "64 rows per step do not divide",
        ),
    ],
)  # fmt: skip
def test_invalid_says_why(choice, key, why):
    assert why in invalid(choice, key)


def test_inline_ptx_and_tinygemm_need_a_gpu():
    key = Key(4, 128, 256, 256, 16)
    ptx = Choice.make(
        "mm", block_m=16, block_n=64, block_k=64, split_k=1, group_m=8, num_warps=4,
        num_stages=2, unpack=1, convert=2, swap_ab=0,
    )  # fmt: skip
    assert invalid(ptx, key) is None
    assert "CUDA GPU" in invalid(ptx, key, compiled=False)
    assert "fp16/bf16" in invalid(ptx, key, x_dtype="fp32")
    assert all(
        c.route != "tinygemm" and c.p.get("convert") != 2 for c in candidates(key, compiled=False)
    )
