"""Side-by-side weight-quantization benchmark on SmolLM2-135M -> benchmarks/results/quantize.{json,md}.

Every row runs in its own subprocess (so its peak RSS is its own) on the same calibration
tokens (C4, seeded) and the same WikiText-2 test tokens (first 8,192, 512-token windows).
The parent writes the token tensors once; rows (and the optional llm-compressor row, run
with another interpreter) read them, so every method sees identical data.

    python benchmarks/quantize.py                      # all rows
    python benchmarks/quantize.py --only gptq-4-128-act --calib 16x256   # quick check
    python benchmarks/quantize.py --llmc-python /tmp/lcvenv/bin/python   # + llm-compressor row
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

log = logging.getLogger("bench.quantize")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EVAL_TOKENS, EVAL_SEQ = 8192, 512

# (row id, method, bits, group_size, act_order[, extra pass options]); ordered by priority
# (results are written incrementally). GPTQ rows use the pass defaults (clip_search on,
# true_sequential on, damp 0.01) unless the options say otherwise. g64 rows sit next to
# llm-compressor, which refuses group 128 on SmolLM2 (hidden 576 is not a multiple of 128).
ROWS = [
    ("fp32", "fp32", 32, None, None),
    ("rtn-4-128", "rtn", 4, 128, None),
    ("gptq-4-128", "gptq", 4, 128, False),
    ("gptq-4-128-act", "gptq", 4, 128, True),
    ("rtn-3-128", "rtn", 3, 128, None),
    ("gptq-3-128", "gptq", 3, 128, False),
    ("gptq-3-128-act", "gptq", 3, 128, True),
    ("rtn-4-pc", "rtn", 4, -1, None),
    ("gptq-4-pc", "gptq", 4, -1, False),
    ("gptq-4-pc-act", "gptq", 4, -1, True),
    ("bnb-nf4", "bnb-nf4", 4, 64, None),
    ("rtn-4-64", "rtn", 4, 64, None),
    ("gptq-4-64-act", "gptq", 4, 64, True),
    ("llmc", "llm-compressor", 4, None, False),
    # ablations of the GPTQ defaults (4-bit g128 act_order) and of clipping for RTN
    ("gptq-4-128-act-noclip", "gptq", 4, 128, True, {"clip_search": False}),
    ("rtn-4-128-clip", "rtn", 4, 128, None, {"clip_search": True}),
    ("gptq-3-128-act-noclip", "gptq", 3, 128, True, {"clip_search": False}),
    ("gptq-4-128-act-damp0.1", "gptq", 4, 128, True, {"damp_percent": 0.1}),
    ("gptq-4-128-act-notrueseq", "gptq", 4, 128, True, {"true_sequential": False}),
    ("gptq-4-64-static", "gptq", 4, 64, True, {"static_groups": True}),  # = llmc "static"
]


def cpu_seconds() -> float:
    """User + system CPU time of this process (robust to other jobs sharing the cores)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def hellaswag(model, tokenizer, limit: int) -> float | None:
    """acc_norm on a fixed HellaSwag subset, if the task runner exists in this checkout (limit > 0)."""
    if limit <= 0:
        return None
    try:
        from slmcompress.eval.tasks import run_tasks
    except ImportError:
        return None
    result = run_tasks(model, tokenizer, ["hellaswag"], limit=limit)
    scores = result.get("hellaswag", result)
    return scores.get("acc_norm") if isinstance(scores, dict) else None


def stage_config(
    method: str,
    bits: int,
    group_size: int | None,
    act_order: bool | None,
    options: dict | None = None,
) -> dict:
    """The pass config dict of a row (the same keys a recipe stage has)."""
    if method == "gptq":
        return dict(
            type="quantize",
            method="gptq",
            bits=bits,
            group_size=group_size,
            act_order=act_order,
            **(options or {}),
        )
    if method == "rtn":
        return dict(
            type="quantize", method="rtn", bits=bits, group_size=group_size, **(options or {})
        )
    return dict(type="quantize", method=method, **(options or {}))


