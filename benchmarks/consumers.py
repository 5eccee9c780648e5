"""Our GPTQ v1 checkpoints in a GPTQ consumer -> benchmarks/results/consumers.{json,md}.

Quantizes SmolLM2-135M with our GPTQ pass (small calibration: C4, 16 x 512), then loads each
checkpoint three ways and compares them on the same WikiText-2 test tokens:

- ``consumer``: ``transformers.AutoModelForCausalLM.from_pretrained(dir)``, i.e. transformers'
  GPTQ integration through optimum + gptqmodel (its CPU kernels: ``TorchAtenLinear`` = torch's
  int4 kernel for 4-bit, ``TorchLinear`` = dequantize + matmul otherwise);
- ``ours``: ``slmcompress.io.load.load_model(dir)`` on the plain-torch reference path
  (``SLMCOMPRESS_KERNEL=torch``: float32 dequantization, exact);
- ``ours-int4``: the same on our CPU serving backend (``cpu-int4``) where it applies.

Logits are compared on 4 x 256-token windows (max/mean |diff|, top-1 agreement), perplexity
on the first 8,192 tokens (512-token windows). A consumer failure is recorded with its error.
Run it with an interpreter that has gptqmodel 7.6 + optimum (see benchmarks/README or the
results file for the exact set-up):

    GPTQMODEL_CPU_WORKERS=2 /work/venvs/gptqmodel/bin/python benchmarks/consumers.py
    ... benchmarks/consumers.py --only w4-g64 --calib 8x256      # quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

log = logging.getLogger("bench.consumers")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # this checkout's slmcompress, whatever the venv has installed
EVAL_TOKENS, EVAL_SEQ, PROBE_WINDOWS, PROBE_SEQ = 8192, 512, 4, 256

# (row id, quantize stage options, prune first to this MLP width or None). The ragged row is
# RTN: whether a consumer loads a checkpoint depends on its shapes, not on its codes.
ROWS = [
    ("w4-g64", {"bits": 4, "group_size": "auto", "act_order": False}, None),
    ("w4-g64-act", {"bits": 4, "group_size": "auto", "act_order": True}, None),
    ("w8-g64", {"bits": 8, "group_size": "auto", "act_order": False}, None),
    ("pruned-w4-g64-act", {"bits": 4, "group_size": "auto", "act_order": True}, 1152),
    ("w3-g64", {"bits": 3, "group_size": "auto", "act_order": False}, None),
    ("w4-g128-ragged", {"method": "rtn", "bits": 4, "group_size": 128}, None),
]


def make_context(tokenizer, work: Path, n_samples: int, seq_len: int):
    """A pass Context on CPU with the benchmark's calibration budget."""
    from slmcompress.data import CalibrationSpec, DataConfig
    from slmcompress.passes.base import Context

    return Context(
        tokenizer=tokenizer,
        data=DataConfig(
            calibration=CalibrationSpec(source="c4", n_samples=n_samples, seq_len=seq_len)
        ),
        device=torch.device("cpu"),
        dtype=torch.float32,
        original_model="smollm2-135m",
        teacher=None,
        stage_dir=work / "stage",
        work_dir=work / "work",
        seed=0,
    )


def build_checkpoint(row: tuple, work: Path, calib: tuple[int, int]) -> dict:
    """Quantize (after pruning, for the pruned row) and save; returns the build record."""
    import copy

    from slmcompress.io.checkpoint import save_checkpoint
    from slmcompress.io.load import load_model
    from slmcompress.passes import get_pass
    from slmcompress.passes.prune import PruneConfig, PrunePass

    row_id, options, ffn = row
    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    model, tokenizer = copy.deepcopy(loaded.model), loaded.tokenizer
    ctx = make_context(tokenizer, work / row_id, *calib)
    start = time.perf_counter()
    if ffn:
        target = {"ffn_hidden_size": ffn}
        prune = PruneConfig(
            type="prune", method="activation", target=target, n_samples=16, seq_len=256
        )
        model = PrunePass(prune).run(model, ctx)
    options = {"method": "gptq", **options}
    pass_cls = get_pass("quantize", options["method"])
    model = pass_cls(pass_cls.Config(type="quantize", **options)).run(model, ctx)
    save_checkpoint(model, tokenizer, work / row_id / "ckpt")
    return {
        "quantize": options,
        "calibration": f"{calib[0]}x{calib[1]}" if options["method"] == "gptq" else None,
        "pruned_ffn": ffn,
        "quantization_config": model.config.quantization_config,
        "warnings": ctx.warnings,
        "build_s": round(time.perf_counter() - start, 1),
    }


