"""Tests for vaelab.priors: shapes and broadcasting, densities against scipy, dtype, gradients, validation; the
mixture-of-Gaussians prior and the VampPrior also train from a config through vaelab.train.train."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from torch.distributions import Independent, MixtureSameFamily, Normal

from tiny import tiny_config
from vaelab.likelihoods import BernoulliLikelihood
from vaelab.models import VAE
from vaelab.priors import (
    PRIORS,
    DiagonalGaussianMixture,
    LearnedGaussian,
    MixtureOfGaussians,
    StandardNormal,
    VampPrior,
)
from vaelab.tolerance import reduction_error_bound, rounding_gamma

D = 3  # latent dimension
K, B = 4, 5  # samples, examples
GAUSSIAN_PRIORS = ("learned-gaussian", "standard-normal")  # Independent(Normal, 1)
PIXELS = 6  # data dimension of the small VAE a prior built on the model's encoder (the VampPrior) is attached to


def build_prior(name: str, dtype: torch.dtype = torch.float32, latent_dim: int = D, **options) -> torch.nn.Module:
    """PRIORS[name] in ``dtype``; a prior with ``attach`` (it uses the model's encoder) inside a small VAE."""
    prior = PRIORS[name](latent_dim, **options)
    if hasattr(prior, "attach"):
        vae = VAE(
            prior=prior,
            encoder=torch.nn.Sequential(
                torch.nn.Linear(PIXELS, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2 * latent_dim)
            ),
            decoder=torch.nn.Linear(latent_dim, PIXELS),
            likelihood=BernoulliLikelihood((PIXELS,)),
        )
        return vae.to(dtype).prior_module
    return prior.to(dtype)


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
    prior = build_prior(name, torch.float64)
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
    prior = build_prior(name, torch.float64)
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
def mixture_rounding(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, expected: np.ndarray) -> np.ndarray:
    """How far a float64 mixture log density at z ``[..., d]`` (components ``loc``, ``scale`` ``[C, d]``) and its
    reference ``expected`` may differ by rounding alone. DiagonalGaussianMixture expands component c's quadratic form
    into sums of d terms bounded by sum_j (|z_j| + |mu_cj|)^2 / sigma_cj^2 (the reference's direct form is bounded by
    the same), adds sum_j log sigma_cj and a log weight, and log-sum-exps C such values: logsumexp moves by at most
    the largest error of its inputs, plus its own rounding on |result| + log C."""
    z, loc, scale = z.double()[..., None, :], loc.double(), scale.double()
    terms = (0.5 * (z.abs() + loc.abs()).pow(2) / scale.pow(2) + scale.log().abs()).sum(-1)  # [..., C]
    magnitude = terms.amax(-1) + torch.as_tensor(np.abs(expected)) + np.log(loc.shape[0])
    return reduction_error_bound(magnitude, n=loc.shape[-1] + loc.shape[0] + 4, dtype=torch.float64).numpy()


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
    error = np.abs(prior().log_prob(z).detach().numpy() - expected)
    assert (error <= mixture_rounding(z, prior.loc.detach(), scale, expected)).all()


def test_diagonal_mixture_in_float32_is_within_one_rounding_of_its_exact_density():
    """A VampPrior's size (500 components, 40 latents) with tight components far from 0, z near them: the expanded
    quadratic form cancels (in float32 it loses ~1e-3 nats), so it is computed wide and only the result is rounded
    to float32. Exact: scipy in float64 on the same float32 parameters."""
    gen = torch.Generator().manual_seed(13)
    components, d = 500, 40
    loc = 3 * torch.randn(components, d, generator=gen)
    scale = 0.02 + 0.08 * torch.rand(components, d, generator=gen)
    logits = torch.randn(components, generator=gen)
    which = torch.randint(components, (64,), generator=gen)
    z = loc[which] + scale[which] * torch.randn(64, d, generator=gen)  # float32, each near one component
    out = DiagonalGaussianMixture(logits, loc, scale).log_prob(z)
    assert out.dtype == torch.float32 and out.shape == (64,)
    per_component = scipy.stats.norm.logpdf(
        z.double().numpy()[:, None, :], loc=loc.double().numpy(), scale=scale.double().numpy()
    ).sum(-1)
    expected = scipy.special.logsumexp(per_component + scipy.special.log_softmax(logits.double().numpy()), axis=-1)
    bound = rounding_gamma(1, torch.float32) * np.abs(expected) + mixture_rounding(z, loc, scale, expected)
    assert (np.abs(out.double().numpy() - expected) <= bound).all()


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
    from vaelab.config import build_model
    from vaelab.runs import load_run
    from vaelab.train import train

    gen = torch.Generator().manual_seed(10)
    data = torch.rand(200, 16, generator=gen)  # pixel probabilities, binarized at every step
    config = tiny_config(
        prior="mixture-of-gaussians",
        prior_options={"components": 3},
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


# --- the VampPrior ----------------------------------------------------------------------------------------------------
def small_vamp(components: int = 7, seed: int = 11) -> tuple[VAE, VampPrior]:
    torch.manual_seed(seed)
    prior = build_prior("vamp", torch.float64, pseudo_inputs=components)
    vae = prior._encode.__self__
    return vae, prior


def test_vamp_log_prob_is_the_mean_of_the_encoder_over_pseudo_inputs():
    vae, prior = small_vamp()
    gen = torch.Generator().manual_seed(12)
    z = 2 * torch.randn(K, B, D, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = vae.encoder(prior.pseudo_inputs).numpy()  # (C, 2d): loc, raw scale
    loc, scale = out[:, :D], np.logaddexp(0.0, out[:, D:]) + vae.posterior.min_scale  # softplus, in numpy
    per_component = scipy.stats.norm.logpdf(z.numpy()[..., None, :], loc=loc, scale=scale).sum(-1)  # (K, B, C)
    expected = scipy.special.logsumexp(per_component, axis=-1) - np.log(7)  # log (1/C) sum_c q(z|u_c)
    dist = prior()
    assert isinstance(dist, DiagonalGaussianMixture)  # a Gaussian encoder's components: the matrix-product path
    error = np.abs(dist.log_prob(z).detach().numpy() - expected)
    assert (error <= mixture_rounding(z, torch.as_tensor(loc), torch.as_tensor(scale), expected)).all()


def test_vamp_registers_only_its_pseudo_inputs_and_the_encoder_once():
    vae, prior = small_vamp()
    assert [name for name, _ in prior.named_parameters()] == ["pseudo_inputs"]
    assert prior.pseudo_inputs.shape == (7, PIXELS)
    names = [name for name, _ in vae.named_parameters()]
    assert len(names) == len(set(names)) and "prior_module.pseudo_inputs" in names
    assert sum(name.startswith("encoder.") for name in names) == 4
    assert not any("encoder" in name for name in vae.prior_module.state_dict())
    # gradients of log p(z) reach the pseudo-inputs and, through the shared encoder, the encoder's parameters
    prior().log_prob(torch.zeros(B, D, dtype=torch.float64)).sum().backward()
    for name, parameter in vae.named_parameters():
        if name.startswith(("encoder.", "prior_module.")):
            assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


def test_vamp_starts_at_distinct_training_examples_or_stays_random():
    _, prior = small_vamp(components=5)
    x = torch.arange(8 * PIXELS, dtype=torch.float64).reshape(8, PIXELS) / (8 * PIXELS)
    prior.init_from_data(x)
    rows = [int(torch.nonzero((x == u).all(1))[0, 0]) for u in prior.pseudo_inputs.detach()]
    assert len(set(rows)) == 5  # five distinct rows of x
    prior.init_from_data((x[:2] * 255).to(torch.uint8))  # fewer rows than pseudo-inputs, 8-bit: rows reused, / 255
    assert bool(
        ((prior.pseudo_inputs * 255).round() == (x[:2] * 255).to(torch.uint8)[:, None].double()).all(-1).any(0).all()
    )
    torch.manual_seed(0)
    random = build_prior("vamp", pseudo_inputs=3, init="random")
    start = random.pseudo_inputs.detach().clone()
    random.init_from_data(x.float())
    assert torch.equal(random.pseudo_inputs.detach(), start)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"pseudo_inputs": 0}, "pseudo_inputs must be an integer"), ({"init": "zeros"}, "init must be one of")],
)
def test_vamp_bad_options_and_a_missing_encoder_raise(options, message):
    with pytest.raises(ValueError, match=message):
        VampPrior(D, **options)
    with pytest.raises(RuntimeError, match="no encoder"):
        VampPrior(D)()


