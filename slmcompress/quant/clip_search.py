"""The clip-search options RTN and GPTQ share: a config mixin and the solver's setting.

Kept with the quantization math rather than with either pass, so both configs inherit the
same YAML keys and defaults.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from slmcompress.quant.gptq_solver import ClipSearch
from slmcompress.quant.qparams import clip_grid


class ClipSearchOptions(BaseModel):
    """Clip-ratio ("mse") search for the group scales/zeros, shared by RTN and GPTQ.

    With ``clip_search``, each group row's min/max range is shrunk by the ratios
    ``1.0, ..., clip_min_ratio`` (``clip_steps + 1`` values) and the one with the smallest
    ``|w - q(w)|^clip_norm`` error is kept (GPTQModel/AutoGPTQ's ``mse`` quantizer option).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)  # as every pass config

    clip_search: bool = False
    clip_min_ratio: float = Field(0.75, gt=0, le=1)
    clip_steps: int = Field(25, ge=1)
    clip_norm: float = Field(2.4, gt=0)

    def clip_ratios(self) -> list[float] | None:
        """The ratios to try, or None when the search is off."""
        return clip_grid(self.clip_min_ratio, self.clip_steps) if self.clip_search else None

    def solver_clip(self, weighted: bool) -> ClipSearch | None:
        """The GPTQ solver's clip search (``weighted``: by the Hessian diagonal), or None."""
        ratios = self.clip_ratios()
        return ClipSearch(tuple(ratios), self.clip_norm, weighted) if ratios else None
