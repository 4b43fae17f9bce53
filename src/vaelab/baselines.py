"""Baselines: classic models of the data whose held-out log p(x) a deep model of the same data should beat.

:data:`BASELINES` maps a name to a :class:`Baseline`. Two uses:

- The ladder (``vaelab baselines``, :func:`run_ladder`): kernel density estimates, mixtures by EM, pPCA and factor
  analysis, each fitted on the training split, tuned on the validation split and scored on the test split, in one
  space (:data:`SPACES`) so that the numbers compare: binary data as a mass function on {0,1}^D; 8-bit grey data
  dequantized, (x + u) / 256, as a density on [0,1]^D, in nats and bits/dim (docs/baselines.md).
- ``vaelab eval``, ``report`` and ``compare`` run every entry with an ``applies_to`` (pPCA with the model's latent
  size) and write ``"<name>_baseline"``: its result, or ``"not applicable: <reason>"``. Comparability is decided from
  the model's decoder distribution, by its ``support``: a density on R^D (``real``, possibly under ``independent``)
  is comparable with another density on R^D; a mass function on {0, 1}^D (Bernoulli) or a density on [0, 1]^D
  (continuous Bernoulli) is not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.distributions import constraints

from vaelab.diagnostics import NotApplicable, PerExample, is_real_support
from vaelab.estimators import data_support
from vaelab.evaluate import summarize
from vaelab.likelihoods import bits_per_dim as discrete_bits_per_dim
from vaelab.models import LinearGaussian

PPCA_NOTE = (
    "exact log p(x) of probabilistic PCA fitted by maximum likelihood to the flattened continuous training data; "
    "comparable only with models of the same continuous data under normalized densities on R^D (e.g. Gaussian "
    "likelihoods), not with Bernoulli models of binarized data (a mass function on {0,1} vs a density on R^D)"
)


def density_on_real_space(model, data: torch.Tensor) -> str | None:
    """None if the model's p(x|z) is a density on R^D (so log p(x) is comparable with another one on R^D)."""
    support = data_support(model, data)
    if is_real_support(support):
        return None
    return f"the model's p(x|z) has support {support}, not R^D: its log p(x) is not comparable with a density on R^D"


def ppca(train_x: torch.Tensor, test_x: torch.Tensor, latent_dim: int) -> dict[str, Any]:
    """Exact held-out log p(x) of maximum-likelihood probabilistic PCA (Tipping & Bishop, 1999).

    Fits :meth:`vaelab.models.LinearGaussian.fit_ppca` to the flattened training data in float64 and evaluates the
    exact ``log_marginal_exact`` on the test data: a closed-form floor that a deep model of the same continuous data
    should beat.

    Returns:
        ``test_log_px`` (a :class:`~vaelab.diagnostics.PerExample`), ``train_log_px`` (``{"mean", "sem"}``),
        ``noise_var`` (the fitted sigma^2), ``latent_dim``, ``data_dim``, ``train_examples``, ``examples``, ``note``.
    """
    train = train_x.detach().reshape(len(train_x), -1).to(torch.float64).cpu()
    test = test_x.detach().reshape(len(test_x), -1).to(torch.float64).cpu()
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train and test examples differ in size: {train.shape[1]} vs {test.shape[1]} values")
    model = LinearGaussian.fit_ppca(train, latent_dim)
    with torch.no_grad():
        test_log_px = model.log_marginal_exact(test)
        train_log_px = model.log_marginal_exact(train)
    return {
        "examples": len(test),
        "train_examples": len(train),
        "units": "nats per example",
        "latent_dim": latent_dim,
        "data_dim": int(train.shape[1]),
        "noise_var": model.noise_var.item(),
        "test_log_px": PerExample(test_log_px),
        "train_log_px": summarize(train_log_px),
        "note": PPCA_NOTE,
    }


# --- the ladder: one protocol so that the numbers compare ------------------------------------------------------------
# Every ladder baseline is fitted on the training split, tuned on the validation split and scored on the test split,
# all in the same space (:data:`SPACES`), in nats per example.
BINARY = "binary"
DEQUANTIZED = "dequantized"
SPACES = {
    BINARY: "a mass function on {0,1}^D (binary pixels), nats per example",
    DEQUANTIZED: "a density on [0,1]^D of the 8-bit pixels dequantized as (x + u) / 256, u ~ U[0,1)^D, nats per "
    "example and bits/dim",
}
QUANTIZATION_LEVELS = 256  # 8-bit grey levels


def dequantize(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """8-bit pixels ``x`` (uint8, 0..255) as ``(x + u) / 256`` in float64, ``u ~ U[0, 1)`` per value.

    Uniform dequantization (Theis, van den Oord & Bethge 2016).

    ``u`` comes from a CPU generator seeded ``seed``, so the same images and seed give the same points, and a prefix
    of the rows gets the same draws as in the whole tensor.
    """
    if x.dtype != torch.uint8:
        raise ValueError(f"dequantization needs 8-bit pixels (uint8 0..255), got dtype {x.dtype}")
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x.to(torch.float64) + u) / QUANTIZATION_LEVELS


