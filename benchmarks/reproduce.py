"""Published MNIST log-likelihoods reproduced (not a test): one row per published setting, each trained with
``vaelab train``, resumable across sittings, scored with ``vaelab eval``, with its learning curve and its weights.

Each row names its source, the data and binarization, the model, the objective, the paper's epochs and evaluation k,
and the published test log p(x). A row runs at a stated budget (``--epochs``, default the row's own budget, far below
most papers' on this 2-core CPU) and writes:

* ``benchmarks/results/reproduce.json``: every row run so far (published number, ours with its standard error over
  test images, epochs, wall time of training and of evaluation, the command lines, the curve);
* ``benchmarks/results/reproduce_ROW.png``: test log p(x) at the checkpoints (``--curve-k`` importance samples on the
  ``--curve-examples`` test images spread over the set) against epochs, with the published number;
* ``benchmarks/results/models/ROW/``: ``model.safetensors`` and ``config.json`` of the final weights (a few MB), which
  anyone re-scores with ``vaelab eval benchmarks/results/models/ROW --k 5000 --fast``.

    .venv/bin/python benchmarks/reproduce.py --list
    .venv/bin/python benchmarks/reproduce.py --rows burda-1l-vae-k1 --work runs/     # resumable: rerun to continue

Where the papers' code and text differ, the row's ``protocol`` says what was followed. Burda et al.'s paper text
(arXiv 1509.00519v4, sec. 5.1) gives Adam with beta1 0.9, beta2 0.999, eps 1e-4, minibatches of 20, 3^i passes at
learning rate 0.001 * 10^(-i/7) for i = 0..7 (3280 passes) and the mean of L_5000 on the test set. Their published
code (github.com/yburda/iwae, optimizers.py and experiments.py, read 2026-12-07) uses beta1 = 0.99 instead, starts
Adam's second moments at ones rather than zeros, adds eps = 1e-4 to sqrt(v), and rounds the learning rates to
1e-4 * round(10^(1 - (i-1)/7), 1), i = 1..8; its README says the first version of the paper used 59,600 training
images, and that a fixed binarization scores about 2 nats worse than the dynamic one. The rows here keep the
architectures, objectives, dynamic binarization and k = 5000 evaluation, and replace the optimiser and its schedule
by batch 100 and torch's Adam with its defaults (beta1 0.9, beta2 0.999, eps 1e-8, moments from zero) at 1e-3 with
cosine decay over the budget: the 3^i schedule spends 2187 of its 3280 epochs in its last stage, which no budget
here can afford.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from provenance import DEFAULT_DATA_DIR, RESULTS, command_line, vaelab, vaelab_commit, write_results

BURDA = "Burda, Grosse & Salakhutdinov 2016, Importance Weighted Autoencoders, Table 1 (MNIST)"
RAINFORTH = (
    "Rainforth et al. 2018, Tighter Variational Bounds are Not Necessarily Better (official implementation's numbers, "
    "as quoted on pythae's model cards, which reproduce them)"
)
BURDA_PROTOCOL = "dynamic binarization, batch 100, Adam 1e-3 with cosine decay over the budget; k = 5000 at test"


@dataclass(frozen=True)
class Row:
    source: str
    published: float  # test log p(x), nats (the papers print -log p(x))
    paper_epochs: int | None
    budget_epochs: int  # what a sitting of this project runs by default
    flags: tuple[str, ...]
    eval_k: int = 5000
    peer: str | None = None  # a peer library's reproduction of the same number, where there is one
    protocol: str = BURDA_PROTOCOL
    notes: str = ""
    train_images: int = 60_000  # MNIST's training set (validation_size 0); static binarized MNIST has 50,000
    weights: str = "final"  # or "best": the checkpoint with the best validation ELBO (early stopping; --eval-every)


def _burda(layers: int, objective: str, k: int, published: float, budget: int) -> Row:
    flags = ("--preset", f"iwae-{layers}layer", "--dataset", "mnist", "--lr-decay", "cosine", "--compile")
    flags += ("--objective", objective, "--k", str(k))
    return Row(BURDA, published, 3280, budget, flags)


RAINFORTH_NOTES = (
    "pythae's reproduction scripts (github.com/clementchadebec/benchmark_VAE, examples/scripts/reproducibility, read "
    "2026-12-07) train Burda et al.'s 1-layer MLP on dynamically binarized MNIST with batch 20 for 3280 epochs, Adam "
    "1e-3 with eps 1e-4 and step decays of 10^(-1/7), and score with 5000 importance samples; the paper's own text "
    "was not read here."
)


def _rainforth(objective: str, options: dict, k: int, published: float, pythae: str, card: str, notes: str) -> Row:
    flags = ("--preset", "iwae-1layer", "--dataset", "mnist", "--lr-decay", "cosine", "--compile")
    flags += ("--objective", objective, "--objective-options", json.dumps(options), "--k", str(k))
    peer = f"pythae {pythae} (its model card clementchadebec/reproduced_{card}, NLL with 5000 IS)"
    # 100 epochs, the same for all three so that they compare (and with burda-1l-iwae-k50's 100): ~27 s an epoch at
    # 64 samples an image on 2 cores (~45 min a row), where 300 would take a session's training time each
    return Row(RAINFORTH, published, 3280, 100, flags, peer=peer, notes=f"{RAINFORTH_NOTES} {notes}".strip())


VAMP_PYTHAE = (
    "pythae's reproduction (examples/scripts/reproducibility/vamp.py, read 2026-12-07): gated MLPs 2 x 300, 40 "
    "latents, the scale's log clipped to [-6, 2], static binarized MNIST, batch 100, RMSprop 1e-4 with step decays "
    "10^(-1/5) at epochs 200, 350, 500, 750 and 1000, 2000 epochs, KL warm-up over 100 epochs."
)
VAMP_FLAGS = ("--preset", "iwae-1layer", "--dataset", "binarized-mnist", "--prior", "vamp", "--lr-decay", "cosine")
VAMP_FLAGS += ("--compile",)  # VampPrior compiles with no graph break (tests/test_train.py), 0.22x a plain VAE's speed

VAMP_GATED_FLAGS = ("--dataset", "binarized-mnist", "--architecture", "mlp", "--latent-dim", "40", "--prior", "vamp")
VAMP_GATED_FLAGS += ("--architecture-options", json.dumps({"hidden": [300, 300], "activation": "gated"}))
VAMP_GATED_FLAGS += ("--lr", "5e-4", "--schedule", "linear", "--schedule-options", json.dumps({"steps": 100 * 500}))
VAMP_GATED_FLAGS += ("--no-init-decoder-bias", "--eval-every", "500", "--eval-k", "1", "--eval-examples", "10000")
VAMP_GATED_FLAGS += ("--compile",)  # validation: the ELBO of all 10,000 validation images after every epoch

ROWS: dict[str, Row] = {
    "burda-1l-vae-k1": _burda(1, "elbo", 1, -86.76, 2500),  # -86.30 +- 0.23 in 86 min on 2 cores
    "burda-1l-vae-k5": _burda(1, "elbo", 5, -86.47, 600),  # -87.31 +- 0.23, 38 min on 2 cores (~3.7 s an epoch)
    "burda-1l-iwae-k5": _burda(1, "iwae", 5, -85.54, 2000),  # -85.27 +- 0.22, ~90 min on 2 quiet cores
    "burda-1l-vae-k50": _burda(1, "elbo", 50, -86.35, 100),  # -89.92 +- 0.25, 37 min on 2 cores (~20 s an epoch)
    "burda-1l-iwae-k50": _burda(1, "iwae", 50, -84.78, 100),  # -87.73 +- 0.23, 52 min on 2 cores (~22 s an epoch)
    "burda-2l-vae-k1": _burda(2, "elbo", 1, -85.33, 600),  # -86.17 +- 0.23, 37 min on 2 cores (~3.3 s an epoch)
    "burda-2l-vae-k5": _burda(2, "elbo", 5, -85.01, 300),  # -86.40 +- 0.24, 28 min on 2 cores (~5.7 s an epoch)
    "burda-2l-iwae-k5": _burda(2, "iwae", 5, -83.89, 300),  # -85.37 +- 0.23, 31 min on 2 cores (~5.9 s an epoch)
    "burda-2l-vae-k50": _burda(2, "elbo", 50, -84.78, 50),  # -89.91 +- 0.25, 35 min on 2 cores (~41 s an epoch)
    "burda-2l-iwae-k50": _burda(2, "iwae", 50, -82.90, 50),  # -88.48 +- 0.24, 45 min on 2 cores (~41 s an epoch)
    "vampprior-1l": Row(
        "Tomczak & Welling 2018, VAE with a VampPrior, Table 1 (static MNIST, K = 500, 1 stochastic layer)",
        -85.57,
        None,
        1000,  # ~4.7 s an epoch compiled on 2 cores (50,000 images): ~80 min
        VAMP_FLAGS,
        peer="pythae 85.79 (its model card clementchadebec/reproduced_vamp, NLL with 5000 IS)",
        notes=VAMP_PYTHAE,
        train_images=50_000,
        protocol="static binarization (Larochelle's 50,000 / 10,000 / 10,000), batch 100, Adam 1e-3 with cosine "
        "decay over a fixed budget, no KL warm-up, pseudo-inputs started at training images, the iwae-1layer MLP "
        "(2 x 200 tanh, 50 latents). The authors' code (github.com/jmtomczak/vae_vampprior, experiment.py) trains "
        "gated MLPs (2 x 300, 40 latents) with Adam 5e-4, batch 100, a 100-epoch linear KL warm-up, up to 2000 "
        "epochs with early stopping on the validation set (look-ahead 50), pseudo-inputs started near 0.05 and kept "
        "in [0, 1], and scores with 5000 importance samples",
    ),
    "vampprior-1l-gated": Row(
        "Tomczak & Welling 2018, VAE with a VampPrior, Table 1 (static MNIST, K = 500, 1 stochastic layer)",
        -85.57,
        2000,  # at most, with early stopping
        500,
        VAMP_GATED_FLAGS,
        peer="pythae 85.79 (its model card clementchadebec/reproduced_vamp, NLL with 5000 IS)",
        notes=VAMP_PYTHAE,
        train_images=50_000,
        weights="best",
        protocol="the authors' code's protocol (github.com/jmtomczak/vae_vampprior, experiment.py): gated MLPs "
        "(2 x 300, 40 latents), Adam 5e-4 constant, batch 100, KL warm-up over 100 epochs, the weights of the epoch "
        "with the best validation ELBO (its early stopping), 5000 importance samples at test; except: torch's Adam "
        "(theirs: AdamNormGrad), pseudo-inputs started at training images (theirs: near 0.05, clipped to [0, 1]), "
        "the scale's log not clipped to [-6, 2], and a fixed budget rather than a 50-epoch look-ahead",
    ),
    "miwae-m8-k8": _rainforth("miwae", {"m": 8}, 8, -84.97, "85.09", "miwae", ""),  # -87.73 +- 0.23, 45 min
    "piwae-m8-k8": _rainforth("piwae", {"m": 8}, 8, -84.46, "84.58", "piwae", ""),  # -87.37 +- 0.23, 49 min
    "ciwae-b0.05": _rainforth(  # -87.77 +- 0.23, 47 min
        "ciwae",
        {"elbo_weight": 0.05},
        64,
        -84.57,
        "84.74",
        "ciwae",
        "The CIWAE weight is uncertain: pythae's ciwae.py and its config say beta = 0.5, the model it uploaded says "
        "0.05; -84.57 was not found in a copy of the paper's table, where a secondary source (madhubabuv/TightIWAE's "
        "README) lists CIWAE beta = 0.5 at -85.24.",
    ),
}


def learning_curve(run: Path, *, per_epoch: int, k: int, examples: int, seed: int = 0) -> list[dict]:
    """Test log p(x) (k importance samples, ``examples`` test images spread over the set, the fixed binarization of
    vaelab eval) at every step checkpoint the run kept (``per_epoch`` steps an epoch):
    ``[{"epoch", "step", "log_px", "sem"}]``. Each point is kept in ``run/curve.json`` with what it was computed
    from, so a rerun that only refreshes a row's record scores no checkpoint twice."""
    import torch

    from vaelab import keep_freed_memory
    from vaelab.cli import _eval_data
    from vaelab.config import build_model
    from vaelab.estimators import log_marginal
    from vaelab.evaluate import summarize
    from vaelab.runs import load_run, load_run_checkpoint

    cache = run / "curve.json"
    how = {"k": k, "examples": examples, "seed": seed, "subset": "spread"}  # vaelab.data.spread's test images
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    known = {c["step"]: c for c in saved.get("points", [])} if saved.get("how") == how else {}
    keep_freed_memory()  # as the command line does: eager log p(x) otherwise spends its time in page faults
    base = load_run(run)
    x = _eval_data(base, "test", examples, seed).x
    curve = []
    for directory in sorted((run / "checkpoints").glob("step_*")):
        step = int(directory.name.removeprefix("step_"))
        if step in known:
            curve.append(known[step])
            continue
        weights, _, meta = load_run_checkpoint(directory)
        model = build_model(base.config, meta["data_shape"])
        model.load_state_dict(weights)
        model.eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            values = torch.cat([log_marginal(model, b, k=k).value for b in x.split(100)])
        s = summarize(values)
        curve.append({"epoch": meta["step"] / per_epoch, "step": meta["step"], "log_px": s["mean"], "sem": s["sem"]})
        cache.write_text(json.dumps({"how": how, "points": curve}))
    return curve


