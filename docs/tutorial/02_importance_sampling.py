"""Chapter 2: naive Monte Carlo against importance sampling as the latent dimension d grows.

Claim: p(x) = E_{p(z)}[p(x|z)] can be estimated by averaging p(x|z) over draws from the prior (naive Monte Carlo), but
the posterior p(z|x) occupies a fraction of the prior's volume that shrinks exponentially with d, so almost every
prior draw has a negligible weight: the effective sample size (ESS) collapses, the Pareto k-hat of the weights rises
past its reliability threshold, and the samples needed for a fixed accuracy explode. Drawing from a proposal q(z|x)
close to the posterior instead (importance sampling) keeps the ESS a sizeable fraction of k at every d, and its
estimate agrees with the exact log p(x) under vaelab's tolerance rule.
"""

import math

import matplotlib.pyplot as plt
import torch
from _tutorial import arguments, save
from torch.distributions import MultivariateNormal

from vaelab import LinearGaussian, log_marginal
from vaelab.estimators import pareto_k_threshold
from vaelab.tolerance import assert_within_stderr

args = arguments(__doc__.splitlines()[0])
torch.manual_seed(2)
dims, k, batch, target_stderr = (1, 2, 4, 8, 16, 32), 4000, 8, 0.1
rows = []
for d in dims:
    model = LinearGaussian.random(2 * d, d, noise_scale=0.5, generator=torch.Generator().manual_seed(d))
    x = model.sample(batch)  # (B, 2d)
    exact = model.log_marginal_exact(x)  # (B,)
    posterior = model.posterior(x)
    # a proposal near the posterior: its mean, and its scale widened by 10% so the tails of q cover p(z|x)
    q = MultivariateNormal(posterior.loc, scale_tril=1.1 * posterior.scale_tril)
    for proposal in ("prior", "posterior"):
        est = log_marginal(model, x, k=k, proposal=proposal, q=q if proposal == "posterior" else None)
        if proposal == "posterior":  # importance sampling is reliable here, and agrees with the truth
            assert bool((est.pareto_k < pareto_k_threshold(k)).all()), f"IS k-hat too high at d={d}: {est.pareto_k}"
            assert_within_stderr(est.value, exact, est.stderr, f"importance-sampled log p(x) at d = {d}")
        # samples for a standard error of 0.1 nats: stderr^2 ~ 1/ESS, so ESS must reach 1/0.1^2 = 100
        needed = k / est.ess * (1 / target_stderr**2)
        rows.append(dict(d=d, proposal=proposal, error=(est.value - exact).abs().mean().item(),
                         ess=(est.ess / k).median().item(), khat=est.pareto_k.median().item(),
                         needed=needed.median().item()))  # fmt: skip
        print(f"d={d:3d} {proposal:9s} |error| {rows[-1]['error']:9.3f}  ESS/k {rows[-1]['ess']:.2e}  "
              f"k-hat {rows[-1]['khat']:5.2f}  samples for 0.1 nats ~{rows[-1]['needed']:.1e}")  # fmt: skip


def series(proposal, key):
    return [r[key] for r in rows if r["proposal"] == proposal]


# The naive estimator degrades with d: its ESS fraction falls by orders of magnitude and its k-hat crosses the
# threshold, while importance sampling's ESS fraction stays large.
naive_ess, is_ess = series("prior", "ess"), series("posterior", "ess")
assert naive_ess[-1] < naive_ess[0] / 100, f"naive ESS/k did not collapse: {naive_ess}"
assert series("prior", "khat")[-1] > pareto_k_threshold(k), "naive k-hat should flag the estimate at large d"
assert min(is_ess) > 0.05, f"importance sampling kept an ESS fraction above 5%: {is_ess}"
assert series("prior", "error")[-1] > 10 * series("posterior", "error")[-1]

fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
for proposal, label, colour in (("prior", "naive (z ~ p(z))", "tab:red"), ("posterior", "IS (z ~ q(z|x))", "tab:blue")):
    axes[0].plot(dims, series(proposal, "error"), "o-", color=colour, label=label)
    axes[1].plot(dims, series(proposal, "ess"), "o-", color=colour, label=label)
    khat = [min(h, 3.0) for h in series(proposal, "khat")]  # drawn up to 3: larger values sit on the top edge
    axes[2].plot(dims, khat, "o-", color=colour, label=label)
    axes[3].plot(dims, series(proposal, "needed"), "o-", color=colour, label=label)
axes[2].axhline(pareto_k_threshold(k), color="k", ls="--", lw=1, label=f"threshold ({pareto_k_threshold(k):.2f})")
titles = (
    f"|log p-hat - log p(x)|, k = {k}",
    "ESS / k (median)",
    "Pareto k-hat (median; clipped at 3)",
    "samples for 0.1 nats (a floor once ESS = 1)",
)
for ax, title in zip(axes, titles, strict=True):
    ax.set(xscale="log", xlabel="latent dimension d", title=title)
    ax.legend(fontsize=7)
axes[2].set_ylim(-2.5, 3.2)
for ax in (axes[0], axes[1], axes[3]):
    ax.set_yscale("log")
fig.tight_layout()
save(fig, args.out, "02_importance_sampling.png")
needed = math.ceil(series("prior", "needed")[-1])
print(f"(the naive estimate needs at least ~{needed:.1e} samples at d = {dims[-1]}: its ESS is 1, the floor)")
