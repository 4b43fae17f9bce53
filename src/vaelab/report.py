"""One self-contained HTML report of a trained run: config, training summary, diagnostics and pictures.

Everything is in the one file: pictures are embedded as base64 ``data:`` URIs and the style sheet is inline, so the
report opens offline and can be mailed or archived as it is. Next to every number stands a short plain-language note
on what it means. Everything that comes from the run (config values, metric names, diagnostics keys) is HTML-escaped.

The diagnostics are those of :func:`vaelab.evaluate.evaluate_model`, optionally extended by
:func:`vaelab.diagnostics.diagnostics` (gap decomposition, ELBO-form variances, estimator study, IWAE curve); a section
whose numbers are missing says "not computed", one whose diagnostic does not apply to the model says "not applicable"
and why.

:func:`as_json` is the one place where results (dataclasses of tensors) become JSON: ``vaelab eval``, ``vaelab
report`` and ``vaelab compare`` all write what it returns.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
import math
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from vaelab.checkpoint import atomic_write_text
from vaelab.diagnostics import (
    Diagnostics,
    ElboForms,
    EstimatorStudy,
    GapDecomposition,
    IwaeCurve,
    NotApplicable,
    PerExample,
)
from vaelab.estimators import pareto_k_threshold
from vaelab.evaluate import CALIBRATION_BINS, summarize


# --- results as JSON: the one conversion ------------------------------------------------------------------------------
def as_json(result: Any) -> Any:
    """Any vaelab result as JSON-ready values (dicts, lists, str, finite floats or None, ints, bools).

    Dataclasses of :mod:`vaelab.diagnostics` keep the keys their files always had: a :class:`Diagnostics` is the
    headline evaluation's keys plus ``diagnostics_examples``, ``gap_decomposition`` (its estimates and settings on
    the subset, ``posterior_gap`` included; q*'s per-example parameters left out), ``approximation_gap`` and
    ``amortization_gap`` (top level, as the report and pictures read them), ``elbo_forms``, ``iwae_curve`` and
    ``estimator_study``. A :class:`NotApplicable` is the string ``"not applicable: <reason>"``. Tensors become lists,
    non-finite numbers None (JSON has no NaN).
    """
    if isinstance(result, NotApplicable):
        return str(result)
    if isinstance(result, Diagnostics):
        return _diagnostics_json(result)
    if isinstance(result, PerExample):
        return _per_example_json(result)
    if isinstance(result, GapDecomposition):
        return _gaps_json(result)
    if isinstance(result, ElboForms):
        return _forms_json(result)
    if isinstance(result, EstimatorStudy):
        return _study_json(result)
    if isinstance(result, IwaeCurve):
        return _curve_json(result)
    if isinstance(result, torch.Tensor):
        return as_json(result.detach().cpu().tolist())
    if isinstance(result, Mapping):
        return {str(key): as_json(value) for key, value in result.items()}
    if isinstance(result, list | tuple):
        return [as_json(value) for value in result]
    if isinstance(result, float):
        return result if math.isfinite(result) else None
    return result


def _num(value: Any) -> float | None:
    """A plain float, or None where the value is not finite (NaN stderr at k = 1, Pareto k-hat at k < 21)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _per_example_json(p: PerExample) -> dict[str, Any]:
    """Mean and sem over examples and the per-example values; with a stderr also its Monte Carlo error of the mean
    ``mc_sem`` = sqrt(sum_b se_b^2) / B (the error to use when comparing two estimates on the same examples), and
    with importance weights their per-example ``ess`` and ``pareto_k``."""
    values = p.value.detach().double().cpu()
    out: dict[str, Any] = {key: _num(v) for key, v in summarize(values).items()}
    out["per_example"] = [_num(v) for v in values.tolist()]
    if p.mc_stderr is not None:
        se = p.mc_stderr.detach().double().cpu()
        out["mean_mc_stderr"] = _num(se.mean())
        out["mc_sem"] = _num(se.square().sum().sqrt() / se.numel())
        out["mc_stderr"] = [_num(v) for v in se.tolist()]
    for key in ("ess", "pareto_k"):
        values = getattr(p, key)
        if values is not None:
            out[key] = [_num(v) for v in values.detach().double().cpu().tolist()]
    return out


def _gaps_json(g: GapDecomposition) -> dict[str, Any]:
    estimates = (
        "posterior_gap", "approximation_gap", "amortization_gap", "log_px", "log_px_encoder", "log_px_optimised",
        "elbo_encoder", "elbo_optimised",
    )  # fmt: skip
    out: dict[str, Any] = {"examples": len(g.posterior_gap.value), "units": "nats per example"}
    out |= {name: _per_example_json(getattr(g, name)) for name in estimates}
    out |= {name: getattr(g, name) for name in ("q_star_start", "steps", "lr", "samples_per_step", "k", "elbo_k")}
    out["elbo_form"] = g.elbo_form
    return out


def _forms_json(f: ElboForms) -> dict[str, Any]:
    forms = {
        name: {"value": _per_example_json(form.value), "variance": _per_example_json(PerExample(form.variance))}
        for name, form in f.forms.items()
    }
    examples = len(next(iter(f.forms.values())).variance)
    return {"examples": examples, "units": "nats per example", "k": f.k, "forms": forms,
            "lowest_variance": f.lowest_variance}  # fmt: skip


