"""The measured sections of ``benchmarks/gpu_check.py`` (c, d, e), one process each.

``python benchmarks/gpu_check_sections.py {decode|gptq|kd} RESULT_JSON WORK_DIR [--dry-run]``
writes one JSON object to RESULT_JSON. Weights are random with real models' shapes; text
and tokenizer come from the repo (``tests/repo_tokenizer.py``), so a machine without a
model hub or cache runs it. ``--dry-run`` runs the same code on the CPU with tiny shapes
(the GPTQ layers through the Triton interpreter), which is how CI tests this file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # random_models, repo_tokenizer
sys.path.insert(0, str(REPO))

from random_models import write_random_checkpoint  # noqa: E402
from repo_tokenizer import repo_tokenizer  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from slmcompress.memory_model import PUBLISHED_CONFIGS  # noqa: E402

VOCAB_TOKENIZER = 1024  # the repo tokenizer; models keep their real vocabulary
#: real models' shapes (random weights): SmolLM2-135M and a Llama-3.2-1B-class model
SHAPES = {
    "smollm2-135m": {**PUBLISHED_CONFIGS["smollm2-135m"], "head_dim": 64},
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
}
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB_TOKENIZER,
    tie_word_embeddings=True,
    max_position_embeddings=512,
)
DRY_SHAPES = {"tiny-a": TINY, "tiny-b": {**TINY, "hidden_size": 128, "intermediate_size": 256}}
PROMPT = "The history of the city"
DECODE_GROUP = 128


def device_of(dry: bool) -> torch.device:
    return torch.device("cpu" if dry else "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak bytes torch allocated on the device since :func:`peak_reset` (GB); None on CPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)


# ------------------------------------------------------------------ checkpoints
def float_checkpoint(work: Path, name: str, shape: dict, dtype: torch.dtype) -> Path:
    """A random checkpoint of ``shape`` with the repo tokenizer (written once, reused)."""
    directory = work / f"{name}-{str(dtype).removeprefix('torch.')}"
    done = directory / ".complete"
    if not done.is_file():
        write_random_checkpoint(LlamaConfig(**shape), directory, dtype=dtype)
        repo_tokenizer(VOCAB_TOKENIZER).save_pretrained(directory)
        done.touch()
    return directory


def gptq_checkpoint(
    work: Path, source: Path, device: torch.device, group: int, bits: int = 4
) -> Path:
    """A GPTQ v1 checkpoint of ``source`` (codes by RTN on the device: the serving path
    depends only on the format, not on how the codes were chosen)."""
    from slmcompress.io.checkpoint import write_checkpoint_into
    from slmcompress.io.load import load_model
    from slmcompress.quant.gptq_format import QuantizedWeight
    from slmcompress.quant.install import (
        gptq_quantization_config,
        install_quant_linear,
        quantizable_linears,
    )
    from slmcompress.quant.qparams import rtn_quantize_weight

    directory = work / f"{source.name}-gptq{bits}-g{group}"
    done = directory / ".complete"
    if done.is_file():
        return directory
    loaded = load_model(
        str(source), dtype="float32" if device.type == "cpu" else "bfloat16", device=str(device)
    )
    model = loaded.model
    targets, _ = quantizable_linears(model, ["lm_head"], bits)
    with torch.no_grad():
        for name, linear in targets.items():
            codes, scales, zeros, g_idx = rtn_quantize_weight(
                linear.weight.detach(), bits, group, sym=False
            )
            install_quant_linear(
                model, name, QuantizedWeight(codes, scales, zeros, g_idx, bits, group)
            )
    model.config.quantization_config = gptq_quantization_config(
        bits, group, False, desc_act=False, method="rtn"
    )
    directory.mkdir(parents=True, exist_ok=True)
    write_checkpoint_into(model.to("cpu"), loaded.tokenizer, directory, {"stage": "gpu-check"})
    del model, loaded
    done.touch()
    return directory


# ------------------------------------------------------------------ (c) decode
def serving_path(model: torch.nn.Module, batch: int, prompt_tokens: int) -> str:
    """The kernel route behind a number: backends per layer and, for Triton, the route by M."""
    from slmcompress.quant.quant_linear import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    attention = getattr(model.config, "_attn_implementation", "?")
    if not layers:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return f"torch {dtype} matmul (cuBLAS on CUDA); attention {attention}"
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.backend] = counts.get(layer.backend, 0) + 1
    path = ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))
    if any(name.startswith("triton") for name in counts):
        from slmcompress.kernels import int4_matmul as km

        def route(m: int) -> str:
            dense = getattr(km, "DENSE_MIN_M", None)
            if dense is not None and m > dense:
                return f"M={m}: dequantize + cuBLAS"
            bucket = km.m_bucket(m) if hasattr(km, "m_bucket") else "?"
            return f"M={m}: fused kernel ({bucket})"

        path += f"; decode {route(batch)}; prefill {route(batch * prompt_tokens)}"
    return f"{path}; attention {attention}"


def measure_decode(directory: Path, label: str, device: torch.device, dry: bool) -> list[dict]:
    """Load -> first token (cold), then warm greedy decode tokens/s at batch 1 and 8."""
    from slmcompress.eval.speed import generation_speed
    from slmcompress.io.load import load_model

    dtype = "float32" if dry else "bfloat16"
    sync(device)
    start = time.perf_counter()
    loaded = load_model(str(directory), dtype=dtype, device=str(device))
    sync(device)
    load_s = time.perf_counter() - start
    model, tokenizer = loaded.model, loaded.tokenizer
    # dry: the interpreter runs every Triton program in Python; exercise the code, time nothing
    new_tokens, warmup = (2, 0) if dry else (64, 1)
    with torch.no_grad():
        cold = generation_speed(model, tokenizer, 2, PROMPT, batch_size=1, warmup=0)
        rows = []
        for batch in (1, 2) if dry else (1, 8):
            warm = generation_speed(
                model, tokenizer, new_tokens, PROMPT, batch_size=batch, warmup=warmup
            )
            rows.append(
                {
                    "model": label,
                    "batch": batch,
                    "tokens_per_s": round(warm["tokens_per_s"], 1),
                    "prefill_s": round(warm["prefill_s"], 4),
                    "new_tokens": warm["new_tokens"],
                    "load_s": round(load_s, 2),
                    "first_token_cold_s": round(cold["prefill_s"], 2),
                    "load_to_first_token_s": round(load_s + cold["prefill_s"], 2),
                    "serving_path": serving_path(model, batch, warm["prompt_tokens"]),
                }
            )
    del model, loaded
    return rows


def decode(work: Path, dry: bool) -> dict[str, Any]:
    """(c) bf16 vs GPTQ-4 at batch 1 and 8, per model shape.

    Both float models first, then both GPTQ ones: if the Triton kernel's first-call
    compilation eats the budget, the float numbers are in already. One group size (128)
    for both shapes, so the second shape reuses the first one's compiled kernels (SmolLM2's
    576 inputs end in a ragged 64-wide group, which the kernel serves as any other).
    """
    device = device_of(dry)
    shapes = DRY_SHAPES if dry else SHAPES
    sources = {
        name: float_checkpoint(work, name, shape, torch.float32 if dry else torch.bfloat16)
        for name, shape in shapes.items()
    }
    rows: list[dict] = []
    for quantized in (False, True):
        for name, source in sources.items():
            directory = gptq_checkpoint(work, source, device, DECODE_GROUP) if quantized else source
            label = f"gptq-4 g{DECODE_GROUP}" if quantized else ("fp32" if dry else "bf16")
            rows += [
                {"shape": name, **row} for row in measure_decode(directory, label, device, dry)
            ]
            write_partial(rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows}


# ------------------------------------------------------------------ (d) GPTQ
def gptq_recipe(model_dir: Path, dry: bool, work: Path) -> dict[str, Any]:
    n_samples, seq_len = (4, 64) if dry else (128, 512)
    return {
        "name": "gpu-check-gptq",
        "model": str(model_dir),
        "output_dir": str(work / "gptq-run"),
        "device": "cpu" if dry else "cuda",
        "dtype": "float32" if dry else "bfloat16",
        "data": {
            "calibration": {"source": "c4", "n_samples": n_samples, "seq_len": seq_len},
            "eval": {"max_tokens": 1024, "seq_len": 256},
        },
        "eval": {"tasks": [], "speed": False},
        "stages": [
            {"type": "quantize", "name": "w4", "method": "gptq", "bits": 4, "group_size": "auto"}
        ],
    }


def plan_row(recipe: dict[str, Any], stage: str, dry: bool) -> dict[str, Any]:
    """``plan``'s prediction for one stage of ``recipe`` (this GPU's memory; CPU when dry)."""
    from slmcompress.plan import plan_recipe
    from slmcompress.recipe import parse_recipe

    resolved = parse_recipe(recipe, check_sources=False)
    memory = None if dry else torch.cuda.get_device_properties(0).total_memory
    rows = plan_recipe(resolved, device_memory=memory)
    row = next(r for r in rows if r.stage == stage)
    return {
        "device_peak_gb": round(row.device_peak / 1e9, 3),
        "host_peak_gb": round(row.host_peak / 1e9, 3),
        "time_s": float(f"{row.time_s:.3g}"),
        "streaming": row.streaming,
        "notes": row.notes,
    }


def context(recipe: dict[str, Any], tokenizer: Any, work: Path, device: torch.device) -> Any:
    """A pass Context as the runner builds it (no stage directory is written)."""
    from slmcompress.data import DataConfig
    from slmcompress.io.sources import resolve_dtype
    from slmcompress.passes.base import Context

    (work / "ctx-work").mkdir(parents=True, exist_ok=True)
    return Context(
        tokenizer=tokenizer,
        data=DataConfig(**recipe["data"]),
        device=device,
        dtype=resolve_dtype(recipe["dtype"], device),
        original_model=recipe["model"],
        teacher=None,
        stage_dir=work / "ctx-stage",
        work_dir=work / "ctx-work",
    )


def run_stage(recipe: dict[str, Any], work: Path, dry: bool) -> tuple[Any, float]:
    """The recipe's one stage on its model, as the runner would run it in memory:
    ``(ctx, wall seconds)``; the device's peak memory counts from the pass's start."""
    from slmcompress.io.load import load_model
    from slmcompress.recipe import parse_recipe

    device = device_of(dry)
    stage = parse_recipe(recipe).stages[0]
    loaded = load_model(recipe["model"], dtype=recipe["dtype"], device=str(device))
    ctx = context(recipe, loaded.tokenizer, work, device)
    calib = recipe["data"]["calibration"]
    ctx.calibration_tokens(calib["n_samples"], calib["seq_len"])  # tokenized off the clock
    peak_reset(device)
    sync(device)
    start = time.perf_counter()
    stage.pass_cls(stage.config).run(loaded.model, ctx)
    sync(device)
    return ctx, time.perf_counter() - start


def gptq(work: Path, dry: bool) -> dict[str, Any]:
    """(d) GPTQ-4 of a 1B-class random Llama in memory on the device: wall and peak memory."""
    device = device_of(dry)
    name, shape = ("tiny-b", DRY_SHAPES["tiny-b"]) if dry else ("llama-1b", SHAPES["llama-1b"])
    source = float_checkpoint(work, name, shape, torch.float32 if dry else torch.bfloat16)
    recipe = gptq_recipe(source, dry, work)
    ctx, wall = run_stage(recipe, work, dry)
    calib = recipe["data"]["calibration"]
    return {
        "shape": name,
        "calibration": f"{calib['n_samples']} x {calib['seq_len']} tokens (c4)",
        "group_size": ctx.extra_metrics["group_size"]["resolved"],
        "quantized_linears": ctx.extra_metrics["quantized_linears"],
        "wall_s": round(wall, 2),
        "peak_device_gb": peak_gb(device),
        "model_on_device": "the whole model (the runner loads it there); one layer computes at a time",
        "plan": plan_row(recipe, "w4", dry),
    }


# ------------------------------------------------------------------ (e) KD
def kd_recipe(model_dir: Path, dry: bool, work: Path) -> dict[str, Any]:
    steps, micro, seq = (2, 2, 64) if dry else (30, 8, 512)
    return {
        "name": "gpu-check-kd",
        "model": str(model_dir),
        "output_dir": str(work / "kd-run"),
        "device": "cpu" if dry else "cuda",
        "dtype": "float32" if dry else "bfloat16",
        "data": {
            "calibration": {"source": "c4", "n_samples": 8, "seq_len": seq},
            "eval": {"max_tokens": 1024, "seq_len": 256},
        },
        "eval": {"tasks": [], "speed": False},
        "stages": [
            {
                "type": "distill",
                "name": "kd",
                "max_steps": steps,
                "seq_len": seq,
                "micro_batch_size": micro,
                "lr": 1e-4,
                "eval_every": 0,
                "save_every": 0,
                "eval_tokens": 512,
                "autocast": "auto",
            }
        ],
    }


def kd(work: Path, dry: bool) -> dict[str, Any]:
    """(e) Forward-KL KD of a SmolLM2-shaped student from a same-shaped teacher (bf16 autocast)."""
    device = device_of(dry)
    name, shape = (
        ("tiny-a", DRY_SHAPES["tiny-a"]) if dry else ("smollm2-135m", SHAPES["smollm2-135m"])
    )
    source = float_checkpoint(work, name, shape, torch.float32 if dry else torch.bfloat16)
    recipe = kd_recipe(source, dry, work)
    ctx, wall = run_stage(recipe, work, dry)
    summary = ctx.extra_metrics["distill"]
    return {
        "shape": name,
        "teacher": "the same checkpoint (random weights), loaded by the pass",
        "tokens": summary["train_tokens"],
        "train_tokens_per_s": summary["train_tokens_per_s"],
        "train_seconds": summary["train_seconds_this_run"],
        "autocast": summary["autocast"],
        "pass_wall_s": round(wall, 2),
        "peak_device_gb": peak_gb(device),
        "plan": plan_row(recipe, "kd", dry),
    }


# ------------------------------------------------------------------ entry point
SECTIONS = {"decode": decode, "gptq": gptq, "kd": kd}
_PARTIAL: Path | None = None


def write_partial(rows: list[dict]) -> None:
    """Rows so far, so a section stopped at its time budget still reports them."""
    if _PARTIAL is not None:
        _PARTIAL.write_text(json.dumps({"rows": rows, "partial": True}, indent=1))


def main(argv: list[str]) -> int:
    global _PARTIAL
    name, result, work = argv[0], Path(argv[1]), Path(argv[2])
    dry = "--dry-run" in argv
    _PARTIAL = result
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load would bury the log
    torch.manual_seed(0)
    work.mkdir(parents=True, exist_ok=True)
    out = SECTIONS[name](work, dry)
    result.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
