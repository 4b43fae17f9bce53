"""Pictures: every figure renders to a PNG of the size asked for, on tiny trained models with 2-D and 4-D latents."""

from __future__ import annotations

import math

import pytest
import torch
from matplotlib.image import imread
from torch import nn

from tiny import bars, tiny_run
from vaelab.hierarchical import HierarchicalVAE
from vaelab.likelihoods import BernoulliLikelihood
from vaelab.plots import (
    DPI,
    curve_table,
    draw_pictures,
    estimator_figure,
    gap_histogram_figure,
    image_grid,
    iwae_curve_figure,
    kl_per_dim_figure,
    latent_scatter_figure,
    manifold_figure,
    pca_2d,
    prior_quantiles,
    reconstructions_figure,
    samples_figure,
    save_figure,
    study_table,
    training_curves_figure,
    traversal_figure,
)


@pytest.fixture(scope="module", params=[2, 4], ids=["d2", "d4"])
def run(request, tmp_path_factory, one_thread):
    return tiny_run(tmp_path_factory.mktemp(f"run_d{request.param}"), latent_dim=request.param)


@pytest.fixture(scope="module")
def test_data():
    return bars(60, seed=1)


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG read back with matplotlib; checks it is RGBA with some non-white pixels."""
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] == 4, image.shape
    assert (image[..., :3] < 0.9).any(), "the picture is blank"
    return image.shape[1], image.shape[0]


def expect_size(fig, path) -> None:
    width, height = fig.get_size_inches()
    assert png_size(save_figure(fig, path)) == (round(width * DPI), round(height * DPI))


def fake_diagnostics(n: int, *, layout: str) -> dict:
    """Diagnostics in the layout vaelab.report.as_json writes ("rows") or the nested one ("nested")."""
    g = torch.Generator().manual_seed(0)
    ks = [1, 10, 100, 1000]
    if layout == "rows":
        study = {
            "examples": 20,
            "rows": [
                {"proposal": p, "k": k, "mean": m - 5 * i, "sem": 1.0, "mean_mc_stderr": None if k == 1 else 0.5}
                for p, m in (("prior", -200.0), ("posterior", -40.0))
                for i, k in enumerate(ks)
            ],
        }
        curve = {"k": ks, "mean": [-45.0, -43.0, -42.0, -41.5], "sem": [1.0] * 4, "mc_sem": [None, 0.1, 0.1, 0.1]}
    else:
        study = {
            p: {str(k): {"mean": m - 5 * i, "sem": 1.0, "mean_stderr": 0.5} for i, k in enumerate(ks)}
            for p, m in (("prior", -200.0), ("posterior", -40.0))
        }
        curve = {str(k): {"mean": -45.0 + i, "sem": 1.0} for i, k in enumerate(ks)}
    gap = (torch.rand(n, generator=g) * 3).tolist()
    return {
        "log_px": {"mean": -41.0, "sem": 1.0},
        "elbo": {"kl": {"mean": -45.0, "sem": 1.0, "k": 10}},
        "posterior_gap": {"mean": 2.0, "sem": 0.1, "per_example": gap},
        "approximation_gap": {"mean": 1.0, "sem": 0.1, "per_example": [v / 2 for v in gap[:-1]] + [None]},
        "amortization_gap": {"mean": 1.0, "sem": 0.1, "per_example": [v / 2 for v in gap]},
        "estimator_study": study,
        "iwae_curve": curve,
        "kl_per_dim": [1.0, 0.0, 2.0, 0.01],
        "posterior_mean_variance": [0.5, 0.001, 0.8, 0.005],
    }


def test_image_grid_shape():
    grid = image_grid(torch.rand(5, 1, 8, 8), (1, 8, 8), ncol=3, pad=2)
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)


def test_model_pictures(run, test_data, tmp_path):
    x, labels = test_data
    model = run.model
    expect_size(reconstructions_figure(model, x[:8]), tmp_path / "recon.png")
    expect_size(samples_figure(model, 16), tmp_path / "samples.png")
    fig = traversal_figure(model, x, dims=3, steps=5)
    assert len(fig.axes[0].get_yticklabels()) == min(3, model.latent_dim)
    expect_size(fig, tmp_path / "traversals.png")
    fig = latent_scatter_figure(model, x, labels)
    xlabel = fig.axes[0].get_xlabel()
    if model.latent_dim == 2:
        assert xlabel == "z1"  # the model's own latent axes
    else:
        assert xlabel.startswith("principal component 1")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["0", "1", "2", "3"]
    expect_size(fig, tmp_path / "latents.png")
    expect_size(latent_scatter_figure(model, x), tmp_path / "latents_unlabelled.png")


def test_manifold_only_for_2d_latents(run, tmp_path):
    if run.model.latent_dim == 2:
        expect_size(manifold_figure(run.model, n=5), tmp_path / "manifold.png")
    else:
        with pytest.raises(ValueError, match="2-D latent"):
            manifold_figure(run.model)


def test_training_curves(run, tmp_path):
    fig = training_curves_figure(run.metrics)
    elbo_panel = fig.axes[0]
    labels = [line.get_label() for line in elbo_panel.get_lines()]
    assert labels == ["train ELBO", "valid ELBO", "valid IWAE (k=10)"]
    assert elbo_panel.get_lines()[0].get_xdata()[-1] == 50
    expect_size(fig, tmp_path / "curves.png")
    expect_size(training_curves_figure([]), tmp_path / "no_curves.png")  # every panel says "not logged"


@pytest.mark.parametrize("layout", ["rows", "nested"])
def test_diagnostic_figures(layout, tmp_path):
    d = fake_diagnostics(50, layout=layout)
    expect_size(kl_per_dim_figure(d["kl_per_dim"], d["posterior_mean_variance"]), tmp_path / "kl.png")
    fig = estimator_figure(d["estimator_study"], reference=-41.0)
    assert len(fig.axes[0].get_lines()) == 3  # two proposals and the reference line
    assert fig.axes[0].get_xscale() == "log"
    expect_size(fig, tmp_path / "estimators.png")
    fig = iwae_curve_figure(d["iwae_curve"], log_px=-41.0, elbo=-45.0)
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [1, 10, 100, 1000]
    assert fig.axes[0].get_xscale() == "log"
    expect_size(fig, tmp_path / "iwae.png")
    gaps = {k: d[k]["per_example"] for k in ("posterior_gap", "approximation_gap", "amortization_gap")}
    expect_size(gap_histogram_figure(gaps), tmp_path / "gaps.png")  # a None (non-finite) value is skipped


def test_tables_read_both_layouts():
    rows, nested = fake_diagnostics(5, layout="rows"), fake_diagnostics(5, layout="nested")
    a, b = study_table(rows["estimator_study"]), study_table(nested["estimator_study"])
    assert set(a) == set(b) == {"prior", "posterior"}
    assert {k: r["mean"] for k, r in a["prior"].items()} == {k: r["mean"] for k, r in b["prior"].items()}
    assert sorted(curve_table(rows["iwae_curve"])) == sorted(curve_table(nested["iwae_curve"])) == [1, 10, 100, 1000]


def test_draw_pictures(run, test_data, tmp_path):
    x, labels = test_data
    d = fake_diagnostics(len(x), layout="rows")
    d["kl_per_dim"] = [0.5] * run.model.latent_dim
    d["posterior_mean_variance"] = [0.5] * run.model.latent_dim
    pictures = draw_pictures(run.model, x, tmp_path / "pictures", labels=labels, metrics=run.metrics, diagnostics=d)
    expected = ["reconstructions", "samples", "traversals", "latents", "training_curves", "kl_per_dim"]
    expected += ["estimators", "iwae_curve", "gaps"]
    if run.model.latent_dim == 2:
        expected.insert(3, "manifold")
    assert list(pictures) == expected
    for path in pictures.values():
        assert path.parent == tmp_path / "pictures" and path.suffix == ".png"
        width, height = png_size(path)
        assert width >= 200 and height >= 150
    assert not list((tmp_path / "pictures").glob(".*"))  # no temporary files left
    # without diagnostics or metrics, only the model's own pictures
    assert set(draw_pictures(run.model, x, tmp_path / "bare")) <= {
        "reconstructions",
        "samples",
        "traversals",
        "manifold",
        "latents",
    }


def test_prior_quantiles_standard_normal_is_the_inverse_cdf(run):
    probs = torch.tensor([0.05, 0.5, 0.975])
    q = prior_quantiles(run.model, probs)
    assert q.shape == (3, run.model.latent_dim)
    torch.testing.assert_close(q[:, 0], torch.tensor([-1.6448536, 0.0, 1.959964]), atol=1e-5, rtol=0)


def test_pca_2d_recovers_a_plane():
    g = torch.Generator().manual_seed(0)
    plane = torch.randn(200, 2, generator=g) @ torch.randn(2, 6, generator=g)  # rank 2 in 6-D
    points, explained = pca_2d(plane + 3.0)
    assert points.shape == (200, 2)
    assert math.isclose(sum(explained), 1.0, rel_tol=1e-9)


def test_hierarchical_model_pictures(tmp_path, test_data):
    """A model whose q(z|x) has no closed-form mean (two stochastic layers): Monte Carlo means, empirical quantiles."""
    torch.manual_seed(0)
    d1, d2 = 3, 2
    nets = {
        "q_z1_x": nn.Sequential(nn.Flatten(), nn.Linear(64, 2 * d1)),
        "q_z2_z1": nn.Linear(d1, 2 * d2),
        "p_z1_z2": nn.Linear(d2, 2 * d1),
        "p_x_z1": nn.Linear(d1, 64),
    }
    model = HierarchicalVAE(nets, BernoulliLikelihood((1, 8, 8)), latent_dims=(d1, d2)).eval()
    x, labels = test_data
    expect_size(traversal_figure(model, x, dims=2, steps=4), tmp_path / "traversals.png")
    expect_size(latent_scatter_figure(model, x, labels), tmp_path / "latents.png")
    pictures = draw_pictures(model, x, tmp_path / "pictures", labels=labels)
    assert list(pictures) == ["reconstructions", "samples", "traversals", "latents"]


def test_class_samples_share_their_noise_across_classes():
    from tiny import ClassMeanGaussian
    from vaelab.plots import class_sample_images

    model = ClassMeanGaussian(6, 2, 3, seed=4, dtype=torch.float64)
    images = class_sample_images(model, [0, 2], 5, seed=11).view(2, 5, 6)  # [class, column, D]
    w, m = model.weight.detach(), model.means.detach()
    # E[x | z] = W z + b with z = m_y + eps and the same eps down a column: rows differ by W (m_2 - m_0) everywhere
    shift = (m[2] - m[0]) @ w.T
    torch.testing.assert_close(images[1] - images[0], shift.expand(5, -1), rtol=0, atol=1e-12)
    assert not torch.allclose(images[0, 0], images[0, 1])  # columns differ
    torch.testing.assert_close(class_sample_images(model, [0, 2], 5, seed=11).view(2, 5, 6), images)  # seeded


def classified(n: int = 200, classes: int = 4) -> dict:
    from vaelab.evaluate import classification_metrics

    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64) + 2.5 * nn.functional.one_hot(labels, classes)
    return classification_metrics(logits.log_softmax(-1), labels)


def test_reliability_and_confusion_figures(tmp_path):
    from vaelab.plots import confusion_figure, reliability_figure

    metrics = classified()
    expect_size(reliability_figure(metrics["reliability"], ece=metrics["ece"]), tmp_path / "reliability.png")
    expect_size(confusion_figure(metrics["confusion"]), tmp_path / "confusion.png")


def test_draw_pictures_of_a_classifier_has_no_pictures_of_z(test_data, tmp_path):
    x, _ = test_data

    class Linear(nn.Module):  # p(y|x) only: no prior, encode or decode
        classes = 4

        def __init__(self):
            super().__init__()
            self.net = nn.Linear(x[0].numel(), self.classes)

        def classify(self, x):
            return torch.distributions.Categorical(logits=self.net(x.flatten(1)))

    pictures = draw_pictures(Linear(), x, tmp_path, diagnostics={"classification": classified()})
    assert list(pictures) == ["reliability", "confusion"]
    for path in pictures.values():
        png_size(path)
