"""Device check (not a test): does the compiled training step and log p(x) work and pay on this device?

Written for a session that is lent a GPU (none of the sessions so far was): one short run that answers what the CPU
runs cannot. On ``--device cuda`` (the default when CUDA is available) and on the CPU alike, with the iwae-1layer
model on uniform-noise images of MNIST's shape (the cost does not depend on the pixel values; no dataset needed):

1. correctness: eager and compiled Trainers from the same weights take 20 steps; their losses must agree to a few
   percent (the compiled step draws its own noise on CUDA, so the runs are not identical) and stay finite, and the
   compiled step must not recompile (``error_on_recompile``), also with a β warm-up;
2. host synchronisations per compiled step with a β warm-up, counted by ``torch.cuda.set_sync_debug_mode`` (CUDA
   only): at most one (the step's finiteness check), else the check fails;
3. speed: samples/s of eager, compiled and compiled + bf16 training at batch 100 and 1000, interleaved rounds;
4. log p(x): ``log_marginal`` eager and compiled at k = 5000 on 100 images: the two means must agree within Monte
   Carlo error; µs per importance sample and the peak memory allocated on the device.

    .venv/bin/python benchmarks/device_check.py                 # ~2-4 min on this project's CPU, less on a GPU
    .venv/bin/python benchmarks/device_check.py --device cpu    # force the CPU

Prints a summary, exits 1 if a correctness check or the synchronisation count fails, and writes
benchmarks/results/device_check.json (override with --out; on the device machine write under $OUT to get it back).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch._dynamo
from provenance import RESULTS, command_line, vaelab_commit, write_results

import vaelab
from vaelab.estimators import log_marginal
from vaelab.steps import WholeStep
from vaelab.train import TrainConfig, Trainer

PIXELS, LATENT = 784, 50


def config(batch_size: int, device: str, **options) -> TrainConfig:
    """The benchmarked model (iwae-1layer, as in throughput.py) trained on dynamically binarized data."""
    return TrainConfig(
        architecture="iwae-1layer", latent_dim=LATENT, batch_size=batch_size, epochs=1000, binarize=True,
        validation_size=0, device=device, progress=False, **options,
    )  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_steps(data: torch.Tensor, device: torch.device, run_dir: Path) -> dict:
    """Eager and compiled Trainers from the same weights: losses close and finite, no recompilation."""
    out = {}
    for name, options in (
        ("constant beta", {}),
        ("beta warm-up", {"schedule": "linear", "schedule_options": {"steps": 10}}),
    ):
        trainers = {}
        for compiled in (False, True):
            torch.manual_seed(0)
            trainers[compiled] = Trainer(
                config(100, str(device), compile=compiled, **options), data, None, run_dir / f"{name}-{compiled}"
            )
        trainers[True].model.load_state_dict(trainers[False].model.state_dict())
        losses = {False: [], True: []}
        torch._dynamo.reset()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(20):
                for compiled, trainer in trainers.items():
                    losses[compiled].append(trainer.train_step()["loss"].item())
        finite = all(math.isfinite(v) for values in losses.values() for v in values)
        relative = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False], strict=True))
        step = trainers[True].take_step
        out[name] = {
            "eager_loss": losses[False],
            "compiled_loss": losses[True],
            "max_relative_difference": relative,
            "whole_step_compiled": isinstance(step, WholeStep) and step.compiled,
            "ok": finite and relative < 0.05 and step.compiled,
        }
        print(f"  steps, {name}: max relative loss difference {relative:.2e}, finite {finite}, ok {out[name]['ok']}")
    return out


def count_syncs(data: torch.Tensor, device: torch.device, run_dir: Path) -> dict:
    """Host synchronisations in 10 compiled steps (CUDA's sync debug mode turns each into a warning), with a β
    warm-up so that the schedule's values go in too: one per step expected (whether the update was applied)."""
    if device.type != "cuda":
        return {"skipped": "CPU: nothing to count", "ok": True}
    warm_up = {"schedule": "linear", "schedule_options": {"steps": 1000}}
    trainer = Trainer(config(100, str(device), compile=True, **warm_up), data, None, run_dir / "syncs")
    for _ in range(3):
        trainer.train_step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(10):
                trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message)]
    ok = len(syncs) <= 10
    print(f"  host synchronisations: {len(syncs) / 10:.1f} per compiled step (one expected), ok {ok}")
    return {"per_step": len(syncs) / 10, "examples": syncs[:3], "ok": ok}


