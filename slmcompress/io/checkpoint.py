"""Checkpoints: Hugging Face directories (safetensors only) + ``slmcompress.json`` metadata.

Float and pruned checkpoints load with plain ``AutoModelForCausalLM.from_pretrained``.
GPTQ checkpoints use the standard v1 "gptq" layout; slmcompress loads them into
:class:`~slmcompress.quant.quant_linear.QuantLinear` modules itself, so no GPTQ backend
package is needed to read them.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights

from slmcompress.arch import replace_module
from slmcompress.errors import CheckpointError, first_line
from slmcompress.fsutil import atomic_dir
from slmcompress.io.files import (
    INDEX_FILE,
    SINGLE_FILE,
    TensorEntry,
    header_entries,
    new_metadata,
    parse_header,
    shard_paths,
    write_metadata,
    write_quantize_config,
)
from slmcompress.io.gptq_checkpoint import (
    GPTQFormat,
    check_gptq_values,
    packed_shapes,
    parse_gptq_config,
)
from slmcompress.io.remote_code import check_local_code, hf_kwargs
from slmcompress.quant.quant_linear import QuantLinear

log = logging.getLogger(__name__)


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    metadata: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write model + tokenizer + metadata to ``target`` atomically (temp dir + rename)."""
    with atomic_dir(Path(target)) as tmp:
        write_checkpoint_into(model, tokenizer, tmp, metadata, extra_files)
    return Path(target)


