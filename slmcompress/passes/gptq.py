"""GPTQ post-training weight quantization (``type: quantize, method: gptq``), layer by layer.

For each decoder layer (via :func:`slmcompress.calib.layerwise`, so memory follows one
layer + the calibration activations): linears that read the same input (q/k/v, gate/up)
form an *input group* sharing one Hessian and one stacked GPTQ solve. With
``true_sequential`` the groups are quantized in execution order, each seeing inputs from
the already-quantized earlier groups (q/k/v -> o -> gate/up -> down). The math lives in
:mod:`slmcompress.quant.gptq_solver`; the result is the standard GPTQ v1 checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from transformers import PreTrainedModel

from slmcompress.calib import LayerStep, _layer_output, _to, decoder_layers, layerwise
from slmcompress.errors import PassError
from slmcompress.passes.base import Context, Pass, PassConfig
from slmcompress.progress import progress_bar
from slmcompress.quant.convert import (
    ensure_not_quantized,
    gptq_quantization_config,
    install_quant_linear,
    quantizable_linears,
)
from slmcompress.quant.gptq_solver import GPTQResult, HessianAccumulator, error_stats, gptq_quantize
from slmcompress.registry import register_pass

#: keep the last group's inputs to update the layer outputs without a re-forward, up to this size
_SHORTCUT_MAX_BYTES = 2 * 2**30


class GPTQConfig(PassConfig):
    """``type: quantize, method: gptq`` (AutoGPTQ/GPTQModel option names)."""

    method: Literal["gptq"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    damp_percent: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1)
    true_sequential: bool = True
    static_groups: bool = False
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    n_samples: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=8)
    batch_size: int = Field(8, ge=1)
    # streaming (slmcompress.streaming): layers read from disk one at a time, resumable per layer
    streaming: bool | None = None  # None: stream when the runner handed over an unloaded skeleton
    max_memory: str | None = None  # host budget, e.g. "24GiB" (default: 80% of available RAM)
    activation_offload: Literal["auto", "cpu", "disk"] = "auto"

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, value: int) -> int:
        """-1 = one group per output row; a group larger than a layer's input is one group."""
        if value == 0 or value < -1:
            raise ValueError("must be -1 (per-channel) or a positive group size")
        return value


class _StopForward(Exception):
    """Raised by a hook once the inputs a sub-step needs are observed."""


@dataclass
class _Observer:
    """Pre-hook on the first linear of an input group: Hessian, optional captured inputs."""

    name: str
    columns: int
    device: torch.device
    stop: bool = False
    capture: bool = False
    captured: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hessian = HessianAccumulator(self.columns, self.device)

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["input"]
        self.hessian.add_batch(x)
        if self.capture:
            self.captured.append(x.detach().to("cpu"))
        if self.stop:
            raise _StopForward


@register_pass("quantize", "gptq")
class GPTQPass(Pass):
    """Quantize every eligible Linear with GPTQ, one decoder layer at a time."""

    Config = GPTQConfig
    requires_calibration = True

    @torch.no_grad()
    def run(self, model: PreTrainedModel, ctx: Context) -> PreTrainedModel:
        cfg: GPTQConfig = self.config
        ensure_not_quantized(model)
        from slmcompress.streaming.wiring import streamed_gptq

        if (streamed := streamed_gptq(self, model, ctx)) is not None:
            return streamed
        targets = self._targets(model, ctx)
        tokens = ctx.calibration_tokens(cfg.n_samples, cfg.seq_len)  # (N, T)
        prefix = _layers_prefix(model)
        errors: dict[str, dict[str, float]] = {}
        self._groups_cache: dict[tuple, list[list[str]]] = {}
        n_layers = len(decoder_layers(model))
        with progress_bar(f"gptq w{cfg.bits} g{cfg.group_size}", total=n_layers) as advance:
            for step in layerwise(model, tokens, ctx.device, cfg.batch_size):
                name = f"{prefix}.{step.index}"
                local = {n: m for n, m in step.layer.named_modules() if f"{name}.{n}" in targets}
                results = self._quantize_layer(step, name, local, ctx) if local else {}
                for lname, res in results.items():
                    install_quant_linear(
                        model,
                        f"{name}.{lname}",
                        res.codes,
                        res.scales,
                        res.zeros,
                        res.g_idx,
                        cfg.bits,
                        cfg.group_size,
                    )
                errors[name] = {
                    lname: round(res.stats["rel_output_err"], 6) for lname, res in results.items()
                }
                advance(info=_error_line(errors[name]))
        model.config.quantization_config = gptq_quantization_config(
            cfg.bits,
            cfg.group_size,
            cfg.sym,
            cfg.act_order,
            cfg.damp_percent,
            method="gptq",
            true_sequential=cfg.true_sequential,
            static_groups=cfg.static_groups,
        )
        ctx.extra_metrics["gptq_layer_errors"] = errors
        ctx.extra_metrics["quantized_linears"] = sum(len(e) for e in errors.values())
        return model

    def _targets(self, model: PreTrainedModel, ctx: Context) -> set[str]:
        """Names of the linears to quantize; everything left out is reported with ctx.warn."""
        cfg: GPTQConfig = self.config
        chosen, skipped = quantizable_linears(model, cfg.ignore, cfg.bits)
        for message in skipped:
            ctx.warn(message)
        prefix = _layers_prefix(model) + "."
        for name in [n for n in chosen if not n.startswith(prefix)]:
            ctx.warn(
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
                ctx.warn(
                    f"{name}: {type(module).__name__} is not an nn.Linear; GPTQ skips it (kept in float)"
                )
        return set(chosen)

    def _quantize_layer(
        self, step: LayerStep, layer_name: str, local: dict[str, nn.Linear], ctx: Context
    ) -> dict[str, GPTQResult]:
        """All sub-steps of one decoder layer; leaves fake-quantized weights in the linears."""
        cfg: GPTQConfig = self.config
        groups = self._input_groups(step, local)
        stages = groups if cfg.true_sequential else [[n for g in groups for n in g]]
        results: dict[str, GPTQResult] = {}
        for k, stage in enumerate(stages):
            stage_groups = [g for g in groups if g[0] in stage]
            last = k == len(stages) - 1
            shortcut = (
                last
                and len(stage_groups) == 1
                and len(stage_groups[0]) == 1
                and _fits(step, local[stage[0]])
            )
            observers = [
                _Observer(
                    f"{layer_name}.{g[0]}",
                    local[g[0]].in_features,
                    step.device,
                    stop=not shortcut and i == len(stage_groups) - 1,
                    capture=shortcut,
                )
                for i, g in enumerate(stage_groups)
            ]
            handles = [
                local[g[0]].register_forward_pre_hook(obs, with_kwargs=True)
                for g, obs in zip(stage_groups, observers, strict=True)
            ]
            try:
                outputs = _run_batches(step, keep_outputs=shortcut)
            finally:
                for handle in handles:
                    handle.remove()
            for group, obs in zip(stage_groups, observers, strict=True):
                H = obs.hessian.H  # (in, in)
                deltas = self._solve_group(group, local, H, layer_name, ctx, results)
            if shortcut:
                _shortcut_outputs(step, outputs, observers[0].captured, deltas[0])
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
                error_stats(w, res.weight[rows], H),
            )
            results[name] = part
            deltas.append(part.weight - w)
            local[name].weight.data.copy_(part.weight)
        return deltas

    def _input_groups(self, step: LayerStep, local: dict[str, nn.Linear]) -> list[list[str]]:
        """Linears grouped by shared input tensor, in execution order (cached per layer type)."""
        key = (type(step.layer), tuple(local))
        if key not in self._groups_cache:
            self._groups_cache[key] = _discover_input_groups(step, local)
        return self._groups_cache[key]


