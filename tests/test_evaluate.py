"""The headline evaluation of vaelab.evaluate against closed-form truth on the linear-Gaussian model (float64, seeds).

Every comparison uses the one rule of :mod:`vaelab.tolerance` (|estimate - exact| <= Z * stderr + rounding). The
diagnostics that look inside a model are tested in tests/test_diagnostics.py, the baselines in tests/test_baselines.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from vaelab import LinearGaussian
from vaelab.diagnostics import NotApplicable
from vaelab.estimators import ELBO_FORMS
from vaelab.evaluate import compare_latent_usage, evaluate_model, format_evaluation, latent_usage
from vaelab.report import as_json
from vaelab.tolerance import assert_within_stderr

pytestmark = pytest.mark.usefixtures("one_thread")


def test_evaluate_model_on_the_exact_posterior():
    # LinearGaussian.encode is the exact posterior: every weight is p(x), so log p-hat and every IWAE bound are exact
    # (up to rounding) and the ELBO forms agree with log p(x) within their Monte Carlo error
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = LinearGaussian.random(6, 2, generator=g)
    x = model.sample(30, generator=g)
    r = evaluate_model(model, x, k=100, iwae_ks=(1, 10, 100, 1000), progress=False)
    json.dumps(r, allow_nan=False)
    exact = model.log_marginal_exact(x).detach().double().mean().item()
    assert r["examples"] == 30 and r["log_px"]["k"] == 100
    assert_within_stderr(r["log_px"]["mean"], exact, 0.0, what="log p-hat with the exact posterior as proposal")
    for kk in ("1", "10", "100", "1000"):  # k = 1000 > 100 is drawn separately
        assert_within_stderr(r["iwae"][kk]["mean"], exact, 0.0, what=f"IWAE_{kk}")
    assert set(r["elbo"]) == set(ELBO_FORMS)
    assert_within_stderr(r["elbo"]["joint"]["mean"], exact, 0.0, what="joint-form ELBO at the posterior")
    # (the posterior gap is log p-hat minus the noisier "kl"-form ELBO, whose Monte Carlo error is not reported here)
    assert set(r["posterior_gap"]) == {"mean", "sem"}
    assert r["kl_per_dim"] is None  # q is a full-covariance Gaussian: no KL per dimension
    assert r["latent_dim"] == 2 and 0 <= r["active_units"] <= 2


def test_compare_pairs_log_px_with_the_first_run_on_the_same_examples():
    # exact posteriors make every log p-hat exact (up to rounding), so the paired difference of two linear-Gaussian
    # models on the same x is the closed-form per-example difference: its mean and its sem over examples; a run scored
    # on other examples is not paired
    from types import SimpleNamespace

    from vaelab.train import TrainConfig

    g = torch.Generator().manual_seed(3)
    a, b = LinearGaussian.random(6, 2, generator=g), LinearGaussian.random(6, 2, generator=g)
    x, other = a.sample(40, generator=g), b.sample(40, generator=g)

    def run(model):
        return SimpleNamespace(model=model, config=TrainConfig())

    rows = compare_latent_usage([("a", run(a), x), ("b", run(b), x), ("b on other", run(b), other)], k=10)
    paired = {r["run"]: r["log_px_minus_first"] for r in rows}
    with torch.no_grad():
        exact = (b.log_marginal_exact(x) - a.log_marginal_exact(x)).double()
    assert_within_stderr(paired["b"]["mean"], exact.mean(), 0.0, what="paired mean difference")
    assert_within_stderr(paired["b"]["sem"], exact.std() / math.sqrt(len(x)), 0.0, what="paired sem")
    assert paired["a"] == {"mean": 0.0, "sem": 0.0} and paired["b on other"] is None


def test_latent_usage_counts_active_units():
    # a posterior mean that varies with x in one direction only: one active unit of two
    g = torch.Generator().manual_seed(1)
    weight = torch.zeros(4, 2, dtype=torch.float64)
    weight[:, 0] = torch.randn(4, generator=g, dtype=torch.float64)
    model = LinearGaussian(weight, torch.zeros(4, dtype=torch.float64), 0.1)
    x = model.sample(200, generator=g)
    usage = latent_usage(model, x)
    assert usage["active_units"] == 1 and usage["latent_dim"] == 2
    assert usage["posterior_mean_variance"][0] > 0.01 > usage["posterior_mean_variance"][1]


def test_format_evaluation_shows_a_gap_that_does_not_apply():
    g = torch.Generator().manual_seed(2)
    model = LinearGaussian.random(5, 2, generator=g)
    x = model.sample(8, generator=g)
    r = evaluate_model(model, x, k=20, progress=False)
    reason = "q* is a Gaussian on R^d, but q lives on the positive reals"
    r |= as_json({"approximation_gap": NotApplicable(reason), "amortization_gap": NotApplicable(reason)})
    text = format_evaluation(r)
    assert text.count(f"not applicable: {reason}") == 2 and "log p(x)" in text
    assert math.isfinite(r["log_px"]["mean"])


def test_evaluate_model_binds_each_batch_to_its_own_context():
    # ClassMeanGaussian asks for labels: p(x, z | y). Its view's encoder is the exact posterior p(z|x, y), so every
    # log-weight is log p(x|y) and log p-hat equals the closed form per example, but only if each batch (7 rows, not
    # a divisor of 30) is given its own rows' labels; with shifted labels the numbers move by nats
    from tiny import ClassMeanGaussian

    torch.manual_seed(0)
    model = ClassMeanGaussian(5, 2, classes=3, seed=1, dtype=torch.float64)
    x, y = model.sample(30, classes=3, seed=2)
    exact = model.log_marginal_exact(x, y).mean().item()
    r = evaluate_model(model, x, k=50, iwae_ks=(1, 10), batch_size=7, progress=False, context={"y": y})
    assert r["examples"] == 30 and r["latent_dim"] == 2
    assert_within_stderr(r["log_px"]["mean"], exact, 0.0, what="log p-hat(x|y) with the exact posterior")
    for kk in ("1", "10"):
        assert_within_stderr(r["iwae"][kk]["mean"], exact, 0.0, what=f"IWAE_{kk} of log p(x|y)")
    assert r["kl_per_dim"] is None  # q is a full-covariance Gaussian
    wrong = evaluate_model(model, x, k=50, iwae_ks=(), batch_size=7, progress=False, context={"y": (y + 1) % 3})
    assert wrong["log_px"]["mean"] < exact - 1
    with pytest.raises(ValueError, match=r"asks for context y .* not given: pass context=\{'y': \.\.\.\}"):
        evaluate_model(model, x, k=5, progress=False)
    with pytest.raises(ValueError, match=r"context 'y' has 29 rows but x has 30"):
        evaluate_model(model, x, k=5, progress=False, context={"y": y[:29]})


# --- classification metrics -------------------------------------------------------------------------------------------
def test_classification_metrics_equal_a_hand_computation():
    from vaelab.evaluate import classification_metrics

    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45], [0.3, 0.7], [0.74, 0.26]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 0])  # right, wrong, wrong, right, right
    m = classification_metrics(probs.log(), labels, bins=4)  # bins (0, .25], (.25, .5], (.5, .75], (.75, 1]
    eps = torch.finfo(torch.float64).eps * 16  # a few roundings of numbers of order one
    assert m["accuracy"] == 3 / 5 and abs(m["error"] - 2 / 5) <= eps and m["examples"] == 5
    nll = -torch.tensor([0.9, 0.2, 0.45, 0.7, 0.74], dtype=torch.float64).log()
    assert abs(m["nll"] - nll.mean().item()) <= eps
    assert abs(m["nll_stderr"] - (nll.std() / 5**0.5).item()) <= eps
    # bin (.5, .75]: confidences .55, .7, .74, two right; bin (.75, 1]: .9, .8, one right
    ece = 3 / 5 * abs(2 / 3 - (0.55 + 0.7 + 0.74) / 3) + 2 / 5 * abs(1 / 2 - (0.9 + 0.8) / 2)
    assert abs(m["ece"] - ece) <= eps
    assert m["reliability"]["count"] == [0, 0, 3, 2]
    assert m["reliability"]["accuracy"][:2] == [None, None] and abs(m["reliability"]["accuracy"][2] - 2 / 3) <= eps
    assert abs(m["reliability"]["confidence"][3] - 0.85) <= eps
    assert m["confusion"] == [[2, 1], [1, 1]]  # rows: true class; columns: predicted
    with pytest.raises(ValueError, match=r"labels must be in 0..1, got 0..2"):
        classification_metrics(probs.log(), torch.tensor([0, 0, 2, 1, 0]))


def test_class_log_probs_batches_a_models_classify_and_refuses_a_model_without():
    from torch.distributions import Categorical

    from vaelab.evaluate import class_log_probs

    class Linear(torch.nn.Module):
        classes = 3

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 3, dtype=torch.float64)

        def classify(self, x, temperature=1.0):
            return Categorical(logits=self.net(x) / temperature)

    model, x = Linear(), torch.randn(11, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = class_log_probs(model, x, batch_size=4, temperature=2.0)
    want = (model.net(x) / 2).log_softmax(-1)
    assert got.shape == (11, 3)
    # the same float64 numbers normalised once more: a few roundings of values of order one
    assert torch.allclose(got, want, rtol=0, atol=16 * torch.finfo(got.dtype).eps * want.abs().max().item())
    with pytest.raises(ValueError, match="does not predict labels"):
        class_log_probs(torch.nn.Linear(4, 3, dtype=torch.float64), x)
