"""Conditional models p(x|y): the unchanged estimators on an exactly solvable one, the generative classifier, the cVAE.

The exactly solvable model is pPCA with a class-dependent mean, z ~ N(0, I), x | z, y ~ N(W z + b + m_y, s^2 I):
p(x|y) = N(b + m_y, W W^T + s^2 I), p(x) the mixture over y, p(y|x) by Bayes' rule, and p(z|x, y) the pPCA
posterior of x - m_y. Its views reuse :class:`vaelab.models.LinearGaussian` (the closed forms) on x - m_y.

Numerics tests run in float64 with fixed seeds; estimates are compared with the exact values by the one rule of
:mod:`vaelab.tolerance` (4.5 standard errors of the estimate plus rounding slack).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, constraints

from tiny import tiny_config
from vaelab.conditional import ConditionalVAE, class_log_likelihoods, generative_log_probs
from vaelab.config import TrainConfig, build_model
from vaelab.estimators import elbo_integrands, elbo_parts, log_marginal, pareto_k_threshold
from vaelab.evaluate import class_log_probs
from vaelab.models import LinearGaussian, bind
from vaelab.tolerance import assert_within_stderr

DTYPE = torch.float64
D, LATENT, C = 5, 2, 3

pytestmark = pytest.mark.usefixtures("one_thread")


class ClassShiftedPPCA(nn.Module):
    """z ~ N(0, I_d), x | z, y ~ N(W z + b + m_y, s^2 I_D), y one of ``classes``; ``given(y)`` is p(x, z | y).

    ``q_shift`` / ``q_inflate`` move and widen the encoder away from the exact posterior (0 and 1: exact)."""

    context = ("y",)

    def __init__(self, seed: int = 0, q_shift: float = 0.0, q_inflate: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(D, LATENT, generator=g, dtype=DTYPE)
        self.base = LinearGaussian(weight, torch.randn(D, generator=g, dtype=DTYPE), 0.5)
        self.shifts = nn.Parameter(1.5 * torch.randn(C, D, generator=g, dtype=DTYPE))  # m_y
        self.classes, self.q_shift, self.q_inflate = C, q_shift, q_inflate

    def given(self, y: torch.Tensor) -> _Shifted:
        return _Shifted(self, y)

    def log_px_given_y_exact(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.base.log_marginal_exact(x - self.shifts[y])  # (B,)

    def log_joint_exact(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x, y=c) for every c, ``[B, C]``, with p(y) uniform."""
        per_class = [self.log_px_given_y_exact(x, torch.full((len(x),), c)) for c in range(C)]
        return torch.stack(per_class, -1) - math.log(C)

    def sample(self, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, C, (n,), generator=g)
        with torch.no_grad():
            return self.base.sample(n, generator=g) + self.shifts[y], y


class _Shifted:
    """:class:`ClassShiftedPPCA` given labels ``y [B]``: the LinearGaussian's interface on x - m_y."""

    data_support = constraints.real

    def __init__(self, model: ClassShiftedPPCA, y: torch.Tensor):
        self.model, self.shift = model, model.shifts[y]  # (B, D)
        self.latent_dim, self.data_shape = LATENT, torch.Size([D])

    def parameters(self):
        return self.model.parameters()

    @property
    def prior(self):
        return self.model.base.prior.expand(self.shift.shape[:1])  # batch [B]

    def encode(self, x: torch.Tensor):
        exact = self.model.base.posterior(x - self.shift)  # p(z | x, y)
        loc, tril = exact.loc + self.model.q_shift, exact.scale_tril * self.model.q_inflate
        return MultivariateNormal(loc, scale_tril=tril)

    def decode(self, z: torch.Tensor):
        base = self.model.base.decode(z)  # N(W z + b, s^2 I), batch [*S, B]
        return Independent(Normal(base.mean + self.shift, base.stddev), 1)


# --- the estimators of log p(x|y), unchanged, on the exact model ---------------------------------------------------
def test_elbo_and_iwae_equal_log_p_x_given_y_when_q_is_the_exact_posterior():
    torch.manual_seed(0)
    model = ClassShiftedPPCA()
    x, y = model.sample(20)
    exact = model.log_px_given_y_exact(x, y)
    view = bind(model, {"y": y})
    with torch.no_grad():
        joint = elbo_parts(view, x, k=3, form="joint").elbo  # every log-weight is log p(x|y): no Monte Carlo error
        iwae = log_marginal(view, x, k=50)
        integrands = elbo_integrands(view, x, k=2000)  # the other forms are exact in expectation only
    assert_within_stderr(joint, exact, torch.zeros(20), "joint-form ELBO")
    assert_within_stderr(iwae.value, exact, iwae.stderr, "IWAE_50")
    for form in ("entropy", "kl"):
        values = integrands[form]
        mean, stderr = values.mean(0), values.std(0) / math.sqrt(len(values))
        assert_within_stderr(mean, exact, stderr, f"{form}-form ELBO")
    wrong = model.log_px_given_y_exact(x, (y + 1) % C)
    assert bool(((wrong - exact).abs() > 1).any())  # the label matters


