"""``benchmarks/kernel.py`` and ``benchmarks/kernel_tune.py`` dry runs (CPU, Triton interpreter):
both run end to end and write what a GPU run writes, so neither can rot before a GPU sees it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from slmcompress.kernels.config_store import read_file
from slmcompress.kernels.routes import Key, invalid

REPO = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def _run(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@needs_triton
def test_kernel_benchmark_dry_run(tmp_path):
    _run(["benchmarks/kernel.py", "--dry-run", "--out-dir", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kernel-cpu-interpreter.json", "kernel-cpu-interpreter.md",
    ]  # fmt: skip
    report = json.loads((tmp_path / "kernel-cpu-interpreter.json").read_text())
    impls = {row["impl"] for row in report["rows"]}
    assert {
        "fp16 cuBLAS",
        "bf16 cuBLAS",
        "int4 served",
        "int3 served",
        "int4 dequant+cuBLAS",
    } <= impls
    served = [r for r in report["rows"] if r["impl"].endswith("served")]
    assert all(r["route"].endswith("(heuristic)") for r in served)  # no config here: no tuning
    assert {r["route"].split("[")[0] for r in served} == {"gemv", "mm"}
    assert all(row["us"] > 0 and "roofline_pct" in row for row in report["rows"])
    assert [row["batch"] for row in report["e2e"]] == [1, 1]
    assert report["e2e"][1]["routes"]  # the quantized model's calls were served and counted
    assert "| K | N | M | impl | route |" in (tmp_path / "kernel-cpu-interpreter.md").read_text()


@needs_triton
def test_tuning_sweep_dry_run_writes_a_shippable_config(tmp_path):
    _run(["benchmarks/kernel_tune.py", str(tmp_path), "--dry-run"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "cpu-interpreter.json", "kernel-tune-cpu-interpreter-log.json", "kernel-tune-cpu-interpreter.md",
    ]  # fmt: skip
    entries = read_file(tmp_path / "cpu-interpreter.json")  # what the config store reads
    log = json.loads((tmp_path / "kernel-tune-cpu-interpreter-log.json").read_text())
    assert len(entries) == len(log["records"]) == 6
    for key, choice in entries.items():
        assert invalid(choice, key, compiled=False) is None
        rows = log["records"][str(key)]["rows"]
        assert all("us" in r and r["rel_err"] < 2e-3 for r in rows)  # checked, then timed
    assert {c.route for c in entries.values()} == {"gemv", "mm"}
    assert Key(3, 64, 128, 256, 1) in entries
