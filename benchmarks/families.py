"""Benchmark (not a test): compiled training throughput of each prior, posterior and bound users compare, beside
the plain VAE's, measured interleaved in one process.

Every family is the ``iwae-1layer`` MLP on dynamically binarized MNIST (batch 100, Adam 1e-3) with one part changed:
the VampPrior (500 pseudo-inputs through the encoder), planar or IAF posteriors, or the MIWAE / PIWAE / CIWAE bounds
(with IWAE at the same number of samples beside them, since their cost is that of k decoder passes per example), or
the likelihood (a mixture of 5 discretized logistics per pixel, on the 8-bit grey levels rather than binarized).
Each is a ``vaelab.train.Trainer`` with ``compile=True``, compiled during the warm-up; then ``--rounds`` rounds in
which every family takes ``--steps`` steps, the order rotating each round (``throughput.timed_rounds``), so that the
machine's other load falls on all of them alike. The ratio to the plain VAE is the median over rounds of the
per-round ratio.

    .venv/bin/python benchmarks/families.py            # ~5 min on 2 idle cores (compilation included)
    .venv/bin/python benchmarks/families.py --quick

Writes ``benchmarks/results/families.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from provenance import DEFAULT_DATA_DIR, RESULTS, command_line, vaelab_commit, write_results
from throughput import timed_rounds

from vaelab.data import as_float, load_dataset
from vaelab.train import TrainConfig, Trainer

K = 8  # samples per example of the multi-sample bounds (MIWAE and PIWAE as m = 2 groups of 4)
FAMILIES: dict[str, dict] = {
    "vae": {},
    "vamp": {"prior": "vamp"},
    "planar": {"posterior": "planar"},
    "iaf": {"posterior": "iaf"},
    "iwae": {"objective": "iwae", "k": K},
    "miwae": {"objective": "miwae", "k": K // 2, "objective_options": {"m": 2}},
    "piwae": {"objective": "piwae", "k": K // 2, "objective_options": {"m": 2}},
    "ciwae": {"objective": "ciwae", "k": K, "objective_options": {"elbo_weight": 0.05}},
    # the likelihood for 8-bit images: 5 discretized logistics per pixel (15 decoder outputs), on the grey levels
    "logistic-mixture": {
        "likelihood": "discretized-logistic-mixture",
        "likelihood_options": {"components": 5},
        "binarize": False,
    },
}


class Family:
    """One family's compiled Trainer: ``run(n)`` takes n training steps."""

    def __init__(self, name: str, overrides: dict, data: torch.Tensor, args):
        self.name = name
        config = TrainConfig(
            architecture="iwae-1layer",
            latent_dim=50,
            batch_size=args.batch_size,
            validation_size=0,
            seed=args.seed,
            progress=False,
            compile=True,
            **{"binarize": True, **overrides},
        )
        self._dir = tempfile.TemporaryDirectory()  # train_step writes nothing; the Trainer wants a run directory
        self.trainer = Trainer(config, data, None, self._dir.name)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.trainer.train_step()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20, help="steps per family before timing (compiles the step)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=50, help="timed steps per family per round")
    p.add_argument("--quick", action="store_true", help="3 rounds of 20 steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "families.json")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 3, 20
    if "vae" not in args.families:
        sys.exit("the plain VAE (vae) is the baseline every ratio is taken against: keep it in --families")
    splits = load_dataset("mnist", data_dir=args.data_dir, validation_size=0)
    data = as_float(splits.train)
    families = []
    for name in args.families:
        print(f"building and compiling {name} ...", flush=True)
        families.append(Family(name, FAMILIES[name], data, args))
    rates = timed_rounds(families, warmup=args.warmup, rounds=args.rounds, steps=args.steps, batch_size=args.batch_size)
    base = rates["vae"]
    results = {}
    print(f"{'family':<8} {'samples/s':>10} {'ratio to vae':>13}  settings")
    for family in families:
        values = rates[family.name]
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        results[family.name] = {
            "settings": FAMILIES[family.name],
            "samples_per_sec_by_round": values,
            "samples_per_sec_median": statistics.median(values),
            "ratio_to_vae": ratio,
            "fell_back_to_eager": bool(family.trainer.take_step.failed),
        }
        print(f"{family.name:<8} {statistics.median(values):>10.0f} {ratio:>13.3f}  {FAMILIES[family.name]}")
    out = {
        "families": results,
        "matmul_gflops_by_round": rates["matmul"],
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "command": command_line("families.py", argv),
        "commit": vaelab_commit(),
    }
    write_results(args.out, out)
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
