"""`vaelab check`: every estimator against exact ground truth on linear-Gaussian models.

For a few :class:`~vaelab.models.LinearGaussian` models and proposals q (the exact posterior, a mean-field q near it,
one far from it), compute on one data point each: exact log p(x); the three ELBO forms; IWAE bounds for several k;
the importance-sampling and the naive (prior) estimates of log p(x) with standard error, ESS and Pareto k-hat; and the
exact gap KL(q || p(z|x)) beside its estimate.

Verdicts follow :mod:`vaelab.tolerance`. An estimate is ``ok`` when it agrees with the exact value within its standard
errors and its Pareto k-hat (where it has one) is at most 0.7; ``flagged`` when k-hat > 0.7, i.e. the estimate warns
of itself that it cannot be trusted -- the behaviour a user needs from the naive estimator or a poor q; ``FAIL`` when
it is wrong and unflagged, or an ordering that must hold (IWAE_k <= IWAE_k' <= log p(x), k < k') does not.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import torch
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from vaelab.estimators import ELBO_FORMS, elbo, iwae_bound, log_marginal, pareto_k_threshold, posterior_gap
from vaelab.models import LinearGaussian
from vaelab.tolerance import Z_TOLERANCE, tolerance, within_stderr

PARETO_RELIABLE = pareto_k_threshold(10_000)  # Vehtari et al. (2024): 0.7 at this k
IWAE_KS = (1, 10, 100, 1000)
ELBO_REPLICATES = 4000  # one-sample ELBO draws per form: mean and standard error
IWAE_REPLICATES = 200  # independent IWAE_k draws per k
IS_K = 10_000  # samples for the log p(x) estimates and the gap

# (name, data_dim, latent_dim, noise, noise_scale)
MODELS = (
    ("pPCA D=5 d=2", 5, 2, "isotropic", 0.7),
    ("FA D=20 d=5", 20, 5, "diagonal", 0.4),
    ("pPCA D=50 d=10", 50, 10, "isotropic", 0.3),
)


@dataclass
class Estimate:
    value: float
    stderr: float
    exact: float | None = None
    ess: float | None = None
    pareto_k: float | None = None
    verdict: str = "ok"


@dataclass
class Row:
    model: str
    proposal: str
    log_px: float
    exact_gap: float
    elbo: dict[str, Estimate] = field(default_factory=dict)
    iwae: dict[int, Estimate] = field(default_factory=dict)
    importance: Estimate | None = None
    naive: Estimate | None = None
    gap: Estimate | None = None
    problems: list[str] = field(default_factory=list)


def _proposals(model: LinearGaussian, x: torch.Tensor) -> dict[str, Distribution]:
    post = model.posterior(x)
    loc = post.loc.detach()
    std = post.covariance_matrix.detach().diagonal(dim1=-2, dim2=-1).sqrt()
    return {
        "exact posterior": post,
        "near (mean-field)": Independent(Normal(loc + 0.2 * std, 1.2 * std), 1),
        "far": Independent(Normal(loc + 2.0 * std, 0.5 * std), 1),
    }


def _verdict(value: float, exact: float, stderr: float, pareto_k: float | None = None) -> str:
    """ok / flagged / FAIL (module docstring). A k-hat above 0.7 flags the estimate whether or not it happens to
    agree: its standard error is then meaningless (with ESS ~ 1 it saturates near 1 nat)."""
    if pareto_k is not None and pareto_k > PARETO_RELIABLE:
        return "flagged"
    value_t, exact_t, se_t = (torch.tensor(v, dtype=torch.float64) for v in (value, exact, stderr))
    return "ok" if bool(within_stderr(value_t, exact_t, se_t)) else "FAIL"


def _allowed(stderr: float, exact: float) -> float:
    return tolerance(torch.tensor(stderr, dtype=torch.float64), torch.tensor(exact, dtype=torch.float64)).item()


def _replicated(x: torch.Tensor, q: Distribution, reps: int):
    return x.expand(reps, *x.shape[1:]), q.expand(torch.Size([reps]))


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.detach()
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def check_row(model: LinearGaussian, name: str, proposal: str, q: Distribution, x: torch.Tensor) -> Row:
    log_px = model.log_marginal_exact(x).item()
    exact_gap = kl_divergence(q, model.posterior(x)).item()
    row = Row(model=name, proposal=proposal, log_px=log_px, exact_gap=exact_gap)
    exact_elbo = log_px - exact_gap

    x_rep, q_rep = _replicated(x, q, ELBO_REPLICATES)
    for form in ELBO_FORMS:
        value, se = _mean_se(elbo(model, x_rep, k=1, form=form, q=q_rep))
        row.elbo[form] = Estimate(value, se, exact=exact_elbo, verdict=_verdict(value, exact_elbo, se))

    x_rep, q_rep = _replicated(x, q, IWAE_REPLICATES)
    for k in IWAE_KS:
        value, se = _mean_se(iwae_bound(model, x_rep, k=k, q=q_rep))
        # a lower bound: above log p(x) only by noise
        verdict = "ok" if value <= log_px + _allowed(se, log_px) else "FAIL"
        row.iwae[k] = Estimate(value, se, exact=log_px, verdict=verdict)
    bounds = [row.iwae[k] for k in IWAE_KS]
    for lo, hi in itertools.pairwise(bounds):
        if hi.value < lo.value - _allowed(math.hypot(lo.stderr, hi.stderr), log_px):
            hi.verdict = "FAIL"
            row.problems.append("IWAE bound decreased with k")

    for attr, kwargs in (("importance", dict(q=q)), ("naive", dict(proposal="prior"))):
        r = log_marginal(model, x, k=IS_K, **kwargs)
        est = Estimate(r.value.item(), r.stderr.item(), exact=log_px, ess=r.ess.item(), pareto_k=r.pareto_k.item())
        est.verdict = _verdict(est.value, log_px, est.stderr, est.pareto_k)
        setattr(row, attr, est)

    g = posterior_gap(model, x, k=IS_K, q=q)
    row.gap = Estimate(g.value.item(), g.stderr.item(), exact=exact_gap)
    row.gap.verdict = _verdict(row.gap.value, exact_gap, row.gap.stderr, row.importance.pareto_k)

    for label, est in [
        *(("ELBO " + f, e) for f, e in row.elbo.items()),
        *((f"IWAE_{k}", e) for k, e in row.iwae.items()),
        ("IS log p(x)", row.importance),
        ("naive log p(x)", row.naive),
        ("gap", row.gap),
    ]:
        if est.verdict == "FAIL":
            row.problems.append(f"{label}: {est.value:.4f} +- {est.stderr:.4f} vs exact {est.exact:.4f}")
    return row


def run_check(seed: int = 0) -> list[Row]:
    """The full ground-truth table: one :class:`Row` per (model, proposal), all in float64."""
    rows = []
    for i, (name, data_dim, latent_dim, noise, noise_scale) in enumerate(MODELS):
        g = torch.Generator().manual_seed(seed + i)
        model = LinearGaussian.random(data_dim, latent_dim, noise=noise, noise_scale=noise_scale, generator=g)
        x = model.sample(1, generator=g)
        torch.manual_seed(seed + 100 * i)
        with torch.no_grad():
            for proposal, q in _proposals(model, x).items():
                rows.append(check_row(model, name, proposal, q, x))
    return rows


def _pm(e: Estimate) -> str:
    return f"{e.value:9.3f} ±{e.stderr:6.3f}"


def _mark(e: Estimate) -> str:
    return {"ok": "", "flagged": " (flagged)", "FAIL": " FAIL"}[e.verdict]


def format_table(rows: list[Row]) -> str:
    """Two plain-text tables: the bounds, then the log p(x) estimators and the gap."""
    lines = ["Bounds (nats; mean ± standard error over independent draws):", ""]
    head = f"{'model':<15} {'q':<18} {'log p(x)':>9} " + " ".join(
        [f"{'ELBO ' + f:>17}" for f in ELBO_FORMS] + [f"{'IWAE_' + str(k):>17}" for k in IWAE_KS]
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        cells = [_pm(r.elbo[f]) + _mark(r.elbo[f]) for f in ELBO_FORMS] + [
            _pm(r.iwae[k]) + _mark(r.iwae[k]) for k in IWAE_KS
        ]
        lines.append(f"{r.model:<15} {r.proposal:<18} {r.log_px:9.3f} " + " ".join(f"{c:>17}" for c in cells))
    lines += [
        "",
        f"log p(x) estimates with k = {IS_K} (IS: proposal q; naive: proposal p(z)), and the gap KL(q || p(z|x)):",
        "",
    ]
    head = (
        f"{'model':<15} {'q':<18} {'log p(x)':>9} {'IS estimate':>17} {'ESS':>8} {'k-hat':>6} "
        f"{'naive estimate':>17} {'ESS':>8} {'k-hat':>6} {'exact gap':>10} {'estimated gap':>17}  verdicts"
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        verdicts = f"IS {r.importance.verdict}, naive {r.naive.verdict}, gap {r.gap.verdict}"
        lines.append(
            f"{r.model:<15} {r.proposal:<18} {r.log_px:9.3f} {_pm(r.importance):>17} {r.importance.ess:8.1f} "
            f"{_khat(r.importance.pareto_k):>6} {_pm(r.naive):>17} {r.naive.ess:8.1f} {_khat(r.naive.pareto_k):>6} "
            f"{r.exact_gap:10.3f} {_pm(r.gap):>17}  {verdicts}"
        )
    lines += [
        "",
        f"ok: within {Z_TOLERANCE} standard errors of the exact value (and Pareto k-hat <= {PARETO_RELIABLE}). "
        f"flagged: k-hat > {PARETO_RELIABLE}, the estimate says of itself not to trust it (the naive estimator, "
        "or q far from p(z|x)). FAIL: wrong and unflagged.",
    ]
    return "\n".join(lines)


def _khat(k: float) -> str:
    return "-inf" if k == -math.inf else f"{k:6.2f}"


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
