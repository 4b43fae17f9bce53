"""HierarchicalVAE: the model interface on the joint over (z1, z2), densities by hand, every estimator, training,
and an exact check on a linear-Gaussian chain.

Tolerances follow :mod:`vaelab.tolerance`: |estimate - exact| <= Z * stderr (+ rounding slack). Monte Carlo
expectations are taken over R replicates, made by repeating each example R times in the batch (one call, independent
samples per row), as in tests/test_estimators.py. Every test is seeded.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

import vaelab
from vaelab._math import inverse_softplus
from vaelab.estimators import pareto_k_threshold
from vaelab.hierarchical import NET_NAMES, HierarchicalVAE, TwoLayerChain
from vaelab.likelihoods import BernoulliLikelihood, GaussianLikelihood
from vaelab.nets import MLP
from vaelab.tolerance import Z_TOLERANCE, assert_within_stderr

D1, D2 = 100, 50
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# --- helpers ----------------------------------------------------------------------------------------------------------
def binary_data(batch: int, shape=(784,), p: float = 0.3, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.bernoulli(torch.full((batch, *shape), p, dtype=dtype), generator=torch.Generator().manual_seed(seed))


def diagonal_normal_log_pdf(value: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """sum_i log N(value_i; loc_i, scale_i^2) with (loc, raw) = params, scale = softplus(raw) + 1e-4, written out."""
    loc, raw = params.chunk(2, dim=-1)
    scale = F.softplus(raw) + 1e-4
    return (-0.5 * ((value - loc) / scale) ** 2 - scale.log() - HALF_LOG_2PI).sum(-1)


def small_model(data_dim: int = 20, d1: int = 4, d2: int = 2, hidden: int = 32) -> HierarchicalVAE:
    nets = nn.ModuleDict(
        {
            "q_z1_x": MLP(data_dim, (hidden,), 2 * d1),
            "q_z2_z1": MLP(d1, (hidden // 2,), 2 * d2),
            "p_z1_z2": MLP(d2, (hidden // 2,), 2 * d1),
            "p_x_z1": MLP(d1, (hidden,), data_dim),
        }
    )
    return HierarchicalVAE(nets, BernoulliLikelihood((data_dim,)), latent_dims=(d1, d2))


def mean_and_stderr(values: torch.Tensor, reps: int) -> tuple[torch.Tensor, torch.Tensor]:
    values = values.detach().to(torch.float64).reshape(reps, -1)  # (R, B)
    return values.mean(0), values.std(0) / math.sqrt(reps)


# --- the interface ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data_shape", [(784,), (1, 28, 28)])
def test_interface_shapes(data_shape):
    torch.manual_seed(0)
    model = HierarchicalVAE.iwae_2layer(data_shape)
    assert model.latent_dim == D1 + D2 and model.latent_dims == (D1, D2)
    assert model.data_shape == data_shape and model.data_support is model.likelihood.support
    x = binary_data(4, data_shape)
    prior = model.prior
    assert isinstance(prior, TwoLayerChain) and prior.batch_shape == () and prior.event_shape == (150,)
    q = model.encode(x)
    assert q.batch_shape == (4,) and q.event_shape == (150,) and q.has_rsample
    z = q.rsample((7,))
    assert z.shape == (7, 4, 150)
    assert q.log_prob(z).shape == (7, 4) and prior.log_prob(z).shape == (7, 4)
    assert q.log_prob(z[0]).shape == (4,) and prior.log_prob(z[0, 0]).shape == ()
    p = model.decode(z)
    assert p.batch_shape == (7, 4) and p.event_shape == data_shape and p.log_prob(x).shape == (7, 4)
    assert prior.rsample((7, 4)).shape == (7, 4, 150) and prior.sample().shape == (150,)
    assert model.decode(prior.sample((3,))).batch_shape == (3,)
    # expand: only the root layer's distribution is expanded; the conditional serves any leading shape
    wide = q.expand((2, 4))
    assert wide.batch_shape == (2, 4) and wide.rsample((3,)).shape == (3, 2, 4, 150)
    assert wide.log_prob(wide.rsample()).shape == (2, 4)
    assert prior.expand((5,)).rsample((2,)).shape == (2, 5, 150)
    assert all(torch.isfinite(t).all() for t in (q.log_prob(z), prior.log_prob(z), p.log_prob(x)))


def test_entropy_and_kl_are_not_analytic():
    """So elbo(form="entropy"/"kl") must take the estimators' Monte Carlo fallbacks."""
    model = small_model()
    q, prior = model.encode(binary_data(3, (20,))), model.prior
    for dist in (q, prior):
        with pytest.raises(NotImplementedError, match="no closed-form entropy"):
            dist.entropy()
    with pytest.raises(NotImplementedError):
        kl_divergence(q, prior)


