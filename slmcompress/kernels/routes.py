"""Which kernel serves a call, with which launch parameters: keys, choices, heuristics, candidates.

Pure Python (no Triton, no CUDA): the dispatcher, the on-miss tuner, the tuning sweep
(``benchmarks/kernel_tune.py``) and the ahead-of-time compile check share these lists.

A :class:`Key` is what a tuned choice depends on: bits, scale group, ``N``, ``K`` and the M
bucket (powers of two up to 1024). A :class:`Choice` is a route plus its parameters:

* ``gemv``: CUDA-core split-K GEMV (:func:`.triton_qmm.gemv`), decode;
* ``mm``: ``tl.dot`` kernel, optional split-K and swapped operands (:func:`.triton_qmm.mm`);
* ``dequant``: dequantize to the activation dtype, then cuBLAS (:func:`.triton_qmm.dequant_mm`);
* ``tinygemm``: torch's ``aten._weight_int4pack_mm`` (CUDA, 4-bit, bf16 compute).

Compile count matters for the first token: ``M``, ``N``, ``K`` and ``split_k`` are runtime
arguments, so one compiled kernel serves every layer shape that shares the other parameters;
the heuristic defaults below depend on the shape only through ``split_k`` and ``steps``.
"""

from __future__ import annotations

from dataclasses import dataclass

ROUTES = ("gemv", "mm", "dequant", "tinygemm")
MAX_BUCKET = 1024
#: parameters of each route, in the order labels print them
PARAMS = {
    "gemv": (
        "block_m", "block_n", "block_kb", "steps", "num_warps", "num_stages", "convert", "acc32",
    ),
    "mm": (
        "block_m", "block_n", "block_k", "split_k", "group_m", "num_warps", "num_stages",
        "unpack", "convert", "swap_ab",
    ),
    "dequant": ("block_n", "block_kb", "num_warps", "num_stages", "convert"),
    "tinygemm": ("inner_k_tiles",),
}  # fmt: skip
TINYGEMM_GROUPS = (32, 64, 128, 256)
DEFAULT_SMS = 132  # H100/H200; the dispatcher passes the real count
# fp32 accumulators one thread may hold before sm_90 spills (benchmarks/kernel.py
# --compile-check: GEMV tiles spilled at 64, tl.dot tiles at 128 per thread, every one)
MAX_GEMV_ACC, MAX_DOT_ACC = 32, 64


def m_bucket(m: int) -> int:
    """Tuning bucket of a row count: the next power of two, capped at :data:`MAX_BUCKET`."""
    bucket = 1
    while bucket < m and bucket < MAX_BUCKET:
        bucket *= 2
    return bucket


def vals(bits: int) -> int:
    """Rows per packed block of the serving layout (8 at 4 bits, 32 at 3 bits)."""
    return 8 if bits == 4 else 32


@dataclass(frozen=True, order=True)
class Key:
    """What a tuned choice is keyed by (besides the GPU). ``group`` 0 = per-channel scales."""

    bits: int
    group: int
    n: int
    k: int
    m: int  # the M bucket

    def __str__(self) -> str:
        return f"b{self.bits}-g{self.group}-n{self.n}-k{self.k}-m{self.m}"

    @classmethod
    def parse(cls, text: str) -> Key:
        """Inverse of ``str(key)``; raises ``ValueError`` on anything else."""
        parts = text.split("-")
        tags = ("b", "g", "n", "k", "m")
        if len(parts) != 5 or any(not p.startswith(t) for p, t in zip(parts, tags, strict=True)):
            raise ValueError(f"not a kernel key: {text!r} (expected like b4-g128-n4096-k4096-m1)")
        return cls(*(int(p[1:]) for p in parts))


@dataclass(frozen=True)
class Choice:
    """A route and its launch parameters (all ints; ``acc32``/``swap_ab`` are 0/1)."""

    route: str
    params: tuple[tuple[str, int], ...] = ()

    @classmethod
    def make(cls, route: str, **params: int) -> Choice:
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; valid: {', '.join(ROUTES)}")
        missing = set(PARAMS[route]) - set(params)
        extra = set(params) - set(PARAMS[route])
        if missing or extra:
            raise ValueError(
                f"route {route}: parameters {sorted(params)} do not match {list(PARAMS[route])}"
            )
        return cls(route, tuple((name, int(params[name])) for name in PARAMS[route]))

    @property
    def p(self) -> dict[str, int]:
        return dict(self.params)

    def to_json(self) -> dict:
        return {"route": self.route, **self.p}

    @classmethod
    def from_json(cls, data: dict) -> Choice:
        data = dict(data)
        route = data.pop("route", None)
        return cls.make(route, **{k: v for k, v in data.items() if k in PARAMS.get(route, ())})

    def label(self) -> str:
        """Short human name, e.g. ``gemv[m1 n256 kb1 s2 w2 st1 c1 a1]``."""
        short = {
            "block_m": "m", "block_n": "n", "block_k": "k", "block_kb": "kb", "steps": "s",
            "split_k": "sk", "group_m": "gm", "num_warps": "w", "num_stages": "st",
            "convert": "c", "acc32": "a", "unpack": "u", "swap_ab": "sw", "inner_k_tiles": "ik",
        }  # fmt: skip
        return f"{self.route}[{' '.join(f'{short[n]}{v}' for n, v in self.params)}]"


