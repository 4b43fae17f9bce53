"""Training objectives: values against their formulas, gradients against their definitions (float64, seeded).

Comparisons use the one rule in :mod:`vaelab.tolerance`. Identities that hold up to rounding (same seed, same
samples) are checked with ``stderr=0``, leaving only the rule's floating-point slack; Monte Carlo claims
(DReG's encoder gradient is unbiased for IWAE's) with the standard error of the mean over R independent
replicates, obtained by repeating each example R times in the batch: one call, one backward, per-row gradients.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.distributions import Independent, Laplace, Normal, kl_divergence

from tiny import tiny_config
from vaelab import LinearGaussian
from vaelab._math import inverse_softplus, positive_scale
from vaelab.estimators import elbo_parts, iwae_bound, log_weights
from vaelab.likelihoods import BernoulliLikelihood
from vaelab.models import VAE
from vaelab.objectives import (
    OBJECTIVES,
    ObjectiveOutput,
    capacity_objective,
    ciwae_objective,
    elbo_objective,
    free_bits_objective,
    iwae_dreg_objective,
    iwae_objective,
    miwae_objective,
    piwae_objective,
)
from vaelab.priors import StandardNormal
from vaelab.tolerance import assert_within_stderr

DTYPE = torch.float64

# keyword arguments each objective needs beyond (model, x); anything else takes its default
REQUIRED = {
    "capacity": dict(capacity=0.5, gamma=10.0),
    "free_bits": dict(free_nats=0.1),
    "miwae": dict(m=2),
    "ciwae": dict(elbo_weight=0.5),
    "piwae": dict(m=2),
}


# --- fixtures ---------------------------------------------------------------------------------------------------------
def make_model(data_dim=5, latent_dim=2, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = LinearGaussian.random(data_dim, latent_dim, noise_scale=0.7, generator=g)
    x = model.sample(batch, generator=g).detach()  # data: no graph back to the model's parameters
    return model, x


class LeafQ:
    """A mean-field q(z|x) with leaf parameters ``loc`` and ``raw`` (scale = softplus(raw)), ``[B, d]`` each.

    Starts from the exact posterior's marginals, shifted and widened so that q differs from p(z|x). Each call
    builds a fresh distribution (a fresh graph from the leaves), so several objectives can be differentiated.
    """

    def __init__(self, model, x, *, shift=0.3, scale_factor=1.3, reps=1):
        post = model.posterior(x)
        loc = post.loc.detach() + shift
        scale = post.covariance_matrix.detach().diagonal(dim1=-2, dim2=-1).sqrt() * scale_factor
        self.loc = loc.repeat(reps, 1).requires_grad_()
        self.raw = inverse_softplus(scale).repeat(reps, 1).requires_grad_()

    def __call__(self) -> Independent:
        return Independent(Normal(self.loc, positive_scale(self.raw, 0.0)), 1)

    @property
    def params(self):
        return (self.loc, self.raw)


def seeded(fn, seed, *args, **kwargs):
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


def grads(loss, params):
    return torch.autograd.grad(loss.sum(), tuple(params))


def assert_same(actual, expected, what):
    """Equal up to floating-point rounding: the tolerance rule with zero standard error."""
    assert_within_stderr(actual.detach(), expected.detach(), torch.zeros(()), what=what)


# --- the interface ----------------------------------------------------------------------------------------------------
def test_registry_lists_every_objective():
    assert set(OBJECTIVES) == {"elbo", "capacity", "free_bits", "iwae", "iwae_dreg", "miwae", "ciwae", "piwae"}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_signature_is_model_x_then_keyword_only_options(name):
    params = list(inspect.signature(OBJECTIVES[name]).parameters.values())
    assert [p.name for p in params[:2]] == ["model", "x"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])
    defaults = {p.name: p.default for p in params[2:]}
    assert (defaults["k"], defaults["beta"], defaults["q"]) == (1, 1.0, None)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_output_is_per_example_with_only_the_loss_attached(name):
    model, x = make_model()
    leaf = LeafQ(model, x)
    out = OBJECTIVES[name](model, x, k=3, q=leaf(), **REQUIRED.get(name, {}))
    assert isinstance(out, ObjectiveOutput)
    assert out.loss.shape == (3,) and out.loss.requires_grad
    assert out.elbo.shape == (3,) and not out.elbo.requires_grad
    for value in (out.recon, out.kl):
        assert value is None or (value.shape == (3,) and not value.requires_grad)
    if out.recon is not None:
        assert_same(out.elbo, out.recon - out.kl, "elbo = recon - kl")
    assert bool(torch.isfinite(out.loss).all())


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_bad_k_and_beta_are_rejected(name):
    model, x = make_model()
    extra = REQUIRED.get(name, {})
    with pytest.raises(ValueError, match="k must be an integer"):
        OBJECTIVES[name](model, x, k=0, **extra)
    for beta in (-1.0, math.nan):
        with pytest.raises(ValueError, match="beta"):
            OBJECTIVES[name](model, x, beta=beta, **extra)


@pytest.mark.parametrize("name", ["capacity", "iwae", "iwae_dreg", "miwae", "ciwae", "piwae"])
def test_objectives_without_a_kl_weight_refuse_beta(name):
    model, x = make_model()
    OBJECTIVES[name](model, x, beta=1.0, **REQUIRED.get(name, {}))  # the default is fine
    with pytest.raises(ValueError, match="beta must be 1"):
        OBJECTIVES[name](model, x, beta=2.0, **REQUIRED.get(name, {}))


# --- the (beta-)ELBO --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["joint", "entropy", "kl"])
def test_elbo_objective_at_beta_one_is_minus_the_elbo(form):
    model, x = make_model()
    out = seeded(elbo_objective, 5, model, x, k=4, form=form)
    parts = seeded(elbo_parts, 5, model, x, k=4, form=form)
    assert torch.equal(out.loss, -parts.elbo)
    assert torch.equal(out.elbo, parts.elbo)
    assert torch.equal(out.recon, parts.recon) and torch.equal(out.kl, parts.kl)


def test_beta_above_one_adds_the_extra_kl_to_the_loss():
    model, x = make_model()
    q = LeafQ(model, x)
    plain = seeded(elbo_objective, 5, model, x, k=2, form="kl", q=q())
    heavy = seeded(elbo_objective, 5, model, x, k=2, beta=3.0, form="kl", q=q())
    assert bool((plain.kl > 0).all())
    assert bool((heavy.loss > plain.loss).all())
    assert_same(heavy.loss - plain.loss, 2.0 * plain.kl, "loss(beta=3) - loss(beta=1)")
    assert torch.equal(heavy.elbo, plain.elbo)  # the reported ELBO ignores beta


# --- capacity ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capacity", [0.0, 0.7, 50.0])
def test_capacity_objective_matches_its_formula(capacity):
    model, x = make_model()
    q = LeafQ(model, x)
    out = seeded(capacity_objective, 5, model, x, k=2, capacity=capacity, gamma=7.0, q=q())
    parts = seeded(elbo_parts, 5, model, x, k=2, form="kl", q=q())
    assert_same(out.loss, -(parts.recon - 7.0 * (parts.kl - capacity).abs()), "capacity loss")
    assert_same(out.elbo, parts.elbo, "capacity objective's reported ELBO")


def test_capacity_objective_validates_its_parameters():
    model, x = make_model()
    with pytest.raises(ValueError, match="capacity"):
        capacity_objective(model, x, capacity=-1.0, gamma=1.0)
    with pytest.raises(ValueError, match="gamma"):
        capacity_objective(model, x, capacity=1.0, gamma=math.inf)


# --- free bits --------------------------------------------------------------------------------------------------------
def free_bits_setup(beta):
    """A 3-d latent model, a leaf q, and a floor lambda with one dimension's batch-mean KL below it."""
    model, x = make_model(data_dim=6, latent_dim=3, batch=4)
    q = LeafQ(model, x, shift=torch.tensor([0.05, 0.6, 1.2], dtype=DTYPE))
    kl_mean = kl_divergence(q().base_dist, model.prior.base_dist).detach().mean(0)  # (d,)
    low, mid = kl_mean.sort().values[:2]
    lam = float((low + mid) / 2)
    return model, x, q, kl_mean, lam, kl_mean >= lam


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_free_bits_value_is_the_floored_objective(beta):
    model, x, q, kl_mean, lam, above = free_bits_setup(beta)
    assert 0 < int(above.sum()) < len(above)
    out = seeded(free_bits_objective, 5, model, x, k=2, free_nats=lam, beta=beta, q=q())
    parts = seeded(elbo_parts, 5, model, x, k=2, form="kl", q=q())
    floored = torch.clamp_min(kl_mean, lam).sum()  # sum_j max(lambda, mean_b KL_bj)
    assert_same(out.loss.mean(), -(parts.recon.mean() - beta * floored), "free-bits batch objective")
    assert torch.equal(out.elbo, parts.elbo)  # reported ELBO unchanged by the floor


