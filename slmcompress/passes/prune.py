"""``type: prune``: Minitron structured pruning (width and depth) to a target architecture.

Muralidharan et al. 2024 ("Compact Language Models via Pruning and Knowledge
Distillation") and Sreenivas et al. 2024 ("LLM Pruning and Distillation in Practice: The
Minitron Approach"): score heads, MLP neurons, embedding channels and layers on a small
calibration set, keep the best units, export a smaller dense model in one shot; the
distillation stage heals it. ``method: magnitude | random`` run the same code with
weight-norm or random scores, as baselines. Scoring lives in
:mod:`slmcompress.prune.importance`, targets in :mod:`slmcompress.prune.planner`, tensor
slicing in :mod:`slmcompress.prune.slicing`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from slmcompress.arch import family_for
from slmcompress.errors import PassError, RecipeError
from slmcompress.eval.report import count_params
from slmcompress.io.sources import BUILTIN_MODELS, cache_dir
from slmcompress.passes.base import Context, Pass, PassConfig, StageOutput, StreamingOptions
from slmcompress.peak_memory import peak_memory
from slmcompress.prune.align import align_sizes
from slmcompress.prune.importance import (
    Importance,
    activation_importance_of,
    check_supported,
    loss_depth_scores,
    magnitude_importance,
    random_importance,
    uniform_importance,
)
from slmcompress.prune.planner import (
    KeepPlan,
    PruneSizes,
    check_config,
    param_counts,
    plan_digest,
    plan_keep,
    pruned_config,
    resolve_target,
    sizes_for_param_ratio,
    sizes_of,
)
from slmcompress.prune.reconstruction import RefitSettings, reconstruct
from slmcompress.prune.reconstruction import summary as refit_summary
from slmcompress.prune.slicing import slice_model
from slmcompress.prune.streamed_export import export_pruned_streamed
from slmcompress.registry import register_pass


class PruneTarget(BaseModel):
    """The exported architecture, named like NVIDIA ModelOpt's Minitron export config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int | None = Field(None, ge=1)
    ffn_hidden_size: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    num_layers: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _not_empty(self) -> PruneTarget:
        if all(v is None for v in self.model_dump().values()):
            raise ValueError("give at least one of " + ", ".join(self.model_dump()))
        return self


class ReconstructConfig(BaseModel):
    """``reconstruct:`` of a prune stage: re-fit the consumers of pruned heads / MLP channels
    (``o_proj`` / ``down_proj``) on calibration data, layer by layer
    (:mod:`slmcompress.prune.reconstruction`). ``reconstruct: true`` takes these defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # damping towards the parent's weights, relative to each channel's second moment
    damp: float = Field(0.3, gt=0)
    # energy: choose heads / channels by the output energy they add, on the pruned stream;
    # importance: keep the activation-importance choice and only re-fit
    select: Literal["energy", "importance"] = "energy"
    # calibration sequences for the re-fit (default: the recipe's data.calibration)
    n_samples: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=8)


class PruneConfig(StreamingOptions):
    """``type: prune`` -- one of ``target`` or ``param_ratio`` (+ ``axis``)."""

    method: Literal["activation", "magnitude", "random"] = "activation"
    target: PruneTarget | None = None
    param_ratio: float | None = Field(
        None, gt=0, lt=1, description="fraction of parameters to keep"
    )
    axis: Literal["mlp", "heads", "hidden", "layers"] = "mlp"
    param_count: Literal["non_embedding", "total"] = "non_embedding"
    round_to: int = Field(8, ge=1, description="channel multiple for param_ratio sizes")
    head_pruning: Literal["within_groups", "kv_groups"] = "within_groups"
    # round pruned widths to kernel/TP-friendly multiples (slmcompress.prune.align): auto =
    # 128, else 64, where the model's width is one; an int = that multiple; none = exact
    align: Literal["auto", "none"] | Annotated[int, Field(ge=1)] = "auto"
    # projected_output: a head's contribution after o_proj (default; ranks heads inside a
    # GQA group); attention_output: Minitron's norm of the head's attention output
    head_metric: Literal["projected_output", "attention_output"] = "projected_output"
    depth_metric: Literal["loss", "cosine"] = "loss"
    depth_mode: Literal["per_layer", "contiguous"] = "per_layer"
    n_samples: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=8)
    batch_size: int = Field(4, ge=1)
    reconstruct: ReconstructConfig | None = None
    # streaming (StreamingOptions): importance scored layer by layer with bounded activations
    # and per-layer resume, and the export sliced tensor by tensor from disk

    @field_validator("reconstruct", mode="before")
    @classmethod
    def _reconstruct_flag(cls, value: Any) -> Any:
        """``reconstruct: true`` = the defaults; ``false`` = none."""
        if isinstance(value, bool):
            return {} if value else None
        return value

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        if (self.target is None) == (self.param_ratio is None):
            raise ValueError("give exactly one of target or param_ratio")
        return self

    def sizes(self, config: PretrainedConfig, where: str = "") -> PruneSizes:
        """Resolve the target against a model config (one-line PassError naming the field)."""
        return self.aligned_sizes(config, where)[0]

    def aligned_sizes(self, config: PretrainedConfig, where: str = "") -> tuple[PruneSizes, Any]:
        """The resolved, aligned sizes and what alignment did (for the report)."""
        prefix = f"{where}." if where else ""
        if self.param_ratio is not None:
            sizes = sizes_for_param_ratio(
                config,
                self.param_ratio,
                self.axis,
                self.head_pruning,
                self.param_count,
                self.round_to,
            )
            field = "param_ratio"
        else:
            sizes = resolve_target(
                sizes_of(config),
                self.target.model_dump(),
                self.head_pruning,
                where=f"{prefix}target",
                config=config,
            )
            field = "target"
        sizes, report = align_sizes(sizes_of(config), sizes, self.align, f"{prefix}{field}")
        if report.rounded:
            check_config(config, sizes, f"{prefix}{field}")
        return sizes, report

    def validate_against(self, recipe: Any, index: int) -> None:
        """Check the target against the model's config.json (after earlier prune stages)."""
        config = _config_if_cheap(recipe.model)
        if config is None:
            return
        try:
            for j, raw in enumerate(recipe.stages[: index + 1]):
                if raw.get("type") == "prune":
                    stage = self if j == index else PruneConfig.model_validate(raw)
                    sizes = stage.sizes(config, where=f"stages[{j}]")
                    config = pruned_config(config, sizes)
        except PassError as exc:
            message = str(exc) if str(exc).startswith("stages[") else f"stages[{index}].{exc}"
            raise RecipeError(message) from exc


