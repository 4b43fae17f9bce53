"""The training loop's plumbing: what a run writes as it goes (metrics, TensorBoard), signals, the progress bar."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import torch


class RunLog:
    """``metrics.jsonl`` (one JSON line per train or validation record) and TensorBoard scalars and images of a run
    directory, written by rank 0 only (other ranks get a log that writes nothing)."""

    def __init__(self, run_dir: Path, *, append: bool, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.metrics = open(run_dir / "metrics.jsonl", "a" if append else "w") if enabled else open(os.devnull, "w")
        self._tb = None if enabled else False

    def write(self, line: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(line) + "\n")
        self.metrics.flush()
        writer = self.writer()
        if writer is not None:
            for key, value in line.items():
                if isinstance(value, float) and key not in ("step", "epoch"):
                    writer.add_scalar(f"{line['split']}/{key}", value, line["step"])

    def pictures(self, model, x, seed: int, step: int) -> None:
        """Samples from the prior and reconstructions of ``x`` (a few examples) as image grids in TensorBoard (image
        data only), drawn from a forked RNG seeded ``seed``: training's RNG is never perturbed."""
        writer = self.writer()
        if writer is None:
            return
        from vaelab.data import as_float
        from vaelab.plots import image_grid, reconstruction_pairs, sample_images

        x = as_float(x)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            model.eval()
            samples, pairs = sample_images(model, 16), reconstruction_pairs(model, x)
            model.train()
        try:
            for tag, images in (("samples", samples), ("reconstructions", pairs)):
                writer.add_image(tag, image_grid(images, tuple(x.shape[1:]), ncol=8), step, dataformats="HWC")
        except ValueError:  # data that are not images
            pass

    def writer(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a stripped install still trains
                self._tb = False
                return None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._tb or None

    def close(self) -> None:
        self.metrics.close()
        if self._tb:
            self._tb.close()


def install_signal_handlers(handler):
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals cannot be caught here
        pass
    return previous


def restore_signal_handlers(previous) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def progress_bar(total: int, initial: int, *, enabled: bool):
    """The training bar (:func:`vaelab.progress.progress_bar`: one plain line per 30 s when stderr is a file)."""
    from vaelab.progress import progress_bar as bar

    made = bar(total, "train", "step", enabled=enabled, initial=initial)
    return _NoBar() if made is None else made
