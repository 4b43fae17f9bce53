"""Chapter 4: the three forms of the ELBO agree on the same samples, with different variances.

Claim: E_q[log p(x,z) - log q(z)] (joint), E_q[log p(x,z)] + H[q] (entropy) and E_q[log p(x|z)] - KL(q || p(z)) (kl)
are the same number, so from one draw of z ~ q their Monte Carlo averages all estimate the exact ELBO = log p(x) -
KL(q || p(z|x)) and each agrees with it under vaelab's tolerance rule. They differ in how much of the integral is
done analytically, hence in variance; in particular with q equal to the exact posterior the joint form's integrand is
log p(x) for every z: zero variance, which neither of the others has.
"""

import matplotlib.pyplot as plt
import torch
from _tutorial import arguments, save
from torch.distributions import Independent, Normal, kl_divergence

from vaelab import LinearGaussian, elbo_integrands
from vaelab.tolerance import assert_within_stderr, tolerance

args = arguments(__doc__.splitlines()[0])
torch.manual_seed(4)
torch.set_grad_enabled(False)
model = LinearGaussian.random(8, 3, noise_scale=0.7, generator=torch.Generator().manual_seed(4))
x = model.sample(1)  # (1, 8)
exact_log_px = model.log_marginal_exact(x)
posterior = model.posterior(x)
marginal_scale = posterior.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
proposals = {
    "q = p(z|x)": posterior,
    "mean-field q": Independent(Normal(posterior.loc + 0.5 * marginal_scale, marginal_scale), 1),
}
k = 5000
variances = {}
draws = {}
for name, q in proposals.items():
    integrands = elbo_integrands(model, x, k=k, q=q)  # ONE draw of z, three integrands, each (k, 1)
    exact_elbo = exact_log_px - kl_divergence(q, posterior)
    variances[name] = {form: values.var().item() for form, values in integrands.items()}
    draws[name] = integrands
    for form, values in integrands.items():
        mean, stderr = values.mean(0), values.std(0) / k**0.5
        assert_within_stderr(mean, exact_elbo, stderr, f"{form} form with {name}")
        print(f"{name:13s} {form:8s} ELBO {mean.item():9.4f} +- {stderr.item():.4f}  (exact {exact_elbo.item():.4f})"
              f"  per-sample variance {values.var().item():.3e}")  # fmt: skip
    # the three means differ only by Monte Carlo noise: pairwise within the tolerance of their differences
    means = {form: v.mean(0) for form, v in integrands.items()}
    for a, b in (("joint", "entropy"), ("joint", "kl"), ("entropy", "kl")):
        diff = integrands[a] - integrands[b]  # same z: the difference's own standard error
        assert bool(((means[a] - means[b]).abs() <= tolerance(diff.std(0) / k**0.5, means[a])).all()), (a, b, name)
# with the exact posterior the joint integrand log p(x, z) - log p(z|x) = log p(x) is constant
joint_exact = draws["q = p(z|x)"]["joint"]
assert torch.allclose(joint_exact, exact_log_px.expand_as(joint_exact), atol=1e-9), "joint form at q = p(z|x)"
assert variances["q = p(z|x)"]["kl"] > 1e3 * variances["q = p(z|x)"]["joint"] + 1e-6

fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
colours = {"joint": "tab:blue", "entropy": "tab:orange", "kl": "tab:green"}
for ax, name in zip(axes[:2], proposals, strict=True):
    every = torch.cat(list(draws[name].values()))
    bins = torch.linspace(every.min().item(), every.max().item(), 61).numpy()  # shared by the three forms
    for form, values in draws[name].items():
        label = f"{form}: mean {values.mean():.3f}, var {values.var():.2g}"
        if values.var() < 1e-12:  # a constant integrand: one spike
            ax.axvline(values[0, 0].item(), color=colours[form], lw=3, alpha=0.6, label=label)
        else:
            ax.hist(values[:, 0].numpy(), bins=bins, histtype="step", lw=1.5, color=colours[form], density=True,
                    label=label)  # fmt: skip
    ax.axvline(exact_log_px.item(), color="k", ls="--", lw=1, label="log p(x)")
    ax.set(title=f"per-sample integrands, {name}", xlabel="nats", ylabel="density")
    ax.legend(fontsize=7)
ax = axes[2]
width = 0.35
for i, name in enumerate(proposals):
    values = [max(variances[name][f], 1e-3) for f in colours]  # a zero variance drawn at the floor, labelled
    ax.bar([j + i * width for j in range(3)], values, width, label=name)
    for j, form in enumerate(colours):
        if variances[name][form] < 1e-3:
            ax.text(j + i * width, 1.5e-3, "0 (to rounding)", ha="center", fontsize=7, rotation=90, va="bottom")
ax.set_xticks([j + width / 2 for j in range(3)], list(colours))
ax.set(yscale="log", ylim=(1e-3, 30), title="variance of one sample's integrand", ylabel="nats^2")
ax.legend(fontsize=8)
fig.tight_layout()
save(fig, args.out, "04_elbo_forms.png")
