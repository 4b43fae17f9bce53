"""Chapter 3: Jensen's gap. The ELBO lies below log p(x) by exactly KL(q(z|x) || p(z|x)).

Claim: for any q, log p(x) - ELBO(q) = KL(q || p(z|x)) (docs/theory.md, section 2). On a linear-Gaussian model both
log p(x) and the posterior p(z|x) are exact, so the gap can be estimated (exact log p(x) minus a Monte Carlo ELBO,
with the ELBO's standard error) and compared with the exact KL under vaelab's tolerance rule, for a family of q
moved away from the posterior. vaelab's own same-sample estimator, ``posterior_gap`` (log p-hat - ELBO-hat from one
draw), is shown beside it: it needs no exact log p(x), and is biased low by O(1/k).
"""

import matplotlib.pyplot as plt
import torch
from _tutorial import arguments, save
from torch.distributions import Independent, Normal, kl_divergence

from vaelab import LinearGaussian, elbo_integrands, posterior_gap
from vaelab.tolerance import assert_within_stderr

args = arguments(__doc__.splitlines()[0])
torch.manual_seed(3)
torch.set_grad_enabled(False)
model = LinearGaussian.random(6, 3, noise_scale=0.7, generator=torch.Generator().manual_seed(3))
x = model.sample(1)  # one observation, (1, 6)
exact_log_px = model.log_marginal_exact(x)  # (1,)
posterior = model.posterior(x)
loc0 = posterior.loc  # (1, 3)
marginal_scale = posterior.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()  # (1, 3)

k = 20000
shifts = torch.linspace(0.0, 3.0, 7).tolist()  # q's mean moved this many posterior standard deviations off
rows = []
for shift in shifts:
    # a mean-field q: the posterior's marginals (so KL > 0 even at shift 0: q ignores the correlations), moved off
    q = Independent(Normal(loc0 + shift * marginal_scale, marginal_scale), 1)
    integrand = elbo_integrands(model, x, k=k, q=q)["joint"]  # (k, 1): log p(x, z) - log q(z), z ~ q
    elbo, elbo_stderr = integrand.mean(0), integrand.std(0) / k**0.5
    gap, exact_kl = exact_log_px - elbo, kl_divergence(q, posterior)
    assert_within_stderr(gap, exact_kl, elbo_stderr, f"log p(x) - ELBO at shift {shift}")
    same_draw = posterior_gap(model, x, k=k, q=q)
    rows.append(dict(shift=shift, elbo=elbo.item(), se=elbo_stderr.item(), kl=exact_kl.item(),
                     gap=gap.item(), same=same_draw.value.item(), same_se=same_draw.stderr.item()))  # fmt: skip
    print(
        f"shift {shift:4.1f}: log p(x) - ELBO = {gap.item():8.4f} +- {elbo_stderr.item():.4f}   "
        f"exact KL(q || p(z|x)) = {exact_kl.item():8.4f}   posterior_gap = {same_draw.value.item():8.4f}"
    )
    assert bool((elbo <= exact_log_px).all()), "the ELBO is a lower bound"

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
s = [r["shift"] for r in rows]
ax = axes[0]
ax.axhline(exact_log_px.item(), color="k", lw=1, label="exact log p(x)")
ax.errorbar(s, [r["elbo"] for r in rows], yerr=[4.5 * r["se"] for r in rows], fmt="o", color="tab:blue",
            label="ELBO(q), Monte Carlo (bars: 4.5 s.e.)")  # fmt: skip
ax.plot(s, [exact_log_px.item() - r["kl"] for r in rows], "-", color="tab:orange", label="log p(x) - exact KL")
ax.set(xlabel="q's mean, posterior s.d. away from p(z|x)'s", ylabel="nats", title="the ELBO sits KL below log p(x)")
ax.legend(fontsize=8)
ax = axes[1]
ax.plot(s, [r["kl"] for r in rows], "-", color="tab:orange", label="exact KL(q || p(z|x))")
ax.errorbar(s, [r["gap"] for r in rows], yerr=[4.5 * r["se"] for r in rows], fmt="o", color="tab:blue",
            label="exact log p(x) - ELBO-hat")  # fmt: skip
ax.plot(s, [r["same"] for r in rows], "x", color="tab:green", ms=8, label=f"posterior_gap (same draw, k = {k})")
ax.set(xlabel="q's mean, posterior s.d. away from p(z|x)'s", ylabel="nats", title="Jensen's gap = KL")
ax.legend(fontsize=8)
fig.tight_layout()
save(fig, args.out, "03_jensen_gap.png")
