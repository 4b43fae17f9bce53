"""Tests for vaelab.likelihoods: densities against scipy / closed forms, shapes, numerics, validation.

Numerics tests run in float64 with fixed seeds; the comparisons are deterministic (no Monte Carlo), so the
tolerances are rounding tolerances, not statistical ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from torch.distributions import Laplace, constraints

from tiny import tiny_config
from vaelab.config import TrainConfig, build_model
from vaelab.estimators import check_data
from vaelab.likelihoods import (
    LEVELS,
    LIKELIHOODS,
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    DiscretizedLogistic,
    DiscretizedLogisticLikelihood,
    DiscretizedLogisticMixtureLikelihood,
    GaussianLikelihood,
    LearnedGaussianLikelihood,
    Likelihood,
    eight_bit,
)
from vaelab.models import VAE
from vaelab.nets import build_pair, init_decoder_bias
from vaelab.priors import StandardNormal
from vaelab.tolerance import assert_within_stderr, reduction_error_bound, rounding_gamma

DATA_SHAPES = [(5,), (2, 3)]
K, B = 3, 4  # samples of z, examples


# --- helpers ------------------------------------------------------------------------------------------------
def _params(shape, generator, dtype=torch.float64) -> torch.Tensor:
    """Unconstrained decoder outputs (logits or means) with |value| in [0.5, ~4].

    Kept away from 0 because the continuous Bernoulli switches to a Taylor expansion for logits near 0;
    numerical gradients straddling the switch would test torch's seam, not vaelab.
    """
    raw = torch.randn(shape, generator=generator, dtype=dtype)
    return raw.sign() * (0.5 + raw.abs())


def _data(support, shape, generator, dtype=torch.float64) -> torch.Tensor:
    """Data inside a likelihood's support."""
    if support is constraints.boolean:
        return torch.bernoulli(torch.full(shape, 0.5, dtype=dtype), generator=generator)
    if support is constraints.unit_interval:
        return torch.rand(shape, generator=generator, dtype=dtype)
    if support is constraints.real:
        return torch.randn(shape, generator=generator, dtype=dtype)
    if support is eight_bit:
        return torch.randint(0, LEVELS, shape, generator=generator).to(dtype) / (LEVELS - 1)
    raise NotImplementedError(f"no test data for support {support}; add a case here for the new likelihood")


