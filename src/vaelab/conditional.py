"""A conditional VAE p(x, z | y) and the generative classifier it gives by Bayes' rule.

The model (Sohn, Lee & Yan, 2015, "Learning structured output representation using deep conditional generative
models"), y one of C classes and onehot(y) its indicator vector:

* p(z|y): N(0, I) for every class (``prior="standard-normal"``, the default), or a learned Gaussian per class
  (``prior="learned-gaussian"``: N(mu_y, diag(sigma_y^2)), each starting at N(0, I));
* p(x|z, y): the likelihood of :data:`~vaelab.likelihoods.LIKELIHOODS` whose parameters the decoder computes from
  [z, onehot(y)];
* q(z|x, y): the posterior head of :data:`~vaelab.posteriors.POSTERIORS` on the encoder's output for
  [flatten(x), onehot(y)].

The networks are the ``mlp`` builder's (:func:`vaelab.nets.mlp_pair`, whose ``context_features`` widens both inputs by
C). The model names ``context = ("y",)``: ``model.given(y=y)`` is p(x, z | y) with the ``prior`` / ``encode`` /
``decode`` interface of :mod:`vaelab.models`, so every estimator, objective and diagnostic gives log p(x|y) unchanged,
and the Trainer and ``vaelab eval`` bind each batch to its labels (:func:`vaelab.models.bind`).

The generative classifier: :func:`generative_log_probs` estimates log p(x, y=c) = log p(x|y=c) + log p(y=c) for every
class with the existing importance-sampled estimator (:func:`vaelab.estimators.log_marginal`, IWAE_k with q(z|x, y=c)
as proposal) on the model bound to y = c. Normalised over c it is p(y|x) (:meth:`ConditionalVAE.classify`); its
logsumexp over c is the marginal log p(x) = log sum_c p(x|c) p(c).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal

from vaelab._math import inverse_softplus, positive_scale
from vaelab.estimators import log_marginal
from vaelab.likelihoods import LIKELIHOODS, Likelihood
from vaelab.models import bind, register_model
from vaelab.nets import ARCHITECTURES, build_pair, takes_option
from vaelab.posteriors import POSTERIORS, DiagonalGaussian
from vaelab.priors import PRIORS

if TYPE_CHECKING:
    from vaelab.config import TrainConfig


class ClassGaussians(nn.Module):
    """p(z|y) = N(mu_y, diag(sigma_y^2)) with a learned mean and scale per class (sigma = softplus(raw) + floor),
    each starting at N(0, I). Called with labels ``y [B]``: batch ``[B]``, event ``[d]``."""

    def __init__(self, latent_dim: int, classes: int, min_scale: float = 1e-3):
        super().__init__()
        if not 0 < min_scale < 1:
            raise ValueError(f"min_scale must be in (0, 1) (the prior starts at scale 1), got {min_scale}")
        self.latent_dim, self.min_scale = latent_dim, min_scale
        self.loc = nn.Parameter(torch.zeros(classes, latent_dim))
        self.raw_scale = nn.Parameter(inverse_softplus(torch.full((classes, latent_dim), 1.0 - min_scale)))

    def forward(self, y: torch.Tensor) -> Distribution:
        scale = positive_scale(self.raw_scale, self.min_scale)  # (C, d)
        return Independent(Normal(self.loc[y], scale[y], validate_args=False), 1, validate_args=False)


class SharedPrior(nn.Module):
    """p(z|y) = p(z) for every y: a prior of :data:`vaelab.priors.PRIORS` (batch ``[]``) expanded to batch ``[B]``."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior
        self.latent_dim = prior.latent_dim

    def forward(self, y: torch.Tensor) -> Distribution:
        return self.prior().expand(y.shape)


# prior name -> p(z|y) builder (latent_dim, classes, **prior_options)
CLASS_PRIORS = {
    "standard-normal": lambda latent_dim, classes, **options: SharedPrior(
        PRIORS["standard-normal"](latent_dim, **options)
    ),
    "learned-gaussian": ClassGaussians,
}