def bits_per_dim(log_px: torch.Tensor | float, data_dim: int) -> torch.Tensor | float:
    """Bits per dimension of the 8-bit data from ``log_px``, the log-density (nats) of a density on [0,1]^D.

    A density p on [0,1]^D of the dequantized data (x + u) / 256 defines a discrete model of the pixels,
    P(x) = integral of p over x's cube of side 1/256, with log P(x) >= E_u log p((x + u) / 256) - D log 256 (Jensen;
    equality for p constant on each cube). So the bits per dimension of the discrete data are at most
    -(log p - D ln 256) / (D ln 2) = -log p / (D ln 2) + 8: a uniform density (log p = 0) gives exactly 8.
    """
    return discrete_bits_per_dim(log_px - data_dim * math.log(QUANTIZATION_LEVELS), data_dim)


@dataclass(frozen=True)
class LadderData:
    """The three splits as every ladder model sees them: flattened ``[N, D]`` float64 values in one space.

    ``split`` names the test examples exactly (data set, rows, binarization or dequantization seed): two numbers are
    comparable only when their ``space`` and ``split`` agree.
    """

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    space: str
    split: str
    data_shape: tuple[int, ...]
    binarization_seed: int | None = None  # the seed of binarize_fixed where grey data were binarized

    @property
    def data_dim(self) -> int:
        return int(self.train.shape[1])


def ladder_data(
    splits, space: str, *, examples: int | None = None, valid_examples: int | None = None, seed: int = 0
) -> LadderData:
    """:class:`LadderData` from :class:`vaelab.data.Splits`: binary data as they are, 8-bit grey data either
    dequantized (``space="dequantized"``) or binarized by :func:`vaelab.data.binarize_fixed` with ``seed`` (the fixed
    binarization of ``vaelab eval``); ``examples`` test and ``valid_examples`` validation images spread evenly over
    their splits (:func:`vaelab.data.spread`, as ``vaelab eval --examples`` takes them)."""
    from vaelab.data import as_float, binarize_fixed, spread

    if space not in SPACES:
        raise ValueError(f"unknown space {space!r}; choose from {', '.join(SPACES)}")
    test = splits.test[spread(len(splits.test), examples)]
    valid = splits.valid[spread(len(splits.valid), valid_examples)]
    if len(test) == 0 or len(valid) == 0 or len(splits.train) == 0:
        raise ValueError(f"{splits.name}: the ladder needs train, validation and test examples")
    parts = (splits.train, valid, test)
    if space == DEQUANTIZED:
        if splits.binary or splits.train.dtype != torch.uint8:
            raise ValueError(f"{splits.name} is not 8-bit grey data: dequantization applies to uint8 pixels only")
        # the test set with ``seed`` itself (what the split names); the others with seeds of their own
        seeds = (seed + 1, seed + 2, seed)
        values, how = [dequantize(x, s) for s, x in zip(seeds, parts, strict=True)], f"dequantized with seed {seed}"
    elif splits.binary:
        values, how = [as_float(x).double() for x in parts], "binary as stored"
    else:
        values = [binarize_fixed(as_float(x), seed=seed).double() for x in parts]
        how = f"binarized with seed {seed}"
    train, valid, test = (x.reshape(len(x), -1) for x in values)
    binarized = seed if space == BINARY and not splits.binary else None
    rows = "" if len(test) == len(splits.test) else f" ({len(test)} of {len(splits.test)}, spread evenly)"
    split = f"{splits.name} test{rows}, {how}"
    return LadderData(train, valid, test, space, split, splits.data_shape, binarized)


@dataclass(frozen=True)
class Fitted:
    """A ladder model as validation chose it, in its ladder space: ``log_prob(x [B, D]) -> [B]`` nats, and
    ``sample(n, generator) -> [n, D]`` draws x ~ p(x) (on the CPU, float64) for pictures."""

    log_prob: Callable[[torch.Tensor], torch.Tensor]
    sample: Callable[[int, torch.Generator], torch.Tensor]


