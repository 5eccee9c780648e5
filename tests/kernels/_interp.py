"""Run code in a fresh Python under ``TRITON_INTERPRET=1``.

The interpreter flag is read when Triton is imported, and another test module may already
have imported Triton in the pytest process, so interpreter runs get their own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_interpreted(args: list[str], timeout: float = 600, **extra_env: str) -> dict:
    """Run ``python <args>`` with the interpreter on; the last stdout line is a JSON object."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1", **extra_env}
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode:
        pytest.fail(f"interpreted run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
