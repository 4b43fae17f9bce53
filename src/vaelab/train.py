"""Training: one readable loop, a config saved with every checkpoint, and nothing lost on a crash.

The loop, per step: draw the batch (a fixed permutation per epoch, so the data order is a pure function of seed and
step; one index for every key of the data: ``x`` and any side input such as labels ``y``; for a semi-supervised
model, a fixed share from the labelled rows, also a pure function of seed and step: ``Trainer._labelled_split``),
binarize it on the device if asked, evaluate the per-example objective (on ``model.given(**context)`` when the model
asks for context), reduce once (mean), backward, clip, optimizer step. Which step runs (eager, compiled objective, or
the whole step as one compiled graph) is chosen once, in ``__init__`` (:mod:`vaelab.steps`). Around it: the KL
schedule and learning rate as pure functions of the step, metrics to JSONL and TensorBoard, evaluation on a validation
set, atomic checkpoints (:mod:`vaelab.checkpoint`), exact resume, a clean stop on Ctrl-C / SIGTERM, and a stop naming
the term and step when anything turns non-finite.

On CPU, a run interrupted (even by SIGKILL) and resumed from its last checkpoint ends with weights bit-identical to an
uninterrupted run with the same seed: every source of randomness is either a function of (seed, step) or an RNG whose
state is in the checkpoint, and evaluation draws from a forked RNG so it never perturbs training.

Distributed: the same code runs under ``torchrun --nproc_per_node N`` (gloo on CPU, nccl on GPU). Each rank takes an
equal slice of every global batch (``batch_size`` is global), gradients are averaged across ranks with one all-reduce
of the flattened gradient per step (the arithmetic of DistributedDataParallel; the objectives call ``encode`` and
``decode`` directly, which DDP's forward hooks would not see), metrics are averaged across ranks, and only rank 0
evaluates and writes files. Resume restores rank 0's RNG state on every rank, so a resumed multi-process run is
statistically, not bitwise, the same as an uninterrupted one.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributions import constraints

from vaelab._loop import RunLog, install_signal_handlers, progress_bar, restore_signal_handlers
from vaelab.checkpoint import (
    CheckpointError,
    atomic_write_text,
    complete_checkpoints,
    remove_leftovers,
    restore_optimizer,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from vaelab.config import AUTO_COMPILE_SAMPLES, LR_DECAYS, PRESETS, TrainConfig, build_model, resolve_device
from vaelab.data import (
    UNLABELLED,
    Data,
    aligned_fields,
    as_float,
    binarize_fixed,
    binarize_with_bits,
    mean_example,
    partly_labelled,
    spread,
)
from vaelab.distributed import all_ranks, init_distributed, mean_over_ranks
from vaelab.estimators import ElboForm, check_values, data_support, elbo_parts, log_marginal, trusted_data
from vaelab.likelihoods import LIKELIHOODS
from vaelab.models import bind
from vaelab.nets import init_decoder_bias
from vaelab.objectives import OBJECTIVES
from vaelab.optimizers import make_optimizer
from vaelab.runs import (
    Run,
    RunLock,
    check_weights,
    latest_checkpoint,
    load_run,
    resume_checkpoint,
    truncate_metrics,
)
from vaelab.schedules import make_schedule
from vaelab.steps import TrainingDiverged, make_step

# The training API in one import (the config, presets and run loading live in vaelab.config and vaelab.runs)
__all__ = [
    "AUTO_COMPILE_SAMPLES",
    "PRESETS",
    "Run",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "build_model",
    "latest_checkpoint",
    "load_run",
    "resolve_device",
    "train",
]


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns: the run directory, the last step, the stopping signal's name (None when the
    run ended), and the last validation metrics (None if none ran)."""

    run_dir: Path
    step: int
    interrupted: str | None  # the signal's name if stopped by one
    last_eval: dict[str, Any] | None


