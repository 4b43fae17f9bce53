"""The `vaelab` command line. Thin: each subcommand parses its flags and calls the library.

Errors meant for the user print one line and exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

if typing.TYPE_CHECKING:
    import torch


class UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


def _cmd_check(args: argparse.Namespace) -> int:
    from vaelab.check import format_table, rows_as_dicts, run_check

    rows = run_check(seed=args.seed)
    print(format_table(rows))
    problems = [f"{r.model} / {r.proposal}: {p}" for r in rows for p in r.problems]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows_as_dicts(rows), "problems": problems}, f, indent=2)
    print()
    if problems:
        print(f"check FAILED: {len(problems)} disagreement(s) with the exact values:")
        for p in problems:
            print("  " + p)
        return 1
    print(
        "check passed: every estimate agrees with the exact value within its standard errors, "
        "or flags itself as unreliable."
    )
    return 0


def _add_check(sub) -> None:
    p = sub.add_parser(
        "check",
        help="check every estimator against exact values on linear-Gaussian models",
        description="Run the ELBO, IWAE and log p(x) estimators on linear-Gaussian models (exact log p(x) and "
        "posterior known) and print how each compares; exit status 0 only if all agree within standard errors.",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the table as JSON (default: no file)")
    p.set_defaults(func=_cmd_check)


# --- train ------------------------------------------------------------------------------------------------------
def _config_flag_type(hint):
    """argparse type for a TrainConfig field from its type (``typing.get_type_hints``): int, float, str, a dict (a JSON
    object), or one of those or None (``X | None``: the word "none" gives None)."""
    args = typing.get_args(hint)
    if hint is dict or typing.get_origin(hint) is dict:
        return _json_object
    if type(None) in args:
        (kind,) = [a for a in args if a is not type(None)]
        return _optional(kind)
    if hint in (int, float, str):
        return hint
    raise TypeError(f"no command-line type for a config field of type {hint!r}")


def _is_bool(hint) -> bool:
    return hint is bool or set(typing.get_args(hint)) == {bool, type(None)}


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"hidden\": [512, 256]}'")
    return value


def _add_train(sub) -> None:
    import dataclasses

    from vaelab.train import PRESETS, TrainConfig

    p = sub.add_parser(
        "train",
        help="train a VAE (config file, preset and flags; flags win)",
        description="Train a VAE. The config is built from the defaults, then --preset, then --config FILE.toml, "
        "then the flags; the resolved config is printed and saved in the run directory. Ctrl-C or SIGTERM stops "
        "cleanly with a checkpoint; --resume continues a run exactly where it stopped.",
    )
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of config fields (default: none)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named starting config (default: none)")
    p.add_argument("--out", metavar="RUN_DIR", default="runs/vae", help="run directory (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    from vaelab.config import AUTO_COMPILE_SAMPLES, REGISTRIES

    none_means = {  # what a boolean field's default of None stands for
        "binarize": "binarize iff the likelihood's data are binary (e.g. Bernoulli)",
        "compile": f"compile runs on >= {AUTO_COMPILE_SAMPLES:,} training examples, where it repays itself",
    }
    defaults = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    group = p.add_argument_group("config fields (each overrides --preset and --config)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if _is_bool(hints[f.name]):
            meaning = f": {none_means[f.name]}" if default is None and f.name in none_means else ""
            group.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"(default: {default}{meaning})",
            )
        else:
            options = sorted(REGISTRIES[f.name]) if f.name in REGISTRIES else None
            group.add_argument(
                flag,
                dest=f.name,
                type=_config_flag_type(hints[f.name]),
                default=None,
                choices=options,
                metavar="{" + ",".join(options) + "}" if options else f.name.upper(),
                help=f"(default: {json.dumps(default)})",
            )
    p.set_defaults(func=_cmd_train)


def resolve_config(args: argparse.Namespace):
    """defaults < preset < config file < flags."""
    import dataclasses
    import tomllib

    from vaelab.train import PRESETS, TrainConfig

    values: dict = {}
    if args.preset:
        values.update(PRESETS[args.preset])
    if args.config:
        try:
            with open(args.config, "rb") as f:
                from_file = tomllib.load(f)
        except FileNotFoundError as err:
            raise UserError(f"config file {args.config} not found") from err
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"config file {args.config} is not valid TOML: {err}") from err
        except OSError as err:  # a folder, unreadable, ...
            raise UserError(f"config file {args.config} cannot be read ({err.strerror or err})") from err
        preset = from_file.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise UserError(f"{args.config}: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
            values = {**PRESETS[preset], **values}
        values.update(from_file)
    for f in dataclasses.fields(TrainConfig):
        flag = getattr(args, f.name, None)
        if flag is not None:
            values[f.name] = flag
    return TrainConfig.from_dict(values)


DATA_RECORD = "data.json"  # in a run directory: where its data were found when it trained


def _load_splits(config, run_dir: str | Path | None = None):
    """The run's data: first where the run recorded finding it (``RUN_DIR/data.json``), then the usual search
    (``data_dir``, ``$VAELAB_DATA_DIR``, the cache; for a path, as given, then by name in ``$VAELAB_DATA_DIR``)."""
    from vaelab.data import DATASETS, DataError, load_dataset

    record = Path(run_dir) / DATA_RECORD if run_dir is not None else None
    recorded = json.loads(record.read_text())["source"] if record is not None and record.is_file() else None
    dataset, data_dir = config.dataset, config.data_dir
    if config.dataset in DATASETS:
        data_dir = recorded if recorded is not None and Path(recorded).is_dir() else data_dir
    elif recorded is not None and Path(recorded).exists():
        dataset = recorded
    elif not Path(dataset).exists():  # a path that moved: by its name, in $VAELAB_DATA_DIR's folders
        folders = [Path(f) for f in os.environ.get("VAELAB_DATA_DIR", "").split(os.pathsep) if f]
        dataset = next((str(f / Path(dataset).name) for f in folders if (f / Path(dataset).name).exists()), dataset)
    options = dict(validation_size=config.validation_size, seed=config.seed, max_examples=config.max_examples)
    try:
        return load_dataset(dataset, data_dir=data_dir, **options)
    except DataError as err:
        if recorded is None:
            raise
        raise UserError(
            f"the data {run_dir} trained on ({config.dataset}) are no longer at {recorded}, nor anywhere vaelab looks: "
            f"set VAELAB_DATA_DIR to the folder that holds them now"
        ) from err


def _record_data(run_dir: str | Path, splits) -> None:
    """Write where the data were found (resolved) into the run directory, for eval, report and compare."""
    from vaelab.checkpoint import atomic_write_text

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    record = {"dataset": splits.name, "source": str(Path(splits.source).resolve())}
    atomic_write_text(Path(run_dir) / DATA_RECORD, json.dumps(record, indent=2))


def _with_labels(x, labels):
    """Training data for the Trainer: x, with its labels as ``y`` where there are any (read by models that ask)."""
    return x if labels is None else {"x": x, "y": labels}


def _auto_dataset(data_dir) -> str:
    """MNIST if a copy is found anywhere vaelab looks (never downloads), else Fashion-MNIST."""
    from vaelab.data import DataError, find_dataset

    try:
        find_dataset("mnist", data_dir)
        return "mnist"
    except DataError:
        return "fashion-mnist"


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from vaelab.runs import resume_checkpoint
    from vaelab.train import TrainConfig, Trainer

    if args.resume:
        found = resume_checkpoint(args.out)
        if found is None:
            raise UserError(f"--resume: no checkpoint in {args.out}/checkpoints")
        checkpoint, (_, _, meta) = found
        config = TrainConfig.from_dict(meta["config"])
        print(f"resuming {args.out} from {checkpoint.name} (the saved config is used)")
    else:
        config = resolve_config(args)
        if config.dataset == "auto":
            config = dataclasses.replace(config, dataset=_auto_dataset(config.data_dir))
    print("config:\n" + json.dumps(dataclasses.asdict(config), indent=2))
    splits = _load_splits(config)
    print(
        f"data: {splits.name} from {splits.source}: train {tuple(splits.train.shape)}, "
        f"valid {tuple(splits.valid.shape)}, test {tuple(splits.test.shape)}"
    )
    _check_labels_for(config, splits)
    valid = _with_labels(splits.valid, splits.valid_labels) if len(splits.valid) else None
    trainer = Trainer(config, _with_labels(splits.train, splits.train_labels), valid, args.out, resume=args.resume)
    _record_data(args.out, splits)
    result = trainer.fit()
    if result.interrupted:
        return 130 if result.interrupted == "SIGINT" else 143
    summary = f"trained {result.step} steps; run directory {args.out}"
    last, k = result.last_eval, config.eval_k
    if last and f"iwae_{k}" in last:
        summary += f"; validation ELBO {last['elbo']:.2f}, IWAE_{k} {last[f'iwae_{k}']:.2f} nats"
    elif last and "accuracy" in last and callable(getattr(trainer.model, "given", None)):
        # a semi-supervised model (m2): its 'elbo' is the bound on log p(x) with y summed out
        summary += f"; validation ELBO {last['elbo']:.2f} nats (y summed out), accuracy {100 * last['accuracy']:.2f}%"
    elif last and "accuracy" in last:  # a classifier's validation scores: its 'elbo' is log p(y|x)
        summary += f"; validation log p(y|x) {last['elbo']:.4f} nats, accuracy {100 * last['accuracy']:.2f}%"
    print(summary)
    return 0


def _check_labels_for(config, splits) -> None:
    """A model that reads labels (its ``context`` or ``targets``: a cvae, a classifier) needs a dataset that has
    them, and labels in 0..classes-1: refused in one line before anything trains."""
    from vaelab.models import MODELS

    family = MODELS[config.model]
    if "y" not in (*getattr(family, "context", ()), *getattr(family, "targets", ())):
        return
    if splits.train_labels is None:
        raise UserError(f"--model {config.model} trains on labels, and {splits.name} has none (from {splits.source})")
    for name in ("train", "valid", "test"):
        labels = getattr(splits, f"{name}_labels")
        if labels is not None and len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < config.classes:
            raise UserError(
                f"the {name} labels of {splits.name} run {int(labels.min())}..{int(labels.max())}, outside the "
                f"model's 0..{config.classes - 1}: set --classes"
            )


# --- eval / sample / reconstruct ------------------------------------------------------------------------------------
def _load(run_dir: str, which: str = "final"):
    from vaelab.checkpoint import CheckpointError
    from vaelab.train import load_run, resolve_device

    try:
        return load_run(run_dir, which=which, device=resolve_device("auto"))
    except CheckpointError as err:
        raise UserError(str(err)) from err


class EvalData(typing.NamedTuple):
    """The evaluation examples of a split as a run scores them (:func:`_eval_data`), all on the model's device."""

    x: torch.Tensor  # [N, *data_shape], binarized as the run's protocol says
    context: dict[str, torch.Tensor] | None  # {"y": labels} for a model given labels (cvae); None for other models
    labels: torch.Tensor | None  # [N] labels of the same rows; None where the split has none


