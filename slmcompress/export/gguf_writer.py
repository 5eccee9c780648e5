"""Write a model (float, pruned, distilled or GPTQ) as a GGUF file that llama.cpp loads.

Float weights are round-to-nearest quantized with llama.cpp's block rules; GPTQ layers with
contiguous 32-wide groups keep their calibrated codes (see :mod:`gguf_blocks`). The file is
written under a temp name and renamed when complete (:func:`slmcompress.fsutil.atomic_file`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmcompress.errors import PassError
from slmcompress.export.gguf_arch import (
    ArchSpec,
    arch_name,
    arch_spec,
    permute_rows,
    qk_permutation,
    tensor_name,
    write_hparams,
)
from slmcompress.export.gguf_blocks import (
    FLOAT_TYPES,
    GGUF_TYPES,
    GPTQ_TRANSFER_TYPES,
    GptqTensor,
    can_block_quantize,
    dequantize_payload,
    gguf_type,
    gptq_dequantize,
    gptq_to_blocks,
    quantize_float,
)
from slmcompress.export.gguf_tokenizer import write_tokenizer
from slmcompress.fsutil import atomic_file, io_problem, is_disk_full
from slmcompress.quant.quant_linear import QuantLinear

log = logging.getLogger(__name__)

EMBEDDING_NAMES = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class GgufOptions:
    """What to write. ``outtype`` ``auto``: f16 for float models, the GPTQ codes' own type otherwise."""

    outtype: str = "auto"
    embedding_type: str | None = None  # token_embd/output; default q8_0 for quantized outtypes
    pre_tokenizer: str | None = None  # tokenizer.ggml.pre override
    requantize: bool = False  # GPTQ layers that cannot transfer: RTN from their float weight
    verify: bool = True  # check every GPTQ transfer against the checkpoint's dequantized weight
    force: bool = False  # replace an existing file
    name: str | None = None  # general.name
    where: str = "out"  # what a write failure names: the CLI option, or the recipe stage


@dataclass
class GgufExport:
    """What was written: path, size, tensor types, and how exact the GPTQ transfer was."""

    path: Path
    outtype: str
    embedding_type: str
    pre_tokenizer: str
    bytes: int = 0
    tensor_types: dict[str, int] = field(default_factory=dict)
    gptq_transferred: int = 0
    transfer_max_abs_err: float | None = None
    warnings: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """Flat numbers for a stage report."""
        return {
            "gguf_bytes": self.bytes,
            "gguf_outtype": self.outtype,
            "gguf_tensor_types": dict(self.tensor_types),
            "gguf_gptq_transferred": self.gptq_transferred,
            "gguf_transfer_max_abs_err": self.transfer_max_abs_err,
        }


def export_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    options: GgufOptions | None = None,
) -> GgufExport:
    """Write ``model`` to ``out`` (a ``.gguf`` file); raises PassError for unsupported input."""
    options = options or GgufOptions()
    out = Path(out)
    spec = arch_spec(model.config)  # fail on an unknown family before any work
    if out.exists() and not options.force:
        raise PassError(f"out: {out} exists; pass --force (force: true) to replace it")
    if not out.parent.is_dir():
        raise PassError(f"out: cannot write {out}: {out.parent} is not a directory")
    outtype = resolve_outtype(options.outtype, model)
    embedding_type = options.embedding_type or (outtype if outtype in FLOAT_TYPES else "q8_0")
    for label, value in (("outtype", outtype), ("embedding_type", embedding_type)):
        if value not in GGUF_TYPES:
            raise PassError(
                f"{label}: unknown GGUF type {value!r}; use one of {', '.join(GGUF_TYPES)}"
            )
    result = GgufExport(out, outtype, embedding_type, pre_tokenizer="")
    try:
        with atomic_file(out) as tmp:
            writer = gguf.GGUFWriter(tmp, arch_name(spec))
            _add_tensors(writer, model, spec, options, result)  # tensor errors first
            _write_metadata(writer, model, tokenizer, options, result)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except PassError:
        raise
    except Exception as exc:  # tokenizers and gguf raise bare Exceptions for a full disk
        if isinstance(exc, OSError) or is_disk_full(exc):
            raise PassError(f"{options.where}: cannot write {out}: {io_problem(exc)}") from exc
        raise
    result.bytes = out.stat().st_size
    return result


def resolve_outtype(requested: str, model: PreTrainedModel) -> str:
    """``auto`` -> ``f16`` for float models; q4_0 / q4_1 / q8_0 for sym-4 / asym-4 / 8-bit GPTQ."""
    if requested != "auto":
        return requested
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return "f16"
    qcfg = getattr(model.config, "quantization_config", None) or {}
    sym = bool(qcfg.get("sym", False)) if isinstance(qcfg, dict) else False
    bits = max(layer.bits for layer in layers)
    if bits == 8:
        return "q8_0"
    return "q4_0" if sym else "q4_1"


def _write_metadata(
    writer: gguf.GGUFWriter,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    options: GgufOptions,
    result: GgufExport,
) -> None:
    config = model.config
    writer.add_name(options.name or str(getattr(config, "_name_or_path", "") or "slmcompress"))
    write_hparams(writer, config)
    writer.add_file_type(int(GGUF_TYPES[result.outtype][1]))
    if result.outtype not in FLOAT_TYPES:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    result.pre_tokenizer = write_tokenizer(
        writer, tokenizer, int(config.vocab_size), options.pre_tokenizer
    )