def write_checkpoint_into(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
    metadata: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write the checkpoint files into an existing (temporary) directory."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    write_quantize_config(directory, getattr(model.config, "quantization_config", None))
    write_metadata(directory, new_metadata(metadata))
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint (:func:`shard_paths`); a directory holding pickle
    weights only is named as such."""
    if (directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file():
        return shard_paths(directory)
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(
            f"checkpoint: {directory} has only pickle weights; slmcompress loads safetensors only"
        )
    raise CheckpointError(f"checkpoint: {directory} has no model.safetensors")


@dataclass(frozen=True)
class CheckpointInfo:
    """One read of a checkpoint directory, passed down instead of read again.

    ``config.json`` parsed, a GPTQ ``quantization_config`` validated, every safetensors
    header parsed and checked against its file's size: a load reads each of them once.
    The remote-code policy is settled on this read (checked, or checked by the caller).
    """

    directory: Path
    config: dict[str, Any]
    gptq: GPTQFormat | None
    headers: dict[Path, tuple[int, dict]]  # shard -> (data section offset, header)

    @property
    def shards(self) -> list[Path]:
        return list(self.headers)

    def entries(self) -> dict[str, TensorEntry]:
        """Every stored tensor: shard, byte range, dtype and shape (from the headers read)."""
        found: dict[str, TensorEntry] = {}
        for path, (base, header) in self.headers.items():
            found.update(header_entries(path, base, header))
        return found

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.headers)


def read_checkpoint(directory: Path, code_check: str | None = "checkpoint") -> CheckpointInfo:
    """Check config.json and every safetensors file (header + sizes), once.

    ``code_check``: what to call the directory in a remote-code refusal
    (:func:`~slmcompress.io.remote_code.check_local_code`); ``None`` skips the check, for a
    caller that made it on this directory (or one that never loads the model).
    """
    directory = Path(directory)
    config = _read_config(directory)
    gptq = None
    qcfg = config.get("quantization_config")
    if isinstance(qcfg, dict) and qcfg.get("quant_method") == "gptq":
        gptq = parse_gptq_config(qcfg, str(directory / "config.json"))
    headers = {path: _check_safetensors(path) for path in safetensors_files(directory)}
    if code_check is not None:
        check_local_code(directory, code_check)
    return CheckpointInfo(directory, config, gptq, headers)


def validate_checkpoint(directory: Path) -> dict[str, Any]:
    """Check config.json and every safetensors file (header + sizes); return the config dict."""
    return read_checkpoint(directory, code_check=None).config


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint: {directory} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint: {config_path} is not valid JSON") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint: {config_path} must hold a JSON object")
    return config


def check_tensor_shapes(info: CheckpointInfo, config: PretrainedConfig) -> None:
    """Compare every stored tensor's shape with what ``config`` implies; name the first misfit.

    Uses the headers read once (:class:`CheckpointInfo`) and a meta-device skeleton, so
    it costs no weight memory. Without it a wrong shape surfaces as transformers'
    multi-line load report, or as a shape error inside a GPTQ kernel.
    """
    qcfg = getattr(config, "quantization_config", None)
    if qcfg and not isinstance(qcfg, dict):
        qcfg = qcfg.to_dict()
    if qcfg and qcfg.get("quant_method") != "gptq":
        return  # bitsandbytes & co. store their own layouts; their loaders check them
    fmt = parse_gptq_config(qcfg, str(info.directory / "config.json")) if qcfg else None
    float_config = copy.deepcopy(config)
    if qcfg:
        del float_config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(float_config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    headers = {path: header for path, (_, header) in info.headers.items()}
    for path, header in headers.items():
        for key in header:
            prefix = key.removesuffix(".qweight")
            if fmt is None or prefix == key:
                continue
            linear = _linear_or_none(skeleton, prefix)
            if linear is None:
                raise CheckpointError(
                    f"checkpoint: {path.name}: {key} has no Linear {prefix!r} in config.json"
                )
            expected.update(packed_shapes(prefix, linear.in_features, linear.out_features, fmt))
    for path, header in headers.items():
        for key, info_ in header.items():
            shape = tuple(info_.get("shape", ())) if isinstance(info_, dict) else None
            if key in expected and shape != expected[key]:
                raise CheckpointError(
                    f"checkpoint: {path.name}: tensor {key} has shape {list(shape or ())}, "
                    f"config.json implies {list(expected[key])}"
                )


def _linear_or_none(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


def _check_safetensors(path: Path) -> tuple[int, dict]:
    """Parse a safetensors header and verify the data section is as long as it says.

    Reads the header only (no mmap), so checking a multi-GB shard costs no address space.
    Returns (data section offset, header), kept in :class:`CheckpointInfo`.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint: weight shard {path} is missing")
    try:
        data_start, header = parse_header(path)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        if path.stat().st_size < data_start + end:
            raise ValueError("file is shorter than its header says (truncated)")
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file
        raise CheckpointError(f"checkpoint: {path} is corrupt or truncated ({exc})") from exc
    return data_start, header


def load_checkpoint(
    checkpoint: Path | CheckpointInfo, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a float or GPTQ checkpoint written by slmcompress (or any HF safetensors dir).

    ``checkpoint``: a directory, or the :class:`CheckpointInfo` a caller already read.
    """
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_checkpoint(checkpoint)
    directory = info.directory
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **hf_kwargs())
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint: cannot load the tokenizer in {directory}: {first_line(exc)}"
        ) from exc
    try:
        hf_config = AutoConfig.from_pretrained(directory, **hf_kwargs())
    except Exception as exc:  # noqa: BLE001 - unknown model_type, bad values, ...
        raise CheckpointError(
            f"checkpoint: {directory}/config.json cannot be read: {first_line(exc)}"
        ) from exc
    check_tensor_shapes(info, hf_config)
    if info.gptq is not None:
        return load_gptq_checkpoint(info, dtype, hf_config), tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **hf_kwargs())
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint: cannot load {directory}: {first_line(exc)}") from exc
    return model, tokenizer


def load_gptq_checkpoint(
    info: CheckpointInfo, dtype: torch.dtype, config: PretrainedConfig | None = None
) -> PreTrainedModel:
    """Build the float skeleton, swap in QuantLinear where the checkpoint has ``qweight``, load.

    ``config``: the checkpoint's ``AutoConfig`` if the caller read it (copied, not changed).
    """
    directory, fmt = info.directory, info.gptq
    qcfg = info.config["quantization_config"]
    if config is None:
        config = AutoConfig.from_pretrained(directory, **hf_kwargs())
    config = copy.deepcopy(config)
    config.quantization_config = None
    del config.quantization_config
    with no_init_weights():  # every tensor comes from the checkpoint (missing ones fail below)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = _read_state(info.shards)
    check_gptq_values(state, f"checkpoint: {directory}")
    bits, group_size = fmt.bits, fmt.group_size
    for prefix in sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight")):
        replace_module(model, prefix, _quant_linear_for(model, prefix, state, bits, group_size))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint: {directory}: weights do not match the config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    model.config.quantization_config = qcfg
    return model.eval()


def quant_linear_swapper(fmt: GPTQFormat) -> Callable[[nn.Module, Any], None]:
    """A ``StreamingModel`` prepare hook: a ``QuantLinear`` wherever the shards hold ``qweight``.

    Called on the meta skeleton, so the swapped modules' buffers are meta too and load
    from the shards like any other tensor when their layer is reached.
    """

    def prepare(model: nn.Module, source: Any) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and f"{name}.qweight" in source:
                quant = QuantLinear(
                    module.in_features,
                    module.out_features,
                    fmt.bits,
                    fmt.group_size,
                    bias=f"{name}.bias" in source,
                )
                quant.cache_weight = True  # dequantize once per resident layer, not per batch
                replace_module(model, name, quant)

    return prepare


def _read_state(shards: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in shards:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    return state


def _quant_linear_for(
    model: nn.Module, prefix: str, state: dict[str, torch.Tensor], bits: int, group_size: int
) -> QuantLinear:
    linear = model.get_submodule(prefix)
    if not isinstance(linear, nn.Linear):
        raise CheckpointError(f"checkpoint: {prefix} has qweight but is not a Linear in the config")
    return QuantLinear(
        linear.in_features, linear.out_features, bits, group_size, bias=f"{prefix}.bias" in state
    )


def bytes_on_disk(directory: Path) -> int:
    """Total bytes of the weight files of a checkpoint."""
    return sum(p.stat().st_size for p in safetensors_files(Path(directory)))