def test_estimators_of_log_p_x_given_y_agree_with_the_exact_value_within_their_stderr():
    torch.manual_seed(1)
    model = ClassShiftedPPCA(q_shift=0.3, q_inflate=1.4)  # an inexact q: every estimate has Monte Carlo error
    x, y = model.sample(12)
    exact = model.log_px_given_y_exact(x, y)
    view = bind(model, {"y": y})
    with torch.no_grad():
        importance = log_marginal(view, x, k=4000)
        naive = log_marginal(view, x, k=20000, proposal="prior")
        # the ELBO's truth: log p(x|y) - KL(q || p(z|x, y)), both closed form
        q, posterior = view.encode(x), model.base.posterior(x - model.shifts[y])
        exact_elbo = exact - torch.distributions.kl_divergence(q, posterior)
        integrands = elbo_integrands(view, x, k=4000)
    assert bool((importance.stderr > 0).all())
    assert_within_stderr(importance.value, exact, importance.stderr, "importance-sampled log p(x|y)")
    # naive Monte Carlo's stderr means something only where its weights' tail is light (the Pareto k-hat says where)
    reliable = naive.pareto_k < pareto_k_threshold(naive.k)
    assert int(reliable.sum()) >= 6, naive.pareto_k
    assert_within_stderr(naive.value[reliable], exact[reliable], naive.stderr[reliable], "naive log p(x|y)")
    for form, values in integrands.items():
        mean, stderr = values.mean(0), values.std(0) / math.sqrt(len(values))
        assert_within_stderr(mean, exact_elbo, stderr, f"{form} ELBO")
    assert bool((exact_elbo < exact - 0.05).all())  # the gap is there to see


# --- the generative classifier ---------------------------------------------------------------------------------------
def test_generative_log_probs_equal_the_exact_joint_and_posterior_over_classes():
    torch.manual_seed(2)
    model = ClassShiftedPPCA()  # exact q: every class's estimate is exact
    x, _ = model.sample(30)
    exact = model.log_joint_exact(x)  # (B, C)
    with torch.no_grad():
        joint = generative_log_probs(model, x, k=4, batch_size=7)  # batches of 7: the streaming is exercised
    zero = torch.zeros_like(exact)
    assert_within_stderr(joint, exact, zero, "log p(x, y=c)")
    assert_within_stderr(joint.log_softmax(-1), exact.log_softmax(-1), zero, "log p(y|x)")
    assert_within_stderr(joint.logsumexp(-1), exact.logsumexp(-1), zero[:, 0], "log p(x)")


def test_generative_classifier_agrees_with_exact_p_y_given_x_within_its_delta_method_stderr():
    torch.manual_seed(3)
    model = ClassShiftedPPCA(q_shift=0.2, q_inflate=1.3)
    x, _ = model.sample(16)
    exact = model.log_joint_exact(x)
    with torch.no_grad():
        estimate = class_log_likelihoods(model, x, k=2000, batch_size=16)
    joint = estimate.value - math.log(C)
    p = joint.softmax(-1)  # (B, C)
    var = estimate.stderr**2  # (B, C), the classes' estimates independent
    # delta method: d log p(y=c|x) / d log p(x|j) = [c = j] - p_j; d log p(x) / d log p(x|j) = p_j
    eye = torch.eye(C, dtype=DTYPE)
    stderr_posterior = (((eye[None] - p[:, None, :]) ** 2) * var[:, None, :]).sum(-1).sqrt()
    stderr_marginal = ((p**2) * var).sum(-1).sqrt()
    assert bool((estimate.stderr > 0).all())
    assert_within_stderr(joint.log_softmax(-1), exact.log_softmax(-1), stderr_posterior, "log p(y|x)")
    assert_within_stderr(joint.logsumexp(-1), exact.logsumexp(-1), stderr_marginal, "log p(x)")


def test_generative_log_probs_refuses_a_model_without_labels():
    with pytest.raises(ValueError, match="needs context = \\('y',\\) and classes"):
        generative_log_probs(LinearGaussian(torch.ones(3, 1), torch.zeros(3), 1.0), torch.zeros(2, 3), k=2)


# --- the cVAE ----------------------------------------------------------------------------------------------------
def cvae_config(**overrides) -> TrainConfig:
    fields = dict(model="cvae", classes=4, architecture_options={"hidden": [16]}, batch_size=20)
    return tiny_config(**{**fields, **overrides})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"classes": 1}, "needs classes >= 2"),
        ({"prior": "mixture-of-gaussians"}, "p\\(z\\|y\\) is one of standard-normal, learned-gaussian"),
        ({"architecture": "conv"}, "architecture 'conv' cannot take"),
        ({"architecture_options": {"context_features": 3}}, "unknown architecture_options 'context_features'"),
    ],
)
def test_cvae_config_refusals(fields, message):
    with pytest.raises(ValueError, match=message):
        cvae_config(**fields)