# --- kernel density estimation ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    """A kernel whose log is affine in the squared distance: log K_h(x, x_i) = slope(h) ||x - x_i||^2 + offset(h, D).

    Gaussian: N(x; x_i, h^2 I), slope -1 / (2 h^2), offset -D/2 log(2 pi h^2). Product of Bernoullis on {0,1}^D with
    flip probability h: h^m (1 - h)^(D - m) for m = ||x - x_i||^2 differing bits, slope log h - log(1 - h), offset
    D log(1 - h). ``max_bandwidth``: bandwidths must lie in (0, max_bandwidth).
    """

    slope: Callable[[torch.Tensor], torch.Tensor]
    offset: Callable[[torch.Tensor, int], torch.Tensor]
    max_bandwidth: float
    space: str | None  # the one space it models (None: any continuous data)


KERNELS: dict[str, Kernel] = {
    "gaussian": Kernel(
        slope=lambda h: -0.5 / h**2,
        offset=lambda h, d: -0.5 * d * torch.log(2 * math.pi * h**2),
        max_bandwidth=math.inf,
        space=None,
    ),
    "bernoulli": Kernel(
        slope=lambda h: torch.log(h) - torch.log1p(-h),
        offset=lambda h, d: d * torch.log1p(-h),
        max_bandwidth=1.0,
        space=BINARY,
    ),
}

_KDE_BLOCK = 1 << 22  # values of one [H, B, C] block of kernel terms (32 MiB in float64): memory flat in n


def kde_log_density(
    x: torch.Tensor, centers: torch.Tensor, bandwidths: torch.Tensor | Sequence[float], kernel: str = "gaussian"
) -> torch.Tensor:
    """Exact log-density of the kernel density estimate p_h(x) = (1/n) sum_i K_h(x, x_i), for several bandwidths.

    Streamed over blocks of training points in log space: a running ``logaddexp`` of each block's ``logsumexp``, so
    memory stays flat in n (one ``[H, B, C]`` block of at most 2^22 values) and it runs on the tensors' device.

    Args:
        x: ``Tensor[B, D]`` points to score.
        centers: ``Tensor[n, D]`` the training points x_i (same dtype and device).
        bandwidths: ``H`` bandwidths h (Gaussian: the kernel's standard deviation; Bernoulli: its flip probability).
        kernel: a key of :data:`KERNELS`.

    Returns:
        ``Tensor[H, B]``: log p_h(x) in nats.
    """
    spec = KERNELS[kernel]
    h = torch.as_tensor(bandwidths, dtype=x.dtype, device=x.device).reshape(-1)
    _check_bandwidths(h, kernel)
    if x.ndim != 2 or centers.ndim != 2 or x.shape[1] != centers.shape[1]:
        raise ValueError(f"need x [B, D] and centers [n, D], got {tuple(x.shape)} and {tuple(centers.shape)}")
    n, data_dim = centers.shape
    slope = spec.slope(h)[:, None, None]  # [H, 1, 1]
    rows = max(1, min(len(x), 1024))
    cols = max(1, _KDE_BLOCK // (len(h) * rows))
    center_sq = centers.square().sum(1)  # [n]
    out = []
    for xb in x.split(rows):
        x_sq = xb.square().sum(1, keepdim=True)  # [b, 1]
        acc = torch.full((len(h), len(xb)), -math.inf, dtype=x.dtype, device=x.device)  # [H, b]
        for start in range(0, n, cols):
            cb = centers[start : start + cols]
            sq = (x_sq + center_sq[start : start + cols] - 2 * xb @ cb.T).clamp_min(0)  # [b, c] squared distances
            acc = torch.logaddexp(acc, (slope * sq).logsumexp(-1))  # [H, b]
        out.append(acc)
    return torch.cat(out, 1) - math.log(n) + spec.offset(h, data_dim)[:, None]


def kde_sample(
    centers: torch.Tensor, bandwidth: float, kernel: str, n: int, generator: torch.Generator
) -> torch.Tensor:
    """``n`` draws of the KDE: a training point x_i uniformly at random, then x ~ K_h(., x_i) (Gaussian noise of
    standard deviation h, or each bit flipped with probability h), ``[n, D]`` on the CPU."""
    _check_bandwidths(torch.tensor([bandwidth], dtype=torch.float64), kernel)
    picks = centers.cpu()[torch.randint(len(centers), (n,), generator=generator)]
    if kernel == "bernoulli":
        flips = torch.rand(picks.shape, generator=generator, dtype=picks.dtype) < bandwidth
        return torch.where(flips, 1 - picks, picks)
    return picks + bandwidth * torch.randn(picks.shape, generator=generator, dtype=picks.dtype)


def _check_bandwidths(h: torch.Tensor, kernel: str) -> None:
    top = KERNELS[kernel].max_bandwidth
    if h.numel() == 0 or not bool(((h > 0) & (h < top)).all()):
        bad = h[~((h > 0) & (h < top))].tolist() if h.numel() else "none"
        raise ValueError(f"{kernel} kernel bandwidths must lie in (0, {top}), got {bad}")


def default_bandwidths(train: torch.Tensor, kernel: str, points: int = 12) -> torch.Tensor:
    """A log-spaced grid: flip probabilities 1e-4..0.45 (Bernoulli); 0.01..2 times the mean per-value standard
    deviation of the training data (Gaussian)."""
    if kernel == "bernoulli":
        return torch.logspace(math.log10(1e-4), math.log10(0.45), points, dtype=torch.float64)
    scale = train.std(0).mean().clamp_min(torch.finfo(train.dtype).eps).item()
    return torch.logspace(math.log10(0.01 * scale), math.log10(2 * scale), points, dtype=torch.float64)


def select_bandwidth(
    train: torch.Tensor,
    valid: torch.Tensor,
    kernel: str,
    grid: torch.Tensor | Sequence[float] | None = None,
    *,
    refinements: int = 2,
    points: int = 9,
) -> tuple[float, list[dict[str, float]]]:
    """The bandwidth of highest mean validation log-likelihood: a log-spaced grid, then ``refinements`` finer
    log-spaced grids of ``points`` bandwidths spanning the two neighbours of the best so far.

    Returns:
        the bandwidth, and every bandwidth tried with its mean validation log p (nats), in the order tried.
    """
    grid = default_bandwidths(train, kernel) if grid is None else torch.as_tensor(grid, dtype=torch.float64)
    grid = grid.sort().values
    _check_bandwidths(grid, kernel)
    tried: list[dict[str, float]] = []
    step = (grid[1:] / grid[:-1]).max().item() if len(grid) > 1 else 2.0  # the grid's widest ratio
    for level in range(refinements + 1):
        means = kde_log_density(valid, train, grid.to(train), kernel).mean(1).cpu()
        tried += [{"bandwidth": h, "valid_log_px": m} for h, m in zip(grid.tolist(), means.tolist(), strict=True)]
        best = max(tried, key=lambda t: t["valid_log_px"])["bandwidth"]
        if level < refinements:
            lo, hi = best / step, min(best * step, KERNELS[kernel].max_bandwidth * (1 - 1e-9))
            grid = torch.logspace(math.log10(lo), math.log10(hi), points, dtype=torch.float64)
            step = (hi / lo) ** (1 / (points - 1))
    return best, tried


def kde(kernel: str):
    """Kernel density estimate of the (subsampled) training set with ``kernel``, bandwidth by validation."""

    def fit_and_score(data: LadderData, grid, settings: LadderSettings) -> dict[str, Any]:
        return _kde(data, grid, settings, kernel)

    return fit_and_score


def _kde(data: LadderData, grid, settings: LadderSettings, kernel: str) -> dict[str, Any]:
    """The effect of the subsample is shown by re-tuning on nested subsamples of n/16 and n/4 points
    (``subsample_effect``: their best mean validation log p)."""
    device = torch.device(settings.device)
    train = _subsample(data.train, settings).to(device)
    valid, test = data.valid.to(device), data.test.to(device)
    bandwidth, tried = select_bandwidth(train, valid, kernel, grid)
    effect = []
    for m in sorted({max(1, len(train) // 16), max(1, len(train) // 4)}):
        h, curve = select_bandwidth(train[:m], valid, kernel, grid, refinements=1)
        effect.append({"train_examples": m, "bandwidth": h, "valid_log_px": max(t["valid_log_px"] for t in curve)})
    best_valid = max(t["valid_log_px"] for t in tried)
    effect.append({"train_examples": len(train), "bandwidth": bandwidth, "valid_log_px": best_valid})
    return {
        "test_log_px": PerExample(kde_log_density(test, train, [bandwidth], kernel)[0].cpu()),
        "model": Fitted(
            lambda x: kde_log_density(x.to(device), train, [bandwidth], kernel)[0].cpu(),
            lambda n, generator: kde_sample(train, bandwidth, kernel, n, generator),
        ),
        "chosen": {"kernel": kernel, "bandwidth": bandwidth},
        "validation": tried,
        "train_examples": len(train),
        "subsample_effect": effect,
    }


def _subsample(x: torch.Tensor, settings: LadderSettings) -> torch.Tensor:
    """``settings.train_examples`` rows of ``x`` drawn without replacement (all of them, shuffled, if None)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(settings.seed))
    return x[order[: settings.train_examples]]


