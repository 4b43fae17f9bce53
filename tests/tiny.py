"""Tiny synthetic data and runs shared by the picture and report tests."""

from __future__ import annotations

from pathlib import Path

import torch

from vaelab.train import Run, TrainConfig, Trainer, load_run


def bars(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` binary 8x8 images ``[n, 1, 8, 8]`` of four classes (a bright band at rows 2c, 2c+1) and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    templates = torch.full((4, 1, 8, 8), 0.05)
    for c in range(4):
        templates[c, 0, 2 * c : 2 * c + 2, :] = 0.95
    return torch.bernoulli(templates[labels], generator=g), labels


def tiny_run(
    run_dir: Path,
    *,
    latent_dim: int = 2,
    steps: int = 50,
    examples: int = 240,
    dataset: str = "synthetic",
    data_dir: str | None = None,
) -> Run:
    """A tiny MLP VAE trained on the bars for ``steps`` steps (seconds on one thread), loaded back from disk."""
    x, _ = bars(examples)
    config = TrainConfig(
        dataset=dataset,
        data_dir=data_dir,
        latent_dim=latent_dim,
        architecture_options={"hidden": [32]},
        batch_size=20,
        max_steps=steps,
        epochs=5,
        log_every=10,
        eval_every=steps // 2,
        eval_k=10,
        eval_examples=40,
        validation_size=0,
        progress=False,
    )
    valid = examples // 6
    Trainer(config, x[:-valid], x[-valid:], run_dir).fit()
    return load_run(run_dir)
