"""Evaluation of a trained model on a data set: every number per example, summarised with standard errors.

One code path per quantity: the ELBO forms, IWAE bounds and log p(x) come from :mod:`vaelab.estimators`, exactly
as in training. Summaries are means over examples with the standard error of that mean (the spread over the data
set); the Monte Carlo error of each per-example estimate is reported alongside where it exists.

Beyond :func:`evaluate_model`, the diagnostics look inside a trained model (all JSON-ready dicts):

* :func:`gap_decomposition` -- the posterior gap split into approximation and amortization gaps (Cremer et al. 2018);
* :func:`elbo_form_variances` -- the three ELBO forms from the same samples, with their per-sample variances;
* :func:`estimator_study` -- naive vs importance-sampled log p(x) over k, with stderr, ESS and Pareto k-hat;
* :func:`iwae_curve` -- IWAE_k against k;
* :func:`ppca_baseline` -- exact held-out log p(x) of probabilistic PCA, a floor for continuous-data models;
* :func:`diagnostics` -- all of the above in one dict.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from vaelab._math import inverse_softplus, positive_scale
from vaelab.estimators import (
    ELBO_FORMS,
    PROPOSALS,
    LogMarginal,
    check_data,
    elbo,
    elbo_integrands,
    latent_dim,
    log_marginal,
    pareto_k_threshold,
)
from vaelab.models import LinearGaussian
from vaelab.posteriors import as_multivariate_normal, distribution_mean, is_factorised_gaussian, kl_per_dimension

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): unit j is active if Cov_x(E_q[z_j]) > 0.01


def summarize(values: torch.Tensor) -> dict[str, float]:
    """Mean over examples and its standard error, in nats."""
    values = values.detach().double().cpu()
    n = values.numel()
    sem = (values.std() / math.sqrt(n)).item() if n > 1 else math.nan
    return {"mean": values.mean().item(), "sem": sem}


def latent_usage(model, x: torch.Tensor, *, batch_size: int = 500) -> dict[str, Any]:
    """Active units and KL(q || p(z)) per latent dimension, averaged over ``x``.

    A unit is active when the variance over the data of its posterior mean, Cov_x(E_q[z_j]), exceeds 0.01
    (Burda et al., 2016). The KL per dimension needs a factorised q and prior (diagonal Gaussians); otherwise ``None``.
    """
    means, kls = [], []
    prior = model.prior
    with torch.no_grad():
        for batch in x.split(batch_size):
            q = model.encode(batch)
            means.append(distribution_mean(q))
            if is_factorised_gaussian(q) and is_factorised_gaussian(prior):
                kls.append(kl_per_dimension(q, prior))  # [B, d]
    variance = torch.cat(means).double().var(0)
    result: dict[str, Any] = {
        "active_units": int((variance > ACTIVE_UNIT_THRESHOLD).sum()),
        "latent_dim": latent_dim(model),
        "posterior_mean_variance": variance.cpu().tolist(),
        "kl_per_dim": None,
    }
    if kls:
        result["kl_per_dim"] = torch.cat(kls).double().mean(0).cpu().tolist()
    return result


# Importance samples (k x examples) from which evaluate_model compiles its log p(x) estimator by default, about where
# compiling starts to pay: on the EPYC of sessions 1-2 ~5 us per sample eagerly and 1.4-2x less compiled (5e6 samples:
# 15-25 s eagerly, 2-3 compilations' worth); on session 3's Xeon 2.9 vs 2.1-2.2 us, a 3-8 s compilation repaid after
# 4-10e6 samples (docs/performance.md). The standard protocol (k = 5000, 10,000 test images) is 10x that.
AUTO_COMPILE_SAMPLES = 5_000_000


EVAL_IWAE_KS: tuple[int, ...] = (1, 10, 100, 1000)  # evaluate_model's IWAE bounds
EVAL_ELBO_K = 10  # and its samples per ELBO estimate


def _should_compile(compile: bool | None, samples: int) -> bool:
    """``compile`` as given, or (``None``) whether ``samples`` importance samples repay a compilation."""
    return samples >= AUTO_COMPILE_SAMPLES if compile is None else compile


def evaluate_model(
    model,
    x: torch.Tensor,
    *,
    k: int = 5000,
    iwae_ks: Sequence[int] = EVAL_IWAE_KS,
    elbo_k: int = EVAL_ELBO_K,
    batch_size: int = 100,
    progress: bool = True,
    compile: bool | None = None,
) -> dict[str, Any]:
    """The standard evaluation of a model on ``x`` (``[N, *data_shape]``, on the model's device).

    Returns a JSON-ready dict: ``elbo`` (each form, from the same ``elbo_k`` samples per example), ``iwae`` (bound
    per k; for k up to log p(x)'s, from the first k of its samples: nested estimates of one draw, no extra decoder
    passes),
    ``log_px`` (k importance samples: mean, sem over examples, mean Monte Carlo stderr, median ESS, the fraction of
    examples whose Pareto k-hat exceeds the reliability threshold), ``posterior_gap`` (log p-hat - ELBO), and the
    latent usage of :func:`latent_usage`. Runs under ``torch.inference_mode``. ``compile``: the streamed log p(x)
    estimates run compiled (see :func:`vaelab.estimators.log_marginal`); ``None``: exactly when the evaluation is
    long enough to repay the compilation, k x examples >= :data:`AUTO_COMPILE_SAMPLES`.
    """
    return _evaluate_model(
        model, x, k=k, iwae_ks=iwae_ks, elbo_k=elbo_k, batch_size=batch_size, progress=progress, compile=compile
    )[0]


def _evaluate_model(
    model, x, *, k, batch_size, progress, compile, iwae_ks=EVAL_IWAE_KS, elbo_k=EVAL_ELBO_K, prefixes=()
) -> tuple[dict, LogMarginal]:
    """:func:`evaluate_model`, and its per-example log p(x) estimate ``[N]`` (for :func:`diagnostics` to reuse), whose
    ``iwae`` / ``iwae_stderr`` also hold the bounds of the first j samples for every j <= k of ``prefixes``."""
    compile = _should_compile(compile, k * len(x))
    if compile and progress:
        print("compiling the log p(x) estimator for this model (once, ~5-30 s; --no-compile skips it)", file=sys.stderr)
    per_example: dict[str, list[torch.Tensor]] = {}
    estimates: list[LogMarginal] = []

    def add(key: str, value: torch.Tensor) -> None:
        per_example.setdefault(key, []).append(value.detach().cpu())

    ladder = sorted({kk for kk in [*iwae_ks, *prefixes] if kk <= k})
    batches = x.split(batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(x), unit="example", desc=f"eval k={k}", file=sys.stderr, dynamic_ncols=True)
    model.eval()
    with torch.inference_mode():
        for batch in batches:
            for form, integrand in elbo_integrands(model, batch, k=elbo_k).items():  # the three forms, one draw
                add(f"elbo_{form}", integrand.mean(0))
            # IWAE_kk for kk <= k: the first kk of log p(x)'s own samples (one stream of log-weights for all of them)
            estimates.append(log_marginal(model, batch, k=k, compile=compile, iwae_ks=ladder))
            for kk in iwae_ks:
                if kk > k:
                    add(f"iwae_{kk}", log_marginal(model, batch, k=kk, compile=compile).value)
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    estimate = _concat(estimates)
    cat = {key: torch.cat(values) for key, values in per_example.items()}
    cat |= {f"iwae_{kk}": estimate.iwae[kk] for kk in iwae_ks if kk <= k}
    threshold = pareto_k_threshold(k)
    result: dict[str, Any] = {
        "examples": len(x),
        "units": "nats per example",
        "elbo": {form: summarize(cat[f"elbo_{form}"]) | {"k": elbo_k} for form in ELBO_FORMS},
        "iwae": {str(kk): summarize(cat[f"iwae_{kk}"]) for kk in iwae_ks},
        "log_px": summarize(estimate.value)
        | {
            "k": k,
            "mean_mc_stderr": estimate.stderr.double().mean().item(),
            "median_ess": estimate.ess.double().median().item(),
            "pareto_k_threshold": threshold,
            "fraction_pareto_k_above_threshold": (estimate.pareto_k > threshold).double().mean().item(),
        },
        "posterior_gap": summarize(estimate.value - cat["elbo_kl"]),
    }
    result.update(latent_usage(model, x))
    return result, estimate


_FIELDS = ("value", "stderr", "ess", "pareto_k")  # LogMarginal's per-example fields


def _concat(estimates: Sequence[LogMarginal]) -> LogMarginal:
    """Per-batch estimates (the same k and prefixes) as one over all their examples, on the CPU."""

    def cat(tensors) -> torch.Tensor:
        return torch.cat([t.detach().cpu() for t in tensors])

    first = estimates[0]
    return LogMarginal(
        **{f: cat(getattr(e, f) for e in estimates) for f in _FIELDS},
        k=first.k,
        iwae={j: cat(e.iwae[j] for e in estimates) for j in first.iwae},
        iwae_stderr={j: cat(e.iwae_stderr[j] for e in estimates) for j in first.iwae_stderr},
    )


def format_evaluation(result: dict[str, Any]) -> str:
    """A short human-readable table of :func:`evaluate_model`'s result."""
    lines = [f"{result['examples']} examples; nats per example (mean ± standard error over examples)"]
    for form, s in result["elbo"].items():
        lines.append(f"  ELBO ({form:<7} form, k={s['k']:>4}) {s['mean']:10.3f} ± {s['sem']:.3f}")
    for kk, s in result["iwae"].items():
        lines.append(f"  IWAE bound (k={kk:>5})        {s['mean']:10.3f} ± {s['sem']:.3f}")
    lp = result["log_px"]
    lines.append(f"  log p(x)   (k={lp['k']:>5})        {lp['mean']:10.3f} ± {lp['sem']:.3f}")
    lines.append(
        f"    per-example MC stderr {lp['mean_mc_stderr']:.3f}, median ESS {lp['median_ess']:.0f}, "
        f"k-hat > {lp['pareto_k_threshold']:.2f} for {100 * lp['fraction_pareto_k_above_threshold']:.1f}% of examples"
    )
    gap = result["posterior_gap"]
    lines.append(f"  posterior gap log p(x) - ELBO  {gap['mean']:10.3f} ± {gap['sem']:.3f}")
    for key, label in (("approximation_gap", "approximation"), ("amortization_gap", "amortization")):
        if key in result:
            lines.append(f"    {label + ' gap':<28} {result[key]['mean']:10.3f} ± {result[key]['sem']:.3f}")
    lines.append(f"  active units {result['active_units']} of {result['latent_dim']}")
    return "\n".join(lines)


# === diagnostics: look inside a trained model =========================================================================
IWAE_CURVE_KS: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
STUDY_KS: tuple[int, ...] = (1, 10, 100, 1000, 10000, 100000)
STUDY_KS_FAST: tuple[int, ...] = (1, 10, 100, 1000)
# The ELBO of a fixed q is averaged over this many independent calls of `estimators.elbo`; their spread gives its
# standard error (49 degrees of freedom: the Z = 4.5 rule of vaelab.tolerance stays a ~1e-4 false-alarm rule).
_ELBO_REPLICATES = 50
# Floor of the optimised q*'s scales (q* scale = softplus(raw) + floor, as every scale in vaelab).
_Q_STAR_MIN_SCALE = 1e-6
PPCA_NOTE = (
    "exact log p(x) of probabilistic PCA fitted by maximum likelihood to the flattened continuous training data; "
    "comparable only with models of the same continuous data under normalized densities (Gaussian likelihoods), "
    "not with Bernoulli models of binarized data (a mass function on {0,1} vs a density on R^D)"
)


# --- JSON-ready numbers -----------------------------------------------------------------------------------------------
def _num(value: float) -> float | None:
    """A plain float, or None where the value is not finite (NaN stderr at k = 1, Pareto k-hat at k < 25)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _per_example(values: torch.Tensor, mc_stderr: torch.Tensor | None = None) -> dict[str, Any]:
    """Mean and sem over examples plus the per-example values; with ``mc_stderr`` ([B]) also their Monte Carlo error.

    ``mc_sem`` = sqrt(sum_b se_b^2) / B is the Monte Carlo standard error of the mean over examples: the error to use
    when comparing two estimates on the same examples (the spread over examples, ``sem``, cancels in such a
    comparison).
    """
    values = values.detach().double().cpu()
    out: dict[str, Any] = {key: _num(v) for key, v in summarize(values).items()}
    out["per_example"] = [_num(v) for v in values.tolist()]
    if mc_stderr is not None:
        se = mc_stderr.detach().double().cpu()
        out["mean_mc_stderr"] = _num(se.mean())
        out["mc_sem"] = _num(se.square().sum().sqrt() / se.numel())
        out["mc_stderr"] = [_num(v) for v in se.tolist()]
    return out


def _bar(progress: bool, total: int, desc: str, unit: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True)


# --- q as (loc, scale) and in batches ---------------------------------------------------------------------------------
def _gaussian_q(q: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, marginal scale), each ``[B, d]``, of a diagonal or full-covariance Gaussian q; anything else is refused."""
    if is_factorised_gaussian(q):
        return q.base_dist.loc, q.base_dist.scale
    if isinstance(q, MultivariateNormal):
        return q.loc, q.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
    raise ValueError(
        "gap_decomposition needs a Gaussian q: Independent(Normal(loc, scale), 1) or MultivariateNormal, "
        f"got {type(q).__name__}"
    )


def _slice_q(q: Distribution | None, rows: slice, batch: int) -> Distribution | None:
    """The examples ``rows`` of a given q (batch ``[B]``); ``None`` (use the encoder) stays ``None``."""
    if q is None or (rows.start == 0 and rows.stop >= batch):
        return q
    if is_factorised_gaussian(q):
        return Independent(Normal(q.base_dist.loc[rows], q.base_dist.scale[rows], validate_args=False), 1)
    if isinstance(q, MultivariateNormal):
        return MultivariateNormal(q.loc[rows], scale_tril=q.scale_tril[rows], validate_args=False)
    raise ValueError(f"cannot split a {type(q).__name__} q into batches; pass batch_size >= {batch}")


def _batches(x: torch.Tensor, q: Distribution | None, batch_size: int) -> Iterator[tuple[torch.Tensor, Any]]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    for start in range(0, len(x), batch_size):
        rows = slice(start, min(start + batch_size, len(x)))
        yield x[rows], _slice_q(q, rows, len(x))


def _encoder_q(model, x: torch.Tensor, q: Distribution | None) -> Distribution:
    if q is not None:
        return q
    with torch.no_grad():  # a fixed distribution to study, not a function of the encoder's weights
        return model.encode(x)


@contextmanager
def _frozen(model) -> Iterator[None]:
    """Switch off gradients for the model's parameters (only q*'s are optimised), restoring the flags afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
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


def _defensive_mixture(q_enc: Distribution, q_star: Distribution) -> MixtureSameFamily:
    """The proposal (q_enc + q*) / 2, batch ``[B]``, event ``[d]``: both as full-covariance Gaussians, mixed evenly."""
    a, b = as_multivariate_normal(q_enc), as_multivariate_normal(q_star)
    loc = torch.stack([a.loc, b.loc], dim=-2)  # (B, 2, d)
    scale_tril = torch.stack([a.scale_tril, b.scale_tril], dim=-3)  # (B, 2, d, d)
    components = MultivariateNormal(loc, scale_tril=scale_tril, validate_args=False)
    half = torch.full(loc.shape[:-1], 0.5, dtype=loc.dtype, device=loc.device)  # (B, 2)
    return MixtureSameFamily(Categorical(probs=half, validate_args=False), components, validate_args=False)


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
    with _frozen(model):
        for step in range(steps):
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


# --- 1. the gap decomposition -----------------------------------------------------------------------------------------
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
) -> dict[str, Any]:
    """Split the posterior gap into approximation and amortization gaps (Cremer, Li & Duvenaud, 2018).

    For each example a mean-field Gaussian q*(z) = N(loc, diag(scale^2)) is optimised on its own, by Adam on the
    ``"kl"``-form ELBO (``samples_per_step`` reparameterized samples per step, step size decaying from ``lr`` to 0 on
    a cosine so the last iterate settles instead of jittering at the gradient-noise floor), starting from the
    encoder's q (or ``q``): its loc and scale if diagonal, its mean and marginal standard deviations if full-covariance.
    Only q*'s parameters receive gradients; the model's are frozen and left unchanged. Then, per example, in nats,

        posterior_gap     = log p-hat(x) - ELBO(q_enc)   ~ KL(q_enc || p(z|x))
        approximation_gap = log p-hat(x) - ELBO(q*)      ~ KL(q* || p(z|x)), the best mean-field q's gap
        amortization_gap  = ELBO(q*) - ELBO(q_enc)       the price of one encoder for all x

    so posterior = approximation + amortization exactly (the same log p-hat enters both).

    Both ELBOs are estimated with :func:`vaelab.estimators.elbo` in ``elbo_form`` from ``elbo_k`` samples (default
    ``k``), split over independent calls whose spread gives the stderr. The default ``"joint"`` form is used because
    its integrand log p(x,z) - log q has variance Var_q[log q - log p(z|x)], which vanishes as q approaches the
    posterior -- the regime of q* and of a good encoder -- while the ``"kl"`` form keeps Var_q[log p(x|z)] (about
    d/2 nats^2 even at q = p(z|x) on a Gaussian model); see :func:`elbo_form_variances`.

    log p-hat(x) is one importance-sampling estimate (:func:`vaelab.estimators.log_marginal`, ``k`` samples) whose
    proposal is the defensive mixture r = (q_enc + q*) / 2 (Hesterberg, 1995). Each weight is then at most twice
    the weight under either component, so the estimate is about as reliable as the better of the two proposals,
    whichever it is: a trained encoder is often over-dispersed and covers the posterior, while the mean-field q* is
    tighter but under-dispersed along correlated directions, where its weights are heavy-tailed (Pareto k-hat above
    0.7) and its estimate occasionally overshoots log p(x) by nats. Taking the larger of two separate estimates
    would select exactly those overshoots; choosing one by ESS or k-hat is a selection on noisy statistics. The
    two single-proposal estimates are still reported (``log_px_encoder``, ``log_px_optimised``).

    Caveats: the amortization gap can come out slightly negative, by noise or when q* stopped short of the optimum;
    when q_enc is richer than mean field (e.g. full covariance) it can be genuinely negative. log p-hat is biased
    low by about chi^2(p(z|x) || r) / (2k), which the Monte Carlo stderrs do not include.

    Args:
        model: any vaelab model; ``x``: ``[B, *data_shape]``.
        k: importance samples per proposal for log p-hat(x).
        steps, lr, samples_per_step: the per-example optimisation of q*.
        elbo_k: samples for each ELBO estimate (default ``k``); elbo_form: its form (see above).
        q: the q to decompose, ``[B]`` batch; default ``model.encode(x)``.
        batch_size: examples optimised together (independently); chunk_size: passed to ``log_marginal``.
        compile: run the three log p-hat estimates compiled (``log_marginal(compile=True)``); ``None``: when their
            3 k x examples samples reach :data:`AUTO_COMPILE_SAMPLES`.
        log_px_encoder: an estimate already made on these ``x`` with q_enc as proposal and the same ``k`` (a
            :class:`~vaelab.estimators.LogMarginal` over all N examples, e.g. :func:`evaluate_model`'s), reported
            as ``log_px_encoder`` instead of drawing another: k decoder passes per example fewer.

    Returns:
        ``posterior_gap``, ``approximation_gap``, ``amortization_gap``, ``log_px`` (mixture proposal),
        ``log_px_encoder``, ``log_px_optimised``, ``elbo_encoder``, ``elbo_optimised``: each ``{"mean", "sem",
        "per_example", "mean_mc_stderr", "mc_sem", "mc_stderr"}``, the three log p-hat also with per-example ``ess``
        and ``pareto_k`` lists (None where k-hat is not finite: k < 25, or a flat tail); ``q_star``
        (``{"loc", "scale"}``, ``[B][d]`` lists); the settings ``steps``, ``lr``, ``samples_per_step``, ``k``,
        ``elbo_k``, ``elbo_form``; ``examples``.
    """
    check_data(model, x)
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

    bar = _bar(progress, steps * math.ceil(len(x) / batch_size), "gap decomposition", "step")
    used_elbo_k = elbo_k
    start = 0
    for xb, qb in _batches(x, q, batch_size):
        rows, start = slice(start, start + len(xb)), start + len(xb)
        q_enc = _encoder_q(model, xb, qb)
        loc0, scale0 = _gaussian_q(q_enc)
        q_star = _optimise_q(model, xb, loc0, scale0, steps=steps, lr=lr, samples_per_step=samples_per_step, bar=bar)
        lp = log_marginal(model, xb, k=k, q=_defensive_mixture(q_enc, q_star), chunk_size=chunk_size, compile=compile)
        if log_px_encoder is None:
            lp_enc = log_marginal(model, xb, k=k, q=q_enc, chunk_size=chunk_size, compile=compile)
        else:
            lp_enc = LogMarginal(**{f: getattr(log_px_encoder, f)[rows] for f in _FIELDS}, k=k)
        lp_star = log_marginal(model, xb, k=k, q=q_star, chunk_size=chunk_size, compile=compile)
        elbo_enc, se_enc, used_elbo_k = _elbo_with_stderr(model, xb, q_enc, elbo_k, elbo_form)
        elbo_star, se_star, _ = _elbo_with_stderr(model, xb, q_star, elbo_k, elbo_form)
        for name, estimate in (("mix", lp), ("enc", lp_enc), ("star", lp_star)):
            add(f"lp_{name}", estimate.value)
            add(f"lp_{name}_se", estimate.stderr)
            add(f"lp_{name}_ess", estimate.ess)
            add(f"lp_{name}_khat", estimate.pareto_k)
        add("elbo_enc", elbo_enc)
        add("elbo_enc_se", se_enc)
        add("elbo_star", elbo_star)
        add("elbo_star_se", se_star)
        add("loc", q_star.base_dist.loc)
        add("scale", q_star.base_dist.scale)
    if bar is not None:
        bar.close()
    c = {key: torch.cat(values) for key, values in parts.items()}

    def combined(*stderrs: torch.Tensor) -> torch.Tensor:  # independent estimates: errors add in quadrature
        return torch.stack(stderrs).square().sum(0).sqrt()

    def with_weights(name: str) -> dict[str, Any]:
        out = _per_example(c[f"lp_{name}"], c[f"lp_{name}_se"])
        out["ess"] = [_num(v) for v in c[f"lp_{name}_ess"].tolist()]
        out["pareto_k"] = [_num(v) for v in c[f"lp_{name}_khat"].tolist()]
        return out

    return {
        "examples": len(x),
        "units": "nats per example",
        "posterior_gap": _per_example(c["lp_mix"] - c["elbo_enc"], combined(c["lp_mix_se"], c["elbo_enc_se"])),
        "approximation_gap": _per_example(c["lp_mix"] - c["elbo_star"], combined(c["lp_mix_se"], c["elbo_star_se"])),
        "amortization_gap": _per_example(c["elbo_star"] - c["elbo_enc"], combined(c["elbo_star_se"], c["elbo_enc_se"])),
        "log_px": with_weights("mix"),
        "log_px_encoder": with_weights("enc"),
        "log_px_optimised": with_weights("star"),
        "elbo_encoder": _per_example(c["elbo_enc"], c["elbo_enc_se"]),
        "elbo_optimised": _per_example(c["elbo_star"], c["elbo_star_se"]),
        "q_star": {"loc": c["loc"].tolist(), "scale": c["scale"].tolist()},
        "steps": steps,
        "lr": lr,
        "samples_per_step": samples_per_step,
        "k": k,
        "elbo_k": used_elbo_k,
        "elbo_form": elbo_form,
    }


# --- 2. the three ELBO forms from the same samples --------------------------------------------------------------------
def elbo_form_variances(
    model,
    x: torch.Tensor,
    *,
    k: int = 1000,
    q: Distribution | None = None,
    chunk_size: int | None = None,
    batch_size: int = 100,
) -> dict[str, Any]:
    """The three ELBO forms (docs/theory.md sec. 3) evaluated on the SAME k samples z ~ q, with per-sample variances.

    Same expectation, different Monte Carlo variance: per example, each form's value (mean of its integrand over the
    k samples), the variance of its integrand, and the value's stderr sqrt(variance / k). The ``"kl"`` form is
    usually the quietest far from the posterior; at q = p(z|x) the ``"joint"`` integrand is constant (variance 0).
    Reported, never asserted. The integrands are :func:`vaelab.estimators.elbo_integrands`.

    Args:
        k: samples per example; chunk_size: samples drawn at once (default all k); q: default ``model.encode(x)``.

    Returns:
        ``forms``: for each of ``joint``, ``entropy``, ``kl``: ``value`` (``{"mean", "sem", "per_example",
        "mean_mc_stderr", "mc_sem", "mc_stderr"}``) and ``variance`` (``{"mean", "sem", "per_example"}``, nats^2 per
        sample); ``lowest_variance`` (the form with the smallest mean variance), ``k``, ``examples``.
    """
    check_data(model, x)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2 (a variance needs two samples), got {k!r}")
    chunk = k if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    means: dict[str, list[torch.Tensor]] = {f: [] for f in ELBO_FORMS}
    variances: dict[str, list[torch.Tensor]] = {f: [] for f in ELBO_FORMS}
    with torch.no_grad():
        for xb, qb in _batches(x, q, batch_size):
            qb = _encoder_q(model, xb, qb)
            # running sums of (v - shift) and (v - shift)^2 in float64; shift = first chunk's mean (no cancellation)
            shift: dict[str, torch.Tensor] = {}
            s1: dict[str, torch.Tensor] = {}
            s2: dict[str, torch.Tensor] = {}
            done = 0
            while done < k:
                c = min(chunk, k - done)
                for form, v in elbo_integrands(model, xb, k=c, q=qb).items():
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
    forms: dict[str, Any] = {}
    for form in ELBO_FORMS:
        mean, var = torch.cat(means[form]), torch.cat(variances[form])
        forms[form] = {"value": _per_example(mean, (var / k).sqrt()), "variance": _per_example(var)}
    lowest = min(ELBO_FORMS, key=lambda f: forms[f]["variance"]["mean"])
    return {"examples": len(x), "units": "nats per example", "k": k, "forms": forms, "lowest_variance": lowest}


# --- 3. naive vs importance-sampled log p(x) over k -------------------------------------------------------------------
def estimator_study(
    model,
    x: torch.Tensor,
    *,
    ks: Sequence[int] = STUDY_KS,
    proposals: Sequence[str] = ("prior", "posterior"),
    chunk_size: int | None = None,
    q: Distribution | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """log p(x) estimated by :func:`vaelab.estimators.log_marginal` with each proposal and each k, and how reliable.

    ``"prior"`` is naive Monte Carlo (r = p(z)), ``"posterior"`` importance sampling with q (default the encoder).
    Memory stays flat in k: ``log_marginal`` streams the samples in chunks.

    Returns:
        ``rows``: one per (proposal, k), with ``proposal``, ``k``, ``mean`` and ``sem`` (log p-hat over examples),
        ``mean_mc_stderr`` (mean per-example delta-method stderr), ``mc_sem`` (the Monte Carlo error of ``mean``),
        ``mean_ess``, ``mean_pareto_k`` (over examples with a finite k-hat; -inf marks a flat tail),
        ``fraction_flat_tail``, ``pareto_k_threshold`` and ``fraction_pareto_k_above_threshold``; the Pareto fields
        and the stderrs are None where undefined (k-hat needs k >= 25, a stderr k >= 2). Also ``ks``, ``proposals``,
        ``examples``.
    """
    ks = [int(kk) for kk in ks]
    for proposal in proposals:
        if proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
    rows = []
    bar = _bar(progress, len(proposals) * len(ks), "estimator study", "estimate")
    for proposal in proposals:
        for kk in ks:
            r = log_marginal(model, x, k=kk, proposal=proposal, chunk_size=chunk_size, q=q)
            khat = r.pareto_k.double().cpu()
            fitted = ~torch.isnan(khat)
            finite = torch.isfinite(khat)
            threshold = pareto_k_threshold(kk)
            value = _per_example(r.value, r.stderr)
            row = {
                "proposal": proposal,
                "k": kk,
                "mean": value["mean"],
                "sem": value["sem"],
                "mean_mc_stderr": value["mean_mc_stderr"],
                "mc_sem": value["mc_sem"],
                "mean_ess": _num(r.ess.double().mean()),
                "mean_pareto_k": _num(khat[finite].mean()) if bool(finite.any()) else None,
                "fraction_flat_tail": _num((khat == -math.inf).double().mean()) if bool(fitted.all()) else None,
                "pareto_k_threshold": threshold,
                "fraction_pareto_k_above_threshold": (
                    _num((khat > threshold).double().mean()) if bool(fitted.all()) else None
                ),
            }
            rows.append(row)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return {"examples": len(x), "units": "nats per example", "ks": ks, "proposals": list(proposals), "rows": rows}


# --- 4. IWAE_k against k ----------------------------------------------------------------------------------------------
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
) -> dict[str, Any]:
    """IWAE_k per example for each k, summarised over examples; non-decreasing in k and below log p(x) in expectation.

    One stream of max(ks) importance samples from q per example (:func:`vaelab.estimators.log_marginal` with
    ``iwae_ks=ks``); the point at k is the IWAE_k bound of its first k samples, with the delta-method stderr of those
    k weights. The points are nested prefixes of one draw, so they are correlated: each point's error holds on its
    own, and the difference between two points is more precise than their errors added in quadrature suggest. The
    whole curve costs max(ks) decoder passes per example (not sum(ks)). ``compile``: as for ``log_marginal``;
    ``None``: when max(ks) x examples reaches :data:`AUTO_COMPILE_SAMPLES`.

    Returns:
        parallel lists over ``k``: ``mean``, ``sem`` (over examples), ``mean_mc_stderr`` and ``mc_sem`` (Monte Carlo
        error of ``mean``, the one to use when comparing two k; None at k = 1), plus ``examples``.
    """
    ks = [int(kk) for kk in ks]
    compile = _should_compile(compile, max(ks) * len(x))
    estimates = []
    bar = _bar(progress, len(x), "IWAE curve", "example")
    for xb, qb in _batches(x, q, batch_size):
        qb = _encoder_q(model, xb, qb)
        estimates.append(log_marginal(model, xb, k=max(ks), q=qb, chunk_size=chunk_size, compile=compile, iwae_ks=ks))
        if bar is not None:
            bar.update(len(xb))
    if bar is not None:
        bar.close()
    return _curve(_concat(estimates), ks)


def _curve(estimate: LogMarginal, ks: Sequence[int]) -> dict[str, Any]:
    """:func:`iwae_curve`'s summary of the prefix bounds ``estimate.iwae[k]`` for each k of ``ks``."""
    points = [_per_example(estimate.iwae[kk], estimate.iwae_stderr[kk]) for kk in ks]
    return {
        "examples": len(estimate.value),
        "units": "nats per example",
        "k": list(ks),
        **{key: [p[key] for p in points] for key in ("mean", "sem", "mean_mc_stderr", "mc_sem")},
    }


# --- 5. the pPCA baseline ---------------------------------------------------------------------------------------------
def ppca_baseline(train_x: torch.Tensor, test_x: torch.Tensor, latent_dim: int) -> dict[str, Any]:
    """Exact held-out log p(x) of maximum-likelihood probabilistic PCA (Tipping & Bishop, 1999).

    Fits :meth:`vaelab.models.LinearGaussian.fit_ppca` to the flattened training data in float64 and evaluates the
    exact ``log_marginal_exact`` on the test data: a closed-form floor that a deep model of the same continuous data
    should beat. Only comparable with models whose likelihood is a density on the same continuous values (Gaussian
    likelihoods); NOT with Bernoulli models of binarized data, whose numbers are log-probabilities of a mass function
    on {0, 1}^D (and not with continuous Bernoulli models, whose density lives on [0, 1]^D, not R^D).

    Returns:
        ``test_log_px`` (``{"mean", "sem", "per_example"}``), ``train_log_px`` (``{"mean", "sem"}``), ``noise_var``
        (the fitted sigma^2), ``latent_dim``, ``data_dim``, ``train_examples``, ``examples``, ``note``.
    """
    train = train_x.detach().reshape(len(train_x), -1).to(torch.float64)
    test = test_x.detach().reshape(len(test_x), -1).to(torch.float64)
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train and test examples differ in size: {train.shape[1]} vs {test.shape[1]} values")
    model = LinearGaussian.fit_ppca(train, latent_dim)
    with torch.no_grad():
        test_log_px = model.log_marginal_exact(test)
        train_log_px = model.log_marginal_exact(train)
    return {
        "examples": len(test),
        "train_examples": len(train),
        "units": "nats per example",
        "latent_dim": latent_dim,
        "data_dim": int(train.shape[1]),
        "noise_var": model.noise_var.item(),
        "test_log_px": _per_example(test_log_px),
        "train_log_px": {key: _num(v) for key, v in summarize(train_log_px).items()},
        "note": PPCA_NOTE,
    }


# --- 6. everything at once --------------------------------------------------------------------------------------------
def diagnostics(
    model,
    x: torch.Tensor,
    *,
    k: int = 5000,
    slow: bool = True,
    steps: int = 200,
    lr: float = 0.05,
    elbo_k: int = 1000,
    form_k: int = 1000,
    iwae_ks: Sequence[int] = IWAE_CURVE_KS,
    study_examples: int = 20,
    study_ks: Sequence[int] | None = None,
    batch_size: int = 100,
    progress: bool = False,
    compile: bool | None = None,
) -> dict[str, Any]:
    """Look inside a trained model: :func:`evaluate_model` plus the diagnostics above, in one JSON-ready dict.

    Keys: those of :func:`evaluate_model` (``elbo``, ``iwae``, ``log_px``, ``active_units``, ``kl_per_dim``, ...),
    with ``posterior_gap`` replaced by the gap decomposition's (the same quantity, log p-hat - ELBO(q_enc), with
    per-example values and Monte Carlo errors; its mean/sem keys keep their meaning), plus ``approximation_gap``,
    ``amortization_gap``, ``gap_decomposition`` (its settings, log p-hat and ELBO details, without the per-example
    q* parameters), ``elbo_forms`` (:func:`elbo_form_variances`, ``form_k`` samples), ``iwae_curve`` (prefixes of
    log p(x)'s own k samples per example when ``iwae_ks`` do not exceed k, which the gap decomposition reuses too), and
    ``estimator_study`` on the first ``study_examples`` examples with ``study_ks`` (default k up to 1e5 when
    ``slow``, up to 1e3 otherwise). The model is put in eval mode and its training flag restored afterwards.
    ``compile`` applies to every streamed log p(x) estimate of :func:`evaluate_model`, :func:`gap_decomposition` and
    :func:`iwae_curve`, the bulk of the work (``None``: compiled when k x examples reaches
    :data:`AUTO_COMPILE_SAMPLES`; one compilation per proposal family and batch shape).
    """
    compile = _should_compile(compile, k * len(x))
    was_training = model.training
    model.eval()
    try:
        # one stream of k samples from the encoder's q per example serves the evaluation, the gap decomposition's
        # log_px_encoder and (when its ks do not exceed k) the IWAE curve
        curve_ks = [int(kk) for kk in iwae_ks]
        result, lp_enc = _evaluate_model(
            model, x, k=k, batch_size=batch_size, progress=progress, compile=compile, prefixes=curve_ks
        )
        gaps = gap_decomposition(
            model, x, k=k, steps=steps, lr=lr, elbo_k=elbo_k, batch_size=batch_size, progress=progress,
            compile=compile, log_px_encoder=lp_enc,
        )  # fmt: skip
        result["elbo_forms"] = elbo_form_variances(model, x, k=form_k, batch_size=batch_size)
        if max(curve_ks) <= k:
            result["iwae_curve"] = _curve(lp_enc, curve_ks)
        else:
            result["iwae_curve"] = iwae_curve(
                model, x, ks=curve_ks, batch_size=batch_size, progress=progress, compile=compile
            )
        ks = study_ks if study_ks is not None else (STUDY_KS if slow else STUDY_KS_FAST)
        result["estimator_study"] = estimator_study(model, x[:study_examples], ks=ks, progress=progress)
    finally:
        model.train(was_training)
    for key in ("posterior_gap", "approximation_gap", "amortization_gap"):
        result[key] = gaps.pop(key)
    gaps.pop("q_star")
    result["gap_decomposition"] = gaps
    return result


def final_beta(config) -> float | None:
    """The KL weight a run ends with (its schedule at the last step); None for schedules that are not a beta."""
    from vaelab.schedules import make_schedule

    weights = make_schedule(config.schedule, **config.schedule_options).objective_kwargs(10**12)
    return weights.get("beta")


def compare_latent_usage(
    runs: Sequence[tuple[str, Any, torch.Tensor]], *, k: int = 1000, compile: bool | None = None
) -> list[dict[str, Any]]:
    """How latent usage moves across runs (e.g. a beta sweep): one row per ``(name, run, x)``, sorted by final beta.

    Each row: ``beta`` (final), ``schedule``, ``active_units``, ``latent_dim``, ``kl_total`` (sum of KL per dimension,
    nats), ``kl_per_dim``, ``elbo`` and ``log_px`` (k importance samples; mean and sem over ``x``). ``compile`` as
    in :func:`evaluate_model`.
    """
    rows = []
    for name, run, x in runs:
        result = evaluate_model(run.model, x, k=k, iwae_ks=(), elbo_k=1, progress=False, compile=compile)
        kl = result["kl_per_dim"]
        rows.append(
            {
                "run": name,
                "beta": final_beta(run.config),
                "schedule": run.config.schedule,
                "active_units": result["active_units"],
                "latent_dim": result["latent_dim"],
                "kl_total": None if kl is None else float(sum(kl)),
                "kl_per_dim": kl,
                "elbo": result["elbo"]["kl"],
                "log_px": {key: result["log_px"][key] for key in ("mean", "sem", "k")},
            }
        )
    return sorted(rows, key=lambda r: (r["beta"] is None, r["beta"] if r["beta"] is not None else 0.0))
