"""Benchmark (not a test): the cost of estimating log p(x) -- vaelab against pythae and Pyro, and the scaling in k.

One model, three libraries, the same weights. The model is the IWAE paper's one-layer VAE trained briefly here
(``--train-steps`` Adam steps of vaelab's Trainer on dynamically binarized MNIST) or loaded from a vaelab run
directory (``--run-dir``; a VAE with a Bernoulli decoder and a standard-normal prior). Its encoder and decoder
networks are wrapped, unchanged, for each peer, so every estimate below targets the same log p(x), on the same
fixed-seed binarization of the first test images:

* ``vaelab``          -- ``vaelab.log_marginal(model, x, k=k)`` under ``torch.inference_mode``, batches of
  ``--batch`` images, chunked over k automatically (``--chunk-size`` to override; memory flat in k);
* ``pythae``          -- ``pythae.models.VAE(...).get_nll(x, n_samples=k, batch_size=--pythae-batch)`` on a
  ``VAE(VAEConfig(reconstruction_loss="bce"))`` whose custom encoder/decoder hold the same networks (the encoder's
  (loc, softplus scale) given to pythae as (embedding, log-variance); the decoder's logits as sigmoid
  probabilities, which pythae's BCE clamps at log 0 = -100 per pixel). Also under ``torch.inference_mode`` (pythae
  does not disable gradients itself). ``get_nll`` goes one image at a time, re-runs the encoder for every block
  of ``--pythae-batch`` samples, and returns only the mean over images (no per-image values, no standard error);
  despite its name it returns log p(x), not its negative;
* ``pyro-vectorized`` -- ``pyro.infer.importance.vectorized_importance_weights`` (all k samples of one image in one
  vectorized trace; one image at a time, since Pyro sums log-weights over everything but the particle dimension;
  not chunked, so its memory grows with k);
* ``pyro-importance`` -- ``pyro.infer.Importance(model, guide, num_samples=k).run(x).get_log_normalizer()``, one
  trace per sample, on ``--importance-examples`` images only (it is far slower); its time is also extrapolated to
  the ``--examples`` images.

Timing is interleaved: ``--rounds`` rounds, each running every implementation once in a rotating order; round 1
gives vaelab all ``--examples`` images (the reported vaelab value), the peers evaluate the first ``--peer-examples``
images every round, as vaelab does in later rounds. Speed is compared per image, as the median over rounds of the
ratio within a round; vaelab's mean over each peer's images is reported beside the peer's.

Each evaluation runs in a fresh subprocess that loads the weights and the (already binarized) images, warms up on
one image, and reports its time and peak memory: the peak resident set during the evaluation (VmHWM, reset just
before it) minus the resident set before it. (``getrusage(RUSAGE_SELF).ru_maxrss`` is recorded too but reads 0:
Linux carries the parent's larger peak into the child across fork and exec; tracemalloc does not see torch's
allocations.) Achieved GFLOP/s counts the useful matmul work, k decoder passes (2 * (50*200 + 200*200 + 200*784)
= 0.41 MFLOP each) plus one encoder pass per image, against the best dense float32 matmul rate measured in the
run (:func:`matmul_peak.matmul_peak`). Finally the scaling in k (``--scaling-k``, on ``--scaling-examples``
images) of vaelab and, for contrast, pyro-vectorized: time should grow linearly in k, vaelab's memory stay flat.

    bash benchmarks/setup_peers.sh                                   # once: pythae, pyro-ppl, vaelab in a venv
    benchmarks/.venv-peers/bin/python benchmarks/logpx_eval.py       # ~5 min on 2 idle cores
    benchmarks/.venv-peers/bin/python benchmarks/logpx_eval.py --quick               # ~1 min
    benchmarks/.venv-peers/bin/python benchmarks/logpx_eval.py --run-dir runs/iwae1

Writes benchmarks/results/logpx_eval.json (override with --out).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from matmul_peak import matmul_peak
from peers import pythae_vae
from provenance import DEFAULT_DATA_DIR, RESULTS, command_line, vaelab_commit, write_results

import vaelab
from vaelab.data import as_float, binarize_fixed, load_dataset
from vaelab.train import TrainConfig, Trainer, load_run

IMPLEMENTATIONS = ("vaelab", "vaelab-compile", "pythae", "pyro-vectorized", "pyro-importance")
CHUNK_VARIANT = "vaelab-chunk"  # "vaelab-chunk20": vaelab with chunk_size=20 (--also-chunk-sizes)
IMPLEMENTATION_NOTES = {
    "vaelab": "vaelab.log_marginal(model, x, k=k) under torch.inference_mode, batches of --batch images",
    "vaelab-compile": "the same with compile=True (compiled during the untimed warm-up: see warmup_seconds)",
    "pythae": "pythae VAE(reconstruction_loss='bce').get_nll(x, n_samples=k, batch_size=--pythae-batch), same weights",
    "pyro-vectorized": "pyro.infer.importance.vectorized_importance_weights, one image at a time, same weights",
    "pyro-importance": "pyro.infer.Importance(model, guide, num_samples=k).run(x).get_log_normalizer(), per image",
}


def linear_flop(net: torch.nn.Module) -> int:
    """Matmul floating-point operations of one example through ``net``'s Linear layers: 2 * in * out each."""
    return sum(2 * m.in_features * m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear))


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: peak), MiB; NaN if unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- the peers, built around vaelab's networks -------------------------------------------------------------------
def pythae_model(model):
    """A pythae VAE whose encoder and decoder are ``model``'s networks (same weights, same q and p(x|z))."""
    shape = dict(data_shape=model.data_shape, latent_dim=model.latent_dim, min_scale=model.posterior.min_scale)
    return pythae_vae(model.encoder, model.decoder, **shape).eval()


