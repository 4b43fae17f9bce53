"""Diagnostics that look inside a trained model, for any q(z|x) with ``rsample`` and ``log_prob``.

* :func:`gap_decomposition` -- the posterior gap split into approximation and amortization gaps (Cremer et al. 2018);
* :func:`elbo_form_variances` -- the three ELBO forms from the same samples, with their per-sample variances;
* :func:`estimator_study` -- naive vs importance-sampled log p(x) over k, with stderr, ESS and Pareto k-hat;
* :func:`iwae_curve` -- IWAE_k against k;
* :func:`diagnostics` -- the headline evaluation (:func:`vaelab.evaluate.evaluate_model`) on every example plus the
  diagnostics above on a bounded subset, in one :class:`Diagnostics`.

Results are dataclasses of tensors (nats per example; per-example values ``[N]``), turned into JSON once, by
:func:`vaelab.report.as_json`. A diagnostic that does not apply to a model (e.g. a Gaussian q* for a q on the positive
reals) is a :class:`NotApplicable` with the reason, and the others still run.

Nothing here needs q to be Gaussian: q is sampled and scored through ``rsample`` / ``log_prob`` only, the optimised
q* starts from q's mean and per-dimension standard deviation (closed form where torch knows them, else from samples),
and the defensive proposal is the :class:`EvenMixture` of q and q*.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal, constraints

from vaelab._math import inverse_softplus, positive_scale
from vaelab.estimators import ELBO_FORMS, PROPOSALS, LogMarginal, check_data, elbo, elbo_integrands, log_marginal
from vaelab.evaluate import _concat, _evaluate_model, _should_compile, batches
from vaelab.models import bind
from vaelab.posteriors import is_factorised_gaussian
from vaelab.progress import progress_bar

IWAE_CURVE_KS: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
STUDY_KS: tuple[int, ...] = (1, 10, 100, 1000, 10000, 100000)
STUDY_KS_FAST: tuple[int, ...] = (1, 10, 100, 1000)
# The slow diagnostics of `diagnostics` (and `vaelab eval` / `vaelab report`) run on the first this many examples: per
# example they cost several headline evaluations (two more streams of k samples for log p-hat, 200 optimisation steps,
# 2 x 1000 ELBO samples), measured in cli.EVAL_COST: ~5 min for 500 MNIST images at k = 5000 on a shared 2-core CPU.
DIAGNOSTICS_EXAMPLES = 500
# The ELBO of a fixed q is averaged over this many independent calls of `estimators.elbo`; their spread gives its
# standard error (49 degrees of freedom: the Z = 4.5 rule of vaelab.tolerance stays a ~1e-4 false-alarm rule).
_ELBO_REPLICATES = 50
# Floor of the optimised q*'s scales (q* scale = softplus(raw) + floor, as every scale in vaelab).
_Q_STAR_MIN_SCALE = 1e-6
# Draws per example for q's moments where torch has no closed form (q*'s starting point only: any rough value works).
MOMENT_SAMPLES = 256


# === results ==========================================================================================================
@dataclass(frozen=True)
class NotApplicable:
    """A diagnostic that does not apply to this model, and why; written as ``"not applicable: <reason>"``."""

    reason: str

    def __str__(self) -> str:
        return f"not applicable: {self.reason}"


@dataclass(frozen=True)
class PerExample:
    """One quantity per example, ``value [N]`` nats, with its Monte Carlo stderr ``[N]`` where it has one, and the
    effective sample size and Pareto k-hat ``[N]`` of the importance weights where it is an importance estimate."""

    value: torch.Tensor
    mc_stderr: torch.Tensor | None = None
    ess: torch.Tensor | None = None
    pareto_k: torch.Tensor | None = None

    @classmethod
    def of(cls, estimate: LogMarginal, rows: slice = slice(None)) -> PerExample:
        """An importance estimate's per-example value, stderr, ESS and k-hat (its ``rows`` only)."""
        return cls(estimate.value[rows], estimate.stderr[rows], estimate.ess[rows], estimate.pareto_k[rows])


@dataclass(frozen=True)
class GapDecomposition:
    """:func:`gap_decomposition`'s result: posterior = approximation + amortization gap, per example, exactly."""

    posterior_gap: PerExample
    approximation_gap: PerExample
    amortization_gap: PerExample
    log_px: PerExample  # the defensive mixture (q + q*) / 2 as proposal
    log_px_encoder: PerExample
    log_px_optimised: PerExample
    elbo_encoder: PerExample
    elbo_optimised: PerExample
    q_star_loc: torch.Tensor  # [N, d]
    q_star_scale: torch.Tensor  # [N, d]
    q_star_start: str  # where q*'s optimisation started: q's closed-form moments or moments of samples
    steps: int
    lr: float
    samples_per_step: int
    k: int
    elbo_k: int
    elbo_form: str

    @property
    def q_star(self) -> Independent:
        """The optimised q* = N(loc, diag(scale^2)), batch ``[N]``, event ``[d]``."""
        return Independent(Normal(self.q_star_loc, self.q_star_scale), 1)


