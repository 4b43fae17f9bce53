"""Training: one readable loop, a config saved with every checkpoint, and nothing lost on a crash.

The loop, per step: draw the batch (a fixed permutation per epoch, so the data order is a pure function of seed and
step), binarize it on the device if asked, evaluate the per-example objective, reduce once (mean), backward, clip,
Adam step. Compiled (``compile=True``, the default for long runs), that whole step is one ``torch.compile``d graph
with the same arithmetic (:class:`_WholeStep`). Around it: the KL schedule and learning rate as pure functions of
the step, metrics to JSONL and TensorBoard, evaluation on a validation set, atomic checkpoints
(:mod:`vaelab.checkpoint`), exact resume, a clean stop on Ctrl-C / SIGTERM, and a stop naming the term and step when
anything turns non-finite.

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

import dataclasses
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributions import constraints

from vaelab.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    restore_optimizer,
    save_checkpoint,
    set_rng_state,
)
from vaelab.data import binarize_fixed, binarize_with_bits, random_bits
from vaelab.estimators import check_values, elbo_parts, log_marginal, trusted_data
from vaelab.hierarchical import HierarchicalVAE
from vaelab.likelihoods import LIKELIHOODS
from vaelab.models import VAE
from vaelab.nets import _BIAS_FROM_MEAN, ARCHITECTURES, init_decoder_bias
from vaelab.objectives import OBJECTIVES, ObjectiveOutput
from vaelab.priors import PRIORS
from vaelab.schedules import SCHEDULES, Constant, make_schedule


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved as JSON in the run directory and inside every checkpoint."""

    # data (read by the command line and load_run; the Trainer itself is handed tensors)
    dataset: str = "auto"  # a name in vaelab.data.DATASETS, a path (.npz/.npy/image folder), or "auto":
    # MNIST wherever a copy is found, else Fashion-MNIST (which Debian's dataset-fashion-mnist provides offline)
    data_dir: str | None = None  # where to look first (else VAELAB_DATA_DIR, the cache, system copies)
    validation_size: int = 10000  # examples carved from train (fixed seed) for validation
    max_examples: int | None = None  # truncate every split (quick runs)
    # model
    architecture: str = "mlp"  # key of vaelab.nets.ARCHITECTURES
    architecture_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"hidden": [512, 256]}
    latent_dim: int = 32
    prior: str = "standard-normal"  # key of vaelab.priors.PRIORS
    likelihood: str = "bernoulli"  # key of vaelab.likelihoods.LIKELIHOODS
    likelihood_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"scale": 0.1}
    init_decoder_bias: bool = True  # start the decoder's output bias at the training-set pixel means
    # objective
    objective: str = "elbo"  # key of vaelab.objectives.OBJECTIVES
    k: int = 1  # samples per example in the objective
    form: str = "kl"  # ELBO form, for the objectives that take one
    objective_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"free_nats": 0.5}
    schedule: str = "constant"  # key of vaelab.schedules.SCHEDULES (beta or capacity)
    schedule_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"steps": 10000, "start": 4.0}
    # optimization
    batch_size: int = 100
    epochs: int = 10
    max_steps: int | None = None  # stop after this many steps (overrides epochs when smaller)
    lr: float = 1e-3
    lr_decay: str = "none"  # "none" or "cosine" (to 0 at the last step)
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    binarize: bool | None = None  # dynamic binarization (a fresh Bernoulli draw of every batch); None: iff Bernoulli
    # evaluation and bookkeeping
    seed: int = 0
    log_every: int = 50  # steps between train metric lines
    eval_every: int | None = None  # steps between validation passes; None: once per epoch
    eval_k: int = 100  # importance samples for the validation IWAE bound
    eval_examples: int | None = 1000  # validation examples evaluated each time (None: all)
    checkpoint_every: int | None = None  # steps between checkpoints; None: once per epoch
    keep_last: int = 3  # step checkpoints kept (plus 'best')
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    bf16: bool = False  # bfloat16 autocast of the training steps (CUDA, or CPUs with AVX-512 BF16 / AMX); evaluation
    # and the validation passes stay in float32
    compile: bool | None = None  # torch.compile the whole step (gradients and Adam update in one graph; under
    # torchrun the objective): 1.3-1.6x the steps/s of a hand-written loop on this project's CPUs for a one-off
    # compilation of 5-60 s; bf16 on top: 0.9-1.5x more, by CPU and batch size (docs/performance.md). None: compile
    # when the run trains on >= AUTO_COMPILE_SAMPLES examples (e.g. 100 MNIST epochs), where it repays itself
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, registry in (
            ("architecture", {**ARCHITECTURES, **HIERARCHICAL}),
            ("prior", PRIORS),
            ("likelihood", LIKELIHOODS),
            ("objective", OBJECTIVES),
            ("schedule", SCHEDULES),
        ):
            if getattr(self, name) not in registry:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(registry)}")
        for name in ("latent_dim", "k", "batch_size", "log_every", "eval_k", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("epochs",):
            if isinstance(getattr(self, name), bool) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if (
            isinstance(self.validation_size, bool)
            or not isinstance(self.validation_size, int)
            or self.validation_size < 0
        ):
            raise ValueError(f"validation_size must be an integer >= 0, got {self.validation_size!r}")
        for name in ("max_steps", "eval_every", "checkpoint_every", "eval_examples", "max_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {', '.join(LR_DECAYS)}; got {self.lr_decay!r}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true, false or None (automatic), got {self.compile!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")

    @property
    def binarizes(self) -> bool:
        """Whether batches are binarized: as set, or by default exactly when the likelihood is Bernoulli."""
        return self.likelihood == "bernoulli" if self.binarize is None else self.binarize

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**data)


