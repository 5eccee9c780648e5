"""Multi-process distillation: FSDP2 (``fully_shard``) for the student, teacher inference-only.

``torchrun --nproc_per_node=N -m slmcompress run RECIPE`` runs the distill stage on every
rank (the runner handles the rest, see :mod:`slmcompress.dist`). The student's decoder
layers and root are sharded with ``torch.distributed.fsdp.fully_shard`` (parameters as
DTensors, gradients reduce-scattered and averaged over ranks). The teacher is either
replicated (every rank holds it; no communication in its forward) or sharded the same
way (all-gathers per layer; for teachers that do not fit on one device). Only rank 0
writes checkpoints; :func:`gather_full_model` rebuilds a plain model on rank 0 at the end.
Works with gloo on CPU (tests) and nccl on GPUs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from transformers import PreTrainedModel

from slmcompress import dist
from slmcompress.arch import decoder_layers
from slmcompress.errors import PassError

TeacherSharding = Literal["replicated", "sharded"]


def _mesh(device: torch.device):
    return init_device_mesh(device.type, (dist.world_size(),))


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers to shard one by one; none found: only the root is sharded."""
    try:
        return list(decoder_layers(model))
    except PassError:
        return []


def shard_model(
    model: nn.Module, device: torch.device, reshard_after_forward: bool = True
) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root (embeddings, final norm, tied head)."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device)
    for layer in _blocks(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def prepare_teacher(teacher: nn.Module, device: torch.device, mode: TeacherSharding) -> nn.Module:
    """Freeze the teacher; shard it when asked (otherwise every rank keeps a full replica)."""
    teacher.eval().requires_grad_(False)
    if mode == "sharded" and dist.is_distributed():
        shard_model(teacher, device)
    return teacher


def gather_full_model(
    model: nn.Module, cls: type[PreTrainedModel], dtype: torch.dtype
) -> PreTrainedModel | None:
    """Collective: the full trained weights in a fresh unsharded ``cls`` on rank 0 (None elsewhere).

    ``cls`` is the model's class before sharding (``fully_shard`` swaps in a subclass).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    dist.barrier()
    if not dist.is_main():
        return None
    plain = cls(model.config)
    plain.load_state_dict(state)
    return plain.to(dtype).eval()
