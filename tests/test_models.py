"""The model interface, and LinearGaussian's closed forms against independent computations (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from vaelab.likelihoods import BernoulliLikelihood
from vaelab.models import VAE, LinearGaussian
from vaelab.priors import StandardNormal


def random_model(noise="diagonal", seed=0, data_dim=7, latent_dim=3):
    return LinearGaussian.random(data_dim, latent_dim, noise=noise, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("noise", ["isotropic", "diagonal"])
def test_exact_log_marginal_matches_scipy(noise):
    model = random_model(noise)
    x = model.sample(5, generator=torch.Generator().manual_seed(1))
    w, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    cov = w @ w.T + np.diag(model._noise_diag().detach().numpy())
    expected = stats.multivariate_normal(mean=b, cov=cov).logpdf(x.detach().numpy())
    np.testing.assert_allclose(model.log_marginal_exact(x).detach().numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("noise", ["isotropic", "diagonal"])
def test_exact_posterior_matches_gaussian_conditioning(noise):
    """p(z|x) from the joint Gaussian of (z, x): mean = W^T C^-1 (x - b), cov = I - W^T C^-1 W, C = W W^T + Psi."""
    model = random_model(noise)
    x = model.sample(4, generator=torch.Generator().manual_seed(2))
    w, b = model.weight.detach(), model.bias.detach()
    c = w @ w.T + torch.diag(model._noise_diag().detach())
    gain = torch.linalg.solve(c, w).T  # W^T C^-1, (d, D)
    post = model.posterior(x)
    torch.testing.assert_close(post.loc.detach(), (x - b) @ gain.T)
    torch.testing.assert_close(post.covariance_matrix[0].detach(), torch.eye(3, dtype=w.dtype) - gain @ w)


def test_bayes_rule_holds_pointwise():
    """log p(z|x) = log p(x|z) + log p(z) - log p(x) at arbitrary z."""
    model = random_model()
    x = model.sample(4, generator=torch.Generator().manual_seed(3))
    z = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lhs = model.posterior(x).log_prob(z)
    rhs = model.decode(z).log_prob(x) + model.prior.log_prob(z) - model.log_marginal_exact(x)
    torch.testing.assert_close(lhs.detach(), rhs.detach())


def test_interface_shapes():
    model = random_model()
    x = model.sample(4)
    assert model.prior.batch_shape == () and model.prior.event_shape == (3,)
    q = model.encode(x)
    assert q.batch_shape == (4,) and q.event_shape == (3,) and q.has_rsample
    z = q.rsample((5,))
    p = model.decode(z)
    assert p.batch_shape == (5, 4) and p.event_shape == (7,)
    vae = VAE(
        prior=StandardNormal(2),
        encoder=torch.nn.Linear(6, 4),
        decoder=torch.nn.Linear(2, 6),
        likelihood=BernoulliLikelihood((2, 3)),
    )
    xb = torch.bernoulli(torch.full((4, 2, 3), 0.5))
    vae.encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 4))
    q = vae.encode(xb)
    assert q.batch_shape == (4,) and q.event_shape == (2,)
    p = vae.decode(q.rsample((5,)))
    assert p.batch_shape == (5, 4) and p.event_shape == (2, 3)
    assert p.log_prob(xb).shape == (5, 4)


def test_fit_ppca_is_a_stationary_point_of_the_likelihood():
    """The closed-form ML fit: the gradient of the mean log-likelihood w.r.t. every parameter vanishes there."""
    truth = random_model("isotropic", seed=5, data_dim=8, latent_dim=2)
    x = truth.sample(4000, generator=torch.Generator().manual_seed(6))
    fit = LinearGaussian.fit_ppca(x, latent_dim=2)
    fit.log_marginal_exact(x).mean().backward()
    for name, param in fit.named_parameters():
        assert param.grad.abs().max().item() < 1e-8, name
    # and it beats the generating model on its own sample, as an ML estimate must
    assert fit.log_marginal_exact(x).mean() > truth.log_marginal_exact(x).mean()
    # recovering the generating covariance up to sampling error
    cov = lambda m: (m.weight @ m.weight.T + torch.diag(m._noise_diag())).detach()  # noqa: E731
    assert (cov(fit) - cov(truth)).abs().max() < 0.25 * cov(truth).abs().max()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(weight=torch.zeros(3), bias=torch.zeros(3), noise_var=1.0), "weight must be"),
        (dict(weight=torch.zeros(3, 2), bias=torch.zeros(2), noise_var=1.0), "bias must be"),
        (
            dict(weight=torch.zeros(3, 2), bias=torch.zeros(3), noise_var=torch.ones(2)),
            "noise_var must be a scalar",
        ),
        (dict(weight=torch.zeros(3, 2), bias=torch.zeros(3), noise_var=0.0), "noise_var must be > 0"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearGaussian(**kwargs)


def test_fit_ppca_bad_input():
    x = torch.randn(10, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="latent_dim"):
        LinearGaussian.fit_ppca(x, latent_dim=4)
    with pytest.raises(ValueError, match="NaN"):
        LinearGaussian.fit_ppca(x.masked_fill(x > 1, float("nan")), latent_dim=2)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        LinearGaussian.fit_ppca(x[0], latent_dim=2)