def test_free_bits_gradient_skips_dimensions_below_the_floor():
    """Above the floor, the gradient is the beta-ELBO's; below, only the reconstruction term's."""
    beta = 2.0
    model, x, q, _, lam, above = free_bits_setup(beta)
    out = seeded(free_bits_objective, 5, model, x, k=2, free_nats=lam, beta=beta, q=q())
    full = seeded(elbo_objective, 5, model, x, k=2, beta=beta, form="kl", q=q())
    recon_only = seeded(elbo_objective, 5, model, x, k=2, beta=0.0, form="kl", q=q())
    g_fb, g_full, g_recon = (grads(o.loss, q.params) for o in (out, full, recon_only))
    for name, a, b, c in zip(("loc", "raw scale"), g_fb, g_full, g_recon, strict=True):
        assert_same(a[:, above], b[:, above], f"free-bits gradient of {name}, dimensions above the floor")
        assert_same(a[:, ~above], c[:, ~above], f"free-bits gradient of {name}, dimensions below the floor")
        # the test can tell the two apart: the KL term does move the dimensions below the floor
        assert (b[:, ~above] - c[:, ~above]).abs().max() > 1e-3


def test_free_bits_needs_factorised_gaussians():
    model, x = make_model()  # LinearGaussian.encode gives a full-covariance MultivariateNormal
    with pytest.raises(ValueError, match=r"factorised Gaussians.*q is MultivariateNormal"):
        free_bits_objective(model, x, free_nats=0.1)
    with pytest.raises(ValueError, match="free_nats"):
        free_bits_objective(model, x, free_nats=-0.1, q=LeafQ(model, x)())


