"""Tests for vaelab.priors: shapes and broadcasting, densities against scipy, dtype, gradients, validation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from torch.distributions import Independent, Normal

from vaelab.priors import PRIORS, LearnedGaussian, StandardNormal

D = 3  # latent dimension
K, B = 4, 5  # samples, examples


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_independent_normal_with_scalar_batch(name):
    prior = PRIORS[name](D)()
    assert isinstance(prior, Independent)
    assert isinstance(prior.base_dist, Normal)
    assert prior.batch_shape == ()
    assert prior.event_shape == (D,)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_log_prob_broadcasts_over_samples_and_examples(name):
    gen = torch.Generator().manual_seed(0)
    prior = PRIORS[name](D).to(torch.float64)
    z = torch.randn(K, B, D, generator=gen, dtype=torch.float64)
    log_prob = prior().log_prob(z)
    assert log_prob.shape == (K, B)
    # each entry is the density of its own z, not mixed across the leading dims
    torch.testing.assert_close(log_prob[2, 3], prior().log_prob(z[2, 3]))


def test_standard_normal_matches_scipy():
    gen = torch.Generator().manual_seed(1)
    z = 2 * torch.randn(K, B, D, generator=gen, dtype=torch.float64)
    log_prob = StandardNormal(D).to(torch.float64)().log_prob(z)
    expected = scipy.stats.norm.logpdf(z.numpy()).sum(-1)
    np.testing.assert_allclose(log_prob.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_learned_gaussian_matches_scipy_after_moving():
    gen = torch.Generator().manual_seed(2)
    prior = LearnedGaussian(D).to(torch.float64)
    with torch.no_grad():
        prior.loc.copy_(torch.randn(D, generator=gen, dtype=torch.float64))
        prior.raw_scale.copy_(torch.randn(D, generator=gen, dtype=torch.float64))
    dist = prior()
    z = torch.randn(K, B, D, generator=gen, dtype=torch.float64)
    expected = scipy.stats.norm.logpdf(
        z.numpy(), loc=prior.loc.detach().numpy(), scale=dist.base_dist.scale.detach().numpy()
    ).sum(-1)
    np.testing.assert_allclose(dist.log_prob(z).detach().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_learned_gaussian_starts_at_standard_normal():
    gen = torch.Generator().manual_seed(3)
    z = 2 * torch.randn(K, B, D, generator=gen)
    learned, standard = LearnedGaussian(D)(), StandardNormal(D)()
    torch.testing.assert_close(learned.base_dist.loc.detach(), torch.zeros(D))
    torch.testing.assert_close(learned.base_dist.scale.detach(), torch.ones(D))
    torch.testing.assert_close(learned.log_prob(z).detach(), standard.log_prob(z))


def test_learned_gaussian_parameters_get_gradients():
    gen = torch.Generator().manual_seed(4)
    prior = LearnedGaussian(D).to(torch.float64)
    z = torch.randn(K, B, D, generator=gen, dtype=torch.float64)
    prior().log_prob(z).sum().backward()
    # at N(0, I): d/dloc sum log p = sum z; d/dscale = sum (z^2 - 1), times dscale/draw = sigmoid(raw)
    sigmoid_raw = torch.sigmoid(prior.raw_scale.detach())
    torch.testing.assert_close(prior.loc.grad, z.sum((0, 1)))
    expected_raw_grad = (z**2 - 1).sum((0, 1)) * sigmoid_raw
    torch.testing.assert_close(prior.raw_scale.grad, expected_raw_grad, rtol=1e-6, atol=1e-6)


def test_standard_normal_has_nothing_to_learn():
    assert list(StandardNormal(D).parameters()) == []
    assert {name for name, _ in LearnedGaussian(D).named_parameters()} == {"loc", "raw_scale"}


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_follows_module_dtype(name):
    prior = PRIORS[name](D).to(torch.float64)
    dist = prior()
    assert dist.base_dist.loc.dtype == torch.float64
    assert dist.base_dist.scale.dtype == torch.float64
    assert dist.sample((K, B)).dtype == torch.float64
    assert dist.log_prob(torch.zeros(B, D, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_learned_gaussian_scale_floor(dtype):
    prior = LearnedGaussian(D, min_scale=1e-3).to(dtype)
    with torch.no_grad():
        prior.raw_scale.fill_(-1e4)
    dist = prior()
    assert bool((dist.base_dist.scale >= 1e-3).all())
    log_prob = dist.log_prob(torch.ones(B, D, dtype=dtype))
    log_prob.sum().backward()
    assert bool(torch.isfinite(log_prob).all())
    assert bool(torch.isfinite(prior.raw_scale.grad).all())


@pytest.mark.parametrize("name", sorted(PRIORS))
@pytest.mark.parametrize("latent_dim", [0, -1])
def test_bad_latent_dim_raises(name, latent_dim):
    with pytest.raises(ValueError, match="latent_dim must be >= 1"):
        PRIORS[name](latent_dim)


@pytest.mark.parametrize("min_scale", [1.0, 2.0])
def test_learned_gaussian_bad_min_scale_raises(min_scale):
    with pytest.raises(ValueError, match="min_scale"):
        LearnedGaussian(D, min_scale=min_scale)