def _pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def invalid(choice: Choice, key: Key, x_dtype: str = "fp16", compiled: bool = True) -> str | None:
    """Why ``choice`` cannot serve ``key`` (None: it can).

    ``x_dtype``: ``fp16``/``bf16``/``fp32``; ``compiled``: a real GPU (inline PTX allowed).
    """
    p, vk = choice.p, vals(key.bits)
    if key.bits not in (3, 4):
        return f"no kernel for {key.bits}-bit weights"
    if key.k % vk:
        return f"K={key.k} is not a multiple of {vk}"
    if choice.route == "tinygemm":
        if key.bits != 4 or key.group not in TINYGEMM_GROUPS:
            return "tinygemm serves 4-bit weights with groups of 32, 64, 128 or 256"
        if key.n % 8 or key.k % (16 * p["inner_k_tiles"]):
            return f"tinygemm needs N % 8 == 0 and K % {16 * p['inner_k_tiles']} == 0"
        return None if compiled else "tinygemm needs a CUDA GPU"
    sizes = [v for n, v in choice.params if n.startswith("block") or n == "steps"]
    if not all(_pow2(v) for v in sizes):
        return f"block sizes {sizes} must be powers of two"
    if choice.route in ("gemv", "dequant"):
        rows = p["block_kb"] * vk
        if key.group and key.group % rows:
            return f"{rows} rows per step do not divide the group of {key.group}"
        if choice.route == "gemv":
            acc = p["block_m"] * p["block_kb"] * max(1, p["block_n"] // (32 * p["num_warps"]))
            if acc > MAX_GEMV_ACC:
                return f"{acc} accumulators per thread (> {MAX_GEMV_ACC}) spill registers"
        convert = (0, 1, 2, 3) if choice.route == "gemv" else (0, 1)
        return None if p["convert"] in convert else f"{choice.route}: convert must be in {convert}"
    if min(p["block_m"], p["block_n"], p["block_k"]) < 16:
        return "tl.dot tiles need block_m, block_n, block_k >= 16"
    acc = p["block_m"] * p["block_n"] // (32 * p["num_warps"])
    if acc > MAX_DOT_ACC:
        return f"{acc} accumulators per thread (> {MAX_DOT_ACC}) spill registers"
    if key.group and key.group % p["block_k"]:
        return f"block_k={p['block_k']} does not divide the group of {key.group}"
    if p["unpack"] == 1 and key.bits != 4:
        return "unpack=1 is 4-bit only"
    if p["convert"] == 2 and (p["unpack"] != 1 or not compiled or x_dtype == "fp32"):
        return "convert=2 (inline PTX) needs unpack=1, a CUDA GPU and fp16/bf16 activations"
    return None


# --------------------------------------------------------------------------- defaults


def _gemv(key: Key, sms: int, block_n: int = 256, convert: int = 1) -> Choice:
    """Decode default: 1 warp per 128 columns, steps doubled while >= 8 programs per SM remain."""
    block_n = min(block_n, max(32, 1 << (key.n - 1).bit_length()))
    rows = vals(key.bits)
    span_cap = min(key.group or key.k, 8 * rows)
    n_tiles = -(-key.n // block_n)
    steps = 1
    while (steps * 2 * rows <= span_cap) and n_tiles * -(-key.k // (steps * 2 * rows)) >= 8 * sms:
        steps *= 2
    return Choice.make(
        "gemv", block_m=min(key.m, 4), block_n=block_n, block_kb=1, steps=steps,
        num_warps=max(1, min(4, block_n // 128)), num_stages=1, convert=convert, acc32=1,
    )  # fmt: skip


def _split(key: Key, block_m: int, block_n: int, block_k: int, sms: int) -> int:
    """Split K until the grid covers ~2 waves, keeping >= 4 K-tiles per split."""
    tiles = -(-key.m // block_m) * -(-key.n // block_n)
    split = 1
    while tiles * split * 2 <= 2 * sms and key.k // (block_k * split * 2) >= 4:
        split *= 2
    return split


def _mm(key: Key, sms: int, block_m: int, block_n: int, block_k: int, warps: int, stages: int):
    block_k = min(block_k, key.group) if key.group else block_k
    unpack = 1 if key.bits == 4 else 0
    return Choice.make(
        "mm", block_m=block_m, block_n=block_n, block_k=block_k,
        split_k=_split(key, block_m, block_n, block_k, sms), group_m=8, num_warps=warps,
        num_stages=stages, unpack=unpack, convert=1, swap_ab=0,
    )  # fmt: skip


def _dequant(key: Key) -> Choice:
    rows = vals(key.bits)
    block_kb = max(1, min(64 // rows, (key.group or 64) // rows))
    return Choice.make(
        "dequant", block_n=256, block_kb=block_kb, num_warps=4, num_stages=1, convert=1
    )


def heuristic(key: Key, sms: int = DEFAULT_SMS) -> Choice:
    """The choice used on a miss before (or instead of) tuning: no GPU data behind it."""
    if key.m <= 4:
        return _gemv(key, sms)
    if key.m <= 64:
        return _mm(key, sms, max(16, key.m), 64, 64, 4, 2)
    if key.m < 512:
        return _mm(key, sms, 64 if key.m <= 128 else 128, 128, 64, 4 if key.m <= 128 else 8, 3)
    return _dequant(key)


# --------------------------------------------------------------------------- tuning candidates


def _gemv_candidates(key: Key, sms: int) -> list[Choice]:
    out = []
    for block_n, warps in ((128, 1), (256, 1), (256, 2), (512, 1), (512, 2), (512, 4)):
        for block_kb in (1, 2) if key.bits == 4 else (1,):
            for steps in (1, 2, 4, 8):
                out.append(
                    Choice.make(
                        "gemv", block_m=min(key.m, 4), block_n=block_n, block_kb=block_kb,
                        steps=steps, num_warps=warps, num_stages=1, convert=3, acc32=1,
                    )
                )  # fmt: skip
    base = _gemv(key, sms)
    out += [  # the other conversions, fp16/bf16 atomics, 2 stages: the same tile, for the record
        Choice.make("gemv", **{**base.p, "convert": 0}),
        Choice.make("gemv", **{**base.p, "convert": 2}),
        Choice.make("gemv", **{**base.p, "convert": 3}),
        Choice.make("gemv", **{**base.p, "acc32": 0}),
        Choice.make("gemv", **{**base.p, "num_stages": 2}),
    ]
    return out


def _mm_candidates(key: Key, sms: int) -> list[Choice]:
    if key.m <= 64:
        bm = max(16, key.m)
        tiles = [(bm, 64, 64, 4, 2), (bm, 64, 128, 4, 2), (bm, 128, 64, 4, 3), (bm, 128, 128, 8, 3)]
    else:  # at most 64 accumulators per thread (MAX_DOT_ACC)
        big = 64 if key.m <= 128 else 128
        tiles = [(big, 128, 64, 8, 3), (big, 128, 32, 8, 4), (64, 128, 64, 4, 3)]
        tiles += [(64, 256, 64, 8, 3), (128, 64, 64, 4, 4)]
    variants = [(1, 1), (1, 2), (0, 1)] if key.bits == 4 else [(0, 1), (0, 0)]
    out = []
    for block_m, block_n, block_k, warps, stages in tiles:
        for unpack, convert in variants:
            for swap in (0, 1) if key.m <= 64 else (0,):
                bk = min(block_k, key.group) if key.group else block_k
                split = _split(key, block_m, block_n, bk, sms)
                for sk in sorted({split, max(1, split // 2), split * 2}):
                    out.append(
                        Choice.make(
                            "mm", block_m=block_m, block_n=block_n, block_k=bk, split_k=sk,
                            group_m=8, num_warps=warps, num_stages=stages, unpack=unpack,
                            convert=convert, swap_ab=swap,
                        )
                    )  # fmt: skip
    return out


def _dequant_candidates(key: Key) -> list[Choice]:
    rows = vals(key.bits)
    out = []
    for block_n, block_kb, warps in ((256, 64 // rows, 4), (128, 128 // rows, 4), (512, 1, 4)):
        for convert in (0, 1):
            out.append(
                Choice.make(
                    "dequant", block_n=block_n, block_kb=max(1, block_kb), num_warps=warps,
                    num_stages=1, convert=convert,
                )
            )  # fmt: skip
    return out


def candidates(
    key: Key, x_dtype: str = "fp16", compiled: bool = True, sms: int = DEFAULT_SMS
) -> list[Choice]:
    """Every choice the tuner times for ``key`` (valid ones only, heuristic first, no repeats)."""
    pool = [heuristic(key, sms)]
    if key.m <= 4:
        pool += _gemv_candidates(key, sms)
    if key.m >= 4:
        pool += _mm_candidates(key, sms)
    elif key.m == 1:  # tensor cores at M=1 (padded to 16, or swapped): let the timing decide
        pool += [c for c in _mm_candidates(Key(key.bits, key.group, key.n, key.k, 16), sms)][:6]
    if key.m >= 128:
        pool += _dequant_candidates(key)
    pool += [Choice.make("tinygemm", inner_k_tiles=t) for t in (8, 4)]
    seen, out = set(), []
    for choice in pool:
        if choice not in seen and invalid(choice, key, x_dtype, compiled) is None:
            seen.add(choice)
            out.append(choice)
    return out
