"""Invertible maps of the latent space for flow posteriors: planar flows and inverse autoregressive flows (IAF).

Each map is a ``torch.distributions.Transform`` on ``real_vector`` (event ``[d]``) that broadcasts over leading
dimensions (samples ``[K]`` before examples ``[B]``: a map holding per-example parameters ``[B, d]`` applies to
``z [K, B, d]``). :mod:`vaelab.posteriors` composes them on a diagonal Gaussian into a
``TransformedDistribution``. With ``cache_size=1`` (the default here) a map remembers its latest (input, output)
pair, so ``q.log_prob(z)`` of q's own latest ``rsample`` reads the input back instead of inverting; any other z is
inverted exactly (planar: a one-dimensional monotone root, found by bisection; IAF: d passes of the MADE), slower
but correct, so a flow q can be scored at anyone's samples (e.g. a defensive mixture's in
:func:`vaelab.diagnostics.gap_decomposition`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Transform, constraints

# Bisection steps of the planar inverse: the bracket has width 2 |w.u| (at most a few units), so 2^-100 of it is far
# below float64's resolution; each step is one tanh per element.
_BISECTION_STEPS = 100


class PlanarTransform(Transform):
    """f(z) = z + u' tanh(w.z + b) (Rezende & Mohamed, 2015, "Variational inference with normalizing flows").

    u' = u + (m(w.u) - w.u) w / |w|^2 with m(a) = softplus(a) - 1 > -1, so w.u' > -1 and f is invertible (the
    paper's appendix A). log |det df/dz| = log(1 + (1 - tanh^2(w.z + b)) w.u'), > -inf since w.u' > -1.

    The inverse: alpha = w.z + b is the root of alpha + w.u' tanh(alpha) = w.y + b, strictly increasing in alpha,
    inside [w.y + b - |w.u'|, w.y + b + |w.u'|]; bisection finds it, then one Newton step taken with gradients on
    gives alpha its exact derivative with respect to u, w, b and y (implicit function theorem) at no change in value.

    Args:
        u, w: ``[*batch, d]``; b: ``[*batch]`` (per example for an amortized flow, or unbatched).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        if u.shape != w.shape or b.shape != u.shape[:-1]:
            raise ValueError(
                f"planar flow parameters need u, w [*batch, d] and b [*batch]; got u {tuple(u.shape)}, "
                f"w {tuple(w.shape)}, b {tuple(b.shape)}"
            )
        wu = (w * u).sum(-1, keepdim=True)
        norm2 = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)  # w = 0: u' = u, no 0 / 0
        self.u = u + (F.softplus(wu) - 1 - wu) * w / norm2  # (*batch, d): u', with w.u' > -1
        self.w, self.b = w, b
        self.wu = (w * self.u).sum(-1)  # (*batch,)

    def _alpha(self, z: torch.Tensor) -> torch.Tensor:
        return (z * self.w).sum(-1) + self.b  # (*S, *batch)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.u * torch.tanh(self._alpha(x)).unsqueeze(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        target = self._alpha(y)  # w.y + b = alpha + w.u' tanh(alpha)
        wu = self.wu.expand_as(target)
        with torch.no_grad():
            lo, hi = target - wu.abs(), target + wu.abs()
            for _ in range(_BISECTION_STEPS):
                mid = (lo + hi) / 2
                above = mid + wu * torch.tanh(mid) > target
                lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
            root = (lo + hi) / 2
        tanh = torch.tanh(root)
        alpha = root - (root + wu * tanh - target) / (1 + wu * (1 - tanh * tanh))  # Newton: the value stays, d/d.. too
        return y - self.u * torch.tanh(alpha).unsqueeze(-1)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tanh = torch.tanh(self._alpha(x))
        return torch.log1p((1 - tanh * tanh) * self.wu)  # (*S, *batch)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask ``[out, in]`` (a buffer)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder (Germain, Gregor, Murray & Larochelle, 2015) with a context input: two outputs per
    dimension, ``(m, s)``, each ``[*S, *batch, d]``, where output i depends on inputs before i in the ordering
    (1..d, or d..1 when ``reverse``) and on the context h ``[*batch, c]`` (unmasked, added to the first layer).

    Hidden unit degrees cycle through 1..d-1 (Germain et al.'s deterministic assignment); a unit of degree k sees
    inputs of degree <= k, and an output of degree i sees units of degree < i. With no hidden layers the outputs are
    a strictly triangular linear function of the input plus a linear function of the context.
    """

    def __init__(self, dim: int, hidden: Sequence[int], context_dim: int, *, reverse: bool = False):
        super().__init__()
        self.dim = dim
        degrees = torch.arange(1, dim + 1)
        if reverse:
            degrees = degrees.flip(0)
        layers, previous = [], degrees
        for width in hidden:
            units = torch.arange(width) % max(1, dim - 1) + 1
            layers.append(MaskedLinear(len(previous), width, (units[:, None] >= previous[None]).float()))
            previous = units
        self.hidden = nn.ModuleList(layers)
        outputs = degrees.repeat(2)  # (2d,): m's degrees, then s's
        self.output = MaskedLinear(len(previous), 2 * dim, (outputs[:, None] > previous[None]).float())
        self.context = nn.Linear(context_dim, hidden[0] if hidden else 2 * dim)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.context(h)  # (*batch, width): broadcast over the samples of x
        if not self.hidden:
            out = self.output(x) + context
        else:
            a = F.elu(self.hidden[0](x) + context)
            for layer in self.hidden[1:]:
                a = F.elu(layer(a))
            out = self.output(a)
        return out[..., : self.dim], out[..., self.dim :]


class IAFTransform(Transform):
    """One inverse autoregressive flow step (Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, 2016, "Improved
    variational inference with inverse autoregressive flow"), in its numerically stable LSTM-like form:

        (m, s) = MADE(z, h),   sigma = sigmoid(s + forget_bias),   f(z) = sigma * z + (1 - sigma) * m,

    with (m_i, s_i) depending on z before i only, so df/dz is triangular with diagonal sigma and
    log |det df/dz| = sum_i log sigma_i. The inverse takes d passes: each fixes the next coordinate in the order.

    Args:
        made: the :class:`MADE`; context: h ``[*batch, c]`` from the encoder; forget_bias: added to s (Kingma et
            al. start sigma near sigmoid(1) ~ 0.73, so each step starts close to the identity in z's scale).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, made: MADE, context: torch.Tensor, forget_bias: float = 1.0, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.made, self.h, self.forget_bias = made, context, forget_bias
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, logit of sigma) of the latest _call

    def _logit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, s = self.made(x, self.h)
        return m, s + self.forget_bias

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        m, logit = self._logit(x)
        self._last = (x, logit)
        sigma = torch.sigmoid(logit)
        return sigma * x + (1 - sigma) * m

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        x = torch.zeros_like(y)
        for _ in range(self.made.dim):  # after pass i the first i coordinates (in the MADE's order) are exact
            m, logit = self._logit(x)
            sigma = torch.sigmoid(logit)
            x = (y - (1 - sigma) * m) / sigma
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logit = self._last[1] if self._last is not None and self._last[0] is x else self._logit(x)[1]
        return F.logsigmoid(logit).sum(-1)  # (*S, *batch)