def pyro_model_guide(model):
    """Pyro's model p(z) p(x|z) and guide q(z|x) for one image ``x [D]``, from ``model``'s networks."""
    import pyro
    import pyro.distributions as dist

    pyro.enable_validation(False)

    def pyro_model(x):
        prior = model.prior
        z = pyro.sample("z", dist.Normal(prior.base_dist.loc, prior.base_dist.scale).to_event(1))  # (..., d)
        logits = model.decoder(z.reshape(-1, model.latent_dim)).reshape(*z.shape[:-1], -1)  # (..., D)
        pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x.reshape(-1))

    def pyro_guide(x):
        q = model.encode(x.unsqueeze(0))  # batch [1], event [d]
        pyro.sample("z", dist.Normal(q.base_dist.loc[0], q.base_dist.scale[0]).to_event(1))

    return pyro_model, pyro_guide


# --- one evaluation, in its own process ----------------------------------------------------------------------------
def evaluate(impl: str, model, x: torch.Tensor, k: int, args) -> dict:
    """log p(x) of the images ``x [N, D]`` by ``impl``: ``{"values": [N] or None, "mean": float}``."""
    if impl in ("vaelab", "vaelab-compile") or impl.startswith(CHUNK_VARIANT):
        chunk_size = int(impl.removeprefix(CHUNK_VARIANT)) if impl.startswith(CHUNK_VARIANT) else args.chunk_size
        compile = impl == "vaelab-compile"
        chunks = [
            vaelab.log_marginal(model, b, k=k, chunk_size=chunk_size, compile=compile) for b in x.split(args.batch)
        ]
        values = torch.cat([r.value for r in chunks])
        return {"values": values.tolist(), "mean": values.mean().item()}
    if impl == "pythae":
        if k % args.pythae_batch or k < args.pythae_batch:
            raise SystemExit(
                f"pythae's get_nll uses floor(k / batch) * batch samples: pick --pythae-batch dividing {k}"
            )
        return {
            "values": None,
            "mean": float(pythae_model(model).get_nll(x, n_samples=k, batch_size=args.pythae_batch)),
        }
    if impl == "pyro-vectorized":
        from pyro.infer.importance import vectorized_importance_weights

        pyro_model, pyro_guide = pyro_model_guide(model)
        values = []
        for image in x:
            log_w, _, _ = vectorized_importance_weights(
                pyro_model, pyro_guide, image, num_samples=k, max_plate_nesting=0, normalized=False
            )  # (k,)
            values.append((torch.logsumexp(log_w, 0) - math.log(k)).item())
        return {"values": values, "mean": sum(values) / len(values)}
    if impl == "pyro-importance":
        from pyro.infer import Importance

        pyro_model, pyro_guide = pyro_model_guide(model)
        values = [
            Importance(pyro_model, pyro_guide, num_samples=k).run(image).get_log_normalizer().item() for image in x
        ]
        return {"values": values, "mean": sum(values) / len(values)}
    raise ValueError(f"unknown implementation {impl!r}")


