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

from tiny import tiny_config
from vaelab.estimators import entropy_term, kl_term
from vaelab.posteriors import (
    POSTERIORS,
    DiagonalGaussian,
    InverseAutoregressiveFlow,
    PlanarFlow,
    as_multivariate_normal,
)
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
    assert POSTERIORS["planar"] is PlanarFlow and POSTERIORS["iaf"] is InverseAutoregressiveFlow


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


# --- flow posteriors --------------------------------------------------------------------------------------------------
FLOW_OPTIONS = {"planar": dict(layers=3), "iaf": dict(layers=2, hidden=[8])}


def _flow_head(name: str, dim: int = 2, seed: int = 0, **options):
    """A float64 flow head for latent dimension ``dim``, attached as a VAE would attach it, moved off its start."""
    from types import SimpleNamespace

    torch.manual_seed(seed)
    head = POSTERIORS[name](**{**FLOW_OPTIONS[name], **options})
    head.attach(SimpleNamespace(latent_dim=dim))
    head = head.to(torch.float64)
    with torch.no_grad():  # a flow visibly away from the identity
        for p in head.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return head


def _linear_gaussian(batch: int = 3):
    from vaelab import LinearGaussian

    g = torch.Generator().manual_seed(0)
    model = LinearGaussian.random(5, 2, noise_scale=0.7, generator=g)
    return model, model.sample(batch, generator=g).detach(), g


@pytest.mark.parametrize("name", sorted(FLOW_OPTIONS))
def test_flow_posterior_shapes_and_the_cached_log_prob_equals_the_inverted_one(name):
    head = _flow_head(name)
    params = torch.randn(B, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = head(params)
    assert q.batch_shape == (B,) and q.event_shape == (2,) and q.has_rsample
    z = q.rsample((5,))
    assert z.shape == (5, B, 2) and z.requires_grad
    cached = q.log_prob(z)  # the log-determinant of q's own sample, read from the transforms' cache
    inverted = q.log_prob(z.detach().clone())  # a copy: every map inverted
    assert cached.shape == (5, B)
    torch.testing.assert_close(cached, inverted, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="needs encoder output"):
        head(torch.zeros(B, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="attach"):
        POSTERIORS[name]()(params)


@pytest.mark.parametrize("name", sorted(FLOW_OPTIONS))
def test_every_estimator_objective_and_the_gap_decomposition_run_on_a_flow_posterior(name):
    from vaelab.diagnostics import gap_decomposition
    from vaelab.estimators import elbo, elbo_integrands, elbo_parts, iwae_bound, log_marginal, log_weights
    from vaelab.estimators import posterior_gap as gap
    from vaelab.objectives import OBJECTIVES

    model, x, g = _linear_gaussian()
    head = _flow_head(name)
    params = torch.randn(3, 4, generator=g, dtype=torch.float64)

    def q():
        return head(params)

    values = [elbo_parts(model, x, k=4, form=form, q=q()).elbo for form in ("joint", "entropy", "kl")]
    values += [elbo(model, x, k=4, q=q()), iwae_bound(model, x, k=4, q=q())]
    values += list(elbo_integrands(model, x, k=4, q=q()).values())
    values += [log_weights(model, x, k=4, q=q(), proposal=p) for p in ("posterior", "prior")]
    estimate = log_marginal(model, x, k=10, chunk_size=3, q=q())
    values += [estimate.value, estimate.stderr, gap(model, x, k=10, chunk_size=3, q=q()).value]
    options = {"capacity": dict(capacity=1.0, gamma=1.0), "miwae": dict(m=2), "piwae": dict(m=2)}
    options["ciwae"] = dict(elbo_weight=0.5)
    for objective, fn in OBJECTIVES.items():
        if objective in ("iwae_dreg", "free_bits"):  # both need q's parameters in closed form: refused, with reasons
            with pytest.raises(ValueError, match=r"DReG needs q|factorised Gaussians"):
                fn(model, x, k=2, q=q(), **({"free_nats": 0.1} if objective == "free_bits" else {}))
            continue
        out = fn(model, x, k=2, q=q(), **options.get(objective, {}))
        out.loss.sum().backward()
        values += [out.loss.detach(), out.elbo]
    assert all(bool(torch.isfinite(v).all()) for v in values)
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in head.parameters())
    decomposition = gap_decomposition(model, x, k=40, steps=3, elbo_k=20, q=q(), batch_size=3)
    total = decomposition.approximation_gap.value + decomposition.amortization_gap.value
    torch.testing.assert_close(decomposition.posterior_gap.value, total)
    assert bool(torch.isfinite(decomposition.log_px.value).all())


def test_planar_flow_elbo_on_the_linear_gaussian_model_matches_quadrature():
    """ELBO(q) = E_eps[log p(x, f(eps)) - log N(eps) + log |det J_f(eps)|] by 2-d Gauss-Hermite quadrature over the
    base Gaussian, the Jacobian by autograd (not the flow's own log-determinant), against the Monte Carlo ELBO."""
    from vaelab.estimators import log_weights
    from vaelab.tolerance import assert_within_stderr

    model, x, _ = _linear_gaussian()
    head = _flow_head("planar")
    params = torch.cat([model.posterior(x).loc.detach(), torch.zeros(3, 2, dtype=torch.float64)], -1)  # (B, 4)
    q = head(params)
    base, transforms = q.base_dist, q.transforms
    nodes, weights = np.polynomial.hermite.hermgauss(60)
    t = torch.as_tensor(nodes, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64) / math.sqrt(math.pi)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 1, 2)  # (N, 1, 2)
    weight = (w[:, None] * w[None, :]).reshape(-1, 1)  # (N, 1)
    eps = (base.base_dist.loc + base.base_dist.scale * math.sqrt(2) * grid).detach().requires_grad_()  # (N, B, 2)
    z = eps
    for transform in transforms:
        z = transform._call(z)
    rows = [torch.autograd.grad(z[..., i].sum(), eps, retain_graph=True)[0] for i in range(2)]  # d z_i / d eps
    jacobian = torch.stack(rows, -2)  # (N, B, 2, 2): each point's own Jacobian (points are independent)
    integrand = (
        model.decode(z).log_prob(x) + model.prior.log_prob(z) - base.log_prob(eps) + torch.linalg.slogdet(jacobian)[1]
    )
    exact = (weight * integrand.detach()).sum(0)  # (B,)
    torch.manual_seed(3)
    lw = log_weights(model, x, k=20_000, q=head(params)).detach()  # (k, B)
    assert_within_stderr(lw.mean(0), exact, lw.std(0) / math.sqrt(lw.shape[0]), what="planar flow ELBO")
    assert bool((exact < model.log_marginal_exact(x) - 1e-3).all())  # a proper bound here: q is not the posterior


