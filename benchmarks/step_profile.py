"""Benchmark (not a test): where one compiled training step's time goes, by kind of work.

Runs vaelab's ``Trainer.train_step`` with ``compile=True`` (the iwae-1layer model of ``throughput.py``, batch 100
and 1000, uniform-noise images of MNIST's shape: the cost does not depend on the pixel values) and reads
``torch.profiler``'s self time per step, with inductor's kernel profiling on so that each fused kernel shows by
name. The kernels and ops are grouped into the rows of the table in ``docs/performance.md`` ("Where the time
goes"); the wall time per step is measured without the profiler, which adds overhead of its own.

    .venv/bin/python benchmarks/step_profile.py          # ~1 min on 2 cores (two compilations, cached after)
    .venv/bin/python benchmarks/step_profile.py --bf16   # the same with bfloat16 autocast

Writes benchmarks/results/step_profile.json (override with --out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config
from device_check import PIXELS, config
from provenance import RESULTS, command_line, vaelab_commit, write_results
from torch.profiler import profile

from vaelab.train import Trainer

# (row, test on a profiler event name), first match wins; inductor's kernels are named after the ops they fuse
ROWS = (
    ("GEMMs (mm, addmm)", lambda name: name in ("aten::mm", "aten::addmm")),
    ("addmm's bias copies (copy_)", lambda name: name == "aten::copy_"),
    ("Adam update (fused kernel)", lambda name: name.startswith("graph_") and "lerp" in name),
    (
        "Bernoulli log-likelihood and gradient (fused kernel)",
        lambda name: name.startswith("graph_") and "log" in name and "exp" in name and "abs" in name,
    ),
    ("other fused kernels", lambda name: name.startswith("graph_")),
    ("tanh (ATen's kernel, called as vaelab::tanh)", lambda name: name in ("aten::tanh", "vaelab::tanh")),
    ("random bits (random_)", lambda name: name == "aten::random_"),
    ("batch gather (index_select / index)", lambda name: name in ("aten::index_select", "aten::index")),
    ("dynamo's guards", lambda name: "Cache Lookup" in name),
)


def profile_step(batch_size: int, *, bf16: bool, steps: int) -> dict:
    data = torch.rand(60_000, PIXELS)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config(batch_size, "cpu", compile=True, bf16=bf16), data, None, run_dir)
        for _ in range(10):  # the first step runs eagerly, the second compiles
            trainer.train_step()
        walls = []
        for _ in range(3):
            tick = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            walls.append((time.perf_counter() - tick) / steps * 1e3)
        with profile() as prof:
            for _ in range(steps):
                trainer.train_step()
    rows = {row: 0.0 for row, _ in ROWS}
    total = 0.0
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / steps / 1e3
        total += ms
        row = next((row for row, match in ROWS if match(event.key)), None)
        if row is not None:
            rows[row] += ms
    rows["the rest (wrappers, the step's Python, Gaussian draws)"] = total - sum(rows.values())
    return {"wall_ms_per_step": walls, "profiled_ms_per_step": total, "ms_per_step": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (default: float32)")
    out = RESULTS / "step_profile.json"
    p.add_argument("--out", type=Path, default=out, help="results file (default: %(default)s)")
    args = p.parse_args(argv)
    torch._inductor.config.cpp.enable_kernel_profile = True
    results = {
        "benchmark": "compiled training step, profiler self time by kind of work",
        "command": command_line("step_profile.py", argv),
        "vaelab_commit": vaelab_commit(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16": args.bf16,
        "by_batch_size": {},
    }
    for batch_size, steps in ((100, 300), (1000, 40)):
        results["by_batch_size"][str(batch_size)] = profile_step(batch_size, bf16=args.bf16, steps=steps)
    sizes = list(results["by_batch_size"])
    print(f"{'ms per step':<56}" + "".join(f"{'batch ' + b:>12}" for b in sizes))
    walls = [results["by_batch_size"][b]["wall_ms_per_step"] for b in sizes]
    print(f"{'wall (no profiler; median of 3)':<56}" + "".join(f"{sorted(w)[1]:>12.2f}" for w in walls))
    for row in results["by_batch_size"][sizes[0]]["ms_per_step"]:
        print(f"{row:<56}" + "".join(f"{results['by_batch_size'][b]['ms_per_step'][row]:>12.3f}" for b in sizes))
    write_results(args.out, results)
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