def _study_json(study: EstimatorStudy) -> dict[str, Any]:
    rows = []
    for row in study.rows:
        khat = row.estimate.pareto_k.double().cpu()
        fitted, finite = ~torch.isnan(khat), torch.isfinite(khat)
        threshold = pareto_k_threshold(row.k)
        value = _per_example_json(row.estimate)
        rows.append(
            {
                "proposal": row.proposal,
                "k": row.k,
                "mean": value["mean"],
                "sem": value["sem"],
                "mean_mc_stderr": value["mean_mc_stderr"],
                "mc_sem": value["mc_sem"],
                "mean_ess": _num(row.estimate.ess.double().mean()),
                "mean_pareto_k": _num(khat[finite].mean()) if bool(finite.any()) else None,
                "fraction_flat_tail": _num((khat == -math.inf).double().mean()) if bool(fitted.all()) else None,
                "pareto_k_threshold": threshold,
                "fraction_pareto_k_above_threshold": (
                    _num((khat > threshold).double().mean()) if bool(fitted.all()) else None
                ),
            }
        )
    return {
        "examples": len(study.rows[0].estimate.value) if study.rows else 0,
        "units": "nats per example",
        "ks": sorted({row.k for row in study.rows}),
        "proposals": list(dict.fromkeys(row.proposal for row in study.rows)),
        "rows": rows,
    }


def _curve_json(curve: IwaeCurve) -> dict[str, Any]:
    points = [_per_example_json(p) for p in curve.points]
    return {
        "examples": len(curve.points[0].value) if curve.points else 0,
        "units": "nats per example",
        "k": list(curve.ks),
        **{key: [p[key] for p in points] for key in ("mean", "sem", "mean_mc_stderr", "mc_sem")},
    }


def _diagnostics_json(d: Diagnostics) -> dict[str, Any]:
    out = as_json(d.evaluation)
    out["diagnostics_examples"] = d.examples
    gaps = as_json(d.gap_decomposition)
    for key in ("approximation_gap", "amortization_gap"):
        out[key] = gaps.pop(key) if isinstance(gaps, dict) else gaps
    out["gap_decomposition"] = gaps
    for key in ("elbo_forms", "iwae_curve", "estimator_study"):
        out[key] = as_json(getattr(d, key))
    return out


# --- plain-language notes, one per quantity --------------------------------------------------------------------------
EXPLAIN: dict[str, str] = {
    "units": "All values are in nats per example (natural-log units; divide by ln 2 for bits). "
    "Log-likelihoods are negative; closer to 0 is better.",
    "sem": "± is the standard error of the mean over the evaluated examples: how much the average would move with "
    "another sample of test examples. It is not the Monte Carlo error of the estimators.",
    "elbo": "The evidence lower bound E_q[log p(x, z) − log q(z|x)]: the quantity training maximises. It is always "
    "below log p(x), by exactly the posterior gap.",
    "elbo_joint": "joint form: log p(x, z) − log q(z|x), every term estimated from the samples z ~ q(z|x).",
    "elbo_entropy": "entropy form: E_q[log p(x, z)] + H[q(z|x)], the entropy of q in closed form.",
    "elbo_kl": "KL form: E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)), the KL in closed form when it is known.",
    "elbo_forms": "The three forms have the same expectation and differ only in Monte Carlo noise, so their means "
    "should agree within their errors. The per-sample variance says how noisy a one-sample estimate (and its "
    "gradient) is; the form with the lowest variance gives the steadiest training signal.",
    "iwae": "IWAE_k = E[log (1/k) Σ w_i] with importance weights w_i = p(x, z_i) / q(z_i|x): a lower bound on "
    "log p(x) that tightens as k grows (IWAE_1 is the ELBO) and reaches log p(x) as k → ∞ (Burda et al., 2016).",
    "iwae_curve": "If the curve is still rising at the largest k, the log p(x) estimate below is still too low; "
    "a curve that has flattened means extra samples no longer change the estimate.",
    "bits_per_dim": "For a model of 8-bit images (a probability mass over the 256 levels of each value, e.g. the "
    "discretized logistic): −log p(x) / (D ln 2), bits per dimension, the unit of natural-image models. Storing the "
    "raw 8-bit values costs 8; lower is better.",
    "log_px": "The estimate of log p(x): importance sampling with k samples from the encoder's q(z|x). It is the "
    "IWAE bound at large k, so it errs low, never high. Trust it when the effective sample size is large and "
    "Pareto k̂ is below its threshold for most examples.",
    "mean_mc_stderr": "Monte Carlo standard error of one example's estimate, averaged over examples (delta method): "
    "how much it would move with fresh samples. Only meaningful when k̂ is below its threshold.",
    "ess": "Effective sample size (Σ w)² / Σ w²: how many equally weighted samples the k weighted ones are worth. "
    "Near k: q(z|x) matches the true posterior closely. A handful: a few samples dominate, the estimate is noisy "
    "and probably too low.",
    "pareto_k": "Pareto k̂: the fitted heaviness of the tail of the importance weights (PSIS, Vehtari et al., 2024). "
    "Below the threshold min(1 − 1/log10 k, 0.7) the estimate converges at a practical rate; above it the weights "
    "effectively have infinite variance and the estimate can be badly off even when it looks stable.",
    "fraction_above": "The share of examples whose k̂ exceeds the threshold: for these, read log p(x) as a lower "
    "bound rather than an estimate.",
    "posterior_gap": "The posterior gap log p(x) − ELBO is the KL divergence from q(z|x) to the true posterior "
    "p(z|x): 0 would mean the encoder is exact. It is the total price of approximate inference, and the sum of the "
    "approximation and amortization gaps below.",
    "approximation_gap": "The approximation gap log p(x) − ELBO(q*) is the KL to the true posterior of q*, the best "
    "diagonal Gaussian fitted to each example separately: the price of a mean-field family (the encoder's own family "
    "when the encoder is a diagonal Gaussian). A richer family (flows, a full covariance) is needed to shrink it "
    "(Cremer et al., 2018). For a richer encoder (e.g. two stochastic layers) the amortization gap below can be "
    "negative: the encoder beats the best diagonal Gaussian.",
    "amortization_gap": "The amortization gap ELBO(q*) − ELBO(encoder) is what one shared encoder network loses "
    "against per-example optimisation within the same family: the price of amortising inference. A larger or "
    "longer-trained encoder, or a few refinement steps per example, shrinks it (Cremer et al., 2018).",
    "gap_decomposition": "How the gaps were computed: q* starts at the encoder's mean and per-dimension standard "
    "deviation (in closed form where known, else from samples: q_star_start) and is optimised per example by "
    "gradient ascent on the ELBO; log p(x) uses importance sampling with the even mixture of the encoder and q*.",
    "estimator_study": "Why naive Monte Carlo fails: averaging p(x|z) over samples from the prior p(z) almost never "
    "hits the small region of z that explains x, so with any practical k the estimate is far too low and its "
    "effective sample size is about 1. Sampling z from the encoder's q(z|x) instead (importance sampling) puts the "
    "samples where the posterior is and converges with far fewer samples.",
    "active_units": "A latent dimension is active when its posterior mean varies across examples (variance above "
    "0.01, Burda et al., 2016); inactive ones are ignored by the decoder and carry no information about x "
    "(posterior collapse).",
    "kl_per_dim": "KL(q(z_j|x) ‖ p(z_j)) averaged over examples: the nats of information each latent dimension "
    "carries about x. Their sum is the KL term of the ELBO.",
    "posterior_mean_variance": "Variance over examples of the posterior mean of each dimension (the activity "
    "statistic).",
    "train": "The last training line: running means over the last log_every steps on training batches (one sample "
    "per example, so noisier than the evaluation).",
    "valid": "The last validation pass: ELBO (one sample) and IWAE bound on held-out examples, fixed binarization.",
}