def _eval_data(run, split: str, examples: int | None, seed: int) -> EvalData:
    """``examples`` images of a split spread evenly over it (:func:`vaelab.data.spread`; all: None) as the run
    evaluates them, their labels, and the context a model that asks for it is given there: every command that
    scores, classifies or draws takes its rows here, so images and labels stay aligned."""
    from vaelab.data import as_float, binarize_fixed, spread

    splits = _load_splits(run.config, run.run_dir)
    data = {"train": splits.train, "valid": splits.valid, "test": splits.test}[split]
    if len(data) == 0:
        raise UserError(f"the {split} split of {splits.name} is empty")
    rows = spread(len(data), examples)
    data = as_float(data[rows])
    if run.config.binarizes and not splits.binary:
        data = binarize_fixed(data, seed=seed)  # the fixed-seed binarization of the evaluation protocol
    device = next(run.model.parameters()).device
    labels = getattr(splits, f"{split}_labels")
    labels = None if labels is None else labels[rows].to(device)
    context = None
    asks = tuple(getattr(run.model, "context", ()))
    if asks:
        if asks != ("y",) or labels is None:
            what = "labels" if asks == ("y",) else ", ".join(asks)
            raise UserError(f"{run.run_dir}: the model is given {what}, which the {split} split of {splits.name} lacks")
        context = {"y": labels}
    return EvalData(data.to(device), context, labels)