def worker(args) -> int:
    """Evaluate ``args.worker`` on the saved images and print one JSON line: values, seconds, memory.

    Memory: the peak resident set during the evaluation (VmHWM, reset just before it) minus the resident set just
    before it. ``ru_maxrss`` is recorded too but cannot serve: Linux carries the parent's peak into a child across
    fork and exec, so a child of the (larger) parent reads the parent's peak and shows no growth.
    """
    torch.manual_seed(args.seed)
    model = load_run(args.run_dir).model
    x = torch.load(args.images)[: args.examples]
    with torch.inference_mode():
        warm_k = args.pythae_batch if args.worker == "pythae" else min(args.k, 200)
        # first-call costs (thread pool, allocator; compilation, on a batch of the timed shape) kept out, and reported
        warm_x = x[: args.batch] if args.worker == "vaelab-compile" else x[:1]
        tick = time.perf_counter()
        evaluate(args.worker, model, warm_x, warm_k, args)
        warmup_seconds = time.perf_counter() - tick
        reset = _reset_peak()
        rss_before, hwm_before, maxrss_before = _status_mib("VmRSS"), _status_mib("VmHWM"), _maxrss_mib()
        tick = time.perf_counter()
        result = evaluate(args.worker, model, x, args.k, args)
        seconds = time.perf_counter() - tick
    hwm_after, maxrss_after = _status_mib("VmHWM"), _maxrss_mib()
    result.update(
        implementation=args.worker,
        k=args.k,
        examples=len(x),
        seconds=seconds,
        seconds_per_example=seconds / len(x),
        warmup_seconds=warmup_seconds,
        rss_before_mib=rss_before,
        peak_rss_mib=hwm_after,
        peak_delta_mib=hwm_after - (rss_before if reset else hwm_before),
        ru_maxrss_delta_mib=maxrss_after - maxrss_before,
        threads=torch.get_num_threads(),
    )
    print(json.dumps(result))
    return 0