# --- densities against the networks, by hand ---------------------------------------------------------------------
def test_prior_log_prob_is_top_normal_plus_conditional_by_hand():
    torch.manual_seed(1)
    model = HierarchicalVAE.iwae_2layer().double()
    z = torch.randn(5, 3, D1 + D2, dtype=torch.float64)
    z1, z2 = z[..., :D1], z[..., D1:]
    log_p_z2 = (-0.5 * z2**2 - HALF_LOG_2PI).sum(-1)  # N(0, I)
    params = model.nets["p_z1_z2"](z2.reshape(-1, D2)).reshape(5, 3, 2 * D1)
    expected = log_p_z2 + diagonal_normal_log_pdf(z1, params)
    torch.testing.assert_close(model.prior.log_prob(z), expected, rtol=1e-12, atol=1e-10)


def test_posterior_log_prob_is_chain_of_conditionals_by_hand():
    torch.manual_seed(2)
    model = HierarchicalVAE.iwae_2layer().double()
    x = binary_data(3, dtype=torch.float64)
    z = torch.randn(5, 3, D1 + D2, dtype=torch.float64)
    z1, z2 = z[..., :D1], z[..., D1:]
    log_q_z1 = diagonal_normal_log_pdf(z1, model.nets["q_z1_x"](x))  # params (B, 2 d1) broadcast over K
    log_q_z2 = diagonal_normal_log_pdf(z2, model.nets["q_z2_z1"](z1.reshape(-1, D1)).reshape(5, 3, 2 * D2))
    torch.testing.assert_close(model.encode(x).log_prob(z), log_q_z1 + log_q_z2, rtol=1e-12, atol=1e-10)


def test_decode_uses_z1_only():
    torch.manual_seed(3)
    model = HierarchicalVAE.iwae_2layer()
    x = binary_data(2)
    z = torch.randn(4, 2, D1 + D2)
    z_other_top = torch.cat([z[..., :D1], torch.randn(4, 2, D2)], -1)
    torch.testing.assert_close(model.decode(z).log_prob(x), model.decode(z_other_top).log_prob(x))
    logits = model.nets["p_x_z1"](z[..., :D1].reshape(-1, D1)).reshape(4, 2, 784)
    expected = -F.binary_cross_entropy_with_logits(logits, x.expand(4, 2, 784), reduction="none").sum(-1)
    torch.testing.assert_close(model.decode(z).log_prob(x), expected)


# --- reparameterization and gradients -----------------------------------------------------------------------------
def _grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def _all_nonzero(grads) -> bool:
    return all(g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0 for g in grads)


def test_rsample_is_reparameterized():
    torch.manual_seed(4)
    model = HierarchicalVAE.iwae_2layer()
    z = model.encode(binary_data(3)).rsample((2,))
    z[..., D1:].square().sum().backward()  # z2 = f(z1(x-net), q_z2_z1-net): both encoder nets
    assert _all_nonzero(_grads(model.nets["q_z1_x"])) and _all_nonzero(_grads(model.nets["q_z2_z1"]))
    assert all(p.grad is None for name in ("p_z1_z2", "p_x_z1") for p in model.nets[name].parameters())
    model.zero_grad(set_to_none=True)
    model.prior.rsample((2, 3))[..., :D1].square().sum().backward()  # z1 = f(z2, p_z1_z2-net)
    assert _all_nonzero(_grads(model.nets["p_z1_z2"]))


def test_iwae_bound_gradients_reach_all_four_nets():
    torch.manual_seed(5)
    model = HierarchicalVAE.iwae_2layer()
    vaelab.iwae_bound(model, binary_data(3), k=5).sum().backward()
    for name in NET_NAMES:
        assert _all_nonzero(_grads(model.nets[name])), name


def test_float64_after_double():
    torch.manual_seed(6)
    model = HierarchicalVAE.iwae_2layer().double()
    x = binary_data(2, dtype=torch.float64)
    assert model.prior.rsample((3,)).dtype == torch.float64 and model.encode(x).rsample().dtype == torch.float64
    for value in (
        vaelab.elbo(model, x, k=2, form="entropy"),
        vaelab.iwae_bound(model, x, k=4),
        vaelab.log_marginal(model, x, k=8).value,
        vaelab.posterior_gap(model, x, k=8).value,
    ):
        assert value.dtype == torch.float64 and value.shape == (2,) and bool(torch.isfinite(value).all())


