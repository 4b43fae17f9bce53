"""Tests for vaelab.posteriors: the diagonal-Gaussian head, analytic KL / entropy against Monte Carlo, and the
KL pairs (diagonal Gaussian, full-covariance Gaussian) registered there.

Monte Carlo comparisons use N = 200,000 seeded float64 samples and the one tolerance rule,
:func:`vaelab.tolerance.assert_within_stderr`, with stderr = sample std / sqrt(N) (see that module for the
false-alarm rate).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch.distributions import Independent, Laplace, MultivariateNormal, Normal, kl_divergence

from vaelab.estimators import entropy_term, kl_term
from vaelab.posteriors import POSTERIORS, DiagonalGaussian, as_multivariate_normal
from vaelab.priors import LearnedGaussian, StandardNormal
from vaelab.tolerance import assert_within_stderr

D = 4  # latent dimension
B = 3  # examples
N = 200_000  # Monte Carlo samples


# --- helpers ------------------------------------------------------------------------------------------------
def _posterior(seed: int, batch=(B,), dim: int = D) -> Independent:
    """A float64 q(z|x) from random encoder outputs: loc ~ N(0, 1), scale = softplus(N(0, 1)) + floor."""
    gen = torch.Generator().manual_seed(seed)
    return DiagonalGaussian()(torch.randn(*batch, 2 * dim, generator=gen, dtype=torch.float64))


def _learned_prior(seed: int, dim: int = D) -> LearnedGaussian:
    """A LearnedGaussian moved away from N(0, I): a formula assuming a standard normal prior would fail."""
    gen = torch.Generator().manual_seed(seed)
    prior = LearnedGaussian(dim).to(torch.float64)
    with torch.no_grad():
        prior.loc.copy_(torch.randn(dim, generator=gen, dtype=torch.float64))
        prior.raw_scale.copy_(torch.randn(dim, generator=gen, dtype=torch.float64))
    return prior


def _full_gaussian(seed: int, batch=(), dim: int = D) -> MultivariateNormal:
    """A float64 Gaussian with a random full covariance (Cholesky factor with diagonal in [0.5, 1.5])."""
    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(*batch, dim, generator=gen, dtype=torch.float64)
    tril = 0.3 * torch.randn(*batch, dim, dim, generator=gen, dtype=torch.float64).tril(-1)
    diag = 0.5 + torch.rand(*batch, dim, generator=gen, dtype=torch.float64)
    return MultivariateNormal(loc, scale_tril=tril + torch.diag_embed(diag))


def _mc_mean(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the sample dim (0) and its standard error."""
    return values.mean(0), values.std(0) / math.sqrt(values.shape[0])


# --- the diagonal Gaussian head -----------------------------------------------------------------------------
def test_registry():
    assert POSTERIORS["diagonal-gaussian"] is DiagonalGaussian


@pytest.mark.parametrize("lead", [(B,), (2, B)])
def test_diagonal_gaussian_shapes(lead):
    q = DiagonalGaussian()(torch.zeros(*lead, 2 * D))
    assert isinstance(q, Independent)
    assert isinstance(q.base_dist, Normal)
    assert q.batch_shape == lead
    assert q.event_shape == (D,)
    assert q.has_rsample
    assert q.rsample((5,)).shape == (5, *lead, D)