def _cb_log_prob(logits: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Continuous Bernoulli log-density, closed form: log C(lam) + x log lam + (1 - x) log(1 - lam),
    C(lam) = 2 artanh(1 - 2 lam) / (1 - 2 lam) (Loaiza-Ganem & Cunningham, 2019, eq. 7).

    Valid away from lam = 1/2, and in float64 only while lam is not rounded to 0 or 1 (|logit| < ~36).
    """
    lam = scipy.special.expit(logits)
    log_c = np.log(2 * np.arctanh(1 - 2 * lam) / (1 - 2 * lam))
    return log_c + x * np.log(lam) + (1 - x) * np.log1p(-lam)


def _cb_log_prob_from_logits(logits: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The same density written in the logits L, stable at any |L| > 0: since 1 - 2 lam = -tanh(L / 2),
    C = L / tanh(L / 2), and log lam = log_expit(L), log(1 - lam) = log_expit(-L).
    """
    log_c = np.log(logits / np.tanh(logits / 2))
    return log_c + x * scipy.special.log_expit(logits) + (1 - x) * scipy.special.log_expit(-logits)


def _event_sum(values: np.ndarray, data_shape) -> np.ndarray:
    return values.sum(axis=tuple(range(-len(data_shape), 0)))


# --- densities against scipy and closed forms ---------------------------------------------------------------
@pytest.mark.parametrize("data_shape", DATA_SHAPES)
def test_bernoulli_matches_scipy(data_shape):
    gen = torch.Generator().manual_seed(0)
    logits = _params((K, B, *data_shape), gen)
    x = _data(constraints.boolean, (B, *data_shape), gen)
    log_prob = BernoulliLikelihood(data_shape)(logits).log_prob(x)  # (K, B)
    expected = scipy.stats.bernoulli.logpmf(x.numpy(), scipy.special.expit(logits.numpy()))
    np.testing.assert_allclose(log_prob.numpy(), _event_sum(expected, data_shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("data_shape", DATA_SHAPES)
@pytest.mark.parametrize("scale", [0.5, 2.0])  # exactly representable in float32
def test_gaussian_matches_scipy(data_shape, scale):
    gen = torch.Generator().manual_seed(1)
    loc = _params((K, B, *data_shape), gen)
    x = _data(constraints.real, (B, *data_shape), gen)
    log_prob = GaussianLikelihood(data_shape, scale=scale)(loc).log_prob(x)
    expected = scipy.stats.norm.logpdf(x.numpy(), loc=loc.numpy(), scale=scale)
    np.testing.assert_allclose(log_prob.numpy(), _event_sum(expected, data_shape), rtol=1e-12, atol=1e-12)


def test_gaussian_scale_keeps_float64_precision():
    gen = torch.Generator().manual_seed(2)
    loc = torch.zeros(B, 5, dtype=torch.float64)
    x = 3 * _data(constraints.real, (B, 5), gen)
    likelihood = GaussianLikelihood((5,), scale=0.3).to(torch.float64)
    expected = scipy.stats.norm.logpdf(x.numpy(), loc=0.0, scale=0.3).sum(-1)
    np.testing.assert_allclose(likelihood(loc).log_prob(x).detach().numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("data_shape", DATA_SHAPES)
@pytest.mark.parametrize("shared", [False, True])
def test_learned_gaussian_matches_scipy(data_shape, shared):
    gen = torch.Generator().manual_seed(3)
    likelihood = LearnedGaussianLikelihood(data_shape, shared=shared).to(torch.float64)
    with torch.no_grad():  # move away from the initial scale of 1, different per pixel when not shared
        raw_scale = torch.randn(likelihood.raw_scale.shape, generator=gen, dtype=torch.float64)
        likelihood.raw_scale.copy_(raw_scale)
    loc = _params((K, B, *data_shape), gen)
    x = _data(constraints.real, (B, *data_shape), gen)
    scale = likelihood.scale.detach()
    assert scale.shape == (() if shared else data_shape)
    log_prob = likelihood(loc).log_prob(x)
    expected = _event_sum(scipy.stats.norm.logpdf(x.numpy(), loc=loc.numpy(), scale=scale.numpy()), data_shape)
    np.testing.assert_allclose(log_prob.detach().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_learned_gaussian_starts_at_init_scale():
    likelihood = LearnedGaussianLikelihood((2, 3), min_scale=1e-2, init_scale=0.25).to(torch.float64)
    torch.testing.assert_close(likelihood.scale.detach(), torch.full((2, 3), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("data_shape", DATA_SHAPES)
def test_continuous_bernoulli_matches_closed_form(data_shape):
    gen = torch.Generator().manual_seed(4)
    logits = 2 * _params((K, B, *data_shape), gen)  # |logit| >= 1: lam outside [0.27, 0.73]
    x = _data(constraints.unit_interval, (B, *data_shape), gen)
    x[0].view(-1)[:2] = torch.tensor([0.0, 1.0], dtype=x.dtype)  # the support's end points too
    log_prob = ContinuousBernoulliLikelihood(data_shape)(logits).log_prob(x)
    expected = _event_sum(_cb_log_prob(logits.numpy(), x.numpy()), data_shape)
    np.testing.assert_allclose(log_prob.numpy(), expected, rtol=1e-10, atol=1e-10)
    # the logits form used as reference at saturated logits below is the same density
    from_logits = _event_sum(_cb_log_prob_from_logits(logits.numpy(), x.numpy()), data_shape)
    np.testing.assert_allclose(from_logits, expected, rtol=1e-10, atol=1e-10)


def test_continuous_bernoulli_normalized_at_saturated_logits_float32():
    logits = torch.tensor([[20.0, -20.0, 40.0, -100.0]])
    x = torch.tensor([[0.9, 0.1, 0.99, 0.5]])
    log_prob = ContinuousBernoulliLikelihood((4,))(logits).log_prob(x)
    expected = _cb_log_prob_from_logits(logits.double().numpy(), x.double().numpy()).sum(-1)
    np.testing.assert_allclose(log_prob.double().numpy(), expected, atol=1e-3)


# --- shapes, over the registry ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
@pytest.mark.parametrize("data_shape", DATA_SHAPES)
def test_batch_and_event_shapes(name, data_shape):
    gen = torch.Generator().manual_seed(5)
    likelihood = LIKELIHOODS[name](data_shape).to(torch.float64)
    assert likelihood.data_shape == torch.Size(data_shape)
    dist = likelihood(_params((K, B, *likelihood.params_shape), gen))
    assert dist.batch_shape == (K, B)
    assert dist.event_shape == data_shape
    x = _data(likelihood.support, (B, *data_shape), gen)
    log_prob = dist.log_prob(x)  # x broadcasts over the K samples
    assert log_prob.shape == (K, B)
    assert bool(torch.isfinite(log_prob).all())
    # one example's density is the same whether or not it is batched with others
    single = likelihood(_params(likelihood.params_shape, gen))
    assert single.batch_shape == ()
    assert single.log_prob(x[0]).shape == ()


# --- numerics -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("magnitude", [1e4, 1e30])
def test_bernoulli_huge_logits_are_finite_and_exact(dtype, magnitude):
    logits = torch.tensor([[magnitude, -magnitude, magnitude, -magnitude]], dtype=dtype, requires_grad=True)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=dtype)  # two pixels agree with their logit, two do not
    log_prob = BernoulliLikelihood((4,))(logits).log_prob(x)
    log_prob.sum().backward()
    torch.testing.assert_close(log_prob.detach(), torch.tensor([-2 * magnitude], dtype=dtype))
    # d/dlogit log p = x - sigmoid(logit): 0 where the pixel agrees, -1 / +1 where it does not
    torch.testing.assert_close(logits.grad, torch.tensor([[0.0, 0.0, -1.0, 1.0]], dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("magnitude", [1e4, 1e30])
def test_continuous_bernoulli_huge_logits_are_finite(dtype, magnitude):
    logits = torch.tensor([[magnitude, -magnitude, magnitude, -magnitude]], dtype=dtype, requires_grad=True)
    x = torch.tensor([[1.0, 0.0, 0.3, 0.8]], dtype=dtype)
    log_prob = ContinuousBernoulliLikelihood((4,))(logits).log_prob(x)
    log_prob.sum().backward()
    assert bool(torch.isfinite(log_prob).all())
    assert bool(torch.isfinite(logits.grad).all())
    # pixels far from their logit's end of [0, 1] are very unlikely
    assert log_prob.item() < -0.5 * magnitude


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shared", [False, True])
def test_learned_gaussian_scale_floor(dtype, shared):
    min_scale = 1e-3
    likelihood = LearnedGaussianLikelihood((5,), shared=shared, min_scale=min_scale).to(dtype)
    with torch.no_grad():
        likelihood.raw_scale.fill_(-1e4)
    assert bool((likelihood.scale >= min_scale).all())
    loc = torch.zeros(B, 5, dtype=dtype)
    x = torch.ones(B, 5, dtype=dtype)
    log_prob = likelihood(loc).log_prob(x)
    log_prob.sum().backward()
    assert bool(torch.isfinite(log_prob).all())
    assert bool(torch.isfinite(likelihood.raw_scale.grad).all())


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_log_prob_gradcheck(name):
    gen = torch.Generator().manual_seed(6)
    likelihood = LIKELIHOODS[name]((2, 3)).to(torch.float64)
    params = _params((B, *likelihood.params_shape), gen).requires_grad_()
    x = _data(likelihood.support, (B, 2, 3), gen)
    assert torch.autograd.gradcheck(lambda p: likelihood(p).log_prob(x), (params,))


@pytest.mark.parametrize("shared", [False, True])
def test_learned_gaussian_gradcheck_wrt_scale(shared):
    gen = torch.Generator().manual_seed(7)
    likelihood = LearnedGaussianLikelihood((2, 3), shared=shared).to(torch.float64)
    raw_scale = torch.randn(likelihood.raw_scale.shape, generator=gen, dtype=torch.float64).requires_grad_()
    loc = _params((B, 2, 3), gen).requires_grad_()
    x = _data(constraints.real, (B, 2, 3), gen)

    def log_prob(loc, raw_scale):
        dist = torch.func.functional_call(likelihood, {"raw_scale": raw_scale}, (loc,))
        return dist.log_prob(x)

    assert torch.autograd.gradcheck(log_prob, (loc, raw_scale))


# --- validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
@pytest.mark.parametrize("data_shape", [(), (0,), (3, 0), (-1,)])
def test_bad_data_shape_raises(name, data_shape):
    with pytest.raises(ValueError, match="data_shape must be a non-empty shape of positive sizes"):
        LIKELIHOODS[name](data_shape)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan])
def test_gaussian_bad_scale_raises(scale):
    with pytest.raises(ValueError, match="scale must be > 0"):
        GaussianLikelihood((5,), scale=scale)


@pytest.mark.parametrize(("min_scale", "init_scale"), [(1.0, 1.0), (2.0, 1.0), (0.0, 1.0), (-1e-3, 1.0)])
def test_learned_gaussian_bad_scales_raise(min_scale, init_scale):
    with pytest.raises(ValueError, match="0 < min_scale < init_scale"):
        LearnedGaussianLikelihood((5,), min_scale=min_scale, init_scale=init_scale)


def _tiny_vae(likelihood) -> VAE:
    return VAE(
        prior=StandardNormal(2),
        encoder=torch.nn.Linear(6, 4),
        decoder=torch.nn.Linear(2, 6),
        likelihood=likelihood,
    )


def test_check_data_accepts_valid_binary_data():
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]])
    assert check_data(_tiny_vae(BernoulliLikelihood((6,))), x) is x


@pytest.mark.parametrize(
    ("x", "match"),
    [
        pytest.param(torch.zeros(2, 5), r"shape \[B, 6\]", id="wrong-shape"),
        pytest.param(torch.zeros(6), r"shape \[B, 6\]", id="missing-batch-dim"),
        pytest.param(
            torch.tensor([[0.0, 1.0, math.nan, 0.0, 1.0, 0.0]]), "NaN or infinite values: 1 in example 0", id="nan"
        ),
        pytest.param(torch.tensor([[0.0, 1.0, 0.5, 0.0, 1.0, 0.0]]), "outside the likelihood's support", id="half"),
        pytest.param(torch.zeros(2, 6, dtype=torch.int64), "floating-point", id="integer-dtype"),
    ],
)
def test_check_data_rejects_bad_binary_data(x, match):
    with pytest.raises(ValueError, match=match):
        check_data(_tiny_vae(BernoulliLikelihood((6,))), x)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_check_data_rejects_continuous_bernoulli_data_outside_unit_interval(bad):
    model = _tiny_vae(ContinuousBernoulliLikelihood((6,)))
    x = torch.tensor([[0.0, 0.2, 0.5, 0.7, 1.0, 0.3]])
    assert check_data(model, x) is x
    x[0, 2] = bad
    with pytest.raises(ValueError, match="outside the likelihood's support"):
        check_data(model, x)


# --- the compiled Bernoulli log-probability (one exp per value, a log per block) ---------------------------------
def _compiled_log_prob(likelihood):
    return torch.compile(lambda logits, x: likelihood(logits).log_prob(x), dynamic=False)


@pytest.mark.parametrize("data_shape", [(784,), (1, 28, 28), (131,), (6,)])  # blocks of 56, 56, 1 (prime), 6 values
def test_bernoulli_compiled_log_prob_equals_torch_float64(fresh_dynamo, data_shape):
    g = torch.Generator().manual_seed(0)
    likelihood = BernoulliLikelihood(data_shape)
    logits = 20 * torch.randn(K, B, *data_shape, generator=g, dtype=torch.float64)  # many saturated pixels
    x = (torch.rand(B, *data_shape, generator=g) < 0.3).double()
    expected = likelihood(logits).log_prob(x)  # eager: torch's Bernoulli
    with torch.no_grad():
        got = _compiled_log_prob(likelihood)(logits, x)
    assert got.shape == (K, B)
    # one rounding per value and per block product: float64 agreement to ~1e-15 of the summed magnitudes
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12 * math.prod(data_shape))


def test_bernoulli_compiled_log_prob_float32_and_bfloat16_accuracy(fresh_dynamo):
    g = torch.Generator().manual_seed(1)
    likelihood = BernoulliLikelihood((784,))
    logits = 5 * torch.randn(K, B, 784, generator=g, dtype=torch.float64)
    x = (torch.rand(B, 784, generator=g) < 0.3).double()
    exact = likelihood(logits).log_prob(x)
    f = _compiled_log_prob(likelihood)
    with torch.no_grad():
        got32 = f(logits.float(), x.float())
        eager32 = likelihood(logits.float()).log_prob(x.float())
        half = logits.to(torch.bfloat16)
        got_bf16 = _compiled_log_prob(likelihood)(half, x.float())
    # float32: each pixel's term -softplus(-+logit) takes a few roundings (say 8: exp, log1p, max, sign, product), and
    # the sum over 784 of them 784 more; all terms are <= 0, so sum |term| = |log p| and Higham's bound applies to
    # both our kernel and torch's own formula (vaelab.tolerance)
    terms = 784 + 8
    for got in (got32, eager32):
        assert ((got.double() - exact).abs() <= reduction_error_bound(exact.abs(), terms, torch.float32) / 2).all()
    # bfloat16 logits are summed in float32: exact for the rounded logits up to float32 rounding
    assert got_bf16.dtype == torch.float32
    exact_bf16 = likelihood(half.double()).log_prob(x)
    assert (
        (got_bf16.double() - exact_bf16).abs() <= reduction_error_bound(exact_bf16.abs(), terms, torch.float32)
    ).all()


@pytest.mark.parametrize("data_shape", [(784,), (1, 28, 28), (131,), (6,)])
def test_bernoulli_compiled_log_prob_gradients_float64(fresh_dynamo, data_shape):
    # with gradients, the blocked form's derivatives are written out: d/dl log p = x - sigmoid(l) and d/dx = l,
    # equal to torch's autograd of its own formula, saturated logits included
    g = torch.Generator().manual_seed(2)
    likelihood = BernoulliLikelihood(data_shape)
    logits = 20 * torch.randn(K, B, *data_shape, generator=g, dtype=torch.float64)
    x = (torch.rand(B, *data_shape, generator=g) < 0.5).double()
    weights = torch.randn(K, B, generator=g, dtype=torch.float64)  # a non-uniform upstream gradient
    results = []
    for f in (_compiled_log_prob(likelihood), lambda logits, x: likelihood(logits).log_prob(x)):
        leaves = logits.clone().requires_grad_(), x.clone().requires_grad_()
        value = f(*leaves)
        results.append((value, *torch.autograd.grad((weights * value).sum(), leaves)))
    (got, got_dl, got_dx), (expected, expected_dl, expected_dx) = results
    size = math.prod(data_shape)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12 * size)
    torch.testing.assert_close(got_dl, expected_dl, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got_dx, expected_dx, rtol=1e-12, atol=1e-15)
    sigmoid = torch.sigmoid(logits).reshape(K, B, *data_shape)
    torch.testing.assert_close(got_dl, weights.reshape(K, B, *[1] * len(data_shape)) * (x - sigmoid))


def test_bernoulli_compiled_log_prob_gradient_passes_gradcheck(fresh_dynamo):
    likelihood = BernoulliLikelihood((10,))
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(4, 10, generator=g, dtype=torch.float64)).requires_grad_()
    x = torch.rand(4, 10, generator=g, dtype=torch.float64).requires_grad_()  # gradcheck needs a continuous x too
    assert torch.autograd.gradcheck(_compiled_log_prob(likelihood), (logits, x))


