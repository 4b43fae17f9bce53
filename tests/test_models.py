"""The model interface, and LinearGaussian's closed forms against independent computations (float64)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal, constraints

from vaelab import estimators
from vaelab.config import PRESETS, TrainConfig, build_model
from vaelab.hierarchical import HierarchicalVAE
from vaelab.likelihoods import BernoulliLikelihood, GaussianLikelihood, LearnedGaussianLikelihood
from vaelab.models import MODELS, VAE, IllConditionedWarning, LinearGaussian, register_model
from vaelab.posteriors import DiagonalGaussian
from vaelab.priors import PRIORS, MixtureOfGaussians, StandardNormal
from vaelab.runs import load_run
from vaelab.tolerance import rounding_gamma
from vaelab.train import train


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


def float32_posterior_failures(models_per_dim: int) -> tuple[int, list]:
    """Random float32 models at D in {10, 20, 50}, d < D, noise scale 0.1 to 1 (the issue's 0.1 and up): the
    (trials, failures) where the ELBO with the exact posterior is not finite, the posterior's factor is not lower
    triangular, or S = L L^T does not invert the precision P to rounding."""
    failures, trials = [], 0
    for data_dim in (10, 20, 50):
        for seed in range(models_per_dim):
            g = torch.Generator().manual_seed(seed)
            latent_dim = int(torch.randint(1, data_dim, (1,), generator=g))
            noise_scale = 0.1 * 10 ** float(torch.rand(1, generator=g))
            model = LinearGaussian.random(
                data_dim, latent_dim, noise_scale=noise_scale, dtype=torch.float32, generator=g
            )
            x = model.sample(3, generator=g)
            tril = model.posterior(x).scale_tril[0].double()
            scaled = (model.weight / model.noise_var.sqrt()).detach().double()
            precision = torch.eye(latent_dim, dtype=torch.float64) + scaled.T @ scaled
            residual = (tril @ tril.T @ precision - torch.eye(latent_dim, dtype=torch.float64)).abs().max()
            # an inverse through a Cholesky factor has ||S P - I|| <= c u cond(P) (Higham 2002, sec. 14.2), the
            # rounded steps being P's D-term dot products and the d-step factorization, inversion and product (a
            # max-abs entry is at most d times the 2-norm)
            steps = data_dim + 3 * latent_dim + 2
            bound = latent_dim * model.condition_number() * rounding_gamma(steps, torch.float32)
            value = estimators.elbo(model, x, k=1)
            trials += 1
            if not (torch.isfinite(value).all() and torch.equal(tril, tril.tril()) and residual <= bound):
                failures.append((data_dim, seed, float(residual), bound))
    return trials, failures


# issue 17: 394 of 3,000 random float32 models failed: torch refused the posterior's (rounded, asymmetric) precision
# matrix. Most of these models are ill-conditioned for float32 (condition number ~1e3-1e4 >= 840) and say so: the
# warning is the subject of test_ill_conditioned_model_warns_naming_its_condition_number, not of these.
@pytest.mark.filterwarnings("ignore::vaelab.models.IllConditionedWarning")
def test_float32_models_build_their_posterior_from_a_cholesky_factor():
    g = torch.Generator().manual_seed(0)
    reproducer = LinearGaussian.random(20, 18, noise_scale=0.1, dtype=torch.float32, generator=g)
    assert torch.isfinite(estimators.elbo(reproducer, reproducer.sample(1), k=1)).all()
    trials, failures = float32_posterior_failures(200)
    assert trials == 600 and not failures, failures


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::vaelab.models.IllConditionedWarning")
def test_float32_models_build_their_posterior_many():
    trials, failures = float32_posterior_failures(1000)
    assert trials == 3000 and not failures, failures


def test_ill_conditioned_model_warns_naming_its_condition_number():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    bias = torch.zeros(3, dtype=torch.float64)
    # ||W||_2^2 = 3, so the condition number is 1 + 3 / noise_var: 3e12 + 1 at noise_var = 1e-12
    with pytest.warns(IllConditionedWarning, match=r"condition number 1 \+ \|\|Psi\^-1/2 W\|\|\^2 = 3e\+12"):
        model = LinearGaussian(weight, bias, 1e-12)
    assert model.condition_number() == pytest.approx(3e12 + 1, rel=1e-12)
    with pytest.warns(IllConditionedWarning, match="float32"):
        LinearGaussian(weight.float(), bias.float(), 1e-3)  # 3e3 * 1.2e-7 >= 1e-4
    LinearGaussian(weight, bias, 1e-6)  # 3e6 * 2.2e-16: no warning (warnings are errors under pytest)
    LinearGaussian(weight.float(), bias.float(), 0.1)


def test_fit_ppca_bad_input():
    x = torch.randn(10, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="latent_dim"):
        LinearGaussian.fit_ppca(x, latent_dim=4)
    with pytest.raises(ValueError, match="NaN"):
        LinearGaussian.fit_ppca(x.masked_fill(x > 1, float("nan")), latent_dim=2)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        LinearGaussian.fit_ppca(x[0], latent_dim=2)


# --- the minimal protocol: prior, encode, decode and nothing else -------------------------------------------------
class MinimalLinearGaussian(nn.Module):
    """A user's model with only ``prior`` (a property), ``encode`` and ``decode``: no data_shape, latent_dim or
    data_support. Its distributions are a LinearGaussian's, computed by the same code, so every estimator must give
    bit for bit what it gives on the LinearGaussian (which states all three) from the same random draws."""

    def __init__(self, inner: LinearGaussian):
        super().__init__()
        self.inner = inner

    @property
    def prior(self):
        return self.inner.prior

    def encode(self, x):
        return self.inner.encode(x)

    def decode(self, z):
        return self.inner.decode(z)


def assert_same(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_minimal_model_states_nothing_but_the_three_methods():
    model = MinimalLinearGaussian(random_model())
    for attribute in ("data_shape", "latent_dim", "data_support"):
        assert not hasattr(model, attribute)
    assert estimators.latent_dim(model) == 3
    assert estimators.data_support(model, torch.zeros(1, 7, dtype=torch.float64)) is constraints.real


@pytest.mark.parametrize("form", ["joint", "entropy", "kl"])
def test_minimal_model_runs_through_the_elbo_forms(form):
    full = random_model()
    minimal = MinimalLinearGaussian(full)
    x = full.sample(6, generator=torch.Generator().manual_seed(5))
    results = []
    for model in (full, minimal):
        torch.manual_seed(6)
        parts = estimators.elbo_parts(model, x, k=3, form=form)
        torch.manual_seed(6)
        results.append((parts.recon, parts.kl, estimators.elbo(model, x, k=3, form=form)))
    for a, b in zip(*results, strict=True):
        assert_same(a, b)
    if form == "joint":  # q is the exact posterior: each sample's log p(x, z) - log q(z|x) is log p(x) itself
        torch.testing.assert_close(results[1][2], full.log_marginal_exact(x))


def test_minimal_model_runs_through_the_importance_sampling_estimators():
    full = random_model()
    minimal = MinimalLinearGaussian(full)
    x = full.sample(6, generator=torch.Generator().manual_seed(7))
    results = []
    for model in (full, minimal):
        torch.manual_seed(8)
        out = {
            "iwae": estimators.iwae_bound(model, x, k=5),
            "prior_weights": estimators.log_weights(model, x, k=5, proposal="prior"),
            "gap": estimators.posterior_gap(model, x, k=30).value,
        }
        marginal = estimators.log_marginal(model, x, k=100, proposal="prior", chunk_size=None, iwae_ks=(10,))
        out.update(value=marginal.value, stderr=marginal.stderr, ess=marginal.ess, pareto_k=marginal.pareto_k)
        out["iwae_10"] = marginal.iwae[10]
        results.append(out)
    for name in results[0]:
        assert_same(results[0][name], results[1][name])
    assert bool(torch.isfinite(results[1]["pareto_k"]).all())  # k = 100 >= 25: the tail was fitted
    assert bool((results[1]["ess"] >= 1).all() and (results[1]["ess"] <= 100).all())


class _NoSupport(Distribution):
    """A decoder distribution that does not say what values it covers."""

    arg_constraints: ClassVar[dict] = {}

    def __init__(self, batch_shape):
        super().__init__(batch_shape, torch.Size([2]), validate_args=False)


class MinimalBernoulli(nn.Module):
    """prior, encode, decode only; p(x|z) Bernoulli, so the data's support (boolean) comes from the decoder."""

    def __init__(self, prior_event: int | None = 2, supported: bool = True):
        super().__init__()
        self.net = nn.Linear(2, 2)
        self.prior_event, self.supported = prior_event, supported

    @property
    def prior(self):
        if self.prior_event is None:
            return Normal(torch.zeros(()), torch.ones(()))  # a scalar latent: event shape []
        return Independent(Normal(torch.zeros(self.prior_event), torch.ones(self.prior_event)), 1)

    def encode(self, x):
        return Independent(Normal(self.net(x), torch.ones_like(x)), 1)

    def decode(self, z):
        if not self.supported:
            return _NoSupport(z.shape[:-1])
        return Independent(Bernoulli(logits=self.net(z)), 1)


def test_minimal_model_data_are_checked_against_the_decoders_support():
    model = MinimalBernoulli()
    assert estimators.data_support(model, torch.zeros(1, 2)) is constraints.boolean
    assert estimators.elbo(model, torch.tensor([[0.0, 1.0]])).shape == (1,)
    with pytest.raises(ValueError, match=r"outside the likelihood's support \(Boolean"):
        estimators.elbo(model, torch.tensor([[0.5, 1.0]]))


def test_minimal_model_without_what_the_estimators_need_is_told_what_to_add():
    with pytest.raises(ValueError, match=r"shape \[B, \*data_shape\] with B >= 1, got \(2,\)"):
        estimators.elbo(MinimalBernoulli(), torch.zeros(2))
    with pytest.raises(ValueError, match=r"latent_dim: its prior has event shape \[\]"):
        estimators.elbo(MinimalBernoulli(prior_event=None), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="data_support attribute"):
        estimators.elbo(MinimalBernoulli(supported=False), torch.zeros(1, 2))


# --- the registry: a family defined outside src/, trained from a config naming it, reloaded -------------------------
class ShiftedNormal(nn.Module):
    """A user's prior: N(loc, I), loc learned, starting at ``shift`` in every dimension."""

    def __init__(self, latent_dim: int, shift: float = 0.0):
        super().__init__()
        self.latent_dim = latent_dim
        self.loc = nn.Parameter(torch.full((latent_dim,), float(shift)))

    def forward(self):
        return Independent(Normal(self.loc, torch.ones_like(self.loc)), 1)


class TinyBernoulliModel(nn.Module):
    """A user's model: one linear layer each way, any prior of PRIORS; only prior, encode, decode and from_config."""

    def __init__(self, data_dim: int, prior: nn.Module):
        super().__init__()
        d = prior.latent_dim
        self.prior_module = prior
        self.encoder, self.decoder = nn.Linear(data_dim, 2 * d), nn.Linear(d, data_dim)

    @classmethod
    def from_config(cls, config, data_shape):
        (data_dim,) = data_shape
        return cls(data_dim, PRIORS[config.prior](config.latent_dim, **config.prior_options))

    @property
    def prior(self):
        return self.prior_module()

    def encode(self, x):
        loc, raw = self.encoder(x).chunk(2, dim=-1)
        return Independent(Normal(loc, nn.functional.softplus(raw) + 1e-4), 1)

    def decode(self, z):
        return Independent(Bernoulli(logits=self.decoder(z)), 1)


@pytest.fixture
def user_families():
    """Register the test's model and prior (as a user's module would), and remove them afterwards."""
    register_model("test-tiny-bernoulli")(TinyBernoulliModel)
    PRIORS["test-shifted-normal"] = ShiftedNormal
    yield
    del MODELS["test-tiny-bernoulli"], PRIORS["test-shifted-normal"]


def user_config(**overrides) -> TrainConfig:
    """A few steps of the test's own model and prior, named in a config as a user's registered families would be."""
    fields = dict(model="test-tiny-bernoulli", prior="test-shifted-normal", latent_dim=2, batch_size=25, max_steps=4)
    fields |= dict(validation_size=0, eval_k=2, eval_examples=20, compile=False, progress=False)
    return TrainConfig(**fields | overrides)


def test_register_model_refuses_a_taken_name_and_a_class_that_cannot_build_itself():
    with pytest.raises(ValueError, match="'vae' is taken by VAE"):
        register_model("vae")(TinyBernoulliModel)
    with pytest.raises(ValueError, match="needs a classmethod from_config"):
        register_model("test-no-builder")(MinimalBernoulli)
    assert "test-no-builder" not in MODELS
    assert register_model("vae")(VAE) is VAE  # the same class again: nothing changes


def test_a_user_model_and_prior_train_from_a_config_naming_them_and_reload(user_families, tmp_path):
    gen = torch.Generator().manual_seed(11)
    data = torch.rand(100, 6, generator=gen)  # pixel probabilities, binarized at every step
    config = user_config(prior_options={"shift": 0.5})
    assert train(config, data, data[:20], tmp_path / "run").step == 4
    run = load_run(tmp_path / "run")
    assert isinstance(run.model, TinyBernoulliModel) and isinstance(run.model.prior_module, ShiftedNormal)
    latest = load_run(tmp_path / "run", which="latest")
    for name, value in run.model.state_dict().items():
        assert_same(value, latest.model.state_dict()[name])
    loc = run.model.prior_module.loc.detach()
    assert bool(torch.isfinite(loc).all()) and not torch.equal(loc, torch.full((2,), 0.5))  # it trained
    with pytest.raises(
        ValueError, match=r"unknown prior_options 'scale' for prior 'test-shifted-normal'; it takes shift"
    ):
        dataclasses.replace(config, prior_options={"scale": 2.0})


# --- configs refused when built ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"form": "bogus"}, "unknown form 'bogus'; choose from joint, entropy, kl"),
        ({"model": "bogus"}, "unknown model 'bogus'; choose from vae, classifier, cvae, iwae-2layer"),
        ({"posterior": "bogus"}, "unknown posterior 'bogus'; choose from diagonal-gaussian"),
        ({"likelihood_options": {"sigma": 0.1}}, "unknown likelihood_options 'sigma' for likelihood 'bernoulli'"),
        (
            {"likelihood": "gaussian", "likelihood_options": {"sigma": 0.1}},
            "unknown likelihood_options 'sigma' for likelihood 'gaussian'; it takes scale",
        ),
        ({"architecture_options": {"width": 3}}, "for architecture 'mlp'; it takes hidden, activation"),
        ({"posterior_options": {"floor": 0.1}}, "for posterior 'diagonal-gaussian'; it takes min_scale"),
        ({"prior_options": {"components": 3}}, "for prior 'standard-normal'; it takes none"),
        ({"schedule_options": {"steps": 3}}, "for schedule 'constant'"),
        ({"prior_options": [3]}, "prior_options must be a dict"),
        ({"objective_options": {"bogus": 1}}, "unknown objective_options bogus for the 'elbo' objective"),
        ({"objective": "free_bits"}, "the 'free_bits' objective needs free_nats"),
    ],
)
def test_a_config_naming_what_no_registry_or_builder_takes_is_refused_when_built(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prior": "learned-gaussian"}, "does not use prior"),
        ({"prior_options": {"min_scale": 0.1}}, "does not use prior_options"),
        ({"posterior_options": {"min_scale": 0.1}}, "does not use posterior_options"),
        ({"architecture": "conv"}, "does not use architecture"),
        ({"architecture_options": {"hidden": [3]}}, "does not use architecture_options"),
        ({"latent_dim": 50}, "has 150 latent units (z1: 100, z2: 50); got latent_dim=50"),
    ],
)
def test_iwae_2layer_refuses_what_it_does_not_use(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**{**PRESETS["iwae-2layer"], **fields})