def _config_if_cheap(source: str) -> PretrainedConfig | None:
    """The model's config when it is on disk already (no GGUF conversion, no hub)."""

    directory = (
        cache_dir() / "models" / source if source in BUILTIN_MODELS else Path(source).expanduser()
    )
    if not (directory / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - the model source check reports unreadable configs
        return None


@register_pass("prune")
class PrunePass(Pass):
    """Score, select and slice to the target architecture in one shot."""

    Config = PruneConfig
    requires_calibration = True
    supports_streaming = True
    streaming_note = " (method activation or random; depth_mode contiguous in memory only)"

    @classmethod
    def can_stream(cls, config: PassConfig) -> bool:
        """Activation and random scores stream; magnitude scores need every weight in memory,
        and contiguous depth blocks compare inputs of layers the stream has already dropped."""
        if not super().can_stream(config) or config.method == "magnitude":
            return False
        return config.method == "random" or not (
            config.depth_mode == "contiguous" and _drops_layers(config)
        )

    @classmethod
    def for_streaming(cls, config: PassConfig) -> tuple[PassConfig, list[str]]:
        """Depth ranked by loss runs the whole model: a streamed run ranks by cosine instead."""
        if config.depth_metric != "loss" or not _drops_layers(config):
            return config, []
        warning = (
            "prune.depth_metric: loss needs the whole model in memory; this streamed run "
            "ranks layers by block importance (depth_metric: cosine) instead"
        )
        return config.model_copy(update={"depth_metric": "cosine"}), [warning]

    @torch.no_grad()
    def run(self, model: PreTrainedModel, ctx: Context) -> StageOutput:
        cfg: PruneConfig = self.config
        check_supported(model)
        current = sizes_of(model.config)
        sizes, alignment = cfg.aligned_sizes(model.config)
        if alignment.multiples or alignment.notes:  # stated in report.md with the warnings
            ctx.warn(f"prune: {alignment.line()}")
        if sizes == current:
            ctx.warn("prune: the target equals the model's sizes; nothing pruned")
            return ctx.unchanged(model)
        start = time.perf_counter()
        if _energy_chooses_all(cfg, current, sizes):  # no scoring pass: the re-fit chooses
            importance = uniform_importance(model, "energy (chosen while re-fitting)")
        else:
            importance = self._importance(model, ctx, current, sizes)
        plan = plan_keep(importance, current, sizes, cfg.depth_mode)
        scored = time.perf_counter()
        wrap, recon_report = self._reconstruct(model, ctx, plan) if cfg.reconstruct else (None, {})
        refitted = time.perf_counter()
        output = ctx.rewrite(
            build=lambda: slice_model(model, plan, wrap),
            write=lambda source, out: export_pruned_streamed(
                model, source, plan, out, ctx.dtype, wrap=wrap
            ),
        )
        end = time.perf_counter()
        ctx.extra_metrics["prune"] = _summary(
            model, sizes, current, plan.layers, importance, end - start
        ) | {
            "alignment": alignment.summary(),
            "alignment_line": alignment.line(),
            "peak_memory": peak_memory(ctx.device),
        }
        if cfg.reconstruct:
            ctx.extra_metrics["prune"]["reconstruct"] = recon_report | {
                "seconds": round(refitted - scored, 2)  # the re-fit loop, not the slicing
            }
        return output

    def _reconstruct(
        self, model: PreTrainedModel, ctx: Context, plan: KeepPlan
    ) -> tuple[Any, dict[str, Any]]:
        """Re-fit the consumers of what ``plan`` cuts, layer by layer: the slicer's reader
        wrapper and what the report records."""
        recon: ReconstructConfig = self.config.reconstruct
        tokens = ctx.calibration_tokens(recon.n_samples, recon.seq_len)  # (N, T)
        settings = RefitSettings(recon.damp, recon.select)
        key = {"reconstruct": recon.model_dump(), "plan": plan_digest(plan)}
        loop = ctx.layer_loop(
            model, tokens, self.config.batch_size, "reconstruct", key, "reconstruct"
        )
        refits = reconstruct(loop, plan, family_for(model), settings)
        report = {"tokens": int(tokens.numel()), **recon.model_dump()}
        return refits.reader, report | refit_summary(loop, plan)

    def _importance(
        self, model: PreTrainedModel, ctx: Context, current: PruneSizes, sizes: PruneSizes
    ) -> Importance:
        """Unit and layer scores; a streamed stage gets here only with what streams
        (:meth:`can_stream`, :meth:`for_streaming`)."""
        cfg: PruneConfig = self.config
        n_drop = current.num_layers - sizes.num_layers
        block = n_drop if (cfg.depth_mode == "contiguous" and n_drop > 0) else 1
        if cfg.method == "magnitude":
            return magnitude_importance(model)
        if cfg.method == "random":
            return random_importance(model, ctx.seed)
        tokens = ctx.calibration_tokens(cfg.n_samples, cfg.seq_len)  # (N, T)
        key = {"importance": "minitron-activation", "head_metric": cfg.head_metric}
        loop = ctx.layer_loop(model, tokens, cfg.batch_size, "importance", key, "importance")
        importance = activation_importance_of(loop, block, cfg.head_metric)
        if n_drop > 0 and cfg.depth_metric == "loss":
            scores, base = loss_depth_scores(model, tokens, block, cfg.batch_size)
            if block == 1:
                importance.layers = scores
            else:
                importance.blocks, importance.block_size = scores, block
            importance.extra = {
                "depth_metric": "loss",
                "calibration_loss": round(base, 5),
                "depth_loss_increase": [round(float(v), 5) for v in scores],
            }
        return importance


def _energy_chooses_all(cfg: PruneConfig, current: PruneSizes, sizes: PruneSizes) -> bool:
    """A heads/MLP-only cut whose units the re-fit chooses by energy needs no scoring pass."""
    return (
        cfg.reconstruct is not None
        and cfg.reconstruct.select == "energy"
        and sizes.hidden_size == current.hidden_size
        and sizes.num_layers == current.num_layers
    )


def _drops_layers(config: PruneConfig) -> bool:
    """Whether the config may remove layers (a num_layers target, or param_ratio on layers)."""
    if config.target is not None:
        return config.target.num_layers is not None
    return config.axis == "layers"


def _summary(
    model: PreTrainedModel,
    sizes: PruneSizes,
    current: PruneSizes,
    layers: list[int],
    importance: Importance,
    seconds: float,
) -> dict[str, Any]:
    """What the stage report records: sizes, parameter counts, kept layers, scores.

    The pruned counts come from the pruned config (on the meta device), the same whether
    the output is a model in memory or a checkpoint written from a streamed input.
    """
    before, after = count_params(model), param_counts(model.config, sizes)
    return {
        "sizes_before": current.as_dict(),
        "sizes_after": sizes.as_dict(),
        "params_before": before[0],
        "params_after": after[0],
        "non_embedding_params_before": before[1],
        "non_embedding_params_after": after[1],
        "non_embedding_ratio": round(after[1] / before[1], 4),
        "kept_layers": layers,
        "importance": importance.summary(),
        "seconds": round(seconds, 2),
    }