# --- mixtures by EM ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BernoulliMixture:
    """p(x) = sum_k pi_k prod_d mu_kd^x_d (1 - mu_kd)^(1 - x_d) on {0,1}^D, with ``log_weights [K]`` and
    ``probs [K, D]`` in (0, 1)."""

    log_weights: torch.Tensor
    probs: torch.Tensor

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """log pi_k + log p(x | k), ``Tensor[B, K]``."""
        log_p, log_q = self.probs.log(), torch.log1p(-self.probs)  # [K, D]
        return self.log_weights + x @ (log_p - log_q).T + log_q.sum(1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats, ``Tensor[B]``."""
        return torch.cat([self.joint(b).logsumexp(1) for b in x.split(_EM_ROWS)])

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` draws x ~ p(x): a component k ~ pi, then each pixel ~ Bernoulli(mu_kd); ``[n, D]`` on the CPU."""
        probs = self.probs.cpu()
        k = torch.multinomial(self.log_weights.exp().cpu(), n, replacement=True, generator=generator)
        return (torch.rand(n, probs.shape[1], generator=generator, dtype=probs.dtype) < probs[k]).to(probs.dtype)

    def log_prior(self, smoothing: float) -> torch.Tensor:
        """log of the MAP prior (up to a constant): Beta(1 + a, 1 + a) on every mu_kd, Dirichlet(1 + a) on pi."""
        return smoothing * (self.probs.log().sum() + torch.log1p(-self.probs).sum() + self.log_weights.sum())


_EM_ROWS = 4096  # examples per E-step block: memory [rows, K], flat in N


def fit_bernoulli_mixture(
    x: torch.Tensor,
    components: int,
    *,
    smoothing: float = 0.1,
    iterations: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
) -> tuple[BernoulliMixture, list[float]]:
    """A mixture of Bernoullis fitted to binary ``x [N, D]`` by EM, as a MAP estimate (Bishop 2006, sec. 9.3.3).

    The prior, Beta(1 + a, 1 + a) on each mu_kd and Dirichlet(1 + a) on the weights (``a = smoothing``: ``a``
    pseudo-observations of each outcome), keeps every mu_kd inside (0, 1), so that no test pixel gets probability 0;
    the M-step is then mu_k = (sum_n r_nk x_n + a) / (N_k + 2a), pi_k = (N_k + a) / (N + K a). EM for a MAP estimate
    never lowers the penalized log-likelihood sum_n log p(x_n) + log prior, which is what ``history`` records (per
    example, nats, one value per iteration, starting at the initial parameters).

    Initialisation: mu_k halfway between K distinct random training points and the mean image; equal weights.
    Stops when an iteration gains less than ``tol`` nats per example, or after ``iterations``.
    """
    n = len(x)
    _check_components(components, n)
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0 (it keeps every probability inside (0, 1)), got {smoothing}")
    picks = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:components].to(x.device)
    probs = 0.5 * x[picks] + 0.5 * x.mean(0)
    model = BernoulliMixture(torch.full((components,), -math.log(components), dtype=x.dtype, device=x.device), probs)
    model = BernoulliMixture(model.log_weights, probs.clamp(smoothing / (n + 2), 1 - smoothing / (n + 2)))
    history: list[float] = []
    for _ in range(iterations + 1):
        counts = x.new_zeros(components)  # N_k
        ones = x.new_zeros(components, x.shape[1])  # sum_n r_nk x_n
        log_lik = x.new_zeros(())
        for b in x.split(_EM_ROWS):  # E-step
            joint = model.joint(b)  # [b, K]
            log_px = joint.logsumexp(1, keepdim=True)
            r = (joint - log_px).exp()  # responsibilities [b, K]
            counts += r.sum(0)
            ones += r.T @ b
            log_lik += log_px.sum()
        history.append(((log_lik + model.log_prior(smoothing)) / n).item())
        if len(history) > 1 and history[-1] - history[-2] < tol:
            break
        probs = (ones + smoothing) / (counts[:, None] + 2 * smoothing)  # M-step
        log_weights = torch.log((counts + smoothing) / (n + components * smoothing))
        model = BernoulliMixture(log_weights, probs)
    return model, history


