"""Evaluation of a trained model on a data set: every number per example, summarised with standard errors.

One code path per quantity: the ELBO forms, IWAE bounds and log p(x) come from :mod:`vaelab.estimators`, exactly
as in training. Summaries are means over examples with the standard error of that mean (the spread over the data
set); the Monte Carlo error of each per-example estimate is reported alongside where it exists.

The diagnostics that look inside a model (gap decomposition, ELBO-form variances, estimator study, IWAE curve) are
in :mod:`vaelab.diagnostics`; baselines such as probabilistic PCA in :mod:`vaelab.baselines`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from vaelab.estimators import (
    ELBO_FORMS,
    LogMarginal,
    data_support,
    elbo_integrands,
    latent_dim,
    log_marginal,
    pareto_k_threshold,
)
from vaelab.likelihoods import bits_per_dim, eight_bit
from vaelab.models import bind
from vaelab.posteriors import distribution_mean, is_factorised_gaussian, kl_per_dimension
from vaelab.progress import progress_bar

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): unit j is active if Cov_x(E_q[z_j]) > 0.01


def summarize(values: torch.Tensor) -> dict[str, float]:
    """Mean over examples and its standard error, in nats."""
    values = values.detach().double().cpu()
    n = values.numel()
    sem = (values.std() / math.sqrt(n)).item() if n > 1 else math.nan
    return {"mean": values.mean().item(), "sem": sem}


def batches(
    model, x: torch.Tensor, batch_size: int, context: Mapping[str, torch.Tensor] | None = None
) -> Iterator[tuple[Any, torch.Tensor, slice]]:
    """``(view, x[rows], rows)`` for consecutive batches of ``x``: the view is :func:`vaelab.models.bind`'s, the model
    given the context of those rows where it asks for context (e.g. the labels ``{"y": y}``, aligned with ``x``)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    for key, value in (context or {}).items():
        if len(value) != len(x):
            raise ValueError(f"context {key!r} has {len(value)} rows but x has {len(x)}: they must be aligned")
    for start in range(0, len(x), batch_size):
        rows = slice(start, min(start + batch_size, len(x)))
        yield bind(model, context, rows), x[rows], rows


