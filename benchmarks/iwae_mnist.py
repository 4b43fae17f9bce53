"""Benchmark (not a test): the IWAE paper's one-stochastic-layer model on dynamically binarized MNIST.

Trains the 784-200-200-50 tanh model (Burda, Grosse & Salakhutdinov, 2016) as a VAE (k = 1 ELBO) and as IWAE-k
(k = 5 by default) for a stated number of epochs, then estimates test log p(x) with k = 5000 importance samples
(streamed; nats per example on the fixed-seed binarization of the 10,000 test images) and reports training
throughput. Published anchors after 3280 epochs: VAE -86.76, IWAE-50 -84.78 nats (Burda et al. 2016, Table 1);
short runs land well below those.

    .venv/bin/python benchmarks/iwae_mnist.py --epochs 10            # ~15 min on 2 CPU cores
    .venv/bin/python benchmarks/iwae_mnist.py --epochs 1 --test-examples 500 --eval-k 500   # a quick look

Writes benchmarks/results/iwae_mnist.json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import RESULTS, write_results

import vaelab
from vaelab.data import as_float, binarize_fixed, load_dataset
from vaelab.train import TrainConfig, Trainer


def evaluate(model, test: torch.Tensor, *, k: int, batch: int, device: torch.device) -> dict:
    values, stderrs, khats, ess = [], [], [], []
    tick = time.perf_counter()
    with torch.inference_mode():
        model.eval()
        for i, x in enumerate(test.split(batch)):
            r = vaelab.log_marginal(model, x.to(device), k=k)
            values.append(r.value.cpu())
            stderrs.append(r.stderr.cpu())
            khats.append(r.pareto_k.cpu())
            ess.append(r.ess.cpu())
            print(f"\r  eval {min((i + 1) * batch, len(test))}/{len(test)}", end="", file=sys.stderr, flush=True)
        elbo = torch.cat([vaelab.elbo(model, x.to(device), k=1, form="kl").cpu() for x in test.split(batch)])
    print(file=sys.stderr)
    values, stderrs, khats, ess = (torch.cat(t) for t in (values, stderrs, khats, ess))
    return {
        "test_log_px": values.mean().item(),
        # spread over test images (the number's uncertainty as a dataset mean) and mean per-example MC error
        "test_log_px_sem_over_examples": (values.std() / math.sqrt(len(values))).item(),
        "mean_per_example_mc_stderr": stderrs.mean().item(),
        "fraction_pareto_k_above_0.7": (khats > 0.7).double().mean().item(),
        "median_ess": ess.median().item(),
        "test_elbo": elbo.mean().item(),
        "eval_seconds": time.perf_counter() - tick,
        "eval_k": k,
        "test_examples": len(values),
    }


def main(argv=None) -> int:
    vaelab.keep_freed_memory()  # opt in, as the command line does: glibc keeps freed memory (vaelab._malloc)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="where MNIST is (default: vaelab's search order)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs per model (default: %(default)s)")
    p.add_argument("--iwae-k", type=int, default=5, help="k of the IWAE objective (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=100, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument(
        "--eval-k", type=int, default=5000, help="importance samples for test log p(x) (default: %(default)s)"
    )
    p.add_argument("--test-examples", type=int, default=None, help="evaluate on the first N test images (default: all)")
    p.add_argument("--models", default="vae,iwae", help="comma-separated subset of vae,iwae (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS / "iwae_mnist.json", help="results file (default: %(default)s)")
    args = p.parse_args(argv)

    splits = load_dataset("mnist", data_dir=args.data_dir, validation_size=0)
    train_x = as_float(splits.train).reshape(len(splits.train), -1)
    test_x = binarize_fixed(as_float(splits.test).reshape(len(splits.test), -1), seed=0)[: args.test_examples]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {
        "benchmark": "iwae-1layer on dynamically binarized MNIST",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "anchors_3280_epochs": {"vae": -86.76, "iwae-50": -84.78},
        "models": {},
    }
    objectives = {"vae": ("elbo", 1), "iwae": ("iwae", args.iwae_k)}
    for name in args.models.split(","):
        objective, k = objectives[name]
        label = "vae" if name == "vae" else f"iwae-{k}"
        config = TrainConfig(
            architecture="iwae-1layer",
            latent_dim=50,
            objective=objective,
            k=k,
            batch_size=args.batch_size,
            epochs=args.epochs,
            lr=args.lr,
            binarize=True,
            seed=args.seed,
            log_every=100,
            eval_every=10**9,  # no validation set here: test is evaluated once, at the end
            checkpoint_every=10**9,
            keep_last=1,
            progress=False,  # a results log, not a terminal: timings are printed at the end
        )
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(config, train_x, None, run_dir)
            tick = time.perf_counter()
            trainer.fit()
            train_seconds = time.perf_counter() - tick
            lines = [json.loads(s) for s in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        train_lines = [line for line in lines if line["split"] == "train"]
        print(
            f"{label}: trained {args.epochs} epochs in {train_seconds:.0f} s; evaluating k={args.eval_k}",
            file=sys.stderr,
        )
        entry = {
            "objective": objective,
            "k": k,
            "train_seconds": train_seconds,
            "train_samples_per_sec": len(train_x) * args.epochs / train_seconds,
            "final_train_elbo": train_lines[-1]["elbo"],
        }
        entry.update(evaluate(trainer.model, test_x, k=args.eval_k, batch=100, device=device))
        results["models"][label] = entry
        print(json.dumps({label: entry}, indent=2))
    write_results(args.out, results)
    print(f"\n{'model':<8} {'epochs':>6} {'test log p(x)':>14} {'test ELBO':>10} {'samples/s':>10} {'k-hat>0.7':>9}")
    for label, e in results["models"].items():
        print(
            f"{label:<8} {args.epochs:>6} {e['test_log_px']:>8.2f} ±{e['test_log_px_sem_over_examples']:.2f} "
            f"{e['test_elbo']:>10.2f} {e['train_samples_per_sec']:>10.0f} {e['fraction_pareto_k_above_0.7']:>9.3f}"
        )
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
