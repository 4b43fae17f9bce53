"""Benchmark (not a test): the cost of streaming log p(x) in tiny chunks (``chunk_size=1``) against automatic chunks.

Every chunk's log-weights are folded into ``vaelab.estimators._WeightStats``; a fold that is not O(1) per chunk makes
small chunks quadratic in k (issue 17: 52 s against 0.25 s at k = 5000). Times, in one process and one thread,
``log_marginal(k=K, chunk_size=1)`` and ``chunk_size=None`` on the IWAE paper's one-layer VAE (untrained weights,
seed 0) for B binary 784-pixel examples, and the statistics alone (``_WeightStats.update`` on ready log-weights).
Run it against two source trees to compare them side by side:

    OMP_NUM_THREADS=1 PYTHONPATH=OLD/src python benchmarks/stream_chunks.py
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/stream_chunks.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import torch

import vaelab
from vaelab.config import TrainConfig, build_model
from vaelab.estimators import _pareto_tail_size, _WeightStats


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5000, help="importance samples (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=10, help="examples B (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(TrainConfig(architecture="iwae-1layer", latent_dim=50, progress=False), (784,)).eval()
    x = torch.bernoulli(torch.full((args.batch, 784), 0.5))
    lw = torch.randn(args.k, args.batch, dtype=torch.float64)

    def stats_only():
        stats = _WeightStats(tail=_pareto_tail_size(args.k))
        for row in lw.split(1):
            stats.update(row)
        stats.log_marginal()

    result = {
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "source": vaelab.__file__,
        "k": args.k,
        "batch": args.batch,
        "log_marginal_auto_s": timed(lambda: vaelab.log_marginal(model, x, k=args.k)),
        "log_marginal_chunk1_s": timed(lambda: vaelab.log_marginal(model, x, k=args.k, chunk_size=1)),
        "weight_stats_chunk1_s": timed(stats_only),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
