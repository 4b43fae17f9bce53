"""A run directory: its one writer (:class:`RunLock`), and read back: the latest checkpoint, the metrics, and
:func:`load_run` (config + weights -> model)."""

from __future__ import annotations

import fcntl
import gc
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaelab.checkpoint import CheckpointError, atomic_write_text, complete_checkpoints, load_checkpoint
from vaelab.config import TrainConfig, build_model


# --- one writer per run directory -------------------------------------------------------------------------------------
class RunInUse(RuntimeError):
    """Another process holds the run directory's lock: it is training there now."""


class RunLock:
    """An exclusive OS lock (``flock``) on ``RUN_DIR/.lock``, so that one process at a time writes a run directory.

    Taken before anything in the directory is written or removed; a second taker gets :class:`RunInUse` at once (no
    waiting). The kernel drops the lock when its holder dies, even by SIGKILL: the ``.lock`` file a killed run leaves
    never blocks the next one. :meth:`release` removes the file (while still holding the lock; a taker that opened
    the old file meanwhile sees it was unlinked and locks a fresh one), and the directory too if taking the lock
    created it and nothing else was written there. An object dropped unreleased lets go when garbage-collected.
    """

    NAME = ".lock"

    def __init__(self, run_dir: str | Path):
        self._fd: int | None = None
        run_dir = Path(run_dir)
        self._created = not run_dir.exists()
        self.run_dir, self.path = run_dir, run_dir / self.NAME
        collected = False
        while True:
            run_dir.mkdir(parents=True, exist_ok=True)  # again after a collected holder removed it with its lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                if holder == str(os.getpid()) and not collected:  # perhaps ours, held by a Trainer dropped unfitted
                    gc.collect()  # (a reference cycle keeps it alive): collected, it lets go
                    collected = True
                    continue
                by = f"another process (pid {holder})" if holder.isdigit() else "another process"
                raise RunInUse(
                    f"{run_dir} is in use by {by}: one writer per run directory; wait for it to end or stop it"
                ) from None
            try:
                here = os.stat(self.path)
                mine = os.fstat(fd)
                if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                    break
            except FileNotFoundError:  # released (and removed) by its holder between our open and our flock
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Give the lock up and remove its file (a no-op if not held)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                self.run_dir.rmdir()  # only if empty: a run that failed before writing anything leaves no directory
            except OSError:
                pass

    def __del__(self) -> None:
        self.release()


# --- reading a run directory -----------------------------------------------------------------------------------------
def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete step checkpoint of a run directory (from latest.json, else the highest step; a damaged
    latest.json is passed over)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    pointer = ckpt_dir / "latest.json"
    try:
        candidate = ckpt_dir / str(json.loads(pointer.read_text())["checkpoint"])
        if candidate.is_dir() and candidate in complete_checkpoints(ckpt_dir):
            return candidate
    except (OSError, ValueError, KeyError, TypeError):  # missing, torn or not ours: the directory listing decides
        pass
    steps = complete_checkpoints(ckpt_dir)
    return steps[-1] if steps else None