# compile=None compiles runs on at least this many training examples (steps x batch size): a compilation costs ~5-20 s
# here and saves ~13 us per example at batch 100 (30k -> 50k examples/s), so it repays itself from ~1.5M examples;
# at 5M (100 epochs of MNIST's 50k) it saves a minute or more (docs/performance.md)
AUTO_COMPILE_SAMPLES = 5_000_000

LR_DECAYS = {
    "none": lambda step, total: 1.0,
    "cosine": lambda step, total: 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1))),
}


# --- building a model from a config --------------------------------------------------------------------------------
# Architectures that are whole models rather than (encoder, decoder) pairs: name -> builder(config, data_shape).
HIERARCHICAL = {
    "iwae-2layer": lambda config, data_shape: HierarchicalVAE.iwae_2layer(tuple(data_shape), config.likelihood),
}


def build_model(config: TrainConfig, data_shape: Sequence[int]) -> nn.Module:
    """The model a config describes, for data of shape ``data_shape`` (weights freshly initialised)."""
    if config.architecture in HIERARCHICAL:
        return HIERARCHICAL[config.architecture](config, data_shape)
    encoder, decoder = ARCHITECTURES[config.architecture](
        tuple(data_shape), config.latent_dim, **config.architecture_options
    )
    return VAE(
        prior=PRIORS[config.prior](config.latent_dim),
        encoder=encoder,
        decoder=decoder,
        likelihood=LIKELIHOODS[config.likelihood](tuple(data_shape), **config.likelihood_options),
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


# --- errors and results ----------------------------------------------------------------------------------------------
class TrainingDiverged(RuntimeError):
    """A non-finite value appeared; the message names the term and the step. Checkpoints already written are intact."""


# Named starting points for a config (the command line's --preset); fields not named keep their defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "mlp": {"architecture": "mlp", "latent_dim": 32, "binarize": True},
    "iwae-1layer": {
        "architecture": "iwae-1layer",
        "latent_dim": 50,
        "likelihood": "bernoulli",
        "binarize": True,
        "validation_size": 0,
        "batch_size": 100,
    },
    "iwae-2layer": {
        "architecture": "iwae-2layer",
        "latent_dim": 50,
        "likelihood": "bernoulli",
        "binarize": True,
        "validation_size": 0,
        "batch_size": 100,
    },
    "conv": {"architecture": "conv", "latent_dim": 32, "binarize": True, "architecture_options": {"base_channels": 32}},
}


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    interrupted: str | None  # the signal's name if stopped by one
    last_eval: dict[str, Any] | None


