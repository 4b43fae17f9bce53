"""Estimators of the ELBO and of log p(x), each a pure function returning one value per example (``[B]``, nats).

Everything here rests on one identity (docs/theory.md):

    log p(x) = ELBO(q) + KL(q(z|x) || p(z|x)),   ELBO(q) = E_q[log p(x, z) - log q(z|x)].

Internally every bound is a reduction of the same log-weight matrix ``log w[k, b] = log p(x_b, z_kb) - log r(z_kb)``
(samples first, as torch's ``sample_shape + batch_shape``), with r = q(z|x) (importance sampling) or r = p(z) (naive
Monte Carlo). Reductions happen in log space: ``logsumexp``, never ``log(mean(exp(.)))``.

Inputs are validated once at entry (shape, finiteness, the likelihood's support, k >= 1); a bad input raises
``ValueError`` naming the problem.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.distributions import Distribution, constraints, kl_divergence

from vaelab._fast import room_for
from vaelab._math import log_mean_exp

ElboForm = Literal["joint", "entropy", "kl"]
Proposal = Literal["posterior", "prior"]
ELBO_FORMS: tuple[str, ...] = ("joint", "entropy", "kl")
PROPOSALS: tuple[str, ...] = ("posterior", "prior")

# Largest weights that agree to this relative precision in log space count as a flat (bounded) tail: k-hat = -inf.
_FLAT_TAIL = 1e-6
# Log-weight rows (samples) collected before the Pareto tail's top-k is updated (see _WeightStats).
_TOP_BUFFER = 1024
# Elements of decoder output held at once when ``chunk_size=None``: ~4 MiB of float32 per tensor eagerly (13 samples
# of 100 MNIST images), ~8 MiB compiled (whose fused kernels keep fewer such tensors). Measured on CPU: 800-2,600 rows
# of 784 pixels were equally fast eagerly, 5,200 rows 2x slower, 64 MiB tensors cost ~850k page faults per call
# (docs/performance.md, logpx_eval.py --also-chunk-sizes).
_AUTO_CHUNK_ELEMENTS = 1 << 20
_AUTO_CHUNK_ELEMENTS_COMPILED = 1 << 21
# On CUDA a chunk's decoder output may take 1/16 of the free memory (a handful of such temporaries live at once), up to
# 2^28 values (1 GiB of float32). Not measured: no GPU was available to this project's sessions so far.
_CUDA_TEMPORARIES = 16
_CUDA_MAX_CHUNK_ELEMENTS = 1 << 28


# --- validation ----------------------------------------------------------------------------------------------------
def _check_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_chunk_size(value: object) -> int | None:
    return None if value is None else _check_count(value, "chunk_size")


def _check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_data(model, x: torch.Tensor) -> torch.Tensor:
    """Validate a batch ``x: [B, *data_shape]``: a finite floating tensor inside the data's support.

    The data shape is ``x``'s own (``x.shape[1:]``), checked against ``model.data_shape`` where the model states
    one; the support is :func:`data_support`'s. Inside :func:`trusted_data` only the type and shape are checked: the
    caller has checked the values once.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    dtype = _parameter_dtype(model)
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"x has dtype {x.dtype} but the model's parameters are {dtype}: convert one to the other")
    stated = getattr(model, "data_shape", None)
    if stated is None:  # the model does not say: any [B, *data_shape] with B >= 1
        if x.ndim < 2 or x.shape[0] < 1:
            raise ValueError(f"x must have shape [B, *data_shape] with B >= 1, got {tuple(x.shape)}")
    else:
        data_shape = tuple(stated)
        if x.ndim != 1 + len(data_shape) or tuple(x.shape[1:]) != data_shape or x.shape[0] < 1:
            shape = ", ".join(map(str, data_shape))
            raise ValueError(f"x must have shape [B, {shape}] with B >= 1, got {tuple(x.shape)}")
    if not _trusted:
        check_values(x, data_support(model, x))
    return x


