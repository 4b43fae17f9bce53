"""A VAE with two stochastic layers, behind the same interface as :class:`vaelab.models.VAE`.

The generative model and the inference model are chains (Burda, Grosse & Salakhutdinov, 2016, sec. 5):

    p(x, z1, z2) = p(z2) p(z1 | z2) p(x | z1),   p(z2) = N(0, I),
    q(z1, z2 | x) = q(z1 | x) q(z2 | z1),

with Gaussian conditionals of diagonal covariance. The estimators see one latent vector z = concat(z1, z2) (last
dim ``d1 + d2``) and the joint densities p(z) = p(z2) p(z1|z2) and q(z|x) = q(z1|x) q(z2|z1), so every bound of
:mod:`vaelab.estimators` is a bound on log p(x) of the whole hierarchy. Neither joint has a closed-form entropy nor a
registered KL: the estimators fall back to Monte Carlo (log q(z) - log p(z) on the same samples).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, constraints

from vaelab.likelihoods import LIKELIHOODS, Likelihood
from vaelab.models import refuse_unused, register_model
from vaelab.nets import iwae_2layer_nets
from vaelab.posteriors import DiagonalGaussian

if TYPE_CHECKING:
    from vaelab.config import TrainConfig

NET_NAMES: tuple[str, ...] = ("q_z1_x", "q_z2_z1", "p_z1_z2", "p_x_z1")
"""The four networks of a :class:`HierarchicalVAE`, as in :func:`vaelab.nets.iwae_2layer_nets`."""

Conditional = Callable[[torch.Tensor], Distribution]


class TwoLayerChain(Distribution):
    """A joint over z = concat(z1, z2) factored as root(r) * conditional(c | r), one layer the root.

    Sampling is ancestral: r ~ root, then c ~ conditional(r); both reparameterized, so ``rsample`` carries gradients
    to the parameters of both factors. ``log_prob(z) = root.log_prob(r) + conditional(r).log_prob(c)`` for
    ``z: [*S, *batch, d1 + d2]`` (or anything broadcasting with the batch shape), returning ``[*S, *batch]``.

    Args:
        root: the first-sampled layer's distribution (batch ``batch_shape``, event ``[d_root]``).
        conditional: ``r [*S, d_root] -> Distribution`` with batch ``S``, event ``[d_child]``, for any leading ``S``.
        latent_dims: ``(d1, d2)``.
        root_layer: 0 if the root is z1 (inference chain), 1 if it is z2 (generative chain).
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}  # no parameters to validate
    support = constraints.independent(constraints.real, 1)
    has_rsample = True

    def __init__(
        self,
        root: Distribution,
        conditional: Conditional,
        latent_dims: tuple[int, int],
        root_layer: int,
        validate_args: bool | None = None,
    ):
        if root_layer not in (0, 1):
            raise ValueError(f"root_layer must be 0 (z1) or 1 (z2), got {root_layer!r}")
        if tuple(root.event_shape) != (latent_dims[root_layer],):
            raise ValueError(
                f"root must have event shape [{latent_dims[root_layer]}] (layer z{root_layer + 1}), "
                f"got {list(root.event_shape)}"
            )
        self.root = root
        self.conditional = conditional
        self.latent_dims = latent_dims
        self.root_layer = root_layer
        super().__init__(root.batch_shape, torch.Size([sum(latent_dims)]), validate_args=validate_args)

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [..., d1 + d2] -> (root layer, child layer)."""
        layers = z.split(self.latent_dims, dim=-1)  # (z1, z2)
        return layers[self.root_layer], layers[1 - self.root_layer]

    def _join(self, root: torch.Tensor, child: torch.Tensor) -> torch.Tensor:
        layers = (root, child) if self.root_layer == 0 else (child, root)
        return torch.cat(layers, dim=-1)  # concat(z1, z2)

    def rsample(self, sample_shape: Sequence[int] = torch.Size()) -> torch.Tensor:
        root = self.root.rsample(torch.Size(sample_shape))  # (*S, *batch, d_root)
        child = self.conditional(root).rsample()  # (*S, *batch, d_child)
        return self._join(root, child)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        root, child = self._split(value)
        return self.root.log_prob(root) + self.conditional(root).log_prob(child)

    def entropy(self) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form entropy; estimate it as -E[log_prob(z)] by Monte Carlo"
        )

    def expand(self, batch_shape: Sequence[int], _instance: TwoLayerChain | None = None) -> TwoLayerChain:
        """The same chain with batch shape ``batch_shape``: only the root expands (the conditional maps any shape)."""
        new = self._get_checked_instance(TwoLayerChain, _instance)
        batch_shape = torch.Size(batch_shape)
        new.root = self.root.expand(batch_shape)
        new.conditional = self.conditional
        new.latent_dims = self.latent_dims
        new.root_layer = self.root_layer
        super(TwoLayerChain, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def __repr__(self) -> str:
        d1, d2 = self.latent_dims
        order = "z1 -> z2" if self.root_layer == 0 else "z2 -> z1"
        return f"{type(self).__name__}(batch_shape={list(self.batch_shape)}, z1={d1}, z2={d2}, sampled {order})"


@register_model("iwae-2layer")
class HierarchicalVAE(nn.Module):
    """Two stochastic layers z1 (``d1``), z2 (``d2``); the latent vector the estimators see is concat(z1, z2).

    * ``prior``: p(z) = N(z2; 0, I) p(z1 | z2): batch ``[]``, event ``[d1 + d2]``, sampled ancestrally;
    * ``encode(x)``: q(z|x) = q(z1 | x) q(z2 | z1): batch ``[B]``, event ``[d1 + d2]``, reparameterized;
    * ``decode(z)``: p(x | z1) for ``z: [*S, d1 + d2]`` (z2 is ignored: x depends on z2 only through z1).

    Each Gaussian conditional is a :class:`~vaelab.posteriors.DiagonalGaussian` head on a network's output
    ``[N, 2 * size]`` (loc, raw scale; scale = softplus(raw) + 1e-4). Networks are called on ``[N, features]``
    tensors; extra leading dims are flattened first, as :meth:`vaelab.models.VAE.decode` does.

    Args:
        nets: the four networks, keyed as in :data:`NET_NAMES`:
            ``"q_z1_x"``  ``x [B, *data_shape] -> [B, 2 d1]``;  ``"q_z2_z1"`` ``z1 [N, d1] -> [N, 2 d2]``;
            ``"p_z1_z2"`` ``z2 [N, d2] -> [N, 2 d1]``;          ``"p_x_z1"``  ``z1 [N, d1] -> [N, *data_shape]``
            (or ``[N, prod(data_shape)]``) likelihood parameters.
        likelihood: turns ``p_x_z1``'s outputs into p(x | z1) (see :mod:`vaelab.likelihoods`).
        latent_dims: ``(d1, d2)``, the sizes of z1 and z2.
    """

    def __init__(self, nets: Mapping[str, nn.Module], likelihood: Likelihood, latent_dims: Sequence[int] = (100, 50)):
        super().__init__()
        if not isinstance(nets, nn.ModuleDict | Mapping) or not all(isinstance(n, nn.Module) for n in nets.values()):
            raise ValueError(f"nets must map names to nn.Modules, got {type(nets).__name__}")
        if set(nets) != set(NET_NAMES):
            raise ValueError(
                f"nets must have exactly the keys {list(NET_NAMES)}; "
                f"missing {sorted(set(NET_NAMES) - set(nets))}, unexpected {sorted(set(nets) - set(NET_NAMES))}"
            )
        if not isinstance(likelihood, Likelihood):
            raise ValueError(f"likelihood must be a vaelab.likelihoods.Likelihood, got {type(likelihood).__name__}")
        dims = tuple(latent_dims)
        if len(dims) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            raise ValueError(f"latent_dims must be two ints >= 1, (d1, d2), got {latent_dims!r}")
        self.nets = nets if isinstance(nets, nn.ModuleDict) else nn.ModuleDict(nets)
        self.likelihood = likelihood
        self.head = DiagonalGaussian()
        self.latent_dims: tuple[int, int] = dims
        self.latent_dim = sum(dims)
        self.data_shape = likelihood.data_shape
        self.data_support = likelihood.support
        # p(z2) = N(0, I): constants, but buffers so they follow the model's dtype and device
        self.register_buffer("top_loc", torch.zeros(dims[1]), persistent=False)
        self.register_buffer("top_scale", torch.ones(dims[1]), persistent=False)

    # --- the Gaussian conditionals ---------------------------------------------------------------------------
    def _gaussian(self, name: str, inputs: torch.Tensor, size: int) -> Distribution:
        """Diagonal Gaussian over a ``size``-unit layer from ``nets[name]`` applied to ``inputs [*S, features]``."""
        lead = inputs.shape[:-1]
        params = self.nets[name](inputs.reshape(-1, inputs.shape[-1]))  # (N, 2 size), N = prod(S)
        if params.ndim != 2 or params.shape[1] != 2 * size:
            raise ValueError(
                f"net {name!r} must output [N, {2 * size}] (loc and raw scale of a {size}-unit layer), "
                f"got shape {tuple(params.shape)}"
            )
        return self.head(params.reshape(*lead, 2 * size))

    def q_z1_given_x(self, x: torch.Tensor) -> Distribution:
        """q(z1 | x): batch ``[B]``, event ``[d1]``."""
        if x.ndim != 1 + len(self.data_shape) or x.shape[1:] != self.data_shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.data_shape))}], got {tuple(x.shape)}")
        params = self.nets["q_z1_x"](x)  # (B, 2 d1)
        d1 = self.latent_dims[0]
        if params.shape != (x.shape[0], 2 * d1):
            raise ValueError(
                f"net 'q_z1_x' must output [B, {2 * d1}] (loc and raw scale of z1), got shape {tuple(params.shape)}"
            )
        return self.head(params)

    def q_z2_given_z1(self, z1: torch.Tensor) -> Distribution:
        """q(z2 | z1) for ``z1 [*S, d1]``: batch ``S``, event ``[d2]``."""
        return self._gaussian("q_z2_z1", z1, self.latent_dims[1])

    def p_z1_given_z2(self, z2: torch.Tensor) -> Distribution:
        """p(z1 | z2) for ``z2 [*S, d2]``: batch ``S``, event ``[d1]``."""
        return self._gaussian("p_z1_z2", z2, self.latent_dims[0])

    # --- the model interface ---------------------------------------------------------------------------------
    @property
    def prior(self) -> TwoLayerChain:
        top = Independent(Normal(self.top_loc, self.top_scale, validate_args=False), 1)  # p(z2)
        return TwoLayerChain(top, self.p_z1_given_z2, self.latent_dims, root_layer=1)

    def encode(self, x: torch.Tensor) -> TwoLayerChain:
        return TwoLayerChain(self.q_z1_given_x(x), self.q_z2_given_z1, self.latent_dims, root_layer=0)

    def decode(self, z: torch.Tensor) -> Distribution:
        if z.ndim < 1 or z.shape[-1] != self.latent_dim:
            raise ValueError(
                f"z must be [*S, {self.latent_dim}] (concat of z1 [{self.latent_dims[0]}] and "
                f"z2 [{self.latent_dims[1]}]), got shape {tuple(z.shape)}"
            )
        lead = z.shape[:-1]
        z1 = z[..., : self.latent_dims[0]]
        params = self.nets["p_x_z1"](z1.reshape(-1, z1.shape[-1]))  # (N, ...) with N = prod(lead)
        return self.likelihood(params.reshape(*lead, *self.likelihood.params_shape))

    @property
    def output_net(self) -> nn.Module:
        """The network whose last layer (``output_layer``) produces the likelihood's parameters: p(x | z1)'s."""
        return self.nets["p_x_z1"]

    # --- constructors ------------------------------------------------------------------------------------------
    # The paper's sizes: z1 of 100 units, z2 of 50; the estimators see concat(z1, z2), 150 units.
    IWAE_LATENT_DIMS: ClassVar[tuple[int, int]] = (100, 50)

    @classmethod
    def iwae_2layer(
        cls, data_shape: Sequence[int] = (784,), likelihood: str = "bernoulli", **likelihood_options
    ) -> HierarchicalVAE:
        """The paper's two-stochastic-layer model: 784-200-200-100(z1)-100-100-50(z2), tanh (Burda et al., 2016).

        Networks from :func:`vaelab.nets.iwae_2layer_nets`. The paper starts the decoder's output bias at the
        training data's mean: ``vaelab.nets.init_decoder_bias(model.output_net, pixel_mean, model.likelihood)``.

        Args:
            data_shape: 784 values in any shape, e.g. ``(784,)`` or ``(1, 28, 28)``.
            likelihood: a key of :data:`vaelab.likelihoods.LIKELIHOODS`, built with ``likelihood_options``.
        """
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {sorted(LIKELIHOODS)}")
        emits = LIKELIHOODS[likelihood](data_shape, **likelihood_options)
        nets = iwae_2layer_nets(data_shape, latent_dim=cls.IWAE_LATENT_DIMS[1], params_shape=emits.params_shape)
        return cls(nets, emits, latent_dims=cls.IWAE_LATENT_DIMS)

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """Refuse what the paper's model does not use: its prior, posterior and networks are fixed, its latent
        vector has 150 units (z1: 100, z2: 50). It honours ``likelihood`` and ``likelihood_options``."""
        refuse_unused(
            config,
            "iwae-2layer",
            {
                "architecture": "its four networks are fixed",
                "architecture_options": "its four networks are fixed",
                "prior": "its prior is p(z2) = N(0, I) times the learned p(z1 | z2)",
                "prior_options": "its prior is fixed",
                "posterior": "q(z1 | x) q(z2 | z1) are diagonal Gaussians",
                "posterior_options": "its posterior is fixed",
            },
        )
        total = sum(cls.IWAE_LATENT_DIMS)
        if config.latent_dim != total:
            raise ValueError(
                f"the 'iwae-2layer' model has {total} latent units (z1: {cls.IWAE_LATENT_DIMS[0]}, z2: "
                f"{cls.IWAE_LATENT_DIMS[1]}); got latent_dim={config.latent_dim}: set latent_dim={total}"
            )

    @classmethod
    def from_config(cls, config: TrainConfig, data_shape: Sequence[int]) -> HierarchicalVAE:
        cls.check_config(config)
        return cls.iwae_2layer(tuple(data_shape), config.likelihood, **config.likelihood_options)