# --- the estimators on the joint --------------------------------------------------------------------------------------
def test_elbo_forms_use_the_monte_carlo_fallback_and_agree():
    torch.manual_seed(7)
    model = HierarchicalVAE.iwae_2layer()
    x = binary_data(2)
    # On the same samples, the three forms are the same Monte Carlo estimate: equal up to rounding.
    same = {}
    for form in vaelab.estimators.ELBO_FORMS:
        torch.manual_seed(8)
        same[form] = vaelab.elbo_parts(model, x, k=3, form=form)
    for form in ("entropy", "kl"):
        torch.testing.assert_close(same[form].kl, same["joint"].kl)
        torch.testing.assert_close(same[form].elbo, same["joint"].elbo)
    # On independent samples, they agree within standard errors.
    reps = 200
    x_rep = x.repeat(reps, 1)
    with torch.no_grad():
        stats = {f: mean_and_stderr(vaelab.elbo(model, x_rep, k=1, form=f), reps) for f in vaelab.estimators.ELBO_FORMS}
    m_joint, se_joint = stats["joint"]
    for form in ("entropy", "kl"):
        m, se = stats[form]
        assert_within_stderr(m - m_joint, torch.zeros_like(m), (se**2 + se_joint**2).sqrt(), what=f"{form} - joint")


def test_elbo_below_iwae_below_log_marginal_in_expectation():
    torch.manual_seed(9)
    model = HierarchicalVAE.iwae_2layer()
    x = binary_data(2)
    with torch.no_grad():
        elbo_m, elbo_se = mean_and_stderr(vaelab.elbo(model, x.repeat(400, 1), k=1), 400)
        iwae_m, iwae_se = mean_and_stderr(vaelab.iwae_bound(model, x.repeat(100, 1), k=50), 100)
        lm_m, lm_se = mean_and_stderr(vaelab.log_marginal(model, x.repeat(20, 1), k=1000).value, 20)
    assert bool((iwae_m - elbo_m > -Z_TOLERANCE * (elbo_se**2 + iwae_se**2).sqrt()).all())
    assert bool((lm_m - iwae_m > -Z_TOLERANCE * (iwae_se**2 + lm_se**2).sqrt()).all())
    # and the ordering is not a tie: importance weighting clearly tightens the bound of this untrained model
    assert bool((iwae_m - elbo_m > 10 * (elbo_se**2 + iwae_se**2).sqrt()).all())
    gap = vaelab.posterior_gap(model, x, k=200)
    assert bool((gap.value > 0).all())


def test_training_raises_the_elbo():
    """A few hundred Adam steps on the IWAE bound (k=5) lift the ELBO of noisy copies of 3 binary prototypes."""
    torch.manual_seed(10)
    g = torch.Generator().manual_seed(11)
    prototypes = torch.bernoulli(torch.full((3, 20), 0.5), generator=g)
    flips = torch.bernoulli(torch.full((240, 20), 0.05), generator=g)
    data = (prototypes.repeat(80, 1) - flips).abs()  # 240 examples, 5% of bits flipped
    model = small_model()

    def evaluate() -> float:
        torch.manual_seed(12)
        with torch.no_grad():
            return float(vaelab.elbo(model, data, k=10).mean())

    before = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = -vaelab.iwae_bound(model, data, k=5).mean()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after > before + 5.0, (before, after)  # ~14 nats at init; ~3 nats (the flips' entropy) is reachable