def _cmd_eval(args: argparse.Namespace) -> int:
    from vaelab.diagnostics import diagnostics
    from vaelab.evaluate import evaluate_model, format_classification, format_evaluation, is_latent_model
    from vaelab.report import as_json

    _check_at_least_one(args, "k", "examples", "diagnostics_examples", "batch_size", "classify_k")
    start = time.perf_counter()
    run = _load(args.run_dir, args.checkpoint)
    x, context, labels = _eval_data(run, args.split, args.examples, args.seed)
    torch_seed(args.seed)
    progress = not args.no_progress
    options = dict(k=args.k, batch_size=args.batch_size, progress=progress, compile=args.compile, context=context)
    result = {}
    if is_latent_model(run.model):
        if args.fast:
            result = as_json(evaluate_model(run.model, x, **options))
        else:
            result = as_json(diagnostics(run.model, x, examples=args.diagnostics_examples, **options))
        result.update(_baselines(run, x))
    result.update(_classification(run, x, labels, args.split, progress=progress, k=args.classify_k))
    result.update(run_dir=str(args.run_dir), split=args.split, weights=str(run.weights), seed=args.seed)
    result["seconds"] = time.perf_counter() - start  # wall time from loading the run to its last number
    if context is not None:
        result["given"] = sorted(context)
    print(f"{args.run_dir} on {run.config.dataset} {args.split}{_given(context)}:")
    if is_latent_model(run.model):
        print(format_evaluation(result))
    if "classification" in result:
        print(format_classification(result["classification"]))
    if "marginal" in result:
        print(_format_marginal(result["marginal"]))
    out = args.json or str(Path(args.run_dir) / f"eval_{args.split}.json")
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"results written to {out}")
    return 0


CLASSIFY_K = 10  # importance samples per class for a generative classifier's p(x|y=c) (eval --classify-k)


def _classification(run, x, labels, split: str, *, progress: bool, **classify_options) -> dict:
    """``{"classification": classification_metrics(...)}`` of a model that predicts labels (has ``classify``) on the
    examples ``x`` of ``split`` and their ``labels`` (both from :func:`_eval_data`); ``{}`` for other models.

    A model of p(x|y) (``context = ("y",)``, e.g. a cvae) classifies by Bayes' rule from log p(x, y=c) for every c
    (:func:`vaelab.conditional.generative_log_probs`, IWAE with ``k`` = ``classify_options["k"]``, default
    :data:`CLASSIFY_K`, samples per class); the same numbers give ``"marginal"``: log p(x) = logsumexp_c, log p(x|y)
    of the true label and their difference, the nats the label carries (each summarized over examples). A
    semi-supervised model (m2) classifies with its own q(y|x) and gives ``"marginal"`` from its ``generative`` part."""
    from vaelab.evaluate import class_log_probs, classification_metrics

    if not callable(getattr(run.model, "classify", None)):
        return {}
    if labels is None:
        raise UserError(
            f"{run.run_dir}: the model predicts labels, which the {split} split of {run.config.dataset} lacks"
        )
    k = classify_options.get("k", CLASSIFY_K)
    batch_size = classify_options.get("batch_size", 100)
    if tuple(getattr(run.model, "context", ())) != ("y",):
        # k is the generative classifier's (importance samples per class): a discriminative p(y|x) has none
        options = {key: value for key, value in classify_options.items() if key != "k"}
        log_probs = class_log_probs(run.model, x, progress=progress, **options)
        result = {"classification": classification_metrics(log_probs, labels)}
        generative = getattr(run.model, "generative", None)  # a semi-supervised model's p(x|y) (m2): its log p(x)
        if tuple(getattr(generative, "context", ())) == ("y",):
            result["marginal"] = _marginal(generative, x, labels, k=k, batch_size=batch_size)[1]
        return result
    joint, marginal = _marginal(run.model, x, labels, k=k, batch_size=batch_size)
    return {"classification": classification_metrics(joint.log_softmax(-1), labels), "marginal": marginal}


