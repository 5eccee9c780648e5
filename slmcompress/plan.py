"""``slmcompress plan``: every stage of a recipe predicted from the model's config alone.

The numbers come from :mod:`slmcompress.memory_model`; this module walks a recipe's stages
(the runner's residency rule included) and renders the table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from slmcompress.errors import RecipeError
from slmcompress.io.sources import resolve_model_dir
from slmcompress.memory_model import (
    BASE_RSS,
    DEFAULT_MEMORY_FRACTION,
    DTYPE_BYTES,
    PROFILES,
    PUBLISHED_CONFIGS,
    SLACK,
    DeviceProfile,
    ModelDims,
    estimate_calibration_pass,
    estimate_streamed_forward,
    format_bytes,
    load_config,
    parse_bytes,
)
from slmcompress.passes.base import StreamingOptions
from slmcompress.quant.install import auto_group_size


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
    where = ("--config", config) if isinstance(config, str) else ("model", resolved.recipe.model)
    arch = _arch(cfg, *where)
    elem = _elem(resolved.recipe.dtype, profile)
    calib = resolved.recipe.data.calibration
    plans = []
    budget = resolved.recipe.max_memory
    original = arch
    evaluation = resolved.recipe.data.eval
    eval_row = _streamed_eval_plan("input", arch, elem, evaluation, profile, budget)
    plans += [eval_row] if eval_row else []
    for stage in resolved.stages:
        stage_budget = _streaming_options(stage.config).max_memory or budget
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


def _arch(cfg: dict[str, Any], where: str, source: Any) -> ModelDims:
    """The planner's numbers from a config; a missing or non-numeric key is one line naming it."""
    try:
        arch = ModelDims.from_config(cfg)
    except KeyError as exc:
        raise RecipeError(
            f"{where}: {source}: has no {exc.args[0]!r} (not a decoder config)"
        ) from None
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise RecipeError(f"{where}: {source}: a size is not a number ({exc})") from None
    sizes = (
        arch.hidden,
        arch.inter,
        arch.layers,
        arch.heads,
        arch.kv_heads,
        arch.head_dim,
        arch.vocab,
    )
    if min(sizes) < 1:
        raise RecipeError(f"{where}: {source}: sizes must be positive integers")
    return arch


def _streaming_options(config: Any) -> StreamingOptions:
    """A stage's declared streaming keys (defaults for a pass that cannot stream)."""
    if isinstance(config, StreamingOptions):
        return config
    return StreamingOptions(type=config.type)


def _over_budget(arch: ModelDims, elem: int, budget: str | None, profile: DeviceProfile) -> bool:
    """The runner's rule: the model at the compute dtype + runtime exceeds ``max_memory``."""
    limit = parse_bytes(budget) if budget else int(profile.host_memory * DEFAULT_MEMORY_FRACTION)
    return int(arch.params() * elem * SLACK) + BASE_RSS > limit


def _streamed_eval_plan(
    name: str,
    arch: ModelDims,
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


def _group_size(value: int | str, arch: ModelDims) -> int:
    """The stage's group size, ``auto`` resolved as the pass will on this architecture."""
    if value != "auto":
        return value

    return auto_group_size(a for a, _ in arch.linears().values())


def _energy_only(cfg: Any) -> bool:
    """A heads/MLP-only target whose units the re-fit chooses: the prune runs no scoring pass."""
    target = getattr(cfg, "target", None)
    return (
        cfg.reconstruct.select == "energy"
        and target is not None
        and target.hidden_size is None
        and target.num_layers is None
    )


def _plan_stage(
    stage: Any,
    arch: ModelDims,
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
    streaming = _streaming_options(cfg).streaming
    if stage.pass_cls.supports_streaming:  # its work is one layer loop: in memory or streamed
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
        recon = getattr(cfg, "reconstruct", None)
        if recon is not None:  # a second layer loop: the re-fit (on its own calibration)
            re = estimate_calibration_pass(
                arch,
                "reconstruct",
                recon.n_samples or calib.n_samples,
                recon.seq_len or calib.seq_len,
                batch,
                elem,
                profile,
                host_budget=_budget(max_memory, profile),
                streaming=est.streaming,
            )
            scoring = 0.0 if _energy_only(cfg) else est.time_s  # no scoring pass then
            est = replace(
                est,
                host_peak=max(est.host_peak, re.host_peak),
                device_peak=max(est.device_peak, re.device_peak),
                disk=est.disk + re.disk,
                time_s=scoring + re.time_s,
            )
            notes += [f"reconstruct: {n}" for n in re.notes]
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
    arch: ModelDims,
    elem: int,
    profile: DeviceProfile,
    teacher: ModelDims | None = None,
    budget: str | None = None,
) -> StagePlan:
    """Student weights + fp32 grads + AdamW moments, the teacher, logits of one micro-batch.

    The logits term counts (micro-batch x vocabulary) fp32 tensors alive at the loss's peak:
    3 for the fused forward KL (student, teacher, gradient) and 7 for a loss through plain
    autograd -- both measured for forward KL (benchmarks/results/kd_loss_memory.md: 2 inputs
    + 1.26 fused, + 5.0 plain); reverse KL / JSD are taken as the plain case and a top-k
    cache (student logits, its log-softmax, their gradients) as 4, unmeasured. AdamW's foreach
    step adds a parameter-sized temporary and the lm_head a weight-gradient one. Measured on
    Gemma-3-270M (4x256 tokens, 262k vocabulary): 11.4 GB peak RSS for 12.8 GB planned.

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
    loss = getattr(cfg, "loss", "forward_kl")
    copies = 4 if cached else 3 if loss == "forward_kl" else 7
    logits = copies * mb * t * arch.vocab * 4
    acts = mb * t * arch.hidden * arch.layers * 16 * elem
    step_temps = student * 4 + arch.embed_params() * 4  # AdamW denominators, lm_head grad
    peak = int((states + teacher_bytes + logits + acts + step_temps) * SLACK)
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


def _after_stage(stage: Any, arch: ModelDims) -> ModelDims:
    """The architecture after a prune stage (target sizes), unchanged otherwise."""
    target = getattr(stage.config, "target", None)
    if stage.pass_cls.pass_type != "prune" or target is None:
        return arch
    t = target.model_dump() if hasattr(target, "model_dump") else dict(target)
    heads = t.get("num_attention_heads") or arch.heads
    kv_heads = t.get("num_key_value_heads") or arch.kv_heads
    head_pruning = getattr(stage.config, "head_pruning", "within_groups")
    if not t.get("num_key_value_heads") and head_pruning == "kv_groups" and heads != arch.heads:
        kv_heads = heads // (arch.heads // arch.kv_heads)  # whole groups go, as the prune does
    return replace(  # head_dim stays: a prune removes heads, never narrows one
        arch,
        inter=t.get("ffn_hidden_size") or arch.inter,
        heads=heads,
        kv_heads=kv_heads,
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