# --- the facts each likelihood class carries (nothing elsewhere keys on its name) -----------------------------------
@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_binary_and_density_on_reals_agree_with_the_support(name):
    cls = LIKELIHOODS[name]
    assert cls.binary == (cls.support is constraints.boolean)
    assert cls.density_on_reals == (cls.support is constraints.real)
    assert TrainConfig(likelihood=name).binarizes == cls.binary  # binarize=None: the likelihood decides
    assert TrainConfig(likelihood=name, binarize=not cls.binary).binarizes == (not cls.binary)  # as set


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_bias_from_mean_gives_the_decoder_output_of_that_mean(name):
    """The output is what, at initialisation, makes p(x|z) have the data's mean (for the continuous Bernoulli: its
    parameter lambda, which is not its mean)."""
    mean = torch.linspace(0.01, 0.99, 6, dtype=torch.float64)
    likelihood = LIKELIHOODS[name]((6,))
    dist = likelihood(likelihood.bias_from_mean(mean)).base_dist
    if isinstance(likelihood, ContinuousBernoulliLikelihood):
        fitted = dist.probs
    elif isinstance(likelihood, DiscretizedLogisticLikelihood):
        fitted = dist.loc  # the logistic's location; the discretized mean is pulled towards 1/2 by the edge bins
    elif isinstance(likelihood, DiscretizedLogisticMixtureLikelihood):
        # every component at the mean, with equal weights and the initial scale
        weights, components = dist.mixture_distribution.probs, dist.component_distribution
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / likelihood.components))
        torch.testing.assert_close(components.scale, torch.full_like(components.scale, likelihood.init_scale))
        for k in range(likelihood.components):
            torch.testing.assert_close(components.loc[..., k], mean, rtol=1e-12, atol=1e-12)
        fitted = components.loc[..., 0]
    else:
        fitted = dist.mean
    torch.testing.assert_close(fitted.detach(), mean, rtol=1e-12, atol=1e-12)