def run_row(spec: dict, work: Path) -> dict:
    """Child process: quantize, save, reload the checkpoint, evaluate. Returns the row."""
    import torch

    from slmcompress.data import CalibrationSpec, DataConfig
    from slmcompress.eval.perplexity import perplexity
    from slmcompress.io.checkpoint import bytes_on_disk, load_checkpoint, save_checkpoint
    from slmcompress.io.load import load_model
    from slmcompress.passes import get_pass
    from slmcompress.passes.base import Context
    from slmcompress.quant.quant_linear import cached_dequantization

    torch.manual_seed(0)
    tokens = load_file(str(work / "tokens.safetensors"))
    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    calib = tokens["calib"]
    data = DataConfig(
        calibration=CalibrationSpec(source="c4", n_samples=calib.shape[0], seq_len=calib.shape[1])
    )
    ctx = Context(
        tokenizer=tokenizer,
        data=data,
        device=torch.device("cpu"),
        dtype=torch.float32,
        original_model="smollm2-135m",
        teacher=None,
        stage_dir=work / spec["id"],
        work_dir=work / f"{spec['id']}-work",
        seed=0,
    )
    ctx._token_cache[("calib", calib.shape[0], calib.shape[1])] = calib
    wall, cpu, rss, resolved = 0.0, 0.0, peak_rss_bytes(), None
    if spec["method"] != "fp32":
        config = stage_config(
            spec["method"], spec["bits"], spec["group_size"], spec["act_order"], spec["options"]
        )
        pass_cls = get_pass("quantize", config["method"])
        resolved = pass_cls.Config(**config)
        start, cpu0 = time.perf_counter(), cpu_seconds()
        model = pass_cls(resolved).run(model, ctx)
        wall, cpu, rss = time.perf_counter() - start, cpu_seconds() - cpu0, peak_rss_bytes()
    out = save_checkpoint(model, tokenizer, work / spec["id"])
    del model
    model, _ = load_checkpoint(out, dtype=torch.float32)  # evaluate the saved artifact
    with cached_dequantization(model):  # the same numbers as the packed path, float speed
        ppl = perplexity(model, tokens["eval"], EVAL_SEQ, batch_size=4).ppl
        acc = hellaswag(model, tokenizer, spec["hellaswag_limit"])
    return dict(
        id=spec["id"],
        method=spec["method"],
        options=spec["options"],
        bits=spec["bits"],
        group_size=spec["group_size"],
        act_order=spec["act_order"],
        ppl=ppl,
        hellaswag_acc_norm=acc,
        size_mb=bytes_on_disk(out) / 1e6,
        wall_s=wall,
        cpu_s=cpu,
        peak_rss_bytes=rss,
        tool="slmcompress",
        calibration=f"{calib.shape[0]}x{calib.shape[1]}",
        config=resolved.model_dump(mode="json") if resolved is not None else None,
        warnings=ctx.warnings,
        layer_err_vs_rtn=ctx.extra_metrics.get("gptq_vs_rtn_output_err"),
    )


LLMC_CHILD = r"""
import json, math, resource, sys, time, torch
from pathlib import Path
from safetensors.torch import load_file
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
model_dir, work, group = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
tokens = load_file(str(work / "tokens.safetensors"))
calib = tokens["calib"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    num_bits=4, type="int", symmetric=False, strategy="group", group_size=group))
recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=0.01)
cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
start = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1], pipeline="sequential")
wall = time.perf_counter() - start
cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ev = tokens["eval"]
windows = ev[: ev.numel() // 512 * 512].view(-1, 512)
nll, count = 0.0, 0
with torch.no_grad():
    for w in windows:
        logits = model(input_ids=w[None]).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], w[1:], reduction="sum").item()
        count += w.numel() - 1
# the in-memory weights are the dequantized ones; keep them for the parent's HellaSwag
dense = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
         if not k.rsplit(".", 1)[-1].startswith(("weight_scale", "weight_zero_point", "weight_g_idx"))}
model.save_pretrained(work / "llmc", save_compressed=True)
size = sum(p.stat().st_size for p in (work / "llmc").glob("*.safetensors"))
from safetensors.torch import save_file
(work / "llmc-dense").mkdir(exist_ok=True)
dense.pop("lm_head.weight", None)  # tied to the embedding
save_file(dense, str(work / "llmc-dense" / "model.safetensors"), metadata={"format": "pt"})
model.config.to_json_file(str(work / "llmc-dense" / "config.json"))
tok.save_pretrained(work / "llmc-dense")
print("LLMC_RESULT " + json.dumps(dict(ppl=math.exp(nll / count), wall_s=wall, cpu_s=cpu, peak_rss_bytes=rss, size_mb=size / 1e6)))
"""