METRIC_NOTES: dict[str, str] = {
    "elbo": "ELBO, nats per example (higher is better)",
    "loss": "the minimised objective (−ELBO, or its β-weighted / IWAE variant)",
    "recon": "reconstruction term E_q[log p(x|z)], nats",
    "kl": "KL(q(z|x) ‖ p(z)), nats",
    "beta": "weight of the KL term (1 = the plain ELBO)",
    "lr": "learning rate",
    "grad_norm": "global gradient norm before clipping",
    "samples_per_sec": "training throughput, examples per second (validation and checkpoints excluded)",
    "seconds": "wall-clock seconds of the validation pass",
    "step": "optimizer steps taken",
    "epoch": "passes over the training set",
    "examples": "examples evaluated",
}

PICTURES: dict[str, tuple[str, str]] = {
    "reconstructions": (
        "Reconstructions",
        "Test inputs (top) and the decoder's mean E[x|z] at the posterior mean "
        "(bottom). Blurry or wrong digits mean information is lost in the latent code.",
    ),
    "samples": (
        "Samples from the prior",
        "z ~ p(z) decoded as E[x|z]. Poor samples with good reconstructions mean "
        "the aggregate posterior does not fill the prior (the 'holes' problem).",
    ),
    "traversals": (
        "Latent traversals",
        "Each row varies one latent dimension (the most active first) over its prior "
        "quantiles, the others fixed at one example's posterior mean: what each unit encodes.",
    ),
    "class_samples": (
        "Samples per class",
        "Rows are the classes y, columns share one noise draw of z ~ p(z|y), decoded as E[x|z,y]. The style (slant, "
        "thickness) should stay along a column while the class changes down it: then z carries the style and y the "
        "class.",
    ),
    "reliability": (
        "Reliability diagram",
        "Accuracy against the confidence of the predicted class, in equal-width confidence bins (the share of "
        "examples per bin below). Bars under the diagonal mean over-confidence; the expected calibration error is "
        "the share-weighted mean distance between bar and diagonal.",
    ),
    "confusion": (
        "Confusion matrix",
        "Counts of test examples by true class (rows) and predicted class (columns); the shade is the share of the "
        "row. Off-diagonal cells show which classes the model mistakes for which.",
    ),
    **{
        f"ladder_samples_{space}": (
            f"Samples of every model on the ladder ({space} space)",
            "One row per model, the same number of samples each. The VAE: z ~ p(z) decoded as E[x|z]. The "
            "deterministic autoencoder with the same networks (if trained): z drawn from a Gaussian mixture fitted to "
            "its training codes (Ghosh et al. 2020), decoded as E[x|z]; it has no likelihood, so its samples are all "
            "it can be judged by here. Each classic baseline as validation chose it: draws x ~ p(x), noise included "
            "(a KDE's draws are training images with kernel noise, so they say how much it memorises).",
        )
        for space in ("binary", "dequantized")
    },
    "manifold": ("Decoded manifold", "For a 2-D latent space: E[x|z] over an equal-probability grid of the prior."),
    "latents": (
        "Latent space",
        "Posterior means of the test examples coloured by label (principal components when "
        "the latent space has more than two dimensions). Separated classes mean the code captures them "
        "without labels.",
    ),
    "training_curves": (
        "Training curves",
        "Train and validation ELBO with the IWAE bound, the reconstruction and KL "
        "terms, β and the learning rate against the step.",
    ),
    "kl_per_dim": ("KL per latent dimension", EXPLAIN["kl_per_dim"]),
    "estimators": (
        "Naive Monte Carlo vs importance sampling",
        "log p(x) estimates against k for each proposal, "
        "with ± Monte Carlo standard error bands. " + EXPLAIN["estimator_study"],
    ),
    "iwae_curve": ("IWAE bound against k", EXPLAIN["iwae"] + " " + EXPLAIN["iwae_curve"]),
    "gaps": (
        "Per-example gaps",
        "Histograms over test examples of the gaps (nats): a long right tail marks examples the encoder handles badly.",
    ),
}

