"""What a GPTQ v1 checkpoint must say and hold: its ``quantization_config`` and packed shapes.

Checked before any tensor is used, so a hand-edited or foreign checkpoint fails with one
line naming the key or tensor instead of a TypeError or a shape error deep in a kernel.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from slmcompress.errors import CheckpointError
from slmcompress.quant.packing import pack_multiple
from slmcompress.quant.qparams import n_groups


class GPTQFormat(BaseModel):
    """The keys of ``quantization_config`` slmcompress relies on (others are kept as-is)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    quant_method: Literal["gptq"]
    bits: Literal[2, 3, 4, 8]
    group_size: int
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: Literal["gptq"] = "gptq"

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be -1 (per-channel) or a positive group size")
        return value


def parse_gptq_config(qcfg: Any, where: str) -> GPTQFormat:
    """Validate a checkpoint's ``quantization_config``; ``where`` names the file in errors."""
    if not isinstance(qcfg, dict):
        raise CheckpointError(f"{where}: quantization_config must be a mapping")
    try:
        return GPTQFormat.model_validate(qcfg)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            expected = (err.get("ctx") or {}).get("expected", "")
            message = f"must be one of {expected.replace(' or ', ', ')}"
        got = qcfg.get(err["loc"][0]) if err["loc"] else None
        raise CheckpointError(
            f"{where}: quantization_config.{key}: {message} (got {got!r})"
        ) from None


def packed_shapes(
    prefix: str, in_features: int, out_features: int, fmt: GPTQFormat
) -> dict[str, tuple[int, ...]]:
    """The shape of every packed tensor of one quantized linear, as GPTQ v1 lays it out."""
    bits = fmt.bits
    multiple = pack_multiple(bits)
    if in_features % multiple or out_features % multiple:
        raise CheckpointError(
            f"checkpoint: {prefix}: {in_features}x{out_features} cannot be packed at {bits} bits "
            f"(both widths must be multiples of {multiple})"
        )
    groups = n_groups(in_features, fmt.group_size)
    return {
        f"{prefix}.qweight": (in_features * bits // 32, out_features),
        f"{prefix}.qzeros": (groups, out_features * bits // 32),
        f"{prefix}.scales": (groups, out_features),
        f"{prefix}.g_idx": (in_features,),
        f"{prefix}.bias": (out_features,),
    }


def nonfinite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding NaN or Inf, or ``None``.

    One vectorised ``isfinite`` per tensor: GPTQ codes are integers, so only the scales,
    biases, norms and embeddings are scanned (a fraction of a second even for 8B models).
    """
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_gptq_values(state: dict[str, torch.Tensor], where: str) -> None:
    """Values, not only shapes: finite floats and every ``g_idx`` inside its ``scales`` rows."""
    bad = nonfinite_tensor(state)
    if bad is not None:
        raise CheckpointError(f"{where}: tensor {bad} holds NaN or infinite values")
    for name, g_idx in state.items():
        if not name.endswith(".g_idx"):
            continue
        scales = state.get(name.removesuffix(".g_idx") + ".scales")
        groups = scales.shape[0] if scales is not None else None
        if (
            g_idx.numel()
            and groups is not None
            and not 0 <= int(g_idx.min()) <= int(g_idx.max()) < groups
        ):
            raise CheckpointError(
                f"{where}: tensor {name} names groups {int(g_idx.min())}..{int(g_idx.max())}, "
                f"but the scales have {groups} rows"
            )
