"""``benchmarks/gpu_check.py``: the dry run end to end (CPU, tiny shapes, Triton
interpreter), so the prepared GPU check cannot rot; and its time-budget plumbing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def test_a_section_over_its_budget_is_killed_and_the_log_kept(tmp_path):
    log = tmp_path / "log"
    script = "import time; print('started', flush=True); time.sleep(60)"
    start = time.perf_counter()
    code, wall = gpu_check.run_limited(
        [sys.executable, "-c", script], 2, log, dict(gpu_check.os.environ)
    )
    assert code == -9 and wall < 20 and time.perf_counter() - start < 20
    assert "started" in log.read_text()
    assert gpu_check.status({"exit_code": code, "_ok": False}) == "timeout"


def test_gpu_tests_are_found_pipeline_first():
    files = gpu_check.gpu_test_files()
    assert files[0] == "tests/test_device_pipeline.py"
    assert "tests/kernels/test_int4_matmul.py" in files


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", str(out), "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = json.loads((out / "gpu_check.json").read_text())
    sections = results["sections"]
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-3000:], sections)
    assert {k: s["status"] for k, s in sections.items()} == dict.fromkeys("abcde", "ok")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files  # what the device machine sends back
    assert sections["a"]["result"]["counts"].get("skipped", 0) > 0  # gpu tests: no CUDA here
    rows = sections["c"]["result"]["rows"]
    assert {(r["shape"], r["model"], r["batch"]) for r in rows} == {
        (shape, model, batch)
        for shape in ("tiny-a", "tiny-b")
        for model in ("fp32", "gptq-4 g128")
        for batch in (1, 2)
    }
    assert all(r["tokens_per_s"] > 0 and r["load_to_first_token_s"] > 0 for r in rows)
    assert all("triton-int4" in r["serving_path"] for r in rows if r["model"].startswith("gptq-4"))
    gptq, kd = sections["d"]["result"], sections["e"]["result"]
    assert gptq["quantized_linears"] == 14 and gptq["wall_s"] > 0 and "plan" in gptq
    assert kd["train_tokens_per_s"] > 0 and kd["plan"]["host_peak_gb"] > 0
    markdown = (out / "gpu_check.md").read_text()
    assert "| c: end-to-end decode" in markdown and "load -> first token" in markdown
