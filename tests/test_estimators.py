"""Every estimator against exact values on the linear-Gaussian model (float64, fixed seeds).

Tolerances follow the one rule in :mod:`vaelab.tolerance`: |estimate - exact| <= Z * stderr (+ rounding slack),
with stderr computed from the same samples. Monte Carlo expectations are taken over R independent replicates,
obtained by repeating each example R times in the batch (one call, independent samples per row).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

import vaelab
from vaelab import LinearGaussian
from vaelab.estimators import _pareto_tail_size, _WeightStats, pareto_khat
from vaelab.likelihoods import BernoulliLikelihood
from vaelab.models import VAE
from vaelab.priors import StandardNormal
from vaelab.tolerance import Z_TOLERANCE, assert_within_stderr, reduction_error_bound, rounding_gamma, tolerance

DTYPE = torch.float64


# --- fixtures ---------------------------------------------------------------------------------------------------------
def make_model(data_dim=6, latent_dim=2, noise="isotropic", noise_scale=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = LinearGaussian.random(data_dim, latent_dim, noise=noise, noise_scale=noise_scale, generator=g)
    x = model.sample(3, generator=g)
    return model, x


def diagonal_q(model, x, *, shift=0.0, scale_factor=1.0):
    """Mean-field q built from the exact posterior: its marginal means (+ shift) and stds (* scale_factor)."""
    post = model.posterior(x)
    loc = post.loc.detach() + shift
    scale = post.covariance_matrix.detach().diagonal(dim1=-2, dim2=-1).sqrt() * scale_factor
    return Independent(Normal(loc, scale), 1)


def replicate(x, q, reps):
    """x and q repeated ``reps`` times along the batch: row r * B + b is example b."""
    base = q.base_dist
    q_rep = Independent(Normal(base.loc.repeat(reps, 1), base.scale.repeat(reps, 1)), 1)
    return x.repeat(reps, 1), q_rep


def mean_and_stderr(values, reps):
    values = values.detach().reshape(reps, -1)  # (R, B)
    return values.mean(0), values.std(0) / math.sqrt(reps)


def exact_elbo(model, x, q):
    """ELBO(q) = log p(x) - KL(q || p(z|x)), exactly."""
    return (model.log_marginal_exact(x) - kl_divergence(q, model.posterior(x))).detach()


QS = {
    "near": dict(shift=0.1, scale_factor=1.2),
    "far": dict(shift=1.0, scale_factor=0.6),
}


# --- the ELBO ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", ["isotropic", "diagonal"])
@pytest.mark.parametrize("which", sorted(QS))
@pytest.mark.parametrize("form", vaelab.estimators.ELBO_FORMS)
def test_each_elbo_form_matches_exact_elbo(noise, which, form):
    torch.manual_seed(1)
    model, x = make_model(noise=noise)
    q = diagonal_q(model, x, **QS[which])
    reps = 4000
    x_rep, q_rep = replicate(x, q, reps)
    mean, se = mean_and_stderr(vaelab.elbo(model, x_rep, k=1, form=form, q=q_rep), reps)
    assert_within_stderr(mean, exact_elbo(model, x, q), se, what=f"{form} ELBO")


def test_joint_and_kl_forms_agree_with_each_other():
    torch.manual_seed(2)
    model, x = make_model()
    q = diagonal_q(model, x, **QS["far"])
    reps = 4000
    x_rep, q_rep = replicate(x, q, reps)
    stats = {f: mean_and_stderr(vaelab.elbo(model, x_rep, k=1, form=f, q=q_rep), reps) for f in ("joint", "kl")}
    (m_joint, se_joint), (m_kl, se_kl) = stats["joint"], stats["kl"]
    assert_within_stderr(m_joint - m_kl, torch.zeros_like(m_kl), (se_joint**2 + se_kl**2).sqrt())


def test_elbo_parts_recon_minus_kl():
    torch.manual_seed(3)
    model, x = make_model()
    q = diagonal_q(model, x, **QS["near"])
    parts = vaelab.elbo_parts(model, x, k=5, form="kl", q=q)
    torch.testing.assert_close(parts.kl, kl_divergence(q, model.prior))
    torch.manual_seed(4)
    value = vaelab.elbo(model, x, k=5, form="kl", q=q)
    torch.manual_seed(4)
    assert torch.equal(value, vaelab.elbo_parts(model, x, k=5, form="kl", q=q).elbo)


def test_exact_posterior_gives_tight_elbo_and_zero_variance_weights():
    torch.manual_seed(5)
    model, x = make_model(noise="diagonal")
    log_px = model.log_marginal_exact(x).detach()
    # encode() is the exact (full-covariance) posterior on this model
    torch.testing.assert_close(vaelab.elbo(model, x, k=3).detach(), log_px, rtol=0, atol=1e-10)
    lw = vaelab.log_weights(model, x, k=200).detach()
    assert float(lw.std(0).max()) < 1e-12
    result = vaelab.log_marginal(model, x, k=200)
    torch.testing.assert_close(result.value, log_px, rtol=0, atol=1e-10)
    assert float(result.stderr.max()) < 1e-6  # sqrt of rounding: the weights are equal
    torch.testing.assert_close(result.ess, torch.full_like(result.ess, 200.0))
    assert bool((result.pareto_k == -math.inf).all())
    gap = vaelab.posterior_gap(model, x, k=200)
    torch.testing.assert_close(gap.value, torch.zeros_like(gap.value), rtol=0, atol=1e-10)


# --- IWAE bounds ------------------------------------------------------------------------------------------------------
def test_iwae_bounds_increase_with_k_and_stay_below_log_px():
    torch.manual_seed(6)
    model, x = make_model()
    q = diagonal_q(model, x, **QS["far"])
    log_px = model.log_marginal_exact(x).detach()
    reps = 400
    x_rep, q_rep = replicate(x, q, reps)
    means, ses = [], []
    for k in (1, 10, 100, 1000):
        m, se = mean_and_stderr(vaelab.iwae_bound(model, x_rep, k=k, q=q_rep), reps)
        means.append(m)
        ses.append(se)
    elbo_mean, elbo_se = mean_and_stderr(vaelab.elbo(model, x_rep, k=1, q=q_rep), reps)
    assert_within_stderr(means[0], elbo_mean, (ses[0] ** 2 + elbo_se**2).sqrt(), what="IWAE_1 vs ELBO")
    for (m_lo, se_lo), (m_hi, se_hi) in itertools.pairwise(zip(means, ses, strict=True)):
        # IWAE_k' >= IWAE_k: the difference may be negative only by noise
        assert bool((m_hi - m_lo > -Z_TOLERANCE * (se_lo**2 + se_hi**2).sqrt()).all())
    assert bool((means[-1] - means[0] > 10 * ses[0]).all())  # the bound does tighten, clearly
    for m, se in zip(means, ses, strict=True):
        assert bool((m < log_px + Z_TOLERANCE * se).all())  # a lower bound in expectation
    # and it converges: with a q that covers the posterior, IWAE_k at large k matches log p(x)
    q_wide = diagonal_q(model, x, shift=0.1, scale_factor=1.5)
    result = vaelab.log_marginal(model, x, k=20000, q=q_wide)
    assert_within_stderr(result.value, log_px, result.stderr, what="IWAE_20000")


# --- log p(x): importance sampling vs naive Monte Carlo -------------------------------------------------------------
def test_importance_sampling_estimate_matches_log_px():
    torch.manual_seed(7)
    model, x = make_model(noise="diagonal")
    q = diagonal_q(model, x, **QS["near"])
    result = vaelab.log_marginal(model, x, k=5000, q=q)
    assert_within_stderr(result.value, model.log_marginal_exact(x).detach(), result.stderr, what="IS log p(x)")
    assert bool((result.ess > 100).all()) and bool((result.ess <= 5000).all())
    assert bool((result.pareto_k < 0.7).all())


@pytest.mark.parametrize("proposal", ["encoder", "given-q"])
def test_compiled_log_marginal_matches_log_px(proposal):
    # torch.compile'd chunks (uneven k: the last chunk is drawn whole and cut) estimate the same quantity
    torch.manual_seed(9)
    model, x = make_model(noise="diagonal")
    q = diagonal_q(model, x, **QS["near"]) if proposal == "given-q" else None
    result = vaelab.log_marginal(model, x, k=4001, q=q, chunk_size=500, compile=True)
    assert result.k == 4001
    assert_within_stderr(result.value, model.log_marginal_exact(x).detach(), result.stderr, what="compiled IS")
    eager = vaelab.log_marginal(model, x, k=4001, q=q, chunk_size=500)
    assert_within_stderr(result.value, eager.value, torch.hypot(result.stderr, eager.stderr), what="compiled - eager")


def test_every_model_scored_in_a_process_gets_its_own_compiled_estimator():
    # dynamo keeps a bounded number of specialisations of one function (8 by default, here 1 so that three models
    # show it): without a slot per model, the second and third would be scored eagerly without an error
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(recompile_limit=1):
        for latent_dim in (2, 3, 4):  # three models whose log-weights cannot share a graph
            model = LinearGaussian.random(6, latent_dim, generator=torch.Generator().manual_seed(latent_dim))
            x = model.sample(5, torch.Generator().manual_seed(0))
            with torch.no_grad():
                vaelab.log_marginal(model, x, k=16, chunk_size=8, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3, dict(torch._dynamo.utils.counters["stats"])


def test_compiled_log_marginal_without_a_working_compiler_warns_and_runs_eagerly(tmp_path, monkeypatch):
    import torch._dynamo
    import torch._inductor.config

    torch.manual_seed(10)
    model, x = make_model(noise="diagonal")
    # nothing compiled before may be reused (in memory or in inductor's on-disk cache): the compiler must really run
    torch._dynamo.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    broken = {"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}
    try:
        with torch._inductor.config.patch(broken), pytest.warns(UserWarning, match="torch.compile failed"):
            result = vaelab.log_marginal(model, x, k=2000, chunk_size=300, compile=True)
    finally:
        torch._dynamo.reset()
    assert result.k == 2000
    assert_within_stderr(result.value, model.log_marginal_exact(x).detach(), result.stderr, what="eager fallback")


def test_naive_prior_estimator_is_unbiased_for_px_not_log_px_and_far_noisier_than_is():
    torch.manual_seed(8)
    # small and noisy, so p(x) is not astronomically small and exp() of the estimates is usable
    model, x = make_model(data_dim=3, latent_dim=1, noise_scale=1.0, seed=3)
    log_px = model.log_marginal_exact(x).detach()
    reps, k = 20000, 10
    x_rep = x.repeat(reps, 1)
    naive = vaelab.log_marginal(model, x_rep, k=k, proposal="prior").value.reshape(reps, -1)
    # unbiased for p(x): mean of p-hat / p(x) is 1
    ratio = torch.exp(naive - log_px)
    assert_within_stderr(ratio.mean(0), torch.ones(3, dtype=DTYPE), ratio.std(0) / math.sqrt(reps), what="E[p-hat]")
    # biased for log p(x): Jensen puts E[log p-hat] below log p(x)
    mean_log, se_log = naive.mean(0), naive.std(0) / math.sqrt(reps)
    assert bool((mean_log + Z_TOLERANCE * se_log < log_px).all())
    # at equal k, importance sampling with a mean-field q is far less variable
    q = diagonal_q(model, x)
    _, q_rep = replicate(x, q, reps)
    informed = vaelab.log_marginal(model, x_rep, k=k, q=q_rep).value.reshape(reps, -1)
    assert bool((naive.std(0) > 5 * informed.std(0)).all())


def test_naive_estimator_fails_when_posterior_is_narrow():
    torch.manual_seed(9)
    model, x = make_model(data_dim=20, latent_dim=5, noise_scale=0.1)
    log_px = model.log_marginal_exact(x).detach()
    naive = vaelab.log_marginal(model, x, k=10000, proposal="prior")
    informed = vaelab.log_marginal(model, x, k=100, q=diagonal_q(model, x, scale_factor=1.2))
    assert bool((naive.value < log_px - 5).all())  # orders of magnitude short of p(x)
    assert bool((naive.ess < 5).all())  # one or two samples carry all the weight
    assert bool((naive.pareto_k > 0.7).all())  # and the diagnostic says so
    assert bool(((informed.value - log_px).abs() < 0.1).all())


def test_naive_estimator_draws_once_per_example_from_a_conditional_prior():
    # a model given context has a prior of batch [B], p(z|y_b): naive Monte Carlo draws (k,) from it, each example
    # from its own prior, and is unbiased for log p(x|y) (the model's exact posterior gives the IWAE value too)
    from tiny import ClassMeanGaussian

    torch.manual_seed(3)
    model = ClassMeanGaussian(4, 2, classes=3, seed=1, dtype=DTYPE)
    x, y = model.sample(5, classes=3, seed=2)
    given = model.given(y)
    assert tuple(given.prior.batch_shape) == (5,)
    exact = model.log_marginal_exact(x, y)
    with torch.no_grad():
        naive = vaelab.log_marginal(given, x, k=20000, proposal="prior")
        assert_within_stderr(naive.value, exact, naive.stderr, "naive log p(x|y)")
        assert naive.value.shape == (5,) and bool((naive.stderr > 0).all())
        iwae = vaelab.log_marginal(given, x, k=10)  # exact posterior: every log-weight is log p(x|y)
        assert_within_stderr(iwae.value, exact, torch.zeros(5), "IWAE with the exact posterior")
        wrong = vaelab.log_marginal(model.given((y + 1) % 3), x, k=20000, proposal="prior")
    assert bool(((wrong.value - exact).abs() > 1).any())  # the context matters
    with pytest.raises(ValueError, match=r"batch shape \[\] or \[B\] = \[5\], got \[2\]"):
        vaelab.log_marginal(model.given(y[:2]), x, k=10, proposal="prior")


# --- the posterior gap ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", sorted(QS))
def test_posterior_gap_matches_exact_kl_to_true_posterior(which):
    torch.manual_seed(10)
    model, x = make_model()
    q = diagonal_q(model, x, **QS[which]) if which == "near" else diagonal_q(model, x, shift=0.3, scale_factor=1.3)
    gap = vaelab.posterior_gap(model, x, k=50000, q=q)
    exact = kl_divergence(q, model.posterior(x)).detach()
    assert_within_stderr(gap.value, exact, gap.stderr, what="posterior gap")
    assert bool((gap.stderr < 0.2 * exact).all())  # informative, not vacuous


# --- streaming ----------------------------------------------------------------------------------------------------
class BankNormal(Independent):
    """A diagonal Gaussian whose rsample reads noise sequentially from a fixed bank: chunked and unchunked callers
    see the very same samples, whatever the RNG's blocking."""

    def __init__(self, loc, scale, bank):
        super().__init__(Normal(loc, scale), 1)
        self.bank, self.used = bank, 0

    def rsample(self, sample_shape=(1,)):
        n = sample_shape[0]
        eps = self.bank[self.used : self.used + n]
        self.used += n
        return self.base_dist.loc + self.base_dist.scale * eps