def latent_usage(
    model, x: torch.Tensor, *, batch_size: int = 500, context: Mapping[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Active units and KL(q || p(z)) per latent dimension, averaged over ``x`` (given ``context``, for a model that
    asks for it: see :func:`batches`).

    A unit is active when the variance over the data of its posterior mean, Cov_x(E_q[z_j]), exceeds 0.01
    (Burda et al., 2016). The KL per dimension needs a factorised q and prior (diagonal Gaussians); otherwise ``None``.
    """
    means, kls = [], []
    with torch.no_grad():
        for view, batch, _ in batches(model, x, batch_size, context):
            q, prior = view.encode(batch), view.prior
            means.append(distribution_mean(q))
            if is_factorised_gaussian(q) and is_factorised_gaussian(prior):
                kls.append(kl_per_dimension(q, prior))  # [B, d]
    variance = torch.cat(means).double().var(0)
    result: dict[str, Any] = {
        "active_units": int((variance > ACTIVE_UNIT_THRESHOLD).sum()),
        "latent_dim": latent_dim(bind(model, context, slice(0, 1))),
        "posterior_mean_variance": variance.cpu().tolist(),
        "kl_per_dim": None,
    }
    if kls:
        result["kl_per_dim"] = torch.cat(kls).double().mean(0).cpu().tolist()
    return result


# Importance samples (k x examples) from which evaluate_model compiles its log p(x) estimator by default, about where
# compiling starts to pay: on the EPYC of sessions 1-2 ~5 us per sample eagerly and 1.4-2x less compiled (5e6 samples:
# 15-25 s eagerly, 2-3 compilations' worth); on session 3's Xeon 2.9 vs 2.1-2.2 us, a 3-8 s compilation repaid after
# 4-10e6 samples (docs/performance.md). The standard protocol (k = 5000, 10,000 test images) is 10x that.
AUTO_COMPILE_SAMPLES = 5_000_000


EVAL_IWAE_KS: tuple[int, ...] = (1, 10, 100, 1000)  # evaluate_model's IWAE bounds
EVAL_ELBO_K = 10  # and its samples per ELBO estimate


def _should_compile(compile: bool | None, samples: int) -> bool:
    """``compile`` as given, or (``None``) whether ``samples`` importance samples repay a compilation."""
    return samples >= AUTO_COMPILE_SAMPLES if compile is None else compile


def evaluate_model(
    model,
    x: torch.Tensor,
    *,
    k: int = 5000,
    iwae_ks: Sequence[int] = EVAL_IWAE_KS,
    elbo_k: int = EVAL_ELBO_K,
    batch_size: int = 100,
    progress: bool = True,
    compile: bool | None = None,
    context: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The standard evaluation of a model on ``x`` (``[N, *data_shape]``, on the model's device), given ``context``
    (e.g. ``{"y": labels}``, aligned with ``x``) for a model that asks for it: then every number is conditional,
    log p(x|y) and its bounds.

    Returns a JSON-ready dict: ``elbo`` (each form, from the same ``elbo_k`` samples per example), ``iwae`` (bound
    per k; for k up to log p(x)'s, from the first k of its samples: nested estimates of one draw, no extra decoder
    passes),
    ``log_px`` (k importance samples: mean, sem over examples, mean Monte Carlo stderr, median ESS, the fraction of
    examples whose Pareto k-hat exceeds the reliability threshold), ``posterior_gap`` (log p-hat - ELBO), and the
    latent usage of :func:`latent_usage`; for a model of 8-bit images (a probability mass, e.g. the discretized
    logistic and its mixture) also ``bits_per_dim``, -log p(x) / (D ln 2) with its sem. Runs under
    ``torch.inference_mode``. ``compile``: the streamed log p(x)
    estimates run compiled (see :func:`vaelab.estimators.log_marginal`); ``None``: exactly when the evaluation is
    long enough to repay the compilation, k x examples >= :data:`AUTO_COMPILE_SAMPLES`.
    """
    return _evaluate_model(
        model, x, k=k, iwae_ks=iwae_ks, elbo_k=elbo_k, batch_size=batch_size, progress=progress, compile=compile,
        context=context,
    )[0]  # fmt: skip


def _evaluate_model(
    model, x, *, k, batch_size, progress, compile, iwae_ks=EVAL_IWAE_KS, elbo_k=EVAL_ELBO_K, prefixes=(), context=None
) -> tuple[dict, LogMarginal]:
    """:func:`evaluate_model`, and its per-example log p(x) estimate ``[N]`` (for :func:`diagnostics` to reuse), whose
    ``iwae`` / ``iwae_stderr`` also hold the bounds of the first j samples for every j <= k of ``prefixes``."""
    compile = _should_compile(compile, k * len(x))
    if compile and progress:
        print("compiling the log p(x) estimator for this model (once, ~5-30 s; --no-compile skips it)", file=sys.stderr)
    per_example: dict[str, list[torch.Tensor]] = {}
    estimates: list[LogMarginal] = []

    def add(key: str, value: torch.Tensor) -> None:
        per_example.setdefault(key, []).append(value.detach().cpu())

    ladder = sorted({kk for kk in [*iwae_ks, *prefixes] if kk <= k})
    bar = progress_bar(len(x), f"ELBO, IWAE bounds and log p(x) (k={k})", "example", enabled=progress)
    model.eval()
    with torch.inference_mode():
        for view, batch, _ in batches(model, x, batch_size, context):
            for form, integrand in elbo_integrands(view, batch, k=elbo_k).items():  # the three forms, one draw
                add(f"elbo_{form}", integrand.mean(0))
            # IWAE_kk for kk <= k: the first kk of log p(x)'s own samples (one stream of log-weights for all of them)
            estimates.append(log_marginal(view, batch, k=k, compile=compile, iwae_ks=ladder))
            for kk in iwae_ks:
                if kk > k:
                    add(f"iwae_{kk}", log_marginal(view, batch, k=kk, compile=compile).value)
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    estimate = _concat(estimates)
    cat = {key: torch.cat(values) for key, values in per_example.items()}
    cat |= {f"iwae_{kk}": estimate.iwae[kk] for kk in iwae_ks if kk <= k}
    threshold = pareto_k_threshold(k)
    result: dict[str, Any] = {
        "examples": len(x),
        "units": "nats per example",
        "elbo": {form: summarize(cat[f"elbo_{form}"]) | {"k": elbo_k} for form in ELBO_FORMS},
        "iwae": {str(kk): summarize(cat[f"iwae_{kk}"]) for kk in iwae_ks},
        "log_px": summarize(estimate.value)
        | {
            "k": k,
            "mean_mc_stderr": estimate.stderr.double().mean().item(),
            "median_ess": estimate.ess.double().median().item(),
            "pareto_k_threshold": threshold,
            "fraction_pareto_k_above_threshold": (estimate.pareto_k > threshold).double().mean().item(),
        },
        "posterior_gap": summarize(estimate.value - cat["elbo_kl"]),
    }
    if data_support(model, x[:1]) is eight_bit:  # a probability mass over 8-bit images: also in bits per dimension
        result["bits_per_dim"] = summarize(bits_per_dim(estimate.value, math.prod(x.shape[1:])))
    result.update(latent_usage(model, x, context=context))
    return result, estimate


_FIELDS = ("value", "stderr", "ess", "pareto_k")  # LogMarginal's per-example fields


def _concat(estimates: Sequence[LogMarginal]) -> LogMarginal:
    """Per-batch estimates (the same k and prefixes) as one over all their examples, on the CPU."""

    def cat(tensors) -> torch.Tensor:
        return torch.cat([t.detach().cpu() for t in tensors])

    first = estimates[0]
    return LogMarginal(
        **{f: cat(getattr(e, f) for e in estimates) for f in _FIELDS},
        k=first.k,
        iwae={j: cat(e.iwae[j] for e in estimates) for j in first.iwae},
        iwae_stderr={j: cat(e.iwae_stderr[j] for e in estimates) for j in first.iwae_stderr},
    )


def format_evaluation(result: dict[str, Any]) -> str:
    """A short human-readable table of :func:`evaluate_model`'s result (with the gap decomposition, when present, as
    :func:`vaelab.report.as_json` writes :func:`vaelab.diagnostics.diagnostics`' result)."""
    lines = [f"{result['examples']} examples; nats per example (mean ± standard error over examples)"]
    for form, s in result["elbo"].items():
        lines.append(f"  ELBO ({form:<7} form, k={s['k']:>4}) {s['mean']:10.3f} ± {s['sem']:.3f}")
    for kk, s in result["iwae"].items():
        lines.append(f"  IWAE bound (k={kk:>5})        {s['mean']:10.3f} ± {s['sem']:.3f}")
    lp = result["log_px"]
    lines.append(f"  log p(x)   (k={lp['k']:>5})        {lp['mean']:10.3f} ± {lp['sem']:.3f}")
    lines.append(
        f"    per-example MC stderr {lp['mean_mc_stderr']:.3f}, median ESS {lp['median_ess']:.0f}, "
        f"k-hat > {lp['pareto_k_threshold']:.2f} for {100 * lp['fraction_pareto_k_above_threshold']:.1f}% of examples"
    )
    bits = result.get("bits_per_dim")
    if isinstance(bits, dict):  # a model of 8-bit images
        lines.append(f"    = {bits['mean']:.4f} ± {bits['sem']:.4f} bits per dimension (raw 8-bit storage: 8)")
    gap = result["posterior_gap"]
    lines.append(f"  posterior gap log p(x) - ELBO  {gap['mean']:10.3f} ± {gap['sem']:.3f}")
    decomposed = result.get("gap_decomposition")
    if isinstance(decomposed, dict):  # the decomposition runs on a subset, with its own log p-hat and ELBO
        whole = decomposed["posterior_gap"]
        lines.append(
            f"    decomposed on the first {decomposed['examples']} examples: "
            f"{whole['mean']:.3f} ± {whole['sem']:.3f} = approximation + amortization gap"
        )
    for key, label in (("approximation_gap", "approximation"), ("amortization_gap", "amortization")):
        value = result.get(key)
        if isinstance(value, dict):
            lines.append(f"    {label + ' gap':<28} {value['mean']:10.3f} ± {value['sem']:.3f}")
        elif value is not None:  # "not applicable: <reason>"
            lines.append(f"    {label + ' gap':<28} {value}")
    lines.append(f"  active units {result['active_units']} of {result['latent_dim']}")
    return "\n".join(lines)


def is_latent_model(model) -> bool:
    """Whether ``model`` has latent variables to estimate log p(x) with: ``encode``, or ``given(...)`` views that have
    it (a model with ``context``). A classifier p(y|x) has neither."""
    return callable(getattr(model, "encode", None)) or bool(getattr(model, "context", ()))


# --- classification: any model with classes and classify(x) -> Categorical p(y|x) -------------------------------------
CALIBRATION_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al., 2017)


def class_log_probs(
    model, x: torch.Tensor, *, batch_size: int = 500, progress: bool = False, **classify_options: Any
) -> torch.Tensor:
    """log p(y = c | x) ``[N, classes]`` of a model with ``classify(x, **classify_options) -> Categorical``, batch by
    batch (no gradients)."""
    if not callable(getattr(model, "classify", None)):
        raise ValueError(f"{type(model).__name__} does not predict labels: it has no classify(x)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    out = []
    bar = progress_bar(len(x), "p(y|x)", "example", enabled=progress)
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(model.classify(x[start : start + batch_size], **classify_options).logits)
            if bar is not None:
                bar.update(len(out[-1]))
    if bar is not None:
        bar.close()
    return torch.cat(out).log_softmax(-1)  # Categorical normalises its logits; once more costs nothing


def classification_metrics(
    log_probs: torch.Tensor, labels: torch.Tensor, *, bins: int = CALIBRATION_BINS
) -> dict[str, Any]:
    """How good and how calibrated the predictions log p(y|x) ``[N, C]`` of the true ``labels`` ``[N]`` are.

    Returns accuracy and error (fractions, the prediction being the most probable class), ``nll`` (mean -log p(y|x)
    of the true label, nats) with ``nll_stderr`` (its standard error over examples), ``ece`` (expected calibration
    error: sum over ``bins`` equal-width bins of the top-class confidence, of the fraction of examples in the bin
    times |accuracy - mean confidence| there), ``reliability`` (per bin: ``edges`` [bins + 1], ``confidence`` and
    ``accuracy`` (None for an empty bin) and ``count``), ``confusion`` (``[C][C]`` counts, rows the true class,
    columns the predicted one) and ``examples``.
    """
    if log_probs.dim() != 2 or labels.shape != log_probs.shape[:1]:
        shapes = f"{list(log_probs.shape)} and {list(labels.shape)}"
        raise ValueError(f"log_probs must be [N, C] and labels [N], got {shapes}")
    if len(labels) == 0:
        raise ValueError("no examples to score")
    classes = log_probs.shape[1]
    labels = labels.long().to(log_probs.device)
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"labels must be in 0..{classes - 1}, got {labels.min().item()}..{labels.max().item()}")
    log_probs = log_probs.double()
    confidence, predicted = log_probs.max(-1)
    confidence = confidence.exp()
    correct = (predicted == labels).double()
    nll = -log_probs.gather(1, labels[:, None])[:, 0]
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence.cpu(), edges[1:-1])  # bin b holds (e_b, e_b+1]
    count = torch.bincount(which, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, confidence.cpu())
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct.cpu())
    filled = count > 0
    ece = ((acc_sum - conf_sum).abs()[filled]).sum() / len(labels)  # sum_b n_b/N |acc_b - conf_b|
    confusion = torch.zeros(classes * classes, dtype=torch.int64)
    confusion.index_add_(0, (labels * classes + predicted).cpu(), torch.ones(len(labels), dtype=torch.int64))

    def per_bin(sums: torch.Tensor) -> list[float | None]:
        return [(s / n).item() if n else None for s, n in zip(sums, count.tolist(), strict=True)]

    accuracy = correct.mean().item()
    return {
        "accuracy": accuracy,
        "error": 1 - accuracy,
        "nll": nll.mean().item(),
        "nll_stderr": summarize(nll)["sem"],
        "ece": ece.item(),
        "reliability": {
            "edges": edges.tolist(),
            "confidence": per_bin(conf_sum),
            "accuracy": per_bin(acc_sum),
            "count": count.tolist(),
        },
        "confusion": confusion.view(classes, classes).tolist(),
        "examples": len(labels),
    }


