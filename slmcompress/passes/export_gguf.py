"""``type: export, format: gguf``: write the current model as a llama.cpp GGUF file.

The pass does not change the model (``changes_model = False``): the stage directory gets the
``.gguf`` as an artifact beside its report, instead of another HF checkpoint, and the
report measures the model the file was made from. A GPTQ model (group size 32, contiguous
groups) keeps its calibrated codes; see :mod:`slmcompress.export.gguf_blocks`.
"""

from __future__ import annotations

from typing import Any, Literal

from transformers import PreTrainedModel

from slmcompress.data import eval_tokens
from slmcompress.errors import PassError, RecipeError
from slmcompress.export import llama_cpp_runtime
from slmcompress.export.gguf_blocks import GPTQ_TRANSFER_TYPES, QK
from slmcompress.export.gguf_writer import GgufOptions, export_gguf
from slmcompress.passes.base import Context, Pass, PassConfig
from slmcompress.registry import register_pass

GgufType = Literal["f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1"]


class ExportGgufConfig(PassConfig):
    """``type: export, format: gguf`` (names follow llama.cpp's ``--outtype``)."""

    format: Literal["gguf"] = "gguf"
    outtype: Literal["auto"] | GgufType = "auto"
    embedding_type: GgufType | None = None
    pre_tokenizer: str | None = None
    requantize: bool = False
    verify: bool = True
    filename: str | None = None
    # measure the file in llama.cpp (ppl on the recipe's eval tokens, decode tokens/s, memory
    # to load): auto = when llama-cpp-python is installed (the 'llamacpp' extra)
    runtime_eval: Literal["auto", "off", "required"] = "auto"

    def output_name(self) -> str:
        """The artifact's file name in the stage directory."""
        return self.filename or f"model-{self.outtype}.gguf"

    def validate_against(self, recipe: Any, index: int) -> None:
        """Refuse, before any weight loads, a GPTQ/RTN stage whose groups cannot become blocks."""
        where = f"stages[{index}]"
        if not self.output_name().endswith(".gguf") or "/" in self.output_name():
            raise RecipeError(f"{where}.filename: must be a plain file name ending in .gguf")
        if self.requantize or self.outtype not in ("auto", *GPTQ_TRANSFER_TYPES):
            return
        for i, raw in enumerate(recipe.stages[:index]):
            if raw.get("type") != "quantize" or raw.get("method") not in ("gptq", "rtn"):
                continue
            group = raw.get("group_size", 128)
            if group != QK:
                raise RecipeError(
                    f"{where}.outtype: stages[{i}] quantizes with group_size {group}; GGUF blocks "
                    f"hold {QK} inputs, so use group_size {QK} or requantize: true"
                )
            if raw.get("act_order") and not raw.get("static_groups"):
                raise RecipeError(
                    f"{where}.outtype: stages[{i}] uses act_order without static_groups; GGUF "
                    "blocks need contiguous groups (set static_groups: true)"
                )


@register_pass("export")
class ExportGgufPass(Pass):
    """Write ``<stage dir>/<filename>.gguf``; report its size and the GPTQ transfer error."""

    Config = ExportGgufConfig
    changes_model = False

    def run(self, model: PreTrainedModel, ctx: Context) -> PreTrainedModel:
        cfg: ExportGgufConfig = self.config  # needs_weights: the runner loaded the model
        target = ctx.work_dir / cfg.output_name()
        options = GgufOptions(
            outtype=cfg.outtype,
            embedding_type=cfg.embedding_type,
            pre_tokenizer=cfg.pre_tokenizer,
            requantize=cfg.requantize,
            verify=cfg.verify,
            force=True,  # the work dir is this stage's own scratch space
            where=f"stage {ctx.stage_dir.name}",
        )
        result = export_gguf(model, ctx.tokenizer, target, options)
        for message in result.warnings:
            ctx.warn(message)
        ctx.artifacts[cfg.output_name()] = str(target)
        ctx.extra_metrics.update(result.metrics())
        ctx.extra_metrics["deployment"] = self._deployment(target, ctx)
        return model

    def _deployment(self, target: Any, ctx: Context) -> dict[str, Any]:
        """The file in the runtime it ships to, on the same eval tokens as every report."""

        cfg: ExportGgufConfig = self.config
        if cfg.runtime_eval == "off" or not llama_cpp_runtime.available():
            if cfg.runtime_eval == "required":
                raise PassError(
                    "runtime_eval: required, but llama-cpp-python is not installed "
                    "(pip install 'slmcompress[llamacpp]')"
                )
            why = "off" if cfg.runtime_eval == "off" else "llama-cpp-python is not installed"
            return {"runtime": None, "file_bytes": target.stat().st_size, "skipped": why}
        spec = ctx.data.eval
        tokens = eval_tokens(ctx.tokenizer, spec)
        return llama_cpp_runtime.measure(target, tokens, spec.seq_len)