def run_worker(impl: str, *, k: int, examples: int, run_dir: Path, images: Path, seed: int, args) -> dict | None:
    """Run one evaluation in a subprocess (so its peak memory is its own); None, with a note, if it failed."""
    command = [sys.executable, __file__, "--worker", impl, "--run-dir", str(run_dir), "--images", str(images)]
    command += ["--k", str(k), "--examples", str(examples), "--batch", str(args.batch)]
    command += ["--pythae-batch", str(args.pythae_batch), "--seed", str(seed)]
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no message)"]
        print(f"note: {impl} failed (exit {done.returncode}): {tail[0]}; skipping it", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


@functools.cache
def importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception as err:
        print(f"note: {module} is not importable ({type(err).__name__}: {err}); skipping it", file=sys.stderr)
        return False
    return True


def train_briefly(train_x: torch.Tensor, run_dir: Path, args) -> None:
    config = TrainConfig(
        architecture="iwae-1layer",
        latent_dim=50,
        form="kl",
        batch_size=100,
        epochs=0,
        max_steps=args.train_steps,
        lr=1e-3,
        binarize=True,
        validation_size=0,
        seed=args.seed,
        device="cpu",
        log_every=100,
        checkpoint_every=10**9,
        progress=False,
    )
    tick = time.perf_counter()
    Trainer(config, train_x, None, run_dir).fit()
    print(
        f"trained {args.train_steps} steps ({args.train_steps / 600:.2g} epochs) in {time.perf_counter() - tick:.0f} s"
    )


def main(argv=None) -> int:
    vaelab.keep_freed_memory()  # opt in, as the command line does: glibc keeps freed memory (vaelab._malloc)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="where MNIST is (default: %(default)s)")
    p.add_argument("--run-dir", type=Path, default=None, help="a vaelab run directory to evaluate (default: train one)")
    p.add_argument(
        "--train-steps", type=int, default=600, help="steps of the model trained here (default: %(default)s)"
    )
    p.add_argument("--k", type=int, default=5000, help="importance samples per image (default: %(default)s)")
    p.add_argument("--examples", type=int, default=1000, help="first N test images, vaelab (default: %(default)s)")
    p.add_argument("--peer-examples", type=int, default=100, help="first N test images, peers (default: %(default)s)")
    p.add_argument("--importance-examples", type=int, default=2, help="images, pyro-importance (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default: %(default)s)")
    p.add_argument("--batch", type=int, default=100, help="images per vaelab.log_marginal call (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=None, help="vaelab's chunk over k (default: automatic)")
    p.add_argument(
        "--also-chunk-sizes",
        default="",
        help="comma-separated chunk sizes: vaelab with each also joins the comparison rounds (default: none)",
    )
    p.add_argument("--pythae-batch", type=int, default=100, help="get_nll's batch_size (default: %(default)s)")
    p.add_argument("--scaling-k", default="100,1000,5000,20000", help="k values for vaelab (default: %(default)s)")
    p.add_argument("--scaling-examples", type=int, default=100, help="images for the scaling (default: %(default)s)")
    p.add_argument("--scaling-rounds", type=int, default=2, help="rounds of the scaling (default: %(default)s)")
    p.add_argument(
        "--scaling-impls", default="vaelab,pyro-vectorized", help="implementations scaled in k (default: %(default)s)"
    )
    p.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="k=1000; 200/50/1 images; 2 rounds (1 for the scaling, on 20 images); 300 training steps",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "logpx_eval.json", help="results file (default: %(default)s)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one evaluation
    p.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.k, args.examples, args.peer_examples, args.importance_examples = 1000, 200, 50, 1
        args.scaling_examples, args.train_steps, args.rounds, args.scaling_rounds = 20, 300, 2, 1
    args.peer_examples = min(args.peer_examples, args.examples)
    args.importance_examples = min(args.importance_examples, args.peer_examples)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; measuring the matmul peak", flush=True)
    peak = matmul_peak(repeats=2 if args.quick else 5, min_seconds=0.1 if args.quick else 0.25)
    print(f"float32 matmul peak: {peak['peak_gflops']:.1f} GFLOP/s", flush=True)

    splits = load_dataset("mnist", data_dir=args.data_dir, validation_size=0)
    test_x = binarize_fixed(as_float(splits.test).reshape(len(splits.test), -1), seed=0)[: args.examples].clone()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir
        if run_dir is None:
            run_dir = Path(tmp) / "run"
            train_briefly(as_float(splits.train).reshape(len(splits.train), -1), run_dir, args)
        del splits
        model = load_run(run_dir).model
        images = Path(tmp) / "images.pt"
        torch.save(test_x.reshape(len(test_x), *model.data_shape), images)

        wanted = [i for i in args.impls.split(",") if i in IMPLEMENTATIONS]
        variants = [f"{CHUNK_VARIANT}{int(c)}" for c in args.also_chunk_sizes.split(",") if c.strip()]
        wanted[1:1] = variants if "vaelab" in wanted else []
        if not (
            type(model).__name__ == "VAE"
            and type(model.likelihood).__name__ == "BernoulliLikelihood"
            and type(model.prior_module).__name__ == "StandardNormal"
        ):
            print("note: the peers need a VAE with a Bernoulli decoder and an N(0, I) prior: vaelab only")
            wanted = [i for i in wanted if i.startswith("vaelab")]
        module = {"pythae": "pythae", "pyro-vectorized": "pyro", "pyro-importance": "pyro"}
        wanted = [i for i in wanted if importable(module.get(i, "vaelab"))]
        examples = {
            "vaelab": args.peer_examples,
            "vaelab-compile": args.peer_examples,
            **dict.fromkeys(variants, args.peer_examples),
            "pythae": args.peer_examples,
            "pyro-vectorized": args.peer_examples,
            "pyro-importance": args.importance_examples,
        }
        flop_per_example = args.k * linear_flop(model.decoder) + linear_flop(model.encoder)

        # 1. the comparison, in interleaved rounds (order rotating); round 1 gives vaelab all --examples images
        runs: dict[str, list[dict]] = {impl: [] for impl in wanted}
        for r in range(args.rounds):
            order = wanted[r % len(wanted) :] + wanted[: r % len(wanted)]
            for impl in order:
                n = args.examples if impl == "vaelab" and r == 0 else examples[impl]
                print(f"round {r + 1}/{args.rounds}: {impl}, k = {args.k}, {n} images ... ", end="", flush=True)
                result = run_worker(
                    impl, k=args.k, examples=n, run_dir=run_dir, images=images, seed=args.seed + r, args=args
                )
                if result is None:
                    continue
                result["gflops"] = flop_per_example * n / result["seconds"] / 1e9
                runs[impl].append(result)
                print(
                    f"{result['seconds']:.1f} s ({result['seconds_per_example'] * 1e3:.1f} ms per image), "
                    f"log p(x) {result['mean']:.3f}, peak memory +{result['peak_delta_mib']:.0f} MiB",
                    flush=True,
                )
        peak_gflops = max(peak["peak_gflops"], matmul_peak(sizes=(2048,), repeats=2, min_seconds=0.1)["peak_gflops"])

        # 2. the scaling in k (vaelab, and pyro-vectorized for contrast), interleaved over k and implementation
        ks = [int(s) for s in args.scaling_k.split(",") if s.strip()]
        scaling_impls = [i for i in args.scaling_impls.split(",") if i in wanted]
        cells = [(impl, k) for impl in scaling_impls for k in ks]
        scaling_runs: dict[tuple[str, int], list[dict]] = {cell: [] for cell in cells}
        for r in range(args.scaling_rounds):
            for impl, k in cells[r % len(cells) :] + cells[: r % len(cells)]:
                print(f"scaling round {r + 1}/{args.scaling_rounds}: {impl}, k = {k} ... ", end="", flush=True)
                result = run_worker(
                    impl,
                    k=k,
                    examples=args.scaling_examples,
                    run_dir=run_dir,
                    images=images,
                    seed=args.seed + r,
                    args=args,
                )
                if result is not None:
                    scaling_runs[impl, k].append(result)
                    print(f"{result['seconds']:.2f} s, peak memory +{result['peak_delta_mib']:.0f} MiB", flush=True)

    comparison = summarize_comparison(runs, peak_gflops, args)
    scaling: dict[str, list[dict]] = {impl: [] for impl in scaling_impls}
    for (impl, k), rs in scaling_runs.items():
        if rs:
            seconds = statistics.median(r["seconds"] for r in rs)
            scaling[impl].append(
                {
                    "k": k,
                    "examples": args.scaling_examples,
                    "seconds_by_round": [r["seconds"] for r in rs],
                    "seconds_median": seconds,
                    "seconds_per_sample": seconds / (k * args.scaling_examples),
                    "peak_delta_mib_by_round": [r["peak_delta_mib"] for r in rs],
                    "peak_delta_mib_max": max(r["peak_delta_mib"] for r in rs),
                }
            )

    results = {
        "benchmark": "log p(x) by importance sampling, iwae-1layer VAE, fixed-binarized MNIST test images",
        "command": command_line("logpx_eval.py", argv),
        "model": str(args.run_dir) if args.run_dir else f"trained here: {args.train_steps} steps of batch 100",
        "k": args.k,
        "rounds": args.rounds,
        "vaelab_commit": vaelab_commit(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "load_average_at_end": os.getloadavg(),
        "matmul_peak": peak,
        "best_peak_gflops": peak_gflops,
        "flop_per_example": flop_per_example,
        "comparison": comparison,
        "scaling": scaling,
    }
    write_results(args.out, results)
    print_tables(results, args)
    print(f"results written to {args.out}")
    return 0


def summarize_comparison(runs: dict[str, list[dict]], peak_gflops: float, args) -> dict:
    """Per implementation: round-1 values; median seconds per image; vaelab's speed-up; GFLOP/s; peak memory.

    The speed-up over a peer is the median over rounds of (peer's seconds per image) / (vaelab's, same round).
    """
    base = runs.get("vaelab", [])
    out = {}
    for impl, rs in runs.items():
        if not rs:
            continue
        first = rs[0]
        n = first["examples"]
        entry = {
            "note": IMPLEMENTATION_NOTES.get(
                impl, f"vaelab.log_marginal with chunk_size={impl.removeprefix(CHUNK_VARIANT)}"
            ),
            "k": first["k"],
            "examples": n,
            "log_px_mean": first["mean"],
            "seconds_per_example_by_round": [r["seconds_per_example"] for r in rs],
            "seconds_per_example_median": statistics.median(r["seconds_per_example"] for r in rs),
            "gflops_median": statistics.median(r["gflops"] for r in rs),
            "peak_delta_mib_by_round": [r["peak_delta_mib"] for r in rs],
            "peak_delta_mib_max": max(r["peak_delta_mib"] for r in rs),
            "ru_maxrss_delta_mib_by_round": [r["ru_maxrss_delta_mib"] for r in rs],
            "warmup_seconds_by_round": [r.get("warmup_seconds") for r in rs],
        }
        entry["fraction_of_matmul_peak"] = entry["gflops_median"] / peak_gflops
        values = first.get("values")
        if values is not None and len(values) > 1:
            t = torch.tensor(values)
            entry["sem_over_examples"] = (t.std() / math.sqrt(len(t))).item()
        if base and base[0].get("values") is not None:
            entry["vaelab_log_px_mean_same_examples"] = sum(base[0]["values"][:n]) / n
        if base and impl != "vaelab":
            pairs = zip(rs, base, strict=False)
            entry["vaelab_speedup"] = statistics.median(
                r["seconds_per_example"] / b["seconds_per_example"] for r, b in pairs
            )
        elif impl == "vaelab":
            entry["vaelab_speedup"] = 1.0
        if runs.get("pythae"):  # how many times faster than pythae's get_nll, median over rounds
            pairs = zip(runs["pythae"], rs, strict=False)
            entry["times_faster_than_pythae"] = statistics.median(
                p["seconds_per_example"] / r["seconds_per_example"] for p, r in pairs
            )
        if impl == "pyro-importance":
            entry["extrapolated_seconds_for_vaelab_examples"] = (
                entry["seconds_per_example_median"] * base[0]["examples"] if base else None
            )
        out[impl] = entry
    return out


def print_tables(results: dict, args) -> None:
    print(f"\nlog p(x), k = {results['k']}; best matmul rate {results['best_peak_gflops']:.1f} GFLOP/s")
    header = (
        "implementation", "images", "ms/image", "vaelab x", "x pythae", "log p(x)", "vaelab same", "GFLOP/s", "peak",
        "+MiB",
    )  # fmt: skip
    print("{:<16} {:>6} {:>9} {:>8} {:>8} {:>9} {:>11} {:>8} {:>6} {:>6}".format(*header))
    for impl, r in results["comparison"].items():
        print(
            f"{impl:<16} {r['examples']:>6} {r['seconds_per_example_median'] * 1e3:>9.1f} "
            f"{r.get('vaelab_speedup', math.nan):>8.2f} {r.get('times_faster_than_pythae', math.nan):>8.2f} "
            f"{r['log_px_mean']:>9.3f} "
            f"{r.get('vaelab_log_px_mean_same_examples', math.nan):>11.3f} "
            f"{r['gflops_median']:>8.1f} {r['fraction_of_matmul_peak']:>6.1%} {r['peak_delta_mib_max']:>6.0f}"
        )
    print("(ms/image: median over rounds; vaelab x: its time per image over vaelab's in the same round, median over")
    print(" rounds (above 1: vaelab is faster); x pythae: pythae's time per image over its own, same round (above 1:")
    print(" faster than pythae); log p(x): mean over the images, nats; vaelab same: vaelab's mean on")
    print(" those images; +MiB: peak resident memory of the evaluation above the memory before it, max over rounds)")
    for impl, rows in results["scaling"].items():
        print(f"\n{impl}: scaling in k on {args.scaling_examples} images (median over {args.scaling_rounds} rounds)")
        print(f"{'k':>6} {'seconds':>8} {'us/sample':>10} {'+MiB':>6}")
        for r in rows:
            print(
                f"{r['k']:>6} {r['seconds_median']:>8.2f} {r['seconds_per_sample'] * 1e6:>10.2f} "
                f"{r['peak_delta_mib_max']:>6.0f}"
            )


if __name__ == "__main__":
    sys.exit(main())