def plot_curve(name: str, row: Row, curve: list[dict], final: dict | None, out: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if curve:
        ax.errorbar([c["epoch"] for c in curve], [c["log_px"] for c in curve], [c["sem"] for c in curve], fmt="o-",
                    label="test log p(x) at checkpoints (curve k, spread subset)")  # fmt: skip
    if final:
        ax.errorbar([final["epochs"]], [final["log_px"]], [final["sem"]], fmt="s", color="C3",
                    label=f"final, k = {final['k']}, all test images")  # fmt: skip
    ax.axhline(row.published, color="grey", ls="--", label=f"published {row.published}")
    ax.set_xlabel("epochs")
    ax.set_ylabel("test log p(x), nats")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def slope_per_100_epochs(curve: list[dict]) -> float | None:
    """The least-squares slope of the last three curve points, nats per 100 epochs: how much more the budget buys."""
    tail = curve[-3:]
    if len(tail) < 2:
        return None
    xs, ys = [c["epoch"] for c in tail], [c["log_px"] for c in tail]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return None if var == 0 else 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def run_row(name: str, row: Row, args, previous: dict) -> dict:
    """Train (or resume) the row, score it, draw its curve; ``previous``: its entry in the results so far, whose
    wall times stand where this call trains or scores nothing (a rerun that only redraws the curve)."""
    run = args.work / name
    epochs = args.epochs or row.budget_epochs
    points = max(2, args.curve_points)
    per_epoch = math.ceil(row.train_images / 100)  # batch 100
    every = max(1, epochs * per_epoch // points)
    train = ["train", *row.flags, "--data-dir", args.data_dir, "--epochs", epochs, "--out", run, "--no-progress"]
    train += ["--checkpoint-every", every, "--keep-last", points + 1]
    sittings = run / "train_sittings.json"  # the wall time of each sitting that trained this row, summed below
    if not (run / "model.safetensors").is_file():
        resume = ["--resume"] if any((run / "checkpoints").glob("step_*")) else []
        start = time.perf_counter()
        try:
            vaelab(*train, *resume)
        finally:  # a sitting stopped by Ctrl-C, SIGTERM or an error counts too: it resumes from its last checkpoint
            done = json.loads(sittings.read_text()) if sittings.is_file() else []
            sittings.write_text(json.dumps([*done, time.perf_counter() - start]))
    train_seconds = sum(json.loads(sittings.read_text())) if sittings.is_file() else previous.get("train_seconds")
    evaluation = run / "eval_test.json"
    eval_cmd = ["eval", run, "--k", row.eval_k, "--checkpoint", row.weights, "--fast", "--no-progress"]
    eval_cmd += ["--json", evaluation]
    if args.eval_examples:
        eval_cmd += ["--examples", args.eval_examples]
    eval_seconds = vaelab(*eval_cmd) if not evaluation.is_file() else previous.get("eval_seconds")
    result = json.loads(evaluation.read_text())
    if eval_seconds is None:  # scored by a sitting that stopped before it recorded the time: eval's own record
        eval_seconds = result.get("seconds")
    lp = result["log_px"]
    curve = learning_curve(run, per_epoch=per_epoch, k=args.curve_k, examples=args.curve_examples)
    final = {"epochs": epochs, "log_px": lp["mean"], "sem": lp["sem"], "k": lp["k"]}
    picture = plot_curve(name, row, curve, final, RESULTS / f"reproduce_{name}.png")
    models = RESULTS / "models" / name
    models.mkdir(parents=True, exist_ok=True)
    chosen = run / "checkpoints" / "best" if row.weights == "best" else run  # the weights scored, shipped
    for file in ("model.safetensors", "config.json", "data.json", "data_shape.json"):
        source = chosen / file if file == "model.safetensors" else run / file
        if source.is_file():
            shutil.copy2(source, models / file)
    selected = None
    if row.weights == "best":
        selected = json.loads((chosen / "state.json").read_text())["step"] / per_epoch
    return {
        **asdict(row),
        "epochs": epochs,
        "selected_epoch": selected,  # where early stopping chose the weights (rows with weights "best")
        "log_px": lp["mean"],
        "sem": lp["sem"],
        "eval_k": lp["k"],
        "examples": result["examples"],
        "elbo": result["elbo"]["kl"]["mean"],
        "active_units": result.get("active_units"),
        "gap_to_published": lp["mean"] - row.published,
        "slope_nats_per_100_epochs": slope_per_100_epochs(curve),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "train_command": "vaelab " + " ".join(map(str, train)),
        "rescore": f"vaelab eval benchmarks/results/models/{name} --k {row.eval_k} --fast",
        "curve": curve,
        "curve_picture": str(picture.relative_to(RESULTS.parent.parent)),
    }


def _num(x: float, spec: str = ".2f") -> str:
    return f"{x:{spec}}".replace("-", "\u2212")  # a typographic minus, as the README writes numbers


def _minutes(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds / 60:.0f} min"


def markdown_table(results: dict) -> str:
    """Every row of :data:`ROWS` as a Markdown table (the README's): published against vaelab's number where the
    row has run (``results``: reproduce.json's contents), with its epochs, wall times, curve slope and re-score."""
    lines = [
        "| row | published | vaelab: test log p(x), k = 5000 | epochs (paper's) | training / eval | gap, curve slope "
        "| re-score |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in ROWS.items():
        r = results.get("rows", {}).get(name)
        head = f"| `{name}` | {_num(row.published)} |"
        paper = row.paper_epochs or "?"
        if r is None:
            lines.append(f"{head} not run yet | budget {row.budget_epochs} ({paper}) | — | — | — |")
            continue
        chosen = f", weights of epoch {r['selected_epoch']:.0f}" if r.get("selected_epoch") is not None else ""
        slope = r.get("slope_nats_per_100_epochs")
        trend = "—" if slope is None else f"{_num(slope, '+.2f')} nats / 100 epochs"
        lines.append(
            f"{head} **{_num(r['log_px'])} ± {r['sem']:.2f}** (ELBO {_num(r['elbo'])}, {r['active_units']} active "
            f"units) | {r['epochs']}{chosen} ({paper}) | {_minutes(r['train_seconds'])} / "
            f"{_minutes(r['eval_seconds'])} | {_num(r['gap_to_published'], '+.2f')}, {trend} | `{r['rescore']}` |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=["burda-1l-vae-k1"])
    p.add_argument("--list", action="store_true", help="print the table of published settings and exit")
    p.add_argument("--table", action="store_true", help="print the README's Markdown table of every row and exit")
    p.add_argument("--epochs", type=int, default=None, help="override every row's budget")
    p.add_argument("--work", type=Path, default=Path("runs/reproduce"), help="run directories (default: %(default)s)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--eval-examples", type=int, default=None, help="test images of the final score (default: all)")
    p.add_argument("--curve-points", type=int, default=8, help="checkpoints along the run (default: %(default)s)")
    p.add_argument("--curve-k", type=int, default=1000)
    p.add_argument("--curve-examples", type=int, default=1000)
    p.add_argument("--out", type=Path, default=RESULTS / "reproduce.json")
    args = p.parse_args(argv)
    if args.list:
        for name, row in ROWS.items():
            print(f"{name:<18} published {row.published:8.2f}  paper epochs {row.paper_epochs or '?':>5}  "
                  f"budget {row.budget_epochs:>5}  {row.source}")  # fmt: skip
        return 0

    def read() -> dict:
        return json.loads(args.out.read_text()) if args.out.is_file() else {"rows": {}}

    results = read()
    if args.table:
        print(markdown_table(results))
        return 0
    for name in args.rows:
        row = run_row(name, ROWS[name], args, results["rows"].get(name, {}))
        results = read()  # again: a sitting of another row may have written its own since (they run for hours)
        results["rows"][name] = row
        results.update(command=command_line("reproduce.py", argv), commit=vaelab_commit())
        write_results(args.out, results)  # after each row: a crash keeps what is done
        r = results["rows"][name]
        print(f"{name}: {r['log_px']:.2f} ± {r['sem']:.2f} (published {r['published']}) after {r['epochs']} epochs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
