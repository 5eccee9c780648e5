"""Out-of-core (streaming) execution for models larger than memory: the 70B path.

- :mod:`.loader`: meta skeleton + one decoder layer at a time from safetensors shards;
- :mod:`.activations`: calibration activations in memory up to a budget, on disk beyond;
- :mod:`.engine`: :class:`StreamingRun` (the streamed :class:`~slmcompress.layerwise.LayerLoop`)
  and :func:`should_stream`;
- :mod:`.residency`: how the runner holds a stage's model, and the loop that follows;
- :mod:`.resume`: per-layer resume state; :mod:`.sharded_writer`: size-limited shards.

Nothing here imports the passes, the recipe or the runner: the algorithms are written once
against the loop, and the runner chooses which loop they get.
"""

from slmcompress.streaming.engine import (
    StreamDecision,
    StreamingRun,
    StreamOptions,
    should_stream,
)

__all__ = [
    "StreamDecision",
    "StreamOptions",
    "StreamingRun",
    "should_stream",
]
