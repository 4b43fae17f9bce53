"""Chapter 5: the importance-weighted bounds climb toward log p(x) as k grows.

Claim (Burda et al., 2016): IWAE_k = E[log (1/k) sum_i p(x, z_i) / q(z_i|x)], z_i ~ q, satisfies
ELBO = IWAE_1 <= IWAE_k <= IWAE_2k <= log p(x), and IWAE_k -> log p(x) as k grows, the gap shrinking like
Var(w) / (2 k E[w]^2) once k is large. Checked on a linear-Gaussian model with a mean-field q: each expected bound is
estimated by averaging many independent replicates, consecutive bounds must not decrease and no bound may exceed the
exact log p(x) (both under vaelab's tolerance rule), and the largest k must close most of the gap.
"""

import matplotlib.pyplot as plt
import torch
from _tutorial import arguments, save
from torch.distributions import Independent, Normal

from vaelab import LinearGaussian, iwae_bound, log_marginal
from vaelab.tolerance import tolerance

args = arguments(__doc__.splitlines()[0])
torch.manual_seed(5)
torch.set_grad_enabled(False)
model = LinearGaussian.random(8, 4, noise_scale=0.6, generator=torch.Generator().manual_seed(5))
x = model.sample(1)  # (1, 8)
exact = model.log_marginal_exact(x).item()
posterior = model.posterior(x)
marginal_scale = posterior.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
q = Independent(Normal(posterior.loc, marginal_scale), 1)  # mean-field: ignores p(z|x)'s correlations

ks = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
replicates = 1000
# `replicates` independent copies of x (q repeated to match), each with one stream of max(ks) samples: IWAE_k for
# every k comes from the first k weights of the same stream (nested prefixes: log_marginal's iwae_ks)
xs = x.expand(replicates, -1)
qs = Independent(Normal(q.base_dist.loc.expand(replicates, -1), q.base_dist.scale.expand(replicates, -1)), 1)
stream = log_marginal(model, xs, k=max(ks), q=qs, iwae_ks=ks)
means, stderrs = [], []
for k in ks:
    bounds = stream.iwae[k]  # (replicates,): independent draws of the IWAE_k estimator
    means.append(bounds.mean().item())
    stderrs.append((bounds.std() / replicates**0.5).item())
    print(f"k = {k:5d}: IWAE_k = {means[-1]:9.4f} +- {stderrs[-1]:.4f}   gap to log p(x) {exact - means[-1]:.4f}")
# iwae_bound, the differentiable bound a training objective uses, estimates the same IWAE_k
check = iwae_bound(model, xs, k=8, q=qs)
assert (
    abs(check.mean().item() - means[3])
    <= tolerance(
        torch.tensor((check.var().item() / replicates + stderrs[3] ** 2) ** 0.5), torch.tensor(means[3])
    ).item()
), "iwae_bound and log_marginal's IWAE_8 disagree"
means_t, stderrs_t = torch.tensor(means, dtype=torch.float64), torch.tensor(stderrs, dtype=torch.float64)
exact_t = torch.tensor(exact, dtype=torch.float64)
# monotone in k (each step up to the tolerance of the difference of two independent means) and below log p(x)
step_se = (stderrs_t[1:] ** 2 + stderrs_t[:-1] ** 2).sqrt()
assert bool((means_t[1:] - means_t[:-1] >= -tolerance(step_se, exact_t)).all()), f"IWAE_k decreased: {means}"
assert bool((means_t <= exact_t + tolerance(stderrs_t, exact_t)).all()), "an IWAE bound above log p(x)"
gaps = exact_t - means_t
assert gaps[-1] < gaps[0] / 20, f"k = {ks[-1]} should close most of the ELBO's gap: {gaps.tolist()}"

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
ax = axes[0]
ax.axhline(exact, color="k", lw=1, label="exact log p(x)")
ax.errorbar(ks, means, yerr=[4.5 * s for s in stderrs], fmt="o-", color="tab:blue", label="IWAE_k (bars: 4.5 s.e.)")
ax.set(xscale="log", xlabel="k", ylabel="nats", title="IWAE_k climbs toward log p(x)")
ax.legend(fontsize=8)
ax = axes[1]
ax.loglog(ks, gaps.clamp_min(1e-4).tolist(), "o-", color="tab:blue", label="log p(x) - IWAE_k")
ax.loglog(ks, [gaps[4].item() * ks[4] / k for k in ks], "--", color="grey", label="~ 1/k")
ax.set(xlabel="k", ylabel="nats", title="the gap shrinks like 1/k for large k")
ax.legend(fontsize=8)
fig.tight_layout()
save(fig, args.out, "05_iwae.png")
