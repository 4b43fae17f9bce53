"""Training objectives: per-example surrogate losses built from the estimators in :mod:`vaelab.estimators`.

Every objective is a pure function ``objective(model, x, *, k=1, beta=1.0, q=None, ...) -> ObjectiveOutput``
with keyword-only options; :data:`OBJECTIVES` maps names to them. ``loss`` (``[B]``) is the surrogate to
minimise: its gradient is the objective's gradient, and the training loop reduces it once,
``out.loss.mean().backward()``. Alongside it come detached per-example values for reporting, among them the
unweighted (beta = 1) ELBO, whatever the objective trains.

No density or KL is written here: values come from :func:`~vaelab.estimators.elbo_parts`,
:func:`~vaelab.estimators.log_weights` and ``torch.distributions``. The exceptions are DReG, which needs the
log-weights with q's parameters cut from the graph (see :func:`iwae_dreg_objective`), and PIWAE, which needs
log p(x, z) and log q(z|x) apart to give the encoder and the decoder different gradients (:func:`piwae_objective`).

``q=`` replaces ``model.encode(x)``, as in the estimators: it must have batch ``[B]`` and event ``[d]``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from vaelab._math import log_mean_exp
from vaelab.estimators import (
    ElboForm,
    ElboParts,
    _check_count,
    _posterior,
    check_data,
    elbo_parts,
    log_weights,
)
from vaelab.posteriors import kl_per_dimension


@dataclass(frozen=True)
class ObjectiveOutput:
    """One training objective evaluated on a batch; every field is per example, ``[B]``, in nats.

    Attributes:
        loss: the surrogate to minimise (attached to the graph). Its value is minus the objective; its
            gradient is the objective's gradient (for DReG, the reduced-variance estimator of it).
        elbo: the unweighted (beta = 1) ELBO estimate from the same samples, detached: what gets reported.
        recon: E_q[log p(x|z)] estimate, detached; ``None`` where the objective leaves the ELBO unsplit.
        kl: KL(q(z|x) || p(z)) estimate (``elbo = recon - kl``), detached; ``None`` where ``recon`` is.
    """

    loss: torch.Tensor
    elbo: torch.Tensor
    recon: torch.Tensor | None
    kl: torch.Tensor | None


Objective = Callable[..., ObjectiveOutput]


# --- validation -------------------------------------------------------------------------------------------------------
def _check_nonnegative(value: object, name: str) -> float | torch.Tensor:
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        # A 0-d tensor is taken as is: compiled training passes a schedule's changing values (checked by the
        # schedule) as tensors, since a Python float would be a compile-time constant, recompiled at every change.
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _require_unit_beta(beta: object, objective: str, why: str) -> None:
    if _check_nonnegative(beta, "beta") != 1.0:
        raise ValueError(f"the {objective} objective takes no KL weight (beta must be 1, got {beta!r}); {why}")


def _describe(dist: Distribution) -> str:
    if isinstance(dist, Independent):
        return f"Independent({type(dist.base_dist).__name__}, {dist.reinterpreted_batch_ndims})"
    return type(dist).__name__


def _from_parts(loss: torch.Tensor, parts: ElboParts) -> ObjectiveOutput:
    recon, kl = parts.recon.detach(), parts.kl.detach()
    return ObjectiveOutput(loss=loss, elbo=recon - kl, recon=recon, kl=kl)


# --- the ELBO and its weighted variants -------------------------------------------------------------------------------
def elbo_objective(
    model,
    x: torch.Tensor,
    *,
    k: int = 1,
    beta: float = 1.0,
    form: ElboForm = "joint",
    q: Distribution | None = None,
) -> ObjectiveOutput:
    """The (beta-weighted) ELBO: loss = -(recon - beta * kl), from ``k`` samples of q in the given ``form``.

    At beta = 1 the loss is exactly minus :func:`vaelab.estimators.elbo`; beta > 1 is the beta-VAE objective
    (Higgins et al., 2017), beta < 1 a KL warm-up stage (see :mod:`vaelab.schedules`).

    Args:
        k: samples of q averaged per example.
        beta: KL weight, >= 0.
        form: how the KL is estimated (see :func:`~vaelab.estimators.elbo_parts`).
        q: replaces ``model.encode(x)``.
    """
    beta = _check_nonnegative(beta, "beta")
    parts = elbo_parts(model, x, k=k, form=form, q=q)
    return _from_parts(-(parts.recon - beta * parts.kl), parts)


def capacity_objective(
    model,
    x: torch.Tensor,
    *,
    capacity: float,
    gamma: float,
    k: int = 1,
    beta: float = 1.0,
    form: ElboForm = "kl",
    q: Distribution | None = None,
) -> ObjectiveOutput:
    """Controlled capacity (Burgess et al., 2018): loss = -(recon - gamma * |kl - C|), per example.

    The KL is pulled towards the target C (nats) rather than towards 0; C usually grows over training (the
    ``capacity`` schedule in :mod:`vaelab.schedules` supplies ``capacity`` and ``gamma``). The absolute value
    is taken per example (some implementations take it of the batch-mean KL instead). ``form`` defaults to the
    analytic KL: |.| of a noisy Monte Carlo KL would be biased upwards.

    Args:
        capacity: the target KL C, nats, >= 0.
        gamma: weight of the deviation from C, >= 0.
        beta: must be 1 (gamma plays its part).
    """
    _require_unit_beta(beta, "capacity", "the KL is weighted by gamma around the target capacity")
    capacity = _check_nonnegative(capacity, "capacity")
    gamma = _check_nonnegative(gamma, "gamma")
    parts = elbo_parts(model, x, k=k, form=form, q=q)
    return _from_parts(-(parts.recon - gamma * (parts.kl - capacity).abs()), parts)


def _kl_per_dimension(q: Distribution, prior: Distribution) -> torch.Tensor:
    """KL(q_j || p_j) per latent dimension, ``[B, d]``, with the error saying why free bits needs it."""
    try:
        return kl_per_dimension(q, prior)
    except ValueError as err:
        raise ValueError(
            f"free bits needs the KL per latent dimension: {err} (q: {_describe(q)}, prior: {_describe(prior)})"
        ) from err


def free_bits_objective(
    model,
    x: torch.Tensor,
    *,
    free_nats: float,
    k: int = 1,
    beta: float = 1.0,
    q: Distribution | None = None,
) -> ObjectiveOutput:
    """Free bits (Kingma et al., 2016, "Improved variational inference with inverse autoregressive flow").

    Each latent dimension's KL, averaged over the batch, is floored at lambda = ``free_nats``:

        objective = mean_b recon_b - beta * sum_j max(lambda, mean_b KL_bj),

    so no gradient pushes a dimension's KL below lambda. As a per-example surrogate whose batch mean is
    exactly minus that objective: loss_b = -(recon_b - beta * sum_j c_bj), with c_bj = lambda (a constant, no
    gradient) for dimensions whose batch-mean KL is below lambda and c_bj = KL_bj otherwise. The floor depends
    on the batch, so loss_b is not a function of example b alone. The reported ELBO is the plain one (analytic
    KL).

    Requires q and the prior to be factorised Gaussians (``Independent(Normal, 1)``); raises ``ValueError``
    otherwise.

    Args:
        free_nats: lambda, nats per latent dimension, >= 0.
        k: samples of q for the reconstruction term.
        beta: KL weight, >= 0.
        q: replaces ``model.encode(x)``.
    """
    beta = _check_nonnegative(beta, "beta")
    free_nats = _check_nonnegative(free_nats, "free_nats")
    check_data(model, x)
    _check_count(k, "k")
    q = _posterior(model, x, q)
    kl_dims = _kl_per_dimension(q, model.prior)  # (B, d)
    below = kl_dims.detach().mean(0) < free_nats  # (d,)
    floored = torch.where(below, torch.full_like(kl_dims, free_nats), kl_dims)  # (B, d)
    parts = elbo_parts(model, x, k=k, form="kl", q=q)
    return _from_parts(-(parts.recon - beta * floored.sum(-1)), parts)


# --- importance-weighted objectives -----------------------------------------------------------------------------------
_IW_BETA = "beta-weighting of an importance-weighted bound is not defined here"


def iwae_objective(
    model, x: torch.Tensor, *, k: int = 1, beta: float = 1.0, q: Distribution | None = None
) -> ObjectiveOutput:
    """The IWAE bound (Burda et al., 2016): loss = -log (1/k) sum_i w_i, w_i = p(x, z_i) / q(z_i|x).

    Gradients are the standard reparameterized ones: sum_i w~_i grad log w_i with w~ = w / sum w. ``elbo`` is
    mean_i log w_i from the same samples; ``recon`` and ``kl`` are ``None`` (the log-weights come unsplit).

    Args:
        k: importance samples per example (k = 1: the ELBO).
        beta: must be 1.
        q: replaces ``model.encode(x)``.
    """
    _require_unit_beta(beta, "iwae", _IW_BETA)
    lw = log_weights(model, x, k=k, q=q)  # (K, B)
    return ObjectiveOutput(loss=-log_mean_exp(lw, dim=0), elbo=lw.mean(0).detach(), recon=None, kl=None)


def _detach_parameters(q: Distribution) -> Distribution:
    """q with its parameters cut from the graph: same density, no gradient to the encoder through log q."""
    if isinstance(q, Independent) and isinstance(q.base_dist, Normal):
        base = q.base_dist
        return Independent(
            Normal(base.loc.detach(), base.scale.detach(), validate_args=False), q.reinterpreted_batch_ndims
        )
    if isinstance(q, MultivariateNormal):
        return MultivariateNormal(q.loc.detach(), scale_tril=q.scale_tril.detach(), validate_args=False)
    raise ValueError(
        f"DReG needs q with detachable parameters: Independent(Normal, n) or MultivariateNormal; got {_describe(q)}"
    )


def iwae_dreg_objective(
    model, x: torch.Tensor, *, k: int = 1, beta: float = 1.0, q: Distribution | None = None
) -> ObjectiveOutput:
    """IWAE with doubly reparameterized gradients, DReG (Tucker, Lawson, Gu & Maddison, 2019, "Doubly
    reparameterized gradient estimators for Monte Carlo objectives").

    Same value as :func:`iwae_objective` (loss = -IWAE_k) and the same decoder gradient sum_i w~_i grad_theta
    log w_i, but the encoder gradient is the lower-variance, still unbiased

        grad_phi IWAE_k ~= sum_i w~_i^2 (d log w_i / d z_i) (d z_i / d phi),

    with log w_i evaluated with q's parameters held fixed (only the path through z_i). One decoder pass: z = q
    rsampled; log w computed with a parameter-detached copy of q; a hook on z scales its incoming gradient by
    w~_i; the surrogate s = sum_i w~_i log w_i (w~ detached) then carries exactly both gradients, and
    loss = -IWAE.detach() - (s - s.detach()) has the value -IWAE.

    Assumes the encoder's and decoder's parameters are disjoint. q must be ``Independent(Normal)`` or
    ``MultivariateNormal`` (``ValueError`` otherwise). ``recon`` and ``kl`` are the joint-form ELBO's terms
    from the same samples.

    Args:
        k: importance samples per example (k = 1: the ELBO with the "sticking the landing" gradient).
        beta: must be 1.
        q: replaces ``model.encode(x)``.
    """
    _require_unit_beta(beta, "iwae_dreg", _IW_BETA)
    check_data(model, x)
    _check_count(k, "k")
    q = _posterior(model, x, q)
    q_fixed = _detach_parameters(q)
    z = q.rsample((k,))  # (K, B, d)
    log_px_z = model.decode(z).log_prob(x)  # (K, B)
    log_pz = model.prior.log_prob(z)  # (K, B)
    log_q = q_fixed.log_prob(z)  # (K, B): gradient only through z
    lw = log_px_z + log_pz - log_q  # (K, B)
    w = torch.softmax(lw.detach(), dim=0)  # (K, B) normalized weights w~
    if z.requires_grad:
        # the encoder sees w~_i * (d s / d z_i) = w~_i^2 d log w_i / d z_i; the decoder's gradient skips z
        z.register_hook(lambda grad: grad * w.unsqueeze(-1))
    s = (w * lw).sum(0)  # (B,)
    bound = log_mean_exp(lw.detach(), dim=0)
    loss = -bound - (s - s.detach())
    recon = log_px_z.mean(0).detach()
    kl = (log_q - log_pz).mean(0).detach()
    return ObjectiveOutput(loss=loss, elbo=recon - kl, recon=recon, kl=kl)


# --- tighter is not necessarily better: MIWAE, CIWAE, PIWAE -----------------------------------------------------------
# Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh (2018), "Tighter variational bounds are not necessarily better":
# the signal-to-noise ratio of the encoder's IWAE_K gradient falls as 1/sqrt(K), so these objectives trade some
# tightness for a better-behaved encoder gradient. Each is a reduction of one log-weight matrix.
def _check_fraction(value: object, name: str) -> float | torch.Tensor:
    value = _check_nonnegative(value, name)
    if not isinstance(value, torch.Tensor) and value > 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _grouped_bound(lw: torch.Tensor, m: int) -> torch.Tensor:
    """MIWAE(M, K) from log-weights ``[M * K, B]``: mean over M consecutive groups of log mean_K exp, ``[B]``."""
    return log_mean_exp(lw.reshape(m, -1, lw.shape[-1]), dim=1).mean(0)  # (M, K, B) -> (M, B) -> (B,)


def miwae_objective(
    model, x: torch.Tensor, *, m: int, k: int = 1, beta: float = 1.0, q: Distribution | None = None
) -> ObjectiveOutput:
    """MIWAE(M, K) (Rainforth et al., 2018): the mean of M independent IWAE_K bounds,

        MIWAE = (1/M) sum_m log (1/K) sum_k w_mk,   w_mk = p(x, z_mk) / q(z_mk|x),

    from ``m * k`` draws of q (one :func:`~vaelab.estimators.log_weights` call, split into M groups of K). M = 1 is
    IWAE_K, K = 1 is the ELBO from M samples. Gradients are the standard reparameterized ones. ``elbo`` is the mean
    log-weight of all M * K samples; ``recon`` and ``kl`` are ``None``.

    Args:
        m: M, the number of IWAE_K bounds averaged (integer >= 1).
        k: K, importance samples per bound.
        beta: must be 1.
        q: replaces ``model.encode(x)``.
    """
    _require_unit_beta(beta, "miwae", _IW_BETA)
    _check_count(m, "m")
    _check_count(k, "k")
    lw = log_weights(model, x, k=m * k, q=q)  # (M * K, B)
    return ObjectiveOutput(loss=-_grouped_bound(lw, m), elbo=lw.mean(0).detach(), recon=None, kl=None)


def ciwae_objective(
    model,
    x: torch.Tensor,
    *,
    elbo_weight: float,
    k: int = 1,
    beta: float = 1.0,
    q: Distribution | None = None,
) -> ObjectiveOutput:
    """CIWAE(beta) (Rainforth et al., 2018): the convex combination beta * ELBO + (1 - beta) * IWAE_K of the two
    bounds from the same K draws (``elbo_weight`` is the paper's beta; ``beta`` stays vaelab's KL weight).

    Args:
        elbo_weight: the ELBO's weight, in [0, 1]: 1 is the ELBO from K samples, 0 is IWAE_K.
        k: K, importance samples per example.
        beta: must be 1.
        q: replaces ``model.encode(x)``.
    """
    _require_unit_beta(beta, "ciwae", "its ELBO weight is elbo_weight")
    elbo_weight = _check_fraction(elbo_weight, "elbo_weight")
    lw = log_weights(model, x, k=k, q=q)  # (K, B)
    elbo = lw.mean(0)
    bound = elbo_weight * elbo + (1 - elbo_weight) * log_mean_exp(lw, dim=0)
    return ObjectiveOutput(loss=-bound, elbo=elbo.detach(), recon=None, kl=None)


def piwae_objective(
    model, x: torch.Tensor, *, m: int, k: int = 1, beta: float = 1.0, q: Distribution | None = None
) -> ObjectiveOutput:
    """PIWAE(M, K) (Rainforth et al., 2018): from the same M * K draws of q, the inference network (encoder) follows
    the gradient of MIWAE(M, K) and the generative network (decoder and prior) that of IWAE_{M K}.

    One decoder pass, with the gradient split as in :func:`iwae_dreg_objective`: with log w_i = log p(x, z_i) -
    log q(z_i|x), a_i = the normalized weights of all M K samples (IWAE_{MK}'s) and b_i = those within z_i's group of
    K, divided by M (MIWAE's), the surrogate is

        s = sum_i a_i log p(x, z_i) - sum_i b_i log q(z_i|x)      (a, b detached),

    and a hook on the z fed to p(x, z) scales its incoming gradient by b_i / a_i = exp(LSE_all - LSE_group) / M (one
    factor per group, computed in log space). So theta, which only log p(x, z) sees, gets sum_i a_i grad log p(x,
    z_i) = grad IWAE_{MK}; phi, through z and through q's parameters, gets sum_i b_i grad log w_i = grad MIWAE.
    (Where a sample's IWAE_{MK} weight a_i underflows to 0, in float32 when its group lies ~100 nats below the best
    sample, its path gradient to the encoder is lost: b_i / a_i cannot restore it.)

    The loss's value is -IWAE_{MK}, the tighter of the two bounds. Assumes the encoder's parameters are disjoint from
    the decoder's and the prior's (a prior that runs the encoder, as the VampPrior does, passes the IWAE_{MK}
    gradient to the encoder through p(z)). ``elbo``, ``recon``, ``kl``: the joint-form ELBO's terms.

    Args:
        m: M, the number of groups (integer >= 1); m = 1 is IWAE_K for both networks.
        k: K, importance samples per group.
        beta: must be 1.
        q: replaces ``model.encode(x)``.
    """
    _require_unit_beta(beta, "piwae", _IW_BETA)
    _check_count(m, "m")
    check_data(model, x)
    _check_count(k, "k")
    q = _posterior(model, x, q)
    z = q.rsample((m * k,))  # (M * K, B, d)
    z_gen = z.view_as(z)  # the z p(x, z) sees: its gradient is rescaled by the hook, that of log q(z|x) is not
    log_px_z = model.decode(z_gen).log_prob(x)  # (M * K, B)
    log_pz = model.prior.log_prob(z_gen)  # (M * K, B)
    log_q = q.log_prob(z)  # (M * K, B)
    lw = (log_px_z + log_pz - log_q).detach()  # (M * K, B)
    groups = lw.reshape(m, k, -1)  # (M, K, B)
    a = torch.softmax(lw, dim=0)  # (M * K, B): IWAE_{MK}'s normalized weights
    b = (torch.softmax(groups, dim=1) / m).reshape_as(lw)  # (M * K, B): MIWAE's
    if z_gen.requires_grad:
        log_ratio = torch.logsumexp(lw, dim=0) - torch.logsumexp(groups, dim=1) - math.log(m)  # (M, B): log b/a
        # finite even where a underflowed to 0 (where its incoming gradient is 0): no inf * 0
        log_ratio = log_ratio.clamp_max(math.log(torch.finfo(lw.dtype).max) - 1)
        ratio = log_ratio.exp().repeat_interleave(k, dim=0)  # (M * K, B)
        z_gen.register_hook(lambda grad: grad * ratio.unsqueeze(-1))
    s = (a * (log_px_z + log_pz)).sum(0) - (b * log_q).sum(0)  # (B,)
    bound = log_mean_exp(lw, dim=0)
    loss = -bound - (s - s.detach())
    recon = log_px_z.mean(0).detach()
    kl = (log_q - log_pz).mean(0).detach()
    return ObjectiveOutput(loss=loss, elbo=recon - kl, recon=recon, kl=kl)


OBJECTIVES: dict[str, Objective] = {
    "elbo": elbo_objective,
    "capacity": capacity_objective,
    "free_bits": free_bits_objective,
    "iwae": iwae_objective,
    "iwae_dreg": iwae_dreg_objective,
    "miwae": miwae_objective,
    "ciwae": ciwae_objective,
    "piwae": piwae_objective,
}


def check_objective_arguments(objective_name: str, schedule_name: str, options: dict, from_schedule: dict) -> None:
    """Refuse, before the first step, keyword arguments the objective would refuse at it: missing, unknown, or set
    both by ``objective_options`` and by the schedule."""
    parameters = inspect.signature(OBJECTIVES[objective_name]).parameters
    keyword = {name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    name = f"the {objective_name!r} objective"
    twice = sorted(set(options) & set(from_schedule))
    if twice:
        raise ValueError(
            f"{', '.join(twice)} of {name} is set by the {schedule_name!r} schedule: set it through schedule_options "
            f"(--schedule-options), not objective_options"
        )
    unknown = sorted(set(options) - keyword)
    if unknown:
        choices = sorted(keyword - set(from_schedule) - {"k", "q"})
        raise ValueError(f"unknown objective_options {', '.join(unknown)} for {name}; it takes {', '.join(choices)}")
    supplied = {"k", *options, *from_schedule}
    missing = [n for n, p in parameters.items() if n in keyword and p.default is p.empty and n not in supplied]
    if missing:
        where = f"objective_options (--objective-options '{{\"{missing[0]}\": ...}}')"
        if set(missing) <= {"capacity", "gamma"}:  # what the capacity schedule supplies at every step
            where = f"the capacity schedule (--schedule capacity), or {where}"
        raise ValueError(f"{name} needs {', '.join(missing)}: set {'it' if len(missing) == 1 else 'them'} with {where}")
