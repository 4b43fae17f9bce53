"""Chapter 6: the beta-VAE. A KL weight beta > 1 switches latent units off; annealing beta down to 1 brings them back.

Claim: training on recon - beta * KL(q(z|x) || p(z)) (Higgins et al., 2017) trades reconstruction for a posterior
closer to the prior. The larger beta, the smaller the KL each latent dimension carries and the fewer units stay
active (Cov_x(E_q[z_j]) > 0.01, Burda et al., 2016). Checked on tiny synthetic data (x = A s + noise with a 2-D source
s in 8 dimensions; a VAE with 6 latent units): total KL falls as beta rises, and beta = 8 keeps fewer active units than
beta = 1. Then an annealed run (vaelab.schedules.Anneal: beta from 8 down to 1) starts compressed and, as beta falls,
lets the KL (and the ELBO) rise to end on the ELBO itself (beta = 1).
"""

import itertools

import matplotlib.pyplot as plt
import torch
from _tutorial import arguments, save

from vaelab import VAE
from vaelab.evaluate import latent_usage
from vaelab.likelihoods import GaussianLikelihood
from vaelab.nets import mlp_pair
from vaelab.objectives import elbo_objective
from vaelab.priors import StandardNormal
from vaelab.schedules import Anneal, Constant

args = arguments(__doc__.splitlines()[0])
torch.manual_seed(6)
n, data_dim, latent, steps = 512, 8, 6, 400
mixing = torch.randn(data_dim, 2)
source = torch.randn(n, 2)
data = torch.tanh(source @ mixing.T) + 0.1 * torch.randn(n, data_dim)  # (n, 8): a curved 2-D sheet plus noise


def make_vae(seed: int) -> VAE:
    torch.manual_seed(seed)
    encoder, decoder = mlp_pair((data_dim,), latent, hidden=(64,))
    return VAE(prior=StandardNormal(latent), encoder=encoder, decoder=decoder,
               likelihood=GaussianLikelihood((data_dim,), scale=0.1))  # fmt: skip


def fit(schedule, steps: int = steps, seed: int = 0) -> tuple[VAE, list[dict]]:
    """Full-batch Adam on the beta-weighted ELBO; beta(step) from the schedule (a pure function of the step)."""
    vae = make_vae(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    trace = []
    for step in range(steps):
        beta = schedule(step)
        out = elbo_objective(vae, data, beta=beta, form="kl")
        optimizer.zero_grad()
        out.loss.mean().backward()  # reduce once, here
        optimizer.step()
        trace.append(dict(step=step, beta=beta, kl=out.kl.mean().item(), elbo=out.elbo.mean().item()))
    return vae, trace


betas = (0.5, 1.0, 2.0, 4.0, 8.0)
usage = {}
for beta in betas:
    vae, trace = fit(Constant(value=beta))
    usage[beta] = latent_usage(vae, data)
    print(f"beta {beta:4.1f}: KL {sum(usage[beta]['kl_per_dim']):7.2f} nats, active units "
          f"{usage[beta]['active_units']} of {latent}, final ELBO {trace[-1]['elbo']:.2f}")  # fmt: skip
total_kl = [sum(usage[b]["kl_per_dim"]) for b in betas]
assert all(a > b for a, b in itertools.pairwise(total_kl)), f"KL should fall as beta rises: {total_kl}"
assert usage[8.0]["active_units"] < usage[1.0]["active_units"], "beta = 8 should switch units off"

anneal = Anneal(steps=steps, start=8.0, end=1.0)  # beta: 8 -> 1 over `steps` steps, then 1 for as many again
_, annealed = fit(anneal, steps=2 * steps)
assert annealed[-1]["beta"] == 1.0, "the schedule ends on the ELBO itself"
early, late = annealed[steps // 8], annealed[-1]
assert late["kl"] > early["kl"] + 1.0, f"KL should grow as beta falls: {early['kl']:.2f} -> {late['kl']:.2f}"
assert late["elbo"] > early["elbo"], "ending on beta = 1 should improve the ELBO over the compressed start"
print(f"annealed: KL {early['kl']:.2f} nats, ELBO {early['elbo']:.2f} at step {early['step']} "
      f"(beta {early['beta']:.2f}) -> KL {late['kl']:.2f}, ELBO {late['elbo']:.2f} at the end (beta 1)")  # fmt: skip

fig, axes = plt.subplots(1, 3, figsize=(16, 4))
ax = axes[0]
width = 0.8 / len(betas)
for i, beta in enumerate(betas):
    kl = sorted(usage[beta]["kl_per_dim"], reverse=True)
    ax.bar([j + i * width for j in range(latent)], kl, width, label=f"beta = {beta:g}")
ax.set(xlabel="latent unit (sorted by KL)", ylabel="KL(q || p(z)) per dimension, nats", title="KL per dimension")
ax.legend(fontsize=8)
ax = axes[1]
ax.plot(betas, total_kl, "o-", label="total KL (nats)")
ax.plot(betas, [usage[b]["active_units"] for b in betas], "s-", label="active units")
ax.set(xscale="log", xlabel="beta", title="KL and active units against beta")
ax.set_xticks(betas, [f"{b:g}" for b in betas])
ax.minorticks_off()
ax.legend(fontsize=8)
ax = axes[2]
steps_axis = [t["step"] for t in annealed]
ax.plot(steps_axis, [t["kl"] for t in annealed], color="tab:blue", label="KL (nats)")
ax.set(xlabel="step", ylabel="KL, nats", title="annealing beta from 8 to 1")
twin = ax.twinx()
twin.plot(steps_axis, [t["beta"] for t in annealed], color="tab:red", ls="--", label="beta")
twin.set_ylabel("beta", color="tab:red")
ax.legend(loc="upper left", fontsize=8)
fig.tight_layout()
save(fig, args.out, "06_beta_vae.png")