# --- IWAE -------------------------------------------------------------------------------------------------------------
def test_iwae_loss_is_minus_the_iwae_bound():
    model, x = make_model()
    out = seeded(iwae_objective, 5, model, x, k=7)
    assert torch.equal(out.loss, -seeded(iwae_bound, 5, model, x, k=7))
    assert torch.equal(out.elbo, seeded(log_weights, 5, model, x, k=7).mean(0))
    assert out.recon is None and out.kl is None


# --- IWAE with doubly reparameterized gradients -----------------------------------------------------------------------
@pytest.mark.parametrize("which_q", ["exact posterior (full covariance)", "mean-field leaf q"])
def test_dreg_loss_value_is_minus_the_iwae_bound(which_q):
    model, x = make_model()
    q = None if which_q.startswith("exact") else LeafQ(model, x)()
    out = seeded(iwae_dreg_objective, 5, model, x, k=7, q=q)
    assert_same(out.loss, -seeded(iwae_bound, 5, model, x, k=7, q=q), "DReG loss value")
    assert_same(out.elbo, seeded(log_weights, 5, model, x, k=7, q=q).mean(0), "DReG reported ELBO")


def test_dreg_decoder_gradient_is_iwae_decoder_gradient():
    model, x = make_model()
    q = LeafQ(model, x)  # encoder parameters disjoint from the model's (decoder) parameters
    theta = list(model.parameters())
    g_dreg = grads(seeded(iwae_dreg_objective, 5, model, x, k=6, q=q()).loss, theta)
    g_iwae = grads(seeded(iwae_objective, 5, model, x, k=6, q=q()).loss, theta)
    for (name, _), a, b in zip(model.named_parameters(), g_dreg, g_iwae, strict=True):
        assert_same(a, b, f"DReG gradient of decoder parameter {name}")


def test_dreg_encoder_gradient_is_squared_weights_times_path_derivative():
    """grad_phi loss = -sum_i w~_i^2 (d log w_i / d z_i)(d z_i / d phi), log w with q's parameters fixed."""
    model, x = make_model()
    q, k = LeafQ(model, x), 6
    g_dreg = grads(seeded(iwae_dreg_objective, 5, model, x, k=k, q=q()).loss, q.params)

    dist = q()
    z = seeded(dist.rsample, 5, (k,))  # the same draws as inside the objective
    fixed = Independent(Normal(dist.base_dist.loc.detach(), dist.base_dist.scale.detach()), 1)
    z_free = z.detach().requires_grad_()
    lw = model.decode(z_free).log_prob(x) + model.prior.log_prob(z_free) - fixed.log_prob(z_free)  # (K, B)
    (dlw_dz,) = torch.autograd.grad(lw.sum(), z_free)
    w = torch.softmax(lw.detach(), dim=0)
    expected = torch.autograd.grad(z, q.params, grad_outputs=-(w**2).unsqueeze(-1) * dlw_dz)
    for name, a, b in zip(("loc", "raw scale"), g_dreg, expected, strict=True):
        assert_same(a, b, f"DReG gradient of q's {name}")


