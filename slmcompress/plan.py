"""Memory model: predicted peak host/device memory, disk and time per stage, from the config alone.

No weights are loaded: the numbers come from the architecture (``config.json``), the
recipe (calibration tokens, pass options) and a device profile. The constants were
calibrated against measured peak RSS of the streaming engine on this project's CPU
machine (``benchmarks/scale.py``); the GPU figures use nominal bandwidth/FLOP rates and
are rough (treat time as an order of magnitude, memory as +-25%).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from slmcompress.errors import RecipeError

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
class Arch:
    """The few config numbers memory depends on."""

    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Arch:
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
    if not path.is_file():
        raise RecipeError(
            f"config {source!r}: not a published name ({', '.join(PUBLISHED_CONFIGS)}) "
            f"nor a model directory / config.json"
        )
    return json.loads(path.read_text())


# ---------------------------------------------------------------- working sets
def batch_forward_bytes(arch: Arch, batch_tokens: int, seq_len: int, elem: int) -> int:
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


def gptq_groups(arch: Arch) -> list[tuple[int, int]]:
    """(in, stacked out) of each GPTQ solve: q/k/v, o, gate/up, down."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    return [
        (arch.hidden, q + 2 * kv),
        (q, arch.hidden),
        (arch.hidden, 2 * arch.inter),
        (arch.inter, arch.hidden),
    ]


def pass_state_bytes(arch: Arch, pass_name: str, elem: int) -> int:
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
    return 0


def layer_peak_bytes(arch: Arch, elem: int, batch_tokens: int, seq_len: int, pass_name: str) -> int:
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


def capture_peak_bytes(arch: Arch, elem: int, batch_tokens: int) -> int:
    """Capturing layer 0's inputs: the embedding matrix + one batch of hidden states."""
    return arch.embed_params() * elem + 2 * batch_tokens * arch.hidden * elem


