"""GPTQ post-training weight quantization (``type: quantize, method: gptq``), layer by layer.

For each decoder layer (via the stage's :class:`~slmcompress.layerwise.LayerLoop`, so memory
follows one layer + the calibration activations, whether the model is in memory or streamed
from disk): linears that read the same input (q/k/v, gate/up)
form an *input group* sharing one Hessian and one stacked GPTQ solve. With
``true_sequential`` the groups are quantized in execution order, each seeing inputs from
the already-quantized earlier groups (q/k/v -> o -> gate/up -> down). The math lives in
:mod:`slmcompress.quant.gptq_solver`, the layer mechanics (hooks, early stops, the residual
decomposition, output shortcuts) in :mod:`slmcompress.layerwise`; the result is the
standard GPTQ v1 checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from transformers import PreTrainedModel

from slmcompress.arch import LLAMA_LAYOUT, Family, layers_prefix, registered_family
from slmcompress.errors import PassError
from slmcompress.layerwise import LayerLoop, LayerStep, ResidualBlock, observe_inputs
from slmcompress.passes.base import RUNTIME_FIELDS, Context, Pass, StageOutput, StreamingOptions
from slmcompress.progress import progress_bar
from slmcompress.quant.clip_search import ClipSearchOptions
from slmcompress.quant.gptq_solver import (
    GPTQResult,
    HessianAccumulator,
    error_stats,
    error_vs_rtn,
    gptq_quantize,
    rtn_rel_output_err,
)
from slmcompress.quant.install import (
    check_group_size,
    ensure_not_quantized,
    gptq_quantization_config,
    install_quant_linear,
    quantizable_linears,
    resolve_group_size,
)
from slmcompress.registry import register_pass

log = logging.getLogger(__name__)


def _family(model: nn.Module) -> Family:
    """The model's family, or the plain Llama layout (GPTQ itself needs none: hooks find groups)."""
    return registered_family(model.config) or LLAMA_LAYOUT


class GPTQConfig(ClipSearchOptions, StreamingOptions):
    """``type: quantize, method: gptq`` (AutoGPTQ/GPTQModel option names).

    ``clip_search`` (see :class:`ClipSearchOptions`; on by default here) picks each group's
    range when the group starts, from the error-compensated weights; ``clip_weighted`` weights each column's
    error by the Hessian diagonal (its mean squared input).
    """

    method: Literal["gptq"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 4
    # auto: the largest of 128/64/32 dividing every input width, so consumers' kernels load it
    group_size: int | Literal["auto"] = "auto"
    sym: bool = False
    act_order: bool = False
    damp_percent: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1)
    true_sequential: bool = True
    static_groups: bool = False
    # on by default for GPTQ: SmolLM2-135M 32x512, g128 act_order: 4-bit ppl 48.06 -> 44.97,
    # 3-bit 117.47 -> 79.01 (benchmarks/results/quantize.md)
    clip_search: bool = True
    clip_weighted: bool = True
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    n_samples: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=8)
    batch_size: int = Field(8, ge=1)

    def quantization_config(self) -> dict:
        """The ``quantization_config`` a checkpoint quantized with these settings carries."""
        return gptq_quantization_config(
            self.bits,
            self.group_size,
            self.sym,
            self.act_order,
            self.damp_percent,
            method="gptq",
            true_sequential=self.true_sequential,
            static_groups=self.static_groups,
        )

    @field_validator("group_size", mode="before")
    @classmethod
    def _check_group_size(cls, value: Any) -> int | str:
        """-1 = one group per output row; a group larger than a layer's input is one group."""
        return check_group_size(value)