def eval_data(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """WikiText-2 test: probe windows ``(W, T)`` for logits and the perplexity tokens ``(N,)``."""
    from slmcompress.data import EvalSpec, eval_tokens

    tokens = eval_tokens(tokenizer, EvalSpec(max_tokens=EVAL_TOKENS, seq_len=EVAL_SEQ))
    probe = tokens[: PROBE_WINDOWS * PROBE_SEQ].view(PROBE_WINDOWS, PROBE_SEQ)
    return probe, tokens


@torch.no_grad()
def measure(model, probe: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Probe logits ``(W, T, V)`` float32 and perplexity on ``tokens``."""
    from slmcompress.eval.perplexity import perplexity

    logits = torch.cat([model(probe[i : i + 1]).logits.float() for i in range(probe.shape[0])])
    return logits, perplexity(model, tokens, EVAL_SEQ, batch_size=1).ppl


def compare(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """Logit differences of ``other`` against ``ref`` (both ``(W, T, V)``)."""
    diff = (other - ref).abs()
    return {
        "max_abs_diff": round(diff.max().item(), 4),
        "mean_abs_diff": round(diff.mean().item(), 5),
        "top1_agreement": round((other.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
        "ref_logit_absmax": round(ref.abs().max().item(), 2),
    }


def load_ours(directory: Path, backend: str):
    """Our loader; ``torch`` = the exact reference path, ``auto`` = the serving backend."""
    from slmcompress.io.load import load_model
    from slmcompress.kernels.dispatch import KERNEL_ENV, set_backends

    os.environ[KERNEL_ENV] = backend
    try:
        model = load_model(str(directory), dtype="float32", device="cpu").model
        counts = set_backends(model)
    finally:
        os.environ.pop(KERNEL_ENV, None)
    return model, counts


def consumer_model(directory: Path):
    """transformers' own GPTQ loading (optimum + gptqmodel), and the kernel classes it chose."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), device_map="cpu").eval()
    kinds = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Linear")}
    )
    return model, [k for k in kinds if k != "Linear"]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def evaluate_row(directory: Path, probe: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Ours (reference and serving) against the consumer, on the same tokens."""
    from slmcompress.quant.quant_linear import cached_dequantization

    result: dict = {}
    ours, _ = load_ours(directory, "torch")
    with cached_dequantization(ours):
        ref_logits, result["ours_ppl"] = measure(ours, probe, tokens)
    del ours
    served, counts = load_ours(directory, "auto")
    result["ours_serving_backends"] = counts
    logits, result["ours_serving_ppl"] = measure(served, probe, tokens)
    result["ours_serving_vs_ours"] = compare(ref_logits, logits)
    del served
    start = time.perf_counter()
    try:
        consumer, result["consumer_kernels"] = consumer_model(directory)
        logits, result["consumer_ppl"] = measure(consumer, probe, tokens)
    except Exception as exc:  # noqa: BLE001 - the point is to record any refusal
        result.update(consumer_loads=False, consumer_error=first_line(exc))
        return result
    result.update(consumer_loads=True, consumer_vs_ours=compare(ref_logits, logits))
    result["consumer_s"] = round(time.perf_counter() - start, 1)
    return result


def versions() -> dict:
    import importlib.metadata as md

    names = ("torch", "transformers", "optimum", "gptqmodel", "slmcompress")
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def render_md(report: dict) -> str:
    """The results table and notes."""
    lines = [
        "# GPTQ checkpoints in a GPTQ consumer (transformers + optimum + gptqmodel, CPU)",
        "",
        f"Command: `{report['command']}`  ",
        *[
            f"Earlier run (rows kept): `{r['command']}`, load {r['machine']}  "
            for r in report.get("earlier_runs", [])
        ],
        f"Versions: {report['versions']}  ",
        f"Machine: {report['machine']}  ",
        f"Calibration (GPTQ rows): C4, per row in the JSON; logits on {PROBE_WINDOWS} x {PROBE_SEQ} "
        f"WikiText-2 test tokens, ppl on the first {EVAL_TOKENS} ({EVAL_SEQ}-token windows).",
        "",
        "| row | bits | group | act_order | consumer loads | consumer kernel | max abs Δlogit | "
        "mean abs Δlogit | top-1 agree | ppl ours | ppl consumer | ppl ours cpu-int4 | "
        "cpu-int4 max abs Δlogit |",
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        q = row["quantization_config"]
        c = row.get("consumer_vs_ours") or {}
        s = row.get("ours_serving_vs_ours") or {}
        loads = "yes" if row.get("consumer_loads") else f"**no**: `{row.get('consumer_error')}`"
        cells = [
            row["id"],
            q["bits"],
            q["group_size"],
            q["desc_act"],
            loads,
            ", ".join(row.get("consumer_kernels") or []) or "—",
            c.get("max_abs_diff", "—"),
            c.get("mean_abs_diff", "—"),
            c.get("top1_agreement", "—"),
            _num(row.get("ours_ppl")),
            _num(row.get("consumer_ppl")),
            _num(row.get("ours_serving_ppl")),
            s.get("max_abs_diff", "—"),
        ]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    lines += ["", *[f"- {note}" for note in report.get("notes", [])]]
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="row ids to run")
    parser.add_argument("--calib", default="16x512", help="C4 calibration NxT")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slmcompress-consumers"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared box: 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "consumers")
    parser.add_argument("--append", action="store_true", help="keep the rows already in --out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    calib = tuple(int(x) for x in args.calib.split("x"))
    from slmcompress.io.load import load_model

    probe, tokens = eval_data(load_model("smollm2-135m", device="cpu").tokenizer)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": versions(),
        "machine": machine(),
        "calibration": args.calib,
        "rows": [],
    }
    if args.append and args.out.with_suffix(".json").is_file():
        previous = json.loads(args.out.with_suffix(".json").read_text())
        report["rows"] = [r for r in previous["rows"] if not args.only or r["id"] not in args.only]
        report["earlier_runs"] = previous.get("earlier_runs", []) + [
            {k: previous[k] for k in ("command", "machine", "calibration")}
        ]
    for row in [r for r in ROWS if not args.only or r[0] in args.only]:
        log.info("row %s: building", row[0])
        record = {"id": row[0], **build_checkpoint(row, args.work, calib)}
        log.info("row %s: evaluating", row[0])
        record.update(evaluate_row(args.work / row[0] / "ckpt", probe, tokens))
        report["rows"].append(record)
        report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        args.out.with_suffix(".md").write_text(render_md(report))
        log.info("row %s: %s", row[0], json.dumps(record, default=str)[:400])


if __name__ == "__main__":
    main()
