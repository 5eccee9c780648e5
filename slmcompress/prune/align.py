"""Kernel- and runtime-friendly pruned widths: round each pruned width to a multiple.

GPTQ kernels (gptqmodel/vLLM Marlin, our int4 kernels) need a linear's input width to
divide by the group size (128 by default) and its output width to be a multiple of 64;
tensor-parallel serving splits widths evenly. A pruned width such as ``ffn 1000`` gives a
checkpoint only a plain torch path can run, so by default (``align: auto``) every *pruned*
channel width that is not already a multiple of 64 is rounded to the nearest multiple of 128
when the model's width is one, else of 64 (falling back to 64 when 128 leaves nothing to
prune); untouched widths stay as they are. ``align: 128`` enforces 128 everywhere. Heads are whole by construction: with ``auto`` an attention width that is not a
multiple of 64 is only noted (small head_dims), with an explicit multiple it is an error.
``align: none`` keeps targets exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from slmcompress.errors import PassError
from slmcompress.prune.planner import PruneSizes

CHANNEL_AXES = {"ffn_hidden_size": "ffn_hidden_size", "hidden_size": "hidden_size"}
AUTO_MULTIPLES = (128, 64)


@dataclass
class Alignment:
    """What alignment did, for the stage report."""

    align: str | int
    multiples: dict[str, int] = field(default_factory=dict)
    rounded: dict[str, list[int]] = field(default_factory=dict)  # field -> [asked, used]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "align": self.align,
            "multiples": self.multiples,
            "rounded": self.rounded,
            "notes": self.notes,
        }

    def line(self) -> str:
        """One report line: the multiple each pruned width was rounded to."""
        if self.align == "none":
            return "align: none (pruned widths exactly as asked)"
        parts = [f"{k} x{m}" for k, m in self.multiples.items()]
        moved = [f"{k} {a}->{b}" for k, (a, b) in self.rounded.items()]
        text = f"align: {self.align} ({', '.join(parts) or 'no width pruned'})"
        text += f"; rounded {', '.join(moved)}" if moved else ""
        return text + "".join(f"; {note}" for note in self.notes)


def _candidates(value: int, current: int, align: str | int) -> list[int]:
    if align != "auto":
        return [int(align)]
    if value % AUTO_MULTIPLES[-1] == 0 and current % AUTO_MULTIPLES[-1] == 0:
        return [AUTO_MULTIPLES[-1]]  # already kernel-friendly: kept as asked
    return [m for m in AUTO_MULTIPLES if current % m == 0]


def _round(value: int, current: int, multiple: int) -> int | None:
    """Nearest multiple of ``multiple`` that still prunes (>= one multiple, < current)."""
    rounded = max(multiple, int(round(value / multiple)) * multiple)
    if value % multiple == 0:
        rounded = value
    return rounded if rounded < current else None


def align_sizes(
    current: PruneSizes, sizes: PruneSizes, align: str | int, where: str = "target"
) -> tuple[PruneSizes, Alignment]:
    """Round every pruned channel width; check attention widths. One-line PassError naming the
    field whose target cannot be met under the alignment."""
    report = Alignment(align)
    if align == "none":
        return sizes, report
    updates: dict[str, int] = {}
    for name in CHANNEL_AXES:
        value, size = getattr(sizes, name), getattr(current, name)
        if value == size:
            continue
        candidates = _candidates(value, size, align)
        if not candidates:  # auto, and the model's own width is not a multiple of 64
            report.notes.append(f"{name}: the model's {size} is not a multiple of 64; not aligned")
            continue
        for multiple in candidates:
            rounded = _round(value, size, multiple)
            if rounded is not None:
                break
        else:
            raise PassError(
                f"{where}.{name}: {value} cannot be rounded to a multiple of "
                f"{candidates[-1]} below the model's {size} (align: {align}); "
                "choose another target or set align: none"
            )
        report.multiples[name] = multiple
        if rounded != value:
            report.rounded[name] = [value, rounded]
            updates[name] = rounded
    _check_heads(current, sizes, align, where, report)
    return replace(sizes, **updates), report


def _check_heads(
    current: PruneSizes, sizes: PruneSizes, align: str | int, where: str, report: Alignment
) -> None:
    """Attention widths (heads x head_dim) follow head_dim; an explicit multiple is enforced."""
    for name in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(sizes, name)
        if heads == getattr(current, name):
            continue
        width = heads * sizes.head_dim
        multiple = 64 if align == "auto" else int(align)
        if width % multiple == 0:
            continue
        message = (
            f"{name}: {heads} heads x head_dim {sizes.head_dim} = {width} channels, "
            f"not a multiple of {multiple}"
        )
        if align != "auto":
            raise PassError(f"{where}.{message} (align: {align}); set align: none to allow it")
        report.notes.append(message)
