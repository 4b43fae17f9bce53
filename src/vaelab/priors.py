"""Priors p(z) over the latent space.

A prior is an ``nn.Module`` built as ``Prior(latent_dim, **options)`` whose call returns a ``torch.distributions``
object with batch shape ``[]`` and event shape ``[d]``; it broadcasts against latent samples of any leading shape
(``[K, B, d]``). A new prior is one class here, one line in :data:`PRIORS` and one test; a config then selects it with
``prior="name", prior_options={...}`` (the options are checked against the class's keyword parameters).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

from vaelab._math import inverse_softplus, positive_scale
from vaelab.posteriors import is_factorised_gaussian


def _check_latent_dim(latent_dim: int) -> int:
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
    return latent_dim


def _check_min_scale(min_scale: float, what: str) -> float:
    """The floor of a learned scale that starts at 1 (scale = softplus(raw) + floor): in (0, 1)."""
    if not 0 < min_scale < 1:
        raise ValueError(f"min_scale must be in (0, 1) ({what} at scale 1), got {min_scale}")
    return min_scale


class DiagonalGaussianMixture(MixtureSameFamily):
    """sum_c pi_c N(z; mu_c, diag(sigma_c^2)) (batch ``[]``, event ``[d]``): torch's ``MixtureSameFamily`` of
    ``Independent(Normal, 1)`` components, with ``log_prob`` as matrix products.

    torch's ``log_prob`` broadcasts z ``[N, d]`` against every component, building several ``[N, C, d]`` tensors;
    with a VampPrior's C = 500 components and the 5000 samples of an evaluation that is most of the time spent.
    Here the quadratic form is expanded, sum_j (z_j - mu_cj)^2 / sigma_cj^2 = z^2 @ P.T - 2 z @ (mu P).T + sum_j
    mu_cj^2 P_cj with P = sigma^-2, so the only ``[N, C]`` work is two products. The expansion cancels where
    |z| and |mu| are large against sigma (float32 loses 1e-3 nats on a trained VampPrior's components), so it is
    computed in float64 (at least) and returned in the inputs' dtype: within one rounding of the exact value.
    """

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor):
        if loc.dim() != 2:
            raise ValueError(f"loc must be [components, d], got shape {tuple(loc.shape)}")
        gaussians = Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)  # batch [C]
        super().__init__(Categorical(logits=logits, validate_args=False), gaussians, validate_args=False)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        normal = self.component_distribution.base_dist
        out_dtype = torch.promote_types(z.dtype, normal.loc.dtype)
        wide = torch.promote_types(out_dtype, torch.float64)
        loc, scale = normal.loc.to(wide), normal.scale.to(wide)  # [C, d]
        precision = scale.pow(-2)
        flat = z.reshape(-1, z.shape[-1]).to(wide)  # [N, d]
        quad = flat.pow(2) @ precision.T - 2 * (flat @ (loc * precision).T) + (loc.pow(2) * precision).sum(-1)
        log_norm = scale.log().sum(-1) + 0.5 * loc.shape[-1] * math.log(2 * math.pi)  # [C]
        log_weights = torch.log_softmax(self.mixture_distribution.logits.to(wide), -1)
        out = torch.logsumexp(log_weights - log_norm - 0.5 * quad, dim=-1)
        return out.reshape(z.shape[:-1]).to(out_dtype)


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
        return DiagonalGaussianMixture(self.logits, self.loc, scale)  # batch [], event [d]


class VampPrior(nn.Module):
    """The VampPrior (Tomczak & Welling, 2018, "VAE with a VampPrior"): the model's own posterior averaged over K
    learned pseudo-inputs u_k,

        p(z) = (1/K) sum_k q(z | u_k),

    a ``MixtureSameFamily`` with uniform weights whose components are ``model.encode(u)`` (batch ``[K]``, event
    ``[d]``). It approximates the aggregate posterior (1/N) sum_n q(z|x_n), the prior that maximizes the ELBO
    averaged over the data, with K << N "inputs" learned by the ELBO's gradient.

    The prior needs the encoder, which is the model's: :class:`~vaelab.models.VAE` calls :meth:`attach` with itself
    when built. The prior keeps the model's bound ``encode`` as a plain attribute, not a submodule, so the encoder's
    parameters are registered (and saved in a checkpoint) once, under the model; the prior's own state is the
    pseudo-inputs ``[K, *data_shape]``, created at :meth:`attach`, when the data shape is known. The trainer starts them
    at K training examples (:meth:`init_from_data`, when ``init="data"``); until then, and with ``init="random"``,
    they are uniform on [0, 1) (data are intensities in [0, 1]), drawn from torch's global generator.

    The components are evaluated at any z, so q must have a ``log_prob`` for any z broadcast against batch ``[K]``
    (a Gaussian encoder does); no KL to it is registered, so the ELBO's KL term is estimated by Monte Carlo.
    Sampling is not reparameterized.

    Args:
        latent_dim: d.
        pseudo_inputs: K, the number of pseudo-inputs (>= 1; the paper's default is 500).
        init: ``"data"`` (K training examples drawn without replacement, by the trainer) or ``"random"``.
    """

    INITS = ("data", "random")

    def __init__(self, latent_dim: int, pseudo_inputs: int = 500, init: str = "data"):
        super().__init__()
        _check_latent_dim(latent_dim)
        if isinstance(pseudo_inputs, bool) or not isinstance(pseudo_inputs, int) or pseudo_inputs < 1:
            raise ValueError(f"pseudo_inputs must be an integer >= 1, got {pseudo_inputs!r}")
        if init not in self.INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, self.INITS))}; got {init!r}")
        self.latent_dim = latent_dim
        self.components = pseudo_inputs
        self.init = init
        self.pseudo_inputs: nn.Parameter | None = None
        # the model's encode, held outside the module tree: the encoder is registered under the model, once
        object.__setattr__(self, "_encode", None)

    def attach(self, model: nn.Module) -> None:
        """Use ``model.encode`` for the components and create the pseudo-inputs ``[K, *model.data_shape]``."""
        object.__setattr__(self, "_encode", model.encode)
        if self.pseudo_inputs is None or tuple(self.pseudo_inputs.shape[1:]) != tuple(model.data_shape):
            self.pseudo_inputs = nn.Parameter(torch.rand(self.components, *model.data_shape))

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Start the pseudo-inputs at K distinct rows of ``x [N, *data_shape]`` (intensities in [0, 1], or uint8),
        chosen with torch's global generator; rows are reused only when N < K. Nothing happens for ``init="random"``.
        """
        if self.init != "data":
            return
        if self.pseudo_inputs is None:
            raise RuntimeError("VampPrior.init_from_data before attach: the pseudo-inputs do not exist yet")
        from vaelab.data import as_float  # data imports the registries' users: import here, not at module load

        n = x.shape[0]
        rows = torch.cat([torch.randperm(n) for _ in range(-(-self.components // n))])[: self.components]
        chosen = as_float(x[rows.sort().values])  # (K, *data_shape); x may be memory-mapped (vaelab.data.MappedRows)
        self.pseudo_inputs.copy_(chosen.reshape(self.pseudo_inputs.shape))

    def forward(self) -> Distribution:
        if self._encode is None:
            raise RuntimeError(
                "the VampPrior has no encoder: it is a prior of a model with an encoder (a VAE attaches itself)"
            )
        components = self._encode(self.pseudo_inputs)  # batch [K], event [d]
        logits = self.pseudo_inputs.new_zeros(self.components)
        if is_factorised_gaussian(components):
            return DiagonalGaussianMixture(logits, components.base_dist.loc, components.base_dist.scale)
        weights = Categorical(logits=logits, validate_args=False)
        return MixtureSameFamily(weights, components, validate_args=False)  # batch [], event [d]


PRIORS: dict[str, type[nn.Module]] = {
    "standard-normal": StandardNormal,
    "learned-gaussian": LearnedGaussian,
    "mixture-of-gaussians": MixtureOfGaussians,
    "vamp": VampPrior,
}
