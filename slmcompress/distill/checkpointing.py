"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory (published atomically, so a kill mid-write leaves the previous
one intact)::

    model.safetensors      full (unsharded) student state dict
    optimizer.safetensors  optimizer state tensors, keys ``<param fqn>::<name>``
    rng.safetensors        torch CPU (and CUDA) generator states
    trainer.json           fingerprint, step, history, param groups, scheduler, Python/NumPy RNG

``torch.distributed.checkpoint.state_dict`` gives full, FQN-keyed state dicts for plain and
FSDP-sharded models alike, so the same files resume a single-process or a torchrun run.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from slmcompress import dist
from slmcompress.errors import PassError, first_line
from slmcompress.fsutil import atomic_dir, read_json_file

CHECKPOINT_DIR = "checkpoint"
SEP = "::"


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies (safetensors refuses shared storage, e.g. tied weights)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}


def _flatten_optimizer(state: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``{fqn: {name: tensor}}`` -> ``{"fqn::name": tensor}`` on the host (written to disk)."""
    return {
        f"{fqn}{SEP}{name}": torch.as_tensor(value, device="cpu")
        for fqn, entry in state.items()
        for name, value in entry.items()
    }


def _unflatten_optimizer(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        fqn, name = key.rsplit(SEP, 1)
        state.setdefault(fqn, {})[name] = value
    return state


def _python_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
    }


def _restore_python_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))


def _torch_rng() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def save_training_state(
    work_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
) -> None:
    """Gather full state dicts (collective under FSDP) and write them on rank 0 only."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_distributed())
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    if dist.is_main():
        with atomic_dir(Path(work_dir) / CHECKPOINT_DIR) as tmp:
            save_file(_plain(model_sd), str(tmp / "model.safetensors"))
            save_file(
                _plain(_flatten_optimizer(optim_sd["state"])), str(tmp / "optimizer.safetensors")
            )
            save_file(_plain(_torch_rng()), str(tmp / "rng.safetensors"))
            meta = {
                **trainer_state,
                "param_groups": optim_sd["param_groups"],
                "scheduler": scheduler.state_dict(),
                "rng": _python_rng(),
            }
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=1, default=_json_default))
    dist.barrier()


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def weights_digest(model: nn.Module) -> str:
    """Hash of the student's starting weights: a checkpoint of another student must not resume."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


#: what resuming reads from trainer.json, and its JSON type
_TRAINER_KEYS = {"fingerprint": dict, "param_groups": list, "scheduler": dict, "rng": dict}


def read_trainer_json(work_dir: Path) -> dict[str, Any] | None:
    """The scalar part of the checkpoint in ``work_dir`` (None when there is none).

    A damaged file is one line naming it (never a KeyError mid-resume).
    """
    path = Path(work_dir) / CHECKPOINT_DIR / "trainer.json"
    if not path.exists() and not path.is_symlink():
        return None
    meta = read_json_file(path, "resume", PassError)
    for key, kind in _TRAINER_KEYS.items():
        if not isinstance(meta, dict) or not isinstance(meta.get(key), kind):
            raise PassError(
                f"resume: {path} is not a training checkpoint ({key!r} missing or not a "
                f"{kind.__name__}); delete {path.parent} to start the stage over"
            )
    return meta


def check_fingerprint(
    work_dir: Path, fingerprint: dict[str, Any], where: str
) -> dict[str, Any] | None:
    """Refuse to resume from a checkpoint written by a different run configuration."""
    meta = read_trainer_json(work_dir)
    if meta is None:
        return None
    if meta.get("fingerprint") != fingerprint:
        old = meta.get("fingerprint") or {}
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        raise PassError(
            f"{where}: {Path(work_dir) / CHECKPOINT_DIR} is a training checkpoint of a different "
            f"recipe/config (differs in {', '.join(diff) or 'format'}); delete it to start over"
        )
    return meta


def _load(path: Path) -> dict[str, torch.Tensor]:
    """A tensor file of the checkpoint; missing or torn is one line naming it."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise PassError(
            f"resume: {path} cannot be read ({first_line(exc)}); delete {path.parent} to start "
            "the stage over"
        ) from None


def load_training_state(
    work_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG in place; return trainer.json."""
    directory = Path(work_dir) / CHECKPOINT_DIR
    meta = read_trainer_json(work_dir)
    model_sd = _load(directory / "model.safetensors")
    optim_sd = {
        "state": _unflatten_optimizer(_load(directory / "optimizer.safetensors")),
        "param_groups": meta["param_groups"],
    }
    for group in optim_sd["param_groups"]:
        group["betas"] = tuple(group["betas"])
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=StateDictOptions(full_state_dict=True),
    )
    scheduler.load_state_dict(meta["scheduler"])
    rng = _load(directory / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("cuda")])
    _restore_python_rng(meta["rng"])
    return meta
