"""The baselines registry: pPCA's exact held-out log p(x), and applicability read from the decoder's support."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.distributions import Normal

from vaelab import LinearGaussian
from vaelab.baselines import (
    BASELINES,
    BINARY,
    DEQUANTIZED,
    BernoulliMixture,
    LadderData,
    LadderSettings,
    bits_per_dim,
    check_comparable,
    density_on_real_space,
    dequantize,
    fit_bernoulli_mixture,
    fit_factor_analysis,
    format_ladder,
    kde_log_density,
    ladder_row,
    ppca,
    run_baselines,
    run_ladder,
    select_bandwidth,
)
from vaelab.diagnostics import NotApplicable
from vaelab.hierarchical import HierarchicalVAE
from vaelab.likelihoods import LIKELIHOODS
from vaelab.models import VAE
from vaelab.nets import mlp_pair
from vaelab.priors import StandardNormal
from vaelab.report import as_json
from vaelab.tolerance import FLOAT_SLACK, Z_TOLERANCE, assert_within_stderr, reduction_error_bound, rounding_gamma


def tiny_vae(likelihood: str):
    encoder, decoder = mlp_pair((6,), 2, hidden=(8,))
    return VAE(prior=StandardNormal(2), encoder=encoder, decoder=decoder, likelihood=LIKELIHOODS[likelihood]((6,)))


def test_ppca_recovers_the_generating_log_likelihood():
    g = torch.Generator().manual_seed(8)
    truth = LinearGaussian.random(8, 3, generator=g)
    n_train = 20000
    train, test = truth.sample(n_train, generator=g), truth.sample(2000, generator=g)
    # images are flattened: hand the data over as [N, 2, 4]
    r = ppca(train.reshape(-1, 2, 4), test.reshape(-1, 2, 4), latent_dim=3)
    json.dumps(as_json(r), allow_nan=False)
    assert r["data_dim"] == 8 and r["latent_dim"] == 3 and "binarized" in r["note"]
    fitted = r["test_log_px"].value
    true = truth.log_marginal_exact(test).detach()
    # paired over the same test examples; a maximum-likelihood fit loses about (#params) / (2 N) nats per held-out
    # example (33 parameters: 8*3 + 8 + 1), so allow twice that on top of the stderr of the paired difference
    diff = fitted - true
    slack = (8 * 3 + 8 + 1) / n_train
    deviation = diff.mean()
    shrunk = deviation.sign() * (deviation.abs() - slack).clamp_min(0)
    assert_within_stderr(shrunk, 0.0, diff.std() / math.sqrt(len(diff)), what=f"pPCA fit (after {slack} nats)")
    assert r["noise_var"] == pytest.approx(truth.noise_var.item(), rel=0.05)
    with pytest.raises(ValueError, match="differ in size: 8 vs 4 values"):
        ppca(train, test[:, :4], latent_dim=3)


@pytest.mark.parametrize(
    "likelihood, applies",
    [("gaussian", True), ("gaussian-learned", True), ("bernoulli", False), ("continuous-bernoulli", False)],
)
def test_ppca_applies_exactly_to_densities_on_real_space(likelihood, applies):
    torch.manual_seed(0)
    model = tiny_vae(likelihood)
    reason = BASELINES["ppca"].applies_to(model, torch.zeros(3, 6))
    assert (reason is None) == applies, reason
    if not applies:
        assert "not R^D" in reason and str(model.decode(torch.zeros(1, 2)).support.base_constraint) in reason


def test_applicability_reads_the_support_not_a_name():
    # the linear-Gaussian model (a density on R^D) and the two-layer Bernoulli model, neither built from a config name
    g = torch.Generator().manual_seed(1)
    assert density_on_real_space(LinearGaussian.random(5, 2, generator=g), torch.zeros(2, 5)) is None
    torch.manual_seed(1)
    reason = density_on_real_space(HierarchicalVAE.iwae_2layer(), torch.zeros(2, 784))
    assert reason is not None and "Boolean" in reason


def test_run_baselines_loads_training_data_only_when_one_applies():
    torch.manual_seed(2)
    loads = []

    def train_x():
        loads.append(1)
        return torch.randn(50, 6)

    results = run_baselines(tiny_vae("bernoulli"), torch.zeros(4, 6), train_x, latent_dim=2)
    assert set(results) == {f"{name}_baseline" for name, b in BASELINES.items() if b.applies_to is not None}
    assert isinstance(results["ppca_baseline"], NotApplicable) and not loads
    assert as_json(results)["ppca_baseline"].startswith("not applicable: the model's p(x|z) has support")
    results = run_baselines(tiny_vae("gaussian"), torch.randn(4, 6), train_x, latent_dim=2)
    assert len(loads) == 1 and results["ppca_baseline"]["examples"] == 4 and results["ppca_baseline"]["latent_dim"] == 2


# --- the ladder ---------------------------------------------------------------------------------------------------
def ladder(train, valid, test, space=BINARY, split="tiny test"):
    flat = [x.reshape(len(x), -1).double() for x in (train, valid, test)]
    return LadderData(*flat, space=space, split=split, data_shape=tuple(train.shape[1:]))


def random_bits(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, d), 0.3, dtype=torch.float64), generator=g)


def test_gaussian_kde_equals_brute_force():
    g = torch.Generator().manual_seed(3)
    train, x = (
        torch.randn(37, 5, generator=g, dtype=torch.float64),
        torch.randn(11, 5, generator=g, dtype=torch.float64),
    )
    h = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)
    streamed = kde_log_density(x, train, h, "gaussian")
    brute = torch.stack([Normal(train, s).log_prob(x[:, None]).sum(-1).logsumexp(1) - math.log(37) for s in h])
    # streamed exponents come from |x|^2 + |c|^2 - 2 x.c, brute force from sum (x - c)^2: each within gamma_{D+3} of
    # the exact squared distance times the sum of the absolute terms; logsumexp is 1-Lipschitz in the max norm
    abs_terms = x.square().sum(1)[:, None] + train.square().sum(1) + 2 * x.abs() @ train.abs().T  # [B, n]
    bound = reduction_error_bound(abs_terms, 5 + 3).amax(1) / (2 * h[:, None] ** 2)
    assert ((streamed - brute).abs() <= bound + 64 * torch.finfo(torch.float64).eps * brute.abs()).all()


def test_bernoulli_kde_is_the_uniform_mixture_with_one_component_per_training_point():
    g = torch.Generator().manual_seed(4)
    train, x = random_bits(29, 12, g), random_bits(9, 12, g)
    h = torch.tensor([0.05, 0.2, 0.45], dtype=torch.float64)
    streamed = kde_log_density(x, train, h, "bernoulli")
    differing = (x[:, None] != train).sum(-1).double()  # [B, n] Hamming distances, exact
    brute = torch.stack([(differing * s.log() + (12 - differing) * torch.log1p(-s)).logsumexp(1) for s in h])
    brute = brute - math.log(29)
    mixtures = torch.stack(
        [
            BernoulliMixture(torch.full((29,), -math.log(29), dtype=torch.float64), (train - s).abs()).log_prob(x)
            for s in h
        ]
    )
    # integer distances: only the rounding of a few logs, exps and sums of ~n terms of size <= |value|
    tol = 64 * 29 * torch.finfo(torch.float64).eps * brute.abs().clamp_min(1)
    assert ((streamed - brute).abs() <= tol).all() and ((mixtures - streamed).abs() <= tol).all()


@pytest.mark.parametrize("kernel, truth", [("gaussian", 0.3), ("bernoulli", 0.1)])
def test_bandwidth_selection_recovers_the_bandwidth_that_generated_the_data(kernel, truth):
    # validation data drawn from the KDE of the training points itself with bandwidth `truth`: the expected validation
    # log-likelihood is maximal there (-KL to the truth + const), and the maximizer of the mean over M points is off by
    # about 1 / sqrt(M I), I the Fisher information per point (the mean squared score at the truth)
    g = torch.Generator().manual_seed(5)
    n, d, m = 40, 6, 3000
    if kernel == "gaussian":
        train = 3 * torch.randn(n, d, generator=g, dtype=torch.float64)
        valid = train[torch.randint(n, (m,), generator=g)] + truth * torch.randn(m, d, generator=g, dtype=torch.float64)
    else:
        train = random_bits(n, d * 4, g)
        flips = torch.bernoulli(torch.full((m, d * 4), truth, dtype=torch.float64), generator=g)
        valid = (train[torch.randint(n, (m,), generator=g)] - flips).abs()
    chosen, tried = select_bandwidth(train, valid, kernel)
    delta = 1e-4 * truth  # central difference: the score, per validation point
    plus_minus = kde_log_density(valid, train, [truth + delta, truth - delta], kernel)
    score = (plus_minus[0] - plus_minus[1]) / (2 * delta)
    stderr = 1 / math.sqrt(m * score.square().mean().item())
    last = [t["bandwidth"] for t in tried[-9:]]  # the finest grid: its maximizer is within one step of the optimum
    step = chosen * (last[1] / last[0] - 1)
    assert abs(chosen - truth) <= Z_TOLERANCE * stderr + step, (chosen, truth, stderr, step)


def test_em_never_lowers_the_penalized_log_likelihood():
    from tiny import bars

    x = bars(300, seed=6)[0].reshape(300, -1).double()
    _, history = fit_bernoulli_mixture(x, 4, iterations=60, tol=-math.inf, seed=1)
    steps = torch.tensor(history).diff()
    # each value is a sum of n (D + K)-term dot products and logsumexps, divided by n: rounding at most gamma of that
    allowed = 2 * rounding_gamma(300 * (64 + 4 + 2), torch.float64) * max(abs(v) for v in history)
    assert len(history) == 61 and steps.min() >= -allowed, steps.min()
    assert history[-1] > history[0] + 1  # EM did climb


def lin_gauss_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    truth = LinearGaussian.random(7, 2, noise="diagonal", generator=g)
    return truth.sample(n, generator=g), truth.sample(50, generator=g)


def assert_same_gaussian_log_density(ours, theirs, cov):
    # two factorizations of one Gaussian log-density: each within ~gamma_{D^2} cond(C) of the terms' magnitude
    evals = torch.linalg.eigvalsh(cov)
    bound = (
        rounding_gamma(7 * 7, torch.float64) * (evals.max() / evals.min()) * (ours.abs() + 7 * math.log(2 * math.pi))
    )
    assert ((ours - theirs).abs() <= 2 * bound).all(), (ours - theirs).abs().max()


def test_ppca_matches_scikit_learn():
    from sklearn.decomposition import PCA

    train, test = lin_gauss_data(400, 9)
    model = LinearGaussian.fit_ppca(train, 2)
    # scikit-learn's PCA divides the covariance by n - 1, the maximum-likelihood fit by n: shrink the data about its
    # mean by sqrt((n - 1) / n) so that its unbiased covariance is our biased one, then the two fits are one model
    mean = train.mean(0)
    shrunk = mean + (train - mean) * math.sqrt(399 / 400)
    theirs = torch.from_numpy(PCA(2).fit(shrunk.numpy()).score_samples(test.numpy()))
    assert_same_gaussian_log_density(
        model.log_marginal_exact(test).detach(), theirs, model.marginal().covariance_matrix
    )


def test_factor_analysis_matches_scikit_learn():
    from sklearn.decomposition import FactorAnalysis

    train, test = lin_gauss_data(400, 10)
    model = fit_factor_analysis(train, 2, seed=0)
    theirs = torch.from_numpy(FactorAnalysis(2, random_state=0).fit(train.numpy()).score_samples(test.numpy()))
    assert_same_gaussian_log_density(
        model.log_marginal_exact(test).detach(), theirs, model.marginal().covariance_matrix
    )


def test_a_uniform_density_on_the_unit_cube_is_8_bits_per_dim():
    assert bits_per_dim(0.0, 784) == 8.0  # log p = 0: uniform on [0,1]^D, i.e. P = 256^-D on the pixels
    assert bits_per_dim(torch.zeros(3, dtype=torch.float64), 5).tolist() == [8.0] * 3
    # a discrete model of the pixels with log P = -D log 256 + log p: the same 8 bits
    d = 10
    assert bits_per_dim(-d * math.log(256) + d * math.log(256), d) == 8.0
    x = torch.tensor([[0, 255, 17]], dtype=torch.uint8)
    u = dequantize(x, seed=0)
    assert ((u >= x / 256) & (u < (x.double() + 1) / 256)).all()
    with pytest.raises(ValueError, match="8-bit"):
        dequantize(x.float())


def test_the_table_refuses_to_put_incomparable_numbers_side_by_side():
    g = torch.Generator().manual_seed(11)
    binary = ladder(*(random_bits(n, 6, g) for n in (30, 10, 10)))
    grey = ladder(*(torch.rand(n, 6, generator=g) for n in (30, 10, 10)), space=DEQUANTIZED)
    other_split = ladder(binary.train, binary.valid, binary.test, split="other test")
    rows = [
        ladder_row("a", "baseline", binary, {"mean": -4.0, "sem": 0.1}),
        ladder_row("b", "baseline", grey, {"mean": 123.456, "sem": 0.1}),
        ladder_row("c", "baseline", other_split, {"mean": 654.321, "sem": 0.1}),
    ]
    check_comparable(rows[:1])
    for row in rows[1:]:
        with pytest.raises(ValueError, match="cannot stand beside a"):
            check_comparable([rows[0], row])
    text = format_ladder(rows, BINARY, "tiny test")
    assert "-4.00" in text and "123.4" not in text and "654.3" not in text and text.count("not comparable") == 2
    assert rows[1]["bits_per_dim"]["mean"] == bits_per_dim(123.456, 6)


def test_bad_input_gets_one_clear_error():
    g = torch.Generator().manual_seed(12)
    grey = ladder(*(torch.rand(n, 6, generator=g) for n in (30, 10, 10)), space=DEQUANTIZED)
    binary = ladder(*(random_bits(n, 6, g) for n in (30, 10, 10)))
    with pytest.raises(ValueError, match="bernoulli-mixture models binary data, not dequantized"):
        run_ladder(grey, ["bernoulli-mixture"])
    with pytest.raises(ValueError, match=r"bandwidths must lie in \(0, inf\), got \[0.0, -1.0\]"):
        run_ladder(grey, ["kde-gaussian"], LadderSettings(grids={"bandwidth": (0.0, -1.0, 0.5)}))
    with pytest.raises(ValueError, match=r"bandwidths must lie in \(0, 1.0\)"):
        kde_log_density(binary.test, binary.train, [1.0], "bernoulli")
    with pytest.raises(ValueError, match="K = 31 mixture components need at least K training points, got 30"):
        run_ladder(binary, ["bernoulli-mixture"], LadderSettings(grids={"components": (2, 31)}))
    with pytest.raises(ValueError, match="K = 31 mixture components"):
        run_ladder(grey, ["gmm-diag"], LadderSettings(grids={"components": (31,)}))
    with pytest.raises(ValueError, match="unknown ladder baseline 'nade'"):
        run_ladder(binary, ["nade"])


def test_the_ladder_on_tiny_data_tunes_on_validation_and_scores_every_test_example():
    g = torch.Generator().manual_seed(13)
    binary = ladder(*(random_bits(n, 8, g) for n in (60, 20, 15)))
    rows = run_ladder(binary, settings=LadderSettings(train_examples=40, grids={"components": (1, 3)}))
    assert [r["name"] for r in rows] == ["kde-bernoulli", "bernoulli-mixture"]
    for r in rows:
        assert r["detail"]["train_examples"] == 40 and math.isfinite(r["log_px"]["mean"]) and r["fit_seconds"] >= 0
        best = max(t["valid_log_px"] for t in r["detail"]["validation"])
        assert best == max(r["detail"]["validation"], key=lambda t: t["valid_log_px"])["valid_log_px"]
    assert [e["train_examples"] for e in rows[0]["detail"]["subsample_effect"]] == [2, 10, 40]
    json.dumps(as_json(rows), allow_nan=False)


DRAWS = 20000


@pytest.mark.parametrize("name", ["kde-bernoulli", "bernoulli-mixture"])
def test_binary_baseline_draws_follow_the_mass_function_it_scores(name):
    """Draws of the fitted model, counted in each of the 2^5 cells, against n p(cell) from its own log_prob."""
    g = torch.Generator().manual_seed(21)
    data = ladder(*(random_bits(n, 5, g) for n in (60, 20, 20)))
    grids = {"bandwidth": (0.2,), "components": (3,)}
    fitted = BASELINES[name].ladder(data, grids[BASELINES[name].grid_name], LadderSettings())["model"]
    cells = torch.tensor([[(i >> d) & 1 for d in range(5)] for i in range(32)], dtype=torch.float64)
    p = fitted.log_prob(cells).exp()
    # a mass function: it sums to 1 up to the rounding of 32 exponentials and their sum
    assert abs(p.sum().item() - 1) <= rounding_gamma(64, torch.float64) * FLOAT_SLACK
    draws = fitted.sample(DRAWS, torch.Generator().manual_seed(0))
    assert draws.shape == (DRAWS, 5) and bool(((draws == 0) | (draws == 1)).all())
    counts = torch.bincount((draws * 2 ** torch.arange(5)).sum(1).long(), minlength=32).double()
    assert_within_stderr(counts, DRAWS * p, (DRAWS * p * (1 - p)).sqrt(), what=f"{name} cell counts")


@pytest.mark.parametrize("name", ["kde-gaussian", "gmm-diag", "gmm-full", "ppca", "factor-analysis"])
def test_continuous_baseline_draws_follow_the_density_it_scores(name):
    """Draws of the fitted 2-D model, counted in 16 boxes, against n P(box) from its own log_prob integrated by the
    midpoint rule on [-8, 8]^2; the rule's error is bounded by comparing two grid steps."""
    g = torch.Generator().manual_seed(22)

    def blobs(n):  # two correlated Gaussian blobs
        side = torch.randint(2, (n, 1), generator=g).double() * 2 - 1
        z = torch.randn(n, 2, generator=g, dtype=torch.float64)
        return side * torch.tensor([1.5, 0.5]) + z @ torch.tensor([[0.6, 0.3], [0.0, 0.5]], dtype=torch.float64)

    data = ladder(blobs(200), blobs(50), blobs(50), space=DEQUANTIZED)
    grids = {"bandwidth": (0.4,), "components": (2,), "latent_dim": (1,)}
    fitted = BASELINES[name].ladder(data, grids[BASELINES[name].grid_name], LadderSettings())["model"]
    edges = torch.tensor([-8.0, -1.0, 0.0, 1.0, 8.0], dtype=torch.float64)

    def box_probabilities(step: float) -> torch.Tensor:
        mid = torch.arange(-8 + step / 2, 8, step, dtype=torch.float64)
        x, y = torch.meshgrid(mid, mid, indexing="ij")
        density = fitted.log_prob(torch.stack([x.reshape(-1), y.reshape(-1)], 1)).exp().reshape(x.shape)
        bx, by = (torch.bucketize(m.contiguous(), edges[1:-1]) for m in (x, y))
        return torch.zeros(16, dtype=torch.float64).index_add_(0, (4 * bx + by).reshape(-1), density.reshape(-1))

    fine, coarse = box_probabilities(0.01) * 0.01**2, box_probabilities(0.02) * 0.02**2
    integration_error = 4 * (fine - coarse).abs()  # the midpoint rule's O(step^2) error: |fine - coarse| = 3 err(fine)
    draws = fitted.sample(DRAWS, torch.Generator().manual_seed(0))
    assert draws.shape == (DRAWS, 2) and bool((draws.abs() < 8).all())
    bx, by = (torch.bucketize(draws[:, i].contiguous(), edges[1:-1]) for i in (0, 1))
    counts = torch.bincount(4 * bx + by, minlength=16).double()
    stderr = (DRAWS * fine * (1 - fine)).sqrt() + DRAWS * integration_error / Z_TOLERANCE
    assert_within_stderr(counts, DRAWS * fine, stderr, what=f"{name} box counts")
