"""Memory model: predicted peak host/device memory, disk and time per stage, from the config alone.

No weights are loaded: the numbers come from the architecture (``config.json``), the
recipe (calibration tokens, pass options) and a device profile. The constants were
calibrated against measured peak RSS of the streaming engine on this project's CPU
machine (``benchmarks/scale.py``); the GPU figures use nominal bandwidth/FLOP rates and
are rough (treat time as an order of magnitude, memory as +-25%).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmcompress.errors import RecipeError
from slmcompress.fsutil import read_json_file

GiB = 2**30
#: resident size of a Python process with torch + transformers imported (measured: ~0.55 GiB)
BASE_RSS = int(0.55 * GiB)
#: allocator slack on top of the tensors we count (fragmentation, temporaries we do not model)
SLACK = 1.10
#: default share of available memory the streaming engine may use when max_memory is unset
DEFAULT_MEMORY_FRACTION = 0.8

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def _published(
    arch: str,
    hidden: int,
    inter: int,
    layers: int,
    heads: int,
    kv: int,
    vocab: int,
    tied: bool,
    positions: int,
    theta: float,
    eps: float,
) -> dict[str, Any]:
    """A config.json dict of a published decoder-only model (the fields the planner reads)."""
    return dict(
        architectures=[f"{arch}ForCausalLM"],
        model_type=arch.lower(),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=positions,
        rope_theta=theta,
        rms_norm_eps=eps,
        torch_dtype="bfloat16",
    )


#: a few published configs, for ``slmcompress plan --config llama-3-70b`` without any download
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    # name: (arch, hidden, ffn, layers, heads, kv heads, vocab, tied, positions, rope theta, eps)
    "llama-3-70b": _published("Llama", 8192, 28672, 80, 64, 8, 128256, False, 8192, 5e5, 1e-5),
    "llama-3-8b": _published("Llama", 4096, 14336, 32, 32, 8, 128256, False, 8192, 5e5, 1e-5),
    "qwen2.5-72b": _published("Qwen2", 8192, 29568, 80, 64, 8, 152064, False, 32768, 1e6, 1e-6),
    "mistral-7b": _published("Mistral", 4096, 14336, 32, 32, 8, 32768, False, 32768, 1e6, 1e-5),
    "smollm2-135m": _published("Llama", 576, 1536, 30, 9, 3, 49152, True, 8192, 1e5, 1e-5),
}


@dataclass(frozen=True)
class DeviceProfile:
    """What the plan assumes about a machine (rates are sustained, not peak)."""

    name: str
    kind: str  # "cpu" | "cuda"
    device_memory: int  # bytes on the compute device (host RAM for CPU)
    host_memory: int
    flops: float  # sustained matmul FLOP/s at the compute dtype
    disk_bw: float = 1.0e9  # bytes/s, sequential read/write of shards and spills


PROFILES: dict[str, DeviceProfile] = {
    "h100": DeviceProfile("1x H100 80GB", "cuda", 80 * 10**9, 256 * GiB, 150e12, 2.0e9),
    "cpu-2core": DeviceProfile("2-core CPU, 24 GiB", "cpu", 24 * GiB, 24 * GiB, 60e9, 1.0e9),
}


# ---------------------------------------------------------------- sizes
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: str | int | float) -> int:
    """``"80GB"`` -> 80e9, ``"24GiB"`` -> 24*2**30, ``1e9`` -> 1e9."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise RecipeError(
            f"memory size {value!r}: expected a number with a unit like 80GB, 24GiB, 512MiB"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: float) -> str:
    """Human-readable binary size (``1.5 GiB``)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------- architecture
@dataclass(frozen=True)
class ModelDims:
    """The config numbers parameter counts, memory and time are computed from.

    Read from a ``config.json`` dict (no transformers config, no weights), so the planner,
    the streaming budget and checkpoint summaries can size a model they never build. Not
    :class:`~slmcompress.prune.planner.PruneSizes`, the axes a prune changes (validated
    against a transformers config, named like the prune targets), nor
    :class:`~slmcompress.arch.Family`, where a family's tensors live.
    """

    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelDims:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            hidden=hidden,
            inter=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.inter
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def non_layer_params(self) -> int:
        return self.embed_params() * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.non_layer_params()

    def input_groups(self) -> list[int]:
        """Input width of each Hessian GPTQ keeps per layer (q/k/v share, gate/up share)."""
        return [self.hidden, self.heads * self.head_dim, self.hidden, self.inter]


def load_config(source: str | Path) -> dict[str, Any]:
    """A config dict from a published name, a model dir, or a config.json path."""
    if str(source) in PUBLISHED_CONFIGS:
        return dict(PUBLISHED_CONFIGS[str(source)])
    path = Path(source).expanduser()
    path = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise RecipeError(
            f"config {source!r}: not a published name ({', '.join(PUBLISHED_CONFIGS)}) "
            f"nor a model directory / config.json"
        )
    config = read_json_file(path, "config", RecipeError, max_bytes=64 * 2**20)
    if not isinstance(config, dict):
        raise RecipeError(f"config: {path} must hold a JSON object (a model's config.json)")
    return config


# ---------------------------------------------------------------- working sets
def batch_forward_bytes(arch: ModelDims, batch_tokens: int, seq_len: int, elem: int) -> int:
    """Transient memory of one decoder-layer forward on one calibration batch.

    Hidden states, q/k/v, attention output, the MLP's gate/up/act products, and the
    attention score matrix (materialised by CPU/eager kernels: batch x heads x T x T).
    """
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    per_token = 4 * arch.hidden + 2 * q + 2 * kv + 4 * arch.inter
    scores = (batch_tokens // max(seq_len, 1)) * arch.heads * seq_len * seq_len * 4
    return batch_tokens * per_token * elem + scores


#: fp32 copies of a stacked weight the GPTQ solve holds at once (W, clone, permuted, Q, codes,
#: reordered Q/codes, error and dequant temporaries); calibrated on benchmarks/scale.py
GPTQ_WEIGHT_COPIES = 10
#: fp32 (in, in) matrices alive during the solve (H, damped copy, Cholesky factors, H^-1)
GPTQ_HESSIAN_COPIES = 4


def gptq_groups(arch: ModelDims) -> list[tuple[int, int]]:
    """(in, stacked out) of each GPTQ solve: q/k/v, o, gate/up, down."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    return [
        (arch.hidden, q + 2 * kv),
        (q, arch.hidden),
        (arch.hidden, 2 * arch.inter),
        (arch.inter, arch.hidden),
    ]