def _parameter_dtype(model) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter; None for a model without parameters."""
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return None
    return next((p.dtype for p in parameters() if p.is_floating_point()), None)


def latent_dim(model) -> int:
    """d, the size of the model's latent vector: ``model.latent_dim`` if stated, else the prior's event shape ``[d]``.

    Raises ValueError, naming ``latent_dim``, when the prior's event shape is not one dimension.
    """
    stated = getattr(model, "latent_dim", None)
    if stated is not None:
        return int(stated)
    event = tuple(model.prior.event_shape)
    if len(event) != 1:
        raise ValueError(
            f"cannot tell the model's latent_dim: its prior has event shape {list(event)}, not [d]; give the prior "
            "event shape [d] (e.g. torch.distributions.Independent(..., 1)) or the model a latent_dim attribute"
        )
    return event[0]


def data_support(model, x: torch.Tensor) -> constraints.Constraint:
    """The values an example may take: ``model.data_support`` if stated, else the support of ``model.decode(z)`` at
    z = 0 (no random draw), without the ``independent`` wrapper, e.g. ``constraints.boolean`` for Bernoulli pixels.
    ``x`` (a batch) gives the dtype and device of that z.

    Raises ValueError, naming ``data_support``, when the decoder's distribution does not state its support.
    """
    stated = getattr(model, "data_support", None)
    if stated is not None:
        return stated
    with torch.no_grad():
        z = x.new_zeros(1, latent_dim(model))  # (1, d)
        try:
            support = model.decode(z).support
        except NotImplementedError:
            support = None
    if support is None:
        raise ValueError(
            "cannot tell the data's support: model.decode(z) has no support; give the model a data_support "
            "attribute (a torch.distributions.constraints object, e.g. constraints.real)"
        )
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


def check_values(
    x: torch.Tensor,
    support: constraints.Constraint,
    *,
    name: str = "x",
    support_name: str | None = None,
    rows: int = 1 << 14,
) -> None:
    """Raise ``ValueError`` unless every value of ``x [N, ...]`` is finite and inside ``support``.

    The message names the first offending example (row) and the support (as ``support_name`` where given). Works
    through ``rows`` examples at a time, so a whole dataset can be checked once without a temporary of its size;
    uint8 data (and :class:`vaelab.data.MappedRows`) are checked as the intensities they stand for (/ 255).
    """
    if x.dtype == torch.uint8 and bool(support.check(torch.arange(256) / 255.0).all()):
        return  # every value 8-bit data can stand for is inside the support: nothing to read
    for start in range(0, x.shape[0], rows):
        chunk = x[start : start + rows]
        if chunk.dtype == torch.uint8:  # 8-bit data as the intensities they stand for (vaelab.data.as_float)
            chunk = chunk.to(torch.float32).div_(255.0)
        # One pass in the common case: a bounded support's check already fails on NaN and inf.
        bounded = support in _BOUNDED_SUPPORTS or getattr(support, "excludes_non_finite", False)
        ok = support.check(chunk) if bounded else torch.isfinite(chunk)
        row_ok = ok.reshape(ok.shape[0], -1).all(1)
        if bool(row_ok.all()):
            continue
        row = int((~row_ok).nonzero()[0, 0])
        example = chunk[row]
        non_finite = int((~torch.isfinite(example)).sum())
        if non_finite:
            first = start + row
            raise ValueError(f"{name} contains NaN or infinite values: {non_finite} in example {first}, the first")
        where = support_name or f"the likelihood's support ({support})"
        raise ValueError(
            f"{name} has values outside {where}, first in example {start + row} "
            f"(its range [{example.min().item():.4g}, {example.max().item():.4g}])"
        )


_trusted = False  # set by trusted_data(): values were checked by the caller


@contextmanager
def trusted_data() -> Iterator[None]:
    """Within this block :func:`check_data` checks type and shape but not values (no pass over the batch).

    For callers that check their data once up front, as :class:`vaelab.train.Trainer` does with its whole training
    set, instead of on every batch.
    """
    global _trusted
    previous, _trusted = _trusted, True
    try:
        yield
    finally:
        _trusted = previous


# Supports whose check is False for NaN and +-inf (so it covers finiteness too).
_BOUNDED_SUPPORTS = (constraints.boolean, constraints.unit_interval)


def _posterior(model, x: torch.Tensor, q: Distribution | None) -> Distribution:
    """q(z|x): ``q`` if given (checked), else ``model.encode(x)``; batch ``[B]``, event ``[d]``."""
    return _check_q(model, x, model.encode(x) if q is None else q)


def _proposal(model, x: torch.Tensor, proposal: str, q: Distribution | None) -> Distribution | None:
    """The proposal r to draw from: q(z|x) for ``"posterior"``, None (the prior) for ``"prior"``. A ``q`` given with
    the prior proposal is not used, but is checked all the same (a wrong q is a caller's mistake either way)."""
    if proposal == "posterior":
        return _posterior(model, x, q)
    if q is not None:
        _check_q(model, x, q)
    return None


def _check_q(model, x: torch.Tensor, q: Distribution) -> Distribution:
    """``q`` unchanged if it is a Distribution of batch ``[B]`` and event ``[d]``, else a ValueError saying so."""
    if not isinstance(q, Distribution):
        raise ValueError(f"q must be a torch.distributions.Distribution or None, got {type(q).__name__}")
    batch, event = (x.shape[0],), (latent_dim(model),)
    if tuple(q.batch_shape) != batch or tuple(q.event_shape) != event:
        raise ValueError(
            f"q must have batch shape {list(batch)} and event shape {list(event)}, "
            f"got batch {list(q.batch_shape)} and event {list(q.event_shape)}"
        )
    return q


def _per_example(prior: Distribution, x: torch.Tensor) -> bool:
    """Whether ``prior`` has one distribution per example of ``x`` (batch ``[B]``) rather than one for all (``[]``)."""
    batch = tuple(prior.batch_shape)
    if batch not in ((), (x.shape[0],)):
        raise ValueError(f"the prior must have batch shape [] or [B] = [{x.shape[0]}], got {list(batch)}")
    return batch != ()


def _draw(dist: Distribution, shape: tuple[int, ...]) -> torch.Tensor:
    return dist.rsample(shape) if dist.has_rsample else dist.sample(shape)


# --- analytic when registered, Monte Carlo otherwise ---------------------------------------------------------------
def kl_term(q: Distribution, p: Distribution, z: torch.Tensor) -> torch.Tensor:
    """KL(q || p) per example: analytic if torch has it registered, else the Monte Carlo mean over ``z [K, B, d]``."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return (q.log_prob(z) - p.log_prob(z)).mean(0)


def entropy_term(q: Distribution, z: torch.Tensor) -> torch.Tensor:
    """H[q] per example: analytic if ``q.entropy`` exists, else ``-mean log q(z)`` over ``z [K, B, d]``."""
    try:
        return q.entropy()
    except NotImplementedError:
        return -q.log_prob(z).mean(0)


# --- the ELBO ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ElboParts:
    """The ELBO split as ``elbo = recon - kl`` (per example, nats, ``[B]``).

    ``recon`` = E_q[log p(x|z)]; ``kl`` estimates KL(q(z|x) || p(z)) in the chosen form. A beta-weighted objective is
    ``recon - beta * kl``; the ELBO itself is always the beta = 1 value.
    """

    recon: torch.Tensor
    kl: torch.Tensor

    @property
    def elbo(self) -> torch.Tensor:
        return self.recon - self.kl


def elbo_parts(model, x: torch.Tensor, *, k: int = 1, form: ElboForm = "joint", q: Distribution | None = None):
    """The ELBO's reconstruction and KL terms from ``k`` reparameterized samples of q (see :class:`ElboParts`).

    The three forms differ only in how KL(q || p(z)) is estimated, so all three have the same expectation:

    * ``"joint"``:   E_q[log p(x,z) - log q]      -> kl = mean_k[log q(z) - log p(z)];
    * ``"entropy"``: E_q[log p(x,z)] + H[q]       -> kl = -mean_k[log p(z)] - H[q]   (H analytic if available);
    * ``"kl"``:      E_q[log p(x|z)] - KL(q||p)   -> kl = KL(q || p(z))               (analytic if registered).
    """
    _check_count(k, "k")
    _check_choice(form, "form", ELBO_FORMS)
    check_data(model, x)
    q = _posterior(model, x, q)
    z, prior, log_lik = _elbo_draw(model, x, q, k)
    if form == "joint":
        kl = (q.log_prob(z) - prior.log_prob(z)).mean(0)
    elif form == "entropy":
        kl = -prior.log_prob(z).mean(0) - entropy_term(q, z)
    else:  # the analytic KL needs no log-density at z: the cheapest form per training step
        kl = kl_term(q, prior, z)
    return ElboParts(recon=log_lik.mean(0), kl=kl)


def _elbo_draw(model, x: torch.Tensor, q: Distribution, k: int):
    """One draw z ~ q, ``[K, B, d]``, with the prior and log p(x|z), ``[K, B]``: what every ELBO form starts from."""
    prior = model.prior
    z = q.rsample((k,))
    return z, prior, model.decode(z).log_prob(x)


def elbo_integrands(model, x: torch.Tensor, *, k: int, q: Distribution | None = None) -> dict[str, torch.Tensor]:
    """Per-sample integrands of the three ELBO forms from ONE draw of ``k`` samples, ``[k, B]`` each.

    Their means over k are exactly ``elbo_parts(..., form=f).elbo`` for the same draw; their spreads are the forms'
    Monte Carlo variances (analytic entropy and KL, where used, are per-example constants).
    """
    _check_count(k, "k")
    check_data(model, x)
    q = _posterior(model, x, q)
    z, prior, log_lik = _elbo_draw(model, x, q, k)
    log_prior = prior.log_prob(z)
    return {
        "joint": log_lik + log_prior - q.log_prob(z),
        "entropy": log_lik + log_prior + entropy_term(q, z),
        "kl": log_lik - kl_term(q, prior, z),
    }


def elbo(model, x: torch.Tensor, *, k: int = 1, form: ElboForm = "joint", q: Distribution | None = None):
    """The evidence lower bound per example, ``[B]`` nats, averaged over ``k`` samples of q (see :func:`elbo_parts`)."""
    return elbo_parts(model, x, k=k, form=form, q=q).elbo


# --- log-weights and the bounds they give -----------------------------------------------------------------------------
def _log_weights(model, x: torch.Tensor, proposal: Distribution | None, k: int) -> torch.Tensor:
    """``log w [k, B]`` for already-validated inputs; ``proposal=None`` means the prior (naive Monte Carlo)."""
    if proposal is None:
        prior = model.prior
        # a prior of batch [] (p(z)) is drawn (K, B); one of batch [B] (p(z|y), a model given context) is drawn (K,)
        z = _draw(prior, (k,) if _per_example(prior, x) else (k, x.shape[0]))  # (K, B, d)
        return model.decode(z).log_prob(x)  # log p(x|z): the prior terms cancel exactly
    z = _draw(proposal, (k,))  # (K, B, d)
    return model.decode(z).log_prob(x) + model.prior.log_prob(z) - proposal.log_prob(z)


def log_weights(
    model, x: torch.Tensor, *, k: int, proposal: Proposal = "posterior", q: Distribution | None = None
) -> torch.Tensor:
    """Importance log-weights ``log p(x, z_i) - log r(z_i)``, ``[k, B]``, with ``z_i ~ r``.

    ``proposal="posterior"``: r = q(z|x) (``model.encode(x)`` unless ``q`` is given). ``proposal="prior"``: r = p(z),
    so log w = log p(x|z).
    """
    _check_count(k, "k")
    _check_choice(proposal, "proposal", PROPOSALS)
    check_data(model, x)
    return _log_weights(model, x, _proposal(model, x, proposal, q), k)


def iwae_bound(model, x: torch.Tensor, *, k: int, q: Distribution | None = None) -> torch.Tensor:
    """The importance-weighted bound (Burda et al., 2016): log (1/k) sum_i p(x, z_i) / q(z_i|x), ``[B]`` nats.

    IWAE_1 = ELBO <= IWAE_k <= IWAE_k' <= log p(x) for k <= k' (in expectation), and IWAE_k -> log p(x).
    """
    return log_mean_exp(log_weights(model, x, k=k, q=q), dim=0)


# --- streamed log p(x) -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogMarginal:
    """An estimate of log p(x) per example (all fields ``[B]``; ``k`` is the number of samples).

    Attributes:
        value: log p-hat(x) = log (1/k) sum_i w_i, nats.
        stderr: delta-method standard error of ``value``: sqrt((k / ess - 1) / (k - 1)); NaN when k = 1.
        ess: effective sample size (sum w)^2 / sum w^2, between 1 and k.
        pareto_k: PSIS k-hat of the weights' upper tail (Vehtari et al., 2024). At most
            :func:`pareto_k_threshold` (k) (0.7 for k >= 2200, stricter below) the estimate is reliable; above, its
            variance may be infinite and ``stderr`` meaningless. -inf when the tail is flat (the largest
            log-weights agree to 1e-6 relative, e.g. the exact posterior as proposal); NaN when k < 21
            (:data:`PARETO_MIN_SAMPLES`: a tail of fewer than 5 weights is too short to fit).
        iwae: ``{j: IWAE_j}`` for the ``iwae_ks`` asked of :func:`log_marginal`: log (1/j) sum_{i <= j} w_i, the bound
            from the first j of the same samples (nested prefixes of one draw, so no extra decoder passes).
        iwae_stderr: ``{j: stderr of IWAE_j}``, the delta-method error of ``value`` computed from the first j weights.
    """

    value: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor
    pareto_k: torch.Tensor
    k: int
    iwae: dict[int, torch.Tensor] = field(default_factory=dict)
    iwae_stderr: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class PosteriorGap:
    """log p-hat(x) - ELBO-hat, an estimate of KL(q(z|x) || p(z|x)) in nats (``[B]``), with its standard error."""

    value: torch.Tensor
    stderr: torch.Tensor


def _bound_and_stderr(m, s_w, s_ww, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log (1/n) sum w, its delta-method stderr and the ESS, from sums of w and w^2 taken relative to e^m."""
    value = m + torch.log(s_w) - math.log(n)
    ess = s_w**2 / s_ww
    if n > 1:
        stderr = ((n / ess - 1).clamp_min(0) / (n - 1)).sqrt()
    else:
        stderr = torch.full_like(value, math.nan)
    return value, stderr, ess


class _WeightStats:
    """Running sums over chunks of log-weights ``[c, B]``: everything later reported, in one pass.

    Memory per example: a few running sums, plus the M + 1 largest log-weights for the Pareto fit, M ~ 3 sqrt(k)
    (213 values at k = 5000), and chunks held back until they make up _TOP_BUFFER rows: flat in k for practical
    purposes. Held-back chunks are folded into the sums and the tail together, as one block: a chunk costs O(1)
    (an append) whatever its size, so ``chunk_size=1`` is not slower per sample than large chunks in the statistics
    (it was 1.4 ms a chunk when every update summed over the held-back chunks and did ~15 small tensor operations:
    benchmarks/stream_chunks.py). (A top-k over [chunk + M, B] per chunk cost ~6% of a compiled k = 5000
    evaluation; one per _TOP_BUFFER rows costs ~0.3%.) How the samples are blocked changes the results only by
    rounding (tests/test_estimators.py::streaming_rounding_bounds).

    Weights are kept relative to a running max ``m`` (rescaled when it grows), log-weights relative to a shift
    ``c0`` (the first block's mean) so their squares do not lose precision. Accumulates in float64.
    """

    def __init__(self, tail: int, prefixes: tuple[int, ...] = ()):
        self.tail = tail  # how many of the largest log-weights to keep for the Pareto fit
        self.prefixes = prefixes  # sample counts j at which to record IWAE_j of the first j samples
        self.prefix_bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # j -> (IWAE_j, its stderr)
        self.n = 0  # samples folded into the sums
        self.pending: list[torch.Tensor] = []  # chunks not folded yet, [c, B] each
        self.pending_rows = 0  # their total rows: a running count (summing the lengths cost O(chunks) per update)

    def update(self, lw: torch.Tensor) -> None:
        self.pending.append(lw.detach().to(torch.float64))
        self.pending_rows += lw.shape[0]
        if self.pending_rows >= _TOP_BUFFER:
            self._fold()

    def _fold(self) -> None:
        """Fold the held-back chunks, ``[rows, B]`` together, into the running sums, the prefixes and the tail."""
        if not self.pending:
            return
        lw = self.pending[0] if len(self.pending) == 1 else torch.cat(self.pending, 0)
        self.pending, self.pending_rows = [], 0
        if self.n == 0:
            self.max = lw.max(0).values
            self.shift = lw.mean(0)
            zeros = torch.zeros_like(self.max)
            self.s_w, self.s_ww, self.s_wl, self.s_l, self.s_ll = (zeros.clone() for _ in range(5))
            self.top = lw[:0]
        for j in self.prefixes:
            if self.n < j <= self.n + lw.shape[0]:  # IWAE_j: the running sum so far plus this block's head
                head = lw[: j - self.n]
                # relative to the max of the first j samples only: the block's max may lie beyond them, hundreds of
                # nats higher, and exp(head - that) underflow to 0 (IWAE_j = -inf; found by the fuzzer)
                m = head.max(0).values if self.n == 0 else torch.maximum(self.max, head.max(0).values)
                w = torch.exp(head - m)
                s_w, s_ww = w.sum(0), (w * w).sum(0)
                if self.n:  # plus the running sums so far, rescaled to the common max
                    rescale = torch.exp(self.max - m)
                    s_w, s_ww = self.s_w * rescale + s_w, self.s_ww * rescale**2 + s_ww
                self.prefix_bounds[j] = _bound_and_stderr(m, s_w, s_ww, j)[:2]
        new_max = torch.maximum(self.max, lw.max(0).values)
        rescale = torch.exp(self.max - new_max)
        w = torch.exp(lw - new_max)
        centered = lw - self.shift
        self.s_w = self.s_w * rescale + w.sum(0)
        self.s_ww = self.s_ww * rescale**2 + (w * w).sum(0)
        self.s_wl = self.s_wl * rescale + (w * centered).sum(0)
        self.s_l = self.s_l + centered.sum(0)
        self.s_ll = self.s_ll + (centered * centered).sum(0)
        self.max = new_max
        if self.tail:
            both = torch.cat([self.top, lw], 0)
            self.top = both.topk(min(self.tail + 1, both.shape[0]), dim=0).values
        self.n += lw.shape[0]

    def log_marginal(self) -> LogMarginal:
        self._fold()
        value, stderr, ess = _bound_and_stderr(self.max, self.s_w, self.s_ww, self.n)
        return LogMarginal(
            value=value,
            stderr=stderr,
            ess=ess,
            pareto_k=self._pareto_k(),
            k=self.n,
            iwae={j: bound for j, (bound, _) in self.prefix_bounds.items()},
            iwae_stderr={j: se for j, (_, se) in self.prefix_bounds.items()},
        )

    def posterior_gap(self) -> PosteriorGap:
        """gap = log(mean w) - mean(log w); delta-method variance from the pair (w, log w) of the same samples."""
        self._fold()
        n = self.n
        mean_w, mean_l = self.s_w / n, self.s_l / n
        value = self.max + torch.log(mean_w) - (self.shift + mean_l)
        if n == 1:
            return PosteriorGap(value=value, stderr=torch.full_like(value, math.nan))
        unbiased = n / (n - 1)
        rel_var_w = (self.s_ww / n / mean_w**2 - 1) * unbiased  # Var(w) / E[w]^2
        cov_wl = (self.s_wl / n / mean_w - mean_l) * unbiased  # Cov(w, log w) / E[w]
        var_l = (self.s_ll / n - mean_l**2) * unbiased  # Var(log w)
        stderr = ((rel_var_w - 2 * cov_wl + var_l).clamp_min(0) / n).sqrt()
        return PosteriorGap(value=value, stderr=stderr)

    def _pareto_k(self) -> torch.Tensor:
        if not self.tail:
            return torch.full_like(self.max, math.nan)
        return pareto_khat(self.top)


def pareto_k_threshold(k: int) -> float:
    """The k-hat above which k importance samples give an unreliable estimate: min(1 - 1/log10(k), 0.7).

    Vehtari et al. (2024, sec. 3): with fewer samples a lighter tail is already too heavy (0.5 at k = 100).
    """
    return min(1.0 - 1.0 / math.log10(k), 0.7) if k > 10 else 0.0


# The fewest samples whose Pareto tail is fitted: M = ceil(0.2 k) reaches 5 weights at k = 21 (0.2 * 21 = 4.2), as in
# PSIS's reference implementations (arviz fits a tail of more than 4); below, k-hat is NaN.
PARETO_MIN_SAMPLES = 21
_PARETO_MIN_TAIL = 5


def _pareto_tail_size(k: int) -> int:
    """PSIS tail length M = min(ceil(0.2 k), ceil(3 sqrt(k))); 0 (no fit) when M < 5, i.e. k < 21."""
    m = min(math.ceil(0.2 * k), math.ceil(3 * math.sqrt(k)))
    return m if m >= _PARETO_MIN_TAIL else 0


def pareto_khat(top_log_weights: torch.Tensor) -> torch.Tensor:
    """Fit a generalized Pareto tail to the largest weights and return its shape k-hat, ``[B]``.

    Args:
        top_log_weights: ``[M + 1, B]``, each column the M + 1 largest log-weights of one example in descending
            order; the last row is the threshold, the first M the tail.

    Uses the empirical-Bayes estimator of Zhang & Stephens (2009) with the weakly informative prior on k-hat used
    in PSIS (Vehtari et al., 2024): an average over a grid of candidate values, weighted by their profile likelihood.
    """
    lw = top_log_weights.to(torch.float64)
    n = lw.shape[0] - 1  # tail length M
    scaled = torch.exp(lw - lw[0])  # largest weight -> 1
    x = (scaled[:n] - scaled[n]).flip(0)  # exceedances over the threshold, ascending: (M, B)
    # A tail within rounding of flat (e.g. the exact posterior as proposal) has no shape to fit.
    flat = (lw[0] - lw[n]) <= _FLAT_TAIL * lw[0].abs().clamp_min(1.0)
    x = torch.where(flat, torch.ones_like(x), x)  # placeholder values for flat columns, masked below
    grid = 30 + int(math.sqrt(n))
    j = torch.arange(1, grid + 1, dtype=x.dtype, device=x.device)
    quartile = x[int(n / 4 + 0.5) - 1].clamp_min(torch.finfo(x.dtype).tiny)
    theta = (1 - torch.sqrt(grid / (j - 0.5)))[:, None] / (3 * quartile) + 1 / x[-1]  # (grid, B)
    shape_given_theta = torch.log1p(-theta[:, None, :] * x[None]).mean(1)  # (grid, B)
    profile = n * (torch.log(-theta / shape_given_theta) - shape_given_theta - 1)  # (grid, B)
    theta_hat = (torch.softmax(profile, dim=0) * theta).sum(0)  # (B,)
    khat = torch.log1p(-theta_hat * x).mean(0)
    khat = (n * khat + 10 * 0.5) / (n + 10)  # prior pulling k-hat towards 0.5 with weight of 10 observations
    return torch.where(flat, torch.full_like(khat, -math.inf), khat)


def _auto_chunk(model, x: torch.Tensor, k: int, *, compiled: bool = False) -> int:
    """Samples per chunk: on CPU a few MiB of decoder output (caches decide); on a GPU, from its free memory."""
    per_sample = x.shape[0] * max(math.prod(x.shape[1:]), latent_dim(model))
    elements = _AUTO_CHUNK_ELEMENTS_COMPILED if compiled else _AUTO_CHUNK_ELEMENTS
    if x.device.type == "cuda":  # large kernels pay on a GPU: 1/_CUDA_TEMPORARIES of the free memory per tensor
        free, _ = torch.cuda.mem_get_info(x.device)
        elements = max(elements, min(free // (x.element_size() * _CUDA_TEMPORARIES), _CUDA_MAX_CHUNK_ELEMENTS))
    return max(1, min(k, elements // max(per_sample, 1)))


@functools.cache
def _compiled_log_weights():
    """:func:`_log_weights` through ``torch.compile`` (built on first use: importing vaelab stays light)."""
    return torch.compile(_log_weights, dynamic=False)


def _stream(model, x, *, k, proposal, chunk_size, q, tail, compile=False, prefixes=()) -> _WeightStats:
    """The weight statistics of ``k`` samples, drawn ``chunk_size`` at a time (arguments checked by the caller)."""
    check_data(model, x)
    if chunk_size is None:
        chunk_size = _auto_chunk(model, x, k, compiled=compile)
    stats = _WeightStats(tail=tail, prefixes=prefixes)
    if compile:
        room_for(model)
    with torch.no_grad():  # diagnostics only: no graph is kept across chunks, so memory stays flat in k
        r = _proposal(model, x, proposal, q)
        done = 0
        while done < k:
            c = min(chunk_size, k - done)
            # Compiled, every chunk has the same size (a last, shorter one is drawn whole and cut): one compilation.
            lw = _compiled_chunk(model, x, r, chunk_size) if compile else None
            compile = lw is not None
            stats.update(lw[:c] if lw is not None else _log_weights(model, x, r, c))
            done += c
    return stats


def _compiled_chunk(model, x, r, chunk_size: int) -> torch.Tensor | None:
    """A chunk's log-weights, compiled (the first call compiles); None, with a warning, if compilation fails."""
    try:
        return _compiled_log_weights()(model, x, r, chunk_size)
    except Exception as err:  # any compiler failure (no C++ compiler, an unsupported op): eager; a bug in the model
        # itself then raises again, eagerly, with a plain traceback
        message = f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); evaluating eagerly"
        warnings.warn(message, stacklevel=3)
        return None


def log_marginal(
    model,
    x: torch.Tensor,
    *,
    k: int,
    proposal: Proposal = "posterior",
    chunk_size: int | None = None,
    q: Distribution | None = None,
    compile: bool = False,
    iwae_ks: Sequence[int] = (),
) -> LogMarginal:
    """Estimate log p(x) per example by importance sampling, streamed over ``k`` in chunks.

    p(x) = E_r[p(x, z) / r(z)] for any r covering the posterior. ``proposal="posterior"`` uses r = q(z|x): the IWAE_k
    estimate, a stochastic lower bound that converges to log p(x). ``proposal="prior"`` uses r = p(z): naive Monte
    Carlo, unbiased for p(x) but with a variance that explodes when the posterior is narrow relative to the prior.

    Memory is flat in k (up to the O(sqrt k) Pareto tail): chunks of ``chunk_size`` samples (auto-sized from the data
    size when ``None``) are folded into running sums. Runs without gradients (:func:`iwae_bound` is differentiable).

    ``compile=True`` runs each chunk's log-weights through ``torch.compile`` (the decoder and the log-densities fused
    into a few kernels): faster per sample once compiled, for a one-off compilation of several seconds per model and
    batch shape, so worth it for long evaluations (docs/performance.md). Same estimator, different random draws. If
    compilation fails (e.g. no C++ compiler), a warning says so and the estimate is computed eagerly.

    On CPU with glibc, eager streaming runs up to 2x faster in a process that keeps freed memory for reuse:
    :func:`vaelab.keep_freed_memory` sets that, process-wide, for the caller who wants it (the command line and the
    benchmarks do); this function never changes the process's allocator itself.

    ``iwae_ks``: sample counts j <= k at which the IWAE_j bound of the first j samples is recorded as well
    (``result.iwae[j]``): the whole IWAE ladder from the one stream of log-weights.

    Returns:
        :class:`LogMarginal` with ``value``, ``stderr``, ``ess`` and ``pareto_k``, each ``[B]``, and ``iwae``.
    """
    _check_count(k, "k")  # first: everything below computes with k
    _check_choice(proposal, "proposal", PROPOSALS)
    _check_chunk_size(chunk_size)
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if isinstance(iwae_ks, str | bytes) or not isinstance(iwae_ks, Sequence):
        raise ValueError(f"iwae_ks must be a sequence of integers, got {iwae_ks!r}")
    prefixes = tuple(sorted({_check_count(j, "each of iwae_ks") for j in iwae_ks}))
    if prefixes and prefixes[-1] > k:
        raise ValueError(f"iwae_ks must be at most k = {k}, got {prefixes[-1]}")
    tail = _pareto_tail_size(k)
    stats = _stream(
        model, x, k=k, proposal=proposal, chunk_size=chunk_size, q=q, tail=tail, compile=compile, prefixes=prefixes
    )
    return stats.log_marginal()


def posterior_gap(
    model, x: torch.Tensor, *, k: int, chunk_size: int | None = None, q: Distribution | None = None
) -> PosteriorGap:
    """Estimate KL(q(z|x) || p(z|x)) = log p(x) - ELBO(q) per example, from ``k`` samples of q.

    Both terms come from the same samples: gap = log mean_i w_i - mean_i log w_i (>= 0 by Jensen). Because
    log p-hat_k is itself biased low, E[gap] <= the true gap, the shortfall shrinking like O(1/k).
    """
    _check_count(k, "k")
    _check_chunk_size(chunk_size)
    return _stream(model, x, k=k, proposal="posterior", chunk_size=chunk_size, q=q, tail=0).posterior_gap()
