"""Scale benchmark: stream GPTQ and importance scoring over a model larger than the memory cap.

1. Write a random Llama (bf16) whose weights exceed the cap, shard by shard.
2. For each pass, a child process caps its own address space with RLIMIT_AS (set before
   anything is imported, so the cap covers the whole process) and runs ``slmcompress run``
   on a one-stage recipe whose ``max_memory`` is below the model size: the runner hands the
   stage a weightless skeleton, the stage streams the model layer by layer and its sharded
   output is moved into the stage directory. The child reports its peak RSS (``VmHWM`` of /proc/self/status; not ``ru_maxrss``, which
   survives exec and so includes the parent's RSS at fork time). A cgroup is not
   available here; RLIMIT_AS is stricter than an RSS cap (it also counts untouched
   reservations), so "finishes under the cap" is a conservative claim.
3. The GPTQ output is validated (every shard, every layer's packed tensors) and layer 0 is
   dequantized and compared with the original weights; the pruned output is checked for
   the target MLP width in every layer.
4. ``slmcompress.plan`` predicts the peak from the config alone; we report both.
5. A small model runs GPTQ both in memory and streamed: the checkpoints must be bit-identical.

Usage: ``python benchmarks/scale.py [--layers 160] [--cap 3GiB]`` (minutes to an hour on 2 CPU cores);
``--repredict`` recomputes only the predictions of an existing scale.json with the current plan.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

#: a child that caps its own address space, then runs the slmcompress CLI with its argv
CHILD = r"""
import json, resource, sys
cap = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # before torch is imported: covers everything
status_file = sys.argv[2]

def report_peak():
    # VmHWM belongs to this address space (reset by exec); ru_maxrss would include the
    # parent's RSS at fork time, because rusage survives execve
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    with open(status_file, "w") as f:
        json.dump({"peak_rss_bytes": peak}, f)

import atexit
atexit.register(report_peak)
from slmcompress.cli import main
sys.argv = ["slmcompress", *sys.argv[3:]]
main()
"""


def recipe_for(which: str, model_dir: Path, args: argparse.Namespace) -> dict:
    """The recipe each capped child runs through the CLI: one streamed stage, no eval."""
    stage = {
        "gptq": {"type": "quantize", "method": "gptq", "bits": 4, "group_size": 128},
        # Minitron importance (streamed) + tensor-by-tensor slicing to a smaller MLP
        "importance": {
            "type": "prune",
            "method": "activation",
            "target": {"ffn_hidden_size": args.intermediate * 3 // 4},
            "depth_metric": "cosine",
        },
    }[which]
    return {
        "name": f"scale-{which}",
        "model": str(model_dir),
        "dtype": "bfloat16",
        "device": "cpu",
        "max_memory": args.max_memory,
        "data": {
            "calibration": {"source": "c4", "n_samples": args.samples, "seq_len": args.seq_len}
        },
        "stages": [{**stage, "batch_size": 1}],
        "eval": {"tasks": [], "speed": False},
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=160)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument(
        "--vocab", type=int, default=49152, help="SmolLM2's tokenizer is saved with it"
    )
    parser.add_argument("--cap", default="3GiB", help="RLIMIT_AS of each child process")
    parser.add_argument("--max-memory", default="2GiB", help="the streaming engine's memory budget")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--repredict", action="store_true")
    parser.add_argument("--passes", default="importance,gptq")
    parser.add_argument(
        "--reuse", type=Path, default=None, help="work dir of an earlier run (model + resume state)"
    )
    return parser.parse_args()


def model_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(args.hidden // 256, 1),
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def predict(config: dict, pass_name: str, args: argparse.Namespace) -> int:
    from slmcompress.memory_model import PROFILES, ModelDims, estimate_calibration_pass, parse_bytes

    estimate = estimate_calibration_pass(
        ModelDims.from_config(config),
        pass_name,
        args.samples,
        args.seq_len,
        1,
        2,
        PROFILES["cpu-2core"],
        host_budget=parse_bytes(args.max_memory),
        streaming=True,
    )
    return estimate.host_peak


def run_child(model_dir: Path, work: Path, which: str, cap: int, args: argparse.Namespace) -> dict:
    """``slmcompress run`` on a one-stage recipe in a child capped with RLIMIT_AS."""
    import yaml

    recipe = work / f"{which}.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(which, model_dir, args)))
    status = work / f"{which}.status.json"
    status.unlink(missing_ok=True)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "2"}
    out_dir = work / f"run-{which}"
    argv = [
        sys.executable,
        "-c",
        CHILD,
        str(cap),
        str(status),
        "run",
        str(recipe),
        "--output-dir",
        str(out_dir),
    ]
    start = time.perf_counter()
    child = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    peak = json.loads(status.read_text())["peak_rss_bytes"] if status.is_file() else 0
    if child.returncode != 0:
        print(child.stdout[-2000:], child.stderr[-4000:], file=sys.stderr)
        return {"ok": False, "wall_s": wall, "peak_rss_bytes": peak}
    stage_dir = next(out_dir.glob("01-*"))
    report = json.loads((stage_dir / "report.json").read_text())
    return {
        "ok": True,
        "wall_s": wall,
        "peak_rss_bytes": peak,
        "stage_dir": stage_dir,
        "pass_s": report["timings"].get("pass_s"),
        "report": report,
    }


def check_gptq_output(out: Path, model_dir: Path, layers: int) -> bool:
    """Every shard valid, every layer quantized, layer 0's q_proj dequantizes close to the source."""
    import torch

    from slmcompress.io.checkpoint import validate_checkpoint
    from slmcompress.quant.quant_linear import QuantLinear
    from slmcompress.streaming.loader import WeightSource

    config = validate_checkpoint(out)
    source, result = WeightSource(model_dir), WeightSource(out)
    qkeys = [k for k in result.entries if k.endswith(".qweight")]
    if config["quantization_config"]["bits"] != 4 or len(qkeys) != 7 * layers:
        return False
    prefix = "model.layers.0.self_attn.q_proj"
    w = source.get(f"{prefix}.weight", torch.float32)
    q = QuantLinear(w.shape[1], w.shape[0], 4, 128)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        getattr(q, name).copy_(result.get(f"{prefix}.{name}"))
    rel = ((q.dequantize() - w).norm() / w.norm()).item()
    print(f"layer 0 q_proj relative weight error after 4-bit GPTQ: {rel:.3f}")
    return rel < 0.2