@dataclass(frozen=True)
class ElboForm:
    """One ELBO form on the shared draw: its per-example value (mean of the integrand) and integrand variance."""

    value: PerExample
    variance: torch.Tensor  # [N], nats^2 per sample


@dataclass(frozen=True)
class ElboForms:
    """:func:`elbo_form_variances`' result: each of the three ELBO forms from the same ``k`` samples."""

    forms: dict[str, ElboForm]
    k: int

    @property
    def lowest_variance(self) -> str:
        """The form whose integrand has the smallest mean variance over the examples."""
        return min(self.forms, key=lambda f: self.forms[f].variance.double().mean().item())


@dataclass(frozen=True)
class StudyRow:
    """One (proposal, k) estimate of log p(x) per example (:func:`vaelab.estimators.log_marginal`)."""

    proposal: str
    k: int
    estimate: PerExample


@dataclass(frozen=True)
class EstimatorStudy:
    """:func:`estimator_study`'s result: one row per proposal and k."""

    rows: list[StudyRow]


@dataclass(frozen=True)
class IwaeCurve:
    """:func:`iwae_curve`'s result: the IWAE_k bound per example (``points[i]`` for ``ks[i]``) with its stderr."""

    ks: tuple[int, ...]
    points: list[PerExample]


@dataclass(frozen=True)
class Diagnostics:
    """:func:`diagnostics`' result: the headline ``evaluation`` (JSON-ready dict of
    :func:`vaelab.evaluate.evaluate_model`, every example) and the slow diagnostics on the first ``examples``."""

    evaluation: dict[str, Any]
    examples: int
    gap_decomposition: GapDecomposition | NotApplicable
    elbo_forms: ElboForms | NotApplicable
    iwae_curve: IwaeCurve | NotApplicable
    estimator_study: EstimatorStudy | NotApplicable


# === the even mixture =================================================================================================
class EvenMixture(Distribution):
    """The even mixture (1/n) sum_i q_i of n distributions with the same batch and event shapes.

    ``log_prob(z) = logsumexp_i log q_i(z) - log n``. A draw picks one component uniformly at random, independently
    per sample and batch element, and returns that component's draw (every component is drawn, one is kept: n times
    the sampling cost, none of the decoder's). ``rsample`` is reparameterized when every component's is: the choice
    of component does not depend on any parameter, so gradients flow through the chosen component's sample.

    Used as the defensive proposal (q + q*) / 2 of :func:`gap_decomposition` (Hesterberg, 1995): each importance
    weight is at most n times the weight under any single component.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}  # components validate their own parameters

    def __init__(self, components: Sequence[Distribution], validate_args: bool | None = None):
        components = tuple(components)
        if not components:
            raise ValueError("EvenMixture needs at least one component")
        for i, c in enumerate(components):
            if not isinstance(c, Distribution):
                raise ValueError(f"component {i} must be a torch Distribution, got {type(c).__name__}")
        first = components[0]
        for i, c in enumerate(components[1:], start=1):
            if c.batch_shape != first.batch_shape or c.event_shape != first.event_shape:
                raise ValueError(
                    "EvenMixture components must share batch and event shapes: component 0 has batch "
                    f"{list(first.batch_shape)}, event {list(first.event_shape)}; component {i} ({type(c).__name__}) "
                    f"has batch {list(c.batch_shape)}, event {list(c.event_shape)}"
                )
        self.components = components
        super().__init__(first.batch_shape, first.event_shape, validate_args=validate_args)

    @property
    def has_rsample(self) -> bool:
        return all(c.has_rsample for c in self.components)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return self.components[0].support

    @property
    def mean(self) -> torch.Tensor:
        return torch.stack([c.mean for c in self.components]).mean(0)

    @property
    def variance(self) -> torch.Tensor:
        """Var = E_i[Var_i + mean_i^2] - mean^2 (the law of total variance)."""
        means = torch.stack([c.mean for c in self.components])
        second = torch.stack([c.variance for c in self.components]).mean(0) + means.square().mean(0)
        return (second - means.mean(0).square()).clamp_min(0)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_probs = torch.stack([c.log_prob(value) for c in self.components])  # (n, *S, *batch)
        return torch.logsumexp(log_probs, 0) - math.log(len(self.components))

    def _draw(self, sample_shape: Sequence[int], reparameterized: bool) -> torch.Tensor:
        shape = torch.Size(sample_shape)
        draws = torch.stack([c.rsample(shape) if reparameterized else c.sample(shape) for c in self.components])
        picks = torch.randint(len(self.components), shape + self.batch_shape, device=draws.device)  # (*S, *batch)
        index = picks.reshape(1, *picks.shape, *(1,) * len(self.event_shape)).expand(1, *draws.shape[1:])
        return draws.gather(0, index).squeeze(0)  # (*S, *batch, *event)

    def rsample(self, sample_shape: Sequence[int] = torch.Size()) -> torch.Tensor:
        if not self.has_rsample:
            names = [type(c).__name__ for c in self.components if not c.has_rsample]
            raise NotImplementedError(f"EvenMixture.rsample needs every component to have rsample; {names} do not")
        return self._draw(sample_shape, reparameterized=True)

    def sample(self, sample_shape: Sequence[int] = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self._draw(sample_shape, reparameterized=False)

    def expand(self, batch_shape: Sequence[int], _instance: EvenMixture | None = None) -> EvenMixture:
        return EvenMixture([c.expand(batch_shape) for c in self.components], validate_args=self._validate_args)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(type(c).__name__ for c in self.components)})"


# === q, whatever it is ================================================================================================
def is_real_support(support: constraints.Constraint) -> bool:
    """Whether a support is all of R^n: ``constraints.real``, possibly under ``independent`` (e.g. ``real_vector``)."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def gap_decomposition_not_applicable(q: Distribution) -> str | None:
    """None if :func:`gap_decomposition` applies to q (batch ``[B]``, event ``[d]``), else the reason it does not.

    q* is a diagonal Gaussian on R^d optimised by reparameterized gradients, and q's ELBO needs ``rsample``.
    """
    name = type(q).__name__
    if len(q.event_shape) != 1:
        return f"q* is a diagonal Gaussian over a latent vector, but q ({name}) has event shape {list(q.event_shape)}"
    try:
        support = q.support
    except NotImplementedError:
        return f"q ({name}) declares no support, so a Gaussian q* on R^d may not be comparable with it"
    if not is_real_support(support):
        return f"q* is a Gaussian on R^d, but q ({name}) lives on {support}, where the prior may have no density"
    if not q.has_rsample:
        return f"q ({name}) has no rsample: its ELBO needs reparameterized samples"
    return None