class LaplaceLikelihood(Likelihood):
    """A likelihood a user adds: p(x|z) = prod_i Laplace(x_i; mean_i, scale), a density on R^D."""

    bias_from_mean = staticmethod(lambda mean: mean)  # the decoder outputs the location (= the mean)

    def __init__(self, data_shape, scale: float = 1.0):
        super().__init__(data_shape)
        self.scale = float(scale)

    def forward(self, loc):
        return self._independent(Laplace(loc, torch.full_like(loc, self.scale)))


def test_a_new_likelihood_is_one_class_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(LIKELIHOODS, "test-laplace", LaplaceLikelihood)
    config = TrainConfig(likelihood="test-laplace", likelihood_options={"scale": 0.5}, latent_dim=2)
    assert not config.binarizes
    with pytest.raises(ValueError, match="unknown likelihood_options 'width' for likelihood 'test-laplace'; it takes"):
        TrainConfig(likelihood="test-laplace", likelihood_options={"width": 0.5})
    model = build_model(config, (4,)).double()
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    expected = scipy.stats.laplace.logpdf(x.numpy(), loc=model.decoder(z).detach().numpy(), scale=0.5).sum(-1)
    np.testing.assert_allclose(model.decode(z).log_prob(x).detach().numpy(), expected, rtol=1e-12)
    mean = torch.linspace(-1, 1, 4, dtype=torch.float64)
    init_decoder_bias(model.output_net, mean, model.likelihood)
    torch.testing.assert_close(model.decoder.output_layer.bias.detach(), mean)


