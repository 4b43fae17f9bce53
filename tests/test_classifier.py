"""The discriminative classifier p(y|x): its interface, its config, training from a config and reloading."""

from __future__ import annotations

import pytest
import torch

from vaelab.classifier import Classifier
from vaelab.config import TrainConfig, build_model
from vaelab.evaluate import class_log_probs, classification_metrics, is_latent_model

pytestmark = pytest.mark.usefixtures("one_thread")


def two_classes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 16-pixel examples of two classes (class 0 bright on the left half, class 1 on the right) and labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    probs = torch.full((2, 16), 0.1)
    probs[0, :8] = probs[1, 8:] = 0.9
    return torch.bernoulli(probs[y], generator=g), y


def config(**overrides) -> TrainConfig:
    fields = dict(
        model="classifier",
        classes=2,
        architecture_options={"hidden": [8]},
        batch_size=40,
        max_steps=30,
        validation_size=0,
        eval_examples=None,
        log_every=10,
        compile=False,
        progress=False,
        lr=1e-2,
    )
    return TrainConfig(**{**fields, **overrides})


def test_classify_gives_a_categorical_per_example_and_no_latent_interface():
    torch.manual_seed(0)
    model = build_model(config(classes=3), (1, 4, 4))
    assert isinstance(model, Classifier) and model.classes == 3 and model.targets == ("y",)
    p = model.classify(torch.rand(5, 1, 4, 4))
    assert p.batch_shape == (5,) and p.logits.shape == (5, 3)
    assert not is_latent_model(model)  # vaelab eval skips log p(x) for it
    assert class_log_probs(model, torch.rand(7, 1, 4, 4), batch_size=3).shape == (7, 3)


def test_training_objective_is_minus_log_p_y_given_x_per_example():
    torch.manual_seed(1)
    model = build_model(config(), (16,))
    x, y = two_classes(6)
    out = model.training_objective({"x": x, "y": y}, objective=None, k=1, beta=1.0)
    expected = model.classify(x).logits.log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(out.loss, -expected)
    torch.testing.assert_close(out.elbo, expected.detach())
    assert out.recon is None and out.kl is None and out.loss.requires_grad and not out.elbo.requires_grad
    scores = model.validation_scores({"x": x, "y": y}, k=1, form="kl")
    assert set(scores) == {"elbo", "accuracy"} and scores["accuracy"].shape == (6,)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"classes": 1}, "needs classes >= 2"),
        ({"k": 5}, "does not use k"),
        ({"prior": "learned-gaussian"}, "does not use prior"),
        ({"likelihood": "gaussian"}, "does not use likelihood"),
        ({"latent_dim": 3}, "does not use latent_dim"),
        ({"architecture": "conv"}, "does not use architecture"),
        ({"architecture_options": {"depth": 2}}, "unknown architecture_options 'depth'"),
    ],
)
def test_config_refuses_what_a_classifier_does_not_use(fields, message):
    with pytest.raises(ValueError, match=message):
        config(**fields)


def test_trains_from_a_config_beyond_chance_and_reloads(tmp_path):
    from vaelab.runs import load_run
    from vaelab.train import train

    x, y = two_classes(400)
    test_x, test_y = two_classes(200, seed=1)
    result = train(config(), {"x": x, "y": y}, {"x": test_x, "y": test_y}, tmp_path / "run")
    assert result.step == 30
    assert result.last_eval["accuracy"] > 0.9  # chance: 0.5 (the classes are ~8 pixels apart)
    assert result.last_eval["elbo"] > -0.3  # mean log p(y|x), nats; chance: log 1/2 = -0.69
    run = load_run(tmp_path / "run")
    assert isinstance(run.model, Classifier)
    with torch.no_grad():
        log_probs = class_log_probs(run.model, test_x)
    metrics = classification_metrics(log_probs, test_y)
    assert metrics["accuracy"] > 0.9


def test_cli_trains_evaluates_and_reports_a_classifier(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tiny import tiny_labelled_npz

    def cli(*args):
        command = [sys.executable, "-m", "vaelab", *map(str, args)]
        proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc

    data, run = tiny_labelled_npz(tmp_path / "bars.npz"), tmp_path / "run"
    flags = ["--architecture-options", '{"hidden": [16]}', "--classes", "4", "--batch-size", "20", "--lr", "0.01"]
    proc = cli("train", "--dataset", data, "--model", "classifier", *flags, "--max-steps", "30", "--validation-size",
               "40", "--no-progress", "--no-compile", "--out", run)  # fmt: skip
    assert "validation log p(y|x)" in proc.stdout and "accuracy" in proc.stdout
    proc = cli("eval", run, "--no-progress")
    assert "classification of 40 examples" in proc.stdout and "log p(x)" not in proc.stdout
    assert json.loads((run / "eval_test.json").read_text())["classification"]["accuracy"] > 0.5  # chance: 0.25
    cli("report", run, "--no-progress")  # no latent pictures for a model without latent variables
    assert (run / "report.html").is_file()