def test_iaf_can_be_the_exact_posterior_of_a_linear_gaussian_model():
    """One linear IAF step (hidden=[]) makes q a full-covariance Gaussian: set to p(z|x) = N(m, L L^T), every
    log-weight is log p(x), so the ELBO is log p(x) up to rounding."""
    from vaelab._math import inverse_softplus
    from vaelab.estimators import log_weights
    from vaelab.tolerance import assert_within_stderr

    model, x, _ = _linear_gaussian()
    post = model.posterior(x)
    m, chol = post.loc.detach(), post.scale_tril.detach()  # (B, 2), (2, 2) shared by the examples
    chol = chol[0] if chol.ndim == 3 else chol
    head = _flow_head("iaf", layers=1, hidden=[])
    made = head.mades[0]
    sigma = 0.5  # s = -forget_bias: sigma = sigmoid(0)
    s0 = chol.diagonal() / sigma  # the base scales: L_ii = sigma s0_i
    lower = chol / chol.diagonal()[None, :]  # M_ij = L_ij / (sigma s0_j) / (1 - sigma) = L_ij / L_jj below the diagonal
    strict = lower.tril(-1)
    with torch.no_grad():
        for p in made.parameters():
            p.zero_()
        made.output.weight[:2] = strict  # m = M z (masked: strictly lower triangular) + context
        made.context.bias[2:] = -head.forget_bias  # s = -forget_bias
        made.context.weight[:2, :2] = torch.eye(2, dtype=torch.float64) - strict  # m += (I - M) loc0
    params = torch.cat([m, inverse_softplus(s0 - head.base.min_scale).expand(3, 2)], -1)  # base N(m, diag(s0^2))
    torch.manual_seed(4)
    lw = log_weights(model, x, k=2000, q=head(params)).detach()
    exact = model.log_marginal_exact(x)
    assert_within_stderr(lw.mean(0), exact, lw.std(0) / math.sqrt(lw.shape[0]), what="exact-posterior IAF ELBO")
    assert float(lw.std(0).max()) < 1e-9  # every weight is p(x): q is the posterior


@pytest.mark.parametrize("name", sorted(FLOW_OPTIONS))
def test_flow_posteriors_train_from_a_config_and_reload(name, tmp_path):
    from vaelab.runs import load_run
    from vaelab.train import train

    data = torch.rand(100, 16, generator=torch.Generator().manual_seed(10))
    config = tiny_config(
        posterior=name,
        posterior_options=FLOW_OPTIONS[name],
        objective="iwae",
        k=2,
        max_steps=4,
    )
    result = train(config, data, data[:20], tmp_path / "run")
    assert result.step == 4
    model = load_run(tmp_path / "run").model
    assert isinstance(model.posterior, POSTERIORS[name])
    assert any(key.startswith("posterior.") for key in model.state_dict())
    q = model.encode(data[:3])
    assert bool(torch.isfinite(q.log_prob(q.rsample((2,)))).all())
