"""Benchmark (not a test): this machine's dense float32 matmul rate, the yardstick for "fraction of peak".

Times ``C = A @ B`` for square float32 matrices of size n in (512, 1024, 2048) with torch's own threads
(``torch.get_num_threads()``), each timing a batch of multiplications long enough to be measurable, and keeps the
best of ``repeats`` timings per size (the least disturbed by other work on the machine). One n x n x n product is
2 n^3 floating-point operations. The peak is the best rate over the sizes. For comparison (not part of the peak) it
also times the GEMM shapes of the benchmarked model (iwae-1layer): the decoder's layers on a compiled log p(x) chunk
of 2,600 rows and the largest layers of a training step at batch 100 and 1000, forward shapes; and the bfloat16
rate of the same square products (the yardstick for bf16 autocast: AMX or AVX-512 BF16 where the CPU has them).

    .venv/bin/python benchmarks/matmul_peak.py              # ~20 s on 2 cores
    .venv/bin/python benchmarks/matmul_peak.py --quick      # ~5 s

Writes benchmarks/results/matmul_peak.json (override with --out). Other benchmarks import :func:`matmul_peak`
(and :func:`matmul_rate`, one size, to re-measure the rate between their timed rounds on a busy machine).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from provenance import RESULTS, write_results

SIZES = (512, 1024, 2048)
# (rows, inner, columns) of the benchmarked model's GEMMs: [rows, inner] @ [inner, columns]
MODEL_SHAPES = {
    "log p(x) chunk, decoder 50 -> 200": (2600, 50, 200),
    "log p(x) chunk, decoder 200 -> 200": (2600, 200, 200),
    "log p(x) chunk, decoder 200 -> 784": (2600, 200, 784),
    "training batch 100, encoder 784 -> 200": (100, 784, 200),
    "training batch 100, decoder 200 -> 784": (100, 200, 784),
    "training batch 1000, encoder 784 -> 200": (1000, 784, 200),
    "training batch 1000, decoder 200 -> 784": (1000, 200, 784),
}


def gemm_rate(
    m: int, k: int, n: int, *, repeats: int = 1, min_seconds: float = 0.1, dtype: torch.dtype = torch.float32
) -> float:
    """Best GFLOP/s over ``repeats`` timings of enough [m, k] @ [k, n] products to last ``min_seconds`` each."""
    g = torch.Generator().manual_seed(m * k + n)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    c = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=c)  # warm-up: thread pool, BLAS kernels, page faults
    tick = time.perf_counter()
    torch.mm(a, b, out=c)
    one = max(time.perf_counter() - tick, 1e-6)
    calls = max(1, int(min_seconds / one))
    best = 0.0
    for _ in range(repeats):
        tick = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=c)
        seconds = time.perf_counter() - tick
        best = max(best, 2 * m * k * n * calls / seconds / 1e9)
    return best


def matmul_rate(n: int, *, repeats: int = 1, min_seconds: float = 0.1, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s over ``repeats`` timings of enough n x n products to last ``min_seconds`` each."""
    return gemm_rate(n, n, n, repeats=repeats, min_seconds=min_seconds, dtype=dtype)


def bf16_matmul_peak(sizes=SIZES, *, repeats: int = 3, min_seconds: float = 0.25) -> dict:
    """The bfloat16 rate of the same square products: ``{"peak_gflops": float, "gflops_by_size": {n: float}}``."""
    rate = {"repeats": repeats, "min_seconds": min_seconds, "dtype": torch.bfloat16}
    by_size = {int(n): matmul_rate(int(n), **rate) for n in sizes}
    return {"peak_gflops": max(by_size.values()), "gflops_by_size": by_size, "dtype": "bfloat16"}


def matmul_peak(sizes=SIZES, *, repeats: int = 5, min_seconds: float = 0.25) -> dict:
    """Dense float32 matmul rate of this process's CPU threads.

    Args:
        sizes: square matrix sizes n to try.
        repeats: timings per size; the best is kept.
        min_seconds: least duration of one timing (several products are timed together when one is faster).

    Returns:
        ``{"peak_gflops": float, "gflops_by_size": {n: float}, "threads": int, ...}`` (GFLOP/s = 1e9 flop/s).
    """
    by_size = {int(n): matmul_rate(int(n), repeats=repeats, min_seconds=min_seconds) for n in sizes}
    return {
        "peak_gflops": max(by_size.values()),
        "gflops_by_size": by_size,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "dtype": "float32",
        "torch": torch.__version__,
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timings per size, best kept (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="2 repeats of shorter timings")
    p.add_argument("--out", type=Path, default=RESULTS / "matmul_peak.json", help="results file (default: %(default)s)")
    args = p.parse_args(argv)
    repeats, min_seconds = (2, 0.1) if args.quick else (args.repeats, 0.25)
    result = matmul_peak(repeats=repeats, min_seconds=min_seconds)
    for n, rate in result["gflops_by_size"].items():
        print(f"  n = {n:>5}: {rate:8.1f} GFLOP/s")
    print(f"float32 matmul peak: {result['peak_gflops']:.1f} GFLOP/s with {result['threads']} threads")
    print("the benchmarked model's GEMM shapes (not part of the peak):")
    result["gflops_by_model_shape"] = {}
    for name, (m, k, n) in MODEL_SHAPES.items():
        rate = gemm_rate(m, k, n, repeats=repeats, min_seconds=min_seconds)
        result["gflops_by_model_shape"][name] = rate
        print(f"  {name:<42} [{m}, {k}] @ [{k}, {n}]: {rate:8.1f} GFLOP/s ({rate / result['peak_gflops']:.0%})")
    result["bf16"] = bf16_matmul_peak(repeats=repeats, min_seconds=min_seconds)
    rates = ", ".join(f"n = {n}: {rate:.1f}" for n, rate in result["bf16"]["gflops_by_size"].items())
    print(f"bfloat16 matmul peak: {result['bf16']['peak_gflops']:.1f} GFLOP/s ({rates})")
    write_results(args.out, result)
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
