"""The Pass interface, its config base class, and the Context every pass receives."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from slmcompress.data import DataConfig


class PassConfig(BaseModel):
    """Base of every pass config: the YAML keys of one stage. Typos fail at load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str | None = None

    def validate_against(self, recipe: Any, index: int) -> None:
        """Cross-stage checks (override); raise RecipeError naming the field."""


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
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("slmcompress"))
    warnings: list[str] = field(default_factory=list)
    extra_metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    _token_cache: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def warn(self, message: str) -> None:
        """Record a warning that ends up in the stage report (and the log)."""
        self.log.warning(message)
        self.warnings.append(message)

    def calibration_tokens(
        self, n_samples: int | None = None, seq_len: int | None = None
    ) -> torch.Tensor:
        """Packed calibration token ids ``(n_samples, seq_len)`` from the recipe's data spec."""
        from slmcompress.data import calibration_tokens

        spec = self.data.calibration
        n = n_samples or spec.n_samples
        t = seq_len or spec.seq_len
        key = ("calib", n, t)
        if key not in self._token_cache:
            self._token_cache[key] = calibration_tokens(self.tokenizer, spec, n, t, self.seed)
        return self._token_cache[key]


class Pass(ABC):
    """One compression step: ``run(model, ctx)`` returns the new model."""

    Config: ClassVar[type[PassConfig]]
    pass_type: ClassVar[str]
    pass_method: ClassVar[str | None]
    #: class flags instead of lifecycle hooks
    requires_calibration: ClassVar[bool] = False
    requires_teacher: ClassVar[bool] = False
    changes_model: ClassVar[bool] = True
    #: runs on every torchrun rank (others run on rank 0 only, see slmcompress.dist)
    supports_distributed: ClassVar[bool] = False

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    @abstractmethod
    def run(self, model: PreTrainedModel, ctx: Context) -> PreTrainedModel:
        """Apply the pass and return the (new or modified) model."""