def start_from_data(model: nn.Module, config: TrainConfig, x) -> None:
    """What a freshly built model takes from its training examples ``x`` before step 0: the decoder's last bias at
    the data mean, by the likelihood's rule, on the network the model says produces its parameters
    (``config.init_decoder_bias``; models without ``output_net`` are left alone), and a prior's own start from the
    data (the VampPrior's pseudo-inputs, ``prior_module.init_from_data``)."""
    likelihood = getattr(model, "likelihood", None)
    likelihood = LIKELIHOODS[config.likelihood] if likelihood is None else likelihood
    output_net = getattr(model, "output_net", None)
    if config.init_decoder_bias and output_net is not None and likelihood.bias_from_mean is not None:
        init_decoder_bias(output_net, mean_example(x).clamp(0, 1), likelihood)
    init_prior = getattr(getattr(model, "prior_module", None), "init_from_data", None)
    if init_prior is not None:
        init_prior(x)


class Trainer:
    """Owns the model, optimizer, schedules, data order and run directory. ``fit()`` runs to the end or to a signal.

    Args:
        config: the run's :class:`TrainConfig`.
        train_data: ``x [N, *data_shape]`` (float in [0, 1] or the like, or uint8 0-255, converted per batch), or a
            dict of tensors aligned with it (``{"x": x, "y": labels}``): batches take the same rows of each.
        valid_data: the same for validation, or ``None``.
        run_dir: where config, metrics, TensorBoard logs, checkpoints and final weights go. Locked from here until
            ``fit()`` ends (:class:`~vaelab.runs.RunLock`): a second Trainer on it raises ``RunInUse``.
        resume: continue from the run directory's latest checkpoint (its saved config wins).
        model: a model built by hand (the :mod:`vaelab.models` interface); None: ``build_model(config, data_shape)``.
            Its weights are used as given (no decoder-bias initialisation); :func:`~vaelab.runs.load_run` can rebuild
            it only if its class is registered (:func:`vaelab.models.register_model`) and named by ``config.model``.
            A model whose ``context`` names batch keys (e.g. ``("y",)``) is trained and validated as
            ``model.given(y=batch["y"])``. A model with ``labelled_share`` (e.g. "m2") trained on labels of which
            some are :data:`~vaelab.data.UNLABELLED` (-1; ``config.labels`` hides all but a balanced few) gets batches
            with that share of labelled rows and a ``weight`` per row (:meth:`_labelled_split`).
    """

    def __init__(
        self,
        config: TrainConfig,
        train_data: Data,
        valid_data: Data | None,
        run_dir: str | Path,
        *,
        resume: bool = False,
        model: nn.Module | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # One writer per run directory: the lock comes before anything there is read, written or removed, and is
        # held until fit() ends (rank 0 only, the one rank that writes)
        self._lock = RunLock(self.run_dir) if int(os.environ.get("RANK", "0")) == 0 else None
        try:
            self._setup(config, train_data, valid_data, resume=resume, model=model)
        except BaseException:
            self._release()
            raise

    def _setup(
        self, config: TrainConfig, train_data: Data, valid_data: Data | None, *, resume: bool, model: nn.Module | None
    ) -> None:
        # What a killed save left (.step_N.tmp, .best.old) is no checkpoint: cleared first, so that a crash during
        # the first save never leaves a directory that can neither resume nor start afresh
        if self._lock is not None:
            remove_leftovers(self.ckpt_dir)
        found = resume_checkpoint(self.run_dir) if resume else None
        if resume and found is None:
            raise CheckpointError(f"--resume: no checkpoint found in {self.ckpt_dir}")
        resume_from = found[0] if found is not None else None
        if found is not None:  # resume=True (without a checkpoint it raised above)
            config = TrainConfig.from_dict(found[1][2]["config"])
        elif complete_checkpoints(self.ckpt_dir):
            raise ValueError(f"{self.run_dir} already holds a run: pass resume=True (--resume) or use a new directory")
        self.config = config
        self.device = resolve_device(config.device)
        self._owns_group = not (dist.is_available() and dist.is_initialized())  # else the caller's group: left alone
        self.rank, self.world = init_distributed(self.device)
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {self.world} processes")
        self.train_data = aligned_fields(train_data, "train_data", self.device)
        self.valid_data = aligned_fields(valid_data, "valid_data", self.device)
        if config.labels is not None:  # semi-supervised: all but a balanced few labels hidden (y = UNLABELLED)
            if "y" not in self.train_data:
                raise ValueError(f"labels={config.labels} keeps some training labels, but the training data have none")
            self.train_data["y"] = partly_labelled(self.train_data["y"], config.labels, config.seed)
        n = len(self.train_data["x"])
        self.data_shape = tuple(self.train_data["x"].shape[1:])
        self.batch_size = min(config.batch_size, n)
        self.steps_per_epoch = n // self.batch_size
        total = config.epochs * self.steps_per_epoch
        self.total_steps = total if config.max_steps is None else min(config.max_steps, total or config.max_steps)
        if config.max_steps is not None and config.epochs == 0:
            self.total_steps = config.max_steps
        self.eval_every = config.eval_every or self.steps_per_epoch
        self.checkpoint_every = config.checkpoint_every or self.steps_per_epoch

        torch.manual_seed(config.seed)
        built = model is None
        self.model = (build_model(config, self.data_shape) if model is None else model).to(self.device)
        self.context = tuple(getattr(self.model, "context", ()))
        # the batch fields the model reads: x, what it is given (context) and what it predicts (targets, e.g. a
        # classifier's labels); other fields of the data stay unread
        self.fields = tuple(dict.fromkeys(("x", *self.context, *getattr(self.model, "targets", ()))))
        for name, data in (("train_data", self.train_data), ("valid_data", self.valid_data)):
            missing = [key for key in self.fields if data is not None and key not in data]
            if missing:
                raise ValueError(f"the model reads {', '.join(missing)}, which {name} does not hold")
        self._labelled_split()
        # Values are checked once here, not on every batch (the steps then run inside estimators.trusted_data()).
        first = {key: self.train_data[key][:1].to(self.device) for key in self.fields}
        support, support_name = data_support(bind(self.model, first), as_float(first["x"])), None
        if config.binarizes:
            support, support_name = constraints.unit_interval, "[0, 1] (it is binarized at every step)"
        for name, data in (("train_data", self.train_data), ("valid_data", self.valid_data)):
            if data is not None:
                check_values(data["x"], support, name=name, support_name=support_name)
        if built and resume_from is None:
            start_from_data(self.model, config, self.train_data["x"])
        if self.world > 1:
            for tensor in self.model.state_dict().values():
                dist.broadcast(tensor, src=0)  # identical start on every rank
            torch.manual_seed(config.seed + 1_000_003 * self.rank)  # but independent noise per rank
        self.optimizer = make_optimizer(config.optimizer, self.model.parameters(), config.lr, config.optimizer_options)
        self.objective = OBJECTIVES[config.objective]
        self.objective_options = dict(config.objective_options)
        if "form" in inspect.signature(self.objective).parameters:
            self.objective_options.setdefault("form", config.form)
        self.schedule = make_schedule(config.schedule, **config.schedule_options)
        self.compiles = config.compile
        if self.compiles is None:
            self.compiles = self.total_steps * self.batch_size >= AUTO_COMPILE_SAMPLES
        self.take_step = make_step(self)  # (batch, sched, lr) -> stats: eager, compiled objective, or whole step
        self.step, self.best_elbo = 0, -math.inf
        self.last_eval: dict[str, Any] | None = None
        # the train statistics summed over the steps since the last train metric line (saved with checkpoints, so
        # that the first line after a resume averages the same steps as an uninterrupted run's)
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._stop: str | None = None
        self._perm: tuple[int, torch.Tensor] | None = None
        self._pass_perms: dict[tuple[int, int], torch.Tensor] = {}  # the labelled sampler's current permutations
        if found is not None:
            self._restore(*found)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    # --- state ---------------------------------------------------------------------------------------------------
    def _restore(self, directory: Path, loaded: tuple[dict, dict, dict]) -> None:
        weights, tensors, meta = loaded  # load_run_checkpoint(directory), read once by resume_checkpoint
        check_weights(self.model, weights, directory / "model.safetensors")
        self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        try:
            restore_optimizer(self.optimizer, tensors, meta)
        except (ValueError, KeyError, TypeError, RuntimeError) as err:  # torch's own message, on its own line
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{directory / 'state.json'}: the optimizer state does not fit ({reason})") from None
        set_rng_state(tensors)
        self.step, self.last_eval = meta["step"], meta.get("last_eval")
        self.best_elbo = meta.get("best_elbo", -math.inf)
        sums = meta.get("log_sums", {})  # absent from checkpoints written before they were saved: lines restart
        self._sums = {k: torch.tensor(v, dtype=getattr(torch, d), device=self.device) for k, (v, d) in sums.items()}
        self._count = meta.get("log_count", 0)
        truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        print(f"resumed from {directory} at step {self.step}", file=sys.stderr)

    def save(self, name: str | None = None) -> Path:
        """Write a checkpoint (weights, optimizer, RNG, step, config) as ``checkpoints/<name>`` (default: the step's);
        a step checkpoint also becomes ``latest.json``'s. Returns its directory."""
        directory = self.ckpt_dir / (name or f"step_{self.step:08d}")
        meta = {
            "config": asdict(self.config),
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "best_elbo": self.best_elbo,
            "last_eval": self.last_eval,
            "data_shape": list(self.data_shape),
            # exact: a float32 or bfloat16 value is a JSON (double) number without rounding
            "log_sums": {k: [v.tolist(), str(v.dtype).removeprefix("torch.")] for k, v in self._sums.items()},
            "log_count": self._count,
        }
        save_checkpoint(directory, model=self.model, optimizer=self.optimizer, meta=meta)
        if name is None:
            atomic_write_text(self.ckpt_dir / "latest.json", json.dumps({"checkpoint": directory.name}))
            for old in sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())[: -self.config.keep_last]:
                shutil.rmtree(old)
        return directory

    # --- one step --------------------------------------------------------------------------------------------------
    def _labelled_split(self) -> None:
        """Set up the labelled sampler, for a model that states ``labelled_share`` (the share of every batch drawn
        from the labelled rows) trained on data where some rows of ``y`` are :data:`~vaelab.data.UNLABELLED`.

        Drawn uniformly, a batch would rarely hold a labelled row (100 labels among 50,000 images: one batch of 100
        in five has one). So each batch takes ``m`` rows from the labelled pool and ``B - m`` from the unlabelled
        one, ``m = round(share * B)`` (at least 1, at most B - 1), and each row carries the importance weight
        ``weight = (its pool's share of the data) / (its pool's share of the batch)``, with which the batch mean of a
        per-row quantity stays an unbiased estimate of its mean over the training set."""
        self._pools: tuple[torch.Tensor, torch.Tensor] | None = None
        share = getattr(self.model, "labelled_share", None)
        if self.config.labels is not None and share is None:
            raise ValueError(f"{type(self.model).__name__} does not train on partly labelled data (no labelled_share)")
        if share is None or "y" not in self.train_data:
            return
        if not 0 < share < 1:
            raise ValueError(f"{type(self.model).__name__}.labelled_share must be in (0, 1), got {share!r}")
        if not callable(getattr(self.model, "training_objective", None)):  # the one reader of batch["weight"]
            raise ValueError(
                f"{type(self.model).__name__} has a labelled_share but no training_objective to weigh rows"
            )
        y = self.train_data["y"].cpu()
        labelled, unlabelled = (y != UNLABELLED).nonzero()[:, 0], (y == UNLABELLED).nonzero()[:, 0]
        if len(labelled) == 0:
            raise ValueError(
                "the training data hold no labelled row (every y is -1): nothing to learn the classes from"
            )
        if len(unlabelled) == 0:  # fully labelled: uniform batches already hold labelled rows
            return
        if self.batch_size < 2:
            raise ValueError("a batch of labelled and unlabelled rows needs batch_size >= 2")
        m = min(max(round(share * self.batch_size), 1), self.batch_size - 1)
        n = len(y)
        weights = (len(labelled) / n) / (m / self.batch_size), (len(unlabelled) / n) / (1 - m / self.batch_size)
        self._pools = (labelled, unlabelled)
        self._pool_rows = (m, self.batch_size - m)
        self._pool_weights = torch.tensor([weights[0]] * m + [weights[1]] * (self.batch_size - m))

    def _stream(self, pool: int, step: int) -> torch.Tensor:
        """The rows pool ``pool`` gives batch ``step``: positions ``step * m ... step * m + m - 1`` of an endless
        sequence of permutations of the pool, pass p's drawn from a generator seeded with (seed, pool, p). A pure
        function of (seed, step), as the uniform batches are: exact resume needs no sampler state."""
        if self._pools is None:
            raise RuntimeError("the labelled sampler is not set up: the model names no labelled_share")
        rows, count = self._pools[pool], self._pool_rows[pool]
        position = torch.arange(step * count, (step + 1) * count)
        passes = position // len(rows)
        out = torch.empty(count, dtype=torch.int64)
        for p in passes.unique().tolist():
            key = (pool, p)
            if key not in self._pass_perms:
                g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + p + ((pool + 1) << 60))
                self._pass_perms = {k: v for k, v in self._pass_perms.items() if k[0] != pool or k[1] >= p - 1}
                self._pass_perms[key] = torch.randperm(len(rows), generator=g)
            here = passes == p
            out[here] = rows[self._pass_perms[key][position[here] % len(rows)]]
        return out

    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        if self._pools is not None:  # labelled rows first, then unlabelled ones, each with its weight
            idx = torch.cat([self._stream(0, step), self._stream(1, step)]).to(self.device)[self.rank :: self.world]
            weight = self._pool_weights[self.rank :: self.world].to(self.device)
        else:
            epoch, i = divmod(step, self.steps_per_epoch)
            if self._perm is None or self._perm[0] != epoch:
                g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
                self._perm = (epoch, torch.randperm(len(self.train_data["x"]), generator=g).to(self.device))
            idx = self._perm[1][i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.world]  # this rank's
            weight = None
        # x and the context the model asks for (other fields stay unread); index_select: the rows data[idx], faster;
        # .to: a no-op but for a memory-mapped source (data.MappedRows), read on the host
        batch = {key: self.train_data[key].index_select(0, idx).to(self.device) for key in self.fields}
        batch["x"] = as_float(batch["x"])  # 8-bit data become float here, unbinarized
        if weight is not None:
            batch["weight"] = weight.to(batch["x"].dtype)
        return batch

    def bind(self, batch: Mapping[str, torch.Tensor]) -> nn.Module:
        """The model the objectives see: ``model.given(**context)`` if the model asks for context, else the model."""
        return bind(self.model, batch)

    def objective_outputs(self, batch, sched: dict[str, Any], bits: torch.Tensor | None = None):
        """The objective on a batch: loss, elbo, recon, kl (what the compiled steps compile). With ``bits``
        (:func:`vaelab.data.random_bits`), ``x`` is binarized first: compiled, in the same fused pass.

        A model with its own training rule (``model.training_objective(batch, objective, **options)``, e.g. a
        classifier or a semi-supervised model that sums the objective over the classes) gets the whole batch and
        the config's objective; every other model is trained on ``objective(bind(model, batch), x, ...)``. Batches
        of the labelled sampler (:meth:`_labelled_split`) also hold ``weight [B]``, each row's importance weight,
        which the model's training_objective applies to its per-row bound terms."""
        x = batch["x"] if bits is None else binarize_with_bits(batch["x"], bits)
        options = dict(k=self.config.k, **sched, **self.objective_options)
        own = getattr(self.model, "training_objective", None)
        if own is not None:
            out = own({**batch, "x": x}, self.objective, **options)
        else:
            out = self.objective(self.bind(batch), x, **options)
        return out.loss, out.elbo, out.recon, out.kl

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step on the step's batch, at the step's beta and learning rate; returns its metrics (batch
        sums). Raises :class:`TrainingDiverged`, naming the step, on a non-finite value or a rejected batch."""
        step = self.step
        lr = self.config.lr * LR_DECAYS[self.config.lr_decay](step, self.total_steps)
        try:
            stats = self.take_step(self._batch(step), self.schedule.objective_kwargs(step), lr)
        except TrainingDiverged as err:
            raise TrainingDiverged(f"step {step}: {err}") from None
        except ValueError as err:
            raise TrainingDiverged(f"step {step}: the batch was rejected: {err}") from err
        self.step += 1
        return stats

    # --- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, data: Data | None = None, *, split: str = "valid") -> dict[str, Any]:
        """Validation ELBO (the config's form, 1 sample) and IWAE_k bound (k = eval_k), nats per example, and the
        seconds the pass took (``eval_k`` x ``eval_examples`` decoder passes: with the defaults ~25 % of the time of
        an epoch of compiled iwae-1layer MNIST training; cheaper with smaller ``eval_k`` / ``eval_examples``, and
        rarer with a larger ``eval_every``). A model that asks for context is evaluated given each example's."""
        data = self.valid_data if data is None else aligned_fields(data, "data", self.device)
        if data is None:
            return {}
        rows = spread(len(data["x"]), self.config.eval_examples).to(self.device)  # the whole split: files are ordered
        n = len(rows)
        data = {key: data[key].index_select(0, rows).to(self.device) for key in self.fields}
        data["x"] = as_float(data["x"])
        if self.config.binarizes:  # one fixed binarization of the evaluation set, the same at every evaluation
            data["x"] = binarize_fixed(data["x"], seed=self.config.seed + 7919)
        scores: dict[str, list[torch.Tensor]] = {}
        start = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), trusted_data():  # RNG of training untouched
            torch.manual_seed(self.config.seed + self.step)
            self.model.eval()
            for begin in range(0, n, self.batch_size):
                batch = {key: value[begin : begin + self.batch_size] for key, value in data.items()}
                for key, value in self.validation_scores(batch).items():
                    scores.setdefault(key, []).append(value)
            self.model.train()
        return {
            "split": split,
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            **{key: torch.cat(values).double().mean().item() for key, values in scores.items()},
            "examples": n,
            "seconds": time.perf_counter() - start,  # after the .item() calls above: the work is done, also on a GPU
        }

    def validation_scores(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-example validation numbers on a batch, ``[B]`` each: ``elbo`` (1 sample, the config's form; the best
        checkpoint is the one with the highest mean) and the IWAE bound ``iwae_<eval_k>``. A model with its own
        (``model.validation_scores(batch, k=eval_k, form=...)``, e.g. a classifier's log p(y|x) as ``elbo`` and its
        accuracy) gives those instead."""
        k, form = self.config.eval_k, self.config.form
        own = getattr(self.model, "validation_scores", None)
        if own is not None:
            return own(batch, k=k, form=form)
        model, x = self.bind(batch), batch["x"]
        return {
            "elbo": elbo_parts(model, x, k=1, form=cast(ElboForm, form)).elbo,  # TrainConfig.validate checked it
            # compiled too once the step has compiled (a working compiler): ~1.4x faster per sample
            f"iwae_{k}": log_marginal(model, x, k=k, compile=self.take_step.compiled).value,
        }

    # --- the loop ------------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to the last step or until a stop signal, with logging, evaluation and checkpoints on the way."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(exist_ok=True)
        if self.rank == 0:
            atomic_write_text(self.run_dir / "config.json", json.dumps(asdict(self.config), indent=2))
            atomic_write_text(self.run_dir / "data_shape.json", json.dumps(list(self.data_shape)))
        if self.rank == 0 and self.step == 0:  # a fresh run: drop what a run that died before its first checkpoint left
            shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
            shutil.rmtree(self.ckpt_dir / "best", ignore_errors=True)
            (self.ckpt_dir / "latest.json").unlink(missing_ok=True)
        log = RunLog(self.run_dir, append=self.step > 0, enabled=self.rank == 0)
        previous = install_signal_handlers(self._request_stop)
        bar = progress_bar(self.total_steps, self.step, enabled=self.config.progress and self.rank == 0)
        timed, tick = 0, time.perf_counter()  # steps since tick, for samples_per_sec
        try:
            while self.step < self.total_steps and self._stop is None:
                for key, value in self.train_step().items():
                    self._sums[key] = self._sums.get(key, 0) + value
                self._count += 1
                timed += 1
                bar.update(1)
                if self.world > 1 and not all_ranks(self._stop is None, self.world, self.device):
                    self._stop = self._stop or "a signal on another rank"
                if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                    means = mean_over_ranks([v / self._count for v in self._sums.values()], self.world, self.device)
                    line: dict[str, Any] = dict(zip(self._sums, means, strict=True))
                    line.update(
                        split="train",
                        step=self.step,
                        epoch=self.step / self.steps_per_epoch,
                        lr=self.config.lr * LR_DECAYS[self.config.lr_decay](self.step - 1, self.total_steps),
                        samples_per_sec=timed * self.batch_size / max(time.perf_counter() - tick, 1e-9),
                        **self.schedule.objective_kwargs(self.step - 1),
                    )
                    line.setdefault("beta", 1.0)
                    log.write(line)
                    bar.set_postfix(
                        elbo=f"{line['elbo']:.2f}",
                        kl=f"{line.get('kl', math.nan):.2f}",
                        beta=f"{line['beta']:.3g}",
                        sps=f"{line['samples_per_sec']:.0f}",
                    )
                    self._sums, self._count, timed, tick = {}, 0, 0, time.perf_counter()
                paused = time.perf_counter()
                if self.rank == 0 and (self.step % self.eval_every == 0 or self.step == self.total_steps):
                    result = self.evaluate()
                    if result:
                        self.last_eval = result
                        log.write(result)
                        if self.fields == ("x",):  # a model given context has a prior per example: no samples drawn
                            x = (self.valid_data or self.train_data)["x"][:8].to(self.device)
                            log.pictures(self.model, x, self.config.seed, self.step)
                        if result["elbo"] > self.best_elbo:
                            self.best_elbo = result["elbo"]
                            self.save("best")
                if self.rank == 0 and (self.step % self.checkpoint_every == 0 or self.step == self.total_steps):
                    self.save()
                tick += time.perf_counter() - paused  # samples_per_sec is training's: validation and saving excluded
            if self._stop is not None:
                if self.rank == 0:
                    self.save()
                print(
                    f"\nstopped by {self._stop} at step {self.step}; checkpoint saved in {self.ckpt_dir}. "
                    f"Resume with: vaelab train --resume --out {self.run_dir}",
                    file=sys.stderr,
                )
            elif self.rank == 0:
                save_weights(self.model, self.run_dir / "model.safetensors")
        finally:
            bar.close()
            log.close()
            restore_signal_handlers(previous)
            self._release()
        if self.world > 1:  # rank 0 was still writing files: no rank tears its connections down before the others
            dist.barrier()
            if self._owns_group:
                dist.destroy_process_group()
        return TrainResult(self.run_dir, self.step, self._stop, self.last_eval)

    def _request_stop(self, signum, frame) -> None:
        self._stop = signal.Signals(signum).name


def train(
    config: TrainConfig,
    train_data: Data,
    valid_data: Data | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    model: nn.Module | None = None,
) -> TrainResult:
    """Train as ``config`` says (or ``model``, built by hand, with the rest of ``config``); see :class:`Trainer`."""
    return Trainer(config, train_data, valid_data, run_dir, resume=resume, model=model).fit()