def _marginal(model, x, labels, *, k: int, batch_size: int):
    """log p(x, y=c) ``[N, C]`` of a model of p(x|y) (:func:`vaelab.conditional.generative_log_probs`, IWAE_k per
    class), and ``"marginal"``: log p(x) = logsumexp_c, log p(x|y) of the true label and their difference, the nats
    the label carries (each summarized over examples)."""
    import torch

    from vaelab.conditional import class_log_prior, generative_log_probs
    from vaelab.evaluate import summarize

    with torch.no_grad():
        joint = generative_log_probs(model, x, k=k, batch_size=batch_size)  # [N, C]
    y = labels.to(joint.device)
    log_px = joint.logsumexp(-1)  # log p(x) = log sum_c p(x|c) p(c)
    log_px_given_y = joint.gather(1, y[:, None])[:, 0] - class_log_prior(model).to(joint)[y]
    marginal = {
        "k": k,
        "log_px": summarize(log_px),
        "log_px_given_y": summarize(log_px_given_y),
        "label_nats": summarize(log_px_given_y - log_px),  # = log p(y|x) - log p(y), per example
    }
    return joint, marginal


def _format_marginal(marginal: dict) -> str:
    """The lines ``vaelab eval`` prints for a model of p(x|y): log p(x|y), log p(x) and the label's nats."""
    rows = [f"  marginal over the labels (IWAE_{marginal['k']} per class; the same estimates in every line):"]
    for key, what in (
        ("log_px_given_y", "log p(x|y) of the true label"),
        ("log_px", "log p(x) = log sum_c p(x|c) p(c)"),
        ("label_nats", "nats the label carries, log p(x|y) - log p(x)"),
    ):
        rows.append(f"    {what}: {marginal[key]['mean']:.3f} ± {marginal[key]['sem']:.3f}")
    return "\n".join(rows)


def _given(context) -> str:
    """How a result over ``context`` reads: " given y" (conditional numbers, log p(x|y)) or nothing."""
    return "" if not context else f", given {', '.join(sorted(context))} (every number is conditional: log p(x|y))"


