"""Benchmark (not a test): training throughput of vaelab's Trainer against a hand-written loop, pythae and Pyro.

Every implementation trains the same model in the same process, interleaved round by round (the order rotating,
A B C D, B C D A, ...; the matmul rate re-measured at the end of each round) so that the machine's other load
falls on all of them alike: the IWAE paper's one-layer VAE (encoder 784-200-200-(2 x 50), decoder
50-200-200-784, tanh; q = N(loc, softplus(raw) + 1e-4), p(z) = N(0, I), Bernoulli decoder on logits) on
dynamically binarized MNIST (all 60,000 training images held as one tensor, a fresh Bernoulli draw of every
batch), batch 100, Adam lr 1e-3, loss = the batch mean of the negative one-sample ELBO with analytic KL.

* ``vaelab``    -- ``Trainer(TrainConfig(architecture="iwae-1layer", form="kl", ...)).train_step()`` in a loop
  (with its per-step checks: data support, finite loss, finite gradients);
* ``hand``      -- a minimal PyTorch loop written below (the baseline every ratio is taken against), and
  ``hand-2``, the same loop again: its ratio to ``hand`` is the timing noise floor, its test ELBO the spread
  between two runs that differ only in their random draws;
* ``pythae``    -- ``pythae.models.VAE`` (``VAEConfig(reconstruction_loss="bce")``) with custom encoder/decoder of
  the same architecture; its forward (loss) and an Adam step are driven here, doing per step what pythae's
  ``BaseTrainer.train_step`` does per batch (forward, zero_grad, backward, step, ``loss.item()`` and its NaN check):
  pythae's trainer runs whole epochs from a DataLoader and cannot take one step at a time, nor binarize per batch;
* ``pyro-trace`` and ``pyro-meanfield`` -- ``pyro.infer.SVI`` with ``Trace_ELBO`` (Monte Carlo KL) and
  ``TraceMeanField_ELBO`` (analytic KL), model and guide over a ``pyro.plate``, scaled by 1/B so the loss is the
  batch mean like the others; Pyro's argument validation is switched off (as vaelab's distributions skip theirs).

All start from the same initial weights (vaelab's initialisation, including the decoder's output bias at the
logit of the pixel means), visit the data in the same order, and train for the same number of steps. After
``--epochs`` epochs each model's weights are loaded into a vaelab model and its test ELBO (kl form, k = 1, on the
fixed-seed binarization of the 10,000 test images) is computed by one and the same function: no implementation
may buy speed with quality. Then timing-only rounds at the ``--extra-batch-sizes`` (default 1000) from fresh copies.

Achieved GFLOP/s counts the model's matmul work only: forward 2 * sum(in * out) over the six layers = 0.847 MFLOP
per example, training ~ 3x forward = 2.54 MFLOP per example, as a fraction of this machine's dense float32 matmul
rate: per round, against the rate measured at the end of that round (``of peak``), and against the best rate seen
in the run (``of best``; :func:`matmul_peak.matmul_peak` at the start).

The peers live in their own virtual environment (``bash benchmarks/setup_peers.sh``, which installs vaelab there
too, editable); a peer that is not importable is skipped with a note:

    benchmarks/.venv-peers/bin/python benchmarks/throughput.py           # ~2 min on 2 idle cores, 1 epoch
    benchmarks/.venv-peers/bin/python benchmarks/throughput.py --quick   # ~40 s: 150 steps, 2,000 test images
    benchmarks/.venv-peers/bin/python benchmarks/throughput.py --epochs 5 --impls vaelab,hand,hand-2

Writes benchmarks/results/throughput.json (override with --out).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from matmul_peak import bf16_matmul_peak, matmul_peak, matmul_rate
from peers import pythae_vae
from provenance import DEFAULT_DATA_DIR, RESULTS, command_line, vaelab_commit, write_results
from torch import nn

import vaelab
from vaelab.data import as_float, binarize_fixed, load_dataset
from vaelab.nets import init_decoder_bias
from vaelab.train import TrainConfig, Trainer, build_model

PIXELS, HIDDEN, LATENT = 784, 200, 50
ENCODER_SIZES = (PIXELS, HIDDEN, HIDDEN, 2 * LATENT)
DECODER_SIZES = (LATENT, HIDDEN, HIDDEN, PIXELS)
MIN_SCALE = 1e-4  # vaelab's DiagonalGaussian floor: scale = softplus(raw) + 1e-4


def forward_flop(*nets: tuple[int, ...]) -> int:
    """Matmul floating-point operations of one example's forward pass: 2 * in * out per dense layer."""
    return sum(2 * a * b for sizes in nets for a, b in itertools.pairwise(sizes))


