"""Priors p(z) over the latent space.

A prior is an ``nn.Module`` whose call returns a ``torch.distributions`` object with batch shape ``[]`` and event
shape ``[d]``; it broadcasts against latent samples of any leading shape (``[K, B, d]``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from vaelab._math import inverse_softplus, positive_scale


class StandardNormal(nn.Module):
    """p(z) = N(0, I_d). Buffers, not parameters: nothing to learn, but it follows the model's device and dtype."""

    def __init__(self, latent_dim: int):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
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
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        if not 0 < min_scale < 1:
            raise ValueError(f"min_scale must be in (0, 1) (the prior starts at scale 1), got {min_scale}")
        self.latent_dim = latent_dim
        self.min_scale = min_scale
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.raw_scale = nn.Parameter(inverse_softplus(torch.full((latent_dim,), 1.0 - min_scale)))

    def forward(self) -> Distribution:
        scale = positive_scale(self.raw_scale, self.min_scale)  # > 0 by construction: no validation pass needed
        return Independent(Normal(self.loc, scale, validate_args=False), 1, validate_args=False)


PRIORS: dict[str, type[nn.Module]] = {
    "standard-normal": StandardNormal,
    "learned-gaussian": LearnedGaussian,
}