def _check_components(components: int, n: int) -> None:
    if not isinstance(components, int) or components < 1:
        raise ValueError(f"the number of mixture components K must be an integer >= 1, got {components!r}")
    if components > n:
        raise ValueError(f"K = {components} mixture components need at least K training points, got {n}")


def _tuned(data: LadderData, grid, settings: LadderSettings, name: str, fit, subsample: bool = True) -> dict:
    """Fit ``fit(train, value)`` (a :class:`Fitted`) for each ``value`` of ``grid`` on the training set (subsampled
    if ``subsample``), keep the one of highest mean validation log-likelihood, score the test set."""
    train = _subsample(data.train, settings) if subsample else data.train
    tried, best = [], None
    for value in grid:
        model = fit(train, value)
        mean = model.log_prob(data.valid).mean().item()
        tried.append({name: value, "valid_log_px": mean})
        if best is None or mean > best[0]:
            best = (mean, value, model)
    _, value, model = best
    return {
        "test_log_px": PerExample(model.log_prob(data.test).detach().cpu()),
        "model": model,
        "chosen": {name: value},
        "validation": tried,
        "train_examples": len(train),
    }


def bernoulli_mixture(data: LadderData, grid, settings: LadderSettings) -> dict[str, Any]:
    """Mixture of Bernoullis by EM (MAP, Beta/Dirichlet smoothing 0.1), K chosen on validation."""
    device = torch.device(settings.device)

    def fit(train, k):
        model, _ = fit_bernoulli_mixture(train.to(device), k, seed=settings.seed)
        return Fitted(lambda x: model.log_prob(x.to(device)), model.sample)

    return _tuned(data, grid, settings, "components", fit) | {"smoothing": 0.1}


def gaussian_mixture(covariance: str):
    """Gaussian mixture with ``covariance`` ("diag" or "full") matrices by scikit-learn's EM, K on validation."""

    def fit_and_score(data: LadderData, grid, settings: LadderSettings) -> dict[str, Any]:
        from sklearn.mixture import GaussianMixture

        def fit(train, k):
            _check_components(k, len(train))
            model = GaussianMixture(k, covariance_type=covariance, random_state=settings.seed).fit(train.numpy())
            return Fitted(lambda x: torch.from_numpy(model.score_samples(x.numpy())), partial(_gmm_sample, model))

        return _tuned(data, grid, settings, "components", fit)

    return fit_and_score