def run_llmc(python: str, work: Path, group: int, timeout: int, hellaswag_limit: int) -> dict:
    """llm-compressor's GPTQModifier (W4A16 asym) in its own interpreter, same tokens."""
    from slmcompress.io.sources import builtin_model_dir

    script = work / "llmc_child.py"
    script.write_text(LLMC_CHILD)
    row = dict(
        method="gptq",
        bits=4,
        group_size=group,
        act_order="static",  # GPTQModifier's default actorder (static groups, act-ordered solve)
        hellaswag_acc_norm=None,
        tool="llm-compressor",
    )
    try:
        proc = subprocess.run(
            [python, str(script), str(builtin_model_dir("smollm2-135m")), str(work), str(group)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LLMC_RESULT ")]
    if not lines:
        return {**row, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    row.update(json.loads(lines[-1].removeprefix("LLMC_RESULT ")))
    if hellaswag_limit:
        row.update(
            spawn(
                ["--llmc-eval", str(work / "llmc-dense"), "--work", str(work)]
                + ["--hellaswag-limit", str(hellaswag_limit)]
            )
        )
    return row


def eval_llmc_dense(model_dir: Path, work: Path, limit: int) -> dict:
    """Child process: llm-compressor's fake-quantized weights, scored by our HellaSwag and ppl.

    The dense save holds the dequantized weights; its ``quantization_config`` (for
    compressed-tensors) is dropped so plain transformers loads the floats.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmcompress.eval.perplexity import perplexity

    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (model_dir / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = load_file(str(work / "tokens.safetensors"))
    return {
        "ppl_our_eval": perplexity(model, tokens["eval"], EVAL_SEQ, batch_size=4).ppl,
        "hellaswag_acc_norm": hellaswag(model, tokenizer, limit),
    }


def write_tokens(work: Path, n: int, t: int) -> None:
    """The shared calibration and evaluation tokens of every row."""

    from slmcompress.data import CalibrationSpec, EvalSpec, calibration_tokens, eval_tokens
    from slmcompress.io.load import load_model

    tok = load_model("smollm2-135m", dtype="float32", device="cpu").tokenizer
    calib = calibration_tokens(
        tok, CalibrationSpec(source="c4", n_samples=n, seq_len=t), n, t, seed=0
    )
    ev = eval_tokens(
        tok, EvalSpec(source="wikitext2", split="test", max_tokens=EVAL_TOKENS, seq_len=EVAL_SEQ)
    )
    save_file(
        {"calib": calib.contiguous(), "eval": ev.contiguous()}, str(work / "tokens.safetensors")
    )


def depth_scaling(layers: int) -> dict:
    """Child: GPTQ on a random Llama with ``layers`` layers: peak RSS, and its growth over the
    RSS before the pass (model + tokens resident), i.e. what the pass itself adds."""
    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmcompress.passes.gptq import GPTQConfig, GPTQPass

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, 1024, (32, 256))

    class Ctx:  # the two things the pass uses besides warn/metrics
        device, extra_metrics, warnings = torch.device("cpu"), {}, []

        def warn(self, message: str) -> None:
            self.warnings.append(message)

        def calibration_tokens(self, n=None, t=None):
            return tokens

    before = psutil.Process().memory_info().rss
    GPTQPass(GPTQConfig(type="quantize", bits=4, group_size=128)).run(model, Ctx())
    return {
        "layers": layers,
        "peak_rss_bytes": peak_rss_bytes(),
        "pass_rss_growth_bytes": peak_rss_bytes() - before,
    }


def child_main(args: argparse.Namespace) -> None:
    """Entry point of a row subprocess: prints one JSON line."""
    logging.basicConfig(level=logging.WARNING)
    if args.depth:
        print("ROW " + json.dumps(depth_scaling(args.depth)))
        return
    if args.llmc_eval:
        row = eval_llmc_dense(Path(args.llmc_eval), Path(args.work), args.hellaswag_limit)
        print("ROW " + json.dumps(row))
        return
    print("ROW " + json.dumps(run_row(json.loads(args.child), Path(args.work))))


def spawn(argv: list[str], timeout: int = 3600) -> dict:
    """Run this script as a child; return its ROW json (or an error row)."""
    proc = subprocess.run(
        [sys.executable, __file__, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1][4:])


def render_md(result: dict) -> str:
    """Markdown table of the rows (Δppl vs the fp32 row)."""
    rows = result["rows"]
    base = next((r["ppl"] for r in rows if r.get("method") == "fp32" and r.get("ppl")), None)
    lines = [
        f"# Quantization benchmark: SmolLM2-135M ({result['setup']})",
        "",
        "| row | tool | method | bits | group | act_order | options | ppl | Δppl | % of RTN Δppl "
        "| layer err / RTN's | HellaSwag acc_norm | size MB | wall s | CPU s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rtn = {
        (r["bits"], r["group_size"]): r["ppl"]
        for r in rows
        if r.get("method") == "rtn"
        and not (r.get("options") or {}).get("clip_search")
        and "ppl" in r
    }
    for r in rows:
        head = (
            f"| {r.get('id', '')} | {r.get('tool')} | {r.get('method')} | {r.get('bits')} "
            f"| {r.get('group_size')} | {r.get('act_order')} "
            f"| {', '.join(f'{k}={v}' for k, v in (r.get('options') or {}).items())} |"
        )
        if "ppl" not in r:
            lines.append(f"{head} error: {r.get('error')} | | | | | | | | |")
            continue
        delta = f"{r['ppl'] - base:+.2f}" if base else ""
        ref = rtn.get((r.get("bits"), r.get("group_size")))
        kept = (
            f"{100 * (r['ppl'] - base) / (ref - base):.0f}%"
            if base and ref and r.get("method") != "rtn" and ref != base
            else ""
        )
        layer = (r.get("layer_err_vs_rtn") or {}).get("median_ratio")
        layer = f"{100 * layer:.0f}%" if layer is not None else ""
        acc = f"{r['hellaswag_acc_norm']:.3f}" if r.get("hellaswag_acc_norm") is not None else "n/a"
        lines.append(
            f"{head} {r['ppl']:.2f} | {delta} | {kept} | {layer} | {acc} | {r['size_mb']:.1f} | {r['wall_s']:.1f} "
            f"| {r.get('cpu_s', 0):.1f} | {r['peak_rss_bytes'] / 1e9:.2f} |"
        )
    depth = result.get("depth_scaling")
    if depth:
        lines += ["", f"Depth scaling (random Llama, GPTQ 4-bit, 32x256 tokens): {depth}"]
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def add_row(result: dict, row: dict) -> None:
    """Append ``row``, replacing an earlier row with the same id."""
    result["rows"] = [r for r in result["rows"] if r.get("id") != row["id"]] + [row]


def results_path(tag: str | None, suffix: str) -> Path:
    """``quantize.json`` or, for a side study, ``quantize-<tag>.json`` (same for .md)."""
    return RESULTS / (f"quantize-{tag}{suffix}" if tag else f"quantize{suffix}")


def save(result: dict, tag: str | None = None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_path(tag, ".json").write_text(json.dumps(result, indent=2) + "\n")
    results_path(tag, ".md").write_text(render_md(result))


def _ratio(big: dict, small: dict, key: str) -> float:
    return big[key] / small[key] if big.get(key) and small.get(key) else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calib", default="128x512", help="calibration n_samples x seq_len")
    parser.add_argument("--only", nargs="*", help="row ids to run")
    parser.add_argument("--hellaswag-limit", type=int, default=100)
    parser.add_argument(
        "--hellaswag-rows", nargs="*", help="row ids that get HellaSwag (default: all rows)"
    )
    parser.add_argument(
        "--append", action="store_true", help="keep the rows already in quantize.json (same setup)"
    )
    parser.add_argument(
        "--work-dir", help="reuse this directory's tokens.safetensors (default: a new one)"
    )
    parser.add_argument("--llmc-python", help="interpreter with llmcompressor installed")
    parser.add_argument(
        "--llmc-group", type=int, default=64, help="llm-compressor refuses 128 on hidden 576"
    )
    parser.add_argument("--depth-layers", type=int, default=4)
    parser.add_argument("--tag", help="write quantize-TAG.{json,md} (a side study) instead")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--llmc-eval", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.depth or args.llmc_eval:
        child_main(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    n, t = (int(v) for v in args.calib.split("x"))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tokens.safetensors").exists():
        write_tokens(work, n, t)
    setup = (
        f"C4 calibration {n}x{t} seed 0; WikiText-2 test first {EVAL_TOKENS} tokens, "
        f"{EVAL_SEQ}-token windows; HellaSwag first {args.hellaswag_limit} val items; "
        f"2-core CPU, float32"
    )
    previous = (
        json.loads(results_path(args.tag, ".json").read_text())
        if results_path(args.tag, ".json").exists()
        else {}
    )
    result = {"setup": setup, "rows": []}
    if args.append:
        if previous.get("setup") != setup:
            parser.error(f"--append: quantize.json has another setup: {previous.get('setup')}")
        result = previous
    for key in ("depth_scaling", "notes"):  # kept unless re-measured / rewritten
        if key in previous:
            result.setdefault(key, previous[key])
    for row_id, method, bits, group, act, *extra in ROWS:
        if args.only and row_id not in args.only:
            continue
        if row_id == "llmc":
            if args.llmc_python:
                log.info("row llm-compressor")
                add_row(
                    result,
                    {
                        "id": row_id,
                        **run_llmc(
                            args.llmc_python, work, args.llmc_group, 3600, args.hellaswag_limit
                        ),
                    },
                )
                save(result, args.tag)
            continue
        hellaswag = args.hellaswag_rows is None or row_id in args.hellaswag_rows
        spec = dict(
            id=row_id,
            method=method,
            bits=bits,
            group_size=group,
            act_order=act,
            options=extra[0] if extra else {},
            hellaswag_limit=args.hellaswag_limit if hellaswag else 0,
        )
        log.info("row %s", row_id)
        row = spawn(["--child", json.dumps(spec), "--work", str(work)])
        row.setdefault("method", method)
        row.setdefault("tool", "slmcompress")
        log.info(
            "row %s: %s",
            row_id,
            {k: row.get(k) for k in ("ppl", "wall_s", "peak_rss_bytes", "error")},
        )
        add_row(result, {"id": row_id, **row})
        save(result, args.tag)
    if args.depth_layers:
        small, big = (
            spawn(["--depth", str(L)]) for L in (args.depth_layers, 2 * args.depth_layers)
        )
        result["depth_scaling"] = {
            "runs": [small, big],
            "peak_rss_ratio": _ratio(big, small, "peak_rss_bytes"),
            "pass_rss_growth_ratio": _ratio(big, small, "pass_rss_growth_bytes"),
        }
        save(result, args.tag)
    log.info("wrote %s", results_path(args.tag, ".json"))


if __name__ == "__main__":
    main()