def test_vamp_prior_trains_from_a_config_and_round_trips_through_a_checkpoint(tmp_path):
    from safetensors import safe_open

    from vaelab.config import build_model
    from vaelab.runs import load_run
    from vaelab.train import train

    gen = torch.Generator().manual_seed(10)
    data = torch.rand(200, 16, generator=gen)  # pixel probabilities, binarized at every step
    config = tiny_config(
        prior="vamp",
        prior_options={"pseudo_inputs": 5},
    )
    result = train(config, data, data[:20], tmp_path / "run")
    assert result.step == 6
    with safe_open(tmp_path / "run" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        saved = {key: f.get_tensor(key) for key in keys}
    encoder_keys = [key for key in keys if "encoder" in key]
    assert encoder_keys and all(key.startswith("encoder.") for key in encoder_keys)  # the encoder once, not in prior
    assert [key for key in keys if key.startswith("prior_module.")] == ["prior_module.pseudo_inputs"]
    run = load_run(tmp_path / "run")
    trained = run.model.prior_module
    assert isinstance(trained, VampPrior) and trained._encode.__self__ is run.model
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    z = torch.randn(3, 2, generator=gen)
    with torch.no_grad():  # the reloaded prior is the trained one: its components from the reloaded encoder
        expected = torch.logsumexp(run.model.encode(trained.pseudo_inputs).log_prob(z[:, None]), -1) - np.log(5)
        torch.testing.assert_close(trained().log_prob(z), expected)
    # the pseudo-inputs started at training examples and then trained
    torch.manual_seed(config.seed)
    random_start = build_model(config, (16,)).prior_module.pseudo_inputs
    pseudo = trained.pseudo_inputs.detach()
    assert bool(torch.isfinite(pseudo).all()) and not torch.equal(pseudo, random_start)
    assert bool(((pseudo[:, None] - data[None]).abs().amax(-1).amin(-1) > 0).all())  # moved off the examples
    assert bool(((pseudo[:, None] - data[None]).abs().amax(-1).amin(-1) < 0.1).all())  # but not far, in 6 steps
