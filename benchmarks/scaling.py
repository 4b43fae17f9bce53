"""Benchmark (not a test): how time and memory grow with k, batch size, latent size and data size, and training.

All on CPU, float32, torch's default threads, with the IWAE paper's one-layer VAE (``iwae-1layer``), freshly
initialised (cost does not depend on the weights), on the fixed-seed binarization of the MNIST test images (uniform
noise through ``torch.bernoulli``, with a printed note, when MNIST is not found):

* ``vaelab.log_marginal(model, x, k=k)`` under ``torch.inference_mode`` (chunked over k automatically), four sweeps
  around k = 1000, 100 images per call, latent size 50: k (``--ks``, 100 images); images per call (``--batches``;
  time per image); latent size (``--latents``; at sizes other than 50 the same networks as ``architecture="mlp"``
  with hidden (200, 200) and tanh, since the preset is fixed at 50); data size (``--sizes``: N images in calls of
  100, total seconds). Cost should be linear in k and in N, and memory flat in k once k exceeds one chunk;
* ``Trainer(TrainConfig(architecture="iwae-1layer", binarize=True, ...)).train_step()`` at each of
  ``--train-batches``: samples/s over ``--train-steps`` steps after 3 warm-up steps.

Every point runs in a fresh subprocess (this script with a hidden ``--worker``, JSON on stdout), because a process's
peak memory never goes down. Every point is measured in ``--passes`` passes over all points (order rotated between
passes: the speed of this shared machine drifts by up to 2x over minutes), ``--repeats`` timed runs per process;
seconds are the median over all of them. Memory is the peak resident
set (VmHWM, reset just before) minus the resident set just before: for log p(x), around the measured call (after a
one-image warm-up), the median over repeats (the largest is kept as ``peak_delta_mib_max``: glibc sometimes keeps
a few hundred MiB of freed chunks in one repeat and not in the next, which says nothing about the working set); for
training, from before the first (warm-up) step, so that it holds
the activations, gradients and Adam's state. A point that appears in several sweeps is measured once. Each point
also records CPU seconds (all threads) per wall second, at most the thread count: a value far below the other points'
says other work competed for the cores (distrust that timing; run on an idle machine, not under ``nice``).

    .venv/bin/python benchmarks/scaling.py            # ~11 min on 2 idle cores (2 passes)
    .venv/bin/python benchmarks/scaling.py --quick    # ~35 s: k 100, 1000, 3000; batch 10, 100; d 2, 50; N 100, 300

Writes benchmarks/results/scaling.json and docs/scaling.png (override with --out and --figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from logpx_eval import _reset_peak, _status_mib
from provenance import DEFAULT_DATA_DIR, REPO, RESULTS, command_line, vaelab_commit, write_results

import vaelab
from vaelab.data import as_float, binarize_fixed, load_dataset
from vaelab.estimators import log_marginal
from vaelab.train import TrainConfig, Trainer, build_model

PIXELS = 784
K, BATCH, LATENT = 1000, 100, 50  # the point every log p(x) sweep passes through
TRAIN_WARMUP = 3
QUICK = {"ks": "100,1000,3000", "batches": "10,100", "latents": "2,50", "sizes": "100,300", "train_batches": "100"}


def model_config(latent_dim: int, **options) -> TrainConfig:
    """iwae-1layer; at another latent size than its fixed 50, the same networks as "mlp" (hidden (200, 200), tanh)."""
    options = {"validation_size": 0, **options}
    if latent_dim == LATENT:
        return TrainConfig(architecture="iwae-1layer", latent_dim=latent_dim, **options)
    mlp = {"hidden": [200, 200], "activation": "tanh"}
    return TrainConfig(architecture="mlp", architecture_options=mlp, latent_dim=latent_dim, **options)


def ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


# --- one point, in its own process ---------------------------------------------------------------------------------
def measure(run, repeats: int) -> dict:
    """Run ``run()`` ``repeats`` times: its seconds (wall, and CPU of all threads), and the peak resident-set growth
    (MiB) over the RSS before each. CPU / wall near the thread count says the machine was free for this process."""
    seconds, cpu, deltas = [], [], []
    for _ in range(repeats):
        rss_before = _status_mib("VmRSS") if _reset_peak() else _status_mib("VmHWM")  # no reset: growth of the peak
        tick, cpu_tick = time.perf_counter(), time.process_time()
        run()
        seconds.append(time.perf_counter() - tick)
        cpu.append(time.process_time() - cpu_tick)
        deltas.append(_status_mib("VmHWM") - rss_before)
    return {"seconds_by_repeat": seconds, "cpu_seconds_by_repeat": cpu, "peak_delta_mib_by_repeat": deltas}


def worker(spec: dict, images: Path) -> int:
    """Measure one point (``spec["kind"]``: "logpx" or "train") and print it as one JSON line."""
    x = torch.load(images)  # (N, 784)
    if spec["kind"] == "logpx":
        torch.manual_seed(0)
        model = build_model(model_config(spec["latent_dim"]), (PIXELS,))
        x = x[: spec["examples"]]

        def run():
            for batch in x.split(spec["batch"]):  # (batch, 784)
                log_marginal(model, batch, k=spec["k"])

        with torch.inference_mode():
            log_marginal(model, x[:1], k=10)  # first-call costs (thread pool, allocator) kept out
            result = measure(run, spec["repeats"])
    else:
        options = {"binarize": True, "device": "cpu", "progress": False, "epochs": 1, "batch_size": spec["batch"]}
        config = model_config(spec["latent_dim"], **options)
        with tempfile.TemporaryDirectory() as run_dir:  # train_step writes nothing; the Trainer wants a run directory
            trainer = Trainer(config, x, None, run_dir)
            first = measure(lambda: [trainer.train_step() for _ in range(TRAIN_WARMUP)], 1)  # incl. Adam's state
            result = measure(lambda: [trainer.train_step() for _ in range(spec["steps"])], spec["repeats"])
        result["steady_peak_delta_mib_by_repeat"] = result.pop("peak_delta_mib_by_repeat")
        result["peak_delta_mib_by_repeat"] = first["peak_delta_mib_by_repeat"]  # from before the first step
    print(json.dumps({**result, "threads": torch.get_num_threads()}))
    return 0


def run_worker(spec: dict, images: Path) -> dict:
    """Measure one point in a fresh subprocess: the worker's JSON (per-repeat seconds and memory)."""
    command = [sys.executable, __file__, "--worker", json.dumps(spec), "--images", str(images)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{spec} failed (exit {done.returncode}):\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize_point(spec: dict, runs: list[dict]) -> dict:
    """``spec`` plus the median seconds and memory growth over every repeat of every pass, and rates."""
    point = {**spec, "threads": runs[0]["threads"], "passes": len(runs)}
    for key in runs[0]:
        if key.endswith("_by_repeat"):
            point[key] = [value for run in runs for value in run[key]]
    seconds = point["seconds"] = statistics.median(point["seconds_by_repeat"])
    point["peak_delta_mib"] = statistics.median(point["peak_delta_mib_by_repeat"])
    point["peak_delta_mib_max"] = max(point["peak_delta_mib_by_repeat"])
    ratios = zip(point["cpu_seconds_by_repeat"], point["seconds_by_repeat"], strict=True)
    point["cpu_per_wall"] = statistics.median(cpu / wall for cpu, wall in ratios)
    if spec["kind"] == "logpx":
        point["seconds_per_example"] = seconds / spec["examples"]
        point["us_per_sample"] = seconds / (spec["k"] * spec["examples"]) * 1e6
    else:
        point["samples_per_sec"] = spec["steps"] * spec["batch"] / seconds
    return point


def describe(spec: dict) -> str:
    shown = ", ".join(f"{key} {spec[key]}" for key in ("k", "batch", "examples", "latent_dim", "steps") if key in spec)
    return f"{spec['kind']} ({shown})"


# --- tables and the figure -----------------------------------------------------------------------------------------
def print_tables(results: dict) -> None:
    """Every point, one table per sweep: log_marginal's four, then training."""
    head = "{:>6} {:>6} {:>4} {:>7} {:>9} {:>9} {:>9} {:>7} {:>8}"
    row = "{k:>6} {batch:>6} {latent_dim:>4} {examples:>7} {seconds:>9.3f} {us_per_sample:>9.2f} {ms:>9.2f} "
    row += "{peak_delta_mib:>7.1f} {cpu_per_wall:>8.2f}"
    for sweep, points in results["log_marginal"].items():
        print(f"\nlog_marginal, sweep over {sweep}")
        print(head.format("k", "batch", "d", "images", "seconds", "us/sample", "ms/image", "+MiB", "cpu/wall"))
        for p in points:
            print(row.format(**p, ms=p["seconds_per_example"] * 1e3))
    print(f"\ntraining, Trainer.train_step: {TRAIN_WARMUP} warm-up steps, then timed steps")
    print("{:>6} {:>6} {:>9} {:>9} {:>7} {:>8}".format("batch", "steps", "seconds", "samples/s", "+MiB", "cpu/wall"))
    row = "{batch:>6} {steps:>6} {seconds:>9.3f} {samples_per_sec:>9.0f} {peak_delta_mib:>7.1f} {cpu_per_wall:>8.2f}"
    for p in results["training"]:
        print(row.format(**p))
    print(
        f"(seconds: median of {results['repeats']} repeats x {results['passes']} passes; +MiB: median of the peak "
        "resident-set growths in fresh processes, for training from before the first step; cpu/wall: CPU seconds "
        f"of all threads per second, at most {results['threads']}, far below the other points when other work "
        "competed)"
    )


def plot(results: dict, path: Path) -> None:
    """Six small panels: the four log_marginal sweeps (time, and memory vs k) and training throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    sweeps, around = results["log_marginal"], f"{BATCH} images, d = {LATENT}"
    panels = [  # points, x key, y of a point, title, x label, y label, log y, slope-1 guide
        (sweeps["k"], "k", lambda p: p["seconds"], f"log_marginal time ({around})", "k", "seconds", True, True),
        (sweeps["k"], "k", lambda p: p["peak_delta_mib"], f"log_marginal memory ({around})", "k",
         "peak RSS growth (MiB)", False, False),  # the median; the largest repeat is drawn too, below
        (sweeps["batch"], "batch", lambda p: p["seconds_per_example"] * 1e3, f"time per image (k = {K}, d = {LATENT})",
         "images per call", "ms per image", False, False),
        (sweeps["latent"], "latent_dim", lambda p: p["seconds"], f"time vs latent size (k = {K}, {BATCH} images)",
         "latent size d", "seconds", False, False),
        (sweeps["data_size"], "examples", lambda p: p["seconds"], f"total time (k = {K}, calls of {BATCH})",
         "N (images)", "seconds", True, True),
        (results["training"], "batch", lambda p: p["samples_per_sec"], f"training, Trainer.train_step (d = {LATENT})",
         "batch size", "samples / s", False, False),
    ]  # fmt: skip
    fig, axes = plt.subplots(2, 3, figsize=(10, 6), dpi=100)
    for ax, (points, x, y, title, xlabel, ylabel, logy, slope_one) in zip(axes.flat, panels, strict=True):
        xs, ys = [p[x] for p in points], [y(p) for p in points]
        ax.plot(xs, ys, "o-", label="median of repeats" if ylabel.startswith("peak") else None)
        if ylabel.startswith("peak") and all("peak_delta_mib_max" in p for p in points):
            ys = [p["peak_delta_mib_max"] for p in points]
            ax.plot(xs, ys, "s--", color="tab:orange", ms=4, label="largest repeat")
            ax.legend(fontsize=8)
            ys = [*ys, 10.0]  # a scale of at least 10 MiB: medians of ~0 MiB are not drawn as a curve
        if slope_one and len(xs) > 1:  # proportional to x, through the middle point
            m = len(xs) // 2
            ax.plot(xs, [ys[m] * v / xs[m] for v in xs], "--", color="gray", lw=1, label="slope 1", zorder=3)
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{v // 1000}k" if v >= 10000 else str(v) for v in xs])  # the measured values
        ax.xaxis.set_minor_formatter(NullFormatter())
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        else:
            ax.set_ylim(bottom=0, top=1.15 * max(ys, default=1))
        ax.set_title(title, fontsize=9)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"vaelab scaling: iwae-1layer, CPU float32, {results['threads']} threads", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --- the sweeps ----------------------------------------------------------------------------------------------------
def load_images(data_dir: str, n_test: int, n_train: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n_test`` fixed-binarized test images, ``n_train`` training images, (N, 784) each, and where they came from."""
    try:
        splits = load_dataset("mnist", data_dir=data_dir, validation_size=0)
    except (OSError, ValueError) as err:  # DataError is a ValueError
        print(f"note: MNIST not found ({type(err).__name__}: {err}); using uniform noise instead", flush=True)
        g = torch.Generator().manual_seed(0)
        test = torch.bernoulli(torch.rand(n_test, PIXELS, generator=g), generator=g)
        return test, torch.rand(n_train, PIXELS, generator=g), "uniform noise (test images through torch.bernoulli)"
    test = binarize_fixed(as_float(splits.test).reshape(len(splits.test), -1)[:n_test], seed=0)
    train = as_float(splits.train).reshape(len(splits.train), -1)[:n_train].clone()
    return test, train, "MNIST: test images by binarize_fixed(seed=0); training images binarized at every step"


def main(argv=None) -> int:
    vaelab.keep_freed_memory()  # opt in, as the command line does: glibc keeps freed memory (vaelab._malloc)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="where MNIST is (default: %(default)s)")
    p.add_argument("--ks", default="100,300,1000,3000,10000,30000", help="k, 100 images (default: %(default)s)")
    p.add_argument("--batches", default="1,10,100,1000", help="images per call, k = 1000 (default: %(default)s)")
    p.add_argument("--latents", default="2,10,50,200", help="latent sizes, k = 1000 (default: %(default)s)")
    p.add_argument("--sizes", default="100,300,1000,3000", help="images N, calls of 100 (default: %(default)s)")
    p.add_argument("--train-batches", default="10,100,1000", help="training batch sizes (default: %(default)s)")
    p.add_argument("--train-steps", type=int, default=20, help="timed steps per repeat (default: %(default)s)")
    p.add_argument("--train-examples", type=int, default=10000, help="training images held (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per process (default: %(default)s)")
    p.add_argument(
        "--passes",
        type=int,
        default=2,
        help="passes over all points, order rotated; seconds: median of all repeats of all passes "
        "(default: %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help=f"a reduced grid, 1 repeat: {QUICK}")
    p.add_argument("--out", type=Path, default=RESULTS / "scaling.json", help="results file (default: %(default)s)")
    p.add_argument("--figure", type=Path, default=REPO / "docs" / "scaling.png", help="figure (default: %(default)s)")
    p.add_argument("--replot", action="store_true", help="only redraw --figure from the results in --out")
    p.add_argument("--worker", type=json.loads, help=argparse.SUPPRESS)  # internal: one point, as JSON
    p.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.images)
    if args.replot:
        plot(json.loads(args.out.read_text()), args.figure)
        print(f"figure redrawn from {args.out}: {args.figure}")
        return 0
    if args.quick:
        vars(args).update(QUICK, repeats=1, passes=1)

    start, load_at_start = time.perf_counter(), os.getloadavg()
    ks, batches, latents, sizes = ints(args.ks), ints(args.batches), ints(args.latents), ints(args.sizes)
    test, train, source = load_images(args.data_dir, max(BATCH, *batches, *sizes), args.train_examples)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {source}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        test_path, train_path = Path(tmp) / "test.pt", Path(tmp) / "train.pt"
        torch.save(test, test_path)
        torch.save(train, train_path)

        def logpx(k=K, batch=BATCH, examples=BATCH, latent_dim=LATENT) -> str:
            spec = {"kind": "logpx", "k": k, "batch": batch, "examples": examples, "latent_dim": latent_dim}
            return json.dumps({**spec, "repeats": args.repeats})  # a point on several sweeps is measured once

        sweep_keys = {
            "k": [logpx(k=k) for k in ks],
            "batch": [logpx(batch=b, examples=b) for b in batches],
            "latent": [logpx(latent_dim=d) for d in latents],
            "data_size": [logpx(examples=n) for n in sizes],
        }
        train_spec = {"kind": "train", "steps": args.train_steps, "latent_dim": LATENT, "repeats": args.repeats}
        training_keys = [json.dumps({**train_spec, "batch": b}) for b in ints(args.train_batches)]
        # Every point in every pass, the order rotated between passes: the machine's speed drifts over minutes, and
        # a point's median over passes is robust to one slow stretch.
        points = list(dict.fromkeys([*(key for keys in sweep_keys.values() for key in keys), *training_keys]))
        runs: dict[str, list[dict]] = {key: [] for key in points}
        for n in range(args.passes):
            shift = n * len(points) // args.passes
            for key in points[shift:] + points[:shift]:
                spec = json.loads(key)
                runs[key].append(run_worker(spec, test_path if spec["kind"] == "logpx" else train_path))
                seconds = statistics.median(runs[key][-1]["seconds_by_repeat"])
                print(f"  pass {n + 1}/{args.passes}: {describe(spec)}: {seconds:.3f} s", flush=True)
        measured = {key: summarize_point(json.loads(key), rs) for key, rs in runs.items()}
        sweeps = {name: [measured[key] for key in keys] for name, keys in sweep_keys.items()}
        training = [measured[key] for key in training_keys]

    results = {
        "benchmark": "scaling of log_marginal (k, batch, latent size, data size) and of train_step (batch), CPU",
        "command": command_line("scaling.py", argv),
        "vaelab_commit": vaelab_commit(),
        "torch": torch.__version__,
        "threads": training[0]["threads"] if training else next(iter(measured.values()))["threads"],
        "machine": platform.platform(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "data": source,
        "model": "iwae-1layer, freshly initialised (torch.manual_seed(0))",
        "repeats": args.repeats,
        "passes": args.passes,
        "memory": "peak resident-set growth (VmHWM after - VmRSS before), MiB, in a fresh process per point",
        "wall_seconds": time.perf_counter() - start,
        "log_marginal": sweeps,
        "training": training,
    }
    write_results(args.out, results)
    plot(results, args.figure)
    print_tables(results)
    print(f"{results['wall_seconds']:.0f} s; results written to {args.out}, figure to {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