TRAIN_FLOP_PER_EXAMPLE = 3 * forward_flop(ENCODER_SIZES, DECODER_SIZES)  # forward + backward ~ 3x forward: 2.54e6


# --- the networks, as plain nn.Sequential, and their weights in vaelab's layout ------------------------------------
def sequential_mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """Linear -> tanh for every hidden layer, then a final Linear (indices 0, 2, 4 hold the Linear layers)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def to_sequential(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vaelab MLP keys (``body.0.weight``, ``output_layer.bias``) -> nn.Sequential keys (``0.weight``, ``4.bias``)."""
    return {k.replace("body.", "", 1).replace("output_layer.", "4.", 1): v.detach().clone() for k, v in state.items()}


def from_sequential(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        (f"output_layer.{k[2:]}" if k.startswith("4.") else f"body.{k}"): v.detach().clone() for k, v in state.items()
    }


class Batches:
    """The data order of vaelab's Trainer: one fixed permutation per epoch (seed * 1_000_003 + epoch), then slices."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.steps_per_epoch = data.shape[0] // batch_size
        self._perm: tuple[int, torch.Tensor] | None = None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.data.shape[0], generator=g))
        idx = self._perm[1][i * self.batch_size : (i + 1) * self.batch_size]
        return torch.bernoulli(self.data[idx])  # dynamic binarization, (B, 784)


# --- the implementations -------------------------------------------------------------------------------------------
class Implementation:
    """One way of training the model: ``run(n)`` takes n optimizer steps; ``weights()`` returns the nets' states."""

    name = ""
    note = ""

    def __init__(self, init: dict[str, dict[str, torch.Tensor]], data: torch.Tensor, batch_size: int, args):
        self.encoder, self.decoder = sequential_mlp(ENCODER_SIZES), sequential_mlp(DECODER_SIZES)
        self.encoder.load_state_dict(init["encoder"])
        self.decoder.load_state_dict(init["decoder"])
        self.batches = Batches(data, batch_size, args.seed)
        self.step = 0

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.train_step(self.batches(self.step))
            self.step += 1

    def train_step(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict()}


class VaelabTrainer(Implementation):
    name = "vaelab"
    note = "vaelab.train.Trainer.train_step() in a loop (iwae-1layer, objective elbo, form kl)"
    compile = False
    bf16 = False

    def __init__(self, init, data, batch_size, args):
        config = TrainConfig(
            architecture="iwae-1layer",
            latent_dim=LATENT,
            form="kl",
            objective="elbo",
            k=1,
            batch_size=batch_size,
            epochs=max(1, math.ceil(args.epochs)),
            lr=args.lr,
            binarize=True,
            validation_size=0,
            seed=args.seed,
            device="cpu",
            progress=False,
            compile=self.compile,
            bf16=self.bf16,
        )
        self._dir = tempfile.TemporaryDirectory()  # train_step writes nothing; the Trainer wants a run directory
        self.trainer = Trainer(config, data, None, self._dir.name)
        self.trainer.model.encoder.load_state_dict(from_sequential(init["encoder"]))
        self.trainer.model.decoder.load_state_dict(from_sequential(init["decoder"]))
        self.step = 0

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.trainer.train_step()
        self.step += steps

    def weights(self):
        model = self.trainer.model
        return {
            "encoder": to_sequential(model.encoder.state_dict()),
            "decoder": to_sequential(model.decoder.state_dict()),
        }


class VaelabCompiled(VaelabTrainer):
    name = "vaelab-compile"
    note = "the same with TrainConfig(compile=True): the objective torch.compile'd (compiled during the warm-up)"
    compile = True