@register_model("cvae")
class ConditionalVAE(nn.Module):
    """p(x, z | y) = p(z|y) p(x|z, y) with q(z|x, y); see the module docstring.

    Args:
        prior: module ``y [B] -> p(z|y)`` (batch ``[B]``, event ``[d]``), e.g. :class:`ClassGaussians`.
        encoder: network ``[B, prod(data_shape) + C] -> [B, 2d]`` (q's parameters, before the posterior head).
        decoder: network ``[N, d + C] -> [N, *data_shape]`` of likelihood parameters.
        likelihood: module turning decoder outputs into p(x|z, y).
        classes: C.
        posterior: head turning encoder outputs into q(z|x, y); default :class:`~vaelab.posteriors.DiagonalGaussian`.
    """

    context = ("y",)

    def __init__(
        self,
        *,
        prior: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood,
        classes: int,
        posterior: nn.Module | None = None,
    ):
        super().__init__()
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise ValueError(f"classes must be an int >= 2, got {classes!r}")
        self.prior_module = prior
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.posterior = posterior if posterior is not None else DiagonalGaussian()
        self.classes = classes
        self.latent_dim = int(prior.latent_dim)
        self.data_shape = likelihood.data_shape
        self.data_support = likelihood.support

    @classmethod
    def from_config(cls, config: TrainConfig, data_shape: Sequence[int]) -> ConditionalVAE:
        """The cVAE ``config`` describes: ``classes``, the ``architecture`` builder (widened by C), ``prior`` as
        p(z|y), ``posterior`` and ``likelihood`` from their registries, for data of shape ``data_shape``."""
        shape, c = tuple(data_shape), config.classes
        likelihood = LIKELIHOODS[config.likelihood](shape, **config.likelihood_options)
        options = {"context_features": c, **config.architecture_options}
        encoder, decoder = build_pair(config.architecture, shape, config.latent_dim, likelihood, **options)
        return cls(
            prior=CLASS_PRIORS[config.prior](config.latent_dim, c, **config.prior_options),
            encoder=encoder,
            decoder=decoder,
            likelihood=likelihood,
            posterior=POSTERIORS[config.posterior](**config.posterior_options),
            classes=c,
        )

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """Refuse a prior with no per-class form, an architecture that cannot take the one-hot label, classes < 2."""
        if config.classes < 2:
            raise ValueError(f"the 'cvae' model needs classes >= 2, got classes={config.classes!r}")
        if config.prior not in CLASS_PRIORS:
            raise ValueError(
                f"the 'cvae' model's p(z|y) is one of {', '.join(CLASS_PRIORS)} (learned-gaussian: one Gaussian per "
                f"class), got prior={config.prior!r}"
            )
        if not takes_option(ARCHITECTURES[config.architecture], "context_features"):
            usable = [name for name, build in ARCHITECTURES.items() if takes_option(build, "context_features")]
            raise ValueError(
                f"the 'cvae' model feeds the one-hot label to its networks, which architecture "
                f"{config.architecture!r} cannot take; choose {' or '.join(usable)}"
            )

    @property
    def output_net(self) -> nn.Module:
        """The network whose last layer produces the likelihood's parameters (started at the data mean)."""
        return self.decoder

    def given(self, y: torch.Tensor) -> GivenLabels:
        """p(x, z | y) for labels ``y [B]`` (integers in 0..classes-1): the estimators' model interface."""
        return GivenLabels(self, y)

    def classify(self, x: torch.Tensor, *, k: int = 10, batch_size: int = 100) -> Categorical:
        """The generative classifier p(y|x) = p(x|y) p(y) / sum_c p(x|c) p(c), each p(x|c) estimated by IWAE_k
        (:func:`generative_log_probs`): batch ``[B]`` over ``classes`` labels."""
        return Categorical(logits=generative_log_probs(self, x, k=k, batch_size=batch_size))