def test_dreg_encoder_gradient_is_unbiased_with_lower_variance():
    """Over R replicates (same draws for both), mean(DReG - IWAE gradient) is 0 within its standard error.

    Pairing the two estimators on the same draws cancels most of the noise, so this can detect a small bias:
    dropping the hook (the biased "sticking the landing" estimator at k > 1) is off by tens of standard
    errors.
    """
    reps, k = 4000, 5
    model, x = make_model()
    x_rep = x.repeat(reps, 1)
    per_rep = {}
    for name, objective in (("iwae", iwae_objective), ("dreg", iwae_dreg_objective)):
        q = LeafQ(model, x, reps=reps)
        out = seeded(objective, 11, model, x_rep, k=k, q=q())
        g = torch.cat(grads(out.loss, q.params), dim=-1)  # (R * B, 2d): row r * B + b is replicate r
        per_rep[name] = g.reshape(reps, -1)  # (R, B * 2d)
    diff = per_rep["dreg"] - per_rep["iwae"]
    assert_within_stderr(diff.mean(0), torch.zeros(()), diff.std(0) / math.sqrt(reps), what="DReG - IWAE")
    var_dreg, var_iwae = per_rep["dreg"].var(0), per_rep["iwae"].var(0)
    assert bool((var_dreg < var_iwae).all()), f"variance ratio DReG / IWAE: {var_dreg / var_iwae}"


def test_dreg_rejects_q_it_cannot_detach():
    model, x = make_model()
    q = Independent(Laplace(torch.zeros(3, 2, dtype=DTYPE), torch.ones(3, 2, dtype=DTYPE)), 1)
    with pytest.raises(ValueError, match=r"DReG needs q .*got Independent\(Laplace, 1\)"):
        iwae_dreg_objective(model, x, k=2, q=q)


def test_dreg_on_a_vae_trains_both_networks():
    torch.manual_seed(0)
    vae = VAE(
        prior=StandardNormal(2),
        encoder=torch.nn.Linear(6, 4),
        decoder=torch.nn.Linear(2, 6),
        likelihood=BernoulliLikelihood((6,)),
    ).to(DTYPE)
    x = torch.bernoulli(torch.full((5, 6), 0.5, dtype=DTYPE))
    out = seeded(iwae_dreg_objective, 3, vae, x, k=4)
    ref = seeded(iwae_objective, 3, vae, x, k=4)
    assert_same(out.loss, ref.loss, "DReG loss on a VAE")
    g_dreg = dict(zip([n for n, _ in vae.named_parameters()], grads(out.loss, vae.parameters()), strict=True))
    g_iwae = dict(zip([n for n, _ in vae.named_parameters()], grads(ref.loss, vae.parameters()), strict=True))
    for name in g_dreg:
        assert bool(torch.isfinite(g_dreg[name]).all())
        if name.startswith("decoder"):
            assert_same(g_dreg[name], g_iwae[name], f"DReG gradient of {name}")
        else:
            assert not torch.allclose(g_dreg[name], g_iwae[name])  # a different estimator of the same mean


# --- MIWAE, CIWAE, PIWAE (Rainforth et al., 2018) ---------------------------------------------------------------------
def test_miwae_is_the_mean_of_m_iwae_bounds_with_iwae_and_elbo_as_its_ends():
    model, x = make_model()
    m, k = 3, 4
    lw = seeded(log_weights, 5, model, x, k=m * k)  # (M * K, B), the same draws as inside the objective
    by_hand = torch.stack([iwae_from(lw[i * k : (i + 1) * k]) for i in range(m)]).mean(0)
    assert_same(seeded(miwae_objective, 5, model, x, m=m, k=k).loss, -by_hand, "MIWAE(3, 4)")
    iwae = seeded(iwae_bound, 5, model, x, k=k)
    assert_same(seeded(miwae_objective, 5, model, x, m=1, k=k).loss, -iwae, "MIWAE(1, K)")
    elbo = seeded(elbo_parts, 5, model, x, k=m, form="joint").elbo  # the ELBO from M samples
    assert_same(seeded(miwae_objective, 5, model, x, m=m, k=1).loss, -elbo, "MIWAE(M, 1)")