class VaelabCompiledBf16(VaelabTrainer):
    name = "vaelab-compile-bf16"
    note = "the same with TrainConfig(compile=True, bf16=True): matmuls in bfloat16 (weights, Adam, evaluation float32)"
    compile = True
    bf16 = True


class HandLoop(Implementation):
    name = "hand"
    note = "minimal PyTorch loop written in this script (the baseline)"

    def __init__(self, init, data, batch_size, args):
        super().__init__(init, data, batch_size, args)
        self.optimizer = torch.optim.Adam([*self.encoder.parameters(), *self.decoder.parameters()], lr=args.lr)

    def train_step(self, x: torch.Tensor) -> None:
        loc, raw = self.encoder(x).chunk(2, dim=-1)  # (B, 50) each
        scale = F.softplus(raw) + MIN_SCALE
        z = loc + scale * torch.randn_like(loc)  # reparameterized sample of q(z|x)
        logits = self.decoder(z)  # (B, 784)
        recon = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)  # log p(x|z), (B,)
        # KL(N(loc, scale^2) || N(0, I)) written out, as hand-written VAE loops do (valid for this prior only)
        kl = 0.5 * (loc.square() + scale.square() - 1).sum(-1) - scale.log().sum(-1)
        loss = (kl - recon).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class HandLoopReplicate(HandLoop):
    name = "hand-2"
    note = (
        "a second, identical hand loop (its own noise draws): its ratio to 'hand' shows the timing noise floor, its "
        "test ELBO the run-to-run spread that differences between implementations must exceed to mean anything"
    )


def pythae_factory() -> Callable | None:
    """The pythae implementation's class, or None (with a printed note) when pythae cannot be imported."""
    try:
        from pythae.data.datasets import DatasetOutput
    except Exception as err:  # not installed, or installed against an incompatible torch/pydantic
        print(f"note: pythae is not importable ({type(err).__name__}: {err}); skipping it", file=sys.stderr)
        return None

    class Pythae(Implementation):
        name = "pythae"
        note = (
            "pythae.models.VAE(VAEConfig(reconstruction_loss='bce')) with custom encoder/decoder; its forward and "
            "an Adam step driven per batch (what BaseTrainer.train_step does per batch; BaseTrainer itself runs "
            "whole epochs from a DataLoader and has no per-batch binarization)"
        )

        def __init__(self, init, data, batch_size, args):
            super().__init__(init, data, batch_size, args)
            shape = dict(data_shape=(PIXELS,), latent_dim=LATENT, min_scale=MIN_SCALE)
            self.model = pythae_vae(self.encoder, self.decoder, **shape)
            self.model.train()
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr)

        def train_step(self, x: torch.Tensor) -> None:
            out = self.model(DatasetOutput(data=x))
            self.optimizer.zero_grad()
            out.loss.backward()
            self.optimizer.step()
            loss = out.loss.item()
            if loss != loss:  # BaseTrainer's NaN check
                raise ArithmeticError("NaN detected in train loss")

    return Pythae


