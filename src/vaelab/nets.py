"""Encoder and decoder networks, and builders that pair them for a data shape and a latent size.

The networks are plain deterministic maps; :class:`vaelab.models.VAE` turns their outputs into distributions:

* an encoder maps ``x [B, *data_shape]`` to ``[B, 2d]`` raw parameters (loc, raw scale) for the
  :class:`~vaelab.posteriors.DiagonalGaussian` head;
* a decoder maps ``z [N, d]`` to ``[N, *params_shape]`` likelihood parameters (logits for Bernoulli and
  continuous Bernoulli, the mean for Gaussians; ``params_shape`` is ``data_shape`` for these, and 3K channels per
  data channel for a mixture of K discretized logistics: :attr:`vaelab.likelihoods.Likelihood.params_shape`).
  Callers flatten extra leading dims first (``[K, B, d] -> [K*B, d]``), as ``VAE.decode`` does.

Every decoder exposes ``output_layer`` (its last operation, with nothing after it) and ``out_shape``, so
:func:`init_decoder_bias` can start it at the data mean.

:data:`ARCHITECTURES` maps a name to a builder ``(data_shape, latent_dim, **options) -> (encoder, decoder)``
(option ``params_shape``: the decoder's output, when it is not ``data_shape``; :func:`build_pair` passes it);
a builder raises ``ValueError`` naming the problem when it cannot serve the shape. The IWAE paper's
two-stochastic-layer networks are not a pair and live in :data:`HIERARCHICAL_NETS`.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from vaelab import _fast
from vaelab.likelihoods import LIKELIHOODS, Likelihood


class Tanh(nn.Tanh):
    """``nn.Tanh``; compiled on CPU, a large input's tanh is ATen's kernel rather than Inductor's (same values, faster:
    :func:`vaelab._fast.tanh`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fast.tanh(x)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _check_data_shape(data_shape: Sequence[int]) -> torch.Size:
    shape = torch.Size(data_shape)
    if len(shape) == 0 or any(n < 1 for n in shape):
        raise ValueError(f"data_shape must be a non-empty shape of positive sizes, got {tuple(data_shape)}")
    return shape


def _check_size(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


# --- networks -----------------------------------------------------------------------------------------------
class Gated(nn.Module):
    """A gated linear layer (Dauphin et al., 2017; the MLPs of Tomczak & Welling's VampPrior paper): one
    ``Linear(in, 2 h)`` whose halves a, b give ``a * sigmoid(b)``, i.e. (W x + c) * sigmoid(V x + d)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.glu(self.linear(x), dim=-1)


class MLP(nn.Module):
    """A fully connected network: ``Linear -> activation`` for each hidden width (``Gated`` for the activation
    ``"gated"``), then a final ``Linear``.

    The input is flattened from dim 1 (``[B, *shape] -> [B, prod(shape)]``); the output is
    ``[B, out_features]``, or ``[B, *out_features]`` when ``out_features`` is a shape. Nothing follows
    ``output_layer``.

    Args:
        in_features: size of one flattened input example.
        hidden: widths of the hidden layers (may be empty: then the MLP is one affine map).
        out_features: an int, or a shape to reshape each output example to (e.g. a decoder's ``data_shape``).
        activation: a key of :data:`ACTIVATIONS`, or ``"gated"``: each hidden layer a :class:`Gated` unit.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int | Sequence[int],
        activation: str = "tanh",
    ):
        super().__init__()
        self.in_features = _check_size(in_features, "in_features")
        hidden = [_check_size(h, "each hidden width") for h in hidden]
        self.out_shape = torch.Size([out_features] if isinstance(out_features, int) else out_features)
        _check_data_shape(self.out_shape)
        if activation != "gated" and activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted([*ACTIVATIONS, 'gated'])}")
        layers: list[nn.Module] = []
        width = self.in_features
        for h in hidden:
            layers += [Gated(width, h)] if activation == "gated" else [nn.Linear(width, h), _activation(activation)]
            width = h
        self.body = nn.Sequential(*layers)
        self.output_layer = nn.Linear(width, self.out_shape.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(
                f"MLP expects [B, *shape] with prod(shape) = {self.in_features}, got shape {tuple(x.shape)}"
            )
        out = self.output_layer(self.body(x.flatten(1)))  # (B, prod(out_shape))
        return out.reshape(x.shape[0], *self.out_shape)


# Square image sides the conv nets serve, and how many stride-2 halvings bring each to a 7x7 or 4x4 grid.
_CONV_HALVINGS: dict[int, int] = {28: 2, 32: 3, 64: 4}


def _check_image_shape(data_shape: Sequence[int]) -> tuple[torch.Size, int]:
    shape = _check_data_shape(data_shape)
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] not in _CONV_HALVINGS:
        raise ValueError(
            f"conv nets need images (C, H, W) with H = W in {sorted(_CONV_HALVINGS)}, got data_shape {tuple(shape)}"
        )
    return shape, _CONV_HALVINGS[shape[1]]