def test_cvae_views_have_the_estimators_interface_and_check_labels():
    torch.manual_seed(4)
    model = build_model(cvae_config(prior="learned-gaussian"), (1, 8, 8))
    assert isinstance(model, ConditionalVAE) and model.context == ("y",) and model.classes == 4
    x, y = torch.rand(5, 1, 8, 8).bernoulli(), torch.tensor([0, 1, 2, 3, 1])
    view = model.given(y)
    assert view.prior.batch_shape == (5,) and view.prior.event_shape == (2,)
    assert view.encode(x).batch_shape == (5,)
    assert view.decode(torch.zeros(7, 5, 2)).batch_shape == (7, 5)  # z [K, B, d]
    with torch.no_grad():
        assert log_marginal(view, x, k=6).value.shape == (5,)
        assert model.classify(x, k=3).logits.shape == (5, 4)
        assert class_log_probs(model, x, k=2).shape == (5, 4)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.3 \(the model's classes\), got 4"):
        model.given(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="1-D integer tensor of labels"):
        model.given(torch.zeros(2))


def test_cvae_trains_from_a_config_reloads_and_samples_given_a_class(tmp_path):
    from tiny import bars
    from vaelab.cli import conditional_samples
    from vaelab.runs import load_run
    from vaelab.train import train

    x, y = bars(120)
    config = cvae_config(prior="learned-gaussian")
    result = train(config, {"x": x, "y": y}, {"x": x[:20], "y": y[:20]}, tmp_path / "run")
    assert result.step == 6 and math.isfinite(result.last_eval["elbo"])
    torch.manual_seed(config.seed)  # what the trainer started from
    start = build_model(config, (1, 8, 8)).prior_module.state_dict()
    run = load_run(tmp_path / "run")
    assert isinstance(run.model, ConditionalVAE)
    for name, value in run.model.prior_module.state_dict().items():  # p(z|y) is learned, per class
        assert value.shape[0] == 4 and not torch.equal(value, start[name]), name
    images = conditional_samples(run.model, 6, 2)
    assert images.shape == (6, 1, 8, 8) and bool(((images >= 0) & (images <= 1)).all())
    assert conditional_samples(run.model, 5, None).shape == (5, 1, 8, 8)
    from vaelab.plots import draw_pictures  # the report's pictures: given each example's label, and per class

    pictures = draw_pictures(run.model, x[:12], tmp_path / "pictures", context={"y": y[:12]})
    assert list(pictures) == ["reconstructions", "class_samples"]


# --- the command line end to end ---------------------------------------------------------------------------------
def vaelab_cli(*args, check=False):
    proc = subprocess.run(
        [sys.executable, "-m", "vaelab", *map(str, args)], capture_output=True, text=True, env=dict(os.environ),
        timeout=120,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


FLAGS = [
    "--architecture-options", '{"hidden": [16]}', "--latent-dim", "2", "--batch-size", "20", "--validation-size", "40",
    "--eval-k", "2", "--eval-examples", "20", "--max-steps", "20", "--no-progress", "--no-compile",
]  # fmt: skip


def test_cli_trains_evaluates_and_samples_a_cvae_and_refuses_in_one_line(tmp_path):
    import json

    from tiny import tiny_labelled_npz, tiny_npy

    data, run = tiny_labelled_npz(tmp_path / "bars.npz"), tmp_path / "run"
    vaelab_cli("train", "--dataset", data, "--model", "cvae", "--classes", "4", *FLAGS, "--out", run, check=True)
    proc = vaelab_cli("eval", run, "--fast", "--k", "20", "--classify-k", "3", "--no-progress", check=True)
    for line in ("given y", "classification of 40 examples", "log p(x) = log sum_c", "nats the label carries"):
        assert line in proc.stdout
    result = json.loads((run / "eval_test.json").read_text())
    marginal = result["marginal"]
    assert marginal["k"] == 3 and result["classification"]["examples"] == 40
    # nats the label carries = mean log p(x|y) - mean log p(x) = mean log p(y|x) - log p(y), from the same estimates
    carried = marginal["log_px_given_y"]["mean"] - marginal["log_px"]["mean"]
    assert marginal["label_nats"]["mean"] == pytest.approx(carried, abs=1e-9)
    assert carried == pytest.approx(math.log(4) - result["classification"]["nll"], abs=1e-9)
    proc = vaelab_cli("sample", run, "--class", "1", "--n", "8", check=True)
    assert "8 samples given class 1" in proc.stdout and (run / "samples.png").is_file()

    errors = [
        (["sample", run, "--class", "4"], "--class 4: the model's classes are 0..3"),
        (["train", "--dataset", tiny_npy(tmp_path / "plain.npy"), "--model", "cvae", *FLAGS, "--out", tmp_path / "x"],
         "--model cvae trains on labels, and plain has none"),
        (["train", "--dataset", data, "--model", "cvae", "--classes", "3", *FLAGS, "--out", tmp_path / "y"],
         "outside the model's 0..2: set --classes"),
    ]  # fmt: skip
    for args, message in errors:
        proc = vaelab_cli(*args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_sample_refuses_a_class_for_a_model_without_labels(tmp_path):
    from tiny import tiny_run

    tiny_run(tmp_path / "vae", steps=2)
    proc = vaelab_cli("sample", tmp_path / "vae", "--class", "1")
    assert proc.returncode == 2 and "is not given a class (no context y)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