def model_tensors(model: PreTrainedModel) -> Iterator[tuple[str, torch.Tensor | GptqTensor]]:
    """HF-named tensors in module order: float parameters, and GPTQ layers as their codes.

    A tied output head is skipped: llama.cpp reads ``token_embd`` when ``output`` is absent.
    """
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, QuantLinear):
            yield f"{dot}weight", gptq_tensor(module)
            if module.bias is not None:
                yield f"{dot}bias", module.bias.detach().float()
            continue
        for name, param in module.named_parameters(recurse=False):
            if tied and f"{dot}{name}" == "lm_head.weight":
                continue
            yield f"{dot}{name}", param.detach()


def gptq_tensor(layer: QuantLinear) -> GptqTensor:
    """Unpack a QuantLinear's buffers (codes, real zero points) for the block transfer."""
    return GptqTensor(
        codes=layer.codes().cpu(),
        scales=layer.scales.cpu(),
        zeros=layer.zeros().cpu(),
        g_idx=layer.g_idx.cpu(),
        bits=layer.bits,
        group_size=layer.group_size,
    )


def _target_type(gguf_name: str, ndim: int, result: GgufExport) -> str:
    if ndim == 1:
        return "f32"  # norms and biases: llama.cpp keeps them in f32
    return result.embedding_type if gguf_name in EMBEDDING_NAMES else result.outtype


def _add_tensors(
    writer: gguf.GGUFWriter,
    model: PreTrainedModel,
    spec: ArchSpec,
    options: GgufOptions,
    result: GgufExport,
) -> None:
    n_blocks = int(model.config.num_hidden_layers)
    types: Counter[str] = Counter()
    for hf_name, source in model_tensors(model):
        name = tensor_name(spec, n_blocks, hf_name)
        ndim = source.codes.dim() if isinstance(source, GptqTensor) else source.dim()
        target = _target_type(name, ndim, result)
        _check_finite(hf_name, source)
        payload, type_name = _encode(hf_name, source, target, options, result)  # errors: HF name
        heads = qk_permutation(spec, model.config, name)
        if heads is not None:
            payload = permute_rows(payload, heads)
        writer.add_tensor(name, payload, raw_dtype=gguf_type(type_name))
        types[type_name] += 1
    result.tensor_types = dict(types)


def _check_finite(name: str, source: torch.Tensor | GptqTensor) -> None:
    """A NaN or Inf weight (or GPTQ scale) would be written silently; refuse it, naming it."""
    if isinstance(source, GptqTensor):
        name, values = name.removesuffix(".weight") + ".scales", source.scales
    else:
        values = source
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise PassError(f"{name}: holds NaN or infinite values; a GGUF of it would be garbage")


def _encode(
    name: str,
    source: torch.Tensor | GptqTensor,
    type_name: str,
    options: GgufOptions,
    result: GgufExport,
) -> tuple[np.ndarray, str]:
    """One tensor's payload and its final type (GPTQ transfer, dequantize, or RTN)."""
    if isinstance(source, GptqTensor):
        if type_name in GPTQ_TRANSFER_TYPES:
            try:
                payload = gptq_to_blocks(name, source, type_name)
            except PassError as exc:
                if not options.requantize:
                    raise
                result.warnings.append(f"{exc}; re-quantized with round-to-nearest")
            else:
                _record_transfer(name, source, payload, type_name, options, result)
                return payload, type_name
        elif type_name not in FLOAT_TYPES and not options.requantize:
            raise PassError(
                f"{name}: GPTQ codes move losslessly only into {', '.join(GPTQ_TRANSFER_TYPES)}; "
                f"{type_name} needs requantize: true"
            )
        source = gptq_dequantize(source)  # (out, in) float
    if type_name not in FLOAT_TYPES and not can_block_quantize(source.shape[-1], type_name):
        result.warnings.append(
            f"{name}: {source.shape[-1]} columns are not whole {type_name} blocks; written as f16"
        )
        type_name = "f16"
    return quantize_float(source, type_name), type_name


def _record_transfer(
    name: str,
    source: GptqTensor,
    payload: np.ndarray,
    type_name: str,
    options: GgufOptions,
    result: GgufExport,
) -> None:
    """Count a transferred layer and, with ``verify``, its max error vs the GPTQ weight."""
    result.gptq_transferred += 1
    if not options.verify:
        return
    ours = dequantize_payload(payload, type_name)  # (out, in)
    reference = gptq_dequantize(source).cpu().numpy()
    err = float(np.abs(ours - reference).max())
    if type_name != "q4_1" and err != 0.0:  # Q4_0/Q8_0 carry d, q unchanged: must be exact
        raise PassError(f"{name}: GPTQ -> {type_name} transfer is not exact (max error {err:g})")
    result.transfer_max_abs_err = max(result.transfer_max_abs_err or 0.0, err)
    log.debug("%s: %s transfer max |err| %.3g", name, type_name, err)
