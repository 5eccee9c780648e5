"""``type: distill``: logit-matching knowledge distillation from a teacher into the current model.

The "heal" half of Minitron (Muralidharan et al. 2024; Sreenivas et al. 2024): after
pruning, train the student on the teacher's next-token distributions (forward KL on
logits, temperature 1, no CE term by default). The teacher is the recipe's original model
unless ``teacher`` (or the recipe's ``teacher:``) names another source, or
``teacher_cache`` points at an offline top-k cache (then no teacher is loaded).
``alpha: 1`` is plain next-token fine-tuning (no teacher), the baseline KD must beat.
Losses live in :mod:`slmcompress.distill.losses`, the loop in
:mod:`slmcompress.distill.trainer`, multi-process sharding in
:mod:`slmcompress.distill.distributed`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from transformers import PreTrainedModel

from slmcompress import dist
from slmcompress.arch import decoder_layers
from slmcompress.data import DataSpec, check_disjoint, eval_tokens, packed_sequences, spec_identity
from slmcompress.distill.checkpointing import weights_digest
from slmcompress.distill.distributed import (
    TeacherSharding,
    gather_full_model,
    prepare_teacher,
    shard_model,
)
from slmcompress.distill.hidden import HiddenCapture, layer_map
from slmcompress.distill.losses import LossName, TopK, top_k_logits
from slmcompress.distill.quantized import (
    QuantizedOption,
    QuantizedStudent,
    TrainFloat,
    resolve_mode,
)
from slmcompress.distill.teacher_cache import (
    TeacherCache,
    build_streamed_teacher_cache,
    tokenizer_fingerprint,
)
from slmcompress.distill.trainer import (
    TeacherFn,
    Trainer,
    TrainResult,
    TrainSettings,
    plot_history,
    trainer_autocast,
)
from slmcompress.errors import DataError, ModelSourceError, PassError
from slmcompress.eval.perplexity import perplexity
from slmcompress.fsutil import atomic_write_json
from slmcompress.io import load as io_load
from slmcompress.io.sources import check_model_source, resolve_model_dir
from slmcompress.memory_model import load_config
from slmcompress.passes.base import Context, Pass, PassConfig
from slmcompress.prune.planner import SOURCE_LAYERS_KEY
from slmcompress.registry import register_pass
from slmcompress.streaming.budget import machine_budget, resolve_budget, should_stream
from slmcompress.streaming.publish import load_tokenizer


class DistillConfig(PassConfig):
    """``type: distill`` -- the YAML keys of a distillation stage (give max_steps or max_tokens)."""

    teacher: str | None = Field(
        None, description="model source; default: recipe teacher, else original model"
    )
    teacher_cache: str | None = Field(
        None, description="directory written by `slmcompress teacher-cache`"
    )
    teacher_sharding: TeacherSharding = "replicated"
    loss: LossName = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(
        None, ge=1, description="match only the teacher's top-k logits (renormalised)"
    )
    alpha: float = Field(
        0.0, ge=0, le=1, description="weight of next-token CE; 1 = CE-only fine-tuning"
    )
    hidden_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the intermediate hidden-state loss (1 - cos per matched layer); 0: off",
    )
    lr: float = Field(1e-4, gt=0)
    autocast: Literal["auto", "bf16", "off"] = Field(
        "auto",
        description="bf16 autocast of the student forward (fp32 master weights either way): "
        "auto = on CUDA only, bf16 = on any device (CPU too), off = fp32",
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    seq_len: int = Field(512, ge=8)
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    eval_every: int = Field(
        50,
        ge=0,
        description="steps between held-out ppl checks (always one at the end; 0: only then)",
    )
    eval_tokens: int = Field(2048, ge=16, description="held-out tokens per check")
    save_every: int = Field(50, ge=0, description="steps between resumable checkpoints (0: never)")
    data: DataSpec | None = Field(
        None, description="training text; default: the recipe's calibration source"
    )
    quantized: QuantizedOption = Field(
        "auto",
        description="a GPTQ student trains in its format: scales (EfficientQAT E2E-QP), ste "
        "(fake-quant latent weights), lsq (ste + scales); auto: scales for a quantized student",
    )
    train_float: TrainFloat = Field(
        "norms", description="quantized students: which float parameters train too"
    )

    @model_validator(mode="after")
    def _budget(self) -> DistillConfig:
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("give exactly one of max_steps or max_tokens")
        if self.teacher_cache and self.teacher:
            raise ValueError("give teacher or teacher_cache, not both")
        if self.hidden_weight > 0 and (self.teacher_cache or self.alpha >= 1.0):
            raise ValueError(
                "hidden_weight needs a live teacher (a teacher_cache stores logits only; alpha=1 has none)"
            )
        return self

    def data_spec(self, ctx_calibration: DataSpec) -> DataSpec:
        """The training text: ``data`` or the recipe's calibration source (its text, not its sampling)."""
        base = self.data or ctx_calibration
        return DataSpec(source=base.source, split=base.split, text_field=base.text_field)

    def validate_against(self, recipe: Any, index: int) -> None:
        """Never train on the evaluation text; the cache must exist before weights load."""
        where = f"stages[{index}]"
        if self.teacher:  # a stage's own teacher: checked (remote code too) before stage 1 runs
            try:
                check_model_source(self.teacher)
            except ModelSourceError as exc:
                raise ModelSourceError(f"{where}.teacher" + str(exc).removeprefix("model")) from exc
        if self.teacher_cache:
            TeacherCache(Path(self.teacher_cache).expanduser())
            return
        check_disjoint(self.data_spec(recipe.data.calibration), recipe.data.eval, f"{where}.data")