def speed(data: torch.Tensor, device: torch.device, run_dir: Path, rounds: int) -> dict:
    """Samples/s of eager, compiled and compiled + bf16 training, interleaved rounds."""
    out = {}
    for batch in (100, 1000):
        variants = {
            "eager": {"compile": False},
            "compiled": {"compile": True},
            "compiled-bf16": {"compile": True, "bf16": True},
        }
        trainers = {}
        for name, options in variants.items():
            torch.manual_seed(0)
            trainers[name] = trainer = Trainer(
                config(batch, str(device), **options), data, None, run_dir / f"{batch}{name}"
            )
            for _ in range(5):  # the first step is eager, the second compiles
                trainer.train_step()
        steps = 50 if batch == 100 else 10
        rates = {name: [] for name in trainers}
        for r in range(rounds):
            for name, trainer in list(trainers.items())[r % 3 :] + list(trainers.items())[: r % 3]:
                synchronize(device)
                tick = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step()
                synchronize(device)
                rates[name].append(steps * batch / (time.perf_counter() - tick))
        eager = rates["eager"]
        out[str(batch)] = {
            name: {
                "samples_per_sec_median": statistics.median(values),
                "ratio_to_eager": statistics.median(v / e for v, e in zip(values, eager, strict=True)),
            }
            for name, values in rates.items()
        }
        cells = "  ".join(
            f"{n} {s['samples_per_sec_median']:.0f}/s ({s['ratio_to_eager']:.2f}x)" for n, s in out[str(batch)].items()
        )
        print(f"  training, batch {batch}: {cells}")
    return out


def logpx(device: torch.device, run_dir: Path) -> dict:
    """log_marginal eager and compiled at k = 5000: agreement within Monte Carlo error, µs per sample, memory."""
    torch.manual_seed(0)
    trainer = Trainer(config(100, str(device), compile=False), torch.rand(1000, PIXELS), None, run_dir / "logpx")
    model = trainer.model.eval()
    x = (torch.rand(100, PIXELS, device=device) < 0.2).float()
    out = {}
    with torch.inference_mode():
        for name, compiled in (("eager", False), ("compiled", True)):
            # warm-up (and compilation) on the timed batch's own shape: a first call on another batch size would
            # leave a recompilation inside the timed call (5.8 us/sample compiled against 0.032 eager on an H200)
            log_marginal(model, x, k=5000, compile=compiled)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            tick = time.perf_counter()
            estimate = log_marginal(model, x, k=5000, compile=compiled)
            synchronize(device)
            seconds = time.perf_counter() - tick
            values = estimate.value.double()
            out[name] = {
                "mean": values.mean().item(),
                "mc_stderr_of_mean": estimate.stderr.double().pow(2).sum().sqrt().item() / len(values),
                "us_per_sample": seconds / (len(x) * 5000) * 1e6,
                "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            }
    gap = abs(out["eager"]["mean"] - out["compiled"]["mean"])
    tolerance = 4 * math.hypot(out["eager"]["mc_stderr_of_mean"], out["compiled"]["mc_stderr_of_mean"])
    out["ok"] = gap <= tolerance
    print(
        f"  log p(x), k = 5000: eager {out['eager']['mean']:.3f} ({out['eager']['us_per_sample']:.3f} us/sample), "
        f"compiled {out['compiled']['mean']:.3f} ({out['compiled']['us_per_sample']:.3f} us/sample); "
        f"|difference| {gap:.3f} <= {tolerance:.3f}: {out['ok']}"
    )
    return out


def main(argv=None) -> int:
    vaelab.keep_freed_memory()  # opt in, as the command line does: glibc keeps freed memory (vaelab._malloc)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size (default: %(default)s)")
    p.add_argument(
        "--out", type=Path, default=RESULTS / "device_check.json", help="results file (default: %(default)s)"
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device check on {name} (torch {torch.__version__})", flush=True)
    results = {
        "benchmark": "compiled training step and log p(x) on one device",
        "command": command_line("device_check.py", argv),
        "vaelab_commit": vaelab_commit(),
        "torch": torch.__version__,
        "device": name,
    }
    data = torch.rand(20_000, PIXELS)
    with tempfile.TemporaryDirectory() as run_dir:
        run_dir = Path(run_dir)
        results["steps"] = check_steps(data, device, run_dir)
        results["host_syncs"] = count_syncs(data, device, run_dir)
        results["training_speed"] = speed(data, device, run_dir, args.rounds)
        results["log_px"] = logpx(device, run_dir)
    ok = all(r["ok"] for r in results["steps"].values()) and results["host_syncs"]["ok"] and results["log_px"]["ok"]
    results["ok"] = ok
    write_results(args.out, results)
    print(f"{'all checks passed' if ok else 'A CHECK FAILED'}; results written to {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
