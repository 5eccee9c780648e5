"""Where a stage's model lives -- in memory, streamed from disk, or report-only -- and the
:class:`~slmcompress.layerwise.LayerLoop` that follows from it.

The runner decides residency once per stage (:func:`slmcompress.runner.Runner._stage_input`)
and hands it to the pass in ``ctx.residency``; a pass asks ``ctx.layer_loop(...)`` for its
loop and never looks at how the model is held.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel

from slmcompress.layerwise import LayerLoop, MemoryLoop
from slmcompress.streaming.activations import OffloadMode

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

        ``pass_name`` sizes the streamed working set; ``key`` is what the pass result depends
        on (a resumed run with another key starts over).
        """
        if not self.streamed:
            return MemoryLoop(model, tokens, device, batch_size)
        from slmcompress.streaming.engine import StreamingRun, StreamOptions
        from slmcompress.streaming.loader import StreamingModel

        options = StreamOptions(
            max_memory=self.max_memory,
            activation_offload=self.activation_offload,
            batch_size=batch_size,
            pass_name=pass_name,
            key=key,
        )
        stream = StreamingModel(Path(self.source), dtype)
        return StreamingRun(stream, tokens, device, work_dir, options, dtype)


IN_MEMORY = Residency()
