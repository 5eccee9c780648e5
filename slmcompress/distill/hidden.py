"""Intermediate hidden-state matching: the optional second KD term of Minitron (Sreenivas et al. 2024).

Besides the logits, the student can match the teacher's residual stream after selected
decoder layers. Minitron found it useful after *depth* pruning and unnecessary after width
pruning; ``benchmarks/distill.py`` measures it (variant ``kd-hidden``) rather than assuming.

The outputs are captured with forward hooks on the decoder blocks, not through
``output_hidden_states``, whose semantics (which entry is normed, which layers are
recorded) have changed across transformers releases. After depth pruning by slmcompress
each student layer is matched to the teacher layer it was cut from (the student's config
lists them under ``slmcompress_source_layers``) when the teacher is the pruned model;
otherwise student layer ``i`` of ``L_s`` is matched to teacher layer
``round((i + 1) * L_t / L_s) - 1``. The distance is ``1 - cos`` per position,
which ignores the residual stream's scale (it grows with depth and differs after pruning)
and needs no learned projection, so it requires equal hidden sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slmcompress.arch import decoder_layers


def layer_map(n_student: int, n_teacher: int, source_layers: list[int] | None = None) -> list[int]:
    """Teacher layer index matched to each student layer.

    ``source_layers``: the teacher layers the student's layers were pruned from (recorded
    by depth pruning); otherwise evenly spaced, last to last.
    """
    if n_student > n_teacher:
        raise ValueError(f"student has more layers ({n_student}) than the teacher ({n_teacher})")
    if source_layers is not None:
        if len(source_layers) != n_student or max(source_layers) >= n_teacher:
            raise ValueError(
                f"source layers {source_layers} do not fit a {n_student}-layer student "
                f"of a {n_teacher}-layer teacher"
            )
        return list(source_layers)
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


class HiddenCapture:
    """Forward hooks that record the outputs of chosen decoder layers, in call order."""

    def __init__(
        self, model: nn.Module, indices: list[int] | None = None, grad_only: bool = False
    ) -> None:
        """``grad_only``: ignore forwards without autograd (the student's held-out evals)."""
        layers = decoder_layers(model)
        chosen = range(len(layers)) if indices is None else indices
        self.states: list[torch.Tensor] = []
        self.grad_only = grad_only
        self._handles = [layers[i].register_forward_hook(self._record) for i in chosen]

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        if self.grad_only and not torch.is_grad_enabled():
            return
        self.states.append(output[0] if isinstance(output, tuple) else output)  # (B, T, H)

    def pop(self) -> list[torch.Tensor]:
        """The states recorded since the last ``pop`` (and forget them)."""
        states, self.states = self.states, []
        return states

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.states = [], []


def hidden_state_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over matched layers and positions of ``1 - cos(h_student, h_teacher)``."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"{len(student)} student vs {len(teacher)} teacher hidden states")
    per_layer = [
        (1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean()
        for s, t in zip(student, teacher, strict=True)
    ]
    return torch.stack(per_layer).mean()