def test_iwae_2layer_preset_is_truthful_and_honours_the_likelihood_options():
    config = TrainConfig(**{**PRESETS["iwae-2layer"], "likelihood": "gaussian", "likelihood_options": {"scale": 0.25}})
    model = build_model(config, (784,))
    assert isinstance(model, HierarchicalVAE)
    assert model.latent_dim == config.latent_dim == estimators.latent_dim(model) == 150
    assert isinstance(model.likelihood, GaussianLikelihood) and model.likelihood.scale == 0.25
    assert model.output_net is model.nets["p_x_z1"]


def test_vae_is_built_from_its_parts_names_and_options():
    config = TrainConfig(
        latent_dim=4,
        prior="mixture-of-gaussians",
        prior_options={"components": 3},
        posterior_options={"min_scale": 0.01},
        likelihood="gaussian-learned",
        likelihood_options={"shared": True},
        architecture_options={"hidden": [5]},
    )
    model = build_model(config, (6,))
    assert isinstance(model, VAE) and model.output_net is model.decoder
    assert isinstance(model.prior_module, MixtureOfGaussians) and model.prior_module.logits.shape == (3,)
    assert isinstance(model.posterior, DiagonalGaussian) and model.posterior.min_scale == 0.01
    assert isinstance(model.likelihood, LearnedGaussianLikelihood) and model.likelihood.raw_scale.shape == ()
    assert model.encoder.body[0].out_features == 5