def format_classification(metrics: dict[str, Any]) -> str:
    """A few lines of :func:`classification_metrics`' result."""
    return "\n".join(
        [
            f"  classification of {metrics['examples']} examples, p(y|x):",
            f"    accuracy {100 * metrics['accuracy']:.2f}%  (error {100 * metrics['error']:.2f}%)",
            f"    NLL {metrics['nll']:.4f} ± {metrics['nll_stderr']:.4f} nats",
            f"    expected calibration error {metrics['ece']:.4f} ({len(metrics['reliability']['count'])} bins)",
        ]
    )


def final_beta(config) -> float | None:
    """The KL weight a run ends with (its schedule at the last step); None for schedules that are not a beta."""
    from vaelab.schedules import make_schedule

    weights = make_schedule(config.schedule, **config.schedule_options).objective_kwargs(10**12)
    return weights.get("beta")


def compare_latent_usage(
    runs: Sequence[tuple[str, Any, torch.Tensor] | tuple[str, Any, torch.Tensor, Mapping[str, torch.Tensor] | None]],
    *,
    k: int = 1000,
    compile: bool | None = None,
) -> list[dict[str, Any]]:
    """How latent usage moves across runs (e.g. a beta sweep): one row per ``(name, run, x)`` (or ``(name, run, x,
    context)`` for a model given context), sorted by final beta.

    Each row: ``beta`` (final), ``schedule``, ``active_units``, ``latent_dim``, ``kl_total`` (sum of KL per dimension,
    nats), ``kl_per_dim``, ``elbo`` and ``log_px`` (k importance samples; mean and sem over ``x``), and
    ``log_px_minus_first``: log p(x) minus that of the first run as given, paired over the examples (mean and sem of
    the per-example differences), when both were scored on the same examples and context; else None. Pairing removes
    the spread between examples, which dominates each run's own sem: two runs whose means differ by less than their
    sems may still differ by many paired sems. ``compile`` as in :func:`evaluate_model`.
    """
    rows = []
    first = None  # (x, context, per-example log p(x)) of the first run
    for name, run, x, *context in runs:
        given = context[0] if context else None
        result, estimate = _evaluate_model(
            run.model, x, k=k, iwae_ks=(), elbo_k=1, batch_size=100, progress=False, compile=compile, context=given
        )
        log_px = estimate.value.double()
        first = first or (x, given, log_px)
        paired = _same_examples((x, given), first[:2])
        kl = result["kl_per_dim"]
        rows.append(
            {
                "run": name,
                "beta": final_beta(run.config),
                "schedule": run.config.schedule,
                "active_units": result["active_units"],
                "latent_dim": result["latent_dim"],
                "kl_total": None if kl is None else float(sum(kl)),
                "kl_per_dim": kl,
                "elbo": result["elbo"]["kl"],
                "log_px": {key: result["log_px"][key] for key in ("mean", "sem", "k")},
                "log_px_minus_first": summarize(log_px - first[2]) if paired else None,
            }
        )
    return sorted(rows, key=lambda r: (r["beta"] is None, r["beta"] if r["beta"] is not None else 0.0))


def _same_examples(a: tuple[torch.Tensor, Mapping | None], b: tuple[torch.Tensor, Mapping | None]) -> bool:
    """Are two ``(x, context)`` the same examples, so that estimates on them pair row by row?"""

    def same(s: torch.Tensor, t: torch.Tensor) -> bool:
        return s.shape == t.shape and torch.equal(s.cpu(), t.cpu())

    (x, context), (y, other) = a, b
    if not same(x, y) or (context is None) != (other is None):
        return False
    return context is None or (context.keys() == other.keys() and all(same(context[k], other[k]) for k in context))