def iwae_from(lw):
    return torch.logsumexp(lw, 0) - math.log(lw.shape[0])


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_ciwae_mixes_elbo_and_iwae_from_the_same_draws(weight):
    model, x = make_model()
    out = seeded(ciwae_objective, 5, model, x, k=6, elbo_weight=weight)
    elbo = seeded(elbo_parts, 5, model, x, k=6, form="joint").elbo
    iwae = seeded(iwae_bound, 5, model, x, k=6)
    assert_same(out.loss, -(weight * elbo + (1 - weight) * iwae), f"CIWAE({weight})")
    assert_same(out.elbo, elbo, "CIWAE's reported ELBO")
    with pytest.raises(ValueError, match="elbo_weight"):
        ciwae_objective(model, x, k=2, elbo_weight=1.5)


def test_bounds_with_the_exact_posterior_are_log_px_exactly():
    """With q = p(z|x) every log-weight is log p(x): MIWAE, CIWAE and PIWAE all equal it up to rounding."""
    model, x = make_model()
    exact = model.log_marginal_exact(x)
    for out in (
        miwae_objective(model, x, m=3, k=2),
        ciwae_objective(model, x, k=3, elbo_weight=0.4),
        piwae_objective(model, x, m=3, k=2),
    ):
        assert_same(out.loss, -exact, "bound with the exact posterior")


def piwae_vae(m, k):
    torch.manual_seed(0)
    vae = VAE(
        prior=StandardNormal(2),
        encoder=torch.nn.Linear(6, 4),
        decoder=torch.nn.Linear(2, 6),
        likelihood=BernoulliLikelihood((6,)),
    ).to(DTYPE)
    x = torch.bernoulli(torch.full((5, 6), 0.5, dtype=DTYPE))
    names = [n for n, _ in vae.named_parameters()]

    def grads_of(objective, **options):
        out = seeded(objective, 3, vae, x, **options)
        return out, dict(zip(names, grads(out.loss, vae.parameters()), strict=True))

    return grads_of


def test_piwae_gives_the_encoder_miwae_and_the_decoder_iwae_mk_gradients():
    m, k = 3, 4
    grads_of = piwae_vae(m, k)
    out, g_piwae = grads_of(piwae_objective, m=m, k=k)
    ref_iwae, g_iwae = grads_of(iwae_objective, k=m * k)  # the same M * K draws
    _, g_miwae = grads_of(miwae_objective, m=m, k=k)
    assert_same(out.loss, ref_iwae.loss, "PIWAE's value is -IWAE_{MK}")
    assert_same(out.elbo, ref_iwae.elbo, "PIWAE's reported ELBO")
    for name, g in g_piwae.items():
        assert bool(torch.isfinite(g).all())
        expected = g_iwae if name.startswith("decoder") else g_miwae
        assert_same(g, expected[name], f"PIWAE gradient of {name}")
        other = g_miwae if name.startswith("decoder") else g_iwae
        assert not torch.allclose(g, other[name]), f"the test cannot tell the two gradients of {name} apart"


def test_piwae_with_one_group_is_iwae_for_both_networks():
    grads_of = piwae_vae(1, 5)
    _, g_piwae = grads_of(piwae_objective, m=1, k=5)
    _, g_iwae = grads_of(iwae_objective, k=5)
    for name, g in g_piwae.items():
        assert_same(g, g_iwae[name], f"PIWAE(1, K) gradient of {name}")


@pytest.mark.parametrize("name", ["miwae", "ciwae", "piwae"])
def test_tighter_bound_objectives_train_from_a_config(name, tmp_path):
    from vaelab.config import TrainConfig
    from vaelab.train import train

    gen = torch.Generator().manual_seed(10)
    data = torch.rand(100, 16, generator=gen)
    config = tiny_config(
        objective=name,
        k=2,
        objective_options=REQUIRED[name],
        max_steps=4,
    )
    result = train(config, data, data[:20], tmp_path / "run")
    assert result.step == 4
    with pytest.raises(ValueError, match="needs m"):
        TrainConfig(objective="miwae")
