"""Pictures: image grids and diagnostic figures (PNG via matplotlib's Agg canvas; no pyplot, no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch.distributions import Normal

from vaelab.estimators import latent_dim
from vaelab.models import bind
from vaelab.posteriors import distribution_mean


def shows_as_images(data_shape) -> bool:
    """Whether examples of this shape can be drawn as images: (C, H, W), (H, W), or a flat square number of pixels."""
    shape = tuple(data_shape)
    return len(shape) in (2, 3) or (len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0])


def _as_images(x: torch.Tensor, data_shape) -> np.ndarray:
    """``[N, *data_shape]`` -> ``[N, H, W, C]`` floats in [0, 1] (flat 784-vectors become 28x28)."""
    x = x.detach().float().cpu().clamp(0, 1)
    shape = tuple(data_shape)
    if len(shape) == 3:  # (C, H, W)
        images = x.reshape(-1, *shape).permute(0, 2, 3, 1)
    elif len(shape) == 2:
        images = x.reshape(-1, *shape, 1)
    else:
        side = math.isqrt(shape[0])
        if side * side != shape[0]:
            raise ValueError(f"cannot show data of shape {shape} as images")
        images = x.reshape(-1, side, side, 1)
    return images.numpy()


def image_grid(x: torch.Tensor, data_shape, *, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``[N, *data_shape]`` images into one ``[H, W, 3]`` array in [0, 1], ``ncol`` per row."""
    images = _as_images(x, data_shape)
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = image if c == 3 else np.repeat(image, 3, axis=-1)
    return grid


def save_grid(path: str | Path, x: torch.Tensor, data_shape, *, ncol: int | None = None) -> Path:
    """Write an image grid as PNG (written to a temporary name, then renamed)."""
    from matplotlib.image import imsave

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    imsave(tmp, image_grid(x, data_shape, ncol=ncol))
    tmp.replace(path)
    return path


def decoded_mean(model, z: torch.Tensor) -> torch.Tensor:
    """E[x | z] under the decoder (pixel probabilities for Bernoulli, the mean for Gaussians)."""
    return model.decode(z).mean


@torch.no_grad()
def sample_images(model, n: int) -> torch.Tensor:
    """``n`` draws z ~ p(z), shown as E[x|z]: ``[n, *data_shape]``."""
    z = model.prior.sample((n,))
    return decoded_mean(model, z)


@torch.no_grad()
def reconstruction_pairs(model, x: torch.Tensor) -> torch.Tensor:
    """Inputs and their reconstructions E[x | z = E_q[z]] interleaved row by row: ``[2N, *data_shape]``.

    With ``ncol = N`` the first row holds the inputs and the second their reconstructions.
    """
    recon = decoded_mean(model, posterior_means(model, x))
    return torch.cat([x, recon.to(x.dtype)])


