"""Evaluation of a trained model on a data set: every number per example, summarised with standard errors.

One code path per quantity: the ELBO forms, IWAE bounds and log p(x) come from :mod:`vaelab.estimators`, exactly
as in training. Summaries are means over examples with the standard error of that mean (the spread over the data
set); the Monte Carlo error of each per-example estimate is reported alongside where it exists.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributions import Independent, Normal, kl_divergence

from vaelab.estimators import ELBO_FORMS, elbo, iwae_bound, log_marginal, pareto_k_threshold

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): unit j is active if Cov_x(E_q[z_j]) > 0.01


def summarize(values: torch.Tensor) -> dict[str, float]:
    """Mean over examples and its standard error, in nats."""
    values = values.detach().double().cpu()
    n = values.numel()
    sem = (values.std() / math.sqrt(n)).item() if n > 1 else math.nan
    return {"mean": values.mean().item(), "sem": sem}


def _factorised(dist) -> bool:
    return isinstance(dist, Independent) and isinstance(dist.base_dist, Normal) and dist.reinterpreted_batch_ndims == 1


def latent_usage(model, x: torch.Tensor, *, batch_size: int = 500) -> dict[str, Any]:
    """Active units and KL(q || p(z)) per latent dimension, averaged over ``x``.

    A unit is active when the variance over the data of its posterior mean, Cov_x(E_q[z_j]), exceeds 0.01
    (Burda et al., 2016). The KL per dimension needs a factorised q and prior (diagonal Gaussians); otherwise ``None``.
    """
    means, kls = [], []
    prior = model.prior
    with torch.no_grad():
        for batch in x.split(batch_size):
            q = model.encode(batch)
            means.append(q.mean)
            if _factorised(q) and _factorised(prior):
                kls.append(kl_divergence(q.base_dist, prior.base_dist))  # [B, d]
    variance = torch.cat(means).double().var(0)
    result: dict[str, Any] = {
        "active_units": int((variance > ACTIVE_UNIT_THRESHOLD).sum()),
        "latent_dim": int(model.latent_dim),
        "posterior_mean_variance": variance.cpu().tolist(),
        "kl_per_dim": None,
    }
    if kls:
        result["kl_per_dim"] = torch.cat(kls).double().mean(0).cpu().tolist()
    return result


def evaluate_model(
    model,
    x: torch.Tensor,
    *,
    k: int = 5000,
    iwae_ks: Sequence[int] = (1, 10, 100, 1000),
    elbo_k: int = 10,
    batch_size: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """The standard evaluation of a model on ``x`` (``[N, *data_shape]``, on the model's device).

    Returns a JSON-ready dict: ``elbo`` (each form, ``elbo_k`` samples per example), ``iwae`` (bound per k),
    ``log_px`` (k importance samples: mean, sem over examples, mean Monte Carlo stderr, median ESS, the fraction of
    examples whose Pareto k-hat exceeds the reliability threshold), ``posterior_gap`` (log p-hat - ELBO), and the
    latent usage of :func:`latent_usage`. Runs under ``torch.inference_mode``.
    """
    per_example: dict[str, list[torch.Tensor]] = {}

    def add(key: str, value: torch.Tensor) -> None:
        per_example.setdefault(key, []).append(value.detach().cpu())

    batches = x.split(batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(x), unit="example", desc=f"eval k={k}", file=sys.stderr, dynamic_ncols=True)
    model.eval()
    with torch.inference_mode():
        for batch in batches:
            for form in ELBO_FORMS:
                add(f"elbo_{form}", elbo(model, batch, k=elbo_k, form=form))
            for kk in iwae_ks:
                add(
                    f"iwae_{kk}",
                    iwae_bound(model, batch, k=kk) if kk <= 1000 else log_marginal(model, batch, k=kk).value,
                )
            r = log_marginal(model, batch, k=k)
            add("log_px", r.value)
            add("log_px_stderr", r.stderr)
            add("ess", r.ess)
            add("pareto_k", r.pareto_k)
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    cat = {key: torch.cat(values) for key, values in per_example.items()}
    threshold = pareto_k_threshold(k)
    result: dict[str, Any] = {
        "examples": len(x),
        "units": "nats per example",
        "elbo": {form: summarize(cat[f"elbo_{form}"]) | {"k": elbo_k} for form in ELBO_FORMS},
        "iwae": {str(kk): summarize(cat[f"iwae_{kk}"]) for kk in iwae_ks},
        "log_px": summarize(cat["log_px"])
        | {
            "k": k,
            "mean_mc_stderr": cat["log_px_stderr"].double().mean().item(),
            "median_ess": cat["ess"].double().median().item(),
            "pareto_k_threshold": threshold,
            "fraction_pareto_k_above_threshold": (cat["pareto_k"] > threshold).double().mean().item(),
        },
        "posterior_gap": summarize(cat["log_px"] - cat["elbo_kl"]),
    }
    result.update(latent_usage(model, x))
    return result


def format_evaluation(result: dict[str, Any]) -> str:
    """A short human-readable table of :func:`evaluate_model`'s result."""
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
    gap = result["posterior_gap"]
    lines.append(f"  posterior gap log p(x) - ELBO  {gap['mean']:10.3f} ± {gap['sem']:.3f}")
    lines.append(f"  active units {result['active_units']} of {result['latent_dim']}")
    return "\n".join(lines)
