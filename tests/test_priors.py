"""Tests for vaelab.priors: shapes and broadcasting, densities against scipy, dtype, gradients, validation; the
mixture-of-Gaussians prior also trains from a config through vaelab.train.train."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from torch.distributions import Independent, MixtureSameFamily, Normal

from vaelab.priors import PRIORS, LearnedGaussian, MixtureOfGaussians, StandardNormal

D = 3  # latent dimension
K, B = 4, 5  # samples, examples
GAUSSIAN_PRIORS = ("learned-gaussian", "standard-normal")  # Independent(Normal, 1)


@pytest.mark.parametrize("name", GAUSSIAN_PRIORS)
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
    assert dist.mean.dtype == torch.float64
    assert dist.variance.dtype == torch.float64
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


# --- the mixture of Gaussians --------------------------------------------------------------------------------------
def moved_mixture(components: int = 4, seed: int = 5) -> MixtureOfGaussians:
    """A float64 mixture with random weights, means and scales (not its initial values)."""
    gen = torch.Generator().manual_seed(seed)
    prior = MixtureOfGaussians(D, components=components).to(torch.float64)
    with torch.no_grad():
        for parameter in prior.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen, dtype=torch.float64))
    return prior


def test_mixture_is_a_mixture_with_scalar_batch():
    dist = MixtureOfGaussians(D, components=4)()
    assert isinstance(dist, MixtureSameFamily)
    assert dist.batch_shape == ()
    assert dist.event_shape == (D,)
    assert dist.mixture_distribution.logits.shape == (4,)


def test_mixture_log_prob_matches_brute_force_sum_over_components():
    gen = torch.Generator().manual_seed(6)
    prior = moved_mixture()
    z = 2 * torch.randn(K, B, D, generator=gen, dtype=torch.float64)
    weights = scipy.special.softmax(prior.logits.detach().numpy())  # (C,)
    scale = torch.nn.functional.softplus(prior.raw_scale.detach()) + prior.min_scale  # (C, d)
    # log sum_c pi_c prod_j N(z_j; mu_cj, sigma_cj), each component's density from scipy
    per_component = scipy.stats.norm.logpdf(
        z.numpy()[..., None, :], loc=prior.loc.detach().numpy(), scale=scale.numpy()
    ).sum(-1)  # (K, B, C)
    expected = scipy.special.logsumexp(per_component + np.log(weights), axis=-1)
    np.testing.assert_allclose(prior().log_prob(z).detach().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_mixture_with_one_component_is_its_gaussian():
    gen = torch.Generator().manual_seed(7)
    prior = moved_mixture(components=1)
    z = torch.randn(K, B, D, generator=gen, dtype=torch.float64)
    scale = torch.nn.functional.softplus(prior.raw_scale[0]) + prior.min_scale
    gaussian = Independent(Normal(prior.loc[0], scale), 1)
    torch.testing.assert_close(prior().log_prob(z), gaussian.log_prob(z), rtol=1e-12, atol=1e-12)


def test_mixture_gradients_reach_every_parameter_and_match_finite_differences():
    gen = torch.Generator().manual_seed(8)
    prior = moved_mixture(components=3)
    z = torch.randn(K, B, D, generator=gen, dtype=torch.float64)
    names = [name for name, _ in prior.named_parameters()]
    assert sorted(names) == ["loc", "logits", "raw_scale"]

    def total_log_prob(*values):
        return torch.func.functional_call(prior, dict(zip(names, values, strict=True)), ()).log_prob(z).sum()

    parameters = [p.detach().clone().requires_grad_() for p in prior.parameters()]
    assert torch.autograd.gradcheck(total_log_prob, parameters)
    grads = torch.autograd.grad(total_log_prob(*parameters), parameters)
    for name, grad in zip(names, grads, strict=True):
        assert bool((grad != 0).all()), f"no gradient reaches some of {name}"


def test_mixture_starts_with_equal_weights_unit_scales_and_distinct_means():
    torch.manual_seed(9)
    prior = MixtureOfGaussians(D, components=5, init_spread=2.0)
    dist = prior()
    torch.testing.assert_close(dist.mixture_distribution.probs.detach(), torch.full((5,), 0.2))
    torch.testing.assert_close(dist.component_distribution.base_dist.scale.detach(), torch.ones(5, D))
    assert len({tuple(row) for row in prior.loc.detach().tolist()}) == 5


@pytest.mark.parametrize(
    "options, message",
    [({"components": 0}, "components"), ({"init_spread": -1.0}, "init_spread"), ({"min_scale": 1.0}, "min_scale")],
)
def test_mixture_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        MixtureOfGaussians(D, **options)


def test_mixture_prior_trains_from_a_config_and_reloads(tmp_path):
    from vaelab.config import TrainConfig, build_model
    from vaelab.runs import load_run
    from vaelab.train import train

    gen = torch.Generator().manual_seed(10)
    data = torch.rand(200, 16, generator=gen)  # pixel probabilities, binarized at every step
    config = TrainConfig(
        latent_dim=2,
        prior="mixture-of-gaussians",
        prior_options={"components": 3},
        architecture_options={"hidden": [8]},
        batch_size=50,
        max_steps=6,
        validation_size=0,
        eval_k=2,
        eval_examples=20,
        compile=False,
        progress=False,
    )
    result = train(config, data, data[:20], tmp_path / "run")
    assert result.step == 6
    torch.manual_seed(config.seed)  # what the trainer started from
    start = build_model(config, (16,)).prior_module.state_dict()
    run = load_run(tmp_path / "run")
    trained = run.model.prior_module
    assert isinstance(trained, MixtureOfGaussians) and trained.logits.shape == (3,)
    for name, value in trained.state_dict().items():  # every prior parameter moved, and stayed finite
        assert bool(torch.isfinite(value).all())
        assert not torch.equal(value, start[name]), f"the prior's {name} did not train"
