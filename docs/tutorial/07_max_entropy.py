"""Chapter 7: the maximum-entropy argument, checked numerically.

Claim: among all densities on the real line with a given variance sigma^2, the Gaussian has the largest differential
entropy, H = (1/2) log(2 pi e sigma^2). (Proof sketch: for any p with that variance, 0 <= KL(p || N) = -H[p] -
E_p[log N] = H[N] - H[p], because E_p[log N] depends on p only through its variance.) This is why the Gaussian is the
least-committal choice of prior and of q's family once a scale is fixed. Checked on six distributions of variance 1:
each one's entropy is computed twice, analytically and by Monte Carlo (-mean log p(x) over its own samples, which must
agree under vaelab's tolerance rule), the KL identity above is checked for each, and the Gaussian's comes out on top.
"""

import math

import matplotlib.pyplot as plt
import torch
from _tutorial import arguments, save
from torch.distributions import Gumbel, Laplace, Normal, StudentT, TransformedDistribution, Uniform
from torch.distributions.transforms import AffineTransform, SigmoidTransform

from vaelab.tolerance import assert_within_stderr

args = arguments(__doc__.splitlines()[0])
torch.manual_seed(7)
torch.set_grad_enabled(False)
f64 = dict(dtype=torch.float64)
one, zero = torch.ones((), **f64), torch.zeros((), **f64)
logistic_scale = math.sqrt(3) / math.pi  # Var = (pi s)^2 / 3 = 1
logistic = TransformedDistribution(
    Uniform(zero, one), [SigmoidTransform().inv, AffineTransform(zero, logistic_scale * one)]
)
distributions = {  # every one has variance 1 (the Gumbel's mean is 0.577 * scale, the others' 0)
    "Gaussian": Normal(zero, one),
    "Student-t (5 dof)": StudentT(5 * one, zero, math.sqrt(3 / 5) * one),
    "logistic": logistic,
    "Laplace": Laplace(zero, math.sqrt(0.5) * one),
    "Gumbel": Gumbel(zero, math.sqrt(6) / math.pi * one),
    "uniform": Uniform(-math.sqrt(3) * one, math.sqrt(3) * one),
}
analytic = {  # closed forms; the logistic's entropy is log s + 2 (torch has no entropy for the transformed one)
    name: (math.log(logistic_scale) + 2 if name == "logistic" else d.entropy().item())
    for name, d in distributions.items()
}
gaussian_bound = 0.5 * math.log(2 * math.pi * math.e)
n = 200_000
mc = {}
for name, d in distributions.items():
    x = d.sample((n,))
    variance, stderr_var = x.var(), (((x - x.mean()) ** 2).std() / n**0.5)
    assert_within_stderr(variance, one, stderr_var, f"variance of the {name}")
    log_p = d.log_prob(x)
    entropy, stderr = -log_p.mean(), log_p.std() / n**0.5
    assert_within_stderr(entropy, torch.tensor(analytic[name], **f64), stderr, f"Monte Carlo entropy of the {name}")
    # KL(p || N(0, 1)) = H[N] - H[p] for any p of mean 0 and variance 1: estimated from the same samples
    mean = zero if name == "logistic" else d.mean  # (torch has no mean for the transformed logistic: 0)
    kl = log_p - Normal(mean, one).log_prob(x)
    assert_within_stderr(kl.mean(), torch.tensor(gaussian_bound - analytic[name], **f64), kl.std() / n**0.5,
                         f"KL({name} || Gaussian) = H[Gaussian] - H[{name}]")  # fmt: skip
    mc[name] = (entropy.item(), stderr.item())
    print(f"{name:18s} H = {analytic[name]:.4f} (analytic)  {entropy:.4f} +- {stderr:.4f} (Monte Carlo)")
assert abs(analytic["Gaussian"] - gaussian_bound) < 1e-12
assert max(analytic, key=analytic.get) == "Gaussian", "the Gaussian should have the largest entropy"
assert all(h < gaussian_bound for name, h in analytic.items() if name != "Gaussian")

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
grid = torch.linspace(-4, 4, 801, **f64)
for name, d in distributions.items():
    inside = d.support.check(grid)
    density = torch.where(inside, d.log_prob(torch.where(inside, grid, zero)).exp(), zero)
    axes[0].plot(grid, density, lw=2 if name == "Gaussian" else 1, label=f"{name}: H = {analytic[name]:.3f}")
axes[0].set(xlabel="x", ylabel="density", title="six densities with variance 1")
axes[0].legend(fontsize=8)
names = sorted(distributions, key=analytic.get)
axes[1].barh(names, [analytic[m] for m in names], color=["tab:red" if m == "Gaussian" else "tab:grey" for m in names])
axes[1].errorbar([mc[m][0] for m in names], names, xerr=[4.5 * mc[m][1] for m in names], fmt="k.",
                 label="Monte Carlo (bars: 4.5 s.e.)")  # fmt: skip
axes[1].axvline(gaussian_bound, color="tab:red", ls="--", lw=1, label="(1/2) log(2 pi e)")
axes[1].set(xlim=(1.1, 1.5), xlabel="differential entropy, nats", title="the Gaussian's is the largest")
axes[1].legend(fontsize=8, loc="lower right")
fig.tight_layout()
save(fig, args.out, "07_max_entropy.png")
