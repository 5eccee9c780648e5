"""Out-of-core (streaming) calibration for models larger than memory: the 70B path.

- :mod:`.loader`: meta skeleton + one decoder layer at a time from safetensors shards;
- :mod:`.activations`: calibration activations in memory up to a budget, on disk beyond;
- :mod:`.engine`: :class:`StreamingRun` / :func:`streaming_layerwise` (the ``LayerStep``
  contract of :mod:`slmcompress.calib`) and :func:`should_stream`;
- :mod:`.resume`: per-layer resume state; :mod:`.sharded_writer`: size-limited shards;
- :mod:`.drivers`: streamed GPTQ and importance scoring.
"""

from slmcompress.streaming.engine import (
    StreamDecision,
    StreamingRun,
    StreamOptions,
    should_stream,
    streaming_layerwise,
)

__all__ = [
    "StreamDecision",
    "StreamOptions",
    "StreamingRun",
    "should_stream",
    "streaming_layerwise",
]