def test_diagonal_gaussian_parameters_and_density():
    gen = torch.Generator().manual_seed(0)
    min_scale = 1e-4
    params = 2 * torch.randn(B, 2 * D, generator=gen, dtype=torch.float64)
    q = DiagonalGaussian(min_scale=min_scale)(params)
    loc, raw = params[:, :D].numpy(), params[:, D:].numpy()
    scale = np.logaddexp(0.0, raw) + min_scale  # softplus(raw) + floor
    np.testing.assert_allclose(q.base_dist.loc.numpy(), loc, rtol=1e-15)
    np.testing.assert_allclose(q.base_dist.scale.numpy(), scale, rtol=1e-13)
    z = torch.randn(5, B, D, generator=gen, dtype=torch.float64)
    expected = scipy.stats.norm.logpdf(z.numpy(), loc=loc, scale=scale).sum(-1)
    np.testing.assert_allclose(q.log_prob(z).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_rsample_is_the_reparameterization():
    torch.manual_seed(1)
    params = torch.randn(B, 2 * D, dtype=torch.float64, requires_grad=True)
    q = DiagonalGaussian()(params)
    z = q.rsample()
    z.sum().backward()
    # z = loc + scale * eps: dz/dloc = 1, dz/draw = eps * sigmoid(raw) (softplus' = sigmoid)
    eps = ((z - q.base_dist.loc) / q.base_dist.scale).detach()
    torch.testing.assert_close(params.grad[:, :D], torch.ones(B, D, dtype=torch.float64))
    torch.testing.assert_close(params.grad[:, D:], eps * torch.sigmoid(params[:, D:].detach()))


def test_samples_have_the_stated_moments():
    torch.manual_seed(2)
    q = _posterior(seed=3)
    loc, scale = q.base_dist.loc, q.base_dist.scale
    z = q.sample((N,))  # (N, B, D)
    mean, mean_stderr = _mc_mean(z)
    assert_within_stderr(mean, loc, mean_stderr, what="sample mean")
    var, var_stderr = _mc_mean((z - loc) ** 2)
    assert_within_stderr(var, scale**2, var_stderr, what="sample variance")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_floor_at_very_negative_raw_scale(dtype):
    torch.manual_seed(4)
    min_scale = 1e-4
    params = torch.cat([torch.zeros(B, D), torch.full((B, D), -1e4)], -1).to(dtype).requires_grad_()
    q = DiagonalGaussian(min_scale=min_scale)(params)
    assert bool((q.base_dist.scale >= min_scale).all())
    z = q.rsample()
    log_prob = q.log_prob(z)
    log_prob.sum().backward()
    assert bool(torch.isfinite(z).all())
    assert bool(torch.isfinite(log_prob).all())
    assert bool(torch.isfinite(params.grad).all())


@pytest.mark.parametrize("shape", [(B, 2 * D + 1), (B, 1), (2, B, 7)])
def test_odd_last_dimension_raises(shape):
    with pytest.raises(ValueError, match="even last dimension"):
        DiagonalGaussian()(torch.zeros(shape))


@pytest.mark.parametrize("min_scale", [0.0, -1.0])
def test_non_positive_min_scale_raises(min_scale):
    with pytest.raises(ValueError, match="min_scale"):
        DiagonalGaussian(min_scale=min_scale)


# --- analytic KL and entropy against Monte Carlo ------------------------------------------------------------
PRIOR_MODULES = {
    "standard-normal": lambda: StandardNormal(D).to(torch.float64),
    "learned-gaussian-moved": lambda: _learned_prior(seed=10),
}


@pytest.mark.parametrize("prior_name", sorted(PRIOR_MODULES))
def test_analytic_kl_matches_monte_carlo(prior_name):
    torch.manual_seed(11)
    q, p = _posterior(seed=12), PRIOR_MODULES[prior_name]()()
    with torch.no_grad():
        z = q.sample((N,))  # (N, B, D)
        exact = kl_term(q, p, z)
        # analytic: the value does not depend on the samples passed in
        assert torch.equal(kl_term(q, p, z[:2]), exact)
        estimate, stderr = _mc_mean(q.log_prob(z) - p.log_prob(z))
    assert exact.shape == (B,)
    assert_within_stderr(estimate, exact, stderr, what=f"KL(q || {prior_name})")


def test_analytic_entropy_matches_monte_carlo():
    torch.manual_seed(13)
    q = _posterior(seed=14)
    z = q.sample((N,))
    exact = entropy_term(q, z)
    assert torch.equal(entropy_term(q, z[:2]), exact)
    estimate, stderr = _mc_mean(-q.log_prob(z))
    assert exact.shape == (B,)
    assert_within_stderr(estimate, exact, stderr, what="H[q]")


# --- the registered pairs (diagonal, full) and (full, diagonal) ---------------------------------------------
def test_as_multivariate_normal_is_the_same_distribution():
    gen = torch.Generator().manual_seed(20)
    q = _posterior(seed=21)
    full = as_multivariate_normal(q)
    assert isinstance(full, MultivariateNormal)
    assert full.batch_shape == q.batch_shape
    assert full.event_shape == q.event_shape
    z = torch.randn(5, B, D, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(full.log_prob(z), q.log_prob(z))
    torch.testing.assert_close(full.entropy(), q.entropy())
    torch.testing.assert_close(full.covariance_matrix, torch.diag_embed(q.base_dist.scale**2))
    already_full = _full_gaussian(seed=22)
    assert as_multivariate_normal(already_full) is already_full


@pytest.mark.parametrize(
    "dist",
    [
        pytest.param(Independent(Laplace(torch.zeros(B, D), torch.ones(B, D)), 1), id="laplace"),
        pytest.param(Independent(Normal(torch.zeros(B, D), torch.ones(B, D)), 2), id="two-event-dims"),
        pytest.param(Normal(torch.zeros(D), torch.ones(D)), id="not-independent"),
    ],
)
def test_as_multivariate_normal_rejects_other_distributions(dist):
    with pytest.raises(NotImplementedError, match="cannot view"):
        as_multivariate_normal(dist)


def test_kl_diagonal_to_full_matches_full_to_full_and_monte_carlo():
    torch.manual_seed(23)
    q, p = _posterior(seed=24), _full_gaussian(seed=25)  # q batch [B], p batch [] (broadcast)
    with torch.no_grad():
        exact = kl_divergence(q, p)
        torch.testing.assert_close(exact, kl_divergence(as_multivariate_normal(q), p), rtol=1e-12, atol=1e-12)
        z = q.sample((N,))
        torch.testing.assert_close(kl_term(q, p, z), exact)  # estimators take the registered, analytic path
        estimate, stderr = _mc_mean(q.log_prob(z) - p.log_prob(z))
    assert exact.shape == (B,)
    assert_within_stderr(estimate, exact, stderr, what="KL(diagonal q || full p)")


def test_kl_full_to_diagonal_matches_full_to_full_and_monte_carlo():
    torch.manual_seed(26)
    p, q = _full_gaussian(seed=27, batch=(B,)), _posterior(seed=28)
    with torch.no_grad():
        exact = kl_divergence(p, q)
        torch.testing.assert_close(exact, kl_divergence(p, as_multivariate_normal(q)), rtol=1e-12, atol=1e-12)
        z = p.sample((N,))
        estimate, stderr = _mc_mean(p.log_prob(z) - q.log_prob(z))
    assert exact.shape == (B,)
    assert_within_stderr(estimate, exact, stderr, what="KL(full p || diagonal q)")


def test_registered_pairs_decline_non_gaussian_independents():
    laplace = Independent(Laplace(torch.zeros(B, D), torch.ones(B, D)), 1)
    full = MultivariateNormal(torch.zeros(D), torch.eye(D))
    with pytest.raises(NotImplementedError):
        kl_divergence(laplace, full)
    with pytest.raises(NotImplementedError):
        kl_divergence(full, laplace)


def test_kl_diagonal_to_full_gradcheck():
    gen = torch.Generator().manual_seed(29)
    p = _full_gaussian(seed=30)
    params = torch.randn(B, 2 * D, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: kl_divergence(DiagonalGaussian()(x), p), (params,))
