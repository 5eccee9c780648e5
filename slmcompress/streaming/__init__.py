"""Out-of-core (streaming) execution for models larger than memory: the 70B path.

- :mod:`.loader`: meta skeleton + one decoder layer at a time from safetensors shards;
- :mod:`.activations`: calibration activations in memory up to a budget, on disk beyond;
- :mod:`.engine`: :class:`StreamingRun` (the streamed :class:`~slmcompress.layerwise.LayerLoop`);
- :mod:`.budget`: :func:`should_stream`, the host budgets and :class:`StreamOptions`;
- :mod:`.residency`: how the runner holds a stage's model (:class:`StageInput`), the loop
  and the output that follow;
- :mod:`.resume`: per-layer resume state; :mod:`.sharded_writer`: size-limited shards.

Nothing here imports the passes, the recipe or the runner: the algorithms are written once
against the loop, and the runner chooses which loop they get. The passes, ``prune/`` and
``distill/`` use :mod:`.residency`, :mod:`.budget` and :mod:`.forward`, never the engine or
the loader (an import-linter contract).
"""

from slmcompress.streaming.budget import StreamDecision, StreamOptions, should_stream
from slmcompress.streaming.engine import StreamingRun

__all__ = [
    "StreamDecision",
    "StreamOptions",
    "StreamingRun",
    "should_stream",
]