class ConvEncoder(nn.Module):
    """``x [B, C, S, S] -> [B, 2d]`` for S in {28, 32, 64}.

    n stride-2 convolutions (kernel 4, padding 1: each halves the side exactly) with widths
    ``base_channels * 2**i``, each followed by the activation, bring S to 7 (S = 28, n = 2) or 4 (S = 32, 64;
    n = 3, 4); a final ``Linear`` maps the flattened grid to the 2d posterior parameters.
    """

    def __init__(self, data_shape: Sequence[int], latent_dim: int, base_channels: int = 32, activation: str = "relu"):
        super().__init__()
        self.data_shape, halvings = _check_image_shape(data_shape)
        _check_size(latent_dim, "latent_dim")
        _check_size(base_channels, "base_channels")
        channels = [self.data_shape[0]] + [base_channels * 2**i for i in range(halvings)]
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), _activation(activation)]
        self.body = nn.Sequential(*layers)
        side = self.data_shape[1] // 2**halvings
        self.output_layer = nn.Linear(channels[-1] * side * side, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != self.data_shape:
            raise ValueError(f"ConvEncoder expects [B, {', '.join(map(str, self.data_shape))}], got {tuple(x.shape)}")
        return self.output_layer(self.body(x).flatten(1))  # (B, 2d)


class ConvDecoder(nn.Module):
    """``z [N, d] -> [N, C, S, S]``, mirroring :class:`ConvEncoder`.

    ``Linear`` + activation to a ``(base_channels * 2**(n-1), s, s)`` grid (s = 7 or 4), then n transposed
    convolutions (kernel 4, stride 2, padding 1: each doubles the side exactly), the last of which,
    ``output_layer``, gives the C output channels with nothing after it. Its bias is per channel, ``[C]``.
    """

    def __init__(self, data_shape: Sequence[int], latent_dim: int, base_channels: int = 32, activation: str = "relu"):
        super().__init__()
        self.out_shape, halvings = _check_image_shape(data_shape)
        self.latent_dim = _check_size(latent_dim, "latent_dim")
        _check_size(base_channels, "base_channels")
        channels = [base_channels * 2**i for i in reversed(range(halvings))] + [self.out_shape[0]]
        self.grid = (channels[0], self.out_shape[1] // 2**halvings, self.out_shape[2] // 2**halvings)
        self.input_layer = nn.Sequential(nn.Linear(latent_dim, math.prod(self.grid)), _activation(activation))
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels[:-1]):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1),
                _activation(activation),
            ]
        self.body = nn.Sequential(*layers)
        self.output_layer = nn.ConvTranspose2d(channels[-2], channels[-1], kernel_size=4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"ConvDecoder expects z [N, {self.latent_dim}], got shape {tuple(z.shape)}")
        h = self.input_layer(z).reshape(-1, *self.grid)  # (N, C_top, s, s)
        return self.output_layer(self.body(h))  # (N, C, S, S)