def streaming_rounding_bounds(lw: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far two streamings of the same float64 log-weights ``lw [k, B]`` (different chunkings) may differ, ``[B]``.

    Each weight w_i = exp(lw_i - m) goes through one subtraction, one exp, at most k rescalings by exp(m_old - m_new)
    and at most k additions: n = 2k + 4 rounded steps (Higham's gamma_n, vaelab.tolerance). The rounded exponents
    (relative error u |lw_i - m| in total, as the rescalings telescope) make a relative error of w_i of that size,
    so the term's magnitude counts as w_i (1 + |lw_i - m|). The running sum of log-weights is taken relative to a
    shift that depends on the blocking (the first block's mean), somewhere in [min lw, max lw]: its terms are at most
    max lw - min lw each.
    """
    k = lw.shape[0]
    f64 = torch.float64
    m = lw.max(0).values
    w = torch.exp(lw - m)
    s_w, s_ww = w.sum(0), (w * w).sum(0)
    n = 2 * k + 4
    rel_sw = reduction_error_bound((w * (1 + (m - lw))).sum(0), n, f64) / s_w
    rel_sww = reduction_error_bound((w * w * (1 + 2 * (m - lw))).sum(0), n, f64) / s_ww
    g = rounding_gamma(8, f64)  # the few rounded steps after the sums (log, division, sqrt, additions)
    value = m + torch.log(s_w / k)
    ess = s_w**2 / s_ww
    rel_ess = 2 * rel_sw + rel_sww + g
    stderr = ((k / ess - 1).clamp_min(0) / (k - 1)).sqrt()
    spread = k * (lw.amax(0) - lw.amin(0))
    return {
        "value": 2 * rel_sw + g * (m.abs() + value.abs() + math.log(k)),
        "ess": rel_ess * ess,
        "stderr": (k / ess) * rel_ess / (2 * (k - 1) * stderr.clamp_min(torch.finfo(f64).tiny)) + g * stderr,
        "gap": 2 * rel_sw
        + reduction_error_bound(spread, k + 2, f64) / k
        + g * (m.abs() + value.abs() + 2 * lw.abs().amax(0)),
    }


@pytest.mark.parametrize("chunk", [1, 7, 333, 1024, 5000])
def test_weight_stats_of_any_chunking_agree_with_one_pass_to_rounding(chunk):
    # wide, shifted log-weights: the running max moves often, so every chunk rescales the running sums
    lw = torch.randn(5000, 4, generator=torch.Generator().manual_seed(4), dtype=DTYPE) * 3 - 50
    tail = _pareto_tail_size(lw.shape[0])
    whole, chunked = _WeightStats(tail=tail), _WeightStats(tail=tail)
    whole.update(lw)
    for part in lw.split(chunk):
        chunked.update(part)
    a, b = whole.log_marginal(), chunked.log_marginal()
    bounds = streaming_rounding_bounds(lw)
    for name in ("value", "ess", "stderr"):
        diff = (getattr(a, name) - getattr(b, name)).abs()
        assert bool((diff <= bounds[name]).all()), (name, diff, bounds[name])
    gap = (whole.posterior_gap().value - chunked.posterior_gap().value).abs()
    assert bool((gap <= bounds["gap"]).all()), (gap, bounds["gap"])
    assert torch.equal(a.pareto_k, b.pareto_k)  # the same top weights, selected (not computed) in any chunking


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_chunked_and_unchunked_log_marginal_agree(chunk_size):
    model, x = make_model()
    q = diagonal_q(model, x, **QS["far"])
    k = 1000
    bank = torch.randn(k, *q.batch_shape, model.latent_dim, generator=torch.Generator().manual_seed(0), dtype=DTYPE)

    def run(chunk):
        r = BankNormal(q.base_dist.loc, q.base_dist.scale, bank)
        return vaelab.log_marginal(model, x, k=k, q=r, chunk_size=chunk), vaelab.posterior_gap(
            model, x, k=k, q=BankNormal(q.base_dist.loc, q.base_dist.scale, bank), chunk_size=chunk
        )

    (whole, gap_whole), (chunked, gap_chunked) = run(k), run(chunk_size)
    # the full log-weight matrix: each chunk's rows are computed row by row alike, so only the streaming differs
    lw = (
        model.decode(q.base_dist.loc + q.base_dist.scale * bank).log_prob(x)
        + model.prior.log_prob(q.base_dist.loc + q.base_dist.scale * bank)
        - q.log_prob(q.base_dist.loc + q.base_dist.scale * bank)
    )
    lw = lw.detach()
    bounds = streaming_rounding_bounds(lw)
    for name in ("value", "stderr", "ess"):
        diff = (getattr(chunked, name) - getattr(whole, name)).abs()
        assert bool((diff <= bounds[name]).all()), (name, diff, bounds[name])
    # the log-weights of a chunk come from decoder passes of another batch size, whose kernels may round otherwise
    # (they do on some Intel CPUs): the same top weights up to rounding, so k-hat within the dtype's rounding slack
    k_diff = (chunked.pareto_k - whole.pareto_k).abs()
    assert bool((k_diff <= tolerance(torch.zeros_like(whole.pareto_k), whole.pareto_k)).all()), k_diff
    assert bool(((gap_chunked.value - gap_whole.value).abs() <= bounds["gap"]).all())
    # and the streamed reductions equal the direct ones on the full log-weight matrix
    torch.testing.assert_close(whole.value, torch.logsumexp(lw, 0) - math.log(k))
    w = torch.softmax(lw, 0)
    torch.testing.assert_close(whole.ess, 1 / (w**2).sum(0))
    torch.testing.assert_close(gap_whole.value, whole.value - lw.mean(0))


def test_weight_stats_stderr_matches_delta_method_on_known_weights():
    lw = torch.randn(5000, 4, generator=torch.Generator().manual_seed(1), dtype=DTYPE) * 0.5
    stats = _WeightStats(tail=0)
    for chunk in lw.split(333):
        stats.update(chunk)
    result = stats.log_marginal()
    w = lw.exp()
    expected = w.std(0) / w.mean(0) / math.sqrt(lw.shape[0])  # delta method: se(log m) = se(m) / m
    torch.testing.assert_close(result.stderr, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("chunk", [1, 7, 333, 5000])
def test_weight_stats_prefix_bounds_are_the_iwae_bounds_of_the_first_samples(chunk):
    # heavy-tailed weights (scale 3) so that a careless rescaling of the running sum would show
    lw = torch.randn(5000, 4, generator=torch.Generator().manual_seed(2), dtype=DTYPE) * 3 - 100
    prefixes = (1, 10, 100, 1000, 4999, 5000)
    stats = _WeightStats(tail=0, prefixes=prefixes)
    for part in lw.split(chunk):
        stats.update(part)
    result = stats.log_marginal()
    for j in prefixes:
        expected = torch.logsumexp(lw[:j], 0) - math.log(j)
        torch.testing.assert_close(result.iwae[j], expected, rtol=1e-12, atol=1e-12)
        if j > 1:  # the delta-method stderr of the first j weights alone, as for the whole stream
            w = torch.exp(lw[:j] - lw[:j].max(0).values)
            se = w.std(0) / w.mean(0) / math.sqrt(j)
            torch.testing.assert_close(result.iwae_stderr[j], se, rtol=1e-9, atol=0)
    assert bool(result.iwae_stderr[1].isnan().all())  # one weight: no error estimate
    torch.testing.assert_close(result.iwae[5000], result.value, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.iwae_stderr[5000], result.stderr, rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk", [1, 3, 10])
def test_iwae_prefix_is_finite_when_later_weights_in_its_block_are_far_larger(chunk):
    # the first weights 1000 nats below the ones after them, in the same held-back block: exp(lw - block max)
    # underflowed to 0, so IWAE_1 was -inf (found by tests/test_estimators_fuzz.py)
    lw = torch.tensor([[-1000.0], [-999.0], [0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0]], dtype=DTYPE)
    stats = _WeightStats(tail=0, prefixes=(1, 2, 10))
    for part in lw.split(chunk):
        stats.update(part)
    result = stats.log_marginal()
    for j in (1, 2, 10):
        expected = torch.logsumexp(lw[:j], 0) - math.log(j)  # each within gamma_n of the exact value, n steps
        torch.testing.assert_close(result.iwae[j], expected, rtol=2 * rounding_gamma(2 * j + 4, DTYPE), atol=0)


@pytest.mark.parametrize("chunk", [7, 333, 1024, 5000])
def test_weight_stats_pareto_tail_is_the_top_of_the_whole_stream(chunk):
    # the tail's top-k is merged only every _TOP_BUFFER rows: the kept values and k-hat must not depend on chunking
    lw = torch.randn(5000, 4, generator=torch.Generator().manual_seed(3), dtype=DTYPE) * 2
    tail = _pareto_tail_size(5000)
    stats = _WeightStats(tail=tail)
    for part in lw.split(chunk):
        stats.update(part)
    result = stats.log_marginal()
    torch.testing.assert_close(stats.top, lw.topk(tail + 1, dim=0).values, rtol=0, atol=0)
    torch.testing.assert_close(result.pareto_k, pareto_khat(lw.topk(tail + 1, dim=0).values), rtol=0, atol=0)


def test_iwae_ladder_from_one_stream_brackets_log_px():
    # IWAE_1 <= IWAE_10 <= ... <= log p(x) in expectation; averaged over many replicated examples the nested prefixes
    # of one draw must be ordered and IWAE_1 must match the exact ELBO of q
    torch.manual_seed(11)
    model, x = make_model(noise="diagonal")
    q = diagonal_q(model, x, **QS["far"])
    reps = 400
    x_rep, q_rep = replicate(x, q, reps)
    result = vaelab.log_marginal(model, x_rep, k=1000, q=q_rep, iwae_ks=(1, 10, 100))
    means = {j: mean_and_stderr(result.iwae[j], reps) for j in (1, 10, 100)}
    assert_within_stderr(means[1][0], exact_elbo(model, x, q), means[1][1], what="IWAE_1 prefix = ELBO")
    for lo, hi in ((1, 10), (10, 100)):
        gap, se = means[hi][0] - means[lo][0], torch.hypot(means[hi][1], means[lo][1])
        assert bool((gap > -Z_TOLERANCE * se).all()), (lo, hi, gap, se)
    assert bool((means[100][0] < model.log_marginal_exact(x).detach() + Z_TOLERANCE * means[100][1]).all())
    with pytest.raises(ValueError, match="at most k"):
        vaelab.log_marginal(model, x, k=10, iwae_ks=(100,))


# --- Pareto k-hat -------------------------------------------------------------------------------------------------
# Reference values from a peer implementation (arviz 0.23.4, psislw) on the same log-weights.
ARVIZ_KHAT = [
    (0, 1.0, 4000, 0.10534296715942716),
    (1, 2.0, 4000, 0.7887656673942536),
    (2, 4.0, 1000, 2.017761257242798),
    (3, 0.5, 100, 0.40458297238351204),
]


@pytest.mark.parametrize(("seed", "scale", "n", "expected"), ARVIZ_KHAT)
def test_pareto_khat_matches_reference_implementation(seed, scale, n, expected):
    np = pytest.importorskip("numpy")
    lw = torch.from_numpy(np.random.default_rng(seed).normal(scale=scale, size=n))
    m = vaelab.estimators._pareto_tail_size(n)
    khat = pareto_khat(lw.topk(m + 1).values[:, None])
    assert khat.item() == pytest.approx(expected, rel=1e-9)


def test_pareto_khat_is_fitted_from_exactly_pareto_min_samples():
    # the boundary the docs state (docs/theory.md, LogMarginal.pareto_k): NaN at k = 20, a fitted value at k = 21
    from vaelab.estimators import PARETO_MIN_SAMPLES

    assert PARETO_MIN_SAMPLES == 21
    assert _pareto_tail_size(PARETO_MIN_SAMPLES - 1) == 0 and _pareto_tail_size(PARETO_MIN_SAMPLES) == 5
    model, x = make_model()
    q = diagonal_q(model, x, **QS["far"])
    below = vaelab.log_marginal(model, x, k=PARETO_MIN_SAMPLES - 1, q=q)
    at = vaelab.log_marginal(model, x, k=PARETO_MIN_SAMPLES, q=q)
    assert bool(below.pareto_k.isnan().all())
    assert bool(torch.isfinite(at.pareto_k).all())


# --- numerics and input validation -------------------------------------------------------------------------------
def test_huge_logits_and_tiny_variances_stay_finite():
    torch.manual_seed(11)
    decoder = torch.nn.Linear(2, 6)
    with torch.no_grad():
        decoder.weight.fill_(1e4)
        decoder.bias.fill_(-1e4)
    vae = VAE(
        prior=StandardNormal(2),
        encoder=torch.nn.Linear(6, 4),
        decoder=decoder,
        likelihood=BernoulliLikelihood((6,)),
    )
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    for value in (
        vaelab.elbo(vae, x, k=4),
        vaelab.iwae_bound(vae, x, k=4),
        vaelab.log_marginal(vae, x, k=50).value,
        vaelab.log_marginal(vae, x, k=50, proposal="prior").value,
    ):
        assert bool(torch.isfinite(value).all())
    with pytest.warns(vaelab.models.IllConditionedWarning):  # (weight / noise scale)^2 ~ 1e12: a warning, no NaN
        model, x = make_model(noise_scale=1e-6)
    for value in (
        model.log_marginal_exact(x),
        vaelab.elbo(model, x, k=4, form="kl"),
        vaelab.log_marginal(model, x, k=100).value,
        vaelab.log_marginal(model, x, k=100, proposal="prior").value,
    ):
        assert bool(torch.isfinite(value).all())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, x: vaelab.elbo(m, x[:, :3]), r"shape \[B, 6\]"),
        (lambda m, x: vaelab.elbo(m, x[0]), r"shape \[B, 6\]"),
        (lambda m, x: vaelab.elbo(m, x.masked_fill(torch.eye(3, 6, dtype=torch.bool), math.nan)), "NaN"),
        (lambda m, x: vaelab.elbo(m, x.to(torch.int64)), "floating"),
        (lambda m, x: vaelab.elbo(m, x.tolist()), "torch.Tensor"),
        (lambda m, x: vaelab.elbo(m, x, k=0), "k must be an integer >= 1"),
        (lambda m, x: vaelab.iwae_bound(m, x, k=True), "k must be an integer >= 1"),
        (lambda m, x: vaelab.log_marginal(m, x, k=2.5), "k must be an integer >= 1"),
        (lambda m, x: vaelab.log_marginal(m, x, k=10, chunk_size=0), "chunk_size"),
        (lambda m, x: vaelab.elbo(m, x, form="mean"), "form must be one of"),
        (lambda m, x: vaelab.log_marginal(m, x, k=10, proposal="uniform"), "proposal must be one of"),
        (lambda m, x: vaelab.posterior_gap(m, x, k=10, q=diagonal_q(m, x[:2])), "q must have batch shape"),
        (lambda m, x: vaelab.posterior_gap(m, x, k=10, q="posterior"), "q must be a torch.distributions"),
        (lambda m, x: vaelab.posterior_gap(m, x, k=10, chunk_size=2.0), "chunk_size must be an integer >= 1"),
        (lambda m, x: vaelab.elbo(m, x.float()), "dtype torch.float32 but the model's parameters are torch.float64"),
        (lambda m, x: vaelab.log_marginal(m, x, k=10, iwae_ks=5), "iwae_ks must be a sequence"),
        (lambda m, x: vaelab.log_marginal(m, x, k=10, iwae_ks=[0]), "each of iwae_ks must be an integer >= 1"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(call, message):
    model, x = make_model()
    with pytest.raises(ValueError, match=message):
        call(model, x)


@pytest.mark.parametrize("k", ["3", None, -1, 0, True, 2.0])
@pytest.mark.parametrize("estimator", ["log_marginal", "posterior_gap", "iwae_bound", "log_weights", "elbo"])
def test_every_estimator_checks_k_first(estimator, k):
    # x is not even a tensor: k is checked before anything else is looked at, with the same message everywhere
    with pytest.raises(ValueError, match=r"^k must be an integer >= 1, got "):
        getattr(vaelab, estimator)(make_model()[0], "not data", k=k)


def tiny_bernoulli_vae() -> VAE:
    return VAE(
        prior=StandardNormal(2),
        encoder=torch.nn.Linear(6, 4),
        decoder=torch.nn.Linear(2, 6),
        likelihood=BernoulliLikelihood((6,)),
    )


def test_data_outside_bernoulli_support_is_rejected():
    with pytest.raises(ValueError, match="outside the likelihood's support"):
        vaelab.log_marginal(tiny_bernoulli_vae(), torch.full((2, 6), 0.5), k=10)


def test_trusted_data_skips_the_value_pass_but_not_the_shape_check():
    vae = tiny_bernoulli_vae()
    half = torch.full((2, 6), 0.5)
    with vaelab.estimators.trusted_data():
        vaelab.estimators.check_data(vae, half)  # the caller vouches for the values
        with pytest.raises(ValueError, match="shape"):
            vaelab.estimators.check_data(vae, half[:, :5])
    with pytest.raises(ValueError, match="outside the likelihood's support"):  # checked again outside the block
        vaelab.estimators.check_data(vae, half)


@pytest.mark.parametrize("rows", [1, 3, 100])
def test_check_values_names_the_first_bad_example_across_chunks(rows):
    from torch.distributions import constraints

    data = torch.zeros(10, 2, 3)
    data[7, 1, 2] = 2.0
    data[8, 0, 0] = math.nan
    message = r"^train has values outside \[0, 1\], first in example 7 \(its range \[0, 2\]\)$"
    with pytest.raises(ValueError, match=message):
        vaelab.estimators.check_values(data, constraints.unit_interval, name="train", support_name="[0, 1]", rows=rows)
    data[5, 0, 1] = math.inf
    with pytest.raises(ValueError, match=r"^x contains NaN or infinite values: 1 in example 5, the first$"):
        vaelab.estimators.check_values(data, constraints.real, rows=rows)
    vaelab.estimators.check_values(data[:5], constraints.unit_interval, rows=rows)  # all good: no error


@pytest.mark.parametrize("quantity", ["log_marginal", "posterior_gap"])
def test_reported_stderr_matches_spread_over_replicates(quantity):
    """The delta-method standard error of one estimate equals the spread of independent estimates."""
    torch.manual_seed(12)
    model, x = make_model()
    q = diagonal_q(model, x, shift=0.1, scale_factor=1.3)
    reps = 3000
    x_rep, q_rep = replicate(x, q, reps)
    result = getattr(vaelab, quantity)(model, x_rep, k=200, q=q_rep)
    spread = result.value.reshape(reps, -1).std(0)
    reported = result.stderr.reshape(reps, -1).mean(0)
    # the sample std of 3000 replicates is itself known to ~1.3% (more with heavier tails): allow 10%
    torch.testing.assert_close(reported, spread, rtol=0.1, atol=0)


def test_pareto_threshold_follows_sample_size():
    from vaelab.estimators import pareto_k_threshold

    assert pareto_k_threshold(100) == pytest.approx(0.5)
    assert pareto_k_threshold(1000) == pytest.approx(2 / 3)
    assert pareto_k_threshold(5000) == pareto_k_threshold(10**6) == 0.7