@register_pass("quantize", "gptq")
class GPTQPass(Pass):
    """Quantize every eligible Linear with GPTQ, one decoder layer at a time."""

    Config = GPTQConfig
    requires_calibration = True
    supports_streaming = True

    @torch.no_grad()
    def run(self, model: PreTrainedModel, ctx: Context) -> StageOutput:
        ensure_not_quantized(model)
        # resolved once, before the loop: a streamed loop keys its resume state on it
        choice = resolve_group_size(self.config, model)
        ctx.record(choice.warnings, group_size=choice.report)
        self.config = cfg = choice.config
        tokens = ctx.calibration_tokens(cfg.n_samples, cfg.seq_len)  # (N, T)
        key = {"gptq": cfg.model_dump(exclude=RUNTIME_FIELDS)}
        loop = ctx.layer_loop(model, tokens, cfg.batch_size, "gptq", key)
        return self.quantize(loop, ctx)

    def quantize(
        self, loop: LayerLoop, ctx: Context, max_layers: int | None = None
    ) -> StageOutput | None:
        """The layer loop: GPTQ each layer, commit it, finish into the quantized model.

        ``max_layers`` (benchmarks) stops after that many layers and returns ``None``; a
        streamed loop keeps the committed layers for a later resume.
        """
        cfg: GPTQConfig = self.config
        targets = self._targets(loop.model, ctx)
        prefix = layers_prefix(loop.model)
        self._groups_cache: dict[tuple, Any] = {}
        n_layers = loop.num_layers()
        last = [max_layers - 1] if max_layers else None
        with progress_bar(f"gptq w{cfg.bits} g{cfg.group_size}", total=n_layers) as advance:
            for step in loop.steps(last):
                errors, rtn = self.quantize_step(
                    step, f"{prefix}.{step.index}", loop.model, targets, ctx
                )
                loop.commit(step.index, meta={"errors": errors, "rtn_errors": rtn})
                advance(info=_error_line(errors))
        if max_layers and max_layers < n_layers:
            return None
        # resumed layers were quantized by an earlier process: their figures come from disk
        metas = {f"{prefix}.{i}": loop.result_meta(i) for i in range(n_layers)}
        errors = {name: meta.get("errors", {}) for name, meta in metas.items()}
        rtn = {name: meta.get("rtn_errors", {}) for name, meta in metas.items()}
        ctx.record(
            rtn_layer_errors=rtn,
            gptq_layer_errors=errors,
            quantized_linears=sum(len(e) for e in errors.values()),
            gptq_vs_rtn_output_err=error_vs_rtn(errors, rtn),
        )
        return loop.finish({"quantization_config": cfg.quantization_config()})

    def quantize_step(
        self, step: LayerStep, name: str, model: nn.Module, targets: set[str], ctx: Context
    ) -> tuple[dict[str, float], dict[str, float]]:
        """GPTQ the target linears of decoder layer ``name`` and swap in their ``QuantLinear``s.

        ``model`` is the model the step's layer belongs to (a skeleton when streamed).
        Returns each linear's relative output error, GPTQ's and plain RTN's.
        """
        cfg: GPTQConfig = self.config
        local = {n: m for n, m in step.layer.named_modules() if f"{name}.{n}" in targets}
        self._arch = _family(model)
        results = self._quantize_layer(step, name, local, ctx) if local else {}
        for lname, res in results.items():
            install_quant_linear(model, f"{name}.{lname}", res.quantized(cfg.bits, cfg.group_size))
        rtn = {n: _sig(r.stats["rtn_rel_output_err"]) for n, r in results.items()}
        return {lname: _sig(res.stats["rel_output_err"]) for lname, res in results.items()}, rtn

    def _targets(self, model: PreTrainedModel, ctx: Context) -> set[str]:
        """Names of the linears to quantize; everything left out is reported with ctx.warn."""
        cfg: GPTQConfig = self.config
        chosen, skipped = quantizable_linears(model, cfg.ignore, cfg.bits)
        prefix = layers_prefix(model) + "."
        for name in [n for n in chosen if not n.startswith(prefix)]:
            skipped.append(
                f"{name}: outside the decoder layers, where GPTQ has no calibration inputs; kept in float"
            )
            del chosen[name]
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if (
                name.startswith(prefix)
                and not isinstance(module, nn.Linear)
                and isinstance(weight, torch.Tensor)
                and weight.dim() == 2
            ):
                skipped.append(
                    f"{name}: {type(module).__name__} is not an nn.Linear; GPTQ skips it (kept in float)"
                )
        ctx.record(skipped)
        return set(chosen)

    def _quantize_layer(
        self, step: LayerStep, layer_name: str, local: dict[str, nn.Linear], ctx: Context
    ) -> dict[str, GPTQResult]:
        """All sub-steps of one decoder layer; leaves fake-quantized weights in the linears.

        Each sub-step runs the calibration batches with a Hessian hook on its groups' first
        linear, stopped right after the last one (nothing later is needed). The last
        sub-step, a single linear, may instead run whole and keep the outputs, which its
        weight change then updates without a re-forward (``step.shortcut_outputs``).
        """
        cfg: GPTQConfig = self.config
        groups = self._input_groups(step, local)
        if cfg.true_sequential and self._residual_path_ok(step, local, groups):
            return self._quantize_residual_layer(step, layer_name, local, groups, ctx)
        stages = groups if cfg.true_sequential else [[n for g in groups for n in g]]
        results: dict[str, GPTQResult] = {}
        for k, stage in enumerate(stages):
            stage_groups = [g for g in groups if g[0] in stage]
            shortcut = (
                k == len(stages) - 1
                and len(stage_groups) == 1
                and len(stage_groups[0]) == 1
                and step.fits(local[stage[0]].in_features)
            )
            hessians = [
                HessianAccumulator(local[g[0]].in_features, step.device) for g in stage_groups
            ]
            captured: list[torch.Tensor] = []
            with contextlib.ExitStack() as hooks:
                for i, (group, acc) in enumerate(zip(stage_groups, hessians, strict=True)):
                    see = _keeping(acc, captured) if shortcut else acc.add_batch
                    stop = not shortcut and i == len(stage_groups) - 1
                    hooks.enter_context(observe_inputs(local[group[0]], see, stop=stop))
                outputs = step.forward(keep_outputs=shortcut)
            for group, acc in zip(stage_groups, hessians, strict=True):
                deltas = self._solve_group(group, local, acc.H, layer_name, ctx, results)
            if shortcut:
                step.shortcut_outputs(outputs, captured, deltas[0])
        return results

    def _solve_group(
        self,
        group: list[str],
        local: dict[str, nn.Linear],
        H: torch.Tensor,
        layer_name: str,
        ctx: Context,
        results: dict[str, GPTQResult],
    ) -> list[torch.Tensor]:
        """One stacked GPTQ solve for linears sharing ``H``; install fake-quantized weights.

        Returns each linear's weight change ``(out, in)`` (for the output shortcut).
        """
        cfg: GPTQConfig = self.config
        if not torch.isfinite(H).all():  # NaN/Inf in any input reaches H: one check per group
            raise PassError(f"{layer_name}.{group[0]}: NaN/Inf in its calibration inputs")
        weights = [local[n].weight.detach().float() for n in group]
        res = gptq_quantize(
            torch.cat(weights),
            H,
            cfg.bits,
            cfg.group_size,
            cfg.sym,
            cfg.act_order,
            cfg.block_size,
            cfg.damp_percent,
            cfg.static_groups,
            error=False,
            clip=cfg.solver_clip(cfg.clip_weighted),
        )
        if res.stats["damp_retries"]:
            ctx.warn(
                f"{layer_name}.{group[0]}: Hessian not positive definite; "
                f"damp_percent raised to {res.stats['damp_percent']:g}"
            )
        if not torch.isfinite(res.weight).all():
            raise PassError(f"{layer_name}.{group[0]}: GPTQ produced NaN/Inf weights")
        deltas, row = [], 0
        for name, w in zip(group, weights, strict=True):
            rows = slice(row, row + w.shape[0])
            row += w.shape[0]
            part = GPTQResult(
                res.codes[rows],
                res.scales[:, rows],
                res.zeros[:, rows],
                res.g_idx,
                res.weight[rows],
                _stats_with_rtn(w, res.weight[rows], H, cfg),
            )
            results[name] = part
            deltas.append(part.weight - w)
            local[name].weight.data.copy_(part.weight)
        return deltas

    def _residual_path_ok(
        self, step: LayerStep, local: dict[str, nn.Linear], groups: list[list[str]]
    ) -> bool:
        """Whether the layer is a pre-norm residual block the fast path reproduces exactly.

        Structure by the family's names (:class:`~slmcompress.layerwise.ResidualBlock`), all
        its linears targeted (fused ones count as one), the kept ``o_proj`` inputs within the
        memory budget, and, once per layer type, the decomposed forward bit-identical to the
        layer's own forward on the first batch (Gemma's post-norms take the generic path).
        """
        arch = self._arch
        if [set(g) for g in groups] != [set(g) for g in arch.input_groups()]:
            return False
        if not ResidualBlock.applies(step.layer, arch):
            return False
        if not step.fits(local[arch.o].in_features):  # the kept o_proj inputs
            return False
        key = ("residual", type(step.layer), tuple(local))
        if key not in self._groups_cache:
            same = ResidualBlock(step.layer, arch).matches(step)
            if not same:
                log.info(
                    "%s: decomposed forward differs; GPTQ re-runs the layer per sub-step",
                    type(step.layer).__name__,
                )
            self._groups_cache[key] = same
        return self._groups_cache[key]

    def _quantize_residual_layer(
        self,
        step: LayerStep,
        layer_name: str,
        local: dict[str, nn.Linear],
        groups: list[list[str]],
        ctx: Context,
    ) -> dict[str, GPTQResult]:
        """True-sequential GPTQ of a pre-norm residual block for one forward's worth of work.

        Each sub-step's inputs come from the previous sub-step's kept inputs through its
        just-quantized linear (``h2 = h + o_proj(x_o)``, outputs ``h2 + down_proj(x_down)``)
        instead of re-running the layer from its input: attention runs once, and the layer
        outputs need no extra forward. Same inputs, hence the same Hessians, as the
        generic path, which re-runs the layer up to each sub-step.
        """
        block, device = ResidualBlock(step.layer, self._arch), step.device
        results: dict[str, GPTQResult] = {}

        def solve(group: list[str], inputs: Iterator[torch.Tensor], keep: bool) -> list:
            acc = HessianAccumulator(local[group[0]].in_features, device)
            kept = []
            for x in inputs:  # (B, T, in)
                acc.add_batch(x)
                if keep:
                    kept.append(x)
            self._solve_group(group, local, acc.H, layer_name, ctx, results)
            return kept

        def residual() -> Iterator[torch.Tensor]:
            # h2 = h + o_proj(x_o), recomputed: one small matmul instead of a kept (N, T, H)
            for (h, _), x in zip(step.batches(), x_o, strict=True):
                yield h + block.o_proj(x)

        def output(i: int, h: torch.Tensor) -> torch.Tensor:
            h2 = h + block.o_proj(x_o[i])
            x_o[i] = None  # dropped as its output is written
            return h2 + block.down_proj(block.down_input(h2))  # (B, T, H)

        qkv, o_group, mlp_group, down_group = groups
        solve(qkv, (block.attn_norm(h) for h, _ in step.batches()), keep=False)
        x_o = solve(o_group, (block.o_input(h, kw) for h, kw in step.batches()), keep=True)
        solve(mlp_group, (block.mlp_norm(h) for h in residual()), keep=False)
        # down_proj's inputs are (N, T, intermediate), the largest activation of the layer:
        # recomputed for the outputs (gate/up once more) rather than kept, so the pass holds
        # two layer boundaries + x_o, at most what llm-compressor's pipeline holds
        solve(down_group, (block.down_input(h) for h in residual()), keep=False)
        step.produce_outputs(output)
        return results

    def _input_groups(self, step: LayerStep, local: dict[str, nn.Linear]) -> list[list[str]]:
        """Linears grouped by shared input tensor, in execution order (cached per layer type)."""
        key = (type(step.layer), tuple(local))
        if key not in self._groups_cache:
            self._groups_cache[key] = step.input_groups(local)
        return self._groups_cache[key]


def _keeping(acc: HessianAccumulator, kept: list[torch.Tensor]):
    """A hook callback adding to ``acc`` and keeping the input (on the CPU) for the shortcut."""

    def see(x: torch.Tensor) -> None:
        acc.add_batch(x)
        kept.append(x.detach().to("cpu"))

    return see


def _error_line(errors: dict[str, float]) -> str:
    """Compact per-linear relative output errors for the progress bar."""
    return " ".join(f"{name.rsplit('.', 1)[-1]}={err:.2e}" for name, err in errors.items())


def _sig(value: float) -> float:
    """Six significant digits (8-bit errors are ~1e-6: fixed decimals would zero them)."""
    return float(f"{value:.6g}")


def _stats_with_rtn(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig) -> dict:
    """:func:`error_stats` of one linear of a stacked solve, plus the plain-RTN baseline."""
    stats = error_stats(W, Q, H)
    stats["rtn_rel_output_err"] = rtn_rel_output_err(
        W, H, cfg.bits, cfg.group_size, cfg.sym, stats["output_energy"]
    )
    return stats
