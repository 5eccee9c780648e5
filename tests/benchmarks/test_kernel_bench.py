"""``benchmarks/kernel.py --dry-run`` runs end to end (CPU, Triton interpreter), so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_benchmark_dry_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/kernel.py", "--dry-run", "--out-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "kernel-cpu-interpreter.json").read_text())
    impls = {row["impl"] for row in report["rows"]}
    assert {"fp16 cuBLAS", "bf16 cuBLAS", "int4 triton fused", "int4 dequant+cuBLAS"} <= impls
    assert all(row["us"] > 0 for row in report["rows"])
    assert [row["batch"] for row in report["e2e"]] == [1, 1]
    assert "| K | N | M |" in (tmp_path / "kernel-cpu-interpreter.md").read_text()
