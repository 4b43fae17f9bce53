"""Conditional models on MNIST (not a test): the classifier p(y|x), the conditional VAE and an unconditional VAE with
the same networks, trained for the same epochs and scored on the same test images.

Reports the classifier's accuracy, NLL and ECE; the cVAE's test log p(x|y), its marginal log p(x) =
logsumexp_y [log p(x|y) + log p(y)] and its generative classifier's accuracy; the VAE's log p(x) on the same images,
so the nats the label carries can be read two ways (log p(x|y) - log p(x) within the cVAE, and the cVAE's marginal
against the VAE). Semi-supervised M2 has its own script, ``benchmarks/m2_mnist.py``.

    .venv/bin/python benchmarks/conditional_mnist.py                  # 5 epochs each, 1000 test images
    .venv/bin/python benchmarks/conditional_mnist.py --epochs 1 --examples 200 --k 200

Writes benchmarks/results/conditional_mnist.json (the commands, their wall times and the numbers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from provenance import DEFAULT_DATA_DIR, RESULTS, command_line, vaelab, vaelab_commit, write_results

MODELS = {  # the same mlp networks (the default architecture) for the three
    "classifier": ["--model", "classifier"],
    "cvae": ["--model", "cvae"],
    "vae": ["--model", "vae"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--examples", type=int, default=1000, help="first N test images (default: %(default)s)")
    p.add_argument("--k", type=int, default=1000, help="importance samples for log p(x) (default: %(default)s)")
    p.add_argument("--classify-k", type=int, default=10, help="samples per class, generative classifier")
    p.add_argument("--work", type=Path, default=None, help="run directories (default: a temporary folder)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--out", type=Path, default=RESULTS / "conditional_mnist.json")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="vaelab-conditional-"))
    results = {"command": command_line("conditional_mnist.py", argv), "commit": vaelab_commit(), "models": {}}
    for name, flags in MODELS.items():
        run = work / name
        train = ["train", "--dataset", "mnist", "--data-dir", args.data_dir, *flags, "--epochs", args.epochs]
        train += ["--out", run, "--no-progress"]
        seconds = vaelab(*train) if not (run / "model.safetensors").is_file() else None
        evaluate = ["eval", run, "--examples", args.examples, "--no-progress", "--json", run / "eval.json"]
        if name != "classifier":
            evaluate += ["--k", args.k, "--fast"]
        if name == "cvae":
            evaluate += ["--classify-k", args.classify_k]
        eval_seconds = vaelab(*evaluate)
        found = json.loads((run / "eval.json").read_text())
        row = {"train": "vaelab " + " ".join(map(str, train)), "train_seconds": seconds, "eval_seconds": eval_seconds}
        row["eval"] = "vaelab " + " ".join(map(str, evaluate))
        for key in ("log_px", "classification", "marginal"):
            if key in found:
                value = found[key]
                row[key] = {k: v for k, v in value.items() if k not in ("reliability", "confusion")}
        results["models"][name] = row
        write_results(args.out, results)
    models = results["models"]
    vae, cvae = models["vae"]["log_px"]["mean"], models["cvae"].get("marginal", {}).get("log_px", {}).get("mean")
    if cvae is not None:
        results["cvae_marginal_minus_vae"] = cvae - vae
    write_results(args.out, results)
    print(json.dumps({k: v for k, v in results.items() if k != "models"}, indent=2))
    for name, row in models.items():
        print(name, {k: row[k] for k in ("log_px", "classification", "marginal") if k in row})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