def pass_state_bytes(arch: ModelDims, pass_name: str, elem: int) -> int:
    """Per-layer state of the pass: GPTQ Hessians + its solver's largest working set."""
    if pass_name == "gptq":
        hessians = sum(4 * n * n for n in arch.input_groups())
        solve = max(
            GPTQ_WEIGHT_COPIES * 4 * n_in * n_out + GPTQ_HESSIAN_COPIES * 4 * n_in * n_in
            for n_in, n_out in gptq_groups(arch)
        )
        return hessians + solve
    if pass_name == "importance":
        return 4 * (arch.inter + arch.heads + arch.hidden) * 16
    if pass_name == "reconstruct":  # fp32 Gram of down_proj's input + the fp64 solve
        f, h = arch.inter, arch.hidden
        return 4 * f * f + 8 * (f * f + 2 * f * f + 2 * h * f)
    return 0


def layer_peak_bytes(
    arch: ModelDims, elem: int, batch_tokens: int, seq_len: int, pass_name: str
) -> int:
    """Smallest working set of one streamed layer: weights + one batch in/out + pass state."""
    weights = arch.layer_params() * elem
    # a quantized layer's float weights are replaced one linear at a time: +1 packed copy
    packed = arch.layer_params() // 2 if pass_name == "gptq" else 0
    return (
        weights
        + packed
        + batch_forward_bytes(arch, batch_tokens, seq_len, elem)
        + pass_state_bytes(arch, pass_name, elem)
        + 2 * batch_tokens * arch.hidden * elem
    )


def capture_peak_bytes(arch: ModelDims, elem: int, batch_tokens: int) -> int:
    """Capturing layer 0's inputs: the embedding matrix + one batch of hidden states."""
    return arch.embed_params() * elem + 2 * batch_tokens * arch.hidden * elem


def activation_bytes(arch: ModelDims, tokens: int, elem: int) -> int:
    """One layer boundary of calibration activations (hidden states of every token)."""
    return tokens * arch.hidden * elem


@dataclass
class PassEstimate:
    """Prediction for one calibration pass over a model."""

    pass_name: str
    streaming: bool
    host_peak: int
    device_peak: int
    disk: int
    time_s: float
    activation_offload: str
    notes: list[str] = field(default_factory=list)