# --- builders: (data_shape, latent_dim, **options) -> (encoder, decoder) ------------------------------------
def mlp_pair(
    data_shape: Sequence[int],
    latent_dim: int,
    *,
    hidden: Sequence[int] = (512, 256),
    activation: str = "tanh",
    context_features: int = 0,
    params_shape: Sequence[int] | None = None,
) -> tuple[MLP, MLP]:
    """An MLP encoder and its mirror image as decoder; works for any data shape (images are flattened).

    Encoder ``prod(data_shape) + context_features -> hidden -> 2d``; decoder ``d + context_features ->
    reversed(hidden) -> params_shape`` (the likelihood's :attr:`~vaelab.likelihoods.Likelihood.params_shape`;
    ``data_shape`` when None, one parameter per value). ``context_features`` (set by a conditional model, never
    by a config: e.g. a one-hot label, :class:`vaelab.conditional.ConditionalVAE`) widens both inputs: the caller
    concatenates the context to the flattened x, and to z.
    """
    shape = _check_data_shape(data_shape)
    _check_size(latent_dim, "latent_dim")
    if isinstance(context_features, bool) or not isinstance(context_features, int) or context_features < 0:
        raise ValueError(f"context_features must be an int >= 0, got {context_features!r}")
    encoder = MLP(shape.numel() + context_features, hidden, 2 * latent_dim, activation)
    out = shape if params_shape is None else _check_data_shape(params_shape)
    decoder = MLP(latent_dim + context_features, tuple(reversed(hidden)), out, activation)
    return encoder, decoder


_IWAE_PIXELS = 784  # the paper's data: 28x28 binarized MNIST and OMNIGLOT


def _check_iwae_data(data_shape: Sequence[int], preset: str) -> torch.Size:
    shape = _check_data_shape(data_shape)
    if shape.numel() != _IWAE_PIXELS:
        raise ValueError(
            f"the {preset} preset is for {_IWAE_PIXELS}-pixel data (28x28, e.g. MNIST), "
            f"got data_shape {tuple(shape)} with {shape.numel()} values"
        )
    return shape


def iwae_1layer_pair(
    data_shape: Sequence[int], latent_dim: int = 50, *, params_shape: Sequence[int] | None = None
) -> tuple[MLP, MLP]:
    """The one-stochastic-layer architecture of Burda, Grosse & Salakhutdinov (2016), sec. 5.

    Encoder 784-200-200-(2 x 50), decoder 50-200-200-784, tanh throughout. Its (loc, scale) heads are one
    ``Linear(200, 100)`` here; the paper's separate mean and log-sigma layers have the same parameter count.
    The paper starts the decoder's output bias at the training data's mean: call :func:`init_decoder_bias`.
    ``params_shape``: the decoder's output, as in :func:`mlp_pair`.

    Raises:
        ValueError: if the data are not 784 values, or ``latent_dim`` is not the paper's 50 (use ``"mlp"``
            with ``hidden=(200, 200), activation="tanh"`` for other sizes).
    """
    shape = _check_iwae_data(data_shape, "iwae-1layer")
    if latent_dim != 50:
        raise ValueError(
            f"the iwae-1layer preset has 50 latent units, got latent_dim={latent_dim!r}; "
            "use 'mlp' with hidden=(200, 200), activation='tanh' for another size"
        )
    return mlp_pair(shape, latent_dim, hidden=(200, 200), activation="tanh", params_shape=params_shape)


def conv_pair(
    data_shape: Sequence[int],
    latent_dim: int,
    *,
    base_channels: int = 32,
    activation: str = "relu",
    params_shape: Sequence[int] | None = None,
) -> tuple[ConvEncoder, ConvDecoder]:
    """A conv encoder and its mirrored transposed-conv decoder for (C, S, S) images, S in {28, 32, 64}.

    See :class:`ConvEncoder` and :class:`ConvDecoder`; the decoder produces exactly ``params_shape`` (the
    likelihood's, e.g. ``(P C, S, S)`` for P parameters per value), or ``data_shape`` when None.
    """
    encoder = ConvEncoder(data_shape, latent_dim, base_channels, activation)
    decoder = ConvDecoder(data_shape if params_shape is None else params_shape, latent_dim, base_channels, activation)
    return encoder, decoder


Builder = Callable[..., tuple[nn.Module, nn.Module]]

ARCHITECTURES: dict[str, Builder] = {
    "mlp": mlp_pair,
    "iwae-1layer": iwae_1layer_pair,
    "conv": conv_pair,
}