def start_moments(q: Distribution, samples: int = MOMENT_SAMPLES) -> tuple[torch.Tensor, torch.Tensor, str]:
    """q's mean and per-dimension standard deviation, ``[B, d]`` each, and how they were found.

    Closed form where torch knows them (``q.mean``, ``q.variance``: diagonal and full-covariance Gaussians, Student's
    t, mixtures, ...), else the mean and standard deviation of ``samples`` draws (e.g. a hierarchical q). Used as the
    starting point of the diagonal Gaussian q* (its marginal moments, so a correlated q starts at its marginals).
    """
    with torch.no_grad():
        if is_factorised_gaussian(q):
            return q.base_dist.loc, q.base_dist.scale, "q's loc and scale"
        if isinstance(q, MultivariateNormal):
            return q.loc, q.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt(), "q's mean and marginal scales"
        try:
            loc, variance = q.mean, q.variance
            if bool(torch.isfinite(loc).all()) and bool(torch.isfinite(variance).all()):
                return loc, variance.sqrt(), "q's closed-form mean and standard deviation"
        except NotImplementedError:
            pass
        z = q.sample((samples,))  # (S, B, d)
        return z.mean(0), z.std(0), f"mean and standard deviation of {samples} samples of q"


# --- JSON-free helpers: batches and the optimisation ------------------------------------------------------------------
def _bar(progress: bool, total: int, desc: str, unit: str):
    return progress_bar(total, desc, unit, enabled=progress)


def _slice_q(q: Distribution | None, rows: slice, batch: int) -> Distribution | None:
    """The examples ``rows`` of a given q (batch ``[B]``); ``None`` (use the encoder) stays ``None``."""
    if q is None or (rows.start == 0 and rows.stop >= batch):
        return q
    if is_factorised_gaussian(q):
        return Independent(Normal(q.base_dist.loc[rows], q.base_dist.scale[rows], validate_args=False), 1)
    if isinstance(q, MultivariateNormal):
        return MultivariateNormal(q.loc[rows], scale_tril=q.scale_tril[rows], validate_args=False)
    raise ValueError(f"cannot split a {type(q).__name__} q into batches; pass batch_size >= {batch}")


def _batches(model, x: torch.Tensor, q: Distribution | None, batch_size: int, context) -> Iterator[tuple[Any, ...]]:
    """``(view, x[rows], q[rows], rows)`` per batch: the model bound to the rows' context
    (:func:`vaelab.evaluate.batches`) and the rows of a given q (``None``: the encoder's)."""
    for view, xb, rows in batches(model, x, batch_size, context):
        yield view, xb, _slice_q(q, rows, len(x)), rows


def _encoder_q(model, x: torch.Tensor, q: Distribution | None) -> Distribution:
    if q is not None:
        return q
    with torch.no_grad():  # a fixed distribution to study, not a function of the encoder's weights
        return model.encode(x)