def _gmm_sample(model, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of a fitted scikit-learn ``GaussianMixture``, seeded from ``generator``, in random order
    (scikit-learn returns them grouped by component)."""
    model.random_state = int(torch.randint(2**31 - 1, (), generator=generator))
    x, _ = model.sample(n)
    return torch.from_numpy(x)[torch.randperm(n, generator=generator)]


# --- linear Gaussian models -------------------------------------------------------------------------------------------
def _check_latent_dim(latent_dim: int, data_dim: int) -> None:
    if not isinstance(latent_dim, int) or not 1 <= latent_dim < data_dim:
        raise ValueError(f"the latent dimension must be an integer in [1, D = {data_dim}), got {latent_dim!r}")


def fit_factor_analysis(x: torch.Tensor, latent_dim: int, seed: int = 0) -> LinearGaussian:
    """Factor analysis, p(x) = N(b, W W^T + Psi) with diagonal Psi, fitted by scikit-learn's ``FactorAnalysis``
    (maximum likelihood), as a :class:`~vaelab.models.LinearGaussian` whose exact log p(x) torch computes."""
    from sklearn.decomposition import FactorAnalysis

    _check_latent_dim(latent_dim, x.shape[1])
    fa = FactorAnalysis(latent_dim, random_state=seed).fit(x.double().cpu().numpy())
    return LinearGaussian(
        torch.from_numpy(fa.components_.T.copy()), torch.from_numpy(fa.mean_), torch.from_numpy(fa.noise_variance_)
    )


def linear_gaussian(fit_model, subsample: bool):
    """pPCA or factor analysis with the latent dimension chosen on validation, exact log p(x); fitted to the
    subsampled training set if ``subsample``, else to all of it."""

    def fit_and_score(data: LadderData, grid, settings: LadderSettings) -> dict[str, Any]:
        def fit(train, latent_dim):
            _check_latent_dim(latent_dim, data.data_dim)
            model = fit_model(train, latent_dim)
            return Fitted(model.log_marginal_exact, model.sample)

        with torch.no_grad():
            return _tuned(data, grid, settings, "latent_dim", fit, subsample)

    return fit_and_score


# --- the registry and the ladder --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LadderSettings:
    """How the ladder fits its baselines.

    Attributes:
        train_examples: the random subset of the training set the slow fits (KDE, mixtures, factor analysis) use;
            None: all of it. pPCA, in closed form, always uses all of it.
        grids: validation grids by name (``"bandwidth"``, ``"components"``, ``"latent_dim"``) replacing the defaults.
        seed: seed of the subsample and of the fits' initialisations.
        device: where the torch fits (KDE, mixture of Bernoullis) run, e.g. ``"cuda"``.
    """

    train_examples: int | None = 10000
    grids: dict[str, tuple] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"


@dataclass(frozen=True)
class Baseline:
    """A registry entry: a classic model of the data, for ``vaelab baselines`` and (if it says so) ``vaelab eval``.

    Attributes:
        description: one line for help texts and reports.
        spaces: the ladder spaces (:data:`SPACES`) it models, ``()`` if it is not on the ladder.
        ladder: ``(data, grid, settings) -> dict``: fit on ``data.train`` for each value of ``grid``, keep the best
            on ``data.valid``, score ``data.test``: ``test_log_px`` (:class:`~vaelab.diagnostics.PerExample`),
            ``model`` (the chosen :class:`Fitted`), ``chosen``, ``validation`` (every value tried and its mean
            validation log p), ``train_examples``.
        grid_name, grid: what the validation grid ranges over, and its default (``None``: derived from the data).
        applies_to: for ``vaelab eval``/``report``/``compare``: ``(model, data) -> None`` if the baseline's numbers
            are comparable with the model's on ``data`` (``[N, *data_shape]``), else the reason they are not; None:
            not run there.
        fit_and_score: for those commands: ``(train_x, test_x, latent_dim) -> dict``, JSON-ready apart from
            :class:`~vaelab.diagnostics.PerExample` values.
    """

    description: str
    spaces: tuple[str, ...] = ()
    ladder: Callable[[LadderData, Any, LadderSettings], dict[str, Any]] | None = None
    grid_name: str = ""
    grid: tuple | None = None
    applies_to: Callable[[Any, torch.Tensor], str | None] | None = None
    fit_and_score: Callable[[torch.Tensor, torch.Tensor, int], dict[str, Any]] | None = None


BASELINES: dict[str, Baseline] = {
    "kde-bernoulli": Baseline(
        "kernel density estimate, product-of-Bernoullis kernel (flip probability = bandwidth)",
        spaces=(BINARY,),
        ladder=kde("bernoulli"),
        grid_name="bandwidth",
    ),
    "kde-gaussian": Baseline(
        "kernel density estimate, Gaussian kernel",
        spaces=(DEQUANTIZED,),
        ladder=kde("gaussian"),
        grid_name="bandwidth",
    ),
    "bernoulli-mixture": Baseline(
        "mixture of Bernoullis by EM (MAP, smoothing 0.1)",
        spaces=(BINARY,),
        ladder=bernoulli_mixture,
        grid_name="components",
        grid=(10, 50, 100),
    ),
    "gmm-diag": Baseline(
        "Gaussian mixture, diagonal covariances, by EM (scikit-learn)",
        spaces=(DEQUANTIZED,),
        ladder=gaussian_mixture("diag"),
        grid_name="components",
        grid=(1, 10, 50),
    ),
    "gmm-full": Baseline(
        "Gaussian mixture, full covariances, by EM (scikit-learn)",
        spaces=(DEQUANTIZED,),
        ladder=gaussian_mixture("full"),
        grid_name="components",
        grid=(1, 2, 5),
    ),
    "ppca": Baseline(
        "probabilistic PCA in closed form, exact log p(x)",
        spaces=(DEQUANTIZED,),
        ladder=linear_gaussian(LinearGaussian.fit_ppca, subsample=False),
        grid_name="latent_dim",
        grid=(10, 20, 50, 100),
        applies_to=density_on_real_space,
        fit_and_score=ppca,
    ),
    "factor-analysis": Baseline(
        "factor analysis by EM (scikit-learn), exact log p(x)",
        spaces=(DEQUANTIZED,),
        ladder=linear_gaussian(fit_factor_analysis, subsample=True),
        grid_name="latent_dim",
        grid=(10, 20, 50),
    ),
}


def ladder_baselines(space: str, names: Sequence[str] | None = None) -> list[str]:
    """The ladder baselines for ``space``: ``names`` checked (each must model that space), or every one that does."""
    if names is None:
        return [name for name, b in BASELINES.items() if space in b.spaces]
    for name in names:
        if name not in BASELINES or not BASELINES[name].spaces:
            on_ladder = ", ".join(n for n, b in BASELINES.items() if b.spaces)
            raise ValueError(f"unknown ladder baseline {name!r}; choose from {on_ladder}")
        if space not in BASELINES[name].spaces:
            raise ValueError(
                f"{name} models {' or '.join(BASELINES[name].spaces)} data, not {space} data ({SPACES[space]})"
            )
    return list(names)


def run_ladder(
    data: LadderData,
    names: Sequence[str] | None = None,
    settings: LadderSettings | None = None,
    *,
    samples: int = 0,
) -> list[dict[str, Any]]:
    """Fit, tune and score each baseline of ``names`` (default: every one for ``data.space``) on ``data``.

    Returns one row per baseline (:func:`ladder_row`), with its fit time in seconds (tuning included) and its
    ``detail``: the chosen grid value, the validation curve, the training subsample size; with ``samples`` > 0 also
    ``"samples"``: that many draws x ~ p(x) of the chosen model, ``Tensor[samples, D]`` in the ladder's space (the
    same generator seed, ``settings.seed``, for each baseline), which the caller takes out before writing JSON.
    """
    settings = settings or LadderSettings()
    names_for = ladder_baselines(data.space, names)
    if settings.train_examples is not None and settings.train_examples < 1:
        raise ValueError(f"train_examples must be None or >= 1, got {settings.train_examples}")
    chosen = [(name, settings.grids.get(BASELINES[name].grid_name, BASELINES[name].grid)) for name in names_for]
    for name, grid in chosen:  # every grid checked before anything is fitted
        _check_grid(BASELINES[name].grid_name, grid, data, settings)
    rows = []
    for name, grid in chosen:
        baseline = BASELINES[name]
        start = time.perf_counter()
        result = baseline.ladder(data, grid, settings)
        seconds = time.perf_counter() - start
        detail = {key: value for key, value in result.items() if key not in ("test_log_px", "model")}
        rows.append(
            ladder_row(name, "baseline", data, summarize(result["test_log_px"].value), fit_seconds=seconds)
            | {"description": baseline.description, "detail": detail}
        )
        if samples:
            rows[-1]["samples"] = result["model"].sample(samples, torch.Generator().manual_seed(settings.seed))
    return rows


def _check_grid(grid_name: str, grid, data: LadderData, settings: LadderSettings) -> None:
    """A one-line ValueError for a grid value no fit could use: a bandwidth outside its kernel's range, more mixture
    components than training points, a latent dimension outside [1, D)."""
    if grid is None:
        return
    if grid_name == "bandwidth":
        _check_bandwidths(
            torch.as_tensor(grid, dtype=torch.float64), "bernoulli" if data.space == BINARY else "gaussian"
        )
    for value in grid:
        if grid_name == "components":
            _check_components(value, min(len(data.train), settings.train_examples or len(data.train)))
        elif grid_name == "latent_dim":
            _check_latent_dim(value, data.data_dim)


def ladder_row(name: str, kind: str, data: LadderData, log_px: dict[str, float], **extra) -> dict[str, Any]:
    """One row of the ladder table: ``log_px`` (``{"mean", "sem"}`` nats per example) on ``data``'s test split,
    with bits/dim where the space is dequantized."""
    row = {"name": name, "kind": kind, "space": data.space, "split": data.split, "log_px": log_px}
    if data.space == DEQUANTIZED:
        scale = data.data_dim * math.log(2)
        row["bits_per_dim"] = {"mean": bits_per_dim(log_px["mean"], data.data_dim), "sem": log_px["sem"] / scale}
    return row | extra


def incomparable(row: dict[str, Any], space: str, split: str) -> str | None:
    """None if ``row``'s number is on ``space`` and ``split``, else why it cannot stand beside those that are."""
    if "not_comparable" in row:
        return row["not_comparable"]
    if row["space"] != space:
        return f"{SPACES[row['space']]}, not {SPACES[space]}"
    if row["split"] != split:
        return f"scored on {row['split']}, not {split}"
    return None