def _discover_input_groups(step: LayerStep, local: dict[str, nn.Linear]) -> list[list[str]]:
    """Run one batch with hooks recording which linears receive the very same tensor."""
    seen: list[tuple[str, torch.Tensor]] = []

    def make_hook(name: str) -> Callable:
        return lambda _m, args, kwargs: seen.append((name, args[0] if args else kwargs["input"]))

    handles = [
        m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in local.items()
    ]
    try:
        batch = step.inputs[0]
        step.layer(batch.hidden.to(step.device), **_to(batch.kwargs, step.device))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for i, (name, x) in enumerate(seen):
        if any(name in g for g in groups):
            continue  # a linear called twice keeps its first position
        if i and x is seen[i - 1][1] and seen[i - 1][0] in groups[-1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    missing = [n for n in local if not any(n in g for g in groups)]
    if missing:
        raise PassError(
            f"layer {step.index}: {', '.join(missing)} never ran in the layer's forward"
        )
    return groups


def _run_batches(step: LayerStep, keep_outputs: bool) -> list[torch.Tensor]:
    """Run the calibration batches through the layer; hooks may stop each one early."""
    outputs = []
    for batch in step.inputs:
        try:
            out = step.layer(batch.hidden.to(step.device), **_to(batch.kwargs, step.device))
        except _StopForward:
            continue
        if keep_outputs:
            outputs.append(_layer_output(out).to(batch.hidden.device))
    return outputs


def _fits(step: LayerStep, linear: nn.Linear) -> bool:
    """Whether keeping the inputs of ``linear`` for every calibration token fits the budget."""
    tokens = sum(b.hidden.shape[:-1].numel() for b in step.inputs)
    return tokens * linear.in_features * 4 <= _SHORTCUT_MAX_BYTES


def _shortcut_outputs(
    step: LayerStep, outputs: list[torch.Tensor], inputs: list[torch.Tensor], delta: torch.Tensor
) -> None:
    """Layer outputs after quantizing its last linear, without running the layer again.

    When the last linear's output is added straight to the layer output (the residual of
    Llama-style MLPs), ``Y_q = Y + X ΔW^T``. This is verified against a real forward on the
    first batch; if it does not hold (e.g. a post-MLP norm), the engine recomputes instead.
    """
    if len(outputs) != len(step.inputs) or len(inputs) != len(outputs):
        return
    delta = delta.to(step.device)
    updated = [
        y + (x.to(step.device).to(delta.dtype) @ delta.T).to(y.dtype).to(y.device)
        for y, x in zip(outputs, inputs, strict=True)
    ]  # (B, T, H) each
    batch = step.inputs[0]
    check = _layer_output(
        step.layer(batch.hidden.to(step.device), **_to(batch.kwargs, step.device))
    )
    tol = 1e-4 * check.abs().max().item() + 1e-5
    if (check.to(updated[0].device) - updated[0]).abs().max().item() <= tol:
        for y in updated:
            if not torch.isfinite(y).all():
                raise PassError(f"layer {step.index}: NaN/Inf in its quantized outputs")
        step.set_outputs(updated)


def _layers_prefix(model: PreTrainedModel) -> str:
    """Dotted name of the decoder-layer ModuleList (``model.layers`` for Llama)."""
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def _error_line(errors: dict[str, float]) -> str:
    """Compact per-linear relative output errors for the progress bar."""
    return " ".join(f"{name.rsplit('.', 1)[-1]}={err:.2e}" for name, err in errors.items())
