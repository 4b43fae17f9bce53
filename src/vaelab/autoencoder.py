"""The deterministic autoencoder of the ladder (seed 002: PCA, autoencoder, variational autoencoder).

It has the encoder and decoder networks of a VAE run (a fresh model built from the run's config) and is trained on
reconstruction alone: the code of x is E_q[z|x], the encoder's mean, and the loss is -log p(x | z = code(x)), the
decoder's own likelihood at the code (nats per example): no noise, no KL, no prior. So it is a VAE with the KL term
and the sampling of z removed, and the reconstruction errors of the two compare on the same scale.

An autoencoder defines no distribution over x, so it has no log p(x): the ladder shows it without one and says so.
To sample from it, a density is fitted ex post on the codes of the training set, a Gaussian mixture, as in the
regularised autoencoders of Ghosh et al. 2020 ("From variational to deterministic autoencoders", ICLR), and its
draws are decoded. That density is over codes, not images: it gives pictures, never a likelihood.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaelab.evaluate import summarize
from vaelab.posteriors import distribution_mean
from vaelab.progress import progress_bar

NO_LIKELIHOOD = "no p(x): a deterministic autoencoder has no likelihood (its reconstruction error is shown)"


def code(model, x: torch.Tensor) -> torch.Tensor:
    """The deterministic code E_q[z | x] of each example: ``[B, d]`` (the encoder's mean)."""
    return distribution_mean(model.encode(x))


def reconstruction_nll(model, x: torch.Tensor) -> torch.Tensor:
    """-log p(x | z = E_q[z | x]) per example, ``[B]`` nats: the reconstruction error of an autoencoder, and of a
    VAE read as one (decoded at its posterior mean)."""
    return -model.decode(code(model, x)).log_prob(x)


@dataclass
class Autoencoder:
    """A trained autoencoder: ``model`` (the VAE's networks; only ``encode``'s mean and ``decode`` are used),
    ``codes`` (a scikit-learn ``GaussianMixture`` fitted to the training codes), and how it was trained."""

    model: nn.Module
    codes: Any
    steps: int
    seconds: float
    final_loss: float

    @torch.no_grad()
    def sample(self, n: int, *, seed: int = 0) -> torch.Tensor:
        """``n`` images E[x | z], z drawn from the Gaussian mixture on the codes: ``[n, *data_shape]``."""
        self.codes.random_state = seed
        z, _ = self.codes.sample(n)
        weight = next(self.model.parameters())
        return self.model.decode(torch.as_tensor(z, dtype=weight.dtype, device=weight.device)).mean


def fit_autoencoder(
    model: nn.Module,
    train: torch.Tensor,
    *,
    steps: int = 2000,
    batch_size: int = 100,
    lr: float = 1e-3,
    components: int = 10,
    binarize: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> Autoencoder:
    """Train a copy of ``model``'s networks on reconstruction alone, then fit the density of its codes.

    Args:
        model: a freshly built model (e.g. ``build_model(run.config, data_shape)``) with ``encode`` and ``decode``;
            it is copied, never changed.
        train: ``[N, *data_shape]`` training examples, on the device to train on.
        steps: Adam steps of ``batch_size`` examples drawn without replacement, epoch by epoch.
        components: Gaussian-mixture components of the code density (full covariances; 10 as in Ghosh et al.).
        binarize: draw each batch's pixels as Bernoulli(x) (dynamic binarization, as the VAE was trained).
        seed: seeds the batches, the binarization and the mixture.

    Raises:
        ValueError: a model without ``encode``/``decode``, too few examples for a batch or for the mixture, or a
            loss that is not finite.
    """
    from sklearn.mixture import GaussianMixture

    if not (callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))):
        raise ValueError(f"{type(model).__name__} has no encode/decode networks to build an autoencoder from")
    if len(train) < max(batch_size, components):
        raise ValueError(
            f"an autoencoder needs at least {max(batch_size, components)} training examples, got {len(train)}"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    net = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = len(train) // batch_size
    bar = progress_bar(steps, "autoencoder", "step", enabled=progress)
    start, order, loss = time.perf_counter(), None, torch.tensor(math.nan)
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(train), generator=gen)
        rows = order[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size].to(train.device)
        x = train.index_select(0, rows)
        if binarize:
            x = (torch.rand(x.shape, generator=gen).to(x) < x).to(x.dtype)
        loss = reconstruction_nll(net, x).mean()
        if not torch.isfinite(loss):
            raise ValueError(f"the autoencoder's reconstruction loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    net.eval()
    with torch.no_grad():
        codes = torch.cat([code(net, batch) for batch in train.split(1000)]).double().cpu().numpy()
    density = GaussianMixture(components, covariance_type="full", random_state=seed).fit(codes)
    return Autoencoder(net, density, steps, time.perf_counter() - start, loss.item())


def autoencoder_row(
    name: str, run, data, *, steps: int = 2000, seed: int = 0, progress: bool = False
) -> tuple[dict[str, Any], Autoencoder]:
    """The ladder's autoencoder row for a VAE run, and the trained :class:`Autoencoder` (for pictures).

    The run's networks, freshly initialised, are trained on reconstruction alone on ``data.train``
    (:class:`vaelab.baselines.LadderData`, as the ladder's other models see it); on ``data.test`` the row holds the
    reconstruction error -log p(x | E_q[z|x]) of the autoencoder beside the VAE's (``summarize``: mean and standard
    error, nats per example). It has no log p(x), and says so (``not_comparable``)."""
    from vaelab.config import build_model
    from vaelab.train import start_from_data

    weight = next(run.model.parameters())
    shape = (-1, *data.data_shape)
    train = data.train.reshape(shape).to(device=weight.device, dtype=weight.dtype)
    test = data.test.reshape(shape).to(device=weight.device, dtype=weight.dtype)
    torch.manual_seed(seed)
    fresh = build_model(run.config, data.data_shape).to(weight.device)
    start_from_data(fresh, run.config, train)  # as the VAE started: its decoder bias at the data mean
    ae = fit_autoencoder(fresh, train, steps=steps, batch_size=min(100, len(train)), seed=seed, progress=progress)
    with torch.no_grad():
        ours = torch.cat([reconstruction_nll(ae.model, b) for b in test.split(500)])
        theirs = torch.cat([reconstruction_nll(run.model, b) for b in test.split(500)])
    row = {
        "name": f"autoencoder ({Path(name).name})",
        "kind": "autoencoder",
        "space": data.space,
        "split": data.split,
        "not_comparable": NO_LIKELIHOOD,
        "reconstruction": summarize(ours),
        "vae_reconstruction": summarize(theirs),
        "fit_seconds": ae.seconds,
        "detail": {"steps": steps, "code_density": f"Gaussian mixture, {ae.codes.n_components} full components"},
    }
    return row, ae