def check_pruned_output(out: Path, args: argparse.Namespace) -> bool:
    """The pruned checkpoint has the target MLP width in every layer and a consistent index."""
    from slmcompress.io.checkpoint import validate_checkpoint
    from slmcompress.streaming.loader import WeightSource

    config = validate_checkpoint(out)
    source = WeightSource(out)
    width = args.intermediate * 3 // 4
    downs = [k for k in source.entries if k.endswith("mlp.down_proj.weight")]
    shapes_ok = all(tuple(source.entries[k].shape) == (args.hidden, width) for k in downs)
    return config["intermediate_size"] == width and len(downs) == args.layers and shapes_ok


def bit_exact_small(work: Path) -> bool:
    """GPTQ in memory vs streamed on a small model: identical checkpoints."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmcompress.io.checkpoint import load_gptq_checkpoint, read_checkpoint
    from slmcompress.passes.gptq import GPTQConfig, GPTQPass
    from slmcompress.streaming.budget import StreamOptions
    from slmcompress.streaming.engine import StreamingRun

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    LlamaForCausalLM(config).save_pretrained(work / "small")
    for stale in ("w1", "w2", "small-q"):  # --reuse: never resume from an older run's layers
        shutil.rmtree(work / stale, ignore_errors=True)
    tokens = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))

    class Ctx:
        dtype, device, extra_metrics = torch.float32, torch.device("cpu"), {}

        def __init__(self, work_dir: Path) -> None:
            self.work_dir = work_dir

        def warn(self, message: str) -> None:
            pass

        def calibration_tokens(self, *_args) -> torch.Tensor:
            return tokens

    cfg = GPTQConfig(
        type="quantize", method="gptq", bits=4, group_size=128, act_order=True, batch_size=2
    )
    reference = LlamaForCausalLM.from_pretrained(work / "small").eval()
    reference = GPTQPass(cfg).run(reference, Ctx(work / "w1")).state_dict()
    options = StreamOptions(activation_offload="disk", max_memory="4GB", batch_size=2)
    run = StreamingRun(work / "small", tokens, torch.device("cpu"), work / "w2", options)
    out = GPTQPass(cfg).quantize(run, Ctx(work / "w2")).path
    got = load_gptq_checkpoint(read_checkpoint(out), torch.float32).state_dict()
    return set(got) == set(reference) and all(torch.equal(got[k], reference[k]) for k in reference)


def render_md(data: dict) -> str:
    from slmcompress.memory_model import format_bytes

    lines = [
        "# Scale benchmark: streaming calibration under a memory cap",
        "",
        f"Random Llama, {data['model']['layers']} layers, hidden {data['model']['hidden']}, "
        f"bf16 weights {format_bytes(data['rows'][0]['weights_bytes'])}. Each row is `slmcompress run` on a "
        f"one-stage recipe (recipe `max_memory: {data['max_memory']}`, so the runner never loads the model: the "
        f"stage streams it layer by layer and its sharded output is moved into place) in a child process whose "
        f"address space is capped with RLIMIT_AS at {format_bytes(data['rows'][0]['cap_bytes'])}; "
        f"{data['calibration']} C4 calibration tokens; 2-core CPU. `gptq` = GPTQ 4-bit g128 of every layer; "
        f"`importance` = prune stage: Minitron activation importance + tensor-by-tensor export of a model with "
        f"the MLP cut to 75%. Wall time includes process start and imports.",
        "",
        "| pass | weights | cap | peak RSS | predicted peak | error | wall s | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        err = (row["predicted_peak_bytes"] - row["peak_rss_bytes"]) / max(row["peak_rss_bytes"], 1)
        lines.append(
            f"| {row['pass']} | {format_bytes(row['weights_bytes'])} | {format_bytes(row['cap_bytes'])} | "
            f"{format_bytes(row['peak_rss_bytes'])} | {format_bytes(row['predicted_peak_bytes'])} | "
            f"{err:+.0%} | {row['wall_s']:.0f} | {row['ok']} |"
        )
    lines += [
        "",
        f"Small model, GPTQ in memory vs streamed (disk-spilled activations): bit-identical = "
        f"{data.get('bit_exact_small')}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.repredict:
        data = json.loads((RESULTS / "scale.json").read_text())
        for row in data["rows"]:
            row["predicted_peak_bytes"] = predict(data["config"], row["pass"], args)
        _write(data)
        return
    work = args.reuse or Path(tempfile.mkdtemp(prefix="slm-scale-", dir=args.work))
    try:
        _write(measure(args, work))
    finally:
        if not args.reuse:
            shutil.rmtree(work, ignore_errors=True)  # be kind to the shared disk


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Write (or reuse) the random model, run each pass capped, collect rows."""
    import torch
    from transformers import AutoTokenizer

    from slmcompress.io.sources import builtin_model_dir
    from slmcompress.memory_model import parse_bytes
    from slmcompress.streaming.loader import WeightSource

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from random_models import write_random_checkpoint

    config = model_config(args)
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        start = time.perf_counter()
        write_random_checkpoint(config, model_dir, dtype=torch.bfloat16, max_shard_bytes=2 * 10**9)
        tokenizer_source = builtin_model_dir("smollm2-135m")  # recipes calibrate on real text
        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(model_dir)
        print(f"wrote the random model in {time.perf_counter() - start:.0f} s", flush=True)
    weights = WeightSource(model_dir).nbytes()
    cap = parse_bytes(args.cap)
    rows = []
    for which in args.passes.split(","):
        result = run_child(model_dir, work, which, cap, args)
        ok = result["ok"]
        if ok and which == "gptq":
            ok = check_gptq_output(result["stage_dir"], model_dir, args.layers)
        if ok and which == "importance":
            ok = check_pruned_output(result["stage_dir"], args)
        row = {
            "pass": which,
            "weights_bytes": weights,
            "cap_bytes": cap,
            "peak_rss_bytes": result["peak_rss_bytes"],
            "predicted_peak_bytes": predict(config.to_dict(), which, args),
            "wall_s": round(result["wall_s"], 1),
            "ok": bool(ok),
        }
        if result.get("pass_s") is not None:
            row["pass_s"] = round(result["pass_s"], 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(work / f"run-{which}", ignore_errors=True)
    return {
        "rows": rows,
        "config": config.to_dict(),
        "max_memory": args.max_memory,
        "calibration": f"{args.samples}x{args.seq_len}",
        "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate},
        "bit_exact_small": bit_exact_small(work),
    }


def _write(data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (RESULTS / "scale.md").write_text(render_md(data))
    print(render_md(data))


if __name__ == "__main__":
    main()