def check_comparable(rows: Sequence[dict[str, Any]]) -> None:
    """Raise ValueError unless every row is on the space and split of the first one."""
    for row in rows[1:]:
        why = incomparable(row, rows[0]["space"], rows[0]["split"])
        if why is not None:
            raise ValueError(f"{row['name']} cannot stand beside {rows[0]['name']}: {why}")


def format_ladder(rows: Sequence[dict[str, Any]], space: str, split: str) -> str:
    """The ladder as text: each row on ``space`` and ``split`` with its log p(x) (and bits/dim), the others marked
    "not comparable" with the reason, never with a number."""
    bits = space == DEQUANTIZED
    head = f"{'model':<40} {'log p(x) nats':>20}" + (f" {'bits/dim':>16}" if bits else "") + f" {'fit s':>8}  detail"
    lines = [f"test split: {split}; {SPACES[space]}", head]
    for row in rows:
        why = incomparable(row, space, split)
        if why is not None:
            lines.append(f"{row['name'][-40:]:<40} not comparable: {why}")
            if "reconstruction" in row:  # an autoencoder: the number it has, beside its VAE's
                ours, theirs = row["reconstruction"], row["vae_reconstruction"]
                lines.append(
                    f"{'':<40} reconstruction -log p(x | E_q[z|x]): {ours['mean']:.2f} ± {ours['sem']:.2f} nats "
                    f"(the VAE's: {theirs['mean']:.2f} ± {theirs['sem']:.2f})"
                )
            continue
        lp = row["log_px"]
        line = f"{row['name'][-40:]:<40} {lp['mean']:>11.2f} ± {lp['sem']:<6.2f}"
        if bits:
            b = row["bits_per_dim"]
            line += f" {b['mean']:>9.4f} ± {b['sem']:<5.4f}"
        seconds = row.get("fit_seconds")
        line += f" {'-' if seconds is None else f'{seconds:.1f}':>8}  {_detail(row)}"
        lines.append(line)
    return "\n".join(lines)


def _detail(row: dict[str, Any]) -> str:
    detail = row.get("detail", {})
    chosen = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in detail.get("chosen", {}).items()
    )
    parts = [chosen] if chosen else []
    if "train_examples" in detail:
        parts.append(f"{detail['train_examples']} training points")
    if "source" in row:
        parts.append(row["source"])
    return "; ".join(parts)