def _check_at_least_one(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _baselines(run, x) -> dict:
    """Every baseline of :data:`vaelab.baselines.BASELINES` for this run, as JSON: result or "not applicable: ..."."""
    from vaelab.baselines import run_baselines
    from vaelab.data import as_float
    from vaelab.estimators import latent_dim
    from vaelab.report import as_json

    def train():  # read only if a baseline applies
        return as_float(_load_splits(run.config, run.run_dir).train)

    return as_json(run_baselines(run.model, x, train, latent_dim(run.model)))


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


# Measured: `vaelab eval RUN` with defaults on a one-epoch iwae-1layer MNIST run, on the 2-core AMD EPYC this was
# developed on, while other jobs shared its CPU (load average 3-5): headline 12.2 min (37 images/s over the first
# 2000 images while the CPU was free: ~4.5 min for 10,000), then gap decomposition 3.5 min, ELBO forms 0.4 min,
# estimator study 1.2 min: 17.4 min in all. Re-measured with the CPU to itself (docs/performance.md, session 6):
# headline 4 min 05 s, diagnostics 68 s (gap decomposition 39 s, ELBO forms 7 s, estimator study 22 s), 319 s in all.
EVAL_COST = (
    "Cost with the defaults (k = 5000, 10,000 MNIST test images, 500 for the diagnostics) on a 2-core CPU: the "
    "headline numbers are k x examples = 5e7 decoder passes, about 4 minutes for a one-hidden-layer MLP with the "
    "CPU to itself (12 minutes when shared with other jobs); the diagnostics add about 1 minute (5 when shared). "
    "The headline scales with --k x --examples, the diagnostics with --diagnostics-examples; --fast skips them."
)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a run: ELBO forms, IWAE bounds, log p(x), latent usage",
        description="Evaluate a trained run on a data split: the three ELBO forms, IWAE bounds, "
        "log p(x) by importance sampling (with ESS and Pareto k-hat), the posterior gap, active units "
        "and KL per latent dimension on every example; unless --fast, the slow diagnostics (gap decomposition, "
        "ELBO-form variances, IWAE curve, naive vs importance-sampled log p(x)) on the first --diagnostics-examples. "
        "A diagnostic or baseline that does not apply to the model is written as 'not applicable: <reason>'. "
        "Binary models are evaluated on a fixed-seed binarization. " + EVAL_COST,
    )
    p.add_argument("run_dir", help="a run directory written by vaelab train")
    _add_estimation_flags(p, k=5000, examples=None, json_help="(default: RUN_DIR/eval_SPLIT.json)")
    p.add_argument("--split", choices=("test", "valid", "train"), default="test", help="(default: %(default)s)")
    p.add_argument(
        "--checkpoint",
        choices=("final", "best", "latest"),
        default="final",
        help="the weights to score: final (model.safetensors, or the latest checkpoint before it exists), best (the "
        "checkpoint with the best validation ELBO, kept when training validated: --eval-every; early stopping) or "
        "latest (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=100, help="(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_diagnostics_examples_flag(p)
    p.add_argument(
        "--fast",
        action="store_true",
        help="skip the slow diagnostics (gap decomposition into approximation and amortization gaps, IWAE curve, "
        "ELBO-form variances, naive-vs-IS study)",
    )
    p.set_defaults(func=_cmd_eval)


def _add_diagnostics_examples_flag(p) -> None:
    from vaelab.diagnostics import DIAGNOSTICS_EXAMPLES

    p.add_argument(
        "--classify-k",
        type=int,
        default=CLASSIFY_K,
        metavar="N",
        help="for a model of p(x|y) (cvae): importance samples per class of the generative classifier's p(x|y=c) "
        "and of the marginal log p(x); classes x N decoder passes per example (default: %(default)s)",
    )

    p.add_argument(
        "--diagnostics-examples",
        type=int,
        default=DIAGNOSTICS_EXAMPLES,
        metavar="N",
        help="run the slow diagnostics on the first N evaluated examples; the headline numbers use all of them "
        "(default: %(default)s)",
    )


def _add_estimation_flags(p, *, k: int, examples: int | None, json_help: str) -> None:
    """The flags of every command that estimates log p(x) (eval, report, compare)."""
    p.add_argument("--k", type=int, default=k, help="importance samples for log p(x) (default: %(default)s)")
    shown = "all" if examples is None else "%(default)s"
    p.add_argument(
        "--examples",
        type=int,
        default=examples,
        help=f"evaluate N examples spread evenly over the split (default: {shown})",
    )
    p.add_argument("--seed", type=int, default=0, help="binarization and sampling seed (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", default=None, help=json_help)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the log p(x) estimator: 1.3-2x faster per sample after a compilation of ~3-30 s "
        "(default: only when k x examples >= 5,000,000, where it pays; docs/performance.md)",
    )


def _cmd_sample(args: argparse.Namespace) -> int:
    from vaelab.evaluate import is_latent_model
    from vaelab.plots import sample_images, save_grid

    run = _load(args.run_dir)
    torch_seed(args.seed)
    out = args.out or str(Path(args.run_dir) / "samples.png")
    model = run.model
    if not is_latent_model(model) and is_latent_model(getattr(model, "generative", None)):
        model = model.generative  # a semi-supervised model (m2) draws from its p(x, z | y)
    asks = tuple(getattr(model, "context", ()))
    if not is_latent_model(model):
        raise UserError(f"{args.run_dir} ({run.config.model}) has no latent variables to sample from")
    if not asks:
        if args.label is not None:
            raise UserError(f"--class: {args.run_dir} ({run.config.model}) is not given a class (no context y)")
        images = sample_images(model, args.n)  # [n, *data_shape]
        what = "from the prior"
    else:
        classes = getattr(model, "classes", None)
        if asks != ("y",) or classes is None:
            raise UserError(f"{args.run_dir}: the model is given {', '.join(asks)}, which sample cannot choose")
        if args.label is not None and not 0 <= args.label < classes:
            raise UserError(f"--class {args.label}: the model's classes are 0..{classes - 1}")
        images = conditional_samples(model, args.n, args.label)
        what = f"given class {args.label}" if args.label is not None else f"of classes 0..{classes - 1} in turn"
    save_grid(out, images, images.shape[1:])
    print(f"{args.n} samples {what} written to {out}")
    return 0


def conditional_samples(model, n: int, label: int | None):
    """``n`` draws z ~ p(z|y), shown as E[x|z, y] (``[n, *data_shape]``), of a model given labels: y = ``label``
    for every draw, or (None) each of the model's classes in turn."""
    import torch

    from vaelab.models import bind
    from vaelab.plots import decoded_mean

    device = next(model.parameters()).device
    y = torch.full((n,), label) if label is not None else torch.arange(n) % model.classes
    with torch.no_grad():
        given = bind(model, {"y": y.to(device)})
        return decoded_mean(given, given.prior.sample())  # the prior has batch [n]: one z per label


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from vaelab.evaluate import is_latent_model
    from vaelab.models import bind
    from vaelab.plots import reconstruction_pairs, save_grid

    run = _load(args.run_dir)
    if not is_latent_model(run.model):
        raise UserError(f"{args.run_dir} ({run.config.model}) has no encoder of x alone to reconstruct with")
    x, context, _ = _eval_data(run, "test", args.n, args.seed)
    out = args.out or str(Path(args.run_dir) / "reconstructions.png")
    save_grid(out, reconstruction_pairs(bind(run.model, context), x), x.shape[1:], ncol=len(x))
    print(f"{len(x)} test images (top row) and their reconstructions (bottom row) written to {out}")
    return 0


def _add_pictures(sub) -> None:
    p = sub.add_parser("sample", help="image grid of samples from the prior (or given a class)")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=64, help="number of samples (default: %(default)s)")
    p.add_argument(
        "--class",
        dest="label",
        type=int,
        default=None,
        metavar="C",
        help="for a model given labels (cvae): sample given y = C (default: each class in turn)",
    )
    p.add_argument("--out", metavar="FILE.png", default=None, help="(default: RUN_DIR/samples.png)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.set_defaults(func=_cmd_sample)
    p = sub.add_parser("reconstruct", help="test images beside their reconstructions")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=16, help="number of test images (default: %(default)s)")
    p.add_argument("--out", metavar="FILE.png", default=None, help="(default: RUN_DIR/reconstructions.png)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.set_defaults(func=_cmd_reconstruct)


# --- report ------------------------------------------------------------------------------------------------------
def _cmd_report(args: argparse.Namespace) -> int:
    from vaelab.checkpoint import atomic_write_text
    from vaelab.diagnostics import diagnostics
    from vaelab.evaluate import is_latent_model
    from vaelab.plots import draw_pictures
    from vaelab.report import as_json, write_report

    _check_at_least_one(args, "k", "examples", "diagnostics_examples", "classify_k")
    run = _load(args.run_dir)
    run_dir = Path(args.run_dir)
    x, context, labels = _eval_data(run, "test", args.examples, args.seed)
    torch_seed(args.seed)
    progress = not args.no_progress
    found, result = None, {}
    if is_latent_model(run.model):
        found = diagnostics(
            run.model, x, k=args.k, examples=args.diagnostics_examples, slow=not args.fast, progress=progress,
            compile=args.compile, context=context,
        )  # fmt: skip
        result = as_json(found)
        result.update(_baselines(run, x))
    result.update(_classification(run, x, labels, "test", progress=progress, k=args.classify_k))
    result.update(run_dir=str(run_dir), split="test", weights=str(run.weights), seed=args.seed)
    if context is not None:
        result["given"] = sorted(context)
    json_path = Path(args.json) if args.json else run_dir / "diagnostics_test.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(result, indent=2))
    for path in sorted(run_dir.glob("ladder_*.json")):  # written by vaelab baselines --runs RUN
        result.setdefault("ladder", []).append(json.loads(path.read_text()))
    torch_seed(args.seed)
    pictures = draw_pictures(
        run.model, x, run_dir / "pictures", labels=labels, metrics=run.metrics, diagnostics=result, context=context
    )
    for path in sorted((run_dir / "pictures").glob("ladder_samples_*.png")):  # written by vaelab baselines
        pictures[path.stem] = path
    out = write_report(run, result, Path(args.out) if args.out else run_dir / "report.html", pictures=pictures)
    slow = "" if found is None else f" ({found.examples} for the slow ones)"
    print(f"diagnostics of {len(x)} test examples{slow} written to {json_path}")
    print(f"{len(pictures)} pictures written to {run_dir / 'pictures'}")
    print(f"report written to {out}")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML report of a run: diagnostics, pictures and what they mean",
        description="Evaluate a trained run on the test split with every diagnostic (ELBO forms and their variance, "
        "IWAE bounds against k, log p(x) with ESS and Pareto k-hat, the posterior gap split into approximation and "
        "amortization gaps, naive vs importance-sampled estimates, latent usage), draw the pictures into "
        "RUN_DIR/pictures, and write one HTML file with everything embedded, each number explained. The headline "
        "numbers use every test example, the slow diagnostics the first --diagnostics-examples. " + EVAL_COST,
    )
    p.add_argument("run_dir", help="a run directory written by vaelab train")
    p.add_argument("--out", metavar="FILE.html", default=None, help="(default: RUN_DIR/report.html)")
    _add_estimation_flags(p, k=5000, examples=None, json_help="(default: RUN_DIR/diagnostics_test.json)")
    _add_diagnostics_examples_flag(p)
    p.add_argument(
        "--fast", action="store_true", help="skip the slowest diagnostics (the estimator study stops at k = 1000)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_report)


def _cmd_compare(args: argparse.Namespace) -> int:
    from vaelab.evaluate import compare_latent_usage

    _check_at_least_one(args, "k", "examples")
    runs = []
    for run_dir in args.run_dirs:
        run = _load(run_dir)
        runs.append((str(run_dir), run, *_eval_data(run, "test", args.examples, args.seed)[:2]))
    torch_seed(args.seed)
    rows = compare_latent_usage(runs, k=args.k, compile=args.compile)
    by_name = {name: (run, x) for name, run, x, _ in runs}
    for r in rows:
        r.update(_baselines(*by_name[r["run"]]))
    print(
        f"{'run':<30} {'beta':>6} {'active':>7} {'KL total':>9} {'ELBO':>9} {'log p(x)':>9} {'sem':>5} "
        f"{'vs first run':>15}   (nats per example)"
    )
    for r in rows:
        beta = "-" if r["beta"] is None else f"{r['beta']:.3g}"
        kl = "-" if r["kl_total"] is None else f"{r['kl_total']:.2f}"
        paired = r["log_px_minus_first"]
        paired = "-" if paired is None else f"{paired['mean']:+.3f} ± {paired['sem']:.3f}"
        print(
            f"{r['run'][-30:]:<30} {beta:>6} {r['active_units']:>3}/{r['latent_dim']:<3} {kl:>9} "
            f"{r['elbo']['mean']:>9.2f} {r['log_px']['mean']:>9.2f} {r['log_px']['sem']:>5.2f} {paired:>15}"
        )
    print(
        f"vs first run: log p(x) minus that of {args.run_dirs[0]}, paired over the same test images (mean ± sem of "
        "the differences; '-': scored on other images)"
    )
    if args.json:
        from vaelab.report import as_json

        Path(args.json).write_text(json.dumps(as_json(rows), indent=2))
        print(f"results written to {args.json}")
    if args.out:
        from vaelab.plots import beta_comparison_figure, save_figure

        save_figure(beta_comparison_figure(rows), args.out)
        print(f"picture written to {args.out}")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare runs (e.g. a beta sweep): active units, KL per dimension, ELBO, log p(x), paired differences",
        description="Evaluate several runs on their test split and show how latent usage changes with the final KL "
        "weight beta of each run: active units, total KL(q || p(z)), ELBO and log p(x), and each run's log p(x) "
        "minus the first run's, paired over the same test images (same data, binarization and --seed): its "
        "standard error leaves out the spread between images, so it tells apart runs whose unpaired standard "
        "errors overlap.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by vaelab train")
    _add_estimation_flags(p, k=1000, examples=1000, json_help="write the rows as JSON (default: none)")
    p.add_argument("--out", metavar="FILE.png", default=None, help="picture of usage against beta (default: none)")
    p.set_defaults(func=_cmd_compare)


