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

A save that fails (a full disk, say) removes its temporary directory and raises :class:`CheckpointError` in one line;
the checkpoints already written stay as they were. What a killed save leaves behind (``.step_N.tmp``, ``.best.old``)
is never read as a checkpoint: :func:`complete_checkpoints` lists only finished ones and :func:`remove_leftovers`
deletes the rest. ``VAELAB_FAULT=<point>`` kills the process with SIGKILL at one of :data:`FAULT_POINTS`, so that tests
can stop a save at an exact place instead of racing a timer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1

# Named places inside a save where VAELAB_FAULT can kill the process (see fault_point).
FAULT_POINTS: tuple[str, ...] = (
    "checkpoint-files-written",  # the temporary directory complete and fsync'ed, not yet renamed
    "checkpoint-old-moved",  # re-saving 'best': the old one moved aside, the new one not yet in place
    "checkpoint-renamed",  # the new checkpoint in place, its parent directory not yet fsync'ed
    "text-written",  # atomic_write_text (latest.json, config.json): the temporary file written, not yet renamed
)


def fault_point(name: str) -> None:
    """SIGKILL this process here if ``VAELAB_FAULT`` names this point (fault injection for the crash tests)."""
    if os.environ.get("VAELAB_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


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
    fault_point("text-written")
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
    try:
        _write_files(tmp, model=model, optimizer=optimizer, meta=meta)
    except Exception as err:  # a full disk: OSError from json/fsync, SafetensorError (not an OSError) from save_file
        shutil.rmtree(tmp, ignore_errors=True)  # what was written would only fill the scarce space
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        message = f"could not write checkpoint {directory} ({reason}); the earlier checkpoints are intact"
        raise CheckpointError(message) from err
    fault_point("checkpoint-files-written")
    if directory.exists():  # re-saving the same step (e.g. 'best'): swap in the new one
        old = directory.with_name(f".{directory.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(directory, old)
        fault_point("checkpoint-old-moved")
        os.rename(tmp, directory)
        shutil.rmtree(old)
    else:
        os.rename(tmp, directory)
    fault_point("checkpoint-renamed")
    _fsync_dir(directory.parent)
    return directory


def _write_files(tmp: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict) -> None:
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


_STEP = re.compile(r"step_\d+")


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The finished step checkpoints of a checkpoint directory, oldest first (temporaries and 'best' left out)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if _STEP.fullmatch(p.name) and p.is_dir())


def remove_leftovers(ckpt_dir: Path) -> list[Path]:
    """Delete what killed saves left in a checkpoint directory (``.NAME.tmp`` / ``.NAME.old``); return their paths.

    A ``.best.old`` without a ``best`` is the last finished 'best' (killed between the two renames): it is put back.
    """
    ckpt_dir = Path(ckpt_dir)
    removed = []
    if not ckpt_dir.is_dir():
        return removed
    for path in sorted(ckpt_dir.iterdir()):
        match = re.fullmatch(r"\.(.+)\.(tmp|old)", path.name)
        if match is None:
            continue
        target = ckpt_dir / match.group(1)
        if match.group(2) == "old" and path.is_dir() and not target.exists():
            os.rename(path, target)
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    if removed:
        _fsync_dir(ckpt_dir)
    return removed


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
