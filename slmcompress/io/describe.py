"""Describe a checkpoint without loading its weights into a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open

from slmcompress.errors import CheckpointError
from slmcompress.fsutil import read_json_file
from slmcompress.io.checkpoint import bytes_on_disk, safetensors_files, validate_checkpoint
from slmcompress.io.files import read_metadata
from slmcompress.kernels.dispatch import backend_for_layer
from slmcompress.quant.qparams import default_g_idx


def inspect_checkpoint(directory: Path) -> dict[str, Any]:
    """Architecture, parameter count, size, quantization, per-layer backend and report summary."""
    directory = Path(directory)
    config = validate_checkpoint(directory)
    qcfg = config.get("quantization_config") or {}
    params, layers = _scan_tensors(directory, qcfg)
    summary: dict[str, Any] = {
        "model_type": config.get("model_type"),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "intermediate_size": config.get("intermediate_size"),
        "heads": f"{config.get('num_attention_heads')} (kv {config.get('num_key_value_heads')})",
        "vocab_size": config.get("vocab_size"),
        "params": params,
        "bytes_on_disk": bytes_on_disk(directory),
        "quantization": _describe_quant(qcfg),
    }
    meta = read_metadata(directory)
    if meta:
        summary["stage"] = meta.get("stage")
        summary["parent"] = meta.get("parent")
    summary.update(_report_metrics(directory / "report.json"))
    return {"summary": summary, "layers": layers, "config": config}


def _report_metrics(path: Path) -> dict[str, float]:
    """The headline metrics of a stage's ``report.json``; a broken one is one line naming it."""
    if not path.exists():
        return {}
    report = read_json_file(path, "checkpoint", CheckpointError)
    metrics = report.get("metrics", {}) if isinstance(report, dict) else None
    if not isinstance(metrics, dict):
        raise CheckpointError(f"checkpoint: {path} is not a stage report (no metrics object)")
    found = {}
    for key in ("wikitext2_ppl", "hellaswag_acc_norm", "tokens_per_s"):
        value = metrics.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CheckpointError(f"checkpoint: {path}: metrics.{key} is not a number")
        found[key] = round(value, 4)
    return found


def _describe_quant(qcfg: dict[str, Any]) -> str:
    if not qcfg:
        return "none (float)"
    method = (qcfg.get("meta") or {}).get("method", qcfg.get("quant_method"))
    group = qcfg.get("group_size")
    return (
        f"{method} {qcfg.get('bits')}-bit, group {group}, sym={qcfg.get('sym')}, "
        f"act_order={qcfg.get('desc_act')} ({qcfg.get('checkpoint_format', 'gptq')} format)"
    )


def _scan_tensors(directory: Path, qcfg: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """Logical parameter count (packed weights counted as in*out) and the quantized layers."""

    bits = qcfg.get("bits")
    params, layers = 0, []
    for path in safetensors_files(directory):
        with safe_open(path, framework="pt") as handle:
            keys = set(handle.keys())
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                if key.endswith(".qweight"):
                    params += shape[0] * 32 // bits * shape[1]
                    name = key[: -len(".qweight")]
                    g_idx = (  # (in,): small, decides the kernel; in another shard: assume no act-order
                        handle.get_tensor(f"{name}.g_idx")
                        if f"{name}.g_idx" in keys
                        else default_g_idx(shape[0] * 32 // bits, qcfg.get("group_size") or -1)
                    )
                    layers.append(
                        {
                            "name": name,
                            "bits": bits,
                            "group_size": qcfg.get("group_size"),
                            "backend": backend_for_layer(bits, shape[1], g_idx),
                        }
                    )
                elif not key.endswith((".qzeros", ".scales", ".g_idx")):
                    count = 1
                    for dim in shape:
                        count *= dim
                    params += count
    return params, layers
