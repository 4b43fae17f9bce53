"""Latent-variable models p(x, z) = p(z) p(x|z) behind one interface, and :data:`MODELS`, the registry of them.

Every model exposes

* ``model.prior`` -> Distribution over z: batch ``[]``, event ``[d]``;
* ``model.encode(x)`` -> q(z|x) for ``x: [B, *data_shape]``: batch ``[B]``, event ``[d]``, with ``rsample``;
* ``model.decode(z)`` -> p(x|z) for ``z: [*S, d]``: batch ``S``, event ``data_shape`` (so ``z: [K, B, d]`` works).

The estimators in :mod:`vaelab.estimators` need nothing else: the data shape comes from the data, d from the prior's
event shape, the data's support from the decoder distribution's ``support``. A model may state them
(``model.data_shape``, ``model.latent_dim``, ``model.data_support``): then the estimators check the data against
them without a decoder pass. :class:`LinearGaussian` adds exact ``log p(x)`` and the exact posterior, so every
estimator can be checked against the truth.

To train a model from a :class:`~vaelab.config.TrainConfig` (``model="name"``), register its class with
:func:`register_model`: the class then builds itself with ``from_config(config, data_shape)`` and may refuse a
config it cannot honour with ``check_config(config)`` (called when the config is built). :func:`vaelab.train.train`
also takes a model built by hand (``model=...``).

A model of p(x, z | c) names the batch fields it conditions on in ``context`` (e.g. ``("y",)``) and returns, from
``given(y=...)``, a view with the interface above; :func:`bind` makes that view for a batch, so the estimators never
see the context.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    constraints,
)

from vaelab.likelihoods import LIKELIHOODS, Likelihood
from vaelab.nets import build_pair
from vaelab.posteriors import POSTERIORS, DiagonalGaussian
from vaelab.priors import PRIORS

if TYPE_CHECKING:
    from vaelab.config import TrainConfig

MODELS: dict[str, type[nn.Module]] = {}
"""Model families by name (the config's ``model`` field): classes with ``from_config(config, data_shape)``."""


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: add a model family to :data:`MODELS` under ``name`` (usable from any module).

    The class must have a classmethod ``from_config(config, data_shape) -> model`` (weights freshly initialised); it
    may have a classmethod ``check_config(config)`` raising ``ValueError`` for a config it cannot honour, which
    :meth:`TrainConfig.validate <vaelab.config.TrainConfig.validate>` calls. Registering a second class under a
    taken name is an error.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if not callable(getattr(cls, "from_config", None)):
            raise ValueError(f"{cls.__name__} needs a classmethod from_config(config, data_shape) to be registered")
        if MODELS.get(name, cls) is not cls:
            raise ValueError(f"model name {name!r} is taken by {MODELS[name].__name__}")
        MODELS[name] = cls
        return cls

    return register


def refuse_unused(config: TrainConfig, model: str, unused: Mapping[str, str]) -> None:
    """Raise ``ValueError`` if a config field ``model`` does not use differs from its default.

    Args:
        unused: field name -> why the model does not use it (ends the message).
    """
    defaults = {
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(config)
    }
    for name, why in unused.items():
        value = getattr(config, name)
        if value != defaults[name]:
            raise ValueError(
                f"the {model!r} model does not use {name} ({why}); got {name}={value!r}: leave it at its default "
                f"{defaults[name]!r}"
            )


def bind(model, context: Mapping[str, torch.Tensor] | None = None, rows: slice = slice(None)):
    """The model as the estimators see it on the examples ``rows``: ``model.given(**{key: context[key][rows]})``
    for a model that asks for context (its ``context``, e.g. ``("y",)``: p(x, z | y)), else the model itself.

    Every estimator, objective and diagnostic takes the bound view unchanged: the view has the same ``prior`` /
    ``encode`` / ``decode`` interface, with a prior of batch ``[B]`` (one per example) where the context sets it.

    Raises ValueError, naming the missing keys, when the model asks for context that ``context`` does not hold.
    """
    keys = tuple(getattr(model, "context", ()))
    if not keys:
        return model
    missing = [key for key in keys if context is None or key not in context]
    if missing:
        raise ValueError(
            f"{type(model).__name__} asks for context {', '.join(keys)} (model.context), but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not given: pass context={{{missing[0]!r}: ...}}"
        )
    assert context is not None  # for the type checker: keys were all found in it
    return model.given(**{key: context[key][rows] for key in keys})


@register_model("vae")
class VAE(nn.Module):
    """A deep latent-variable model with an amortized encoder.

    Args:
        prior: module returning p(z) (see :mod:`vaelab.priors`); its ``latent_dim`` fixes d.
        encoder: network ``x [B, *data_shape] -> [B, 2d]`` (parameters of q before the posterior head).
        decoder: network ``z [N, d] -> [N, *data_shape]`` (or ``[N, prod(data_shape)]``) of likelihood parameters.
        likelihood: module turning decoder outputs into p(x|z) (see :mod:`vaelab.likelihoods`).
        posterior: head turning encoder outputs into q(z|x); default :class:`~vaelab.posteriors.DiagonalGaussian`.
    """

    def __init__(
        self,
        *,
        prior: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood,
        posterior: nn.Module | None = None,
    ):
        super().__init__()
        self.prior_module = prior
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.posterior = posterior if posterior is not None else DiagonalGaussian()
        self.latent_dim = int(cast(int, prior.latent_dim))  # every prior module states its d as an int
        self.data_shape = likelihood.data_shape
        self.data_support = likelihood.support
        for part in (self.prior_module, self.posterior):
            # a part sized by d (a flow posterior) or built on the model's own networks (the VampPrior's encoder)
            attach = getattr(part, "attach", None)
            if attach is not None:
                attach(self)

    @classmethod
    def from_config(cls, config: TrainConfig, data_shape: Sequence[int]) -> VAE:
        """The VAE ``config`` describes: each part ``{name, options}`` looked up in its registry
        (:data:`~vaelab.nets.ARCHITECTURES`, :data:`~vaelab.priors.PRIORS`, :data:`~vaelab.posteriors.POSTERIORS`,
        :data:`~vaelab.likelihoods.LIKELIHOODS`), for data of shape ``data_shape``."""
        shape = tuple(data_shape)
        likelihood = LIKELIHOODS[config.likelihood](shape, **config.likelihood_options)
        options = config.architecture_options
        encoder, decoder = build_pair(config.architecture, shape, config.latent_dim, likelihood, **options)
        return cls(
            prior=PRIORS[config.prior](config.latent_dim, **config.prior_options),
            encoder=encoder,
            decoder=decoder,
            likelihood=likelihood,
            posterior=POSTERIORS[config.posterior](**config.posterior_options),
        )

    @property
    def output_net(self) -> nn.Module:
        """The network whose last layer (``output_layer``) produces the likelihood's parameters."""
        return self.decoder

    @property
    def prior(self) -> Distribution:
        return self.prior_module()

    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z|x) for ``x: [B, *data_shape]``: batch ``[B]``, event ``[d]``."""
        return self.posterior(self.encoder(x))

    def decode(self, z: torch.Tensor) -> Distribution:
        """p(x|z) for ``z: [*S, d]``: batch ``S``, event ``data_shape``."""
        lead = z.shape[:-1]
        params = self.decoder(z.reshape(-1, z.shape[-1]))  # (N, ...) with N = prod(lead)
        return self.likelihood(params.reshape(*lead, *self.likelihood.params_shape))


class IllConditionedWarning(UserWarning):
    """A :class:`LinearGaussian` whose closed forms cannot be trusted to 1e-3 relative in its dtype."""


# LinearGaussian warns when condition_number() * eps(dtype) reaches this. Measured on 750 random models (D in {10, 20,
# 50}, d < D, noise scales spread over 4-8 decades), ELBO with the exact posterior against log p(x), both closed
# forms: the worst relative disagreement was ~cond * eps (3e-4 where cond * eps ~ 1e-4, 1e-2 where ~ 1e-3, over 100 %
# from ~0.1). So the warning marks ~1e-4 and worse: cond >= 4.5e11 in float64, >= 840 in float32.
ILL_CONDITIONED = 1e-4


class LinearGaussian(nn.Module):
    """p(z) = N(0, I_d), p(x|z) = N(W z + b, Psi): probabilistic PCA (Psi = sigma^2 I) or factor analysis (diagonal).

    Everything is closed form (Tipping & Bishop, 1999):

    * marginal p(x) = N(b, W W^T + Psi) -- :meth:`log_marginal_exact`;
    * posterior p(z|x) = N(S W^T Psi^-1 (x - b), S) with S = (I + W^T Psi^-1 W)^-1 -- :meth:`posterior`.

    ``encode`` returns the exact posterior, so with this model the ELBO is tight; pass ``q=`` to the estimators to
    study any other q.

    The closed forms lose about log10 of :meth:`condition_number` in significant digits: a model built with
    ``condition_number() * eps(dtype) >= ILL_CONDITIONED`` (1e-4) warns (:class:`IllConditionedWarning`), e.g. a
    float64 model whose (weight / noise scale)^2 reaches ~5e11, or a float32 one at ~840.

    Args:
        weight: ``W``, ``[D, d]``.
        bias: ``b``, ``[D]``.
        noise_var: ``Psi``'s diagonal: a scalar (pPCA) or ``[D]`` (factor analysis); all > 0.
    """

    data_support = constraints.real

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, noise_var: torch.Tensor | float):
        super().__init__()
        weight = torch.as_tensor(weight)
        if weight.ndim != 2:
            raise ValueError(f"weight must be [D, d], got shape {tuple(weight.shape)}")
        data_dim, latent_dim = weight.shape
        bias = torch.as_tensor(bias, dtype=weight.dtype)
        if bias.shape != (data_dim,):
            raise ValueError(f"bias must be [D] = [{data_dim}], got shape {tuple(bias.shape)}")
        noise_var = torch.as_tensor(noise_var, dtype=weight.dtype)
        if noise_var.shape not in ((), (data_dim,)):
            raise ValueError(f"noise_var must be a scalar or [D] = [{data_dim}], got shape {tuple(noise_var.shape)}")
        if not bool((noise_var > 0).all()):
            raise ValueError("noise_var must be > 0")
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.noise_var = nn.Parameter(noise_var.clone())
        self.latent_dim = int(latent_dim)
        self.data_shape = torch.Size([data_dim])
        condition, eps = self.condition_number(), torch.finfo(weight.dtype).eps
        if condition * eps >= ILL_CONDITIONED:
            warnings.warn(
                f"LinearGaussian is ill-conditioned: condition number 1 + ||Psi^-1/2 W||^2 = {condition:.3g} "
                f"(>= {ILL_CONDITIONED:g} / eps of {weight.dtype} = {ILL_CONDITIONED / eps:.3g}); its closed forms "
                f"(log p(x), the posterior) may be off by ~{min(condition * eps, 1.0):.1g} relative: use float64, "
                "a larger noise_var or a smaller weight",
                IllConditionedWarning,
                stacklevel=2,
            )

    # --- the model interface -------------------------------------------------------------------------------------
    @property
    def prior(self) -> Distribution:
        zeros = self.weight.new_zeros(self.latent_dim)
        return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1)

    def decode(self, z: torch.Tensor) -> Distribution:
        """p(x|z) = N(W z + b, Psi) for ``z: [*S, d]``: batch ``S``, event ``[D]``."""
        loc = z @ self.weight.T + self.bias  # (*S, D)
        scale = self._noise_diag().sqrt().expand_as(loc)
        return Independent(Normal(loc, scale, validate_args=False), 1)

    def encode(self, x: torch.Tensor) -> Distribution:
        """The exact posterior p(z|x) (:meth:`posterior`): with this model the ELBO is tight."""
        return self.posterior(x)

    # --- closed forms ----------------------------------------------------------------------------------------------
    def _noise_diag(self) -> torch.Tensor:
        return self.noise_var.expand(self.data_shape[0])

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        """The exact p(z|x): batch ``[B]``, event ``[d]``, built from the Cholesky factor of its covariance.

        S = P^-1 with precision P = I + A^T A, A = Psi^-1/2 W. P is symmetrized before it is factored (a float32
        matmul rounds A^T A asymmetrically); S's lower Cholesky factor comes from the factor of P with rows and
        columns reversed (flip(P) = U U^T gives S = L L^T with L = flip(U)^-T, lower triangular), so the
        distribution is given by ``scale_tril`` and nothing needs re-checking or re-factoring.
        """
        scaled = self.weight / self._noise_diag().sqrt()[:, None]  # A = Psi^-1/2 W, (D, d)
        eye = torch.eye(self.latent_dim, dtype=self.weight.dtype, device=self.weight.device)
        precision = eye + scaled.T @ scaled  # (d, d)
        precision = (precision + precision.T) / 2  # exactly symmetric
        flipped = torch.linalg.cholesky(precision.flip(-2, -1))  # flip(P) = U U^T, U lower
        scale_tril = torch.linalg.solve_triangular(flipped.flip(-2, -1).T, eye, upper=False)  # (d, d), S = L L^T
        rhs = (x - self.bias) @ (scaled / self._noise_diag().sqrt()[:, None])  # (B, d): W^T Psi^-1 (x - b)
        loc = (rhs @ scale_tril) @ scale_tril.T  # S W^T Psi^-1 (x - b), row-wise
        return MultivariateNormal(loc, scale_tril=scale_tril.expand(*loc.shape[:-1], -1, -1))

    def condition_number(self) -> float:
        """1 + ||Psi^-1/2 W||_2^2 = 1 + max (weight / noise scale)^2 direction-wise: the condition number of the
        posterior precision (and, for pPCA, of the marginal covariance W W^T + Psi). The closed forms lose about
        log10 of it in significant digits."""
        with torch.no_grad():
            scaled = self.weight / self._noise_diag().sqrt()[:, None]
            return 1.0 + float(torch.linalg.matrix_norm(scaled.double(), ord=2)) ** 2

    def marginal(self) -> LowRankMultivariateNormal:
        """The exact p(x) = N(b, W W^T + Psi) (event ``[D]``)."""
        return LowRankMultivariateNormal(self.bias, self.weight, self._noise_diag())

    def log_marginal_exact(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) in nats, ``[B]``."""
        return self.marginal().log_prob(x)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of x from the model, ``[n, D]``."""
        with torch.no_grad():  # data, not a function of the parameters
            return self._sample(n, generator)

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=self.weight.dtype, device=self.weight.device)
        eps = torch.randn(n, self.data_shape[0], generator=generator, dtype=z.dtype, device=z.device)
        return z @ self.weight.T + self.bias + eps * self._noise_diag().sqrt()

    # --- constructors ------------------------------------------------------------------------------------------------
    @classmethod
    def random(
        cls,
        data_dim: int,
        latent_dim: int,
        *,
        noise: str = "isotropic",
        noise_scale: float = 0.5,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> LinearGaussian:
        """A random model for tests and checks: W, b ~ N(0, 1); Psi = noise_scale^2 (times U(0.5, 1.5) if diagonal)."""
        weight = torch.randn(data_dim, latent_dim, generator=generator, dtype=dtype)
        bias = torch.randn(data_dim, generator=generator, dtype=dtype)
        if noise == "isotropic":
            noise_var = torch.tensor(noise_scale**2, dtype=dtype)
        elif noise == "diagonal":
            noise_var = noise_scale**2 * (0.5 + torch.rand(data_dim, generator=generator, dtype=dtype))
        else:
            raise ValueError(f"noise must be 'isotropic' or 'diagonal', got {noise!r}")
        return cls(weight, bias, noise_var)

    @classmethod
    def fit_ppca(cls, x: torch.Tensor, latent_dim: int) -> LinearGaussian:
        """Maximum-likelihood probabilistic PCA, in closed form (Tipping & Bishop, 1999, eqs. 7-8).

        With the sample covariance's eigenvalues l_1 >= ... >= l_D and eigenvectors U:
        b = mean(x), sigma^2 = mean(l_{d+1..D}), W = U_d (L_d - sigma^2 I)^{1/2} (up to a rotation).

        Args:
            x: ``[N, D]`` data, N >= 2, D > latent_dim.
        """
        if x.ndim != 2:
            raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
        n, data_dim = x.shape
        if not 1 <= latent_dim < data_dim:
            raise ValueError(f"need 1 <= latent_dim < D = {data_dim}, got latent_dim={latent_dim}")
        if n < 2:
            raise ValueError(f"need at least 2 examples to fit, got {n}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf")
        mean = x.mean(0)
        centered = x - mean
        cov = centered.T @ centered / n  # the ML (biased) covariance
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0), evecs.flip(1)
        noise_var = evals[latent_dim:].mean()
        floor = torch.finfo(x.dtype).eps * evals[0].abs().clamp_min(1.0)
        noise_var = noise_var.clamp_min(floor)
        weight = evecs[:, :latent_dim] * (evals[:latent_dim] - noise_var).clamp_min(0).sqrt()
        return cls(weight, mean, noise_var)


# The families defined in other modules register themselves on import (at the end: they import this module).
import vaelab.classifier  # noqa: E402  ("classifier")
import vaelab.conditional  # noqa: E402  ("cvae")
import vaelab.hierarchical  # noqa: E402  ("iwae-2layer")
import vaelab.semisupervised  # noqa: E402, F401  ("m2")