def resume_checkpoint(run_dir: str | Path) -> tuple[Path, tuple[dict, dict, dict]] | None:
    """The checkpoint to resume from and its contents: the latest one that loads, newest first (a damaged latest
    checkpoint no longer blocks a resume when an older intact one exists; it is named on stderr). None if none."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    candidates = [latest] + [p for p in reversed(complete_checkpoints(latest.parent)) if p != latest]
    damaged = []
    for path in candidates:
        try:
            loaded = load_run_checkpoint(path)
        except CheckpointError as err:
            damaged.append(err)
            continue
        for reason in damaged:
            print(f"skipping a damaged checkpoint: {reason}", file=sys.stderr)
        return path, loaded
    raise CheckpointError(f"no intact checkpoint in {latest.parent}; the newest: {damaged[0]}")


def load_run_checkpoint(directory: Path) -> tuple[dict, dict, dict]:
    """:func:`~vaelab.checkpoint.load_checkpoint`, and what a run's checkpoint must also hold: its step, data shape
    and config (:meth:`TrainConfig.from_saved`), the RNG state, and every optimizer tensor its state.json names.
    Raises :class:`CheckpointError` in one line naming the file."""
    weights, tensors, meta = load_checkpoint(directory)
    state_json, state_tensors = directory / "state.json", directory / "state.safetensors"
    step = meta.get("step")
    if not _is_count(step):
        raise CheckpointError(f"{state_json}: step must be an integer >= 0, got {step!r}")
    if not _is_shape(meta.get("data_shape")):
        raise CheckpointError(
            f"{state_json}: data_shape must be a list of integers >= 1, got {meta.get('data_shape')!r}"
        )
    try:
        TrainConfig.from_saved(meta.get("config"), state_json)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    optimizer = meta.get("optimizer")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)):
        raise CheckpointError(f"{state_json}: no optimizer state")
    names = ["rng.torch"] + [
        f"optim.{idx}.{name}"
        for idx, entry in optimizer["state"].items()
        for name, value in (entry.items() if isinstance(entry, dict) else ())
        if value == "tensor"
    ]
    missing = [name for name in names if name not in tensors]
    if missing:
        raise CheckpointError(f"{state_tensors} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return weights, tensors, meta


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_is_count(d) and d >= 1 for d in value)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after ``step`` by a run that died before its next checkpoint (and a line torn by
    that death: it cannot be read, and its step is after the checkpoint's)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if line.strip() and json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# --- a finished (or interrupted) run, rebuilt from its directory alone ----------------------------------------------
@dataclass
class Run:
    """A run directory loaded back: the config, the model with its weights, and the metrics written so far."""

    run_dir: Path
    config: TrainConfig
    model: nn.Module
    metrics: list[dict[str, Any]]
    weights: Path  # the file the weights came from
    step: int | None  # the checkpoint's step (None for the final weights)


def load_run(run_dir: str | Path, *, which: str = "final", device: str | torch.device = "cpu") -> Run:
    """Rebuild a run's model from its directory: config.json + weights (safetensors; nothing is unpickled).

    Args:
        which: "final" (model.safetensors, written when training ends; falls back to the latest checkpoint),
            "best" (the checkpoint with the best validation ELBO) or "latest" (the newest step checkpoint).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir} is not a vaelab run directory: config.json is missing")
    try:
        config = TrainConfig.from_saved(json.loads(config_path.read_text()), config_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})") from None
    except ValueError as err:  # from_saved's message names the file
        raise CheckpointError(str(err)) from None
    step = None
    if which == "final" and (run_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights_path = run_dir / "model.safetensors"
        try:
            weights = load_file(weights_path)
        except Exception as err:  # safetensors raises its own error types on a damaged file
            raise CheckpointError(f"cannot read {weights_path}: {err}") from err
        data_shape = _data_shape_from_checkpoints(run_dir)
    else:
        directory = run_dir / "checkpoints" / "best" if which == "best" else latest_checkpoint(run_dir)
        if which not in ("final", "best", "latest"):
            raise ValueError(f"which must be 'final', 'best' or 'latest', got {which!r}")
        if directory is None or not directory.is_dir():
            raise CheckpointError(f"{run_dir} has no {which} checkpoint")
        weights, _, meta = load_run_checkpoint(directory)
        weights_path, step, data_shape = directory / "model.safetensors", meta["step"], meta["data_shape"]
    model = build_model(config, data_shape)
    check_weights(model, weights, weights_path)
    model.load_state_dict(weights)
    model.to(device).eval()
    metrics_path = run_dir / "metrics.jsonl"
    metrics = read_metrics(metrics_path)
    return Run(run_dir=run_dir, config=config, model=model, metrics=metrics, weights=weights_path, step=step)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none if there is no file); a line that is not a JSON record (torn by a
    crash) is left out, as a resume drops it."""
    records = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def check_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse, in one line naming the file, weights that do not fit the model the config builds (missing, extra or
    wrong-shape tensors) or that hold NaN or inf (which every estimate would then report as nan)."""
    expected = model.state_dict()
    problems = []
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    for name in sorted(set(expected) & set(weights)):
        if weights[name].shape != expected[name].shape:
            got, want = list(weights[name].shape), list(expected[name].shape)
            problems.append(f"{name} has shape {got}, the config's model needs {want}")
    if problems:
        raise CheckpointError(f"{path} does not fit the model its run's config.json builds: {'; '.join(problems)}")
    bad = [name for name, value in weights.items() if value.is_floating_point() and not value.isfinite().all()]
    if bad:
        raise CheckpointError(f"{path} holds NaN or inf in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")


def _data_shape_from_checkpoints(run_dir: Path) -> list[int]:
    shape_file = run_dir / "data_shape.json"
    if shape_file.is_file():
        try:
            shape = json.loads(shape_file.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{shape_file} is not valid JSON ({err})") from None
        if not _is_shape(shape):
            raise CheckpointError(f"{shape_file} must hold a list of integers >= 1, got {shape!r}")
        return shape
    directory = latest_checkpoint(run_dir)
    if directory is None:
        raise CheckpointError(f"{run_dir}: cannot tell the data shape (no data_shape.json, no checkpoint)")
    return load_run_checkpoint(directory)[2]["data_shape"]
