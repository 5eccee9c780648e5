"""``type: eval``: a stage that changes nothing and only writes a report."""

from __future__ import annotations

from transformers import PreTrainedModel

from slmcompress.passes.base import Context, Pass, PassConfig
from slmcompress.registry import register_pass


class EvalConfig(PassConfig):
    """``type: eval`` (the recipe's ``eval:`` section says what is measured)."""


@register_pass("eval")
class EvalPass(Pass):
    """Report-only stage, e.g. to measure a model before a chain of passes."""

    Config = EvalConfig
    changes_model = False
    needs_weights = False  # over the budget, it reports on the skeleton (a streamed perplexity)

    def run(self, model: PreTrainedModel, ctx: Context) -> PreTrainedModel:
        return model