# --- the discretized logistic (8-bit pixels) --------------------------------------------------------------------------
LOCS_SCALES = [(0.5, 0.1), (0.0, 1e-3), (1.3, 0.02), (-2.0, 0.05), (0.37, 30.0), (0.9, 1e-4)]


def _logistic_bin_log_mass(x: np.ndarray, loc: float, scale: float) -> np.ndarray:
    """log P(x) from scipy's logistic log-cdf / log-survival, on the side of loc where neither cancels."""
    h = 0.5 / 255
    a, b = (x + h - loc) / scale, (x - h - loc) / scale
    d = scipy.stats.logistic
    with np.errstate(divide="ignore", invalid="ignore"):  # each side is used only where it does not cancel
        upper_tail = d.logsf(b) + np.log(-np.expm1(d.logsf(a) - d.logsf(b)))  # sf(b) - sf(a)
        lower_tail = d.logcdf(a) + np.log(-np.expm1(d.logcdf(b) - d.logcdf(a)))  # cdf(a) - cdf(b)
    out = np.where(x > loc, upper_tail, lower_tail)
    out = np.where(x == 0, d.logcdf(a), out)
    return np.where(x == 1, d.logsf(b), out)


@pytest.mark.parametrize(("loc", "scale"), LOCS_SCALES)
def test_discretized_logistic_masses_sum_to_one(loc, scale):
    dist = DiscretizedLogistic(torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64))
    levels = torch.arange(LEVELS, dtype=torch.float64) / (LEVELS - 1)
    log_p = dist.log_prob(levels)  # (256,)
    assert bool(torch.isfinite(log_p).all()) and bool((log_p <= 0).all())
    # Derived bound, no fitted tolerance: a = (x + h - loc) / scale and b carry relative rounding errors of a few
    # units (gamma_4), log sigma has slope <= 1, so log P_k is off by <= gamma_8 (1 + |a_k| + |b_k|) and P_k by that
    # relative amount; the sum of 256 terms adds Higham's gamma_256.
    h = 0.5 / (LEVELS - 1)
    a, b = (levels + h - loc) / scale, (levels - h - loc) / scale
    p = log_p.exp()
    bound = rounding_gamma(8, torch.float64) * float((p * (1 + a.abs() + b.abs())).sum())
    assert abs(float(p.sum()) - 1.0) <= bound + rounding_gamma(LEVELS, torch.float64)
    torch.testing.assert_close(dist.enumerate_support(), levels.reshape(-1))