@contextmanager
def _frozen(model) -> Iterator[None]:
    """Switch off gradients for the model's parameters (only q*'s are optimised), restoring the flags afterwards."""
    flags = [(p, p.requires_grad) for p in getattr(model, "parameters", tuple)()]  # a view without parameters: none
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _elbo_with_stderr(model, x, q: Distribution, k: int, form: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ELBO(q) per example (:func:`vaelab.estimators.elbo` in ``form``) and its Monte Carlo stderr, ``[B]`` each.

    The k samples are split over independent calls; the spread of the calls gives the stderr. Returns the number of
    samples actually used (a multiple of the number of calls).
    """
    calls = min(_ELBO_REPLICATES, k)
    per_call = max(1, k // calls)
    with torch.no_grad():
        values = torch.stack([elbo(model, x, k=per_call, form=form, q=q) for _ in range(calls)]).double()  # (R, B)
    return values.mean(0), values.std(0) / math.sqrt(calls), calls * per_call


def _cosine_lr(step: int, steps: int, lr: float) -> float:
    """The step size at ``step`` of ``steps``: cosine decay from ``lr`` to 0, a pure function of the step."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))


def _optimise_q(model, x, loc0, scale0, *, steps, lr, samples_per_step, bar) -> Independent:
    """Per-example mean-field q* = N(loc, diag(scale^2)) maximising ELBO(q*) by Adam, started at (loc0, scale0)."""
    loc = loc0.detach().clone().requires_grad_(True)
    raw = inverse_softplus((scale0.detach() - _Q_STAR_MIN_SCALE).clamp_min(_Q_STAR_MIN_SCALE)).requires_grad_(True)

    def q_star() -> Independent:
        return Independent(Normal(loc, positive_scale(raw, _Q_STAR_MIN_SCALE), validate_args=False), 1)

    optimizer = torch.optim.Adam([loc, raw], lr=lr)
    for step in range(steps):  # under the caller's _frozen(model): only q*'s parameters get gradients
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        # examples are independent, so the sum's gradient is each example's own gradient
        loss = -elbo(model, x, k=samples_per_step, form="kl", q=q_star()).sum()
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"ELBO of q* is not finite at optimisation step {step} of {steps}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update(1)
    with torch.no_grad():
        return Independent(Normal(loc.detach(), positive_scale(raw.detach(), _Q_STAR_MIN_SCALE)), 1)


# === 1. the gap decomposition =========================================================================================
def gap_decomposition(
    model,
    x: torch.Tensor,
    *,
    k: int = 5000,
    steps: int = 200,
    lr: float = 0.05,
    samples_per_step: int = 8,
    elbo_k: int | None = None,
    elbo_form: str = "joint",
    q: Distribution | None = None,
    batch_size: int = 100,
    chunk_size: int | None = None,
    progress: bool = False,
    compile: bool | None = None,
    log_px_encoder: LogMarginal | None = None,
    context: Mapping[str, torch.Tensor] | None = None,
) -> GapDecomposition:
    """Split the posterior gap into approximation and amortization gaps (Cremer, Li & Duvenaud, 2018).

    For each example a mean-field Gaussian q*(z) = N(loc, diag(scale^2)) is optimised on its own, by Adam on the
    ``"kl"``-form ELBO (``samples_per_step`` reparameterized samples per step, step size decaying from ``lr`` to 0 on
    a cosine so the last iterate settles instead of jittering at the gradient-noise floor), starting from the
    encoder's q (or ``q``) as :func:`start_moments` gives it: its mean and per-dimension standard deviation, in closed
    form where torch knows them, else from samples -- so q may be any distribution over R^d with ``rsample`` and
    ``log_prob`` (a hierarchical q, a flow, Student's t, ...). Only q*'s parameters receive gradients; the model's are
    frozen and left unchanged. Then, per example, in nats,

        posterior_gap     = log p-hat(x) - ELBO(q_enc)   ~ KL(q_enc || p(z|x))
        approximation_gap = log p-hat(x) - ELBO(q*)      ~ KL(q* || p(z|x)), the best mean-field q's gap
        amortization_gap  = ELBO(q*) - ELBO(q_enc)       the price of one encoder for all x

    so posterior = approximation + amortization exactly (the same log p-hat enters both). For a q outside the
    mean-field family (full covariance, hierarchical) the "approximation gap" is that of the mean-field family, and
    the amortization gap can be genuinely negative.

    Both ELBOs are estimated with :func:`vaelab.estimators.elbo` in ``elbo_form`` from ``elbo_k`` samples (default
    ``k``), split over independent calls whose spread gives the stderr. The default ``"joint"`` form is used because
    its integrand log p(x,z) - log q has variance Var_q[log q - log p(z|x)], which vanishes as q approaches the
    posterior -- the regime of q* and of a good encoder -- while the ``"kl"`` form keeps Var_q[log p(x|z)] (about
    d/2 nats^2 even at q = p(z|x) on a Gaussian model); see :func:`elbo_form_variances`.

    log p-hat(x) is one importance-sampling estimate (:func:`vaelab.estimators.log_marginal`, ``k`` samples) whose
    proposal is the defensive mixture r = :class:`EvenMixture` ``(q_enc, q*)`` (Hesterberg, 1995). Each weight is then
    at most twice the weight under either component, so the estimate is about as reliable as the better of the two
    proposals, whichever it is: a trained encoder is often over-dispersed and covers the posterior, while the
    mean-field q* is tighter but under-dispersed along correlated directions, where its weights are heavy-tailed
    (Pareto k-hat above 0.7) and its estimate occasionally overshoots log p(x) by nats. Taking the larger of two
    separate estimates would select exactly those overshoots; choosing one by ESS or k-hat is a selection on noisy
    statistics. The two single-proposal estimates are still reported (``log_px_encoder``, ``log_px_optimised``).

    Caveats: the amortization gap can come out slightly negative, by noise or when q* stopped short of the optimum.
    log p-hat is biased low by about chi^2(p(z|x) || r) / (2k), which the Monte Carlo stderrs do not include.

    Args:
        model: any vaelab model; ``x``: ``[B, *data_shape]``.
        k: importance samples per proposal for log p-hat(x).
        steps: Adam steps of the per-example optimisation of q*.
        lr: its learning rate.
        samples_per_step: its samples of q* per step.
        elbo_k: samples for each ELBO estimate (default ``k``); elbo_form: its form (see above).
        q: the q to decompose, ``[B]`` batch; default ``model.encode(x)``.
        batch_size: examples optimised together (independently); chunk_size: passed to ``log_marginal``.
        compile: run the log p-hat estimates compiled (``log_marginal(compile=True)``); ``None``: when their
            3 k x examples samples reach :data:`vaelab.evaluate.AUTO_COMPILE_SAMPLES`.
        log_px_encoder: an estimate already made on these ``x`` with q_enc as proposal and the same ``k`` (a
            :class:`~vaelab.estimators.LogMarginal` over all N examples, e.g. :func:`vaelab.evaluate.evaluate_model`'s),
            reported as ``log_px_encoder`` instead of drawing another: k decoder passes per example fewer.
        context: what a model that asks for context is given, aligned with ``x`` (e.g. ``{"y": labels}``).

    Returns:
        a :class:`GapDecomposition`.

    Raises:
        ValueError: when the decomposition does not apply to q (:func:`gap_decomposition_not_applicable`).
    """
    check_data(bind(model, context), x)
    elbo_k = k if elbo_k is None else elbo_k
    for name, value in (("k", k), ("steps", steps), ("samples_per_step", samples_per_step), ("elbo_k", elbo_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if elbo_form not in ELBO_FORMS:
        raise ValueError(f"elbo_form must be one of {ELBO_FORMS}, got {elbo_form!r}")
    if log_px_encoder is not None and (log_px_encoder.k != k or tuple(log_px_encoder.value.shape) != (len(x),)):
        raise ValueError(
            f"log_px_encoder must hold k = {k} samples for each of the {len(x)} examples, got k = "
            f"{log_px_encoder.k} for {list(log_px_encoder.value.shape)}"
        )
    compile = _should_compile(compile, (2 if log_px_encoder is not None else 3) * k * len(x))
    parts: dict[str, list[torch.Tensor]] = {}

    def add(key: str, value: torch.Tensor) -> None:
        parts.setdefault(key, []).append(value.detach().double().cpu())

    count = math.ceil(len(x) / batch_size) if isinstance(batch_size, int) and batch_size >= 1 else 1
    bar = _bar(progress, count * (steps + 1), "gap decomposition (q* steps, then log p-hat)", "step")
    used_elbo_k, start_how = elbo_k, ""
    with _frozen(model):  # only q*'s parameters receive gradients
        for view, xb, qb, rows in _batches(model, x, q, batch_size, context):
            q_enc = _encoder_q(view, xb, qb)
            reason = gap_decomposition_not_applicable(q_enc)
            if reason is not None:
                raise ValueError(f"gap_decomposition does not apply: {reason}")
            loc0, scale0, start_how = start_moments(q_enc)
            q_star = _optimise_q(view, xb, loc0, scale0, steps=steps, lr=lr, samples_per_step=samples_per_step, bar=bar)
            mixture = EvenMixture([q_enc, q_star])
            lp = log_marginal(view, xb, k=k, q=mixture, chunk_size=chunk_size, compile=compile)
            if log_px_encoder is None:
                lp_enc = log_marginal(view, xb, k=k, q=q_enc, chunk_size=chunk_size, compile=compile)
            else:
                lp_enc = LogMarginal(
                    **{f: getattr(log_px_encoder, f)[rows] for f in ("value", "stderr", "ess", "pareto_k")}, k=k
                )
            lp_star = log_marginal(view, xb, k=k, q=q_star, chunk_size=chunk_size, compile=compile)
            elbo_enc, se_enc, used_elbo_k = _elbo_with_stderr(view, xb, q_enc, elbo_k, elbo_form)
            elbo_star, se_star, _ = _elbo_with_stderr(view, xb, q_star, elbo_k, elbo_form)
            for name, estimate in (("mix", lp), ("enc", lp_enc), ("star", lp_star)):
                for field in ("value", "stderr", "ess", "pareto_k"):
                    add(f"lp_{name}_{field}", getattr(estimate, field))
            add("elbo_enc", elbo_enc)
            add("elbo_enc_se", se_enc)
            add("elbo_star", elbo_star)
            add("elbo_star_se", se_star)
            add("loc", q_star.base_dist.loc)
            add("scale", q_star.base_dist.scale)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    c = {key: torch.cat(values) for key, values in parts.items()}

    def combined(*stderrs: torch.Tensor) -> torch.Tensor:  # independent estimates: errors add in quadrature
        return torch.stack(stderrs).square().sum(0).sqrt()

    def estimate(name: str) -> PerExample:
        return PerExample(*(c[f"lp_{name}_{field}"] for field in ("value", "stderr", "ess", "pareto_k")))

    lp_mix, lp_mix_se = c["lp_mix_value"], c["lp_mix_stderr"]
    return GapDecomposition(
        posterior_gap=PerExample(lp_mix - c["elbo_enc"], combined(lp_mix_se, c["elbo_enc_se"])),
        approximation_gap=PerExample(lp_mix - c["elbo_star"], combined(lp_mix_se, c["elbo_star_se"])),
        amortization_gap=PerExample(c["elbo_star"] - c["elbo_enc"], combined(c["elbo_star_se"], c["elbo_enc_se"])),
        log_px=estimate("mix"),
        log_px_encoder=estimate("enc"),
        log_px_optimised=estimate("star"),
        elbo_encoder=PerExample(c["elbo_enc"], c["elbo_enc_se"]),
        elbo_optimised=PerExample(c["elbo_star"], c["elbo_star_se"]),
        q_star_loc=c["loc"],
        q_star_scale=c["scale"],
        q_star_start=start_how,
        steps=steps,
        lr=lr,
        samples_per_step=samples_per_step,
        k=k,
        elbo_k=used_elbo_k,
        elbo_form=elbo_form,
    )


# === 2. the three ELBO forms from the same samples ====================================================================
def elbo_form_variances(
    model,
    x: torch.Tensor,
    *,
    k: int = 1000,
    q: Distribution | None = None,
    chunk_size: int | None = None,
    batch_size: int = 100,
    progress: bool = False,
    context: Mapping[str, torch.Tensor] | None = None,
) -> ElboForms:
    """The three ELBO forms (docs/theory.md sec. 3) evaluated on the SAME k samples z ~ q, with per-sample variances.

    Same expectation, different Monte Carlo variance: per example, each form's value (mean of its integrand over the
    k samples), the variance of its integrand, and the value's stderr sqrt(variance / k). The ``"kl"`` form is
    usually the quietest far from the posterior; at q = p(z|x) the ``"joint"`` integrand is constant (variance 0).
    Reported, never asserted. The integrands are :func:`vaelab.estimators.elbo_integrands` (Monte Carlo entropy and
    KL where torch has no closed form, e.g. a hierarchical q).

    Args:
        k: samples per example; chunk_size: samples drawn at once (default all k); q: default ``model.encode(x)``.
        context: what a model that asks for context is given, aligned with ``x`` (e.g. ``{"y": labels}``).

    Returns:
        an :class:`ElboForms`.
    """
    check_data(bind(model, context), x)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2 (a variance needs two samples), got {k!r}")
    chunk = k if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    means: dict[str, list[torch.Tensor]] = {f: [] for f in ELBO_FORMS}
    variances: dict[str, list[torch.Tensor]] = {f: [] for f in ELBO_FORMS}
    bar = _bar(progress, len(x), f"ELBO forms (k={k})", "example")
    with torch.no_grad():
        for view, xb, qb, _ in _batches(model, x, q, batch_size, context):
            qb = _encoder_q(view, xb, qb)
            # running sums of (v - shift) and (v - shift)^2 in float64; shift = first chunk's mean (no cancellation)
            shift: dict[str, torch.Tensor] = {}
            s1: dict[str, torch.Tensor] = {}
            s2: dict[str, torch.Tensor] = {}
            done = 0
            while done < k:
                c = min(chunk, k - done)
                for form, v in elbo_integrands(view, xb, k=c, q=qb).items():
                    v = v.double()
                    if form not in shift:
                        shift[form] = v.mean(0)
                        s1[form] = torch.zeros_like(shift[form])
                        s2[form] = torch.zeros_like(shift[form])
                    centered = v - shift[form]
                    s1[form] = s1[form] + centered.sum(0)
                    s2[form] = s2[form] + centered.square().sum(0)
                done += c
            for form in ELBO_FORMS:
                means[form].append((shift[form] + s1[form] / k).cpu())
                variances[form].append(((s2[form] - s1[form].square() / k) / (k - 1)).clamp_min(0).cpu())
            if bar is not None:
                bar.update(len(xb))
    if bar is not None:
        bar.close()
    forms = {}
    for form in ELBO_FORMS:
        mean, var = torch.cat(means[form]), torch.cat(variances[form])
        forms[form] = ElboForm(value=PerExample(mean, (var / k).sqrt()), variance=var)
    return ElboForms(forms=forms, k=k)


# === 3. naive vs importance-sampled log p(x) over k ===================================================================
def estimator_study(
    model,
    x: torch.Tensor,
    *,
    ks: Sequence[int] = STUDY_KS,
    proposals: Sequence[str] = ("prior", "posterior"),
    chunk_size: int | None = None,
    q: Distribution | None = None,
    progress: bool = False,
    context: Mapping[str, torch.Tensor] | None = None,
) -> EstimatorStudy:
    """log p(x) estimated by :func:`vaelab.estimators.log_marginal` with each proposal and each k, and how reliable.

    ``"prior"`` is naive Monte Carlo (r = p(z)), ``"posterior"`` importance sampling with q (default the encoder).
    Memory stays flat in k: ``log_marginal`` streams the samples in chunks. Each row keeps the per-example value,
    delta-method stderr (NaN at k = 1), ESS and Pareto k-hat (NaN below k = 21, -inf for a flat tail).
    ``context``: what a model that asks for context is given, aligned with ``x``.
    """
    ks = [int(kk) for kk in ks]
    for proposal in proposals:
        if proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
    rows, view = [], bind(model, context)  # the whole of x at once
    bar = _bar(progress, len(proposals) * sum(ks), f"estimator study ({len(x)} examples)", "sample")
    for proposal in proposals:
        for kk in ks:
            r = log_marginal(view, x, k=kk, proposal=proposal, chunk_size=chunk_size, q=q)
            rows.append(StudyRow(proposal=proposal, k=kk, estimate=PerExample.of(r)))
            if bar is not None:
                bar.update(kk)
    if bar is not None:
        bar.close()
    return EstimatorStudy(rows=rows)


# === 4. IWAE_k against k ==============================================================================================
def iwae_curve(
    model,
    x: torch.Tensor,
    *,
    ks: Sequence[int] = IWAE_CURVE_KS,
    q: Distribution | None = None,
    chunk_size: int | None = None,
    batch_size: int = 100,
    progress: bool = False,
    compile: bool | None = None,
    context: Mapping[str, torch.Tensor] | None = None,
) -> IwaeCurve:
    """IWAE_k per example for each k; non-decreasing in k and below log p(x) in expectation.

    One stream of max(ks) importance samples from q per example (:func:`vaelab.estimators.log_marginal` with
    ``iwae_ks=ks``); the point at k is the IWAE_k bound of its first k samples, with the delta-method stderr of those
    k weights. The points are nested prefixes of one draw, so they are correlated: each point's error holds on its
    own, and the difference between two points is more precise than their errors added in quadrature suggest. The
    whole curve costs max(ks) decoder passes per example (not sum(ks)). ``compile``: as for ``log_marginal``;
    ``None``: when max(ks) x examples reaches :data:`vaelab.evaluate.AUTO_COMPILE_SAMPLES`. ``context``: what a
    model that asks for context is given, aligned with ``x``.
    """
    ks = [int(kk) for kk in ks]
    compile = _should_compile(compile, max(ks) * len(x))
    estimates = []
    bar = _bar(progress, len(x), f"IWAE curve (k up to {max(ks)})", "example")
    for view, xb, qb, _ in _batches(model, x, q, batch_size, context):
        qb = _encoder_q(view, xb, qb)
        estimates.append(log_marginal(view, xb, k=max(ks), q=qb, chunk_size=chunk_size, compile=compile, iwae_ks=ks))
        if bar is not None:
            bar.update(len(xb))
    if bar is not None:
        bar.close()
    return _curve(_concat(estimates), ks)


def _curve(estimate: LogMarginal, ks: Sequence[int], rows: slice = slice(None)) -> IwaeCurve:
    """:func:`iwae_curve` from the prefix bounds ``estimate.iwae[k]`` for each k of ``ks`` (its ``rows`` only)."""
    points = [PerExample(estimate.iwae[kk][rows], estimate.iwae_stderr[kk][rows]) for kk in ks]
    return IwaeCurve(ks=tuple(ks), points=points)


# === 5. everything at once ============================================================================================
def diagnostics(
    model,
    x: torch.Tensor,
    *,
    k: int = 5000,
    examples: int | None = DIAGNOSTICS_EXAMPLES,
    slow: bool = True,
    steps: int = 200,
    lr: float = 0.05,
    elbo_k: int = 1000,
    form_k: int = 1000,
    iwae_ks: Sequence[int] | None = None,
    study_examples: int = 20,
    study_ks: Sequence[int] | None = None,
    batch_size: int = 100,
    progress: bool = False,
    compile: bool | None = None,
    context: Mapping[str, torch.Tensor] | None = None,
) -> Diagnostics:
    """The headline evaluation on every example of ``x`` plus the slow diagnostics on the first ``examples``.

    ``evaluation`` is :func:`vaelab.evaluate.evaluate_model` on all of ``x`` (ELBO forms, IWAE bounds, log p(x),
    posterior gap, latent usage). On the first ``examples`` (``None``: all) run :func:`gap_decomposition` (q* from
    ``steps`` Adam steps, ELBOs from ``elbo_k`` samples), :func:`elbo_form_variances` (``form_k`` samples) and the
    IWAE curve at ``iwae_ks`` (default: those of :data:`IWAE_CURVE_KS` up to k, and k; prefixes of log p(x)'s own k
    samples per example when ``iwae_ks`` do not exceed k, which the gap decomposition reuses too, so the curve costs
    nothing extra); :func:`estimator_study` runs on the first ``study_examples`` of them, with
    ``study_ks`` (default: the powers of ten up to 20 k -- 1e5 at k = 5000 -- when ``slow``, up to 1e3 otherwise).

    ``context`` (aligned with ``x``, e.g. ``{"y": labels}``) is what a model that asks for context is given: every
    number is then conditional, log p(x|y). A diagnostic that does not apply to the model is a :class:`NotApplicable`
    and the others still run. The model is
    put in eval mode and its training flag restored afterwards. ``compile`` applies to every streamed log p(x)
    estimate (``None``: compiled when k x examples reaches :data:`vaelab.evaluate.AUTO_COMPILE_SAMPLES`).
    """
    if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
        raise ValueError(f"examples must be an integer >= 1 or None, got {examples!r}")
    n = len(x) if examples is None else min(examples, len(x))
    subset = x[:n]
    sub = None if context is None else {key: value[:n] for key, value in context.items()}
    few = None if context is None else {key: value[:study_examples] for key, value in context.items()}
    was_training = model.training
    model.eval()
    try:
        # one stream of k samples from the encoder's q per example serves the evaluation, the gap decomposition's
        # log_px_encoder and (when its ks do not exceed k) the IWAE curve
        if iwae_ks is None:
            iwae_ks = sorted({kk for kk in IWAE_CURVE_KS if kk <= k} | {k})
        curve_ks = [int(kk) for kk in iwae_ks]
        prefixes = curve_ks if max(curve_ks) <= k else ()
        evaluation, lp_enc = _evaluate_model(
            model, x, k=k, batch_size=batch_size, progress=progress, compile=compile, prefixes=prefixes,
            context=context,
        )  # fmt: skip
        lp_subset = _rows(lp_enc, slice(0, n))
        with torch.no_grad():
            reason = gap_decomposition_not_applicable(bind(model, context, slice(0, 1)).encode(subset[:1]))
        if reason is None:
            gaps = gap_decomposition(
                model, subset, k=k, steps=steps, lr=lr, elbo_k=elbo_k, batch_size=batch_size, progress=progress,
                compile=compile, log_px_encoder=lp_subset, context=sub,
            )  # fmt: skip
        else:
            gaps = NotApplicable(reason)
        forms = elbo_form_variances(model, subset, k=form_k, batch_size=batch_size, progress=progress, context=sub)
        if prefixes:
            curve = _curve(lp_subset, curve_ks)
        else:
            curve = iwae_curve(
                model, subset, ks=curve_ks, batch_size=batch_size, progress=progress, compile=compile, context=sub
            )
        if study_ks is None:
            top = math.floor(math.log10(20 * k)) if slow else 3  # 10^top samples at most
            study_ks = tuple(10**i for i in range(top + 1))
        study = estimator_study(model, subset[:study_examples], ks=study_ks, progress=progress, context=few)
    finally:
        model.train(was_training)
    return Diagnostics(
        evaluation=evaluation, examples=n, gap_decomposition=gaps, elbo_forms=forms, iwae_curve=curve,
        estimator_study=study,
    )  # fmt: skip


def _rows(estimate: LogMarginal, rows: slice) -> LogMarginal:
    """The examples ``rows`` of an estimate, prefix bounds included."""
    return LogMarginal(
        **{f: getattr(estimate, f)[rows] for f in ("value", "stderr", "ess", "pareto_k")},
        k=estimate.k,
        iwae={j: v[rows] for j, v in estimate.iwae.items()},
        iwae_stderr={j: v[rows] for j, v in estimate.iwae_stderr.items()},
    )


__all__ = [
    "DIAGNOSTICS_EXAMPLES",
    "Diagnostics",
    "ElboForm",
    "ElboForms",
    "EstimatorStudy",
    "EvenMixture",
    "GapDecomposition",
    "IwaeCurve",
    "NotApplicable",
    "PerExample",
    "StudyRow",
    "diagnostics",
    "elbo_form_variances",
    "estimator_study",
    "gap_decomposition",
    "gap_decomposition_not_applicable",
    "is_real_support",
    "iwae_curve",
    "start_moments",
]
