"""Baselines: closed-form models whose held-out log p(x) a deep model of the same data should beat.

:data:`BASELINES` maps a name to a :class:`Baseline`: ``applies_to(model, data)`` says whether its number is
comparable with the model's (None) or why not (a reason), and ``fit_and_score(train_x, test_x, latent_dim)`` fits it
to the training data and scores the test data. ``vaelab eval``, ``report`` and ``compare`` run every baseline of the
registry and write ``"<name>_baseline"``: its result, or ``"not applicable: <reason>"``.

Comparability is decided from the model's decoder distribution, by its ``support``: a density on R^D (``real``,
possibly under ``independent``) is comparable with another density on R^D; a mass function on {0, 1}^D (Bernoulli)
or a density on [0, 1]^D (continuous Bernoulli) is not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vaelab.diagnostics import NotApplicable, PerExample, is_real_support
from vaelab.estimators import data_support
from vaelab.evaluate import summarize
from vaelab.models import LinearGaussian

PPCA_NOTE = (
    "exact log p(x) of probabilistic PCA fitted by maximum likelihood to the flattened continuous training data; "
    "comparable only with models of the same continuous data under normalized densities on R^D (e.g. Gaussian "
    "likelihoods), not with Bernoulli models of binarized data (a mass function on {0,1} vs a density on R^D)"
)


@dataclass(frozen=True)
class Baseline:
    """A registry entry: when the baseline applies, and how it is fitted and scored.

    Attributes:
        applies_to: ``(model, data) -> None`` if the baseline's numbers are comparable with the model's on ``data``
            (``[N, *data_shape]``), else the reason they are not.
        fit_and_score: ``(train_x, test_x, latent_dim) -> dict``: fit on ``train_x``, score ``test_x`` (``[N, ...]``
            each), JSON-ready apart from :class:`~vaelab.diagnostics.PerExample` values.
        description: one line for help texts and reports.
    """

    applies_to: Callable[[Any, torch.Tensor], str | None]
    fit_and_score: Callable[[torch.Tensor, torch.Tensor, int], dict[str, Any]]
    description: str


def density_on_real_space(model, data: torch.Tensor) -> str | None:
    """None if the model's p(x|z) is a density on R^D (so log p(x) is comparable with another one on R^D)."""
    support = data_support(model, data)
    if is_real_support(support):
        return None
    return f"the model's p(x|z) has support {support}, not R^D: its log p(x) is not comparable with a density on R^D"


def ppca(train_x: torch.Tensor, test_x: torch.Tensor, latent_dim: int) -> dict[str, Any]:
    """Exact held-out log p(x) of maximum-likelihood probabilistic PCA (Tipping & Bishop, 1999).

    Fits :meth:`vaelab.models.LinearGaussian.fit_ppca` to the flattened training data in float64 and evaluates the
    exact ``log_marginal_exact`` on the test data: a closed-form floor that a deep model of the same continuous data
    should beat.

    Returns:
        ``test_log_px`` (a :class:`~vaelab.diagnostics.PerExample`), ``train_log_px`` (``{"mean", "sem"}``),
        ``noise_var`` (the fitted sigma^2), ``latent_dim``, ``data_dim``, ``train_examples``, ``examples``, ``note``.
    """
    train = train_x.detach().reshape(len(train_x), -1).to(torch.float64).cpu()
    test = test_x.detach().reshape(len(test_x), -1).to(torch.float64).cpu()
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train and test examples differ in size: {train.shape[1]} vs {test.shape[1]} values")
    model = LinearGaussian.fit_ppca(train, latent_dim)
    with torch.no_grad():
        test_log_px = model.log_marginal_exact(test)
        train_log_px = model.log_marginal_exact(train)
    return {
        "examples": len(test),
        "train_examples": len(train),
        "units": "nats per example",
        "latent_dim": latent_dim,
        "data_dim": int(train.shape[1]),
        "noise_var": model.noise_var.item(),
        "test_log_px": PerExample(test_log_px),
        "train_log_px": summarize(train_log_px),
        "note": PPCA_NOTE,
    }


BASELINES: dict[str, Baseline] = {
    "ppca": Baseline(
        applies_to=density_on_real_space,
        fit_and_score=ppca,
        description="probabilistic PCA with the model's latent size, exact log p(x)",
    ),
}


def run_baselines(model, test_x: torch.Tensor, train_x: Callable[[], torch.Tensor], latent_dim: int) -> dict:
    """Every baseline of :data:`BASELINES` for this model: ``{"<name>_baseline": result or NotApplicable}``.

    ``train_x`` is called (once) only if some baseline applies, so a model none applies to loads no training data.
    """
    results: dict[str, Any] = {}
    train: torch.Tensor | None = None
    for name, baseline in BASELINES.items():
        reason = baseline.applies_to(model, test_x)
        if reason is not None:
            results[f"{name}_baseline"] = NotApplicable(reason)
            continue
        if train is None:
            train = train_x()
        results[f"{name}_baseline"] = baseline.fit_and_score(train, test_x.cpu(), latent_dim)
    return results