@pytest.mark.parametrize(("loc", "scale"), LOCS_SCALES)
def test_discretized_logistic_matches_scipy_including_the_far_tails(loc, scale):
    levels = np.arange(LEVELS) / (LEVELS - 1)
    dist = DiscretizedLogistic(torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64))
    got = dist.log_prob(torch.from_numpy(levels)).numpy()
    expected = _logistic_bin_log_mass(levels, loc, scale)
    assert np.isfinite(expected).all()  # the reference stays finite too: -1e5 nats and below at scale 1e-4
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_discretized_logistic_likelihood_shapes_mean_and_samples():
    gen = torch.Generator().manual_seed(13)
    likelihood = DiscretizedLogisticLikelihood((2, 3), shared=True, init_scale=0.2).to(torch.float64)
    loc = torch.rand(B, 2, 3, generator=gen, dtype=torch.float64)
    dist = likelihood(loc)
    base = dist.base_dist
    levels = base.enumerate_support()  # (256, B, 2, 3)
    by_hand = (levels * base.log_prob(levels).exp()).sum(0)
    torch.testing.assert_close(base.mean, by_hand)
    torch.manual_seed(0)
    x = dist.sample((50,))
    assert x.shape == (50, B, 2, 3) and bool(eight_bit.check(x).all())
    assert (x.mean(0) - base.mean).abs().max() < 0.2  # a draw's mean near the mean (scale 0.2, 50 draws)
    bits = DiscretizedLogisticLikelihood.bits_per_dim(dist.log_prob(x[0]), 6)
    torch.testing.assert_close(bits, -dist.log_prob(x[0]) / (6 * math.log(2)))


def test_discretized_logistic_gradcheck_wrt_loc_and_scale():
    gen = torch.Generator().manual_seed(14)
    likelihood = DiscretizedLogisticLikelihood((2, 3), init_scale=0.05).to(torch.float64)
    raw_scale = likelihood.raw_scale.detach() + 0.3 * torch.randn(2, 3, generator=gen, dtype=torch.float64)
    loc = torch.rand(B, 2, 3, generator=gen, dtype=torch.float64).requires_grad_()
    x = _data(eight_bit, (B, 2, 3), gen)
    x[0, 0] = 0.0  # both edge bins and interior bins
    x[1, 1] = 1.0

    def log_prob(loc, raw_scale):
        return torch.func.functional_call(likelihood, {"raw_scale": raw_scale}, (loc,)).log_prob(x)

    assert torch.autograd.gradcheck(log_prob, (loc, raw_scale.requires_grad_()))


def test_discretized_logistic_data_must_be_on_the_eight_bit_grid():
    config = TrainConfig(likelihood="discretized-logistic", latent_dim=2, architecture_options={"hidden": [8]})
    assert not config.binarizes
    model = build_model(config, (4,))
    check_data(model, torch.tensor([[0.0, 1.0, 128 / 255, 3 / 255]]))
    check_data(model, (torch.tensor([[0.0, 1.0, 128 / 255, 3 / 255]], dtype=torch.float64) * 1).float())
    for bad, match in ((0.5, "outside"), (-1 / 255, "outside"), (math.nan, "NaN")):
        with pytest.raises(ValueError, match=match):
            check_data(model, torch.tensor([[0.0, bad, 0.0, 1.0]]))


def test_discretized_logistic_trains_on_eight_bit_data(tmp_path):
    from vaelab.runs import load_run
    from vaelab.train import train

    gen = torch.Generator().manual_seed(15)
    data = torch.randint(0, LEVELS, (100, 16), generator=gen).to(torch.uint8)
    config = tiny_config(
        likelihood="discretized-logistic",
        max_steps=4,
    )
    result = train(config, data, data[:20], tmp_path / "run")
    assert result.step == 4
    model = load_run(tmp_path / "run").model
    scale = model.likelihood.scale.detach()
    assert bool(torch.isfinite(scale).all()) and not torch.allclose(scale, torch.full_like(scale, 0.1))


# --- the mixture of discretized logistics -----------------------------------------------------------------------------
MIXTURE_K = 3