def score_run(name: str, run, data: LadderData, *, k: int, dataset: str, batch_size: int = 100) -> dict[str, Any]:
    """A VAE run's row of the ladder: its log p(x) on ``data``'s test images, or why it is not comparable.

    The estimate is :func:`vaelab.evaluate.evaluate_model`'s importance-sampled log p(x) with ``k`` samples, or the
    run's ``eval_test.json`` where that scored exactly these images (binary space, same data set, seed and number of
    test examples). A run is comparable when it was trained on ``dataset`` and its p(x|z) is a distribution on the
    ladder's space (:func:`support_space`): ``dataset`` is the name or path the data were loaded by.
    """
    import json
    from pathlib import Path

    from vaelab.evaluate import evaluate_model

    trained_on = run.config.dataset
    if trained_on != dataset and Path(trained_on).expanduser().resolve() != Path(dataset).expanduser().resolve():
        return {"name": name, "kind": "vae", "not_comparable": f"trained on {trained_on}, not {dataset}"}
    device = next(run.model.parameters()).device
    x = data.test.reshape(len(data.test), *data.data_shape).to(device=device, dtype=torch.float32)
    space = support_space(data_support(run.model, x[:1]))
    if space != data.space:
        what = "no ladder space" if space is None else SPACES[space]
        return {"name": name, "kind": "vae", "not_comparable": f"its p(x|z) is {what}, not {SPACES[data.space]}"}
    saved = Path(run.run_dir) / "eval_test.json"
    if data.space == BINARY and saved.is_file():
        found = json.loads(saved.read_text())
        same_bits = data.binarization_seed is None or found.get("seed") == data.binarization_seed
        if found.get("split") == "test" and found.get("examples") == len(x) and same_bits:
            lp = found["log_px"]
            return ladder_row(
                name, "vae", data, {"mean": lp["mean"], "sem": lp["sem"]}, source=f"{saved} (k={lp['k']})"
            )
    start = time.perf_counter()
    result = evaluate_model(run.model, x, k=k, iwae_ks=(1,), elbo_k=1, batch_size=batch_size, progress=False)
    lp = result["log_px"]
    seconds = time.perf_counter() - start
    return ladder_row(
        name, "vae", data, {"mean": lp["mean"], "sem": lp["sem"]}, source=f"log p(x), k={k}", eval_seconds=seconds
    )


PARZEN_SAMPLES = (100, 1000, 10000)
PARZEN_CHUNK = 1000


def parzen_rows(
    name: str, run, data: LadderData, *, samples: Sequence[int] = PARZEN_SAMPLES, seed: int = 0
) -> list[dict[str, Any]]:
    """The Parzen-window estimate of a run's log p(x) (the GAN-era protocol; Theis, van den Oord & Bethge 2016): a
    KDE fitted on draws x ~ p(x) of the model, its bandwidth chosen on ``data.valid``, scored on ``data.test``; one
    row per number of draws in ``samples`` (nested: the first m of the largest set), so the table shows how the
    estimate moves with them. The kernel is the one of the space (Bernoulli flips on binary data, Gaussian on
    dequantized data). Each row is the exact log-density of that KDE, a model of its own: comparable on the ladder,
    but an estimate of the VAE's log p(x) only in the limit of infinitely many draws, and a poor one before it.
    """
    if not samples or min(samples) < 1:
        raise ValueError(f"the Parzen window needs numbers of draws >= 1, got {list(samples)}")
    kernel = "bernoulli" if data.space == BINARY else "gaussian"
    weight = next(run.model.parameters())
    with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        draws = []  # in whole chunks of 1000: the first m draws are the same whatever the largest number asked for
        for _ in range(0, max(samples), PARZEN_CHUNK):
            z = run.model.prior.sample((PARZEN_CHUNK,))
            draws.append(run.model.decode(z).sample().reshape(len(z), -1).double().cpu())
    draws = torch.cat(draws)
    if kernel == "bernoulli":  # a flip probability never reaches 0 or 1: draws must be 0/1 like the data
        draws = draws.round()
    rows = []
    for m in sorted(set(samples)):
        start = time.perf_counter()
        bandwidth, tried = select_bandwidth(draws[:m], data.valid, kernel)
        test = kde_log_density(data.test, draws[:m], [bandwidth], kernel)[0]
        detail = {"chosen": {"bandwidth": bandwidth}, "train_examples": m, "validation": tried}
        rows.append(
            ladder_row(f"{Path(name).name}, Parzen on {m} draws", "parzen", data, summarize(test), detail=detail)
            | {"fit_seconds": time.perf_counter() - start, "source": "KDE of model draws"}
        )
    return rows


def support_space(support) -> str | None:
    """The ladder space a model with data ``support`` is a distribution on: binary for {0,1}, dequantized for R or
    [0,1] (a density on R^D scored on [0,1]^D is still a density there, one that wastes the mass it puts outside)."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if support is constraints.boolean:
        return BINARY
    if support is constraints.real or support is constraints.unit_interval:
        return DEQUANTIZED
    return None


def run_baselines(model, test_x: torch.Tensor, train_x: Callable[[], torch.Tensor], latent_dim: int) -> dict:
    """Every baseline of :data:`BASELINES` with an ``applies_to``, for this model: ``{"<name>_baseline": result or
    NotApplicable}``.

    ``train_x`` is called (once) only if some baseline applies, so a model none applies to loads no training data.
    """
    results: dict[str, Any] = {}
    train: torch.Tensor | None = None
    for name, baseline in BASELINES.items():
        if baseline.applies_to is None:
            continue
        reason = baseline.applies_to(model, test_x)
        if reason is not None:
            results[f"{name}_baseline"] = NotApplicable(reason)
            continue
        if train is None:
            train = train_x()
        results[f"{name}_baseline"] = baseline.fit_and_score(train, test_x.cpu(), latent_dim)
    return results
