"""The deterministic autoencoder of the ladder: a VAE's networks trained on reconstruction alone; no log p(x)."""

from __future__ import annotations

import pytest
import torch

from tiny import bars, tiny_run
from vaelab.autoencoder import NO_LIKELIHOOD, autoencoder_row, fit_autoencoder, reconstruction_nll
from vaelab.baselines import BINARY, LadderData, format_ladder, parzen_rows, score_run
from vaelab.config import TrainConfig, build_model
from vaelab.tolerance import Z_TOLERANCE


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    return tiny_run(tmp_path_factory.mktemp("ae_run"), latent_dim=2, steps=60)


@pytest.fixture(scope="module")
def data():
    train, valid, test = (bars(n, seed=s)[0].reshape(n, -1).double() for n, s in ((300, 1), (60, 2), (60, 3)))
    return LadderData(train, valid, test, space=BINARY, split="bars test[:60]", data_shape=(1, 8, 8))


def test_training_on_reconstruction_alone_lowers_it_and_leaves_the_given_model_alone(run, data):
    torch.manual_seed(0)
    fresh = build_model(run.config, (1, 8, 8))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    train = data.train.reshape(-1, 1, 8, 8).float()
    with torch.no_grad():
        start = reconstruction_nll(fresh, train).mean().item()
    ae = fit_autoencoder(fresh, train, steps=150, batch_size=50, components=3, seed=0)
    with torch.no_grad():
        end = reconstruction_nll(ae.model, train).mean().item()
    assert end < start - 5, (start, end)  # 64 pixels from ~44 nats (p = 1/2 each) down
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())  # trained a copy
    images = ae.sample(7, seed=1)
    assert images.shape == (7, 1, 8, 8) and bool(((images >= 0) & (images <= 1)).all())
    torch.testing.assert_close(ae.sample(7, seed=1), images)  # seeded
    assert ae.codes.n_components == 3 and ae.steps == 150


def test_the_ladder_shows_its_reconstruction_error_and_never_a_log_likelihood(run, data):
    row, _ = autoencoder_row("tiny", run, data, steps=100, seed=0)
    assert row["not_comparable"] == NO_LIKELIHOOD and "log_px" not in row
    with torch.no_grad():  # the VAE's number is its own reconstruction error on the same test images
        theirs = reconstruction_nll(run.model, data.test.reshape(-1, 1, 8, 8).float())
    assert row["vae_reconstruction"]["mean"] == pytest.approx(theirs.double().mean().item(), rel=1e-12)
    text = format_ladder([row], BINARY, data.split)
    assert "not comparable: no p(x)" in text and f"{row['reconstruction']['mean']:.2f}" in text


def test_autoencoder_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="no encode/decode"):
        fit_autoencoder(torch.nn.Linear(2, 2), torch.zeros(200, 2))
    with pytest.raises(ValueError, match="at least 100 training examples"):
        fit_autoencoder(build_model(TrainConfig(latent_dim=2), (4,)), torch.zeros(5, 4))


def test_parzen_windows_of_model_draws_fall_far_below_the_models_log_px(run, data):
    # Theis, van den Oord & Bethge 2016: a KDE of a model's draws is a poor estimate of the model's log-likelihood
    own = score_run("tiny", run, data, k=200, dataset=run.config.dataset)
    rows = parzen_rows("tiny", run, data, samples=(10, 100), seed=0)
    assert [r["detail"]["train_examples"] for r in rows] == [10, 100]
    assert all(r["split"] == data.split and r["space"] == BINARY for r in rows)  # on the ladder, comparable
    for r in rows:  # far below: by many standard errors of either mean
        gap, sem = own["log_px"]["mean"] - r["log_px"]["mean"], max(r["log_px"]["sem"], own["log_px"]["sem"])
        assert gap > Z_TOLERANCE * sem, (r["log_px"], own["log_px"])
    again = parzen_rows("tiny", run, data, samples=(10,), seed=0)
    assert again[0]["log_px"] == rows[0]["log_px"]  # the first 10 of 100 draws are the 10 draws: nested, seeded
    with pytest.raises(ValueError, match="draws >= 1"):
        parzen_rows("tiny", run, data, samples=(0,))
