"""Checkpoints as data, never code: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a directory::

    step_00000100/
        model.safetensors   the model's state_dict
        state.safetensors   optimizer tensors and RNG states
        state.json          config, step, epoch, metrics, optimizer hyper-parameters, tensor layout

It is written to a temporary sibling directory, every file fsync'ed, then renamed into place (rename is atomic on
POSIX), and the parent directory fsync'ed: a crash at any moment leaves either the old set of checkpoints or the new
one, never a half-written directory. ``latest.json`` beside the checkpoints names the newest; it is replaced the same
way. Loading uses ``safetensors`` and ``json`` only: no pickle, so a checkpoint cannot execute code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --- optimizer and RNG state as flat tensors + JSON -------------------------------------------------------------------
def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        meta["state"][str(idx)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
                meta["state"][str(idx)][name] = "tensor"
            else:
                meta["state"][str(idx)][name] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {
            name: (tensors[f"optim.{idx}.{name}"] if value == "tensor" else value) for name, value in entry.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    states = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"rng.cuda.{i}"] = s
    return states


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


# --- save / load ------------------------------------------------------------------------------------------------------
def save_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
) -> Path:
    """Atomically write a checkpoint directory (see the module docstring) and return its path."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    tensors = rng_state()
    meta = dict(meta, format_version=FORMAT_VERSION)
    if optimizer is not None:
        optim_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(optim_tensors)
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    for name in ("model.safetensors", "state.safetensors", "state.json"):
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    if directory.exists():  # re-saving the same step (e.g. 'best'): swap in the new one
        old = directory.with_name(f".{directory.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old)
    else:
        os.rename(tmp, directory)
    _fsync_dir(directory.parent)
    return directory


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or not one of ours."""


def load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Read a checkpoint: (model weights, other tensors, metadata). Never unpickles."""
    directory = Path(directory)
    for name in ("model.safetensors", "state.safetensors", "state.json"):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is not a complete vaelab checkpoint: {name} is missing")
    loaded = {}
    for name, read in (
        ("state.json", lambda path: json.loads(path.read_text())),
        ("model.safetensors", load_file),
        ("state.safetensors", load_file),
    ):
        try:
            loaded[name] = read(directory / name)
        except Exception as err:  # safetensors raises its own error types on a damaged file
            raise CheckpointError(f"cannot read checkpoint {directory}: {name} is damaged ({err})") from err
    meta, weights, tensors = loaded["state.json"], loaded["model.safetensors"], loaded["state.safetensors"]
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: unknown checkpoint format {meta.get('format_version')!r}")
    return weights, tensors, meta


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = _unflatten_optimizer(tensors, meta["optimizer"])
    optimizer.load_state_dict(state)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The model's weights alone as one safetensors file, written atomically (a run's final ``model.safetensors``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)
