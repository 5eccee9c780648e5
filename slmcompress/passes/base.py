"""The Pass interface, its config base class, and the Context every pass receives."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmcompress.data import calibration_tokens
from slmcompress.layerwise import LayerLoop, WrittenCheckpoint
from slmcompress.streaming.residency import IN_MEMORY, Residency

#: what ``Pass.run`` returns: the new model, or the checkpoint it wrote (streamed input)
StageOutput = PreTrainedModel | WrittenCheckpoint

if TYPE_CHECKING:
    from slmcompress.data import DataConfig
    from slmcompress.streaming.loader import WeightSource


class PassConfig(BaseModel):
    """Base of every pass config: the YAML keys of one stage. Typos fail at load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str | None = None

    def validate_against(self, recipe: Any, index: int) -> None:
        """Cross-stage checks (override); raise RecipeError naming the field."""


#: stage keys that change how a pass runs, never what it produces (streamed and in-memory
#: outputs are bit-identical; checkpoint/eval cadence does not touch the weights). Left out
#: of the stage hash so that, say, lowering max_memory after an OOM resumes the stage.
RUNTIME_FIELDS = frozenset(
    {"name", "streaming", "max_memory", "activation_offload", "eval_every", "save_every"}
)


class StreamingOptions(PassConfig):
    """The stage keys of a pass that can stream (``Pass.supports_streaming``).

    They change how the stage runs, never what it produces (streamed and in-memory outputs
    are bit-identical), so they stay out of the stage hash (``recipe.RUNTIME_FIELDS``).
    """

    # None: stream when the model exceeds max_memory; true/false force it
    streaming: bool | None = None
    max_memory: str | None = None  # host budget, e.g. "24GiB" (default: the recipe's)
    activation_offload: Literal["auto", "cpu", "disk"] = "auto"


@dataclass
class Context:
    """What a pass may use besides the model. Passes never read the YAML themselves."""

    tokenizer: PreTrainedTokenizerBase
    data: DataConfig
    device: torch.device
    dtype: torch.dtype
    original_model: str
    teacher: str | None
    stage_dir: Path
    work_dir: Path
    seed: int = 0
    stage_index: int = 0
    max_memory: str | None = None  # the recipe's host budget (stages may set their own)
    residency: Residency = IN_MEMORY  # how the runner holds this stage's input model
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("slmcompress"))
    warnings: list[str] = field(default_factory=list)
    extra_metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    _token_cache: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def warn(self, message: str) -> None:
        """Record a warning that ends up in the stage report (and the log)."""
        self.log.warning(message)
        self.warnings.append(message)

    def record(self, warnings: Iterable[str] = (), **metrics: Any) -> None:
        """Put what a helper returned into the stage report: its warnings and metrics."""
        for message in warnings:
            self.warn(message)
        self.extra_metrics.update(metrics)

    def calibration_tokens(
        self, n_samples: int | None = None, seq_len: int | None = None
    ) -> torch.Tensor:
        """Packed calibration token ids ``(n_samples, seq_len)`` from the recipe's data spec."""

        spec = self.data.calibration
        n = n_samples or spec.n_samples
        t = seq_len or spec.seq_len
        key = ("calib", n, t)
        if key not in self._token_cache:
            self._token_cache[key] = calibration_tokens(self.tokenizer, spec, n, t, self.seed)
        return self._token_cache[key]

    def unchanged(self, model: PreTrainedModel) -> StageOutput:
        """The stage output of a pass that changed nothing: the model, or its input checkpoint."""
        return self.residency.unchanged(model)

    def rewrite(
        self, build: Callable[[], PreTrainedModel], write: Callable[[WeightSource, Path], Path]
    ) -> StageOutput:
        """The output of a pass that makes a new model, as the stage's residency allows:
        ``build()`` in memory, or ``write(input_weights, out_dir)`` tensor by tensor when
        streamed (see :meth:`~slmcompress.streaming.residency.Residency.rewrite`)."""
        return self.residency.rewrite(build, write, self.work_dir / "streamed-checkpoint")

    def layer_loop(
        self,
        model: PreTrainedModel,
        tokens: torch.Tensor,
        batch_size: int,
        pass_name: str,
        key: dict[str, Any],
        subdir: str | None = None,
    ) -> LayerLoop:
        """The layer-by-layer loop over ``model`` that the stage's residency implies."""
        work_dir = self.work_dir / subdir if subdir else self.work_dir
        return self.residency.layer_loop(
            model, tokens, self.device, self.dtype, work_dir, batch_size, pass_name, key
        )


class Pass(ABC):
    """One compression step: ``run(model, ctx)`` returns the new model (or written checkpoint)."""

    Config: ClassVar[type[PassConfig]]
    pass_type: ClassVar[str]
    pass_method: ClassVar[str | None]
    #: class flags instead of lifecycle hooks
    requires_calibration: ClassVar[bool] = False
    requires_teacher: ClassVar[bool] = False
    changes_model: ClassVar[bool] = True
    #: runs on every torchrun rank (others run on rank 0 only, see slmcompress.dist)
    supports_distributed: ClassVar[bool] = False
    #: reads the weights, so a model over the budget that it cannot stream is refused up
    #: front (False: it only reports, on the weightless skeleton; e.g. an eval stage)
    needs_weights: ClassVar[bool] = True
    #: runs layer by layer from disk when the runner streams its input (Config is StreamingOptions)
    supports_streaming: ClassVar[bool] = False
    streaming_note: ClassVar[str] = ""  # which configs can, for messages

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    @classmethod
    def can_stream(cls, config: PassConfig) -> bool:
        """Whether a stage with this config can run on a streamed (never loaded) model."""
        return cls.supports_streaming and isinstance(config, StreamingOptions)

    @classmethod
    def for_streaming(cls, config: PassConfig) -> tuple[PassConfig, list[str]]:
        """The config a streamed run of ``config`` uses, and a report warning per change.

        For an option that needs the whole model but has a streamed stand-in (prune's loss
        depth ranking -> cosine); the runner applies it when it streams. Default: unchanged.
        """
        return config, []

    @abstractmethod
    def run(self, model: PreTrainedModel, ctx: Context) -> StageOutput:
        """Apply the pass; return the new model, or (streamed input) the checkpoint written."""