# --- an exactly known case: a linear-Gaussian chain --------------------------------------------------------------
class LinearGaussianNet(nn.Module):
    """``[N, in] -> [N, 2 out]``: loc = W u + c (a Linear), raw scale a learnable constant (a bias-only layer).

    Through the DiagonalGaussian head this is N(W u + c, diag(softplus(raw) + 1e-4)^2): a linear-Gaussian
    conditional with a scale that does not depend on the input.
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.loc = nn.Linear(n_in, n_out, dtype=torch.float64)
        self.raw_scale = nn.Parameter(torch.zeros(n_out, dtype=torch.float64))

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale) + 1e-4  # what the head will compute

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.loc(u), self.raw_scale.expand(u.shape[0], -1)], dim=-1)


@torch.no_grad()
def linear_chain(data_dim=4, d1=3, d2=2, noise=1.0, seed=0, widen=1.3):
    """z2 ~ N(0, I); z1 = A z2 + a + s1 eps1; x = B z1 + b + noise eps, and its exact p(x) = N(mu_x, Sigma_x).

    q is built from the exact posterior: q(z1|x) has the mean of p(z1|x), q(z2|z1) that of p(z2|z1) = p(z2|z1, x)
    (x depends on z2 only through z1); their scales are isotropic, ``widen`` times the largest posterior standard
    deviation, so q covers the posterior in every direction and the importance weights have finite variance.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    nets = nn.ModuleDict(
        {
            "q_z1_x": LinearGaussianNet(data_dim, d1),
            "q_z2_z1": LinearGaussianNet(d1, d2),
            "p_z1_z2": LinearGaussianNet(d2, d1),
            "p_x_z1": nn.Linear(d1, data_dim, dtype=torch.float64),
        }
    )
    p_z1, p_x = nets["p_z1_z2"], nets["p_x_z1"]
    p_z1.loc.weight.copy_(randn(d1, d2))
    p_z1.loc.bias.copy_(randn(d1))
    p_z1.raw_scale.copy_(randn(d1) * 0.5)
    p_x.weight.copy_(randn(data_dim, d1))
    p_x.bias.copy_(randn(data_dim))
    a_mat, a_vec, s1 = p_z1.loc.weight, p_z1.loc.bias, p_z1.scale
    b_mat, b_vec = p_x.weight, p_x.bias
    # the generative chain's moments
    cov_z1 = a_mat @ a_mat.T + torch.diag(s1**2)
    cov_x = b_mat @ cov_z1 @ b_mat.T + noise**2 * torch.eye(data_dim, dtype=torch.float64)
    mean_x = b_mat @ a_vec + b_vec
    # posterior means: E[z1|x] = a + K (x - mean_x), E[z2|z1] = G (z1 - a)
    gain_x = cov_z1 @ b_mat.T @ torch.linalg.inv(cov_x)  # K, (d1, D)
    gain_z1 = a_mat.T @ torch.linalg.inv(cov_z1)  # G, (d2, d1)
    post_cov_z1 = cov_z1 - gain_x @ b_mat @ cov_z1
    post_cov_z2 = torch.eye(d2, dtype=torch.float64) - gain_z1 @ a_mat
    for net, gain, offset, cov in (
        (nets["q_z1_x"], gain_x, a_vec - gain_x @ mean_x, post_cov_z1),
        (nets["q_z2_z1"], gain_z1, -gain_z1 @ a_vec, post_cov_z2),
    ):
        net.loc.weight.copy_(gain)
        net.loc.bias.copy_(offset)
        scale = widen * torch.linalg.eigvalsh(cov).max().sqrt()
        net.raw_scale.copy_(inverse_softplus(scale - 1e-4).expand(net.raw_scale.shape))
    model = HierarchicalVAE(nets, GaussianLikelihood((data_dim,), scale=noise), latent_dims=(d1, d2)).double()
    marginal = MultivariateNormal(mean_x, covariance_matrix=cov_x)
    prior_joint = MultivariateNormal(  # (z1, z2)
        torch.cat([a_vec, torch.zeros(d2, dtype=torch.float64)]),
        covariance_matrix=torch.cat(
            [torch.cat([cov_z1, a_mat], 1), torch.cat([a_mat.T, torch.eye(d2, dtype=torch.float64)], 1)], 0
        ),
    )
    return model, marginal, prior_joint