@torch.no_grad()
def class_sample_images(model, classes: Sequence[int], n: int, *, seed: int = 0) -> torch.Tensor:
    """Samples of a model of p(x, z | y) (``model.given(y=...)``), one row per class and ``n`` columns that share
    their noise: row c holds E[x | z] for z ~ p(z | y = c) drawn with the same seed in every row (the same z where
    p(z | y) is one prior for all classes), so a column keeps its style while the class changes.
    ``[len(classes) * n, *data_shape]``."""
    rows = []
    for c in classes:
        view = model.given(y=torch.full((n,), int(c), dtype=torch.long, device=_device_of(model)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            z = view.prior.sample() if view.prior.batch_shape else view.prior.sample((n,))  # [n, d]
        rows.append(decoded_mean(view, z))
    return torch.cat(rows)


def _device_of(model) -> torch.device:
    first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return torch.device("cpu") if first is None else first.device


# --- figures ---------------------------------------------------------------------------------------------------------
# Every figure below is a matplotlib ``Figure`` built without pyplot (no global state, no display): PNGs are drawn by
# the Agg canvas when saved. Sizes are in inches at DPI, so a (6, 4) figure is a 600 x 400 PNG.
DPI = 100
SIZE = (6.0, 4.0)
WIDE = (10.0, 6.0)
NATS = "nats per example"


def new_figure(size: tuple[float, float] = SIZE) -> Figure:
    """An empty figure of ``size`` inches at :data:`DPI`, laid out so labels are never cut off."""
    return Figure(figsize=size, dpi=DPI, layout="constrained")


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG of exactly ``figsize * DPI`` pixels (temporary name, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=DPI, format="png")
    tmp.replace(path)
    return path


def _show_grid(fig: Figure, grid: np.ndarray, title: str):
    ax = fig.add_subplot()
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return ax


def reconstructions_figure(model, x: torch.Tensor) -> Figure:
    """Inputs (top row) above their reconstructions E[x | z = E_q[z]] (bottom row); ``x``: ``[N, *data_shape]``."""
    fig = new_figure((6.0, 2.0))
    grid = image_grid(reconstruction_pairs(model, x), x.shape[1:], ncol=len(x))
    _show_grid(fig, grid, "Test inputs (top) and their reconstructions (bottom)")
    return fig


def samples_figure(model, n: int = 64) -> Figure:
    """``n`` draws z ~ p(z), shown as E[x | z]."""
    fig = new_figure((5.0, 5.0))
    images = sample_images(model, n)  # [n, *data_shape]
    _show_grid(fig, image_grid(images, images.shape[1:]), f"{n} samples z ~ p(z), shown as E[x | z]")
    return fig


@torch.no_grad()
def posterior_means(model, x: torch.Tensor, *, batch_size: int = 500, draws: int = 64) -> torch.Tensor:
    """E_q[z | x] for every example: ``[N, d]``. Monte Carlo (``draws`` samples) when q has no closed-form mean."""
    return torch.cat([distribution_mean(model.encode(batch), draws) for batch in x.split(batch_size)])


@torch.no_grad()
def prior_quantiles(model, probs: torch.Tensor, *, draws: int = 4000) -> torch.Tensor:
    """Per-dimension quantiles of p(z) at ``probs`` (``[S]`` in (0, 1)): ``[S, d]``.

    Exact (loc + scale * Phi^-1(p)) for a factorised Gaussian prior such as N(0, I); otherwise empirical quantiles of
    ``draws`` samples from the prior.
    """
    prior = model.prior
    base = getattr(prior, "base_dist", None)
    if isinstance(base, Normal) and prior.event_shape == torch.Size([latent_dim(model)]):
        standard = Normal(0.0, 1.0).icdf(probs.double()).to(base.loc.dtype).to(base.loc.device)
        return base.loc + base.scale * standard[:, None]  # [S, d]
    samples = prior.sample((draws,))  # [draws, d]
    return torch.quantile(samples.double(), probs.double().to(samples.device), dim=0).to(samples.dtype)


def _even_probs(n: int, margin: float = 0.05) -> torch.Tensor:
    """``n`` probabilities evenly spaced on [margin, 1 - margin]: an inverse-CDF grid avoids the infinite tails."""
    return torch.linspace(margin, 1 - margin, n)


@torch.no_grad()
def traversal_figure(
    model,
    x: torch.Tensor,
    *,
    variance: Sequence[float] | None = None,
    dims: int = 8,
    steps: int = 9,
) -> Figure:
    """Latent traversals: from the posterior mean of ``x[0]``, vary one latent dimension at a time over its prior
    quantiles (5% to 95%) and decode E[x | z]. Rows are the ``dims`` dimensions with the largest variance of the
    posterior mean over ``x`` (``variance``, ``[d]``, if already computed; the most used units first).
    """
    if variance is None:
        variance = posterior_means(model, x).double().var(0).tolist()
    variance = torch.as_tensor(variance, dtype=torch.float64)
    order = variance.argsort(descending=True)[: min(dims, latent_dim(model))].tolist()
    base = posterior_means(model, x[:1])[0]  # [d]
    values = prior_quantiles(model, _even_probs(steps)).to(base)  # [steps, d]
    z = base.repeat(len(order), steps, 1)  # [rows, steps, d]
    for row, j in enumerate(order):
        z[row, :, j] = values[:, j]
    images = decoded_mean(model, z.reshape(-1, z.shape[-1]))
    fig = new_figure((6.0, max(3.0, 0.55 * len(order) + 1.2)))
    ax = _show_grid(fig, image_grid(images, x.shape[1:], ncol=steps), "Latent traversals (most active dimensions)")
    cell = ax.get_images()[0].get_array().shape[0] / len(order)  # pixels per row of the grid
    ax.set_yticks([cell * (r + 0.5) for r in range(len(order))])
    ax.set_yticklabels([f"z{j + 1} (var {variance[j]:.2f})" for j in order], fontsize=8)
    ax.set_xlabel(f"prior quantile of the dimension: 5% (left) to 95% (right), {steps} steps")
    return fig


@torch.no_grad()
def manifold_figure(model, *, n: int = 15) -> Figure:
    """The decoded manifold of a 2-D latent space: E[x | z] on an ``n x n`` inverse-CDF grid of the prior.

    For p(z) = N(0, I) the grid points are Phi^-1 of evenly spaced probabilities, so each cell holds equal prior
    mass (Kingma & Welling, 2014, fig. 4). Raises ``ValueError`` unless the latent space is 2-D.
    """
    d = latent_dim(model)
    if d != 2:
        raise ValueError(f"the decoded manifold needs a 2-D latent space; this model has latent_dim={d}")
    values = prior_quantiles(model, _even_probs(n))  # [n, 2]
    z1, z2 = values[:, 0], values[:, 1].flip(0)  # z2 decreasing down the rows, like a plot's y axis
    rows, cols = torch.meshgrid(z2, z1, indexing="ij")  # [n, n] each: row r holds z2[r], column c holds z1[c]
    z = torch.stack([cols, rows], dim=-1).reshape(-1, 2)  # [n * n, 2] row-major, as image_grid tiles
    images = decoded_mean(model, z)
    fig = new_figure((6.0, 6.0))
    ax = _show_grid(fig, image_grid(images, images.shape[1:], ncol=n), "Decoded manifold E[x | z] over the prior")
    width = ax.get_images()[0].get_array().shape[1]
    ticks = [0, n // 2, n - 1]
    ax.set_xticks([width / n * (i + 0.5) for i in ticks])
    ax.set_xticklabels([f"{z1[i]:.2f}" for i in ticks])
    ax.set_yticks([width / n * (i + 0.5) for i in ticks])
    ax.set_yticklabels([f"{z2[i]:.2f}" for i in ticks])
    ax.set_xlabel("z1 (inverse-CDF grid of the prior, 5% to 95%)")
    ax.set_ylabel("z2")
    return fig


def pca_2d(points: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Project ``[N, d]`` points on their two principal axes: (``[N, 2]``, fraction of variance each explains)."""
    centred = points.double() - points.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    var = s**2
    explained = (var / var.sum().clamp_min(1e-300))[:2].tolist()
    return centred @ vh[:2].T, explained


@torch.no_grad()
def latent_scatter_figure(model, x: torch.Tensor, labels: torch.Tensor | None = None, *, max_points: int = 5000):
    """Posterior means E_q[z | x] of ``x`` in two dimensions, coloured by ``labels`` (``[N]`` ints) when given.

    A 2-D latent space is shown as it is; a larger one by the principal components of the means (PCA); a 1-D one
    against the label (or 0).
    """
    x = x[:max_points]
    means = posterior_means(model, x).double().cpu()
    fig = new_figure()
    ax = fig.add_subplot()
    if means.shape[1] == 2:
        points, xlabel, ylabel, how = means, "z1", "z2", "the model's own 2-D latent space"
    elif means.shape[1] > 2:
        points, explained = pca_2d(means)
        xlabel = f"principal component 1 ({100 * explained[0]:.0f}% of variance)"
        ylabel = f"principal component 2 ({100 * explained[1]:.0f}% of variance)"
        how = f"PCA of the {means.shape[1]}-D means"
    else:
        y = labels[: len(means)].double().cpu() if labels is not None else torch.zeros(len(means), dtype=torch.float64)
        points, xlabel, ylabel, how = torch.stack([means[:, 0], y], 1), "z1", "label", "the 1-D latent"
    colour = None if labels is None else labels[: len(points)].cpu().numpy()
    dot = 4 if len(points) > 1000 else 12  # area in points^2: small dots only where there are many
    if colour is None:
        ax.scatter(points[:, 0], points[:, 1], s=dot, alpha=0.6, linewidths=0)
    else:
        classes = np.unique(colour)
        cmap = colormaps["tab10" if len(classes) <= 10 else "viridis"]
        for i, c in enumerate(classes):
            pick = colour == c
            shade = cmap(i if len(classes) <= 10 else i / max(len(classes) - 1, 1))
            ax.scatter(points[pick, 0], points[pick, 1], s=dot, alpha=0.6, linewidths=0, color=shade, label=str(c))
        if len(classes) <= 10:
            ax.legend(title="label", markerscale=12 / dot, fontsize=7, title_fontsize=8, loc="best", frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"Test-set posterior means, {how}")
    return fig


def _curve(metrics: Sequence[dict], split: str, key: str) -> tuple[list[float], list[float]]:
    rows = [m for m in metrics if m.get("split") == split and isinstance(m.get(key), int | float)]
    return [m["step"] for m in rows], [float(m[key]) for m in rows]


def _robust_ylim(ax, values: Sequence[float]) -> None:
    """Ignore the first steps' very low values (an untrained model) so the rest of the curve stays readable."""
    finite = np.asarray([v for v in values if math.isfinite(v)])
    if len(finite) < 5:
        return
    low, high = np.percentile(finite, 5), finite.max()
    pad = 0.05 * max(high - low, 1e-9)
    if finite.min() < low - pad:
        ax.set_ylim(low - pad, high + pad)


def training_curves_figure(metrics: Sequence[dict[str, Any]]) -> Figure:
    """Training curves from ``metrics.jsonl`` lines: ELBO (train, valid, valid IWAE), reconstruction, KL, beta, learning
    rate and gradient norm against the step. Missing quantities leave their panel empty with a note.
    """
    fig = new_figure(WIDE)
    axes = fig.subplots(2, 3, sharex=True).ravel()
    iwae_keys = sorted({k for m in metrics if m.get("split") == "valid" for k in m if k.startswith("iwae_")})
    panels = [
        (
            "ELBO",
            NATS,
            [("train", "elbo", "train ELBO"), ("valid", "elbo", "valid ELBO")]
            + [("valid", key, f"valid IWAE (k={key[5:]})") for key in iwae_keys],
        ),
        ("Reconstruction E_q[log p(x|z)]", NATS, [("train", "recon", "train")]),
        ("KL(q(z|x) || p(z))", NATS, [("train", "kl", "train")]),
        ("KL weight beta", "beta (1 = the ELBO)", [("train", "beta", "train")]),
        ("Learning rate", "learning rate", [("train", "lr", "train")]),
        ("Gradient norm", "global L2 norm", [("train", "grad_norm", "train")]),
    ]
    for ax, (title, unit, series) in zip(axes, panels, strict=True):
        plotted: list[float] = []
        for split, key, label in series:
            steps, values = _curve(metrics, split, key)
            if steps:
                ax.plot(steps, values, marker="o" if split == "valid" else None, ms=3, lw=1.2, label=label)
                plotted += values
        if plotted:
            if title in ("ELBO", "Reconstruction E_q[log p(x|z)]"):
                _robust_ylim(ax, plotted)
            if len(series) > 1:
                ax.legend(fontsize=7, frameon=False)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[3:]:
        ax.set_xlabel("training step")
    fig.suptitle("Training curves (train: running means over log_every steps; valid: evaluation passes)")
    return fig


def kl_per_dim_figure(
    kl_per_dim: Sequence[float], variance: Sequence[float] | None = None, *, threshold: float = 0.01
) -> Figure:
    """KL(q(z_j|x) || p(z_j)) averaged over examples, one bar per latent dimension, sorted largest first.

    With ``variance`` (the posterior-mean variance per dimension), bars of active units (variance > ``threshold``,
    Burda et al., 2016) are drawn in colour and the inactive ones in grey.
    """
    kl = np.asarray(kl_per_dim, dtype=float)
    order = np.argsort(-kl)
    fig = new_figure()
    ax = fig.add_subplot()
    colours = "tab:blue"
    if variance is not None:
        active = np.asarray(variance, dtype=float)[order] > threshold
        colours = ["tab:blue" if a else "tab:gray" for a in active]
        handles = [
            Patch(color="tab:blue", label=f"active (Cov_x E_q[z_j] > {threshold})"),
            Patch(color="tab:gray", label="inactive"),
        ]
        ax.legend(handles=handles, fontsize=8, frameon=False)
    ax.bar(np.arange(len(kl)), kl[order], color=colours, width=0.8)
    if len(kl) <= 20:
        ax.set_xticks(np.arange(len(kl)))
        ax.set_xticklabels([f"z{j + 1}" for j in order], fontsize=7, rotation=90)
    ax.set_xlabel("latent dimension, sorted by KL")
    ax.set_ylabel(f"KL ({NATS})")
    ax.set_title(f"KL per latent dimension (total {kl.sum():.2f} nats)")
    ax.grid(alpha=0.3, axis="y")
    return fig


def study_table(study: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    """An estimator study as ``{proposal: {k: row}}``, from either layout.

    Accepts ``{"rows": [{"proposal", "k", "mean", ...}, ...]}`` (:func:`vaelab.diagnostics.estimator_study`) or the
    nested ``{proposal: {k: {"mean", ...}}}``.
    """
    if isinstance(study.get("rows"), list):
        table: dict[str, dict[int, dict[str, Any]]] = {}
        for row in study["rows"]:
            table.setdefault(str(row["proposal"]), {})[int(row["k"])] = row
        return table
    return {
        str(proposal): {int(k): row for k, row in series.items()}
        for proposal, series in study.items()
        if isinstance(series, dict)
    }


def curve_table(curve: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """A curve over k as ``{k: {"mean", "sem", ...}}``, from either layout.

    Accepts parallel lists ``{"k": [...], "mean": [...], "sem": [...], ...}`` (:func:`vaelab.diagnostics.iwae_curve`) or
    the nested ``{k: {"mean", "sem"}}`` of :func:`vaelab.evaluate.evaluate_model`'s ``iwae``.
    """
    if isinstance(curve.get("k"), list):
        columns = {key: v for key, v in curve.items() if isinstance(v, list) and len(v) == len(curve["k"])}
        return {int(k): {key: v[i] for key, v in columns.items()} for i, k in enumerate(curve["k"])}
    return {int(k): row for k, row in curve.items() if isinstance(row, dict)}


def _ks_and(series: dict[int, dict[str, Any]], *keys: str) -> tuple[np.ndarray, np.ndarray]:
    """(k values ascending, the first of ``keys`` present with a number at each k; NaN where none is)."""
    ks = sorted(series)
    values = []
    for k in ks:
        found = [_num(series[k].get(key)) for key in keys]
        values.append(next((v for v in found if math.isfinite(v)), math.nan))
    return np.asarray(ks, dtype=float), np.asarray(values)


def _num(value) -> float:
    """A float, NaN for None (JSON's stand-in for a value that is not finite) or anything not a number."""
    return float(value) if isinstance(value, int | float) else math.nan


def _log_k_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, log-scaled k axis, legend and grid shared by the curves against k."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3, which="both")


def _band(ax, ks, mean, err, label, colour) -> None:
    ax.plot(ks, mean, marker="o", ms=3, color=colour, label=label)
    if np.isfinite(err).any():
        err = np.where(np.isfinite(err), err, 0.0)
        ax.fill_between(ks, mean - err, mean + err, color=colour, alpha=0.25, linewidth=0)


def estimator_figure(
    study: dict[str, Any], *, reference: float | None = None, reference_label: str = "reference"
) -> Figure:
    """Naive Monte Carlo vs importance sampling: the log p(x) estimate against k for each proposal.

    ``study``: an estimator study in either layout of :func:`study_table` (nats per example). The band is
    ``mean ± mean_mc_stderr`` (the average per-example Monte Carlo standard error: how far one example's estimate
    moves with fresh samples), or ``± sem`` when that is missing. ``reference``: a trusted log p(x) on the same
    examples (exact, or a large-k estimate), drawn as a dashed line.
    """
    fig = new_figure()
    ax = fig.add_subplot()
    colours = colormaps["tab10"]
    for i, (proposal, series) in enumerate(study_table(study).items()):
        ks, mean = _ks_and(series, "mean")
        _, err = _ks_and(series, "mean_mc_stderr", "mean_stderr", "sem")
        name = {"prior": "prior p(z): naive Monte Carlo", "posterior": "encoder q(z|x): importance sampling"}
        _band(ax, ks, mean, err, name.get(proposal, f"proposal {proposal}"), colours(i))
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="black", ls="--", lw=1, label=f"{reference_label} {reference:.2f}")
    _log_k_axes(
        ax,
        "k, samples per example (log scale)",
        f"estimate of log p(x) ({NATS})",
        "log p(x) estimate vs k, by proposal (± Monte Carlo stderr)",
    )
    return fig


def iwae_curve_figure(curve: dict[str, Any], *, log_px: float | None = None, elbo: float | None = None) -> Figure:
    """The IWAE bound E[log (1/k) sum_i w_i] against k with ± standard-error bands over examples, log k axis.

    ``curve``: either layout of :func:`curve_table`. The bound rises with k towards log p(x) (Burda et al., 2016,
    thm. 1); ``log_px`` and ``elbo`` add reference lines.
    """
    fig = new_figure()
    ax = fig.add_subplot()
    table = curve_table(curve)
    ks, mean = _ks_and(table, "mean")
    _, sem = _ks_and(table, "sem")
    _band(ax, ks, mean, sem, "IWAE_k ± standard error over examples", "tab:blue")
    if log_px is not None and math.isfinite(log_px):
        ax.axhline(log_px, color="black", ls="--", lw=1, label=f"log p(x) estimate {log_px:.2f}")
    if elbo is not None and math.isfinite(elbo):
        ax.axhline(elbo, color="tab:red", ls=":", lw=1, label=f"ELBO {elbo:.2f}")
    _log_k_axes(ax, "k, importance samples (log scale)", f"IWAE bound ({NATS})", "IWAE bound vs k")
    return fig


def gap_histogram_figure(gaps: dict[str, Sequence[float]], *, bins: int = 40) -> Figure:
    """Histograms of per-example gaps (``{name: [N] values}``, nats), overlaid, with each mean marked."""
    fig = new_figure()
    ax = fig.add_subplot()
    colours = colormaps["tab10"]
    arrays = {name: np.asarray([_num(v) for v in values]) for name, values in gaps.items()}  # None -> NaN
    finite = {name: v[np.isfinite(v)] for name, v in arrays.items()}
    everything = np.concatenate([v for v in finite.values() if len(v)] or [np.zeros(1)])
    edges = np.histogram_bin_edges(everything, bins=bins)
    for i, (name, values) in enumerate(finite.items()):
        if not len(values):
            continue
        ax.hist(values, bins=edges, alpha=0.5, color=colours(i), label=f"{name} (mean {values.mean():.2f})")
        ax.axvline(values.mean(), color=colours(i), lw=1.2)
    ax.set_xlabel(f"gap ({NATS})")
    ax.set_ylabel("examples")
    ax.set_title("Per-example gaps")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return fig


GAP_KEYS = ("posterior_gap", "approximation_gap", "amortization_gap")


def class_samples_figure(model, classes: Sequence[int], n: int = 10, *, seed: int = 0) -> Figure:
    """:func:`class_sample_images` as a figure: rows are classes, columns share their z."""
    images = class_sample_images(model, classes, n, seed=seed)
    rows = [(str(c), row) for c, row in zip(classes, images.split(n), strict=True)]
    return labelled_rows_figure(rows, images.shape[1:], "Samples per class (columns share z)", ylabel="class y")


def labelled_rows_figure(
    rows: Sequence[tuple[str, torch.Tensor]], data_shape, title: str, *, ylabel: str | None = None
) -> Figure:
    """One row of images per ``(label, Tensor[n, ...])`` pair (each reshaped to ``data_shape``, values clamped to
    [0, 1]), the label at the row's left; rows with fewer images than the longest are left blank at the end."""
    if not rows:
        raise ValueError("labelled_rows_figure needs at least one row")
    n = max(len(images) for _, images in rows)
    blank = torch.ones(1, *data_shape)  # shows as white, like the padding
    tiles = [
        torch.cat([images.reshape(-1, *data_shape).float().cpu(), blank.expand(n - len(images), *data_shape)])
        for _, images in rows
    ]
    fig = new_figure((0.5 * n + 1.8, 0.5 * len(rows) + 0.8))
    grid = image_grid(torch.cat(tiles), data_shape, ncol=n)
    ax = _show_grid(fig, grid, title)
    height = (grid.shape[0] - 2) / len(rows)  # image_grid's rows: the image and 2 pixels of padding
    ax.set_yticks([2 + height * (i + 0.5) for i in range(len(rows))], [label for label, _ in rows])
    if ylabel:
        ax.set_ylabel(ylabel)
    return fig


def reliability_figure(reliability: Mapping[str, Any], *, ece: float | None = None) -> Figure:
    """The reliability diagram of :func:`vaelab.evaluate.classification_metrics`: accuracy against mean confidence
    per equal-width confidence bin (bars; empty bins left out), the diagonal of perfect calibration, and the share of
    examples in each bin."""
    edges = np.asarray(reliability["edges"], dtype=float)
    counts = np.asarray(reliability["count"], dtype=float)
    filled = counts > 0
    accuracy = np.array([a if a is not None else np.nan for a in reliability["accuracy"]], dtype=float)
    confidence = np.array([c if c is not None else np.nan for c in reliability["confidence"]], dtype=float)
    fig = new_figure((5.0, 5.0))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    width = np.diff(edges)
    top.bar(edges[:-1][filled], accuracy[filled], width=width[filled], align="edge", edgecolor="k", label="accuracy")
    top.plot(confidence[filled], confidence[filled], "o", color="C3", ms=3, label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    top.set_ylabel("accuracy in the bin")
    title = "Reliability diagram" + (f" (ECE {ece:.4f})" if ece is not None else "")
    top.set_title(title)
    top.set_ylim(0, 1)
    top.legend(fontsize=8, frameon=False, loc="upper left")
    bottom.bar(edges[:-1], counts / max(counts.sum(), 1), width=width, align="edge", edgecolor="k")
    bottom.set_xlabel("confidence of the predicted class")
    bottom.set_ylabel("share")
    bottom.set_xlim(0, 1)
    return fig


def confusion_figure(confusion: Sequence[Sequence[int]]) -> Figure:
    """The confusion matrix (rows the true class, columns the predicted one), shaded by the share of each row."""
    counts = np.asarray(confusion, dtype=float)
    classes = len(counts)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig = new_figure((5.0, 4.5))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(classes):
        for j in range(classes):
            if counts[i, j]:
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (counts; shade: share of the row)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def draw_pictures(
    model,
    x: torch.Tensor,
    out_dir: str | Path,
    *,
    labels: torch.Tensor | None = None,
    metrics: Sequence[dict[str, Any]] = (),
    diagnostics: dict[str, Any] | None = None,
    context: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Path]:
    """Every picture that applies to this model, as PNGs in ``out_dir``: ``{name: path}`` in reading order.

    A model that asks for context (given ``context``, aligned with ``x``) is shown given each example's: its
    reconstructions, and samples per class (a model of p(x, z | y) with ``classes``); the pictures that draw from
    one prior p(z) (samples, traversals, the manifold, the latent scatter) are left out. A model without latent
    variables (a classifier) gets no pictures of z. Where ``diagnostics`` holds ``classification`` (a model that
    predicts labels), its reliability diagram and confusion matrix are drawn.

    ``x`` (``[N, *data_shape]``) and ``labels`` (``[N]``) are the evaluation examples; ``metrics`` the run's
    ``metrics.jsonl`` lines; ``diagnostics`` the result of :func:`vaelab.evaluate.evaluate_model` (or of
    :func:`vaelab.diagnostics.diagnostics`, as :func:`vaelab.report.as_json` writes it). Pictures whose inputs are
    missing (a manifold for d != 2, curves nobody computed or that do not apply, pictures of examples for data that are
    not images) are left out.
    """
    out_dir = Path(out_dir)
    diagnostics = diagnostics or {}
    figures: dict[str, Any] = {}
    conditional = bool(getattr(model, "context", ()))
    latent = callable(getattr(model, "encode", None)) or conditional  # a classifier p(y|x) has no z to picture
    images = shows_as_images(x.shape[1:])  # pictures of examples; other data (vectors, say) get the rest
    if images and latent:
        figures["reconstructions"] = lambda: reconstructions_figure(bind(model, context, slice(0, 12)), x[:12])
    if images and callable(getattr(model, "given", None)) and getattr(model, "classes", None):  # p(x, z | y)
        figures["class_samples"] = lambda: class_samples_figure(model, range(model.classes))
    if images and latent and not conditional:
        figures["samples"] = lambda: samples_figure(model, 64)
        variance = diagnostics.get("posterior_mean_variance")
        figures["traversals"] = lambda: traversal_figure(model, x, variance=variance)
        if latent_dim(model) == 2:
            figures["manifold"] = lambda: manifold_figure(model)
    if latent and not conditional:
        figures["latents"] = lambda: latent_scatter_figure(model, x, labels)
    classification = diagnostics.get("classification")
    if isinstance(classification, Mapping):
        figures["reliability"] = lambda: reliability_figure(classification["reliability"], ece=classification["ece"])
        figures["confusion"] = lambda: confusion_figure(classification["confusion"])
    if metrics:
        figures["training_curves"] = lambda: training_curves_figure(metrics)
    if diagnostics.get("kl_per_dim"):
        figures["kl_per_dim"] = lambda: kl_per_dim_figure(
            diagnostics["kl_per_dim"], diagnostics.get("posterior_mean_variance")
        )
    log_px = diagnostics.get("log_px", {}).get("mean")
    if isinstance(diagnostics.get("estimator_study"), dict):  # a string says why it does not apply
        figures["estimators"] = lambda: _estimator_with_reference(diagnostics["estimator_study"])
    curve = diagnostics.get("iwae_curve")
    curve = curve if isinstance(curve, dict) else diagnostics.get("iwae")
    if curve:
        elbo = diagnostics.get("elbo", {}).get("kl", {}).get("mean")
        figures["iwae_curve"] = lambda: iwae_curve_figure(curve, log_px=log_px, elbo=elbo)
    decomposed = diagnostics.get("gap_decomposition")
    sources = dict(diagnostics)
    if isinstance(decomposed, dict) and "posterior_gap" in decomposed:  # on the same examples as the other two
        sources["posterior_gap"] = decomposed["posterior_gap"]
    gaps = {
        key.replace("_", " "): sources[key]["per_example"]
        for key in GAP_KEYS
        if isinstance(sources.get(key), dict) and sources[key].get("per_example")
    }
    if gaps:
        figures["gaps"] = lambda: gap_histogram_figure(gaps)
    return {name: save_figure(make(), out_dir / f"{name}.png") for name, make in figures.items()}


def _estimator_with_reference(study: dict[str, Any]) -> Figure:
    """The estimator figure with the importance-sampling estimate at the largest k as reference: the study may run
    on a subset of the examples, so the full set's log p(x) would not be comparable."""
    posterior = study_table(study).get("posterior") or {}
    finite = {k: _num(row.get("mean")) for k, row in posterior.items() if math.isfinite(_num(row.get("mean")))}
    if not finite:
        return estimator_figure(study)
    k = max(finite)
    return estimator_figure(study, reference=finite[k], reference_label=f"importance sampling at k={k}:")


def beta_comparison_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Active units and total KL(q || p(z)) against the final beta of each run (a beta sweep), two panels."""
    points = [r for r in rows if r.get("beta") is not None]
    fig = new_figure((9, 3.5))
    left, right = fig.subplots(1, 2)
    betas = [r["beta"] for r in points]
    left.plot(betas, [r["active_units"] for r in points], "o-")
    left.set_xlabel("final beta (KL weight)")
    left.set_ylabel("active units")
    left.set_title("Active units (Cov_x E_q[z_j] > 0.01)")
    right.plot(betas, [r["kl_total"] if r["kl_total"] is not None else math.nan for r in points], "o-")
    right.set_xlabel("final beta (KL weight)")
    right.set_ylabel(f"KL(q(z|x) || p(z)) ({NATS})")
    right.set_title("Information in the latent code")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