def streamed_host(host_budget: int, host_work: int, acts: int) -> tuple[int, str, int]:
    """A streamed pass on the host: (activation bytes kept in RAM, offload mode, host peak).

    Two layer boundaries of ``acts`` bytes live at once; what the budget leaves after the
    runtime and one layer's working set stays in RAM, the rest spills to disk.
    """
    room = max(int(host_budget * DEFAULT_MEMORY_FRACTION / SLACK) - BASE_RSS - host_work, 0)
    in_memory = min(2 * acts, room)
    offload = "cpu" if in_memory >= 2 * acts else ("disk" if in_memory == 0 else "auto")
    return in_memory, offload, int(BASE_RSS + (host_work + in_memory) * SLACK)


def estimate_calibration_pass(
    arch: ModelDims,
    pass_name: str,
    n_samples: int,
    seq_len: int,
    batch_size: int,
    elem: int,
    profile: DeviceProfile,
    host_budget: int | None = None,
    streaming: bool | None = None,
    bits: int = 4,
    group_size: int = 128,
) -> PassEstimate:
    """Peak memory/disk/time of GPTQ or importance scoring, streamed or in memory."""
    host_budget = host_budget or profile.host_memory
    tokens, batch_tokens = n_samples * seq_len, batch_size * seq_len
    model_bytes = arch.params() * elem
    layer = layer_peak_bytes(arch, elem, batch_tokens, seq_len, pass_name)
    capture = capture_peak_bytes(arch, elem, batch_tokens)
    acts = activation_bytes(arch, tokens, elem)
    if streaming is None:
        streaming = (
            model_bytes * SLACK + 2 * acts + BASE_RSS > DEFAULT_MEMORY_FRACTION * host_budget
        )
    on_gpu = profile.kind == "cuda"
    notes: list[str] = []
    if streaming:
        work = max(layer, capture)
        host_work = (2 * batch_tokens * arch.hidden * elem + capture) if on_gpu else work
        in_memory_acts, offload, host_peak = streamed_host(host_budget, host_work, acts)
        device_peak = int(layer * SLACK) if on_gpu else host_peak
        disk = output_bytes(arch, pass_name, elem, bits, group_size) * 2 + 2 * acts
        if offload != "cpu":
            notes.append(f"activations spill to disk ({format_bytes(2 * acts - in_memory_acts)})")
    else:
        offload = "cpu"
        host_peak = int(BASE_RSS + (model_bytes + 2 * acts + (0 if on_gpu else layer)) * SLACK)
        device_peak = int(layer * SLACK) if on_gpu else host_peak
        disk = output_bytes(arch, pass_name, elem, bits, group_size)
    time_s = calibration_time(arch, pass_name, tokens, seq_len, elem, profile, streaming)
    if host_peak > host_budget:
        notes.append(
            f"exceeds host memory {format_bytes(host_budget)}: one layer's working set alone is "
            f"{format_bytes(layer)}"
            + (" (GPTQ Hessians/solver of the widest linear)" if pass_name == "gptq" else "")
        )
    if on_gpu and device_peak > profile.device_memory:
        notes.append(f"exceeds device memory {format_bytes(profile.device_memory)}")
    return PassEstimate(pass_name, streaming, host_peak, device_peak, disk, time_s, offload, notes)


#: float32 logits one lm_head chunk holds (streaming.forward.HEAD_CHUNK_BYTES)
HEAD_CHUNK_BYTES = 256 * 2**20


def compute_bound_tokens(elem: int, profile: DeviceProfile) -> int:
    """Tokens per streamed pass above which computing on them outlasts reading the weights.

    A forward costs ~2·params FLOP per token and reads params·elem bytes once per pass, so
    compute >= I/O from ``elem·flops / (2·disk_bw)`` tokens: ~75k tokens for bf16 on the H100
    profile (150 TFLOP/s, 2 GB/s), a few hundred on a CPU.
    """
    return int(elem * profile.flops / (2 * profile.disk_bw))