def test_linear_chain_prior_and_posterior_are_the_joint_gaussians():
    torch.manual_seed(15)
    model, _, prior_joint = linear_chain()
    with torch.no_grad():
        # ancestral sampling draws from the joint: sample means within standard errors of the exact mean
        n = 20000
        draws = model.prior.rsample((n,))
        se = (prior_joint.covariance_matrix.diagonal() / n).sqrt()
        assert_within_stderr(draws.mean(0), prior_joint.mean, se, what="mean of prior.rsample")
        cov = prior_joint.covariance_matrix
        var = cov.diagonal()
        cov_se = (
            (var[:, None] * var[None, :] + cov**2) / n
        ).sqrt()  # Gaussian data: Var(s_ij) = (S_ii S_jj + S_ij^2)/n
        assert_within_stderr(draws.T.cov(), cov, cov_se, what="covariance of prior.rsample")
        z = torch.randn(6, 3, model.latent_dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        torch.testing.assert_close(model.prior.log_prob(z), prior_joint.log_prob(z), rtol=1e-12, atol=1e-12)
        x = model.decode(model.prior.sample((3,))).sample()
        # q(z1, z2 | x) with z2 = G z1 + g + s2 eps: mean (m, G m + g), cov [[S1, S1 G^T], [G S1, G S1 G^T + S2]]
        q1, q2 = model.nets["q_z1_x"], model.nets["q_z2_z1"]
        m = x @ q1.loc.weight.T + q1.loc.bias
        gain, s1, s2 = q2.loc.weight, torch.diag(q1.scale**2), torch.diag(q2.scale**2)
        cov = torch.cat([torch.cat([s1, s1 @ gain.T], 1), torch.cat([gain @ s1, gain @ s1 @ gain.T + s2], 1)], 0)
        q_joint = MultivariateNormal(torch.cat([m, q2.loc(m)], -1), covariance_matrix=cov)
        torch.testing.assert_close(model.encode(x).log_prob(z), q_joint.log_prob(z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("proposal", ["posterior", "prior"])
def test_linear_chain_log_marginal_matches_exact_log_px(proposal):
    torch.manual_seed(13)
    model, marginal, _ = linear_chain()
    with torch.no_grad():
        x = model.decode(model.prior.sample((3,))).sample()
    result = vaelab.log_marginal(model, x, k=20000, proposal=proposal)
    assert_within_stderr(result.value, marginal.log_prob(x), result.stderr, what=f"log p(x), {proposal} proposal")
    # the tail is light enough for the standard error to be trusted (noise=1 keeps the naive estimator's tail light too)
    assert bool((result.pareto_k < pareto_k_threshold(20000)).all()), result.pareto_k
    if proposal == "posterior":
        # the exact gap KL(q || p(z|x)) = log p(x) - ELBO is positive and the ELBO sits below log p(x)
        torch.manual_seed(14)
        elbo_m, elbo_se = mean_and_stderr(vaelab.elbo(model, x.repeat(2000, 1), k=1), 2000)
        assert bool((elbo_m < marginal.log_prob(x) - Z_TOLERANCE * elbo_se).all())


# --- validation ------------------------------------------------------------------------------------------------------
def _nets(**overrides):
    nets = {
        "q_z1_x": MLP(6, (8,), 2 * 3),
        "q_z2_z1": MLP(3, (8,), 2 * 2),
        "p_z1_z2": MLP(2, (8,), 2 * 3),
        "p_x_z1": MLP(3, (8,), 6),
    }
    nets.update(overrides)
    return {k: v for k, v in nets.items() if v is not None}


def test_constructor_accepts_a_plain_dict():
    model = HierarchicalVAE(_nets(), BernoulliLikelihood((6,)), latent_dims=(3, 2))
    assert isinstance(model.nets, nn.ModuleDict) and model.latent_dim == 5
    assert vaelab.elbo(model, binary_data(2, (6,)), k=2).shape == (2,)


@pytest.mark.parametrize(
    ("nets", "likelihood", "latent_dims", "message"),
    [
        (_nets(p_x_z1=None), BernoulliLikelihood((6,)), (3, 2), r"missing \['p_x_z1'\]"),
        (_nets(extra=nn.Linear(1, 1)), BernoulliLikelihood((6,)), (3, 2), r"unexpected \['extra'\]"),
        ([nn.Linear(1, 1)], BernoulliLikelihood((6,)), (3, 2), "nets must map names"),
        (_nets(), "bernoulli", (3, 2), "likelihood must be"),
        (_nets(), BernoulliLikelihood((6,)), (3,), "latent_dims must be two ints"),
        (_nets(), BernoulliLikelihood((6,)), (3, 0), "latent_dims must be two ints"),
        (_nets(), BernoulliLikelihood((6,)), (3.0, 2), "latent_dims must be two ints"),
    ],
)
def test_bad_constructor_arguments_raise(nets, likelihood, latent_dims, message):
    with pytest.raises(ValueError, match=message):
        HierarchicalVAE(nets, likelihood, latent_dims=latent_dims)


def test_mismatched_nets_and_shapes_raise_naming_the_problem():
    model = HierarchicalVAE(_nets(q_z2_z1=MLP(3, (8,), 2 * 5)), BernoulliLikelihood((6,)), latent_dims=(3, 2))
    x = binary_data(2, (6,))
    with pytest.raises(ValueError, match=r"net 'q_z2_z1' must output \[N, 4\]"):
        model.encode(x).rsample()
    with pytest.raises(ValueError, match=r"net 'q_z1_x' must output \[B, 8\]"):
        HierarchicalVAE(_nets(), BernoulliLikelihood((6,)), latent_dims=(4, 2)).encode(x)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 6\]"):
        model.encode(binary_data(2, (7,)))
    with pytest.raises(ValueError, match=r"z must be \[\*S, 5\]"):
        model.decode(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        HierarchicalVAE.iwae_2layer(likelihood="poisson")
    with pytest.raises(ValueError, match="784-pixel"):
        HierarchicalVAE.iwae_2layer((10, 10))
