"""Chapter 1: the latent-variable model, and sampling from it.

Claim: drawing z ~ p(z) and then x ~ p(x|z) (ancestral sampling) draws x from the marginal p(x) = int p(z) p(x|z) dz.
On a linear-Gaussian model p(x) is known in closed form, N(b, W W^T + Psi), so the claim is checked twice: the sample
mean against b, and the average log p(x) of the samples against -H[p(x)], the exact negative entropy of the marginal.
Both comparisons use vaelab's tolerance rule (|estimate - exact| <= 4.5 standard errors + rounding slack).
"""

import matplotlib.pyplot as plt
import torch
from _tutorial import arguments, save

from vaelab import LinearGaussian
from vaelab.tolerance import assert_within_stderr

args = arguments(__doc__.splitlines()[0])
torch.manual_seed(1)
torch.set_grad_enabled(False)  # no training in this chapter
# D = 2 observed dimensions, d = 1 latent dimension: every x lies near the line b + W z.
weight = torch.tensor([[2.0], [1.0]], dtype=torch.float64)
model = LinearGaussian(weight, torch.tensor([1.0, -0.5], dtype=torch.float64), noise_var=0.1)

n = 5000
z = model.prior.sample((n,))  # (n, 1): step 1, z ~ p(z) = N(0, 1)
x = model.decode(z).sample()  # (n, 2): step 2, x ~ p(x|z) = N(W z + b, Psi)

marginal = model.marginal()  # the exact p(x)
mean_stderr = x.std(0) / n**0.5
assert_within_stderr(x.mean(0), marginal.mean, mean_stderr, "sample mean of x")
log_px = model.log_marginal_exact(x)  # (n,)
assert_within_stderr(log_px.mean(), -marginal.entropy(), log_px.std() / n**0.5, "mean log p(x) of the samples")
print(f"sample mean {x.mean(0).tolist()}  vs  b = {marginal.mean.tolist()}")
print(f"mean log p(x) {log_px.mean():.4f} +- {log_px.std() / n**0.5:.4f}  vs  -H[p(x)] = {-marginal.entropy():.4f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 4))
ax = axes[0]
grid = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
line = model.decode(torch.linspace(-3.5, 3.5, 2, dtype=torch.float64)[:, None]).mean
ax.plot(line[:, 0], line[:, 1], "k-", lw=1, label="b + W z (the noise-free line)")
centres = model.decode(grid).mean
ax.scatter(centres[:, 0], centres[:, 1], c=grid[:, 0], cmap="viridis", s=60, zorder=3, label="b + W z at z = -3..3")
ax.scatter(x[:500, 0], x[:500, 1], s=3, alpha=0.4, c=z[:500, 0], cmap="viridis", label="x ~ p(x|z), z ~ p(z)")
ax.set(xlabel="x_1", ylabel="x_2", title="ancestral samples (colour: their z)")
ax.legend(fontsize=7, loc="upper left")
ax = axes[1]
u, v = torch.meshgrid(torch.linspace(-6, 8, 200, dtype=torch.float64), torch.linspace(-4, 3, 200, dtype=torch.float64),
                      indexing="xy")  # fmt: skip
density = model.log_marginal_exact(torch.stack([u, v], -1).reshape(-1, 2)).exp().reshape(u.shape)
ax.contour(u, v, density, levels=8, cmap="Greys")
ax.scatter(x[:500, 0], x[:500, 1], s=3, alpha=0.4, color="tab:blue")
ax.set(xlabel="x_1", ylabel="x_2", title="the same samples over the exact p(x) = N(b, W W^T + Psi)")
save(fig, args.out, "01_model.png")
