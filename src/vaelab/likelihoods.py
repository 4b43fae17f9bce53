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
  bias at the data mean (:func:`vaelab.nets.init_decoder_bias`);
* ``params_per_value`` and :attr:`Likelihood.params_shape`: how many numbers the decoder outputs per data value (1
  for all but the mixture of discretized logistics, which takes 3K), so a decoder emits ``params_shape``: the data
  shape with its first (channel) size multiplied by ``params_per_value``. The architecture builders take it as their
  ``params_shape`` option (:func:`vaelab.nets.build_pair`).

A new likelihood is one subclass here, one line in :data:`LIKELIHOODS` and one test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import (
    Bernoulli,
    Categorical,
    ContinuousBernoulli,
    Distribution,
    Independent,
    MixtureSameFamily,
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

    # mean [C, *rest] -> the decoder output [params_per_value * C, *rest] whose distribution has (about) that mean;
    # None: no rule (the decoder's bias is then left as initialised). E.g. the logit for Bernoulli pixels, the mean for
    # Gaussians.
    bias_from_mean: ClassVar[Callable[[torch.Tensor], torch.Tensor] | None] = None

    # numbers the decoder outputs per data value (an instance may set its own, e.g. from a number of components)
    params_per_value: int = 1

    def __init__(self, data_shape: Sequence[int]):
        super().__init__()
        self.data_shape = torch.Size(data_shape)
        if len(self.data_shape) == 0 or any(n < 1 for n in self.data_shape):
            raise ValueError(f"data_shape must be a non-empty shape of positive sizes, got {tuple(data_shape)}")

    @property
    def params_shape(self) -> torch.Size:
        """The decoder's output for one example: ``data_shape`` with its first size times ``params_per_value``
        (for images ``(C, H, W)``, ``params_per_value * C`` channels, the values of one parameter for all channels
        next to each other)."""
        first, *rest = self.data_shape
        return torch.Size([self.params_per_value * first, *rest])

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


class LearnedScale(Likelihood):
    """A likelihood with a learned scale sigma = softplus(raw) + ``min_scale``, one per value or one ``shared`` by all,
    starting at ``init_scale``: the floor stops the density collapsing onto training values. Subclasses state their
    defaults in their own ``__init__`` (the config checks options against it) and build the distribution."""

    def __init__(self, data_shape: Sequence[int], *, shared: bool, min_scale: float, init_scale: float):
        super().__init__(data_shape)
        if not min_scale > 0 or not init_scale > min_scale:
            raise ValueError(f"need 0 < min_scale < init_scale, got min_scale={min_scale}, init_scale={init_scale}")
        self.min_scale = min_scale
        shape = () if shared else tuple(self.data_shape)
        self.raw_scale = nn.Parameter(inverse_softplus(torch.full(shape, init_scale - min_scale)))

    @property
    def scale(self) -> torch.Tensor:
        return positive_scale(self.raw_scale, self.min_scale)


class LearnedGaussianLikelihood(LearnedScale):
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
        super().__init__(data_shape, shared=shared, min_scale=min_scale, init_scale=init_scale)

    def forward(self, loc: torch.Tensor) -> Distribution:
        return self._independent(Normal(loc, self.scale.to(loc.dtype), validate_args=False))


# --- 8-bit pixels -----------------------------------------------------------------------------------------------------
LEVELS = 256  # the values an 8-bit pixel takes: 0, 1, ..., 255, which vaelab's data hold as k / 255 in [0, 1]


class _EightBit(constraints.Constraint):
    """Intensities of 8-bit pixels: k / 255 for an integer k in 0..255 (up to the rounding of k / 255 in float32)."""

    is_discrete = True
    event_dim = 0
    excludes_non_finite = True  # check() is False for NaN and +-inf (vaelab.estimators.check_values relies on it)

    def check(self, value: torch.Tensor) -> torch.Tensor:
        levels = value * (LEVELS - 1)
        return (value >= 0) & (value <= 1) & ((levels - levels.round()).abs() <= 1e-3)

    def __repr__(self) -> str:
        return "EightBit(k / 255, k = 0..255)"


eight_bit = _EightBit()


def bits_per_dim(log_px: torch.Tensor | float, data_dim: int) -> torch.Tensor | float:
    """-log P(x) / (D ln 2): bits per dimension of 8-bit data x (D values) under a probability mass P over the 256^D
    images (a likelihood whose support is :data:`eight_bit`); raw 8-bit storage is 8."""
    return -log_px / (data_dim * math.log(2))


class DiscretizedLogistic(Distribution):
    """P(x) for an 8-bit pixel x = k / 255: the mass a logistic(loc, scale) puts on the bin [x - 1/510, x + 1/510],
    the bins of 0 and 1 extended to -inf and +inf, so the 256 masses sum to 1 (Salimans, Karpathy, Chen & Kingma,
    2017, "PixelCNN++"; Kingma et al., 2016, "Improved variational inference with inverse autoregressive flow").

    With a = (x + h - loc) / scale, b = (x - h - loc) / scale and h = 1/510 (half a bin):

        log P(x) = log sigma(a) + log sigma(-b) + log(1 - e^-(a - b))   (0 < k < 255),
        log P(0) = log sigma(a),   log P(1) = log sigma(-b),

    the first from sigma(a) - sigma(b) = sigma(a) sigma(-b) (1 - e^-(a - b)): every term stays finite and accurate
    in the tails, where sigma(a) - sigma(b) would cancel to 0 (a - b = 1 / (255 scale) > 0 is the same for every
    bin). ``log_prob`` rounds x to its level k = round(255 x) and evaluates the bin of k / 255.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    support = eight_bit
    has_rsample = False

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args: bool | None = None):
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return DiscretizedLogistic(self.loc.expand(batch_shape), self.scale.expand(batch_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        level = torch.round(value * (LEVELS - 1))  # k, as a float
        centre = level / (LEVELS - 1) - self.loc
        half = 0.5 / (LEVELS - 1)
        upper = (centre + half) / self.scale  # a
        lower = (centre - half) / self.scale  # b
        log_upper, log_above_lower = F.logsigmoid(upper), F.logsigmoid(-lower)  # log sigma(a), log(1 - sigma(b))
        width = torch.log(-torch.expm1(-1.0 / ((LEVELS - 1) * self.scale)))  # log(1 - e^-(a - b))
        interior = log_upper + log_above_lower + width
        return torch.where(level <= 0, log_upper, torch.where(level >= LEVELS - 1, log_above_lower, interior))

    def sample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
            x = self.loc + self.scale * (torch.log(u) - torch.log1p(-u))  # a logistic draw
            return torch.round(x.clamp(0, 1) * (LEVELS - 1)) / (LEVELS - 1)  # its bin's level

    @property
    def mean(self) -> torch.Tensor:
        """sum_k (k / 255) P(k / 255), exact: as (1 / 255) sum_{k=1}^{255} P(x >= k / 255), where
        P(x >= k / 255) = sigma((loc - (k - 1/2) / 255) / scale), one sigmoid per level accumulated in place (the 256
        masses are never held at once: a batch of images under a mixture would need 256 copies of its parameters)."""
        total = torch.zeros_like(self.loc)
        for k in range(1, LEVELS):
            total += torch.sigmoid((self.loc - (k - 0.5) / (LEVELS - 1)) / self.scale)
        return total / (LEVELS - 1)

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        levels = torch.arange(LEVELS, dtype=self.loc.dtype, device=self.loc.device) / (LEVELS - 1)
        levels = levels.reshape(-1, *([1] * self.loc.ndim))
        return levels.expand(-1, *self.batch_shape) if expand else levels


class DiscretizedLogisticLikelihood(LearnedScale):
    """p(x|z) = prod_i DiscretizedLogistic(x_i; loc_i, scale) for 8-bit images held as k / 255 in [0, 1]: a
    probability mass over the 256^D images, so ``log_prob`` is log P(x) in nats and -log P(x) / (D ln 2) is bits
    per dimension (:meth:`bits_per_dim`) with no dequantization offset.

    The decoder outputs loc (data units; the bias starts at the data mean). The scale is learned, one per pixel or
    one ``shared`` by all pixels: scale = softplus(raw) + ``min_scale``; being a mass, P(x) <= 1 however small the
    scale, so the floor is for the gradients' sake only.

    For a mixture of several logistics per value, see :class:`DiscretizedLogisticMixtureLikelihood`.

    Training keeps the 8-bit values (``binarize`` off by default, as for every non-binary likelihood); data must be
    on the grid k / 255 (uint8 sources are, divided by 255 in :func:`vaelab.data.as_float`).
    """

    support = eight_bit
    density_on_reals = False
    bias_from_mean = staticmethod(_identity)
    bits_per_dim = staticmethod(bits_per_dim)

    def __init__(
        self,
        data_shape: Sequence[int],
        *,
        shared: bool = False,
        min_scale: float = 1e-4,
        init_scale: float = 0.1,
    ):
        super().__init__(data_shape, shared=shared, min_scale=min_scale, init_scale=init_scale)

    def forward(self, loc: torch.Tensor) -> Distribution:
        return self._independent(DiscretizedLogistic(loc, self.scale.to(loc.dtype), validate_args=False))


class DiscretizedLogisticMixtureLikelihood(Likelihood):
    """p(x|z) = prod_i sum_k pi_ik DiscretizedLogistic(x_i; loc_ik, scale_ik): a mixture of K discretized logistics
    per value (Salimans, Karpathy, Chen & Kingma, 2017, "PixelCNN++"), for 8-bit images held as k / 255.

    The decoder outputs ``3 K`` numbers per value (``params_per_value``; the builders size it from
    :attr:`~Likelihood.params_shape`): K mixture logits, K locations (data units), K raw scales with scale =
    softplus(raw) + ``min_scale``, each one set of K for all channels in turn. A torch ``MixtureSameFamily`` of
    :class:`DiscretizedLogistic` components does the rest (log-sum-exp over components, exact draws), so the
    masses of a value's 256 levels sum to 1 as they do for one logistic.

    Unlike PixelCNN++, the channels of a pixel are independent given z: PixelCNN++ couples R, G and B of a pixel
    by linear terms in its autoregressive decoder; a VAE's decoder sees only z, and its mixture already makes a
    value's distribution multimodal. At the start (``bias_from_mean``) the components have equal weights, the
    location at the data mean and the scale ``init_scale``; the decoder's random weights tell them apart.
    """

    support = eight_bit
    density_on_reals = False

    def __init__(
        self,
        data_shape: Sequence[int],
        *,
        components: int = 5,
        min_scale: float = 1e-3,
        init_scale: float = 0.1,
    ):
        super().__init__(data_shape)
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be an int >= 1, got {components!r}")
        if not 0 < min_scale < init_scale:
            raise ValueError(f"need 0 < min_scale < init_scale, got min_scale={min_scale}, init_scale={init_scale}")
        self.components, self.min_scale, self.init_scale = components, min_scale, init_scale
        self.params_per_value = 3 * components

    def bias_from_mean(self, mean: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``mean [C, *rest] -> [3 K C, *rest]``: logits 0, every location at the mean, every scale ``init_scale``."""
        raw = inverse_softplus(torch.tensor(self.init_scale - self.min_scale, dtype=mean.dtype, device=mean.device))
        groups = torch.stack([torch.zeros_like(mean), mean, raw.expand_as(mean)])  # (3, C, *rest)
        return groups.unsqueeze(1).expand(3, self.components, *mean.shape).reshape(-1, *mean.shape[1:])

    def forward(self, params: torch.Tensor) -> Distribution:
        at = params.ndim - len(self.data_shape)  # where params_shape starts
        if at < 0 or params.shape[at:] != self.params_shape:
            raise ValueError(
                f"a mixture of {self.components} discretized logistics takes decoder outputs [*batch, "
                f"{', '.join(map(str, self.params_shape))}] (3 K per value), got {tuple(params.shape)}"
            )
        # [*lead, 3 K C, *rest] -> [*lead, 3, K, C, *rest] -> three [*lead, C, *rest, K]
        logits, loc, raw = params.unflatten(at, (3, self.components, -1)).movedim(at + 1, -1).unbind(at)
        components = DiscretizedLogistic(loc, positive_scale(raw, self.min_scale), validate_args=False)
        mixture = MixtureSameFamily(Categorical(logits=logits, validate_args=False), components, validate_args=False)
        return self._independent(mixture)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": BernoulliLikelihood,
    "continuous-bernoulli": ContinuousBernoulliLikelihood,
    "gaussian": GaussianLikelihood,
    "gaussian-learned": LearnedGaussianLikelihood,
    "discretized-logistic": DiscretizedLogisticLikelihood,
    "discretized-logistic-mixture": DiscretizedLogisticMixtureLikelihood,
}