def takes_option(build: Builder, name: str) -> bool:
    """Whether an architecture builder takes the keyword option ``name`` (e.g. ``context_features``)."""
    return name in inspect.signature(build).parameters


def build_pair(
    architecture: str, data_shape: Sequence[int], latent_dim: int, likelihood: Likelihood, **options
) -> tuple[nn.Module, nn.Module]:
    """The encoder and decoder of ``ARCHITECTURES[architecture]`` for data of ``data_shape``, the decoder emitting
    what ``likelihood`` takes (:attr:`~vaelab.likelihoods.Likelihood.params_shape`).

    ``params_shape`` is passed only when it differs from the data shape, so a builder a user registers without that
    option still serves every likelihood with one parameter per value.

    Raises:
        ValueError: if the likelihood needs several parameters per value and the builder cannot emit them.
    """
    build = ARCHITECTURES[architecture]
    if likelihood.params_shape != torch.Size(data_shape):
        if not takes_option(build, "params_shape"):
            raise ValueError(
                f"{type(likelihood).__name__} needs {likelihood.params_per_value} decoder outputs per value, and "
                f"architecture {architecture!r} has no params_shape option to emit them"
            )
        options = {**options, "params_shape": likelihood.params_shape}
    return build(data_shape, latent_dim, **options)


# --- the IWAE paper's two-stochastic-layer networks ---------------------------------------------------------
def iwae_2layer_nets(
    data_shape: Sequence[int], latent_dim: int = 50, *, params_shape: Sequence[int] | None = None
) -> nn.ModuleDict:
    """The four networks of the two-stochastic-layer model of Burda, Grosse & Salakhutdinov (2016), sec. 5.

    With z1 of 100 and z2 of 50 units, tanh throughout (Gaussian heads output ``[N, 2 * size]``, as
    :class:`~vaelab.posteriors.DiagonalGaussian` expects; the paper's separate mean and log-sigma layers have
    the same parameter count):

    * ``"q_z1_x"``:  q(z1|x),  ``x [B, *data_shape] -> [B, 200]``: 784-200-200-(2 x 100);
    * ``"q_z2_z1"``: q(z2|z1), ``z1 [N, 100] -> [N, 100]``:        100-100-100-(2 x 50);
    * ``"p_z1_z2"``: p(z1|z2), ``z2 [N, 50] -> [N, 200]``:         50-100-100-(2 x 100);
    * ``"p_x_z1"``:  p(x|z1),  ``z1 [N, 100] -> [N, *params_shape]``: 100-200-200-784 (likelihood parameters;
      ``params_shape`` defaults to ``data_shape``, one per value).

    The prior is p(z2) = N(0, I_50). These are only the networks; the model chaining them is a separate class.

    Args:
        data_shape: 784 values in any shape, e.g. ``(784,)`` or ``(1, 28, 28)``.
        latent_dim: the top layer's size (z2); must be the paper's 50.
    """
    shape = _check_iwae_data(data_shape, "iwae-2layer-nets")
    if latent_dim != 50:
        raise ValueError(f"the iwae-2layer-nets preset has a 50-unit z2 layer, got latent_dim={latent_dim!r}")
    z1, z2 = 100, latent_dim
    return nn.ModuleDict(
        {
            "q_z1_x": MLP(shape.numel(), (200, 200), 2 * z1, "tanh"),
            "q_z2_z1": MLP(z1, (100, 100), 2 * z2, "tanh"),
            "p_z1_z2": MLP(z2, (100, 100), 2 * z1, "tanh"),
            "p_x_z1": MLP(z1, (200, 200), shape if params_shape is None else params_shape, "tanh"),
        }
    )


HIERARCHICAL_NETS: dict[str, Callable[..., nn.ModuleDict]] = {"iwae-2layer-nets": iwae_2layer_nets}
"""Builders ``(data_shape, latent_dim) -> nn.ModuleDict`` for hierarchical models; not pairs, so kept apart
from :data:`ARCHITECTURES` (whose every entry plugs into :class:`~vaelab.models.VAE`)."""


