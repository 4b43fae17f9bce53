"""A run directory read back: the latest checkpoint, the metrics, and :func:`load_run` (config + weights -> model)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaelab.checkpoint import CheckpointError, atomic_write_text, complete_checkpoints, load_checkpoint
from vaelab.config import TrainConfig, build_model


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
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            print(f"skipping a damaged checkpoint: {err}", file=sys.stderr)
    return None


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
        config = TrainConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{config_path} is not a valid vaelab config: {err}") from err
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
        weights, _, meta = load_checkpoint(directory)
        weights_path, step, data_shape = directory / "model.safetensors", meta["step"], meta["data_shape"]
    model = build_model(config, data_shape)
    _check_weights(model, weights, weights_path)
    model.load_state_dict(weights)
    model.to(device).eval()
    metrics_path = run_dir / "metrics.jsonl"
    metrics = (
        [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        if metrics_path.is_file()
        else []
    )
    return Run(run_dir=run_dir, config=config, model=model, metrics=metrics, weights=weights_path, step=step)


def _check_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
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
        return json.loads(shape_file.read_text())
    directory = latest_checkpoint(run_dir)
    if directory is None:
        raise CheckpointError(f"{run_dir}: cannot tell the data shape (no data_shape.json, no checkpoint)")
    return load_checkpoint(directory)[2]["data_shape"]
