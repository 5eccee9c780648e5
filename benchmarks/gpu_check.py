"""The prepared GPU check of issue #24: one command, <= 8 minutes on an H100/H200.

    python benchmarks/gpu_check.py OUT_DIR            # on a CUDA machine (docs/gpu.md)
    python benchmarks/gpu_check.py OUT_DIR --dry-run  # CPU, tiny shapes, Triton interpreter

Sections, each in its own process with its own time budget (a hung kernel or a crash
costs that section only; the next one starts on time):

  a  the ``gpu``-marked tests (device-correct pipeline, kernel vs reference)
  b  the kernel table, quick mode (``benchmarks/kernel.py --quick``)
  c  end-to-end greedy decode tokens/s, batch 1 and 8, bf16 vs GPTQ-4, SmolLM2- and
     1B-Llama-shaped random models, with the serving path and load -> first token time
  d  GPTQ-4 of the 1B-class model: wall time and peak device memory beside ``plan``
  e  KD training tokens/s and peak device memory beside ``plan``

Results are rewritten after every section, so a run stopped at any point still leaves
what finished. OUT_DIR gets at most 6 files (the device machine returns 8):
``gpu_check.json``, ``gpu_check.md``, ``pytest.log``, ``sections.log`` and the kernel
table's ``kernel/kernel-<gpu>.json`` + ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SECTIONS_SCRIPT = REPO / "benchmarks" / "gpu_check_sections.py"
TOTAL_BUDGET_S = 460  # the 8 minutes, less start-up and the final write


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    budget_s: int


SECTIONS = (
    Section("a", "gpu tests (pytest -m gpu)", 165),
    Section("b", "kernel table, quick mode", 60),
    Section("c", "end-to-end decode, bf16 vs GPTQ-4", 105),
    Section("d", "GPTQ-4 of a 1B-class Llama vs plan", 80),
    Section("e", "KD training vs plan", 50),
)
#: pytest's own per-test limit inside section a (pytest-timeout), below the section's
TEST_TIMEOUT_S = 150


# ------------------------------------------------------------------ processes
def environment(dry: bool) -> dict[str, str]:
    """Offline, unbuffered, this checkout first on the path; the interpreter when dry."""
    env = dict(os.environ)
    path = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        PYTHONPATH=os.pathsep.join(dict.fromkeys(path)),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        USE_HUB_KERNELS="NO",  # the models' torch code, not optional per-device hub kernels
        TOKENIZERS_PARALLELISM="false",
    )
    if dry:  # GPTQ layers through the Triton interpreter instead of CUDA
        env.update(TRITON_INTERPRET="1", SLMCOMPRESS_KERNEL="triton")
    return env


def run_limited(
    cmd: list[str], budget_s: float, log: Path, env: dict[str, str]
) -> tuple[int, float]:
    """Run ``cmd`` appending its output to ``log``; kill its process group at the budget.

    Returns ``(exit code, wall seconds)``; the code is -9 when the budget ran out.
    """
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {shlex.join(cmd)}   (budget {budget_s:.0f} s)\n")
        out.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=max(budget_s, 1))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code = -9
    return code, time.perf_counter() - start


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the section's process group, then SIGKILL what is left after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------ sections
def gpu_test_files() -> list[str]:
    """Test modules that hold ``gpu``-marked tests (only those are imported on the GPU
    machine: other modules may need packages it lacks); the device pipeline first."""
    files = [
        str(p.relative_to(REPO))
        for p in sorted((REPO / "tests").rglob("test_*.py"))
        if "mark.gpu" in p.read_text(encoding="utf-8")
    ]
    return sorted(files, key=lambda f: "device" not in f)


def section_a(out: Path, scratch: Path, budget: float, env: dict[str, str]) -> dict[str, Any]:
    report_dir = scratch / "device-report"
    env = {**env, "SLMCOMPRESS_DEVICE_REPORT": str(report_dir)}
    files = gpu_test_files()
    # -v: one line per finished test, so a run stopped at the budget still shows each result
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider"]
    cmd += [f"--timeout={TEST_TIMEOUT_S}", "--durations=15", *files]
    code, wall = run_limited(cmd, budget, out / "pytest.log", env)
    log = (out / "pytest.log").read_text(errors="replace")
    outcomes = dict(re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", log, re.M))
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    measured = {
        p.stem: json.loads(p.read_text()) for p in sorted(report_dir.glob("*.json"))
    }  # device-vs-CPU differences each test recorded
    return {
        "exit_code": code,
        "files": files,
        "counts": counts,
        "failed": sorted(t for t, o in outcomes.items() if o in ("FAILED", "ERROR")),
        "device_vs_cpu": measured,
        "_ok": code == 0,
        "_wall": wall,
    }


def section_b(out: Path, scratch: Path, budget: float, env: dict[str, str], dry: bool) -> dict:
    kernel_dir = out / "kernel"
    cmd = [sys.executable, "benchmarks/kernel.py", "--skip-e2e", "--out-dir", str(kernel_dir)]
    cmd += ["--dry-run"] if dry else ["--quick"]
    code, wall = run_limited(cmd, budget, out / "sections.log", env)
    tables = sorted(kernel_dir.glob("kernel-*.json"))
    result: dict[str, Any] = {"exit_code": code, "files": [str(p.relative_to(out)) for p in tables]}
    if tables:
        report = json.loads(tables[0].read_text())
        result["rows"] = len(report.get("rows", []))
        result["device"] = report.get("device")
    if code != 0:
        result["log_tail"] = tail(out / "sections.log")
    return {**result, "_ok": code == 0 and bool(tables), "_wall": wall}


def measured_section(
    name: str, out: Path, scratch: Path, budget: float, env: dict[str, str], dry: bool
) -> dict[str, Any]:
    """Sections c, d, e: ``gpu_check_sections.py NAME`` writes its JSON (rows so far, if stopped)."""
    result = scratch / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(SECTIONS_SCRIPT), name, str(result), str(scratch / "work")]
    cmd += ["--dry-run"] if dry else []
    code, wall = run_limited(cmd, budget, out / "sections.log", env)
    data = json.loads(result.read_text()) if result.is_file() else {}
    if code != 0:
        data["log_tail"] = tail(out / "sections.log")
    return {"exit_code": code, **data, "_ok": code == 0 and not data.get("partial"), "_wall": wall}


def run_section(section: Section, out: Path, scratch: Path, budget: float, dry: bool) -> dict:
    env = environment(dry)
    if section.key == "a":
        return section_a(out, scratch, budget, env)
    if section.key == "b":
        return section_b(out, scratch, budget, env, dry)
    name = {"c": "decode", "d": "gptq", "e": "kd"}[section.key]
    return measured_section(name, out, scratch, budget, env, dry)


# ------------------------------------------------------------------ machine and report
def machine(dry: bool) -> dict[str, Any]:
    """The GPU, driver and library versions behind the numbers."""
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for package in ("triton", "transformers", "pydantic", "gguf"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:  # a finding, not a crash
            info[package] = "not installed"
    if not dry:
        query = [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader",
        ]
        try:
            info["nvidia_smi"] = subprocess.run(
                query, capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    return info


def status(result: dict[str, Any]) -> str:
    if result.get("exit_code") == -9:
        return "timeout"
    return "ok" if result.get("_ok") else "failed"


def write_results(out: Path, results: dict[str, Any]) -> None:
    """``gpu_check.json`` and ``gpu_check.md``, replaced atomically (a kill leaves the last)."""
    for name, text in (
        ("gpu_check.json", json.dumps(results, indent=1, default=str) + "\n"),
        ("gpu_check.md", render_md(results)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def render_md(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"# GPU check{' (dry run: CPU, tiny shapes, Triton interpreter)' if results['dry_run'] else ''}",
        "",
        f"GPU {m.get('gpu')} ({m.get('nvidia_smi', '-')}); torch {m['torch']} (CUDA {m['cuda']}), "
        f"triton {m.get('triton')}, transformers {m.get('transformers')}, python {m['python']}.",
        f"Command: `{results['command']}`; started {results['started']}.",
        "",
        "| section | status | wall s | budget s |",
        "|---|---|---|---|",
    ]
    for key, sec in results["sections"].items():
        lines.append(
            f"| {key}: {sec['title']} | {sec['status']} | {sec['wall_s']} | {sec['budget_s']} |"
        )
    for key, sec in results["sections"].items():
        lines += ["", f"## {key}: {sec['title']}", "", *_section_md(key, sec.get("result", {}))]
        if sec.get("error"):
            lines += ["", "```", sec["error"], "```"]
    return "\n".join(lines) + "\n"


def _section_md(key: str, r: dict[str, Any]) -> list[str]:
    if key == "a":
        lines = [f"Counts: {r.get('counts')}; failed: {r.get('failed') or 'none'}.", ""]
        for name, values in (r.get("device_vs_cpu") or {}).items():
            lines.append(f"- `{name}`: `{json.dumps(values.get('rel_diff', values), default=str)}`")
        return lines
    if key == "b":
        return [f"Kernel table: {r.get('files')} ({r.get('rows')} rows)."]
    if key == "c":
        rows = [
            "| shape | model | batch | tokens/s | load s | first token (cold) s | load -> first token s | serving path |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in r.get("rows", []):
            rows.append(
                f"| {row['shape']} | {row['model']} | {row['batch']} | {row['tokens_per_s']} | "
                f"{row['load_s']} | {row['first_token_cold_s']} | {row['load_to_first_token_s']} | "
                f"{row['serving_path']} |"
            )
        return rows
    if key in ("d", "e") and "plan" in r:
        measured = r.get("wall_s", r.get("pass_wall_s"))
        speed = f"; {r['train_tokens_per_s']} tokens/s" if "train_tokens_per_s" in r else ""
        plan = r["plan"]
        return [
            "| | wall s | peak device GB |",
            "|---|---|---|",
            f"| measured | {measured}{speed} | {r.get('peak_device_gb')} |",
            f"| plan | {plan['time_s']} | {plan['device_peak_gb']} |",
            "",
            f"Details: `{json.dumps({k: v for k, v in r.items() if k != 'plan'}, default=str)}`",
        ]
    return [f"`{json.dumps(r, default=str)[:2000]}`"]


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreter")
    parser.add_argument("--sections", default="abcde", help="subset to run, e.g. 'acd'")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds in all")
    args = parser.parse_args(argv)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    results: dict[str, Any] = {
        "check": "issue #24 GPU check",
        "dry_run": args.dry_run,
        "command": shlex.join(["python", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(args.dry_run),
        "sections": {},
    }
    if not args.dry_run and results["machine"]["gpu"] is None:
        parser.error("no CUDA GPU here: use --dry-run")
    with tempfile.TemporaryDirectory(prefix="slm-gpu-check-") as tmp:
        for section in (s for s in SECTIONS if s.key in args.sections):
            budget = min(section.budget_s, deadline - time.perf_counter())
            entry = {"title": section.title, "budget_s": section.budget_s}
            if budget < 5:
                entry.update(status="skipped", wall_s=0, error="no time left in the total budget")
            else:
                entry.update(_run_one(section, out, Path(tmp), budget, args.dry_run))
            results["sections"][section.key] = entry
            write_results(out, results)
            print(f"[{section.key}] {entry['status']} in {entry['wall_s']} s", flush=True)
    return 0 if all(s["status"] == "ok" for s in results["sections"].values()) else 1


def _run_one(section: Section, out: Path, scratch: Path, budget: float, dry: bool) -> dict:
    """One section, its failure recorded instead of raised (the next section still runs)."""
    start = time.perf_counter()
    try:
        result = run_section(section, out, scratch, budget, dry)
    except Exception as exc:  # noqa: BLE001 - recorded in the results, the check goes on
        return {
            "status": "failed",
            "wall_s": round(time.perf_counter() - start, 1),
            "error": repr(exc),
        }
    entry = {"status": status(result), "wall_s": round(result.pop("_wall"), 1), "result": result}
    result.pop("_ok")
    if entry["status"] != "ok" and result.get("log_tail"):
        entry["error"] = result["log_tail"]
    return entry


if __name__ == "__main__":
    raise SystemExit(main())
