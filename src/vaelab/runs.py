"""A run directory read back: the latest checkpoint, the metrics, and :func:`load_run` (config + weights -> model)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaelab.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
)
from vaelab.config import TrainConfig, build_model


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete step checkpoint of a run directory (from latest.json, else the highest step)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    pointer = ckpt_dir / "latest.json"
    if pointer.is_file():
        candidate = ckpt_dir / json.loads(pointer.read_text())["checkpoint"]
        if candidate.is_dir():
            return candidate
    steps = sorted(p for p in ckpt_dir.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and p.is_dir())
    return steps[-1] if steps else None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after ``step`` by a run that died before its next checkpoint."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
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
    model.load_state_dict(weights)
    model.to(device).eval()
    metrics_path = run_dir / "metrics.jsonl"
    metrics = (
        [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        if metrics_path.is_file()
        else []
    )
    return Run(run_dir=run_dir, config=config, model=model, metrics=metrics, weights=weights_path, step=step)


def _data_shape_from_checkpoints(run_dir: Path) -> list[int]:
    shape_file = run_dir / "data_shape.json"
    if shape_file.is_file():
        return json.loads(shape_file.read_text())
    directory = latest_checkpoint(run_dir)
    if directory is None:
        raise CheckpointError(f"{run_dir}: cannot tell the data shape (no data_shape.json, no checkpoint)")
    return load_checkpoint(directory)[2]["data_shape"]
