"""Priors p(z) over the latent space.

A prior is an ``nn.Module`` built as ``Prior(latent_dim, **options)`` whose call returns a ``torch.distributions``
object with batch shape ``[]`` and event shape ``[d]``; it broadcasts against latent samples of any leading shape
(``[K, B, d]``). A new prior is one class here, one line in :data:`PRIORS` and one test; a config then selects it with
``prior="name", prior_options={...}`` (the options are checked against the class's keyword parameters).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

from vaelab._math import inverse_softplus, positive_scale


def _check_latent_dim(latent_dim: int) -> int:
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
    return latent_dim


def _check_min_scale(min_scale: float, what: str) -> float:
    """The floor of a learned scale that starts at 1 (scale = softplus(raw) + floor): in (0, 1)."""
    if not 0 < min_scale < 1:
        raise ValueError(f"min_scale must be in (0, 1) ({what} at scale 1), got {min_scale}")
    return min_scale


class StandardNormal(nn.Module):
    """p(z) = N(0, I_d). Buffers, not parameters: nothing to learn, but it follows the model's device and dtype."""

    def __init__(self, latent_dim: int):
        super().__init__()
        _check_latent_dim(latent_dim)
        self.latent_dim = latent_dim
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> Distribution:
        return Independent(Normal(self.loc, self.scale, validate_args=False), 1, validate_args=False)


class LearnedGaussian(nn.Module):
    """p(z) = N(mu, diag(sigma^2)) with learnable mu and sigma (sigma = softplus(raw) + floor).

    Among all densities on R^d with a given mean and covariance, the Gaussian has the largest differential entropy,
    so it is the least committal prior once the first two moments are fixed (see docs/theory.md). Initialised at
    N(0, I).
    """

    def __init__(self, latent_dim: int, min_scale: float = 1e-3):
        super().__init__()
        _check_latent_dim(latent_dim)
        _check_min_scale(min_scale, "the prior starts")
        self.latent_dim = latent_dim
        self.min_scale = min_scale
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.raw_scale = nn.Parameter(inverse_softplus(torch.full((latent_dim,), 1.0 - min_scale)))

    def forward(self) -> Distribution:
        scale = positive_scale(self.raw_scale, self.min_scale)  # > 0 by construction: no validation pass needed
        return Independent(Normal(self.loc, scale, validate_args=False), 1, validate_args=False)


class MixtureOfGaussians(nn.Module):
    """p(z) = sum_c pi_c N(z; mu_c, diag(sigma_c^2)), with learned weights pi = softmax(logits), means and scales.

    A multimodal prior that the aggregate posterior can match more closely than one Gaussian (e.g. the VampPrior
    argument, Tomczak & Welling, 2018). No KL to a Gaussian q is registered, so the ELBO's KL term is estimated by
    Monte Carlo (``log q(z) - log p(z)`` on the same samples); sampling is not reparameterized (the estimators draw
    from the prior only for naive Monte Carlo, which needs no gradients). Initialised with equal weights, scales 1
    and means drawn from N(0, ``init_spread``^2 I) (from torch's global generator: seed it for a reproducible start),
    so that the components differ.

    Args:
        latent_dim: d.
        components: C, the number of Gaussians (>= 1).
        init_spread: standard deviation of the initial means.
        min_scale: floor of every sigma (sigma = softplus(raw) + min_scale), in (0, 1).
    """

    def __init__(self, latent_dim: int, components: int = 10, init_spread: float = 1.0, min_scale: float = 1e-3):
        super().__init__()
        _check_latent_dim(latent_dim)
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be an integer >= 1, got {components!r}")
        if not init_spread >= 0:
            raise ValueError(f"init_spread must be >= 0, got {init_spread}")
        _check_min_scale(min_scale, "the components start")
        self.latent_dim = latent_dim
        self.min_scale = min_scale
        self.logits = nn.Parameter(torch.zeros(components))
        self.loc = nn.Parameter(init_spread * torch.randn(components, latent_dim))
        self.raw_scale = nn.Parameter(inverse_softplus(torch.full((components, latent_dim), 1.0 - min_scale)))

    def forward(self) -> Distribution:
        scale = positive_scale(self.raw_scale, self.min_scale)  # (C, d)
        gaussians = Independent(Normal(self.loc, scale, validate_args=False), 1, validate_args=False)  # batch [C]
        weights = Categorical(logits=self.logits, validate_args=False)
        return MixtureSameFamily(weights, gaussians, validate_args=False)  # batch [], event [d]


PRIORS: dict[str, type[nn.Module]] = {
    "standard-normal": StandardNormal,
    "learned-gaussian": LearnedGaussian,
    "mixture-of-gaussians": MixtureOfGaussians,
}