# --- initialisation -----------------------------------------------------------------------------------------
@torch.no_grad()
def init_decoder_bias(
    decoder: nn.Module, pixel_mean: torch.Tensor, likelihood: str | type[Likelihood] | Likelihood = "bernoulli"
) -> None:
    """Set the bias of ``decoder.output_layer`` so that, at initialisation, the decoder outputs the data mean.

    The likelihood says how (:attr:`vaelab.likelihoods.Likelihood.bias_from_mean`): for Bernoulli and
    continuous-Bernoulli likelihoods the bias becomes logit(clamp(mean, 1e-3, 1 - 1e-3)); for Gaussian ones, the
    mean itself. The decoder then starts from the best image-independent fit (for Bernoulli pixels, sigmoid(bias) =
    mean maximizes the likelihood) rather than from logits around 0, i.e. every pixel at 1/2, which costs hundreds
    of nats per MNIST image and the first epochs spent removing them (the IWAE code does the same, Burda et al.,
    2016).

    A transposed-convolution output layer has one bias per channel, ``[C]``: it gets the transform of the
    channel's mean over pixels, ``logit(mean_hw(pixel_mean[c]))`` -- the maximum-likelihood Bernoulli
    parameter shared by the channel's pixels (averaging per-pixel logits instead would be dominated by the
    clamped background pixels).

    Args:
        decoder: a network with ``output_layer`` (e.g. from :data:`ARCHITECTURES`); modified in place.
        pixel_mean: ``Tensor[*data_shape]``, the training data's mean per pixel (in [0, 1] for logits).
        likelihood: a key of :data:`vaelab.likelihoods.LIKELIHOODS`, or a :class:`~vaelab.likelihoods.Likelihood`
            class (built with its default options for ``pixel_mean``'s shape) or instance with a ``bias_from_mean``
            rule; the decoder must emit its ``params_shape``.
    """
    if isinstance(likelihood, str):
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {sorted(LIKELIHOODS)}")
        likelihood = LIKELIHOODS[likelihood]
    if isinstance(likelihood, type):
        likelihood = likelihood(pixel_mean.shape)  # its default options, for the data's shape
    to_bias = likelihood.bias_from_mean
    if to_bias is None:
        name = type(likelihood).__name__
        raise ValueError(f"{name} has no bias_from_mean rule: it cannot start the decoder at the data mean")
    layer = getattr(decoder, "output_layer", None)
    if not isinstance(layer, nn.Module) or getattr(layer, "bias", None) is None:
        raise ValueError(f"{type(decoder).__name__} has no output_layer with a bias to initialise")
    if pixel_mean.shape != likelihood.data_shape:
        raise ValueError(
            f"pixel_mean must have the likelihood's data shape {tuple(likelihood.data_shape)}, "
            f"got {tuple(pixel_mean.shape)}"
        )
    out_shape = getattr(decoder, "out_shape", None)
    if out_shape is not None and likelihood.params_shape != out_shape:
        raise ValueError(
            f"the decoder outputs {tuple(out_shape)}, but {type(likelihood).__name__} takes "
            f"{tuple(likelihood.params_shape)} for data of shape {tuple(pixel_mean.shape)}"
        )
    if not bool(torch.isfinite(pixel_mean).all()):
        raise ValueError("pixel_mean contains NaN or inf")
    bias = layer.bias
    # compute in the wider of the two dtypes, so a float64 decoder gets float64-accurate logits
    dtype = torch.promote_types(pixel_mean.dtype, bias.dtype) if pixel_mean.is_floating_point() else bias.dtype
    pixel_mean = pixel_mean.to(device=bias.device, dtype=dtype)
    params = likelihood.params_shape
    if bias.shape == (params.numel(),):  # one bias per output value (Linear)
        target = to_bias(pixel_mean).flatten()
    elif isinstance(layer, nn.Conv2d | nn.ConvTranspose2d) and bias.shape == params[:1]:
        # one bias per channel: transform the channel's mean over pixels
        target = to_bias(pixel_mean.mean(dim=tuple(range(1, pixel_mean.ndim))))
    else:
        raise ValueError(
            f"cannot match output_layer bias of shape {tuple(bias.shape)} "
            f"to {type(likelihood).__name__}'s parameters of shape {tuple(params)}"
        )
    bias.copy_(target.to(bias))
