"""Shared by the benchmarks that drive the real CLI: run ``slmcompress``, read stage reports."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], log_path: Path) -> dict[str, Any]:
    """Run ``python -m slmcompress`` with ``argv``; wall time and the process's peak RSS."""
    cmd = [sys.executable, "-m", "slmcompress", *argv]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: {shlex.join(cmd)} failed; see {log_path}")
    return {
        "command": shlex.join(["python", "-m", "slmcompress", *argv]),
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def stage_reports(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Stage directory name -> its report, in stage order (``00-input`` first)."""
    return {
        d.name: json.loads((d / "report.json").read_text())
        for d in sorted(p for p in run_dir.iterdir() if p.is_dir())
        if (d / "report.json").is_file()
    }


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    m = report["metrics"]
    extra = report.get("extra", {})
    out = {
        "stage": report["stage"],
        "pass": report["pass"],
        "ppl": m.get("wikitext2_ppl"),
        "hellaswag_acc_norm": m.get("hellaswag_acc_norm"),
        "hellaswag_n": m.get("hellaswag_n"),
        "size_mb": round(report["model"]["bytes_on_disk"] / 1e6, 1),
    }
    if "distill" in extra:
        d = extra["distill"]
        out["train_tokens"] = d.get("train_tokens")
        out["train_tokens_per_s"] = d.get("train_tokens_per_s")
    if "quantized" in extra:
        q = extra["quantized"]
        out["qad"] = {
            k: q.get(k)
            for k in ("mode", "trainable_params", "codes_changed", "mean_rel_scale_change")
        }
    return out


def run_complete(run_dir: Path) -> bool:
    """A run directory whose manifest says every stage finished (the CLI would only resume)."""
    manifest = run_dir / "run.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("status") == "complete"


def stage_walls(run_dir: Path) -> dict[str, float | None]:
    """Stage directory name -> the stage's wall seconds, from the run manifest."""
    manifest = json.loads((run_dir / "run.json").read_text())
    return {s["dir"]: s.get("wall_s") for s in manifest.get("stages", [])}


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def provenance() -> dict[str, Any]:
    """Where and how a result was made: the machine, the versions, this script's command line."""
    return {
        "machine": machine(),
        "versions": versions(),
        "command": "python " + shlex.join(sys.argv),
    }


def run_row(row_id: str, work: Path, argv: list[str]) -> dict[str, Any]:
    """Run ``slmcompress <argv> --output-dir work/row_id`` unless that run is complete; its stages."""
    run_dir = work / row_id
    argv = [*argv, "--output-dir", str(run_dir)]
    proc = None if run_complete(run_dir) else run_cli(argv, work / f"{row_id}.log")
    walls = stage_walls(run_dir)
    stages = [{**summarise(r), "wall_s": walls.get(d)} for d, r in stage_reports(run_dir).items()]
    return {
        "id": row_id,
        "command": shlex.join(["slmcompress", *argv]),
        "stages": stages,
        "process": proc,
    }
