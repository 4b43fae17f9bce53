"""Approximate posteriors q(z|x) and the KL pairs torch.distributions does not register.

An encoder network maps x to unconstrained parameters; :class:`DiagonalGaussian` turns those into
``Independent(Normal(loc, scale), 1)`` (batch ``[B]``, event ``[d]``), which samples with ``rsample``
(the reparameterization z = loc + scale * eps). :class:`PlanarFlow` and :class:`InverseAutoregressiveFlow` push that
Gaussian through invertible maps (:mod:`vaelab.flows`), giving a ``TransformedDistribution`` with the same batch,
event, ``rsample`` and ``log_prob`` (exact; the log-determinant of q's own latest sample comes from the transforms'
cache), so the estimators need no change. A head whose parameters depend on d has ``attach(model)``, which the
:class:`~vaelab.models.VAE` calls with itself once built (reading ``model.latent_dim``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import (
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
    kl_divergence,
    register_kl,
)

from vaelab._math import positive_scale
from vaelab.flows import MADE, IAFTransform, PlanarTransform


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


# --- flow posteriors --------------------------------------------------------------------------------------------------
def _check_layers(layers: object) -> int:
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be an integer >= 1, got {layers!r}")
    return layers


class _FlowHead(nn.Module):
    """A diagonal Gaussian from the encoder's output ``[B, 2d]``, pushed through maps built by ``_transforms``."""

    def __init__(self, layers: int, min_scale: float):
        super().__init__()
        self.layers = _check_layers(layers)
        self.base = DiagonalGaussian(min_scale)
        self.latent_dim: int | None = None

    def attach(self, model: nn.Module) -> None:
        """Create the flow's parameters for ``model.latent_dim`` (d)."""
        self.latent_dim = int(model.latent_dim)
        self._build(self.latent_dim)

    def forward(self, params: torch.Tensor) -> Distribution:
        if self.latent_dim is None:
            raise RuntimeError(f"{type(self).__name__} has no parameters yet: attach(model) first (a VAE does)")
        if params.shape[-1] != 2 * self.latent_dim:
            raise ValueError(
                f"{type(self).__name__} for d = {self.latent_dim} needs encoder output [B, {2 * self.latent_dim}], "
                f"got {tuple(params.shape)}"
            )
        base = self.base(params)  # batch [B], event [d]
        return TransformedDistribution(base, self._transforms(params), validate_args=False)


class PlanarFlow(_FlowHead):
    """q(z|x) = f_L o ... o f_1 applied to N(loc, diag(scale^2)), f_l planar maps z + u_l tanh(w_l.z + b_l)
    (Rezende & Mohamed, 2015), amortized as in the paper: each example's (u_l, w_l, b_l) are an affine function of
    the encoder's output ``[B, 2d]`` (:class:`vaelab.flows.PlanarTransform` keeps each map invertible).

    The affine map starts with small weights and biases drawn from N(0, 0.1^2) (torch's global generator), so the
    flow starts near the identity without being exactly it (u = 0 would leave w without gradient).

    Args:
        layers: L, the number of planar maps.
        min_scale: floor of the base Gaussian's scales.
    """

    def __init__(self, layers: int = 4, min_scale: float = 1e-4):
        super().__init__(layers, min_scale)
        self.flow_params: nn.Linear | None = None

    def _build(self, d: int) -> None:
        self.flow_params = nn.Linear(2 * d, self.layers * (2 * d + 1))
        with torch.no_grad():
            self.flow_params.weight.mul_(0.1)
            self.flow_params.bias.normal_(0.0, 0.1)

    def _transforms(self, params: torch.Tensor) -> list[PlanarTransform]:
        d = self.latent_dim
        raw = self.flow_params(params).reshape(*params.shape[:-1], self.layers, 2 * d + 1)  # (B, L, 2d + 1)
        u, w, b = raw[..., :d], raw[..., d : 2 * d], raw[..., 2 * d]  # (B, L, d), (B, L, d), (B, L)
        return [PlanarTransform(u[..., i, :], w[..., i, :], b[..., i]) for i in range(self.layers)]


class InverseAutoregressiveFlow(_FlowHead):
    """q(z|x) = IAF steps applied to N(loc, diag(scale^2)) (Kingma et al., 2016): each step a MADE of z with the
    context h, ``sigma * z + (1 - sigma) * m`` (:class:`vaelab.flows.IAFTransform`), the order reversed between
    steps. The context h is the encoder's output ``[B, 2d]`` (loc and raw scale), as vaelab's encoders output exactly
    that; the paper's encoder emits a separate h.

    Args:
        layers: the number of IAF steps.
        hidden: widths of each MADE's hidden layers (empty: a masked linear map, which makes q a full-covariance
            Gaussian: the exact posterior of a linear-Gaussian model is within reach).
        forget_bias: added to s before the sigmoid.
        min_scale: floor of the base Gaussian's scales.
    """

    def __init__(
        self, layers: int = 2, hidden: Sequence[int] = (64,), forget_bias: float = 1.0, min_scale: float = 1e-4
    ):
        super().__init__(layers, min_scale)
        hidden = tuple(hidden)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in hidden):
            raise ValueError(f"hidden must be a list of integers >= 1, got {list(hidden)!r}")
        self.hidden, self.forget_bias = hidden, float(forget_bias)
        self.mades = nn.ModuleList()

    def _build(self, d: int) -> None:
        self.mades = nn.ModuleList(MADE(d, self.hidden, 2 * d, reverse=bool(i % 2)) for i in range(self.layers))

    def _transforms(self, params: torch.Tensor) -> list[IAFTransform]:
        return [IAFTransform(made, params, self.forget_bias) for made in self.mades]


POSTERIORS: dict[str, type[nn.Module]] = {
    "diagonal-gaussian": DiagonalGaussian,
    "planar": PlanarFlow,
    "iaf": InverseAutoregressiveFlow,
}