def pyro_factories() -> list[Callable]:
    """The two Pyro implementations' classes, or [] (with a printed note) when Pyro cannot be imported."""
    try:
        import pyro
        import pyro.distributions as dist
        from pyro import poutine
        from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
    except Exception as err:
        print(f"note: pyro is not importable ({type(err).__name__}: {err}); skipping it", file=sys.stderr)
        return []
    pyro.enable_validation(False)
    pyro.clear_param_store()

    class PyroSVI(Implementation):
        loss_class: type = Trace_ELBO

        def __init__(self, init, data, batch_size, args):
            super().__init__(init, data, batch_size, args)
            self.prefix = f"{self.name}-{id(self)}"  # Pyro's param store is global: one name space per instance
            self.svi = SVI(self.model, self.guide, pyro.optim.Adam({"lr": args.lr}), loss=self.loss_class())

        def model(self, x):
            pyro.module(f"{self.prefix}.decoder", self.decoder)
            batch = x.shape[0]
            with pyro.plate("data", batch), poutine.scale(scale=1.0 / batch):  # the batch mean, as the others
                prior = dist.Normal(x.new_zeros(batch, LATENT), x.new_ones(batch, LATENT)).to_event(1)
                z = pyro.sample("z", prior)
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

        def guide(self, x):
            pyro.module(f"{self.prefix}.encoder", self.encoder)
            batch = x.shape[0]
            with pyro.plate("data", batch), poutine.scale(scale=1.0 / batch):
                loc, raw = self.encoder(x).chunk(2, dim=-1)
                pyro.sample("z", dist.Normal(loc, F.softplus(raw) + MIN_SCALE).to_event(1))

        def train_step(self, x: torch.Tensor) -> None:
            self.svi.step(x)

    class PyroTrace(PyroSVI):
        name = "pyro-trace"
        note = "pyro.infer.SVI + Trace_ELBO (Monte Carlo KL), pyro.optim.Adam"
        loss_class = Trace_ELBO

    class PyroMeanField(PyroSVI):
        name = "pyro-meanfield"
        note = "pyro.infer.SVI + TraceMeanField_ELBO (analytic KL), pyro.optim.Adam"
        loss_class = TraceMeanField_ELBO

    return [PyroTrace, PyroMeanField]


# --- measuring -------------------------------------------------------------------------------------------------------
def timed_rounds(impls: list[Implementation], *, warmup: int, rounds: int, steps: int, batch_size: int) -> dict:
    """Warm-up steps for each, then ``rounds`` rounds; in each, every implementation takes ``steps`` timed steps.

    The order rotates by one each round (A B C D, B C D A, ...) so that no implementation always follows the same
    one. Each round ends with a measurement of the matmul rate (n = 2048), so that achieved GFLOP/s can be compared
    with what the machine delivered at that moment. Returns samples/s per implementation per round, and under
    ``"matmul"`` the GFLOP/s of each round.
    """
    for impl in impls:
        impl.run(warmup)
    rates: dict[str, list[float]] = {impl.name: [] for impl in impls}
    rates["matmul"] = []
    for r in range(rounds):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for impl in order:
            tick = time.perf_counter()
            impl.run(steps)
            rates[impl.name].append(steps * batch_size / (time.perf_counter() - tick))
        rates["matmul"].append(matmul_rate(2048, repeats=1, min_seconds=0.1))
        cells = [f"{impl.name} {rates[impl.name][-1]:6.0f}" for impl in impls]
        print(f"  round {r + 1:>2}/{rounds}: " + "  ".join(cells) + f"  | matmul {rates['matmul'][-1]:.0f} GFLOP/s")
    return rates


def summarize(rates: dict[str, list[float]], peak_gflops: float) -> dict:
    """Per implementation: median samples/s; ratios to the hand loop; achieved GFLOP/s and fractions of peak.

    ``ratio_to_hand`` is the median over rounds of samples/s divided by the hand loop's in the same round (robust to
    load that changes between rounds); ``fraction_of_matmul_peak`` likewise divides each round's achieved GFLOP/s by
    the matmul rate measured at the end of that round; ``fraction_of_best_peak`` uses the best rate seen in the run.
    """
    base, matmul = rates.get("hand"), rates["matmul"]
    best = max(peak_gflops, *matmul)
    out = {}
    for name, values in rates.items():
        if name == "matmul":
            continue
        median = statistics.median(values)
        gflops = [v * TRAIN_FLOP_PER_EXAMPLE / 1e9 for v in values]
        entry = {
            "samples_per_sec_by_round": values,
            "samples_per_sec_median": median,
            "gflops": statistics.median(gflops),
            "fraction_of_matmul_peak": statistics.median(g / m for g, m in zip(gflops, matmul, strict=True)),
            "fraction_of_best_peak": statistics.median(gflops) / best,
        }
        if base:
            entry["ratio_to_hand"] = statistics.median(v / b for v, b in zip(values, base, strict=True))
            entry["ratio_to_hand_of_medians"] = median / statistics.median(base)
        out[name] = entry
    return out