def _mixture_params(lead, data_shape, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoder outputs for a mixture of MIXTURE_K discretized logistics, laid out as documented ([3, K, C, *rest] per
    example: logits, locations, raw scales), and the three parts as [*lead, C, *rest, K]."""
    shape = (*lead, 3, MIXTURE_K, *data_shape)
    raw = torch.randn(shape, generator=generator, dtype=torch.float64)
    at = len(lead)  # the part's dim
    parts = (2 * raw.select(at, 0), 0.5 + 0.4 * raw.select(at, 1), raw.select(at, 2) - 2)  # logits, loc, raw scale
    groups = torch.stack(parts, at)
    params = groups.reshape(*lead, 3 * MIXTURE_K * data_shape[0], *data_shape[1:])
    logits, loc, raw_scale = (g.movedim(len(lead), -1) for g in groups.unbind(len(lead)))
    return params, logits, loc, torch.nn.functional.softplus(raw_scale) + 1e-3


def test_discretized_logistic_mixture_is_the_weighted_sum_of_its_components():
    """log P(x) per value against scipy's logistic masses, weighted by softmax(logits), the parameters read from the
    documented layout: channel c of component k of part g is decoder channel (g K + k) C + c."""
    gen = torch.Generator().manual_seed(21)
    likelihood = DiscretizedLogisticMixtureLikelihood((2, 3), components=MIXTURE_K).to(torch.float64)
    assert likelihood.params_shape == (3 * MIXTURE_K * 2, 3)
    params, logits, loc, scale = _mixture_params((B,), (2, 3), gen)
    x = _data(eight_bit, (B, 2, 3), gen)
    x[0, 0] = 0.0  # both edge bins and interior bins
    x[1, 1] = 1.0
    got = likelihood(params).log_prob(x)
    log_w = torch.log_softmax(logits, -1).numpy()
    components = np.stack(
        [_logistic_bin_log_mass(x.numpy(), loc[..., k].numpy(), scale[..., k].numpy()) for k in range(MIXTURE_K)],
        -1,
    )
    expected = scipy.special.logsumexp(log_w + components, axis=-1).sum(axis=(-2, -1))
    # Derived bound: each component's log mass is within gamma_8 (1 + |a| + |b|) of exact (see the sum-to-one test),
    # the log-softmax and log-sum-exp add gamma_(2K + 4) relative per value, and the sum over 6 values gamma_6; scipy's
    # reference carries the same, so the two differ by at most twice that.
    h = 0.5 / (LEVELS - 1)
    ab = ((x.unsqueeze(-1) - loc).abs() + h) / scale
    per_value = rounding_gamma(8, torch.float64) * (1 + 2 * ab.amax(-1)) + rounding_gamma(
        2 * MIXTURE_K + 4, torch.float64
    )
    bound = 2 * (per_value * torch.from_numpy(components).amin(-1).abs().clamp_min(1)).sum((-2, -1))
    assert bool(
        ((got - torch.from_numpy(expected)).abs() <= bound + rounding_gamma(6, torch.float64) * got.abs()).all()
    )


def test_discretized_logistic_mixture_masses_sum_to_one_and_draws_follow_them():
    gen = torch.Generator().manual_seed(22)
    likelihood = DiscretizedLogisticMixtureLikelihood((1,), components=MIXTURE_K).to(torch.float64)
    params, _, loc, scale = _mixture_params((4,), (1,), gen)
    mixture = likelihood(params).base_dist  # batch (4, 1): four values
    levels = torch.arange(LEVELS, dtype=torch.float64) / (LEVELS - 1)
    p = mixture.log_prob(levels.reshape(-1, 1, 1)).exp()  # (256, 4, 1)
    # each component sums to 1 within gamma_8 sum_k P_k (1 + |a_k| + |b_k|) + gamma_256 (the DiscretizedLogistic
    # test's bound), and the mixture's weights (summing to 1 within gamma_K) and log-sum-exp add gamma_(2K + 4)
    h = 0.5 / (LEVELS - 1)
    ab = ((levels.reshape(-1, 1, 1, 1) - loc).abs() + h) / scale  # (256, 4, 1, K)
    bound = rounding_gamma(8, torch.float64) * (p * (1 + 2 * ab.amax(-1))).sum(0)
    bound += rounding_gamma(LEVELS + 2 * MIXTURE_K + 4, torch.float64)
    assert bool(((p.sum(0) - 1).abs() <= bound).all())
    # the mean (one sigmoid per level, summed) is sum_k (k / 255) P_k: levels <= 1 carry the masses' errors over,
    # and the 255 sigmoids of the mean add gamma_(255 + 4)
    by_hand = (levels.reshape(-1, 1, 1) * p).sum(0)
    assert bool(((mixture.mean - by_hand).abs() <= bound + rounding_gamma(LEVELS + 4, torch.float64)).all())
    # draws: counts in 8 bins of 32 levels against n times the bin's mass, by the tolerance rule (binomial stderr)
    torch.manual_seed(22)
    n = 20_000
    draws = likelihood(params).sample((n,))  # (n, 4, 1)
    assert bool(eight_bit.check(draws).all())
    bins = torch.round(draws * (LEVELS - 1)).long() // 32  # (n, 4, 1)
    counts = torch.stack([(bins == j).sum(0) for j in range(8)]).to(torch.float64)  # (8, 4, 1)
    mass = p.reshape(8, 32, 4, 1).sum(1)
    assert_within_stderr(counts, n * mass, (n * mass * (1 - mass)).sqrt(), "draws per bin of levels")


@pytest.mark.parametrize(
    ("architecture", "data_shape", "options"),
    [("mlp", (2, 3), {"hidden": [4]}), ("conv", (2, 28, 28), {"base_channels": 4})],
)
def test_decoders_emit_the_mixture_parameters_and_start_at_the_data_mean(architecture, data_shape, options):
    """Every component starts with its location at the data mean (per value for an MLP's bias, per channel for a
    transposed convolution's), with equal weights and the initial scale, whatever the decoder's weights."""
    likelihood = DiscretizedLogisticMixtureLikelihood(data_shape, components=MIXTURE_K)
    _, decoder = build_pair(architecture, data_shape, 2, likelihood, **options)
    assert decoder.out_shape == likelihood.params_shape
    pixel_mean = torch.rand(data_shape, generator=torch.Generator().manual_seed(23))
    init_decoder_bias(decoder, pixel_mean, likelihood)
    with torch.no_grad():
        decoder.output_layer.weight.zero_()  # the output is then the bias alone
        mixture = likelihood(decoder(torch.randn(5, 2))).base_dist
    per_channel = architecture == "conv"
    expected = pixel_mean.mean((1, 2), keepdim=True).expand(data_shape) if per_channel else pixel_mean
    for k in range(MIXTURE_K):
        torch.testing.assert_close(mixture.component_distribution.loc[..., k], expected.expand(5, *data_shape))
    torch.testing.assert_close(mixture.mixture_distribution.probs, torch.full((5, *data_shape, MIXTURE_K), 1 / 3))
    scale = mixture.component_distribution.scale
    torch.testing.assert_close(scale, torch.full_like(scale, likelihood.init_scale))


def test_an_architecture_without_params_shape_refuses_the_mixture(monkeypatch):
    from vaelab.nets import ARCHITECTURES, mlp_pair

    def plain(data_shape, latent_dim):  # a user's builder from before params_shape: one output per value
        return mlp_pair(data_shape, latent_dim, hidden=(4,))

    monkeypatch.setitem(ARCHITECTURES, "plain", plain)
    _, decoder = build_pair("plain", (6,), 2, BernoulliLikelihood((6,)))  # one parameter per value: fine
    assert decoder.out_shape == (6,)
    with pytest.raises(ValueError, match=r"needs 9 decoder outputs per value.*'plain' has no params_shape option"):
        build_pair("plain", (6,), 2, DiscretizedLogisticMixtureLikelihood((6,), components=3))


def test_the_decoder_output_shape_comes_from_the_likelihood_never_from_a_config():
    with pytest.raises(ValueError, match="unknown architecture_options 'params_shape'"):
        TrainConfig(likelihood="discretized-logistic-mixture", architecture_options={"params_shape": [3]})


@pytest.mark.parametrize(("components", "match"), [(0, "components must be an int >= 1"), (2.0, "components")])
def test_discretized_logistic_mixture_bad_options_raise(components, match):
    with pytest.raises(ValueError, match=match):
        DiscretizedLogisticMixtureLikelihood((4,), components=components)
    with pytest.raises(ValueError, match="0 < min_scale < init_scale"):
        DiscretizedLogisticMixtureLikelihood((4,), min_scale=0.2, init_scale=0.1)
    with pytest.raises(ValueError, match=r"takes decoder outputs \[\*batch, 9\]"):
        DiscretizedLogisticMixtureLikelihood((3,), components=1)(torch.zeros(2, 3))


@pytest.mark.parametrize("model", ["vae", "iwae-2layer"])
def test_discretized_logistic_mixture_trains_and_reloads(tmp_path, model):
    from vaelab.estimators import log_marginal
    from vaelab.evaluate import evaluate_model, format_evaluation
    from vaelab.runs import load_run
    from vaelab.train import train

    gen = torch.Generator().manual_seed(24)
    shape = (784,) if model == "iwae-2layer" else (16,)
    data = torch.randint(0, LEVELS, (100, *shape), generator=gen).to(torch.uint8)
    fields = {"model": model, "latent_dim": 150} if model == "iwae-2layer" else {}
    if model == "iwae-2layer":
        fields["architecture_options"] = {}
    config = tiny_config(
        likelihood="discretized-logistic-mixture", likelihood_options={"components": 2}, max_steps=3, **fields
    )
    result = train(config, data, data[:20], tmp_path / "run")
    assert result.step == 3
    model = load_run(tmp_path / "run").model
    assert model.likelihood.params_shape == (6 * shape[0],)
    x = data[:5].to(torch.float32) / 255
    log_px = log_marginal(model, x, k=4).value
    assert bool(torch.isfinite(log_px).all()) and bool((log_px < 0).all())
    # the standard evaluation gives 8-bit models' log p(x) in bits per dimension too
    result = evaluate_model(model, x, k=4, iwae_ks=(2,), elbo_k=2, progress=False, compile=False)
    dim = shape[0]
    assert result["bits_per_dim"]["mean"] == pytest.approx(-result["log_px"]["mean"] / (dim * math.log(2)))
    assert result["bits_per_dim"]["sem"] == pytest.approx(result["log_px"]["sem"] / (dim * math.log(2)))
    assert f"= {result['bits_per_dim']['mean']:.4f} ± " in format_evaluation(result)  # in vaelab eval's summary
    bernoulli = build_model(tiny_config(), shape)
    assert "bits_per_dim" not in evaluate_model(bernoulli, x.round(), k=4, iwae_ks=(2,), elbo_k=2, progress=False)
