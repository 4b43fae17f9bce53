"""Tiny synthetic data, runs and models shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal, constraints

from vaelab.train import Run, TrainConfig, Trainer, load_run


def bars(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` binary 8x8 images ``[n, 1, 8, 8]`` of four classes (a bright band at rows 2c, 2c+1) and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    templates = torch.full((4, 1, 8, 8), 0.05)
    for c in range(4):
        templates[c, 0, 2 * c : 2 * c + 2, :] = 0.95
    return torch.bernoulli(templates[labels], generator=g), labels


def tiny_config(**fields) -> TrainConfig:
    """A config for a few steps of a tiny MLP VAE (hidden [8], d = 2) in a test: ``fields`` override the defaults."""
    defaults = dict(
        latent_dim=2,
        architecture_options={"hidden": [8]},
        batch_size=50,
        max_steps=6,
        validation_size=0,
        eval_k=2,
        eval_examples=20,
        compile=False,
        progress=False,
    )
    return TrainConfig(**{**defaults, **fields})


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


# `vaelab train` flags for a few-second run on :func:`tiny_npy` (eager: a long --max-steps must not turn compiling on)
TINY_TRAIN_FLAGS = [
    "--architecture-options",
    '{"hidden": [16]}',
    "--latent-dim",
    "2",
    "--batch-size",
    "20",
    "--validation-size",
    "40",
    "--eval-k",
    "2",
    "--eval-examples",
    "20",
    "--no-progress",
    "--no-compile",
]


def tiny_npy(path: Path, examples: int = 240) -> Path:
    """The bars as a uint8 ``.npy`` file (0 or 255), a dataset for ``vaelab train --dataset PATH``."""
    import numpy as np

    np.save(path, bars(examples)[0].numpy().astype(np.uint8) * 255)
    return path


class ClassMeanGaussian(nn.Module):
    """A conditional linear-Gaussian model: p(z|y) = N(m_y, I_d), p(x|z) = N(W z + b, s^2 I_D), y one of C classes.

    Exact: p(x|y) = N(W m_y + b, W W^T + s^2 I) and p(z|x, y) = N(S (W^T (x - b) / s^2 + m_y), S) with
    S = (I + W^T W / s^2)^-1. Its encoder is that exact posterior, so the ELBO and every IWAE bound equal log p(x|y)
    for every draw (up to rounding). It asks for the labels as context: ``model.given(y=y)`` is the model p(x, z | y)
    with the usual interface (a prior of batch ``[B]``).
    """

    context = ("y",)
    data_support = constraints.real

    def __init__(self, data_dim: int, latent_dim: int, classes: int, *, seed: int = 0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(data_dim, latent_dim, generator=g, dtype=dtype))
        self.bias = nn.Parameter(torch.randn(data_dim, generator=g, dtype=dtype))
        self.means = nn.Parameter(3 * torch.randn(classes, latent_dim, generator=g, dtype=dtype))
        self.log_scale = nn.Parameter(torch.tensor(-0.5, dtype=dtype))
        self.latent_dim, self.data_shape = latent_dim, torch.Size([data_dim])

    def given(self, y: torch.Tensor) -> _GivenClass:
        return _GivenClass(self, y)

    def log_marginal_exact(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Exact log p(x|y), ``[B]``, in float64."""
        w, b, m, s = (t.detach().double() for t in (self.weight, self.bias, self.means, self.log_scale.exp()))
        noise = (s**2).expand(self.data_shape[0])
        return LowRankMultivariateNormal(m[y] @ w.T + b, w.expand(len(y), -1, -1), noise).log_prob(x.double())

    def sample(self, n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws (x ``[n, D]``, y ``[n]``) with y uniform over the classes."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            y = torch.randint(0, classes, (n,), generator=g)
            z = self.means[y] + torch.randn(n, self.latent_dim, generator=g, dtype=self.weight.dtype)
            noise = torch.randn(n, self.data_shape[0], generator=g, dtype=z.dtype)
            return z @ self.weight.T + self.bias + self.log_scale.exp() * noise, y


class _GivenClass:
    """:class:`ClassMeanGaussian` given the labels ``y [B]``: prior, encode, decode of p(x, z | y)."""

    def __init__(self, model: ClassMeanGaussian, y: torch.Tensor):
        self.model, self.y = model, y
        self.latent_dim, self.data_shape, self.data_support = model.latent_dim, model.data_shape, model.data_support

    @property
    def prior(self):
        loc = self.model.means[self.y]  # (B, d): batch [B]
        return Independent(Normal(loc, torch.ones_like(loc)), 1)

    def encode(self, x: torch.Tensor):
        w, s2 = self.model.weight, self.model.log_scale.exp() ** 2
        precision = torch.eye(self.latent_dim, dtype=w.dtype) + w.T @ w / s2  # (d, d)
        rhs = (x - self.model.bias) @ w / s2 + self.model.means[self.y]  # (B, d)
        loc = torch.linalg.solve(precision, rhs.T).T
        return MultivariateNormal(loc, precision_matrix=precision.expand(len(x), -1, -1))

    def decode(self, z: torch.Tensor):
        loc = z @ self.model.weight.T + self.model.bias  # (*S, D)
        return Independent(Normal(loc, self.model.log_scale.exp().expand_as(loc)), 1)


def tiny_labelled_npz(path: Path, examples: int = 240, test: int = 40) -> Path:
    """The bars and their labels (4 classes) as a ``.npz`` (``x``, ``y``, ``x_test``, ``y_test``; uint8 0 or 255), a
    labelled dataset for ``vaelab train --dataset PATH``."""
    import numpy as np

    x, y = bars(examples + test)
    x = x.numpy().astype(np.uint8) * 255
    np.savez(path, x=x[:examples], y=y[:examples].numpy(), x_test=x[examples:], y_test=y[examples:].numpy())
    return path