# --- baselines: the density-estimation ladder ------------------------------------------------------------------------
LADDER_PICTURE_SAMPLES = 10  # images per model in RUN/pictures/ladder_samples_SPACE.png


def _cmd_baselines(args: argparse.Namespace) -> int:
    from vaelab.autoencoder import autoencoder_row
    from vaelab.baselines import (
        BINARY,
        DEQUANTIZED,
        LadderSettings,
        format_ladder,
        ladder_data,
        parzen_rows,
        run_ladder,
        score_run,
    )
    from vaelab.checkpoint import atomic_write_text
    from vaelab.data import load_dataset
    from vaelab.plots import labelled_rows_figure, sample_images, save_figure, shows_as_images
    from vaelab.report import as_json

    _check_at_least_one(args, "examples", "valid_examples", "train_examples", "k")
    if any(n < 1 for n in args.parzen_draws) or args.autoencoder_steps < 0:
        raise UserError(
            f"--parzen-draws must be numbers >= 1 (got {args.parzen_draws}) and --autoencoder-steps >= 0 "
            f"(got {args.autoencoder_steps})"
        )
    runs = [(str(run_dir), _load(run_dir)) for run_dir in args.runs]
    splits = load_dataset(args.dataset, data_dir=args.data_dir, validation_size=args.validation_size)
    space = args.space
    if space == "auto":  # binary data, or grey data that every run binarizes; else dequantized grey data
        binarizing = bool(runs) and all(run.config.binarizes for _, run in runs)
        space = BINARY if splits.binary or binarizing else DEQUANTIZED
    data = ladder_data(splits, space, examples=args.examples, valid_examples=args.valid_examples, seed=args.seed)
    grids = {"bandwidth": args.bandwidths, "components": args.components, "latent_dim": args.latent_dims}
    settings = LadderSettings(
        train_examples=args.train_examples,
        grids={name: tuple(grid) for name, grid in grids.items() if grid is not None},
        seed=args.seed,
        device=args.device,
    )
    used = len(data.train) if args.train_examples is None else min(args.train_examples, len(data.train))
    subset = f"a random {used} of the {len(data.train)}" if used < len(data.train) else "all"
    print(
        f"{splits.name}: {len(data.train)} training, {len(data.valid)} validation, {len(data.test)} test examples; "
        f"the slow fits (KDE, mixtures, factor analysis) use {subset} of the training examples, pPCA all of them"
    )
    torch_seed(args.seed)
    pictured = bool(runs) and shows_as_images(data.data_shape)
    rows = run_ladder(data, args.baselines, settings, samples=LADDER_PICTURE_SAMPLES if pictured else 0)
    drawn = [(row["name"], row.pop("samples")) for row in rows if "samples" in row]  # x ~ p(x) of each baseline
    for name, run in runs:
        rows.append(score_run(name, run, data, k=args.k, dataset=str(args.dataset)))
        vae_row = rows[-1]
        if "not_comparable" in vae_row:
            continue
        rows += parzen_rows(name, run, data, samples=args.parzen_draws, seed=args.seed) if args.parzen_draws else []
        pictures = [("VAE, E[x|z]", sample_images(run.model, LADDER_PICTURE_SAMPLES))]
        if args.autoencoder_steps:
            row, autoencoder = autoencoder_row(name, run, data, steps=args.autoencoder_steps, seed=args.seed)
            rows.append(row)
            pictures.append(("autoencoder, E[x|z]", autoencoder.sample(LADDER_PICTURE_SAMPLES, seed=args.seed)))
        if pictured:
            title = f"Samples on the {data.space} ladder\nthe networks' E[x|z], the baselines' draws x ~ p(x)"
            figure = labelled_rows_figure(pictures + drawn, data.data_shape, title)
            picture = save_figure(figure, Path(name) / "pictures" / f"ladder_samples_{data.space}.png")
            vae_row["samples_picture"] = str(picture)
            print(f"samples of every model, one row each: {picture}")
    print(format_ladder(rows, data.space, data.split))
    out = Path(args.json or f"baselines_{splits.name}_{data.space}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "dataset": splits.name,
        "space": data.space,
        "split": data.split,
        "settings": vars(settings),
        "rows": rows,
    }
    out.write_text(json.dumps(as_json(record), indent=2))
    print(f"results written to {out}")
    for name, _ in runs:  # beside each run too, where vaelab report finds it
        if any(row["name"] == name and "not_comparable" not in row for row in rows):
            atomic_write_text(Path(name) / f"ladder_{data.space}.json", json.dumps(as_json(record), indent=2))
    return 0


