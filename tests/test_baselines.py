"""The baselines registry: pPCA's exact held-out log p(x), and applicability read from the decoder's support."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vaelab import LinearGaussian
from vaelab.baselines import BASELINES, density_on_real_space, ppca, run_baselines
from vaelab.diagnostics import NotApplicable
from vaelab.hierarchical import HierarchicalVAE
from vaelab.likelihoods import LIKELIHOODS
from vaelab.models import VAE
from vaelab.nets import mlp_pair
from vaelab.priors import StandardNormal
from vaelab.report import as_json
from vaelab.tolerance import assert_within_stderr


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
    assert set(results) == {f"{name}_baseline" for name in BASELINES}
    assert isinstance(results["ppca_baseline"], NotApplicable) and not loads
    assert as_json(results)["ppca_baseline"].startswith("not applicable: the model's p(x|z) has support")
    results = run_baselines(tiny_vae("gaussian"), torch.randn(4, 6), train_x, latent_dim=2)
    assert len(loads) == 1 and results["ppca_baseline"]["examples"] == 4 and results["ppca_baseline"]["latent_dim"] == 2