# which pictures each section shows (the rest go to "More pictures")
SECTION_PICTURES = {
    "training": ("training_curves",),
    "model": ("reconstructions", "samples", "traversals", "manifold", "latents"),
    "iwae": ("iwae_curve",),
    "gaps": ("gaps",),
    "estimators": ("estimators",),
    "latent": ("kl_per_dim",),
    "classification": ("class_samples", "reliability", "confusion"),
    "ladder": ("ladder_samples_binary", "ladder_samples_dequantized"),
}

NOT_COMPUTED = '<p class="missing">not computed</p>'


def missing(value: Any) -> str:
    """What a section shows without numbers: the "not applicable: <reason>" text its JSON holds, else "not computed"."""
    return f'<p class="missing">{esc(value)}</p>' if isinstance(value, str) else NOT_COMPUTED


NAV = (
    '<nav><a href="#summary">Summary</a> · <a href="#config">Configuration</a> · <a href="#training">Training</a> · '
    '<a href="#pictures">Pictures</a> · <a href="#elbo">ELBO</a> · <a href="#iwae">IWAE</a> · '
    '<a href="#log-px">log p(x)</a> · <a href="#gaps">Gaps</a> · <a href="#estimators">Naive vs IS</a> · '
    '<a href="#latent">Latent usage</a> · <a href="#classification">Classification</a> · '
    '<a href="#ladder">Ladder</a> · <a href="#json">JSON</a></nav>'
)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1.5rem; color: #1d232a; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 2px solid #dde3ea; padding-bottom: 0.2rem; margin-top: 2.2rem; }
h3 { margin-bottom: 0.3rem; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.92rem; }
th, td { border: 1px solid #dde3ea; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f6f9; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; text-align: right; }
td.why, p.why { color: #4a5763; font-size: 0.86rem; }
p.missing { color: #8a6d00; font-style: italic; }
.warning { background: #fff4e0; border-left: 4px solid #e09b00; padding: 0.5rem 0.8rem; }
.ok { background: #eaf6ec; border-left: 4px solid #2e9a48; padding: 0.5rem 0.8rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eef1f4; }
figcaption { color: #4a5763; font-size: 0.86rem; max-width: 60rem; }
pre { background: #f6f8fa; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }
code { font-size: 0.9em; } .meta { color: #4a5763; }
.columns { display: flex; flex-wrap: wrap; gap: 0 2rem; align-items: flex-start; }
"""


# --- small HTML helpers -----------------------------------------------------------------------------------------------
def esc(value: Any) -> str:
    """HTML-escape anything (quotes too, so the result is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 2) -> str:
    """A number for a table: fixed digits, integers as they are, '—' for missing or non-finite values."""
    if value is None or isinstance(value, bool):
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return esc(value)


def pm(stats: Mapping[str, Any] | None, digits: int = 2) -> str:
    """``mean ± sem`` of a summary dict."""
    if not isinstance(stats, Mapping) or stats.get("mean") is None:
        return "—"
    sem = stats.get("sem")
    return fmt(stats["mean"], digits) + ("" if sem is None else f" ± {fmt(sem, digits)}")


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """An HTML table. Header cells are escaped here; body cells are HTML already, either a whole ``<td ...>`` (from
    :func:`num` or :func:`why`) or the content of a plain cell."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def num(text: str) -> str:
    """A right-aligned number cell (``text`` is HTML: built by :func:`fmt` / :func:`pm`, which escape)."""
    return f'<td class="num">{text}</td>'


def why(key_or_text: str) -> str:
    """An explanation cell: the note :data:`EXPLAIN` holds for the key, else the text itself (escaped)."""
    return f'<td class="why">{esc(EXPLAIN.get(key_or_text, key_or_text))}</td>'


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG header, or None if ``data`` is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def figure(name: str, path: Path) -> str:
    """An embedded picture with alt text and caption."""
    data = Path(path).read_bytes()
    title, caption = PICTURES.get(name, (name.replace("_", " ").capitalize(), ""))
    size = png_size(data)
    mime = "image/png" if size else "image/" + (Path(path).suffix.lstrip(".").lower() or "png")
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    uri = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
    return (
        f'<figure id="picture-{esc(name)}"><img src="{uri}" alt="{esc(title)}: {esc(caption) or esc(name)}"{dims}>'
        f"<figcaption><strong>{esc(title)}.</strong> {esc(caption)}</figcaption></figure>"
    )


def abbreviate(value: Any, limit: int = 12) -> Any:
    """``value`` with every list longer than ``limit`` replaced by a note of its length (for the JSON listing)."""
    if isinstance(value, Mapping):
        return {k: abbreviate(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if len(value) > limit:
            return f"[{len(value)} values, in the diagnostics JSON file]"
        return [abbreviate(v, limit) for v in value]
    return value


# --- sections ---------------------------------------------------------------------------------------------------------
def _config_section(run) -> str:
    config = run.config
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    rows = [[f"<code>{esc(k)}</code>", esc(v if isinstance(v, str) else json.dumps(v))] for k, v in values.items()]
    if not rows:
        return '<h2 id="config">Configuration</h2>' + NOT_COMPUTED
    half = (len(rows) + 1) // 2  # two tables side by side: the config is long and its rows short
    halves = "".join(f"<div>{table(['field', 'value'], part)}</div>" for part in (rows[:half], rows[half:]) if part)
    return f'<h2 id="config">Configuration</h2><div class="columns">{halves}</div>'


def _training_section(run, pictures: dict[str, Path]) -> str:
    metrics = list(getattr(run, "metrics", None) or [])
    out = ['<h2 id="training">Training</h2>']
    last = {
        split: next((m for m in reversed(metrics) if m.get("split") == split), None) for split in ("train", "valid")
    }
    if not metrics:
        out.append('<p class="missing">no metrics.jsonl lines in this run directory</p>')
    else:
        keys = [k for split in ("train", "valid") if last[split] for k in last[split] if k != "split"]
        keys = list(dict.fromkeys(keys))
        rows = []
        for key in keys:
            note = METRIC_NOTES.get(key) or (
                f"IWAE bound with k={key[5:]} importance samples, nats" if key.startswith("iwae_") else ""
            )
            cells = [
                num(fmt(last[s].get(key), 4 if key == "lr" else 2) if last[s] else "—") for s in ("train", "valid")
            ]
            rows.append([f"<code>{esc(key)}</code>", *cells, why(note)])
        out.append(
            f'<p class="meta">{len(metrics)} metric lines; the final line of each split:</p>'
            + table(["quantity", "final train", "final valid", "meaning"], rows)
        )
        out.append(f'<p class="why">{esc(EXPLAIN["train"])} {esc(EXPLAIN["valid"])}</p>')
    out += [figure(n, pictures[n]) for n in SECTION_PICTURES["training"] if n in pictures]
    return "".join(out)


def _headline(d: Mapping[str, Any]) -> str:
    lp, gap = d.get("log_px"), d.get("posterior_gap")
    c = d.get("classification")
    if not isinstance(lp, Mapping) and isinstance(c, Mapping):  # a model of p(y|x) only: its test error leads
        return (
            '<h2 id="summary">Summary</h2>'
            + f"<p>Test error <strong>{fmt(100 * c['error'], 2)} %</strong>, "
            + f"NLL {pm({'mean': c['nll'], 'sem': c['nll_stderr']}, 4)} "
            + f'nats, ECE {fmt(c["ece"], 4)}: see <a href="#classification">Classification</a>. A model without '
            "latent variables has no log p(x) numbers.</p>"
        )
    if not isinstance(lp, Mapping):
        return NOT_COMPUTED
    gap_label = "posterior gap"
    rows = [
        [f"log p(x), k = {fmt(lp.get('k'))}", num(pm(lp)), why("log_px")],
        ["ELBO (KL form)", num(pm(d.get("elbo", {}).get("kl"))), why("elbo")],
        [gap_label, num(pm(gap)), why("posterior_gap")],
        ["active units", num(f"{fmt(d.get('active_units'))} of {fmt(d.get('latent_dim'))}"), why("active_units")],
    ]
    if isinstance(d.get("bits_per_dim"), Mapping):  # a model of 8-bit images
        rows.insert(1, ["−log p(x), bits per dimension", num(pm(d["bits_per_dim"], 4)), why("bits_per_dim")])
    frac = lp.get("fraction_pareto_k_above_threshold")
    if isinstance(frac, int | float) and frac > 0.1:
        verdict = (
            f'<p class="warning"><strong>Read log p(x) as a lower bound:</strong> Pareto k̂ exceeds its threshold '
            f"{fmt(lp.get('pareto_k_threshold'))} for {100 * frac:.1f}% of examples (median effective sample size "
            f"{fmt(lp.get('median_ess'), 1)} of k = {fmt(lp.get('k'))}). The importance weights are too heavy-tailed "
            "for the Monte Carlo error to be trusted; a better proposal (a richer encoder) or a larger k is needed.</p>"
        )
    elif isinstance(frac, int | float):
        verdict = (
            f'<p class="ok">The importance weights are well behaved: k̂ is above its threshold for only '
            f"{100 * frac:.1f}% of examples, so the log p(x) estimate and its error can be trusted.</p>"
        )
    else:
        verdict = ""
    return (
        '<h2 id="summary">Summary</h2>'
        + table(["quantity", "value (nats per example)", "meaning"], rows)
        + verdict
        + f'<p class="why">{esc(EXPLAIN["units"])} {esc(EXPLAIN["sem"])}</p>'
    )


def _elbo_section(d: Mapping[str, Any]) -> str:
    out = ['<h2 id="elbo">ELBO</h2>', f'<p class="why">{esc(EXPLAIN["elbo"])}</p>']
    elbo = d.get("elbo")
    if isinstance(elbo, Mapping) and elbo:
        rows = [
            [f"<code>{esc(form)}</code>", num(pm(s)), num(fmt(s.get("k"))), why(f"elbo_{form}")]
            for form, s in elbo.items()
            if isinstance(s, Mapping)
        ]
        out.append(table(["form", "ELBO", "samples per example", "meaning"], rows))
    else:
        out.append(NOT_COMPUTED)
    out.append("<h3>Monte Carlo variance of the three forms</h3>")
    forms_info = d.get("elbo_forms")
    if isinstance(forms_info, Mapping) and forms_info:
        forms = forms_info.get("forms", forms_info)
        rows = []
        for form, entry in forms.items():
            if not isinstance(entry, Mapping):
                continue
            value = entry.get("value", entry)
            variance = entry.get("variance")
            variance = variance.get("mean") if isinstance(variance, Mapping) else variance
            value_text = pm(value) if isinstance(value, Mapping) else fmt(value)
            lowest = " (lowest)" if forms_info.get("lowest_variance") == form else ""
            rows.append([f"<code>{esc(form)}</code>{esc(lowest)}", num(value_text), num(fmt(variance, 3))])
        k = forms_info.get("k")
        out.append(
            (
                f'<p class="meta">{fmt(k)} samples per example, the same samples for every form; on the first '
                f"{fmt(forms_info.get('examples'))} examples.</p>"
                if k
                else ""
            )
            + table(["form", "ELBO", "per-sample variance (nats²)"], rows)
        )
        out.append(f'<p class="why">{esc(EXPLAIN["elbo_forms"])}</p>')
    else:
        out.append(missing(forms_info))
    return "".join(out)


def _iwae_section(d: Mapping[str, Any], pictures: dict[str, Path]) -> str:
    from vaelab.plots import curve_table

    out = ['<h2 id="iwae">IWAE bounds</h2>', f'<p class="why">{esc(EXPLAIN["iwae"])}</p>']
    iwae = d.get("iwae")
    if isinstance(iwae, Mapping) and iwae:
        rows = [[num(fmt(k)), num(pm(s))] for k, s in sorted(curve_table(iwae).items())]
        out.append(table(["k", "IWAE_k bound"], rows))
    else:
        out.append(NOT_COMPUTED)
    out.append("<h3>IWAE bound against k</h3>")
    curve = d.get("iwae_curve")
    if isinstance(curve, Mapping) and curve:
        rows = [
            [num(fmt(k)), num(pm(s)), num(fmt(s.get("mean_mc_stderr"), 3)), num(fmt(s.get("mc_sem"), 3))]
            for k, s in sorted(curve_table(curve).items())
        ]
        out.append(table(["k", "IWAE_k bound", "mean per-example MC stderr", "MC error of the mean"], rows))
        out.append(f'<p class="why">{esc(EXPLAIN["iwae_curve"])}</p>')
    else:
        out.append(missing(curve))
    out += [figure(n, pictures[n]) for n in SECTION_PICTURES["iwae"] if n in pictures]
    return "".join(out)


def _log_px_section(d: Mapping[str, Any]) -> str:
    out = ['<h2 id="log-px">log p(x) by importance sampling</h2>', f'<p class="why">{esc(EXPLAIN["log_px"])}</p>']
    lp = d.get("log_px")
    if not isinstance(lp, Mapping):
        return "".join(out) + NOT_COMPUTED
    frac = lp.get("fraction_pareto_k_above_threshold")
    rows = [
        ["estimate of log p(x)", num(pm(lp)), why("sem")],
        ["importance samples k", num(fmt(lp.get("k"))), why("the number of samples from q(z|x) per example")],
        ["mean Monte Carlo stderr", num(fmt(lp.get("mean_mc_stderr"), 3)), why("mean_mc_stderr")],
        ["median effective sample size (ESS)", num(fmt(lp.get("median_ess"), 1)), why("ess")],
        ["Pareto k̂ threshold", num(fmt(lp.get("pareto_k_threshold"))), why("pareto_k")],
        [
            "examples with k̂ above the threshold",
            num("—" if frac is None else f"{100 * frac:.1f}%"),
            why("fraction_above"),
        ],
    ]
    extra = [
        k
        for k in lp
        if k
        not in (
            "mean",
            "sem",
            "k",
            "mean_mc_stderr",
            "median_ess",
            "pareto_k_threshold",
            "fraction_pareto_k_above_threshold",
            "per_example",
            "mc_stderr",
        )
    ]
    rows += [
        [f"<code>{esc(k)}</code>", num(fmt(lp[k], 3) if not isinstance(lp[k], Mapping) else pm(lp[k])), ""]
        for k in extra
    ]
    out.append(table(["quantity", "value", "meaning"], rows))
    return "".join(out)


def _gap_section(d: Mapping[str, Any], pictures: dict[str, Path]) -> str:
    from vaelab.plots import GAP_KEYS

    out = ['<h2 id="gaps">Where the ELBO loses: the gaps</h2>']
    settings = d.get("gap_decomposition")
    gaps = dict(d)
    if isinstance(settings, Mapping):  # the decomposition's own posterior gap: the sum of the two below, same examples
        gaps["posterior_gap"] = settings.get("posterior_gap", d.get("posterior_gap"))
        out.append(f'<p class="meta">Decomposed on the first {fmt(settings.get("examples"))} examples.</p>')
    elif isinstance(settings, str):
        out.append(missing(settings))
    rows = []
    for key in GAP_KEYS:
        s = gaps.get(key)
        label = key.replace("_", " ")
        if isinstance(s, Mapping) and s.get("mean") is not None:
            mc = s.get("mc_sem")
            rows.append([label, num(pm(s)), num(fmt(mc, 3)), why(key)])
        else:
            text = esc(s) if isinstance(s, str) else "not computed"
            rows.append([label, f'<span class="missing">{text}</span>', num("—"), why(key)])
    out.append(table(["gap", "mean ± sem (nats)", "Monte Carlo error of the mean", "meaning"], rows))
    if isinstance(settings, Mapping) and settings:
        scalars = [
            [f"<code>{esc(k)}</code>", num(fmt(v, 3) if not isinstance(v, Mapping) else pm(v))]
            for k, v in settings.items()
            if not isinstance(v, list) and k not in ("units", *GAP_KEYS)
        ]
        out.append(
            f'<p class="why">{esc(EXPLAIN["gap_decomposition"])}</p>' + table(["setting or estimate", "value"], scalars)
        )
    out += [figure(n, pictures[n]) for n in SECTION_PICTURES["gaps"] if n in pictures]
    return "".join(out)


def _estimator_section(d: Mapping[str, Any], pictures: dict[str, Path]) -> str:
    from vaelab.plots import study_table

    out = [
        '<h2 id="estimators">Naive Monte Carlo vs importance sampling</h2>',
        f'<p class="why">{esc(EXPLAIN["estimator_study"])}</p>',
    ]
    study = d.get("estimator_study")
    if not (isinstance(study, Mapping) and study):
        return "".join(out) + missing(study)
    if study.get("examples"):
        out.append(f'<p class="meta">On the first {fmt(study["examples"])} examples.</p>')
    rows = []
    for proposal, series in study_table(study).items():
        for k, r in sorted(series.items()):
            frac = r.get("fraction_pareto_k_above_threshold", r.get("fraction_above_threshold"))
            rows.append(
                [
                    esc(proposal),
                    num(fmt(k)),
                    num(pm(r)),
                    num(fmt(r.get("mean_mc_stderr", r.get("mean_stderr")), 3)),
                    num(fmt(r.get("mean_ess"), 1)),
                    num(fmt(r.get("mean_pareto_k"))),
                    num("—" if frac is None else f"{100 * frac:.0f}%"),
                ]
            )
    out.append(
        table(["proposal", "k", "log p̂(x) ± sem", "mean MC stderr", "mean ESS", "mean k̂", "k̂ above threshold"], rows)
    )
    out.append(f'<p class="why">{esc(EXPLAIN["ess"])} {esc(EXPLAIN["pareto_k"])}</p>')
    out += [figure(n, pictures[n]) for n in SECTION_PICTURES["estimators"] if n in pictures]
    return "".join(out)


def _ladder_section(d: Mapping[str, Any], pictures: dict[str, Path]) -> str:
    """The density-estimation ladders ``vaelab baselines --runs RUN`` wrote beside the run (``d["ladder"]``: one
    record per space), with samples of the VAE, its autoencoder and every baseline, one row each."""
    out = ['<h2 id="ladder">The ladder: classic density models on the same test images</h2>']
    records = d.get("ladder") or []
    if not records:
        out.append(
            '<p class="missing">no ladder for this run yet: <code>vaelab baselines --dataset NAME --runs RUN</code> '
            "writes RUN/ladder_SPACE.json, which this report then shows</p>"
        )
    for record in records:
        bits = record.get("space") == "dequantized"
        rows = []
        for row in record.get("rows", []):
            lp, b = row.get("log_px"), row.get("bits_per_dim")
            if "not_comparable" in row or lp is None:
                number = f'<td class="missing" colspan="{2 if bits else 1}">{esc(row.get("not_comparable", ""))}</td>'
            else:
                number = num(pm(lp)) + (num(pm(b, 4)) if bits else "")
            detail = row.get("detail") or {}
            chosen = ", ".join(f"{k} {fmt(v, 4)}" for k, v in (detail.get("chosen") or {}).items())
            rec = row.get("reconstruction")
            if rec:
                chosen = f"reconstruction {pm(rec)} nats, the VAE's {pm(row.get('vae_reconstruction'))}"
            rows.append([esc(row.get("name")), number, num(fmt(row.get("fit_seconds"), 1)), f"<td>{chosen}</td>"])
        head = ["model", "log p(x), nats", *(["bits/dim"] if bits else []), "fit s", "detail"]
        out.append(f'<p class="meta">{esc(record.get("split"))} ({esc(record.get("space"))} space)</p>')
        out.append(table(head, rows))
    out += [figure(n, pictures[n]) for n in SECTION_PICTURES["ladder"] if n in pictures]
    return "".join(out)


def _latent_section(d: Mapping[str, Any], pictures: dict[str, Path]) -> str:
    out = ['<h2 id="latent">Latent usage</h2>']
    if "active_units" not in d:
        out.append(NOT_COMPUTED)
    else:
        kl = d.get("kl_per_dim")
        var = d.get("posterior_mean_variance") or []
        rows = [
            ["active units", num(f"{fmt(d.get('active_units'))} of {fmt(d.get('latent_dim'))}"), why("active_units")],
            ["total KL", num(fmt(sum(kl)) if kl else "—"), why("kl_per_dim")],
            ["largest posterior-mean variance", num(fmt(max(var), 3) if var else "—"), why("posterior_mean_variance")],
        ]
        out.append(table(["quantity", "value", "meaning"], rows))
        if kl:
            order = sorted(range(len(kl)), key=lambda j: -kl[j])
            per_dim = [[f"z{j + 1}", num(fmt(kl[j], 3)), num(fmt(var[j], 3) if j < len(var) else "—")] for j in order]
            out.append(
                "<details><summary>KL and activity per dimension</summary>"
                + table(["dimension", "KL (nats)", "posterior-mean variance"], per_dim)
                + "</details>"
            )
    out += [figure(n, pictures[n]) for n in SECTION_PICTURES["latent"] if n in pictures]
    return "".join(out)


def _classification_section(d: Mapping[str, Any], pictures: dict[str, Path]) -> str:
    """How well a model that predicts labels does it (``d["classification"]``, from
    :func:`vaelab.evaluate.classification_metrics`), and the pictures of a conditional model."""
    out = ['<h2 id="classification">Classification and conditional pictures</h2>']
    c = d.get("classification")
    if isinstance(c, Mapping):
        nll = {"mean": c.get("nll"), "sem": c.get("nll_stderr")}
        rows = [
            ["accuracy", num(fmt(100 * c["accuracy"], 2) + " %"), why("the most probable class is the true one")],
            ["error", num(fmt(100 * c["error"], 2) + " %"), why("1 − accuracy")],
            ["NLL, −log p(y|x)", num(pm(nll, 4)), why("nats per example, of the true label")],
            ["expected calibration error", num(fmt(c.get("ece"), 4)), why(EXPLAIN_ECE)],
        ]
        out.append(f'<p class="meta">p(y|x) on {fmt(c.get("examples"))} test examples.</p>')
        out.append(table(["quantity", "value", "meaning"], rows))
    elif c is not None:
        out.append(missing(c))
    m = d.get("marginal")
    if isinstance(m, Mapping):  # a model of p(x|y): the generative classifier's estimates, summed over the labels
        k = fmt(m.get("k"))
        rows = [
            [f"log p(x|y), IWAE_{k} per class", num(pm(m.get("log_px_given_y"))), why("of the true label")],
            ["log p(x) = log Σ_c p(x|c) p(c)", num(pm(m.get("log_px"))), why("the label summed out: beside a VAE's")],
            [
                "nats the label carries",
                num(pm(m.get("label_nats"))),
                why("log p(x|y) − log p(x) = log p(y|x) − log p(y)"),
            ],
        ]
        out.append('<p class="meta">The generative classifier p(y|x) ∝ p(x|y) p(y), from the same estimates:</p>')
        out.append(table(["quantity", "nats per example", "meaning"], rows))
    figures = [figure(n, pictures[n]) for n in SECTION_PICTURES["classification"] if n in pictures]
    if c is None and not figures:
        out.append('<p class="missing">not applicable: the model neither predicts labels nor is given them</p>')
    return "".join(out + figures)


LABEL_NATS = "log p(x|y) − log p(x) = log p(y|x) − log p(y): at most log C for C equally likely classes"

EXPLAIN_ECE = (
    f"sum over {CALIBRATION_BINS} equal-width confidence bins of the share of examples times |accuracy − confidence|: "
    "0 for a perfectly calibrated classifier"
)


HANDLED = {
    "examples", "units", "elbo", "iwae", "log_px", "posterior_gap", "approximation_gap", "amortization_gap",
    "gap_decomposition", "elbo_forms", "estimator_study", "iwae_curve", "active_units", "latent_dim",
    "posterior_mean_variance", "kl_per_dim", "run_dir", "split", "weights", "seed", "diagnostics_examples",
    "classification", "ladder", "marginal", "bits_per_dim",
}  # fmt: skip


def render_report(run, diagnostics: Mapping[str, Any], *, pictures: Mapping[str, Path] | None = None) -> str:
    """The report as one HTML5 string (see :func:`write_report`)."""
    pictures = {name: Path(p) for name, p in (pictures or {}).items()}
    d = diagnostics
    run_dir = Path(getattr(run, "run_dir", "."))
    step = getattr(run, "step", None)
    weights = getattr(run, "weights", None)
    title = f"vaelab report: {run_dir.name or run_dir}"
    meta = (
        f"Run directory <code>{esc(run_dir)}</code>; weights <code>{esc(weights)}</code>"
        + (f" (step {fmt(step)})" if step is not None else "")
        + f"; evaluated on {fmt(d.get('examples'))} {esc(d.get('split', 'test'))} examples"
        + f"; written {esc(datetime.datetime.now().astimezone().isoformat(timespec='seconds'))}."
    )
    placed = {n for names in SECTION_PICTURES.values() for n in names}
    model_pictures = [figure(n, pictures[n]) for n in SECTION_PICTURES["model"] if n in pictures]
    more = [figure(n, p) for n, p in pictures.items() if n not in placed]
    others = {k: v for k, v in d.items() if k not in HANDLED}
    listing = esc(json.dumps(abbreviate(dict(d)), indent=2, default=str))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request: the file needs nothing outside itself
        f"<title>{esc(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">{meta}</p>',
        NAV,
        _headline(d),
        _config_section(run),
        _training_section(run, pictures),
        '<h2 id="pictures">What the model learned</h2>' + ("".join(model_pictures) or NOT_COMPUTED),
        _elbo_section(d),
        _iwae_section(d, pictures),
        _log_px_section(d),
        _gap_section(d, pictures),
        _estimator_section(d, pictures),
        _latent_section(d, pictures),
        _classification_section(d, pictures),
        _ladder_section(d, pictures),
    ]
    if more:
        parts.append('<h2 id="more-pictures">More pictures</h2>' + "".join(more))
    if others:
        parts.append(
            '<h2 id="other">Other diagnostics</h2>'
            + f"<pre>{esc(json.dumps(abbreviate(others), indent=2, default=str))}</pre>"
        )
    parts += [
        '<h2 id="json">All diagnostics</h2>',
        f"<details><summary>JSON (long lists abbreviated)</summary><pre>{listing}</pre></details>",
        "</main>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(run, diagnostics: dict, out: Path, *, pictures: dict[str, Path] | None = None) -> Path:
    """Write one self-contained HTML5 report of ``run`` to ``out`` (temporary file, then rename); returns ``out``.

    Args:
        run: a :class:`vaelab.train.Run` (its ``config``, ``metrics``, ``run_dir``, ``weights`` and ``step`` are
            shown).
        diagnostics: :func:`vaelab.evaluate.evaluate_model`'s dict or :func:`vaelab.diagnostics.diagnostics`'
            result as :func:`as_json` writes it (nats per example); missing sections say "not computed", those
            that do not apply to the model "not applicable: <reason>".
        out: the HTML file to write (its folder is created).
        pictures: ``{name: PNG path}``, e.g. from :func:`vaelab.plots.draw_pictures`; embedded as base64 data URIs.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render_report(run, diagnostics, pictures=pictures))
    return out
