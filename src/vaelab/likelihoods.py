"""Observation models p(x|z): turn a decoder's output into a normalized density over x.

A likelihood is an ``nn.Module`` built for one data shape (e.g. ``(1, 28, 28)`` or ``(784,)``). Called on decoder
outputs of shape ``[*batch, *data_shape]`` it returns a distribution with batch shape ``batch`` and event shape
``data_shape``, so ``log_prob(x)`` is the log-density of a whole example in nats.

Each likelihood class carries its own facts, so nothing elsewhere keys on its name:

* ``support`` (a ``torch.distributions.constraints`` object): estimators check data against it once, at their entry,
  rather than on every ``log_prob`` in the hot path;
* ``binary``: the data are 0/1 (training binarizes batches by default, :attr:`vaelab.config.TrainConfig.binarizes`);
* ``density_on_reals``: ``log_prob`` is a density on R^D, comparable with other densities on R^D (e.g. pPCA's);
* :meth:`Likelihood.bias_from_mean`: the decoder output that reproduces a pixel mean, to start the decoder's last
  bias at the data mean (:func:`vaelab.nets.init_decoder_bias`).

A new likelihood is one subclass here, one line in :data:`LIKELIHOODS` and one test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn
from torch.distributions import (
    Bernoulli,
    ContinuousBernoulli,
    Distribution,
    Independent,
    Normal,
    constraints,
)

from vaelab import _fast
from vaelab._math import inverse_softplus, positive_scale


class Likelihood(nn.Module):
    """Base class: holds the data shape; subclasses implement ``forward(params) -> Distribution``.

    Class attributes (override them in a subclass): ``support``, the values x may take; ``binary``, whether the data
    are 0/1; ``density_on_reals``, whether ``log_prob`` is a density on R^D.
    """

    support: ClassVar[constraints.Constraint] = constraints.real
    binary: ClassVar[bool] = False
    density_on_reals: ClassVar[bool] = True

    # mean [*shape] -> the decoder output [*shape] whose distribution has (about) that mean, per value; None: no rule
    # (the decoder's bias is then left as initialised). E.g. the logit for Bernoulli pixels, the mean for Gaussians.
    bias_from_mean: ClassVar[Callable[[torch.Tensor], torch.Tensor] | None] = None

    def __init__(self, data_shape: Sequence[int]):
        super().__init__()
        self.data_shape = torch.Size(data_shape)
        if len(self.data_shape) == 0 or any(n < 1 for n in self.data_shape):
            raise ValueError(f"data_shape must be a non-empty shape of positive sizes, got {tuple(data_shape)}")

    def _independent(self, base: Distribution, kind: type[Independent] = Independent) -> Distribution:
        return kind(base, len(self.data_shape), validate_args=False)


def _clamped_logit(mean: torch.Tensor) -> torch.Tensor:
    """logit(clamp(mean, 1e-3, 1 - 1e-3)): finite for always-off or always-on pixels. ``mean`` must be in [0, 1]."""
    if not bool(((mean >= 0) & (mean <= 1)).all()):
        raise ValueError("a decoder that outputs logits needs a pixel mean in [0, 1]; is the data scaled to [0, 1]?")
    return torch.logit(mean, eps=1e-3)


class BernoulliLikelihood(Likelihood):
    """p(x|z) = prod_i Bernoulli(x_i; sigmoid(logit_i)) for binary data. log_prob is BCE-with-logits (stable).

    The decoder outputs logits; sigmoid(bias) = mean is the maximum-likelihood image-independent start.
    """

    support = constraints.boolean
    binary = True
    density_on_reals = False
    bias_from_mean = staticmethod(_clamped_logit)

    def forward(self, logits: torch.Tensor) -> Distribution:
        # Independent(Bernoulli(logits), n) with a faster compiled log_prob (same values: vaelab._fast)
        return self._independent(Bernoulli(logits=logits, validate_args=False), _fast.IndependentBernoulli)


class StableContinuousBernoulli(ContinuousBernoulli):
    """torch's ContinuousBernoulli with its log-normalizer computed from the logits.

    torch computes log C from probabilities clamped to [eps, 1 - eps], which under-normalizes the density at
    saturated logits (in float32 the density integrates to 0.4 at logit 40). With lambda = sigmoid(L),
    C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda) simplifies to L / tanh(L / 2), even in L, so with a = |L|:

        log C = log a - log(1 - e^-a) + log(1 + e^-a)   (a > 0),     log C -> log 2 + a^2 / 12   (a -> 0).
    """

    def _cont_bern_log_norm(self) -> torch.Tensor:
        a = self.logits.abs()
        small = a < 1e-3
        safe = torch.where(small, torch.ones_like(a), a)
        exact = torch.log(safe) - torch.log(-torch.expm1(-safe)) + torch.log1p(torch.exp(-safe))
        return torch.where(small, math.log(2.0) + a * a / 12.0, exact)


class ContinuousBernoulliLikelihood(Likelihood):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019): a normalized density on [0, 1] per pixel.

    The decoder outputs logits of lambda; lambda = mean is a good start, though not the mean-matching value (the
    distribution's mean is not lambda).
    """

    support = constraints.unit_interval
    density_on_reals = False
    bias_from_mean = staticmethod(_clamped_logit)

    def forward(self, logits: torch.Tensor) -> Distribution:
        return self._independent(StableContinuousBernoulli(logits=logits, validate_args=False))


def _identity(mean: torch.Tensor) -> torch.Tensor:
    return mean


class GaussianLikelihood(Likelihood):
    """p(x|z) = N(x; mean, scale^2 I) with a fixed ``scale`` (in data units). The decoder outputs the mean."""

    bias_from_mean = staticmethod(_identity)

    def __init__(self, data_shape: Sequence[int], scale: float = 1.0):
        super().__init__(data_shape)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)  # a Python float: exact in whatever dtype the decoder runs

    def forward(self, loc: torch.Tensor) -> Distribution:
        return self._independent(Normal(loc, torch.full_like(loc, self.scale), validate_args=False))


class LearnedGaussianLikelihood(Likelihood):
    """p(x|z) = N(x; mean, diag(sigma^2)), sigma learned: one per pixel, or one ``shared`` by all pixels.

    sigma = softplus(raw) + ``min_scale``: the floor stops the density from collapsing onto training pixels
    (an unbounded likelihood otherwise, e.g. on saturated pixels). The decoder outputs the mean.
    """

    bias_from_mean = staticmethod(_identity)

    def __init__(
        self,
        data_shape: Sequence[int],
        *,
        shared: bool = False,
        min_scale: float = 1e-3,
        init_scale: float = 1.0,
    ):
        super().__init__(data_shape)
        if not min_scale > 0 or not init_scale > min_scale:
            raise ValueError(f"need 0 < min_scale < init_scale, got min_scale={min_scale}, init_scale={init_scale}")
        self.min_scale = min_scale
        shape = () if shared else tuple(self.data_shape)
        self.raw_scale = nn.Parameter(inverse_softplus(torch.full(shape, init_scale - min_scale)))

    @property
    def scale(self) -> torch.Tensor:
        return positive_scale(self.raw_scale, self.min_scale)

    def forward(self, loc: torch.Tensor) -> Distribution:
        return self._independent(Normal(loc, self.scale.to(loc.dtype), validate_args=False))


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": BernoulliLikelihood,
    "continuous-bernoulli": ContinuousBernoulliLikelihood,
    "gaussian": GaussianLikelihood,
    "gaussian-learned": LearnedGaussianLikelihood,
}