def estimate_streamed_forward(
    arch: ModelDims,
    n_sequences: int,
    seq_len: int,
    batch_size: int,
    elem: int,
    profile: DeviceProfile,
    host_budget: int | None = None,
    top_k: int | None = None,
    chunk_sequences: int | None = None,
) -> PassEstimate:
    """A streamed forward over ``n_sequences``: top-k teacher cache (``top_k``) or perplexity.

    Weights are read once per chunk of ``chunk_sequences`` (a cache shard; all sequences for
    evaluation); each chunk's boundary activations live in memory up to the budget, on disk
    beyond. The lm_head runs on row chunks of at most ``HEAD_CHUNK_BYTES`` of logits.
    """
    host_budget = host_budget or profile.host_memory
    chunk = min(chunk_sequences or n_sequences, n_sequences)
    tokens, chunk_tokens, batch_tokens = (
        n_sequences * seq_len,
        chunk * seq_len,
        batch_size * seq_len,
    )
    layer = layer_peak_bytes(arch, elem, batch_tokens, seq_len, "forward")
    head = arch.embed_params() * elem + min(HEAD_CHUNK_BYTES, batch_tokens * arch.vocab * 4)
    capture = capture_peak_bytes(arch, elem, batch_tokens)
    per_token = top_k * 8 if top_k else 4  # fp32 values + int32 indices, or one fp32 NLL
    results = chunk_tokens * per_token
    acts = activation_bytes(arch, chunk_tokens, elem)
    on_gpu = profile.kind == "cuda"
    work = max(layer + head, capture) + results
    host_work = (2 * batch_tokens * arch.hidden * elem + capture + results) if on_gpu else work
    in_memory_acts, offload, host_peak = streamed_host(host_budget, host_work, acts)
    device_peak = int((layer + head) * SLACK) if on_gpu else host_peak
    n_chunks = -(-n_sequences // chunk)
    flops = (
        2 * arch.params() * tokens + 4 * arch.layers * tokens * seq_len * arch.heads * arch.head_dim
    )
    io = n_chunks * arch.params() * elem / profile.disk_bw
    disk = 2 * acts - in_memory_acts + (tokens * per_token if top_k else 0)
    notes = []
    if chunk_tokens < compute_bound_tokens(elem, profile):
        notes.append(
            f"{chunk_tokens} tokens per pass: reading the weights dominates; "
            f"{compute_bound_tokens(elem, profile)}+ tokens per pass make it compute-bound"
        )
    name = f"teacher cache top-{top_k}" if top_k else "streamed eval"
    return PassEstimate(
        name, True, host_peak, device_peak, disk, flops / profile.flops + io, offload, notes
    )


def output_bytes(
    arch: ModelDims, pass_name: str, elem: int, bits: int = 4, group_size: int = 128
) -> int:
    """Checkpoint size the pass writes (GPTQ: packed linears + fp16 scales; scores: ~0)."""
    if pass_name == "reconstruct":  # each layer's re-fitted o_proj / down_proj columns
        return arch.layers * arch.hidden * (arch.inter + arch.heads * arch.head_dim) * elem
    if pass_name != "gptq":
        return 4 * arch.layers * (arch.inter + arch.heads + arch.hidden)
    lin = sum(a * b for a, b in arch.linears().values())
    groups = sum(max(a // group_size, 1) * b for a, b in arch.linears().values())
    per_layer = (
        lin * bits // 8 + groups * (2 + bits / 8) + sum(a for a, _ in arch.linears().values()) * 4
    )
    return int(arch.layers * (per_layer + 2 * arch.hidden * elem) + arch.non_layer_params() * elem)


def calibration_time(
    arch: ModelDims,
    pass_name: str,
    tokens: int,
    seq_len: int,
    elem: int,
    profile: DeviceProfile,
    streaming: bool,
) -> float:
    """Seconds: layer forwards (x2 for GPTQ: statistics + quantized outputs; x2.5 for a
    prune re-fit: o_proj and down_proj inputs, then the outputs), GPTQ solves / re-fit Grams
    and solves, weight reads."""
    forward = 2 * arch.layer_params() * tokens + 4 * tokens * seq_len * arch.heads * arch.head_dim
    passes = {"gptq": 2, "reconstruct": 2.5}.get(pass_name, 1)
    flops = arch.layers * forward * passes
    if pass_name == "reconstruct":
        q = arch.heads * arch.head_dim
        grams = 2 * tokens * (arch.inter**2 + q * q)
        solves = 2 * arch.inter**3 + 2 * arch.hidden * arch.inter**2 + 2 * q**3
        flops += arch.layers * (grams + solves)
    if pass_name == "gptq":
        # stacked solve per input group: ~2·out·in² for the OBS updates + in³ for the Cholesky steps
        solve = sum(2 * b * a * a for a, b in arch.linears().values()) + sum(
            2 * n**3 for n in arch.input_groups()
        )
        flops += arch.layers * solve
    io = arch.params() * elem / profile.disk_bw if streaming else 0.0
    # GPTQ's column loop is sequential: a few small kernels per column, latency-bound on GPUs
    columns = arch.layers * sum(arch.input_groups()) if pass_name == "gptq" else 0
    latency = columns * (60e-6 if profile.kind == "cuda" else 0.0)
    return flops / profile.flops + io + latency


def to_dict(estimate: PassEstimate) -> dict[str, Any]:
    return asdict(estimate)


# ---------------------------------------------------------------- recipe plan
