"""Where a stage's model lives -- in memory, streamed from disk, or report-only -- and what
follows from it: the :class:`StageInput`, the :class:`~slmcompress.layerwise.LayerLoop`
and the way a rewritten model is output.

The runner decides residency once per stage (:func:`slmcompress.runner.Runner._stage_input`)
and builds the stage's :class:`StageInput`; the pass gets its model and, in ``ctx.residency``,
how it is held. A pass asks ``ctx.layer_loop(...)`` for its loop and ``ctx.rewrite(...)`` for
its output and never looks at how the model is held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmcompress.layerwise import LayerLoop, MemoryLoop, WrittenCheckpoint
from slmcompress.streaming.activations import OffloadMode
from slmcompress.streaming.budget import StreamOptions, should_stream
from slmcompress.streaming.engine import StreamingRun
from slmcompress.streaming.loader import StreamingModel, WeightSource, build_skeleton
from slmcompress.streaming.publish import load_tokenizer

Mode = Literal["memory", "streamed", "report_only"]


@dataclass(frozen=True)
class Residency:
    """How the stage's input model is held.

    - ``memory``: a loaded model; the pass changes it and returns it.
    - ``streamed``: a weightless skeleton; layers come from ``source`` one at a time and the
      pass returns a :class:`~slmcompress.layerwise.WrittenCheckpoint`.
    - ``report_only``: over the budget and the pass cannot stream, but changes nothing
      (an eval stage): the skeleton is only reported on, by a streamed perplexity.
    """

    mode: Mode = "memory"
    source: Path | None = None  # the checkpoint directory the weights stay in
    reason: str = ""  # why (the budget decision), for logs and reports
    max_memory: str | None = None  # host budget of the streaming engine (None: auto)
    activation_offload: OffloadMode = "auto"

    @property
    def streamed(self) -> bool:
        return self.mode == "streamed"

    @property
    def in_memory(self) -> bool:
        return self.mode == "memory"

    def layer_loop(
        self,
        model: PreTrainedModel,
        tokens: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype,
        work_dir: Path,
        batch_size: int,
        pass_name: str,
        key: dict[str, Any],
    ) -> LayerLoop:
        """The loop over ``model``'s layers: in memory, or streamed from ``source`` (resumable).

        Streamed, ``model`` is the stage's skeleton and the loop materialises its layers in
        place, so what the pass resolved on ``model`` holds for the loop's layers too.
        ``pass_name`` sizes the streamed working set; ``key`` is what the pass result depends
        on (a resumed run with another key starts over).
        """
        if not self.streamed:
            return MemoryLoop(model, tokens, device, batch_size)
        options = StreamOptions(
            max_memory=self.max_memory,
            activation_offload=self.activation_offload,
            batch_size=batch_size,
            pass_name=pass_name,
            key=key,
        )
        stream = StreamingModel(Path(self.source), dtype, skeleton=model)
        return StreamingRun(stream, tokens, device, work_dir, options, dtype)

    def unchanged(self, model: PreTrainedModel) -> PreTrainedModel | WrittenCheckpoint:
        """The stage output of a pass that changed nothing: the model, or its input checkpoint."""
        return model if self.in_memory else WrittenCheckpoint(Path(self.source))

    def rewrite(
        self,
        build: Callable[[], PreTrainedModel],
        write: Callable[[WeightSource, Path], Path],
        out_dir: Path,
    ) -> PreTrainedModel | WrittenCheckpoint:
        """The output of a pass that makes a new model from its input, the way residency allows.

        In memory: ``build()``, the new model. Streamed: ``write(weights, out_dir)`` writes
        the new checkpoint tensor by tensor, reading the input's shards through ``weights``
        (a :class:`~slmcompress.streaming.loader.WeightSource`; nothing is loaded whole).
        """
        if self.in_memory:
            return build()
        return WrittenCheckpoint(write(WeightSource(Path(self.source)), Path(out_dir)))


@dataclass
class StageInput:
    """What one stage runs on: its model, the tokenizer and how the model is held.

    Built once per stage by the runner. Streamed (or report-only), ``model`` is a weightless
    skeleton of ``residency.source``; the pass and its layer loop share that one object.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    residency: Residency = Residency()

    @classmethod
    def on_disk(cls, residency: Residency, dtype: torch.dtype) -> StageInput:
        """The skeleton of ``residency.source`` (no weight is read) and the tokenizer beside it.

        Report-only stages may get a quantized checkpoint: its float stand-in is never run.
        """
        source = Path(residency.source)
        skeleton = build_skeleton(source, dtype, allow_quantized=residency.mode == "report_only")
        return cls(skeleton, load_tokenizer(source), residency)


IN_MEMORY = Residency()


def over_budget(
    directory: Path | None, max_memory: int | str | None, dtype: torch.dtype
) -> str | None:
    """Why the checkpoint in ``directory`` must not be loaded whole (it exceeds the host
    budget), else ``None``: the one budget check, for stages and evaluation alike."""
    if directory is None:
        return None
    decision = should_stream(directory, max_memory, dtype)
    return decision.reason if decision.stream else None