def activation_bytes(arch: Arch, tokens: int, elem: int) -> int:
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
    arch: Arch,
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
    arch: Arch,
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
    arch: Arch, pass_name: str, elem: int, bits: int = 4, group_size: int = 128
) -> int:
    """Checkpoint size the pass writes (GPTQ: packed linears + fp16 scales; scores: ~0)."""
    if pass_name != "gptq":
        return 4 * arch.layers * (arch.inter + arch.heads + arch.hidden)
    lin = sum(a * b for a, b in arch.linears().values())
    groups = sum(max(a // group_size, 1) * b for a, b in arch.linears().values())
    per_layer = (
        lin * bits // 8 + groups * (2 + bits / 8) + sum(a for a, _ in arch.linears().values()) * 4
    )
    return int(arch.layers * (per_layer + 2 * arch.hidden * elem) + arch.non_layer_params() * elem)


def calibration_time(
    arch: Arch,
    pass_name: str,
    tokens: int,
    seq_len: int,
    elem: int,
    profile: DeviceProfile,
    streaming: bool,
) -> float:
    """Seconds: layer forwards (x2 for GPTQ: statistics + quantized outputs), GPTQ solves, weight reads."""
    forward = 2 * arch.layer_params() * tokens + 4 * tokens * seq_len * arch.heads * arch.head_dim
    passes = 2 if pass_name == "gptq" else 1
    flops = arch.layers * forward * passes
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
@dataclass
class StagePlan:
    """Predicted resources of one recipe stage."""

    stage: str
    pass_name: str
    streaming: bool
    host_peak: int
    device_peak: int
    disk: int
    time_s: float
    notes: list[str] = field(default_factory=list)


def plan_recipe(
    resolved: Any,
    device_memory: int | str | None = None,
    host_memory: int | str | None = None,
    config: dict[str, Any] | str | None = None,
) -> list[StagePlan]:
    """Predict every stage of a resolved recipe from the model's config alone (no weights).

    Args:
        resolved: a :class:`~slmcompress.recipe.ResolvedRecipe`.
        device_memory: GPU memory (``"80GB"``); given -> a CUDA plan, else this CPU machine.
        host_memory: host RAM (default: the profile's).
        config: a published config name / config dict to use instead of the recipe's model.
    """
    profile = _profile(device_memory, host_memory)
    cfg = (
        config
        if isinstance(config, dict)
        else load_config(config or _model_config_source(resolved.recipe.model))
    )
    arch = Arch.from_config(cfg)
    elem = _elem(resolved.recipe.dtype, profile)
    calib = resolved.recipe.data.calibration
    plans = []
    budget = resolved.recipe.max_memory
    original = arch
    evaluation = resolved.recipe.data.eval
    eval_row = _streamed_eval_plan("input", arch, elem, evaluation, profile, budget)
    plans += [eval_row] if eval_row else []
    for stage in resolved.stages:
        stage_budget = getattr(stage.config, "max_memory", None) or budget
        if stage.pass_cls.pass_type == "distill":
            plans.append(_plan_distill(stage, arch, elem, profile, original, stage_budget))
        else:
            plans.append(_plan_stage(stage, arch, elem, calib, profile, stage_budget))
        arch = _after_stage(stage, arch)
        bits = (
            getattr(stage.config, "bits", None) if stage.pass_cls.pass_type == "quantize" else None
        )
        eval_row = _streamed_eval_plan(stage.name, arch, elem, evaluation, profile, budget, bits)
        plans += [eval_row] if eval_row else []
    return plans


def _over_budget(arch: Arch, elem: int, budget: str | None, profile: DeviceProfile) -> bool:
    """The runner's rule: the model at the compute dtype + runtime exceeds ``max_memory``."""
    limit = parse_bytes(budget) if budget else int(profile.host_memory * DEFAULT_MEMORY_FRACTION)
    return int(arch.params() * elem * SLACK) + BASE_RSS > limit


def _streamed_eval_plan(
    name: str,
    arch: Arch,
    elem: int,
    evaluation: Any,
    profile: DeviceProfile,
    budget: str | None,
    bits: int | None = None,
) -> StagePlan | None:
    """The report of a model over the budget: perplexity by a streamed forward (a row)."""
    if not _over_budget(arch, elem, budget, profile):
        return None
    n = max(evaluation.max_tokens // evaluation.seq_len, 1)
    est = estimate_streamed_forward(
        arch, n, evaluation.seq_len, 1, elem, profile, _budget(budget, profile)
    )
    notes = ["over the memory budget: perplexity streamed; tasks and speed skipped"]
    if bits:
        notes.append("a quantized checkpoint over the budget streams at its float size here")
    return StagePlan(
        f"{name} eval", "eval (streamed)", True, est.host_peak, est.device_peak, est.disk,
        est.time_s, notes + est.notes,
    )  # fmt: skip


def _profile(device_memory: int | str | None, host_memory: int | str | None) -> DeviceProfile:
    base = PROFILES["h100" if device_memory else "cpu-2core"]
    device = parse_bytes(device_memory) if device_memory else base.device_memory
    host = parse_bytes(host_memory) if host_memory else base.host_memory
    name = (
        f"1 GPU, {format_bytes(device)} + host {format_bytes(host)}"
        if device_memory
        else f"CPU, {format_bytes(host)}"
    )
    return replace(
        base, name=name, device_memory=device if device_memory else host, host_memory=host
    )


def _elem(dtype: str, profile: DeviceProfile) -> int:
    if dtype == "auto":
        return 2 if profile.kind == "cuda" else 4
    return DTYPE_BYTES.get(dtype, 4)


def _model_config_source(model: str) -> str:
    """Published configs by name (built-in aliases too: no GGUF conversion just to plan)."""
    if model in PUBLISHED_CONFIGS:
        return model
    from slmcompress.models import resolve_model_dir

    directory = resolve_model_dir(model)
    if directory is None:
        raise RecipeError(
            f"model: {model!r} has no local config.json; pass --config NAME or a model directory"
        )
    return str(directory)


def _budget(max_memory: str | None, profile: DeviceProfile) -> int | None:
    """The host budget a stage streams against: its max_memory, capped by the host's RAM.

    The runner streams when the model exceeds max_memory itself (not a fraction of it), so
    the budget is scaled to the planner's rule of "a fraction of the host".
    """
    if max_memory is None:
        return None
    return min(int(parse_bytes(max_memory) / DEFAULT_MEMORY_FRACTION), profile.host_memory)


def _group_size(value: int | str, arch: Arch) -> int:
    """The stage's group size, ``auto`` resolved as the pass will on this architecture."""
    if value != "auto":
        return value
    from slmcompress.quant.convert import auto_group_size

    return auto_group_size(a for a, _ in arch.linears().values())


def _plan_stage(
    stage: Any,
    arch: Arch,
    elem: int,
    calib: Any,
    profile: DeviceProfile,
    max_memory: str | None = None,
) -> StagePlan:
    cfg = stage.config
    kind = stage.pass_cls.pass_type + (
        f".{stage.pass_cls.pass_method}" if stage.pass_cls.pass_method else ""
    )
    n = getattr(cfg, "n_samples", None) or calib.n_samples
    t = getattr(cfg, "seq_len", None) or calib.seq_len
    batch = getattr(cfg, "batch_size", 1)
    streaming = getattr(cfg, "streaming", None)
    if kind in ("quantize.gptq", "prune"):
        pass_name = "gptq" if kind == "quantize.gptq" else "importance"
        est = estimate_calibration_pass(
            arch,
            pass_name,
            n,
            t,
            batch,
            elem,
            profile,
            host_budget=_budget(max_memory, profile),
            streaming=streaming,
            bits=getattr(cfg, "bits", 4),
            group_size=_group_size(getattr(cfg, "group_size", 128), arch),
        )
        notes = list(est.notes)
        return StagePlan(
            stage.name,
            kind,
            est.streaming,
            est.host_peak,
            est.device_peak,
            est.disk,
            est.time_s,
            notes,
        )
    model = int(arch.params() * elem * SLACK) + BASE_RSS
    disk = arch.params() * (elem if kind != "quantize.rtn" else 1)
    return StagePlan(
        stage.name,
        kind,
        False,
        model,
        model,
        disk,
        arch.params() * elem / profile.disk_bw,
        ["holds the whole model in memory"],
    )


def _plan_distill(
    stage: Any,
    arch: Arch,
    elem: int,
    profile: DeviceProfile,
    teacher: Arch | None = None,
    budget: str | None = None,
) -> StagePlan:
    """Student weights + fp32 grads + AdamW moments, the teacher, logits of one micro-batch.

    A teacher over the memory budget is not loaded: the stage first streams it into a
    top-k cache over the training tokens (:func:`estimate_streamed_forward`).
    """
    cfg = stage.config
    teacher = teacher or arch
    student = arch.params()
    states = student * (elem + 4 + 8)
    t, mb = getattr(cfg, "seq_len", 512), getattr(cfg, "micro_batch_size", 1)
    tokens = getattr(cfg, "max_tokens", None) or 0
    streamed = not getattr(cfg, "teacher_cache", None) and _over_budget(
        teacher, elem, budget, profile
    )
    cached = streamed or getattr(cfg, "teacher_cache", None)
    teacher_bytes = 0 if cached else teacher.params() * elem
    logits = 3 * mb * t * arch.vocab * 4
    acts = mb * t * arch.hidden * arch.layers * 16 * elem
    peak = int((states + teacher_bytes + logits + acts) * SLACK)
    time_s = 8 * student * tokens / profile.flops if tokens else 0.0
    disk = 2 * student * elem + states
    notes = []
    host_peak = peak + BASE_RSS
    if streamed:
        k = getattr(cfg, "top_k", None) or 64
        cache = estimate_streamed_forward(
            teacher, max(tokens // t, 1), t, 4, elem, profile, _budget(budget, profile), k, 256
        )
        time_s += cache.time_s
        disk += cache.disk
        host_peak, peak = max(host_peak, cache.host_peak), max(peak, cache.device_peak)
        notes.append(
            f"teacher over the memory budget: streamed into a top-{k} cache first "
            f"({_duration(cache.time_s)}, {format_bytes(cache.disk)} on disk)"
        )
    if peak > profile.device_memory:
        world = -(-peak // profile.device_memory)
        notes.append(
            f"exceeds one device ({format_bytes(profile.device_memory)}): run with torchrun on at least "
            f"{world} devices (FSDP student, teacher_sharding: sharded)"
        )
    return StagePlan(stage.name, "distill", False, host_peak, peak, disk, time_s, notes)


def _after_stage(stage: Any, arch: Arch) -> Arch:
    """The architecture after a prune stage (target sizes), unchanged otherwise."""
    target = getattr(stage.config, "target", None)
    if stage.pass_cls.pass_type != "prune" or target is None:
        return arch
    t = target.model_dump() if hasattr(target, "model_dump") else dict(target)
    return replace(
        arch,
        inter=t.get("ffn_hidden_size") or arch.inter,
        heads=t.get("num_attention_heads") or arch.heads,
        hidden=t.get("hidden_size") or arch.hidden,
        layers=t.get("num_layers") or arch.layers,
    )


def plan_to_dict(plans: list[StagePlan]) -> list[dict[str, Any]]:
    return [asdict(p) for p in plans]


def render_plan(plans: list[StagePlan], title: str = "") -> str:
    """A plain-text table (markdown) of the plan."""
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| stage | pass | streaming | host peak | device peak | disk | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        lines.append(
            f"| {p.stage} | {p.pass_name} | {'yes' if p.streaming else 'no'} | {format_bytes(p.host_peak)} | "
            f"{format_bytes(p.device_peak)} | {format_bytes(p.disk)} | {_duration(p.time_s)} |"
        )
    notes = [f"- {p.stage}: {n}" for p in plans for n in p.notes]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _duration(seconds: float) -> str:
    if seconds >= 3600 * 48:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
