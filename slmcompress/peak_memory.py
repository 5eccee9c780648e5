"""The process's peak memory so far, for stage reports: host RSS and, on CUDA, the device's."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory(device: torch.device | None = None) -> dict[str, float]:
    """Peak host RSS of this process so far (GB) and, on CUDA, peak allocated device memory.

    A process-wide high-water mark: a stage's number includes what earlier work in the same
    process reached (the input evaluation), which is what the machine has to hold anyway.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    out = {"host_peak_rss_gb": round(rss * scale / 1e9, 3)}
    if device is not None and device.type == "cuda":
        out["device_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    return out