def test_a_config_saved_when_iwae_2layer_was_an_architecture_still_loads():
    saved = {"architecture": "iwae-2layer", "latent_dim": 50, "likelihood": "bernoulli"}  # as runs saved it before
    config = TrainConfig.from_dict(saved)
    assert (config.model, config.architecture, config.latent_dim) == ("iwae-2layer", "mlp", 150)


def test_a_user_model_and_prior_get_the_full_diagnostics_and_a_report(user_families, tmp_path):
    # the same family, registered outside src/, trained, evaluated with every diagnostic, and rendered as a report
    from vaelab.diagnostics import diagnostics
    from vaelab.plots import draw_pictures
    from vaelab.report import as_json, write_report

    gen = torch.Generator().manual_seed(12)
    data = torch.rand(100, 6, generator=gen)
    config = user_config()
    train(config, data, data[:20], tmp_path / "run")
    run = load_run(tmp_path / "run")
    x = torch.bernoulli(data[:12], generator=gen)
    torch.manual_seed(0)
    result = diagnostics(run.model, x, k=64, examples=6, steps=5, elbo_k=16, form_k=16, study_examples=2, slow=False)
    d = as_json(result)
    for key in ("gap_decomposition", "elbo_forms", "estimator_study", "iwae_curve"):  # each computed, none skipped
        assert isinstance(d[key], dict), (key, d[key])
    for key in ("approximation_gap", "amortization_gap"):  # the report reads the split at the top level
        assert math.isfinite(d[key]["mean"]), key
    pictures = draw_pictures(run.model, x, tmp_path / "pictures", metrics=run.metrics, diagnostics=d)
    html = write_report(run, d, tmp_path / "report.html", pictures=pictures).read_text()
    assert "test-tiny-bernoulli" in html and "amortization gap" in html.lower() and "not computed" not in html
