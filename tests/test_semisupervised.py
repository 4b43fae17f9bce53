"""M2 (vaelab.semisupervised): the enumeration over y against a loop over classes, the labelled sampler of the Trainer
(every batch labelled, importance weights, exact resume), training from a config, reloading, and the command line.

Data: the 8x8 bars of tests/tiny.py (four classes, a bright band at rows 2c, 2c+1), with 8 of 480 labels kept."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny import bars, tiny_config
from vaelab.data import UNLABELLED, label_subset
from vaelab.objectives import ObjectiveOutput
from vaelab.runs import load_run
from vaelab.semisupervised import M2
from vaelab.tolerance import reduction_error_bound
from vaelab.train import TrainConfig, Trainer, build_model, train

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 4
X, Y = bars(600)
TRAIN = {"x": X[:480], "y": Y[:480]}
VALID = {"x": X[480:], "y": Y[480:]}


def m2_config(**overrides) -> TrainConfig:
    options = dict(model="m2", classes=CLASSES, labels=8, architecture_options={"hidden": [32]}, batch_size=20)
    options |= dict(epochs=100, max_steps=40, log_every=10, eval_examples=120)
    return tiny_config(**{**options, **overrides})


def mean_z_objective(model, x, *, k=1, beta=1.0, form="kl"):
    """A deterministic one-point "ELBO" at z = the mean of q: log p(x|z) + log p(z) - log q(z|x). No random draw, so
    a batched computation and a loop over classes see the same z and must agree to rounding."""
    q = model.encode(x)
    z = q.base_dist.loc
    recon = model.decode(z).log_prob(x)
    kl = q.log_prob(z) - model.prior.log_prob(z)
    elbo = recon - kl
    return ObjectiveOutput(loss=-(recon - beta * kl), elbo=elbo.detach(), recon=recon.detach(), kl=kl.detach())


def tiny_m2(seed: int = 0) -> M2:
    torch.manual_seed(seed)
    return build_model(m2_config(), (1, 8, 8)).double()


# --- the objective --------------------------------------------------------------------------------------------------
def test_unlabelled_rows_enumerate_y_exactly_as_a_loop_over_classes():
    model, x = tiny_m2(), X[:7].double()
    out = model.training_objective({"x": x, "y": torch.full((7,), UNLABELLED)}, mean_z_objective)
    # brute force: U(x) = sum_y q(y|x) L(x, y) - H(q(y|x)), L = -ELBO(x, y) - log p(y), one class at a time
    log_q = model.classify(x).logits.log_softmax(-1)  # (B, C)
    per_class = torch.stack(
        [mean_z_objective(model.given(torch.full((7,), c)), x).elbo for c in range(CLASSES)], 1
    )  # (B, C)
    neg_l = per_class - math.log(CLASSES)  # ELBO(x, y) + log p(y)
    q = log_q.exp()
    expected = -(q * neg_l).sum(1) + (q * log_q).sum(1)  # U(x)
    # the same terms summed in another order: within Higham's bound for C + 3 rounded steps per term
    bound = reduction_error_bound((q * neg_l.abs()).sum(1) + (q * log_q.abs()).sum(1), CLASSES + 3, torch.float64)
    assert ((out.loss - expected).abs() <= bound).all()
    assert ((out.elbo + expected).abs() <= bound).all()  # the reported bound is -U(x)
    assert torch.allclose(out.recon - out.kl, out.elbo, rtol=0, atol=1e-12)
    # the loss reaches the classifier (through q(y|x)) and every network
    out.loss.sum().backward()
    for name, net in (
        ("q(y|x)", model.classifier),
        ("q(z|x,y)", model.generative.encoder),
        ("p(x|y,z)", model.generative.decoder),
    ):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()), name


def test_labelled_rows_are_the_bound_on_log_p_x_y_plus_alpha_times_the_classification_loss():
    model, x, y = tiny_m2(), X[:6].double(), Y[:6]
    out = model.training_objective({"x": x, "y": y}, mean_z_objective)  # every row labelled: alpha = alpha_scale
    plain = mean_z_objective(model.given(y), x)
    nll = -model.classify(x).log_prob(y)
    torch.testing.assert_close(out.loss, plain.loss + math.log(CLASSES) + 0.1 * nll, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out.elbo, plain.elbo - math.log(CLASSES), rtol=1e-13, atol=1e-13)
    # mixed rows: each row's value is that of its own kind, in batch order; alpha = 0.1 N / N_labelled from the weights
    y_mixed = torch.tensor([UNLABELLED, 2, UNLABELLED, 0, 1, UNLABELLED])
    weight = torch.tensor([1.5, 0.1, 1.5, 0.1, 0.1, 1.5], dtype=torch.float64)  # N_l / N = 0.1 * 3/6 = 0.05
    mixed = model.training_objective({"x": x, "y": y_mixed, "weight": weight}, mean_z_objective)
    assert model.alpha({"y": y_mixed, "weight": weight}) == pytest.approx(0.1 / 0.05, rel=1e-12)
    alone = model.training_objective({"x": x[[1]], "y": y_mixed[[1]]}, mean_z_objective)
    nll_1 = -model.classify(x[[1]]).log_prob(y_mixed[[1]])
    torch.testing.assert_close(mixed.loss[1], (alone.loss - 0.1 * nll_1 + 2.0 * nll_1)[0], rtol=1e-12, atol=1e-12)
    unlabelled = model.training_objective({"x": x[[0]], "y": y_mixed[[0]]}, mean_z_objective)
    torch.testing.assert_close(mixed.loss[0], unlabelled.loss[0], rtol=1e-12, atol=1e-12)


def test_the_elbo_objective_runs_enumerated_and_its_marginal_bound_is_below_log_p_x_y_summed():
    # with the real (random) ELBO: shapes, finiteness, and the marginal bound <= logsumexp_y of the labelled bounds
    # plus the entropy gap: -U(x) = sum_y q (b_y) + H(q) <= log sum_y exp(b_y) for any q (Gibbs' inequality)
    from vaelab.objectives import elbo_objective

    model, x = tiny_m2(), X[:9].double()
    torch.manual_seed(1)
    out = model.training_objective({"x": x, "y": torch.full((9,), UNLABELLED)}, elbo_objective, k=3, form="kl")
    assert out.loss.shape == out.elbo.shape == out.recon.shape == out.kl.shape == (9,)
    assert bool(torch.isfinite(out.loss).all())
    with torch.no_grad():
        b = torch.stack([mean_z_objective(model.given(torch.full((9,), c)), x).elbo for c in range(CLASSES)], 1)
        b = b - math.log(CLASSES)
        q = model.classify(x).probs
        bound = (q * b).sum(1) - (q * q.log()).sum(1)
        assert (bound <= torch.logsumexp(b, 1) + 1e-12).all()


def test_bad_labels_and_options_are_refused_in_one_line():
    model = tiny_m2()
    with pytest.raises(ValueError, match=r"labels must be classes 0\.\.3 or -1 \(unlabelled\), got 0\.\.4"):
        model.training_objective({"x": X[:2].double(), "y": torch.tensor([0, 4])}, mean_z_objective)
    with pytest.raises(ValueError, match="needs classes >= 2"):
        m2_config(classes=1)
    with pytest.raises(ValueError, match="labelled_share must be a number in"):
        m2_config(model_options={"labelled_share": 1.0})
    with pytest.raises(ValueError, match="unknown model_options 'alpha' for model 'm2'; it takes alpha_scale"):
        m2_config(model_options={"alpha": 1.0})
    with pytest.raises(ValueError, match="the 'vae' model does not train on partly labelled data"):
        TrainConfig(labels=8)
    with pytest.raises(ValueError, match="which architecture 'conv' cannot take"):
        m2_config(architecture="conv")


# --- the labelled sampler -------------------------------------------------------------------------------------------
def test_every_batch_holds_labelled_rows_with_weights_that_make_the_mean_unbiased(tmp_path):
    trainer = Trainer(m2_config(), TRAIN, None, tmp_path)
    y = trainer.train_data["y"]
    kept = (y != UNLABELLED).nonzero()[:, 0]
    assert torch.equal(kept, label_subset(TRAIN["y"], 8, seed=0))  # config.labels=8: the balanced subset, seed 0
    drawn_labelled, drawn_unlabelled = [], []
    for step in range(48):  # 2 epochs of 24 steps
        batch = trainer._batch(step)
        labelled = batch["y"] != UNLABELLED
        assert labelled[:10].all() and not labelled[10:].any()  # 10 of 20 rows labelled in every batch
        w = batch["weight"]
        assert torch.allclose(w[:10], torch.tensor((8 / 480) / 0.5)) and torch.allclose(w[10:], torch.tensor(472 / 240))
        assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-6)  # the weights of a batch average to 1
        drawn_labelled.append(trainer._stream(0, step))
        drawn_unlabelled.append(trainer._stream(1, step))
    assert torch.equal(trainer._batch(7)["x"], trainer._batch(7)["x"])  # a pure function of the step
    # each pool is gone through in whole passes (permutations): every labelled row 60 times in 480 draws, every
    # unlabelled row at most once in the first 472 draws
    assert torch.bincount(torch.cat(drawn_labelled), minlength=480)[kept].tolist() == [60] * 8
    first_pass = torch.cat(drawn_unlabelled)[:472]
    assert len(first_pass.unique()) == 472 and bool((y[first_pass] == UNLABELLED).all())
    trainer._release()


def test_a_fully_labelled_m2_run_uses_uniform_batches(tmp_path):
    trainer = Trainer(m2_config(labels=None), TRAIN, None, tmp_path)
    batch = trainer._batch(0)
    assert "weight" not in batch and trainer._pools is None and bool((batch["y"] >= 0).all())
    trainer._release()


def test_resume_with_the_labelled_sampler_is_bit_identical(tmp_path):
    config = m2_config(max_steps=36, checkpoint_every=12, eval_every=12)
    train(config, TRAIN, VALID, tmp_path / "reference")
    resumed = tmp_path / "resumed"  # the reference as a crash after its step-12 checkpoint would have left it
    shutil.copytree(tmp_path / "reference", resumed)
    for later in ("step_00000024", "step_00000036"):
        shutil.rmtree(resumed / "checkpoints" / later)
    (resumed / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "step_00000012"}))
    (resumed / "model.safetensors").unlink()
    assert train(config, TRAIN, VALID, resumed, resume=True).step == 36
    got, expected = load_file(resumed / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in got:
        assert torch.equal(got[name], expected[name]), name


def test_labels_need_a_model_that_uses_them_and_labelled_training_data(tmp_path):
    with pytest.raises(ValueError, match="the training data have none"):
        Trainer(m2_config(), TRAIN["x"], None, tmp_path / "a")
    with pytest.raises(ValueError, match="need 121 of each class, but class"):
        Trainer(m2_config(labels=484), TRAIN, None, tmp_path / "b")


# --- training, reloading, the command line ---------------------------------------------------------------------------
def test_m2_learns_the_classes_from_eight_labels_and_reloads(tmp_path):
    result = train(m2_config(max_steps=300, eval_every=300), TRAIN, VALID, tmp_path)
    assert result.step == 300
    assert result.last_eval["accuracy"] >= 0.9  # measured 1.0 (chance: 0.25)
    assert math.isfinite(result.last_eval["elbo"])
    run = load_run(tmp_path)
    assert isinstance(run.model, M2) and run.model.classes == CLASSES
    with torch.no_grad():
        predicted = run.model.classify(VALID["x"]).logits.argmax(-1)
    assert float((predicted == VALID["y"]).double().mean()) == pytest.approx(result.last_eval["accuracy"])


def _labelled_npz(path: Path) -> Path:
    """The bars with their labels as an ``.npz`` (x, y and a test split), uint8 0/255."""
    x, y = bars(600, seed=1)
    images = x.numpy().astype(np.uint8) * 255
    np.savez(path, x=images[:480], y=y[:480].numpy(), x_test=images[480:], y_test=y[480:].numpy())
    return path


def _vaelab(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: 4x less CPU for these tiny networks on a shared CPU
    return subprocess.run(
        [sys.executable, "-m", "vaelab", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


M2_FLAGS = [
    "--model", "m2", "--classes", "4", "--labels", "8", "--architecture-options",
    '{"hidden": [32]}', "--latent-dim", "2", "--batch-size", "20", "--validation-size", "60", "--max-steps", "150",
    "--eval-k", "2", "--eval-examples", "60", "--no-progress", "--no-compile",
]  # fmt: skip


def test_cli_trains_m2_with_labels_and_eval_prints_the_error_rate(tmp_path, capsys):
    data = _labelled_npz(tmp_path / "bars.npz")
    run = tmp_path / "run"
    proc = _vaelab("train", "--dataset", str(data), *M2_FLAGS, "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 150 steps" in proc.stdout and "accuracy" in proc.stdout
    proc = _vaelab("eval", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(error " in proc.stdout and "classification of 120 examples" in proc.stdout
    assert "log p(x) = log sum_c p(x|c) p(c)" in proc.stdout  # the generative part's marginal, y summed out
    saved = json.loads((run / "eval_test.json").read_text())
    assert saved["classification"]["error"] <= 0.1  # measured 0.0
    marginal = saved["marginal"]  # log p(x|y) - log p(x) = log p(y|x) - log p(y) <= log 4 for every example
    assert math.isfinite(marginal["log_px"]["mean"]) and 0 < marginal["label_nats"]["mean"] <= math.log(4) + 1e-9
    # the other commands: samples from p(x | y) class by class, a report of the classifier and the training curves,
    # and a one-line refusal to reconstruct (no encoder of x alone)
    from vaelab.cli import main

    assert main(["sample", str(run), "--n", "8"]) == 0 and (run / "samples.png").is_file()
    assert main(["report", str(run), "--k", "10", "--examples", "40", "--fast", "--no-progress"]) == 0
    assert (run / "report.html").is_file()
    assert main(["reconstruct", str(run)]) == 2
    assert "has no encoder of x alone" in capsys.readouterr().err


def test_cli_label_errors_are_one_line(tmp_path, capsys):
    from vaelab.cli import main

    data = _labelled_npz(tmp_path / "bars.npz")
    np.save(tmp_path / "unlabelled.npy", np.load(data)["x"])
    cases = [
        (["--dataset", str(data), *M2_FLAGS, "--labels", "1000"], "1000 labelled examples need 250 of each"),
        (["--dataset", str(tmp_path / "unlabelled.npy"), *M2_FLAGS], "--model m2 trains on labels, and unlabelled has"),
        (["--dataset", str(data), "--labels", "8", "--no-progress"], "the 'vae' model does not train on partly"),
    ]
    for flags, message in cases:
        assert main(["train", *flags, "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "never").exists()
