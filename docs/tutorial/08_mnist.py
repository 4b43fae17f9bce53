"""Chapter 8: from the linear model to a real VAE on MNIST, in a few minutes on a laptop's CPU.

Claim: everything the previous chapters checked against exact answers carries over to a deep model where log p(x)
is unknown. A 784-512-256-16 MLP VAE with a Bernoulli decoder, trained a few thousand steps on dynamically binarized
MNIST, is evaluated the way vaelab always evaluates: the ELBO, the IWAE bounds (nested prefixes of one importance
stream) and log p(x) by importance sampling with its Monte Carlo error, ESS and Pareto k-hat. The script asserts what
must hold whatever the training budget: the bounds are ordered, ELBO = IWAE_1 <= IWAE_10 <= IWAE_100 <= log p-hat
(image by image, from one importance stream; the mean step checked with the tolerance rule), the posterior gap is
positive, and the VAE beats the best model that treats pixels as independent
(a Bernoulli per pixel at its training mean: its log-likelihood is exact), by a wide margin.

Settings: by default ~5 epochs (3000 steps) and k = 1000 on 1000 test images (a few minutes on 2 cores); ``--quick``
(what CI runs) trains 300 steps and evaluates k = 100 on 200 test images. Data: MNIST wherever vaelab finds it
($VAELAB_DATA_DIR, ../shared/data beside the repository, the user cache, ...), else Fashion-MNIST from Debian's
package: see vaelab.data.
"""

import itertools
import json
import tempfile
from pathlib import Path

import torch
from _tutorial import arguments, save

from vaelab import TrainConfig, log_marginal
from vaelab.data import DataError, as_float, binarize_fixed, load_dataset
from vaelab.evaluate import evaluate_model, format_evaluation
from vaelab.plots import reconstructions_figure, samples_figure, training_curves_figure
from vaelab.runs import load_run
from vaelab.tolerance import tolerance
from vaelab.train import train

args = arguments(__doc__.splitlines()[0])
steps, k, examples = (300, 100, 200) if args.quick else (3000, 1000, 1000)
torch.manual_seed(8)

beside = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # ../shared/data beside the repository
data_dir = beside if beside.is_dir() else None
for name in ("mnist", "fashion-mnist"):
    try:
        splits = load_dataset(name, data_dir=data_dir, validation_size=1000, download=False)
        break
    except DataError as err:
        print(f"{name} not found ({str(err).splitlines()[0]}); trying the next")
else:
    raise SystemExit("no MNIST or Fashion-MNIST copy found: see vaelab.data for where vaelab looks")
print(f"data: {splits.name} from {splits.source}, {len(splits.train)} training images")

config = TrainConfig(dataset=name, latent_dim=16, max_steps=steps, batch_size=100, lr=1e-3, eval_k=10,
                     eval_examples=200, progress=False, compile=False, seed=8)  # fmt: skip
with tempfile.TemporaryDirectory() as run_dir:
    train(config, splits.train, splits.valid, run_dir)
    run = load_run(run_dir)
model, metrics = run.model, run.metrics

test = binarize_fixed(as_float(splits.test[:examples]))  # a fixed binarization of the first test images
result = evaluate_model(model, test, k=k, iwae_ks=(1, 10, 100), elbo_k=10, batch_size=100, progress=False)
print(format_evaluation(result))
(args.out / "08_mnist_eval.json").write_text(json.dumps(result, indent=1, default=float))

# the best independent-pixel model: a Bernoulli per pixel at its (smoothed) training mean; exact log-likelihood
mean = as_float(splits.train[:10000]).mean(0).clamp(1e-3, 1 - 1e-3)
independent = torch.distributions.Independent(torch.distributions.Bernoulli(probs=mean), 3).log_prob(test).mean()
print(f"  independent pixels (exact)     {independent.item():10.3f}")

# the ladder, paired per image: IWAE_1 (a one-sample ELBO) <= IWAE_10 <= ... <= log p-hat, from ONE importance
# stream per image (nested prefixes), each step's mean difference over images within the tolerance rule of >= 0
ks = [j for j in (1, 10, 100, 1000) if j < k]
with torch.no_grad():
    stream = log_marginal(model, test, k=k, iwae_ks=ks)
rungs = [(f"IWAE_{j}", stream.iwae[j]) for j in ks] + [(f"log p-hat (k = {k})", stream.value)]
for (lower, a), (upper, b) in itertools.pairwise(rungs):
    step = b - a  # (examples,)
    mean, stderr = step.mean(), step.std() / len(step) ** 0.5
    assert bool(mean >= -tolerance(stderr, mean)), f"{upper} below {lower} by {-mean:.3f} (s.e. {stderr:.3f})"
    print(f"  {upper} - {lower}: {mean:.3f} +- {stderr:.3f} nats")
assert result["posterior_gap"]["mean"] > 0, "log p(x) - ELBO = KL(q || p(z|x)) must be positive"
assert result["log_px"]["mean"] > independent.item() + 30, "the VAE should beat independent pixels by far"

fig = training_curves_figure(metrics)
save(fig, args.out, "08_mnist_curves.png")
save(samples_figure(model, 64), args.out, "08_mnist_samples.png")
save(reconstructions_figure(model, test[:10]), args.out, "08_mnist_reconstructions.png")