# --- the trainer ------------------------------------------------------------------------------------------------------
class Trainer:
    """Owns the model, optimizer, schedules, data order and run directory. ``fit()`` runs to the end or to a signal.

    Args:
        config: the run's :class:`TrainConfig`.
        train_data: ``[N, *data_shape]`` floating tensor (moved to the device once; batched by index).
        valid_data: ``[M, *data_shape]`` or ``None``.
        run_dir: where config, metrics, TensorBoard logs, checkpoints and final weights go.
        resume: continue from the run directory's latest checkpoint (its saved config wins).
    """

    def __init__(
        self,
        config: TrainConfig,
        train_data: torch.Tensor,
        valid_data: torch.Tensor | None,
        run_dir: str | Path,
        *,
        resume: bool = False,
    ):
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        resume_from = None
        if resume:
            resume_from = latest_checkpoint(self.run_dir)
            if resume_from is None:
                raise CheckpointError(f"--resume: no checkpoint found in {self.ckpt_dir}")
            _, _, meta = load_checkpoint(resume_from)
            config = TrainConfig.from_dict(meta["config"])
        elif self.ckpt_dir.exists() and any(self.ckpt_dir.iterdir()):
            raise ValueError(
                f"{self.run_dir} already holds a run: pass resume=True (--resume) or choose a new directory"
            )
        self.config = config
        self.device = resolve_device(config.device)
        self._owns_group = not (dist.is_available() and dist.is_initialized())  # else the caller's group: left alone
        self.rank, self.world = _init_distributed(self.device)
        if config.batch_size % self.world:
            raise ValueError(
                f"batch_size {config.batch_size} must be divisible by the number of processes {self.world}"
            )
        if train_data.ndim < 2 or train_data.shape[0] < 1:
            raise ValueError(f"train_data must be [N, *data_shape] with N >= 1, got {tuple(train_data.shape)}")
        self.train_data = train_data.to(self.device)
        self.valid_data = None if valid_data is None else valid_data.to(self.device)
        self.data_shape = tuple(train_data.shape[1:])
        self.batch_size = min(config.batch_size, train_data.shape[0])
        self.steps_per_epoch = train_data.shape[0] // self.batch_size
        total = config.epochs * self.steps_per_epoch
        self.total_steps = total if config.max_steps is None else min(config.max_steps, total or config.max_steps)
        if config.max_steps is not None and config.epochs == 0:
            self.total_steps = config.max_steps
        self.eval_every = config.eval_every or self.steps_per_epoch
        self.checkpoint_every = config.checkpoint_every or self.steps_per_epoch

        torch.manual_seed(config.seed)
        self.model = build_model(config, self.data_shape).to(self.device)
        # Values are checked once here, not on every batch (the steps then run inside estimators.trusted_data()).
        support, support_name = self.model.data_support, None
        if config.binarizes:
            support, support_name = constraints.unit_interval, "[0, 1] (it is binarized at every step)"
        for name, data in (("train_data", self.train_data), ("valid_data", self.valid_data)):
            if data is not None:
                check_values(data, support, name=name, support_name=support_name)
        if config.init_decoder_bias and config.likelihood in _BIAS_FROM_MEAN and resume_from is None:
            init_decoder_bias(_output_net(self.model), self.train_data.mean(0).clamp(0, 1), config.likelihood)
        if self.world > 1:
            for tensor in self.model.state_dict().values():
                dist.broadcast(tensor, src=0)  # identical start on every rank
            torch.manual_seed(config.seed + 1_000_003 * self.rank)  # but independent noise per rank
        self.optimizer = _adam(self.model.parameters(), config.lr)
        self.objective = OBJECTIVES[config.objective]
        self.objective_options = dict(config.objective_options)
        if "form" in inspect.signature(self.objective).parameters:
            self.objective_options.setdefault("form", config.form)
        self.schedule = make_schedule(config.schedule, **config.schedule_options)
        _check_objective_arguments(config, self.objective, self.objective_options, self.schedule.objective_kwargs(0))
        # Compiled: in one process the whole step is one graph (_WholeStep: gradients and the Adam update); under
        # torchrun, where gradients are averaged between the two, the objective is (forward and backward fused).
        # A schedule's changing values go in as 0-d tensors so that they do not trigger a recompilation each.
        self.compiles = compiles = (
            config.compile if config.compile is not None else self.total_steps * self.batch_size >= AUTO_COMPILE_SAMPLES
        )
        self._forward = torch.compile(self._objective, dynamic=False) if compiles else self._objective
        self._whole_step = _WholeStep(self) if compiles and self.world == 1 else None
        self._schedule_as_tensors = compiles and not isinstance(self.schedule, Constant)
        self._steps_taken = 0  # by this Trainer (the first runs eagerly: see _run_objective)
        self._compiled_once = False
        self.step = 0
        self.best_elbo = -math.inf
        self.last_eval: dict[str, Any] | None = None
        self._stop: str | None = None
        self._perm: tuple[int, torch.Tensor] | None = None
        self._tb = None
        if resume_from is not None:
            self._restore(resume_from)

    # --- state ---------------------------------------------------------------------------------------------------
    def _restore(self, directory: Path) -> None:
        weights, tensors, meta = load_checkpoint(directory)
        self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        restore_optimizer(self.optimizer, tensors, meta)
        set_rng_state(tensors)
        self.step = meta["step"]
        self.best_elbo = meta.get("best_elbo", -math.inf)
        self.last_eval = meta.get("last_eval")
        _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        print(f"resumed from {directory} at step {self.step}", file=sys.stderr)

    def _meta(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "best_elbo": self.best_elbo,
            "last_eval": self.last_eval,
            "data_shape": list(self.data_shape),
        }

    def save(self, name: str | None = None) -> Path:
        directory = self.ckpt_dir / (name or f"step_{self.step:08d}")
        save_checkpoint(directory, model=self.model, optimizer=self.optimizer, meta=self._meta())
        if name is None:
            atomic_write_text(self.ckpt_dir / "latest.json", json.dumps({"checkpoint": directory.name}))
            self._prune()
        return directory

    def _prune(self) -> None:
        steps = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())
        for old in steps[: -self.config.keep_last]:
            shutil.rmtree(old)

    # --- data ------------------------------------------------------------------------------------------------------
    def _batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.train_data.shape[0], generator=g).to(self.device))
        idx = self._perm[1][i * self.batch_size : (i + 1) * self.batch_size]
        # this rank's share of the global batch, unbinarized; index_select: the same rows as train_data[idx], faster
        return self.train_data.index_select(0, idx[self.rank :: self.world])

    def _lr(self, step: int) -> float:
        return self.config.lr * LR_DECAYS[self.config.lr_decay](step, self.total_steps)

    # --- one step --------------------------------------------------------------------------------------------------
    def _objective(
        self, x: torch.Tensor, sched: dict[str, Any], bits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, ...]:
        """The objective on a batch: loss, elbo, recon, kl (the unit that ``compile=True`` compiles). With ``bits``
        (:func:`vaelab.data.random_bits`), the batch is binarized first: compiled, in the same fused pass."""
        if bits is not None:
            x = binarize_with_bits(x, bits)
        out = self.objective(self.model, x, k=self.config.k, **sched, **self.objective_options)
        return out.loss, out.elbo, out.recon, out.kl

    def _run_objective(
        self, x: torch.Tensor, sched: dict[str, Any], bits: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        """The objective, compiled where asked. The first step runs eagerly even then: it fills torch.distributions'
        KL dispatch cache, whose lookup torch.compile cannot trace, and shows errors in the objective without a
        compiler's traceback. If the compilation itself fails (no C++ compiler, say), a warning, and eager from then.
        """
        if self._forward is self._objective or self._steps_taken == 0:
            return self._objective(x, sched, bits)
        result = self._compiled(self._forward, x, sched, bits)
        return self._objective(x, sched, bits) if result is None else result

    def _compiled(self, function, *args):
        """``function(*args)``, a compiled function; None if it fails to compile (no C++ compiler, say): then a
        warning, and every later step runs eagerly."""
        if not self._compiled_once and self.config.progress and self.rank == 0:
            why = "" if self.config.compile else f": automatic for runs of >= {AUTO_COMPILE_SAMPLES:,} examples"
            skip = "compile=False / --no-compile to skip"
            print(f"compiling the training step (once, ~10-60 s{why}; {skip})", file=sys.stderr)
        try:
            result = function(*args)
        except ValueError:
            raise
        except Exception as err:
            if self._compiled_once:  # it compiled and ran before: this is not a compiler failure
                raise
            message = f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); training eagerly"
            warnings.warn(message, stacklevel=4)
            self._forward, self._whole_step = self._objective, None
            return None
        self._compiled_once = True
        return result

    def train_step(self) -> dict[str, torch.Tensor]:
        step = self.step
        x = self._batch(step)
        # Dynamic binarization: the random bits drawn here by torch's generator (faster on CPU than compiled random
        # numbers, and the same stream compiled or not), compared with the batch inside the objective. Values were
        # checked once, in __init__.
        bits = random_bits(x.shape, device=x.device) if self.config.binarizes else None
        sched = self.schedule.objective_kwargs(step)
        if self._schedule_as_tensors:
            sched = {name: _host_scalar(value, self.device) for name, value in sched.items()}
        lr = self._lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # the first step runs eagerly (see _run_objective), and so does every step until one filled Adam's state
        if self._whole_step is not None and self._steps_taken > 0 and self.optimizer.state:
            try:
                with trusted_data():
                    result = self._compiled(self._whole_step, x, sched, bits, lr)
            except ValueError as err:
                raise TrainingDiverged(f"step {step}: the batch was rejected: {err}") from err
            if result is not None:
                stats, finite, bad = result
                self._steps_taken += 1
                if not finite:  # the graph left parameters and optimizer state as they were
                    out = ObjectiveOutput(stats["loss"], stats["elbo"], stats.get("recon"), stats.get("kl"))
                    names = [name for name, flag in zip(self._whole_step.names, bad.tolist(), strict=True) if flag]
                    raise _diverged(step, out, stats["loss"], names)
                self.step += 1
                return stats
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)
        try:
            with autocast, trusted_data():
                out = ObjectiveOutput(*self._run_objective(x, sched, bits))
        except ValueError as err:
            raise TrainingDiverged(f"step {step}: the batch was rejected: {err}") from err
        self._steps_taken += 1
        loss = out.loss.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # harmless if the loss is not finite: nothing is applied before the check below
        if self.world > 1:
            _average_gradients(self.model, self.world)
        if self.config.grad_clip is not None:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        else:
            norm = None
        # The step's one host synchronisation: loss and gradients checked together; the culprit is named on failure.
        finite = torch.isfinite(loss) & _grads_finite(self.model)
        if not _all_ranks(bool(finite), self.world, self.device):
            if not _all_ranks(bool(torch.isfinite(loss)), self.world, self.device):
                raise _diverged(step, out, loss, [])
            bad = [n for n, p in self.model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
            raise _diverged(step, out, loss, bad)
        self.optimizer.step()
        self.step += 1
        stats = {"loss": loss.detach(), "elbo": out.elbo.mean()}
        if out.recon is not None:
            stats["recon"], stats["kl"] = out.recon.mean(), out.kl.mean()
        if norm is not None:
            stats["grad_norm"] = norm.detach()
        return stats

    # --- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, data: torch.Tensor | None = None, *, split: str = "valid") -> dict[str, Any]:
        """Validation ELBO (the config's form, 1 sample) and IWAE_k bound (k = eval_k), nats per example, and the
        seconds the pass took (``eval_k`` x ``eval_examples`` decoder passes: with the defaults ~25 % of the time of
        an epoch of compiled iwae-1layer MNIST training; cheaper with smaller ``eval_k`` / ``eval_examples``, and
        rarer with a larger ``eval_every``)."""
        data = self.valid_data if data is None else data
        if data is None:
            return {}
        if self.config.eval_examples is not None:
            data = data[: self.config.eval_examples]
        if self.config.binarizes:  # one fixed binarization of the evaluation set, the same at every evaluation
            data = binarize_fixed(data, seed=self.config.seed + 7919)
        elbos, iwaes = [], []
        start = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), trusted_data():  # RNG of training untouched
            torch.manual_seed(self.config.seed + self.step)
            self.model.eval()
            for batch in data.split(self.batch_size):
                elbos.append(elbo_parts(self.model, batch, k=1, form=self.config.form).elbo)
                # compiled too once the objective has compiled (a working compiler): ~1.4x faster per sample
                iwae = log_marginal(self.model, batch, k=self.config.eval_k, compile=self._compiled_once)
                iwaes.append(iwae.value)
            self.model.train()
        return {
            "split": split,
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "elbo": torch.cat(elbos).mean().item(),
            f"iwae_{self.config.eval_k}": torch.cat(iwaes).mean().item(),
            "examples": int(data.shape[0]),
            "seconds": time.perf_counter() - start,  # after the .item() calls above: the work is done, also on a GPU
        }

    # --- the loop ------------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(exist_ok=True)
        if self.rank == 0:
            atomic_write_text(self.run_dir / "config.json", json.dumps(asdict(self.config), indent=2))
            atomic_write_text(self.run_dir / "data_shape.json", json.dumps(list(self.data_shape)))
        if self.rank == 0 and self.step == 0:  # a fresh run: drop what a run that died before its first checkpoint left
            shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
        mode = "a" if self.step > 0 else "w"
        metrics = open(self.run_dir / "metrics.jsonl", mode) if self.rank == 0 else open(os.devnull, "w")
        previous = _install_signal_handlers(self._request_stop)
        bar = _progress(self.total_steps, self.step, enabled=self.config.progress and self.rank == 0)
        sums: dict[str, torch.Tensor] = {}
        count, tick = 0, time.perf_counter()
        try:
            while self.step < self.total_steps and self._stop is None:
                stats = self.train_step()
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0) + value
                count += 1
                bar.update(1)
                if self.world > 1 and not _all_ranks(self._stop is None, self.world, self.device):
                    self._stop = self._stop or "a signal on another rank"
                if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    line = dict(
                        zip(
                            sums,
                            _mean_over_ranks([v / count for v in sums.values()], self.world, self.device),
                            strict=True,
                        )
                    )
                    line.update(
                        split="train",
                        step=self.step,
                        epoch=self.step / self.steps_per_epoch,
                        lr=self._lr(self.step - 1),
                        samples_per_sec=count * self.batch_size / max(now - tick, 1e-9),
                        **self.schedule.objective_kwargs(self.step - 1),
                    )
                    line.setdefault("beta", 1.0)
                    self._log(metrics, line)
                    bar.set_postfix(
                        elbo=f"{line['elbo']:.2f}",
                        kl=f"{line.get('kl', math.nan):.2f}",
                        beta=f"{line['beta']:.3g}",
                        sps=f"{line['samples_per_sec']:.0f}",
                    )
                    sums, count, tick = {}, 0, time.perf_counter()
                paused = time.perf_counter()
                if self.rank == 0 and (self.step % self.eval_every == 0 or self.step == self.total_steps):
                    result = self.evaluate()
                    if result:
                        self.last_eval = result
                        self._log(metrics, result)
                        self._log_images()
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
                self._write_final_weights()
        finally:
            bar.close()
            metrics.close()
            _restore_signal_handlers(previous)
            if self._tb is not None:
                self._tb.close()
        if self.world > 1:  # rank 0 was still writing files: no rank tears its connections down before the others
            dist.barrier()
            if self._owns_group:
                dist.destroy_process_group()
        return TrainResult(self.run_dir, self.step, self._stop, self.last_eval)

    def _write_final_weights(self) -> None:
        from safetensors.torch import save_file

        tmp = self.run_dir / ".model.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, tmp)
        tmp.replace(self.run_dir / "model.safetensors")

    def _request_stop(self, signum, frame) -> None:
        self._stop = signal.Signals(signum).name

    def _log(self, metrics, line: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        metrics.write(json.dumps(line) + "\n")
        metrics.flush()
        writer = self._writer()
        if writer is not None:
            for key, value in line.items():
                if isinstance(value, float) and key not in ("step", "epoch"):
                    writer.add_scalar(f"{line['split']}/{key}", value, line["step"])

    def _log_images(self) -> None:
        """Samples from the prior and validation reconstructions as image grids in TensorBoard (image data only)."""
        writer = self._writer()
        if writer is None:
            return
        from vaelab.plots import image_grid, reconstruction_pairs, sample_images

        x = (self.valid_data if self.valid_data is not None else self.train_data)[:8]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # never perturbs training's RNG
            torch.manual_seed(self.config.seed)
            self.model.eval()
            samples, pairs = sample_images(self.model, 16), reconstruction_pairs(self.model, x)
            self.model.train()
        try:
            for tag, images in (("samples", samples), ("reconstructions", pairs)):
                writer.add_image(tag, image_grid(images, self.data_shape, ncol=8), self.step, dataformats="HWC")
        except ValueError:  # data that are not images
            pass

    def _writer(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a stripped install still trains
                self._tb = False
                return None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._tb or None


class _WholeStep:
    """A training step as one compiled function, for ``compile=True`` in a single process: the objective's gradients
    by ``torch.func.grad_and_value`` (forward and backward traced once into one graph, so no autograd engine runs
    per step), gradient clipping, and the Adam update written out (torch.optim.Adam's formula) on the optimizer's
    own state tensors, so checkpoints and resume are those of the eager step. The update is applied only where the
    loss and every gradient are finite (``torch.where`` in the graph): a step that fails the host's check leaves
    parameters and optimizer state as they were, as the eager step does. On this project's CPU it took training at
    batch 100 from 1.15x to ~1.6x a hand-written loop's samples/s (the compiled objective with eager backward and
    fused Adam before; docs/performance.md).

    Called as ``step(x, sched, bits, lr)``; returns (stats, finite, bad): the step's batch means (loss, elbo, recon,
    kl, grad_norm as the eager step reports them), whether the update was applied (a bool: the step's one host
    synchronisation), and per parameter whether its gradient had a non-finite value.
    """

    def __init__(self, trainer: Trainer):
        named = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.trainer = trainer
        self.module = _ObjectiveModule(trainer)  # its parameters are the model's, named "model.<name>"
        (group,) = trainer.optimizer.param_groups
        if group["weight_decay"] or group["amsgrad"] or group["maximize"]:
            raise ValueError("the compiled step implements plain Adam only")
        # constants of the graph, read once (the graph would otherwise guard on the param group's changing lr)
        (self.beta1, self.beta2), self.eps = group["betas"], group["eps"]
        self.bf16, self.grad_clip = trainer.config.bf16, trainer.config.grad_clip
        self.compiled = torch.compile(self._step, dynamic=False)
        self._counter: torch.Tensor | None = None  # the optimizer's step count, mirrored on the host as _count
        self._count = 0.0

    def __call__(self, x, sched, bits, lr: float):
        state = [self.trainer.optimizer.state[p] for p in self.params]  # filled by the first (eager) step
        weights = [p.detach() for p in self.params]  # the parameters' own storage: updated in place
        for p in self.params:
            p.grad = None  # gradients stay inside the graph; none left over from an eager step
        moments = [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], [s["step"] for s in state]
        if moments[2][0] is not self._counter:  # the first call, or the optimizer's state was loaded anew
            self._counter, self._count = moments[2][0], float(moments[2][0])
        # Adam's step size and bias correction, in double precision on the host as torch.optim.Adam computes them
        # (computed in the graph, two pow calls were repeated for every 16 values: 1.5x the update's time)
        count = self._count + 1
        factors = [lr / (1 - self.beta1**count), (1 - self.beta2**count) ** -0.5, count]
        stats, finite, bad = self.compiled(weights, *moments, _host_scalar(factors, x.device), x, sched, bits)
        finite = bool(finite)
        self._count += finite
        return stats, finite, bad

    def _loss(self, weights, x, sched, bits):
        named = {f"model.{name}": w for name, w in zip(self.names, weights, strict=True)}
        out = ObjectiveOutput(*torch.func.functional_call(self.module, named, (x, sched, bits)))
        means = {"elbo": out.elbo.mean()}
        if out.recon is not None:
            means["recon"], means["kl"] = out.recon.mean(), out.kl.mean()
        return out.loss.mean(), means

    def _step(self, weights, exp_avgs, exp_avg_sqs, steps, factors, x, sched, bits):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            grads, (loss, means) = torch.func.grad_and_value(self._loss, has_aux=True)(weights, x, sched, bits)
        bad = torch.stack([~g.isfinite().all() for g in grads])
        finite = loss.isfinite() & ~bad.any()
        stats = {"loss": loss, **means}
        if self.grad_clip is not None:  # as nn.utils.clip_grad_norm_
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            grads = [g * (self.grad_clip / (norm + 1e-6)).clamp(max=1.0) for g in grads]
            stats["grad_norm"] = norm
        beta1, beta2, eps = self.beta1, self.beta2, self.eps
        step_size, inverse_bias2_sqrt, count = factors
        for w, g, m, v, s in zip(weights, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
            m_new = m.lerp(g, 1 - beta1)
            v_new = v * beta2 + (1 - beta2) * g * g
            w_new = w - step_size * m_new / (v_new.sqrt() * inverse_bias2_sqrt + eps)
            for old, new in ((w, w_new), (m, m_new), (v, v_new), (s, count)):
                old.copy_(torch.where(finite, new, old))
        return stats, finite, bad


class _ObjectiveModule(nn.Module):
    """The Trainer's objective as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.model = trainer.model
        self.objective = trainer._objective

    def forward(self, x, sched, bits):
        return self.objective(x, sched, bits)


def _adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one kernel per parameter instead of a dozen small ops) where torch has it."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # fused not supported for this device or dtype
        return torch.optim.Adam(params, lr=lr)


def _host_scalar(value, device: torch.device) -> torch.Tensor:
    """A number (or list of numbers) from the host as a tensor on ``device``, without a host synchronisation: on a
    GPU ``torch.tensor(value, device=...)`` copies from pageable memory and waits for the stream (a copy that is not
    ``non_blocking`` synchronises), so the value goes through pinned memory, asynchronously."""
    if device.type != "cuda":
        return torch.tensor(value, device=device)
    return torch.tensor(value, pin_memory=True).to(device, non_blocking=True)


def _grads_finite(model: nn.Module) -> torch.Tensor:
    """Whether every gradient is finite, as a 0-d bool tensor (no host synchronisation)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    return torch.stack(torch._foreach_norm(grads)).isfinite().all()


def _output_net(model: nn.Module) -> nn.Module:
    """The network whose last layer produces the likelihood's parameters."""
    return model.nets["p_x_z1"] if isinstance(model, HierarchicalVAE) else model.decoder


# --- distributed helpers (no-ops in a single process) ------------------------------------------------------------
def _init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): joins the process group torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _average_gradients(model: nn.Module, world: int) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _all_ranks(flag: bool, world: int, device: torch.device) -> bool:
    """True only if ``flag`` holds on every rank (so all ranks take the same branch)."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)  # nccl reduces device tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _mean_over_ranks(values: list[torch.Tensor], world: int, device: torch.device) -> list[float]:
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in values])
    if world > 1:
        dist.all_reduce(stacked)
        stacked = stacked / world
    return stacked.tolist()


def _check_objective_arguments(config: TrainConfig, objective, options: dict, from_schedule: dict) -> None:
    """Refuse, before the first step, keyword arguments the objective would refuse at it: missing, unknown, or set
    both by ``objective_options`` and by the schedule."""
    parameters = inspect.signature(objective).parameters
    keyword = {name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    name = f"the {config.objective!r} objective"
    twice = sorted(set(options) & set(from_schedule))
    if twice:
        raise ValueError(
            f"{', '.join(twice)} of {name} is set by the {config.schedule!r} schedule: set it through schedule_options "
            f"(--schedule-options), not objective_options"
        )
    unknown = sorted(set(options) - keyword)
    if unknown:
        choices = sorted(keyword - set(from_schedule) - {"k", "q"})
        raise ValueError(f"unknown objective_options {', '.join(unknown)} for {name}; it takes {', '.join(choices)}")
    supplied = {"k", *options, *from_schedule}
    missing = [n for n, p in parameters.items() if n in keyword and p.default is p.empty and n not in supplied]
    if missing:
        where = f"objective_options (--objective-options '{{\"{missing[0]}\": ...}}')"
        if set(missing) <= {"capacity", "gamma"}:  # what the capacity schedule supplies at every step
            where = f"the capacity schedule (--schedule capacity), or {where}"
        raise ValueError(f"{name} needs {', '.join(missing)}: set {'it' if len(missing) == 1 else 'them'} with {where}")


def _diverged(step: int, out: ObjectiveOutput, loss: torch.Tensor, bad_gradients: list[str]) -> TrainingDiverged:
    """The error for a step whose loss (then the term that made it so is named) or gradients are not finite."""
    if not bool(torch.isfinite(loss)):
        return TrainingDiverged(f"step {step}: {_non_finite_term(out)} is not finite (loss = {loss.item()})")
    return TrainingDiverged(f"step {step}: the gradient of {', '.join(bad_gradients) or 'a parameter'} is not finite")


def _non_finite_term(out) -> str:
    for name, value in (("reconstruction term E_q[log p(x|z)]", out.recon), ("KL term", out.kl)):
        if value is not None and not bool(torch.isfinite(value).all()):
            return name
    if not bool(torch.isfinite(out.elbo).all()):
        return "the log-weights log p(x,z) - log q(z|x)"
    return "the loss"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete step checkpoint of a run directory (from latest.json, else the highest step)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    pointer = ckpt_dir / "latest.json"
    if pointer.is_file():
        candidate = ckpt_dir / json.loads(pointer.read_text())["checkpoint"]
        if candidate.is_dir():
            return candidate
    steps = sorted(p for p in ckpt_dir.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and p.is_dir())
    return steps[-1] if steps else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after ``step`` by a run that died before its next checkpoint."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _install_signal_handlers(handler):
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals cannot be caught here
        pass
    return previous


def _restore_signal_handlers(previous) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, *, enabled: bool):
    """The training bar (:func:`vaelab.progress.progress_bar`: quiet, one line per 30 s, when stderr is a file)."""
    from vaelab.progress import progress_bar

    bar = progress_bar(total, "train", "step", enabled=enabled, initial=initial)
    return _NoBar() if bar is None else bar


def train(
    config: TrainConfig,
    train_data: torch.Tensor,
    valid_data: torch.Tensor | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
) -> TrainResult:
    """Train a VAE as ``config`` says; see :class:`Trainer`."""
    return Trainer(config, train_data, valid_data, run_dir, resume=resume).fit()


# --- a finished (or interrupted) run, rebuilt from its directory alone ----------------------------------------------
@dataclass
class Run:
    """A run directory loaded back: the config, the model with its weights, and the metrics written so far."""

    run_dir: Path
    config: TrainConfig
    model: nn.Module
    metrics: list[dict[str, Any]]
    weights: Path  # the file the weights came from
    step: int | None  # the checkpoint's step (None for the final weights)


def load_run(run_dir: str | Path, *, which: str = "final", device: str | torch.device = "cpu") -> Run:
    """Rebuild a run's model from its directory: config.json + weights (safetensors; nothing is unpickled).

    Args:
        which: "final" (model.safetensors, written when training ends; falls back to the latest checkpoint),
            "best" (the checkpoint with the best validation ELBO) or "latest" (the newest step checkpoint).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir} is not a vaelab run directory: config.json is missing")
    try:
        config = TrainConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{config_path} is not a valid vaelab config: {err}") from err
    step = None
    if which == "final" and (run_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights_path = run_dir / "model.safetensors"
        try:
            weights = load_file(weights_path)
        except Exception as err:  # safetensors raises its own error types on a damaged file
            raise CheckpointError(f"cannot read {weights_path}: {err}") from err
        data_shape = _data_shape_from_checkpoints(run_dir)
    else:
        directory = run_dir / "checkpoints" / "best" if which == "best" else latest_checkpoint(run_dir)
        if which not in ("final", "best", "latest"):
            raise ValueError(f"which must be 'final', 'best' or 'latest', got {which!r}")
        if directory is None or not directory.is_dir():
            raise CheckpointError(f"{run_dir} has no {which} checkpoint")
        weights, _, meta = load_checkpoint(directory)
        weights_path, step, data_shape = directory / "model.safetensors", meta["step"], meta["data_shape"]
    model = build_model(config, data_shape)
    model.load_state_dict(weights)
    model.to(device).eval()
    metrics_path = run_dir / "metrics.jsonl"
    metrics = (
        [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        if metrics_path.is_file()
        else []
    )
    return Run(run_dir=run_dir, config=config, model=model, metrics=metrics, weights=weights_path, step=step)


def _data_shape_from_checkpoints(run_dir: Path) -> list[int]:
    shape_file = run_dir / "data_shape.json"
    if shape_file.is_file():
        return json.loads(shape_file.read_text())
    directory = latest_checkpoint(run_dir)
    if directory is None:
        raise CheckpointError(f"{run_dir}: cannot tell the data shape (no data_shape.json, no checkpoint)")
    return load_checkpoint(directory)[2]["data_shape"]
