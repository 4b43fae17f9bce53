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
from vaelab.evaluate import evaluate_model, format_evaluation, latent_usage
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
