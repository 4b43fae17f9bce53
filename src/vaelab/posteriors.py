"""Approximate posteriors q(z|x) and the KL pairs torch.distributions does not register.

An encoder network maps x to unconstrained parameters; :class:`DiagonalGaussian` turns those into
``Independent(Normal(loc, scale), 1)`` (batch ``[B]``, event ``[d]``), which samples with ``rsample``
(the reparameterization z = loc + scale * eps).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import (
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    kl_divergence,
    register_kl,
)

from vaelab._math import positive_scale


class DiagonalGaussian(nn.Module):
    """Head mapping encoder outputs ``[B, 2d]`` (loc, raw scale) to q(z|x) = N(loc, diag(scale^2)).

    scale = softplus(raw) + ``min_scale``.
    """

    def __init__(self, min_scale: float = 1e-4):
        super().__init__()
        if not min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {min_scale}")
        self.min_scale = min_scale

    def forward(self, params: torch.Tensor) -> Distribution:
        if params.shape[-1] % 2:
            raise ValueError(
                f"encoder output needs an even last dimension (loc, scale), got shape {tuple(params.shape)}"
            )
        loc, raw_scale = params.chunk(2, dim=-1)
        scale = positive_scale(raw_scale, self.min_scale)
        return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)


def as_multivariate_normal(dist: Distribution) -> MultivariateNormal:
    """A diagonal Gaussian ``Independent(Normal, 1)`` as the equivalent full-covariance ``MultivariateNormal``."""
    if isinstance(dist, MultivariateNormal):
        return dist
    if isinstance(dist, Independent) and isinstance(dist.base_dist, Normal) and dist.reinterpreted_batch_ndims == 1:
        base = dist.base_dist
        return MultivariateNormal(base.loc, scale_tril=torch.diag_embed(base.scale))
    raise NotImplementedError(f"cannot view {type(dist).__name__} as a MultivariateNormal")


@register_kl(Independent, MultivariateNormal)
def _kl_diagonal_full(p: Independent, q: MultivariateNormal) -> torch.Tensor:
    return kl_divergence(as_multivariate_normal(p), q)


@register_kl(MultivariateNormal, Independent)
def _kl_full_diagonal(p: MultivariateNormal, q: Independent) -> torch.Tensor:
    return kl_divergence(p, as_multivariate_normal(q))


def is_factorised_gaussian(dist: Distribution) -> bool:
    """Whether ``dist`` is a diagonal Gaussian over a vector, ``Independent(Normal, 1)``."""
    return isinstance(dist, Independent) and isinstance(dist.base_dist, Normal) and dist.reinterpreted_batch_ndims == 1


def kl_per_dimension(q: Distribution, p: Distribution) -> torch.Tensor:
    """KL(q_j || p_j) for each latent dimension j of two factorised Gaussians, ``[*batch, d]`` (analytic).

    Raises ValueError naming the distribution that is not ``Independent(Normal, 1)``.
    """
    for name, dist in (("q", q), ("p", p)):
        if not is_factorised_gaussian(dist):
            raise ValueError(
                f"the KL per latent dimension needs factorised Gaussians, Independent(Normal, 1); {name} is "
                f"{type(dist).__name__}"
            )
    return kl_divergence(q.base_dist, p.base_dist)  # the prior's [d] broadcasts over the batch


def distribution_mean(dist: Distribution, samples: int = 256) -> torch.Tensor:
    """E[z] of a distribution: exact where torch knows it, else the mean of ``samples`` draws (e.g. hierarchical q)."""
    try:
        return dist.mean
    except NotImplementedError:
        return dist.sample((samples,)).mean(0)


POSTERIORS: dict[str, type[nn.Module]] = {"diagonal-gaussian": DiagonalGaussian}
