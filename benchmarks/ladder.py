"""The density-estimation ladder on real data (not a test): classic models, a VAE, its Parzen-window estimate and a
deterministic autoencoder with the VAE's networks, all on the same test images.

Three settings, each a VAE trained here (resumable: a run directory that exists is resumed, a finished one reused)
and then ``vaelab baselines --runs RUN`` on its data:

* binarized MNIST (the fixed binarization of ``vaelab eval``), Bernoulli VAE, nats per example;
* 8-bit MNIST dequantized, (x + u) / 256 on [0,1]^D, continuous-Bernoulli VAE (a density on [0,1]^D), nats and bits/dim;
* 8-bit Fashion-MNIST dequantized, the same.

    .venv/bin/python benchmarks/ladder.py                      # about 15-20 min on 2 CPU cores
    .venv/bin/python benchmarks/ladder.py --epochs 2 --quick   # a smoke run: small grids, few draws

Writes benchmarks/results/ladder.json (each setting's table as ``vaelab baselines`` writes it, the training command
and its wall time) and prints each table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from provenance import DEFAULT_DATA_DIR, RESULTS, command_line, vaelab, vaelab_commit, write_results

SETTINGS = {
    "mnist-binary": ("mnist", "binary", ["--preset", "iwae-1layer", "--likelihood", "bernoulli"]),
    "mnist-dequantized": (
        "mnist",
        "dequantized",
        ["--preset", "iwae-1layer", "--likelihood", "continuous-bernoulli", "--no-binarize"],
    ),
    "fashion-mnist-dequantized": (
        "fashion-mnist",
        "dequantized",
        ["--preset", "iwae-1layer", "--likelihood", "continuous-bernoulli", "--no-binarize"],
    ),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--epochs", type=int, default=20, help="VAE training epochs (default: %(default)s)")
    p.add_argument("--work", type=Path, default=None, help="run directories (default: a temporary folder)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--quick", action="store_true", help="small grids, 100 test images, few Parzen draws")
    p.add_argument("--out", type=Path, default=RESULTS / "ladder.json")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="vaelab-ladder-"))
    results = {
        "command": command_line("ladder.py", argv),
        "commit": vaelab_commit(),
        "epochs": args.epochs,
        "settings": {},
    }
    for name in args.settings:
        dataset, space, flags = SETTINGS[name]
        run = work / name
        train = ["train", "--dataset", dataset, "--data-dir", args.data_dir, *flags, "--epochs", args.epochs]
        train += ["--out", run, "--no-progress"] + (["--resume"] if (run / "config.json").is_file() else [])
        seconds = vaelab(*train) if not (run / "model.safetensors").is_file() else None
        table = work / f"{name}.json"
        ladder = ["baselines", "--dataset", dataset, "--data-dir", args.data_dir, "--space", space, "--runs", run]
        if args.quick:
            ladder += ["--examples", "100", "--valid-examples", "100", "--train-examples", "1000"]
            ladder += ["--parzen-draws", "100", "1000", "--autoencoder-steps", "200"]
        ladder_seconds = vaelab(*ladder, "--json", table)
        results["settings"][name] = {
            "train": "vaelab " + " ".join(map(str, train)),
            "train_seconds": seconds,
            "ladder": "vaelab " + " ".join(map(str, ladder)),
            "ladder_seconds": ladder_seconds,
            "table": json.loads(table.read_text()),
        }
        write_results(args.out, results)  # after each setting: a crash keeps what is done
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