def test_elbo(weights: dict, test_x: torch.Tensor, config: TrainConfig, seed: int) -> dict:
    """ELBO (kl form, k = 1) of the weights on the fixed test binarization, by vaelab, for every implementation."""
    model = build_model(config, (PIXELS,))
    model.encoder.load_state_dict(from_sequential(weights["encoder"]))
    model.decoder.load_state_dict(from_sequential(weights["decoder"]))
    torch.manual_seed(seed)  # the same noise for every implementation
    with torch.inference_mode():
        model.eval()
        values = torch.cat([vaelab.elbo(model, x, k=1, form="kl") for x in test_x.split(1000)])
    return {"mean": values.mean().item(), "sem": (values.std() / math.sqrt(len(values))).item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="where MNIST is (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=100, help="batch of the training run (default: %(default)s)")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs, each timed (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds after the warm-up (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first, at least (default: %(default)s)")
    p.add_argument(
        "--extra-batch-sizes",
        default="1000",
        help="comma-separated batch sizes timed afterwards, from fresh copies, throughput only (default: %(default)s)",
    )
    p.add_argument(
        "--extra-steps", type=int, default=6, help="steps per round at an extra batch (default: %(default)s)"
    )
    p.add_argument(
        "--impls",
        default="vaelab,vaelab-compile,vaelab-compile-bf16,hand,hand-2,pythae,pyro-trace,pyro-meanfield",
        help="(default: %(default)s)",
    )
    p.add_argument("--test-examples", type=int, default=10000, help="test images for the ELBO (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="150 training steps, 2,000 test images, 3 steps per round")
    p.add_argument("--out", type=Path, default=RESULTS / "throughput.json", help="results file (default: %(default)s)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.test_examples, args.extra_steps = 150 * args.batch_size / 60000, 2000, 3

    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; measuring the matmul peak", flush=True)
    peak = matmul_peak(repeats=2 if args.quick else 5, min_seconds=0.1 if args.quick else 0.25)
    print(f"float32 matmul peak: {peak['peak_gflops']:.1f} GFLOP/s", flush=True)

    splits = load_dataset("mnist", data_dir=args.data_dir, validation_size=0)
    train_x = as_float(splits.train).reshape(len(splits.train), -1).contiguous()  # (60000, 784), one tensor
    test_x = binarize_fixed(as_float(splits.test).reshape(len(splits.test), -1), seed=0)[: args.test_examples]

    classes: list[Callable] = [VaelabTrainer, VaelabCompiled, VaelabCompiledBf16, HandLoop, HandLoopReplicate]
    pythae_class = pythae_factory()
    classes += [pythae_class] if pythae_class else []
    classes += pyro_factories()
    wanted = args.impls.split(",")
    classes = [c for c in classes if c.name in wanted]

    def build(batch_size: int) -> list[Implementation]:
        # vaelab's initialisation (incl. the decoder bias at the pixel means' logits), copied into every implementation
        torch.manual_seed(args.seed)
        ref = build_model(TrainConfig(architecture="iwae-1layer", latent_dim=LATENT, validation_size=0), (PIXELS,))
        init_decoder_bias(ref.decoder, train_x.mean(0).clamp(0, 1), "bernoulli")
        init = {"encoder": to_sequential(ref.encoder.state_dict()), "decoder": to_sequential(ref.decoder.state_dict())}
        return [cls(init, train_x, batch_size, args) for cls in classes]

    results: dict = {
        "benchmark": "training throughput, iwae-1layer VAE on dynamically binarized MNIST",
        "command": command_line("throughput.py", argv),
        "vaelab_commit": vaelab_commit(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "load_average_at_start": os.getloadavg(),
        "matmul_peak": peak,
        "train_flop_per_example": TRAIN_FLOP_PER_EXAMPLE,
        "lr": args.lr,
        "seed": args.seed,
        "implementations": {c.name: c.note for c in classes},
        "by_batch_size": {},
    }

    # 1. the training run: every step timed in interleaved rounds, then the test ELBO
    batch = args.batch_size
    impls = build(batch)
    total = max(args.rounds, round(args.epochs * (train_x.shape[0] // batch)))
    steps = max(1, (total - args.warmup) // args.rounds)
    warmup = total - args.rounds * steps
    print(
        f"\nbatch {batch}: {total} steps each ({total * batch / train_x.shape[0]:.3g} epochs): {warmup} warm-up, "
        f"{args.rounds} rounds of {steps}; samples/s",
        flush=True,
    )
    tick = time.perf_counter()
    rates = timed_rounds(impls, warmup=warmup, rounds=args.rounds, steps=steps, batch_size=batch)
    entry = {"steps": total, "epochs": total * batch / train_x.shape[0], "warmup_steps": warmup, "round_steps": steps}
    entry["implementations"] = summarize(rates, peak["peak_gflops"])
    entry["matmul_gflops_by_round"] = rates["matmul"]
    eval_config = TrainConfig(architecture="iwae-1layer", latent_dim=LATENT, validation_size=0)
    for impl in impls:
        entry["implementations"][impl.name]["test_elbo"] = test_elbo(impl.weights(), test_x, eval_config, args.seed)
    entry["wall_seconds"] = time.perf_counter() - tick
    results["by_batch_size"][str(batch)] = entry
    results["test_examples"] = len(test_x)
    del impls

    # 2. throughput only at the extra batch sizes
    for extra in [int(b) for b in args.extra_batch_sizes.split(",") if b.strip()]:
        if extra == batch:
            continue
        impls = build(extra)
        print(f"\nbatch {extra}: 2 warm-up steps, {args.rounds} rounds of {args.extra_steps}; samples/s", flush=True)
        rates = timed_rounds(impls, warmup=2, rounds=args.rounds, steps=args.extra_steps, batch_size=extra)
        results["by_batch_size"][str(extra)] = {
            "warmup_steps": 2,
            "round_steps": args.extra_steps,
            "implementations": summarize(rates, peak["peak_gflops"]),
            "matmul_gflops_by_round": rates["matmul"],
        }
        del impls
    results["load_average_at_end"] = os.getloadavg()
    # bf16 rows count float32-equivalent work: against the bf16 matmul rate too, measured once at the end
    results["bf16_matmul_peak"] = bf16_peak = bf16_matmul_peak(repeats=1 if args.quick else 3)
    for e in results["by_batch_size"].values():
        for name, s in e["implementations"].items():
            if "bf16" in name:
                s["fraction_of_bf16_peak"] = s["gflops"] / bf16_peak["peak_gflops"]

    write_results(args.out, results)
    print(f"\npeak {peak['peak_gflops']:.1f} GFLOP/s; {TRAIN_FLOP_PER_EXAMPLE / 1e6:.2f} MFLOP per training example")
    header = ("batch", "implementation", "samples/s", "x hand", "GFLOP/s", "of peak", "of best", "test ELBO")
    print("{:>5} {:<19} {:>9} {:>7} {:>8} {:>7} {:>7} {:>16}".format(*header))
    for b, e in results["by_batch_size"].items():
        for name, s in e["implementations"].items():
            elbo = f"{s['test_elbo']['mean']:8.2f} ± {s['test_elbo']['sem']:.2f}" if "test_elbo" in s else ""
            ratio = s.get("ratio_to_hand", math.nan)
            print(
                f"{b:>5} {name:<19} {s['samples_per_sec_median']:>9.0f} {ratio:>7.2f} {s['gflops']:>8.1f} "
                f"{s['fraction_of_matmul_peak']:>7.1%} {s['fraction_of_best_peak']:>7.1%} {elbo:>16}"
            )
    print(f"(test ELBO: kl form, k = 1, nats, on {len(test_x)} fixed-binarized test images;")
    print(" x hand: the median over rounds of samples/s divided by the hand loop's in the same round;")
    print(" of peak: achieved GFLOP/s over the matmul rate measured in the same round; of best: over the best rate)")
    for b, e in results["by_batch_size"].items():
        for name, s in e["implementations"].items():
            if "fraction_of_bf16_peak" in s:
                print(
                    f"batch {b} {name}: {s['fraction_of_bf16_peak']:.1%} of the bfloat16 matmul peak "
                    f"({bf16_peak['peak_gflops']:.0f} GFLOP/s)"
                )
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