class GivenLabels:
    """:class:`ConditionalVAE` given labels ``y [B]``: ``prior`` (batch ``[B]``, event ``[d]``), ``encode(x)``
    (q(z|x, y), batch ``[B]``) and ``decode(z)`` (p(x|z, y) for ``z [*S, B, d]``): what :func:`vaelab.models.bind`
    returns and every estimator takes. A plain object (its parameters are the model's)."""

    def __init__(self, model: ConditionalVAE, y: torch.Tensor):
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            got = f"{y.dtype} of shape {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must be a 1-D integer tensor of labels, got {got}")
        if not torch.compiler.is_compiling() and len(y) and not bool(((y >= 0) & (y < model.classes)).all()):
            bad = y[(y < 0) | (y >= model.classes)][0].item()
            raise ValueError(f"labels must be in 0..{model.classes - 1} (the model's classes), got {bad}")
        self.model, self.y = model, y
        self.onehot = nn.functional.one_hot(y, model.classes)  # (B, C), int64: cast where used
        self.latent_dim, self.data_shape, self.data_support = model.latent_dim, model.data_shape, model.data_support

    def parameters(self):
        return self.model.parameters()

    @property
    def prior(self) -> Distribution:
        return self.model.prior_module(self.y)

    def encode(self, x: torch.Tensor) -> Distribution:
        inputs = torch.cat([x.flatten(1), self.onehot.to(x.dtype)], dim=1)  # (B, D + C)
        return self.model.posterior(self.model.encoder(inputs))

    def decode(self, z: torch.Tensor) -> Distribution:
        lead = z.shape[:-1]  # (*S, B)
        onehot = self.onehot.to(z.dtype).expand(*lead, -1)  # (*S, B, C)
        params = self.model.decoder(torch.cat([z, onehot], dim=-1).reshape(-1, z.shape[-1] + onehot.shape[-1]))
        return self.model.likelihood(params.reshape(*lead, *self.model.likelihood.params_shape))


# --- the generative classifier ---------------------------------------------------------------------------------------
@dataclass
class ClassLikelihoods:
    """log p(x | y = c) for every example and class, ``[N, C]`` nats, and the standard error of each estimate."""

    value: torch.Tensor
    stderr: torch.Tensor


def class_log_likelihoods(model, x: torch.Tensor, *, k: int, batch_size: int = 100) -> ClassLikelihoods:
    """Estimate log p(x | y = c) for every class c of a model with ``context = ("y",)`` and ``classes``.

    Streams over batches of ``batch_size`` examples and, within each, over the classes: each is
    :func:`vaelab.estimators.log_marginal` (IWAE_k, q(z|x, y=c) as proposal) on ``bind(model, {"y": c})``. Cost:
    ``classes * k`` decoder passes per example.

    Returns:
        :class:`ClassLikelihoods`, ``value`` and ``stderr`` each ``[N, C]``.
    """
    classes = _classes(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    values, stderrs = [], []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        per_class = [
            log_marginal(bind(model, {"y": torch.full((len(xb),), c, device=x.device)}), xb, k=k)
            for c in range(classes)
        ]
        values.append(torch.stack([e.value for e in per_class], dim=-1))  # (B, C)
        stderrs.append(torch.stack([e.stderr for e in per_class], dim=-1))
    return ClassLikelihoods(torch.cat(values), torch.cat(stderrs))


def class_log_prior(model) -> torch.Tensor:
    """log p(y = c), ``[C]``: ``model.class_log_prior`` if the model stores one (class frequencies), else uniform."""
    stored = getattr(model, "class_log_prior", None)
    if stored is not None:
        return torch.as_tensor(stored)
    classes = _classes(model)
    return torch.full((classes,), -math.log(classes), dtype=torch.float64)


def generative_log_probs(model, x: torch.Tensor, *, k: int, batch_size: int = 100) -> torch.Tensor:
    """log p(x, y = c) = log p(x | y = c) + log p(y = c), ``[N, C]`` nats, each log p(x|c) estimated by IWAE_k
    (:func:`class_log_likelihoods`). ``log_softmax(-1)`` of it is log p(y|x) (Bayes' rule), ``logsumexp(-1)`` the
    marginal log p(x)."""
    joint = class_log_likelihoods(model, x, k=k, batch_size=batch_size).value
    return joint + class_log_prior(model).to(joint)


def _classes(model) -> int:
    classes = getattr(model, "classes", None)
    if tuple(getattr(model, "context", ())) != ("y",) or not isinstance(classes, int):
        raise ValueError(
            f"{type(model).__name__} is no model of p(x|y) over classes: it needs context = ('y',) and classes"
        )
    return classes