def check_seq_len(model: PreTrainedModel, seq_len: int, where: str, who: str) -> None:
    """Positions beyond the model's range would silently extrapolate RoPE."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise PassError(
            f"{where}.seq_len: {seq_len} exceeds the {who}'s max_position_embeddings {limit}"
        )


@register_pass("distill")
class DistillPass(Pass):
    """Train the current model to match the teacher's logits (see the module docstring)."""

    Config = DistillConfig
    requires_teacher = True
    requires_calibration = True
    supports_distributed = True

    def run(self, model: PreTrainedModel, ctx: Context) -> PreTrainedModel:
        cfg: DistillConfig = self.config
        where = f"stages[{ctx.stage_index}]"
        check_seq_len(model, cfg.seq_len, where, "student")
        self._student_vocab = int(model.config.vocab_size)
        if cfg.top_k and cfg.top_k > self._student_vocab:
            raise PassError(
                f"{where}.top_k: {cfg.top_k} exceeds the vocabulary ({self._student_vocab} logits)"
            )
        student_digest = weights_digest(model)
        cls, dtype = type(model), next(model.parameters()).dtype
        qad = self._open_quantized(model, ctx, where)  # before any data or teacher: fail fast
        settings = self._settings(ctx)
        sequences, cache, data_id = self._training_data(ctx, where)
        sequences = self._take(sequences, settings, where, data_id)
        if cache is None and cfg.alpha < 1.0:
            cache = self._streamed_cache(model, ctx, sequences.shape[0], where)
        teacher_fn, teacher_name = self._teacher(model, ctx, cache, where)
        fingerprint = {"student": student_digest, "teacher": teacher_name, "data": data_id}
        if qad is not None:
            fingerprint["quantized"] = [qad.mode, qad.train_float]
        else:
            model = model.float().requires_grad_(True)  # fp32 masters; bf16 autocast on CUDA
        if dist.is_distributed():
            model = shard_model(model, ctx.device)
        trainer = Trainer(
            model,
            sequences,
            teacher_fn,
            settings,
            ctx.work_dir,
            fingerprint,
            ctx.device,
            eval_fn=self._eval_fn(ctx),
            where=where,
            teacher_hidden=self._teacher_hidden,
        )
        try:
            result = trainer.train()
        finally:
            if self._teacher_hidden is not None:
                self._teacher_hidden.remove()
        if dist.is_distributed():
            model = gather_full_model(model, cls, dtype) or model
        elif qad is not None:
            model, ctx.extra_metrics["quantized"] = qad.close(model, dtype)
            self._compare_with_teacher(ctx, result)
        else:
            model = model.to(dtype).eval()
        if dist.is_main():
            self._report(result, ctx, teacher_name)
        return model.requires_grad_(False)

    def _compare_with_teacher(self, ctx: Context, result: TrainResult) -> None:
        """The live teacher's held-out ppl next to the student's (same tokens): what QAD closes."""
        final = next((r["eval_ppl"] for r in reversed(result.history) if "eval_ppl" in r), None)
        if self._teacher_model is None or final is None:
            return
        teacher_ppl = float(self._eval_fn(ctx)(self._teacher_model))
        ctx.extra_metrics["quantized"].update(
            teacher_eval_ppl=round(teacher_ppl, 4),
            final_eval_ppl=round(final, 4),
            eval_ppl_vs_teacher=round(final - teacher_ppl, 4),
        )

    # ------------------------------------------------------------------ setup
    def _open_quantized(
        self, model: PreTrainedModel, ctx: Context, where: str
    ) -> QuantizedStudent | None:
        """A GPTQ student: swap in its trainable parameterisation (None for a float student)."""
        cfg: DistillConfig = self.config
        mode = resolve_mode(cfg.quantized, model, where)
        if mode is None:
            return None
        if dist.is_distributed():
            raise PassError(
                f"{where}.quantized: a quantized student trains in one process only "
                "(FSDP would shard its integer codes); run without torchrun"
            )
        qad = QuantizedStudent.open(model, mode, cfg.train_float, where)
        qad.check_memory(model, resolve_budget(ctx.max_memory or machine_budget()))
        ctx.log.info(
            "distill: quantized student (%d layers), training %s: %d parameters",
            qad.layers, mode, qad.trainable_params,
        )  # fmt: skip
        return qad

    def _settings(self, ctx: Context) -> TrainSettings:
        cfg: DistillConfig = self.config
        per_step = cfg.micro_batch_size * cfg.grad_accum * dist.world_size() * cfg.seq_len
        steps = cfg.max_steps or math.ceil(cfg.max_tokens / per_step)
        return TrainSettings(
            max_steps=steps,
            lr=cfg.lr,
            min_lr_ratio=cfg.min_lr_ratio,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps,
            micro_batch_size=cfg.micro_batch_size,
            grad_accum=cfg.grad_accum,
            grad_clip=cfg.grad_clip,
            loss=cfg.loss,
            temperature=cfg.temperature,
            alpha=cfg.alpha,
            hidden_weight=cfg.hidden_weight,
            autocast=cfg.autocast,
            eval_every=cfg.eval_every,
            save_every=cfg.save_every,
            seed=ctx.seed,
        )

    def _training_data(
        self, ctx: Context, where: str
    ) -> tuple[torch.Tensor, TeacherCache | None, str]:
        """Packed training sequences ``(N, seq_len)``, the cache (if any) and a data identity."""
        cfg: DistillConfig = self.config
        if cfg.teacher_cache:
            cache = TeacherCache(Path(cfg.teacher_cache).expanduser())
            cache.check_compatible(ctx.tokenizer, cfg.seq_len, where, self._student_vocab)
            check_disjoint(
                DataSpec(**cache.manifest["data"]), ctx.data.eval, f"{where}.teacher_cache data"
            )
            return cache.tokens(), cache, f"cache:{cache.manifest['shards'][0]['sha256'][:16]}"
        spec = cfg.data_spec(ctx.data.calibration)
        check_disjoint(spec, ctx.data.eval, f"{where}.data")
        return (
            packed_sequences(ctx.tokenizer, spec, cfg.seq_len),
            None,
            json.dumps(spec_identity(spec)),
        )

    def _streamed_cache(
        self, student: PreTrainedModel, ctx: Context, n_sequences: int, where: str
    ) -> TeacherCache | None:
        """A teacher over the memory budget is never loaded: its top-k logits are cached first.

        One streamed forward per cache shard (one decoder layer resident) over exactly the
        training sequences. A cached teacher holds top-k logits only, so the options that
        need the whole distribution or its hidden states are refused.
        """

        cfg: DistillConfig = self.config
        source = cfg.teacher or ctx.teacher or ctx.original_model
        budget = ctx.max_memory or machine_budget()
        decision = should_stream(source, budget, ctx.dtype)
        if not decision.stream:
            return None
        why = f"the teacher {source} is over the memory budget ({decision.reason})"
        if not cfg.top_k:
            raise PassError(
                f"{where}.top_k: {why}, so it is streamed into a top-k logit cache; set top_k "
                "(e.g. 64): full-vocabulary KD needs the teacher in memory"
            )
        if cfg.hidden_weight > 0:
            raise PassError(
                f"{where}.hidden_weight: {why}; a streamed teacher cache holds logits only, "
                "not the hidden states this loss compares"
            )
        directory = resolve_model_dir(source)
        tokenizer = load_tokenizer(directory)
        if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(ctx.tokenizer):
            raise PassError(f"{where}.teacher: {source}'s tokenizer differs from the student's")
        t_vocab = load_config(directory).get("vocab_size")
        if t_vocab != student.config.vocab_size:
            raise PassError(
                f"{where}.teacher: {source} has vocab_size {t_vocab}, the student "
                f"{student.config.vocab_size}; logits must align"
            )
        out = ctx.work_dir / "teacher-cache"
        if dist.is_main():
            ctx.log.info("distill: %s; caching its top-%d logits by streaming", why, cfg.top_k)
            build_streamed_teacher_cache(
                directory, ctx.tokenizer, cfg.data_spec(ctx.data.calibration), cfg.seq_len,
                cfg.top_k, out, n_sequences, device=ctx.device, dtype=ctx.dtype,
                max_memory=budget, model_name=source, show_progress=True,
            )  # fmt: skip
        dist.barrier()
        return TeacherCache(out)

    def _take(
        self, sequences: torch.Tensor, s: TrainSettings, where: str, data_id: str
    ) -> torch.Tensor:
        """The first ``steps * global_batch`` sequences (one epoch, no repeats) or a one-line error."""
        cfg: DistillConfig = self.config
        needed = s.max_steps * s.global_batch(dist.world_size())
        if sequences.shape[0] < needed:
            field = "max_tokens" if cfg.max_tokens else "max_steps"
            raise DataError(
                f"{where}.{field}: the training data ({data_id}) has {sequences.shape[0]} sequences of "
                f"{cfg.seq_len} tokens ({sequences.numel()} tokens); the run needs {needed} "
                f"({needed * cfg.seq_len} tokens); lower {field} or give more data"
            )
        return sequences[:needed]

    def _teacher(
        self, student: PreTrainedModel, ctx: Context, cache: TeacherCache | None, where: str
    ) -> tuple[TeacherFn, str]:
        """A function giving the teacher's targets for a batch, and the teacher's name."""
        cfg: DistillConfig = self.config
        self._teacher_hidden = self._teacher_model = None
        if cfg.alpha >= 1.0:
            return (lambda ids, input_ids: None), "none (alpha=1: CE only)"
        if cache is not None:
            return self._cached_teacher(cache, ctx, where), f"cache:{cache.manifest['model']}"
        source = cfg.teacher or ctx.teacher or ctx.original_model
        teacher = self._teacher_model = self._load_teacher(source, student, ctx, where)
        if cfg.hidden_weight > 0:
            pruned_from_teacher = source == ctx.original_model
            self._teacher_hidden = self._hidden_capture(
                teacher, student, where, pruned_from_teacher
            )
        top_k = cfg.top_k

        def live(ids: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor | TopK:
            logits = teacher(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
            return top_k_logits(logits, top_k) if top_k else logits

        return live, source

    @staticmethod
    def _hidden_capture(
        teacher: PreTrainedModel,
        student: PreTrainedModel,
        where: str,
        pruned_from_teacher: bool = False,
    ) -> HiddenCapture:
        """Hooks on the teacher layers matched to the student's (equal hidden sizes only).

        ``pruned_from_teacher``: the student was pruned from this teacher, so the layers
        depth pruning kept (recorded in its config) are the ones to match.
        """
        t_hidden, s_hidden = teacher.config.hidden_size, student.config.hidden_size
        if t_hidden != s_hidden:
            raise PassError(
                f"{where}.hidden_weight: the student's hidden_size {s_hidden} differs from the "
                f"teacher's {t_hidden} (embedding channels were pruned); the hidden-state loss "
                "compares them directly, so set hidden_weight: 0"
            )
        n_student, n_teacher = len(decoder_layers(student)), len(decoder_layers(teacher))
        source_layers = getattr(student.config, SOURCE_LAYERS_KEY, None)
        if not pruned_from_teacher or (source_layers and max(source_layers) >= n_teacher):
            source_layers = None  # another teacher: its layers do not correspond
        try:
            indices = layer_map(n_student, n_teacher, source_layers)
        except ValueError as exc:  # e.g. a student deeper than its teacher
            raise PassError(f"{where}.hidden_weight: {exc}") from exc
        return HiddenCapture(teacher, indices)

    def _cached_teacher(self, cache: TeacherCache, ctx: Context, where: str) -> TeacherFn:
        cfg: DistillConfig = self.config
        k = cfg.top_k or cache.manifest["top_k"]
        if k > cache.manifest["top_k"]:
            raise PassError(
                f"{where}.top_k: {k} exceeds the teacher cache's top_k {cache.manifest['top_k']}"
            )

        def cached(ids: torch.Tensor, input_ids: torch.Tensor) -> TopK:
            targets = cache.targets(ids)  # (B, T, K) sorted descending, so [..., :k] is the top-k
            return TopK(
                values=targets.values[..., :k].to(ctx.device),
                indices=targets.indices[..., :k].to(ctx.device),
            )

        return cached

    def _load_teacher(
        self, source: str, student: PreTrainedModel, ctx: Context, where: str
    ) -> PreTrainedModel:
        ctx.log.info("distill: loading teacher %s", source)
        loaded = io_load.load_model(source, dtype=_dtype_name(ctx.dtype), device=ctx.device)
        field = f"{where}.teacher"
        if tokenizer_fingerprint(loaded.tokenizer) != tokenizer_fingerprint(ctx.tokenizer):
            raise PassError(
                f"{field}: {source}'s tokenizer differs from the student's "
                f"(vocab {len(loaded.tokenizer)} vs {len(ctx.tokenizer)}); KD needs a shared vocabulary"
            )
        t_vocab, s_vocab = loaded.model.config.vocab_size, student.config.vocab_size
        if t_vocab != s_vocab:
            raise PassError(
                f"{field}: {source} has vocab_size {t_vocab}, the student {s_vocab}; logits must align"
            )
        check_seq_len(loaded.model, self.config.seq_len, where, "teacher")
        return prepare_teacher(loaded.model, ctx.device, self.config.teacher_sharding)

    def _eval_fn(self, ctx: Context):
        """Held-out perplexity on the first ``eval_tokens`` tokens of the recipe's eval text."""
        cfg: DistillConfig = self.config
        seq_len = min(ctx.data.eval.seq_len, cfg.seq_len)
        tokens = eval_tokens(ctx.tokenizer, ctx.data.eval)[: max(cfg.eval_tokens, seq_len)]  # (N,)
        return lambda model: perplexity(model, tokens.to(ctx.device), seq_len).ppl

    # ------------------------------------------------------------------ outputs
    def _report(self, result: TrainResult, ctx: Context, teacher_name: str) -> None:
        """Loss curve PNG + history JSON as stage artifacts; a summary in the report's extras."""
        history = result.history
        png = plot_history(
            history, ctx.work_dir / "loss_curve.png", title=f"distill ({self.config.loss})"
        )
        history_path = ctx.work_dir / "train_history.json"
        atomic_write_json(history_path, history)
        ctx.artifacts.update({"loss_curve.png": str(png), "train_history.json": str(history_path)})
        evals = [(r["tokens"], round(r["eval_ppl"], 4)) for r in history if "eval_ppl" in r]
        ctx.extra_metrics["distill"] = {
            "teacher": teacher_name,
            "loss": self.config.loss,
            "steps": len(history),
            "train_tokens": history[-1]["tokens"] if history else 0,
            "resumed_from_step": result.resumed_from,
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "eval_ppl_curve": evals,
            "train_seconds_this_run": round(result.train_seconds, 2),
            "train_tokens_per_s": round(result.tokens_per_s, 1),
            "device": str(ctx.device),
            "autocast": "bf16" if trainer_autocast(self.config.autocast, ctx.device) else "off",
            "world_size": dist.world_size(),
        }


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        dtype, "auto"
    )