def _add_baselines(sub) -> None:
    from vaelab.baselines import BASELINES, PARZEN_SAMPLES

    on_ladder = [name for name, b in BASELINES.items() if b.spaces]
    p = sub.add_parser(
        "baselines",
        help="the density-estimation ladder: KDE, mixtures, pPCA, factor analysis and VAE runs on the same test images",
        description="Fit every classic density model that applies to the data on the training split, tune it on the "
        "validation split and score the test split, in one space: binary data in nats per example; 8-bit grey data "
        "dequantized, (x + u) / 256 on [0,1]^D, in nats and bits/dim (docs/baselines.md). Each --runs VAE is scored "
        "on the same test images (log p(x) with --k importance samples, or its eval_test.json where that scored "
        "exactly these images); a number on another space or split is printed as 'not comparable'. Cost with the "
        "defaults on 2 CPU cores: about 3 minutes on dequantized MNIST (the full-covariance mixture 2 of them), "
        "1.2 minutes on binarized MNIST.",
    )
    p.add_argument("--dataset", required=True, help="a registered data set name or a data path")
    p.add_argument("--data-dir", default=None, help="a folder to search first (default: the usual places)")
    p.add_argument("--runs", nargs="*", default=[], metavar="RUN_DIR", help="VAE runs to score (default: none)")
    p.add_argument(
        "--validation-size",
        type=int,
        default=10000,
        help="training images held out for validation where the data set has no fixed split, as in vaelab train "
        "(default: %(default)s)",
    )
    p.add_argument("--examples", type=int, default=1000, help="N test images, spread evenly (default: %(default)s)")
    p.add_argument(
        "--valid-examples",
        type=int,
        default=1000,
        help="N validation images (spread evenly) to tune on (default: %(default)s)",
    )
    p.add_argument(
        "--train-examples",
        type=_optional(int),
        default=10000,
        help="random training subset for the slow fits, 'none' for all (default: %(default)s)",
    )
    p.add_argument(
        "--space",
        choices=("auto", "binary", "dequantized"),
        default="auto",
        help="binary, or dequantized 8-bit grey (default: auto: binary for binary data or when every run binarizes)",
    )
    p.add_argument(
        "--baselines", nargs="+", metavar="NAME", default=None,
        help=f"which baselines, of {', '.join(on_ladder)} (default: every one for the space)",
    )  # fmt: skip
    p.add_argument("--bandwidths", type=float, nargs="+", default=None, help="KDE's first bandwidth grid")
    p.add_argument("--components", type=int, nargs="+", default=None, help="mixture sizes K to try")
    p.add_argument("--latent-dims", type=int, nargs="+", default=None, help="pPCA / factor analysis sizes to try")
    p.add_argument(
        "--k", type=int, default=100, help="importance samples for each run's log p(x) (default: %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="binarization, dequantization and fit seed (default: %(default)s)"
    )
    p.add_argument(
        "--parzen-draws", type=int, nargs="*", default=list(PARZEN_SAMPLES), metavar="N",
        help="for each run, Parzen-window estimates (a KDE of N model draws, bandwidth by validation: the GAN-era "
        "protocol) beside its log p(x); none given: skip (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--autoencoder-steps", type=int, default=2000,
        help="for each run, train a deterministic autoencoder with its networks for this many steps and show its "
        "reconstruction error beside the VAE's, and its samples in RUN/pictures/ladder_samples_SPACE.png (one row "
        "each for the VAE, the autoencoder and every baseline); 0: skip (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="device of the torch fits, e.g. cuda (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", default=None, help="(default: baselines_DATASET_SPACE.json)")
    p.set_defaults(func=_cmd_baselines)


# Registry of subcommands: name -> function adding its parser.
COMMANDS: dict[str, Callable] = {
    "check": _add_check,
    "train": _add_train,
    "eval": _add_eval,
    "sample/reconstruct": _add_pictures,
    "report": _add_report,
    "compare": _add_compare,
    "baselines": _add_baselines,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaelab", description="Deep latent-variable models trained by the ELBO.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:  # building the parser and the imports below load torch: seconds, and Ctrl-C then is no error to trace
        args = build_parser().parse_args(argv)
        from vaelab._malloc import keep_freed_memory
        from vaelab.runs import RunInUse
        from vaelab.train import TrainingDiverged
    except KeyboardInterrupt:
        print("vaelab: interrupted", file=sys.stderr)
        if argv is None:  # this process is the command line: leave now, with the status a shell expects
            # CPython before 3.12 flags a KeyboardInterrupt raised inside some C-level PyRun_* call during an import
            # (torch's) as unhandled even once caught here, and at exit kills itself with SIGINT instead (status -2
            # where 130 is due: seen with Ctrl-C 1.6 s into `vaelab train --help` on a loaded machine). Nothing is
            # open yet, so skipping the interpreter's shutdown loses nothing.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130

    keep_freed_memory()  # the command line opts in to glibc keeping freed memory (vaelab._malloc): eager log p(x)

    try:
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError, PermissionError, TrainingDiverged, RunInUse) as err:
        if args.debug:
            raise
        print(f"vaelab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vaelab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
