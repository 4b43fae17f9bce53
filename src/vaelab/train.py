"""Training: one readable loop, a config saved with every checkpoint, and nothing lost on a crash.

The loop, per step: draw the batch (a fixed permutation per epoch, so the data order is a pure function of seed and
step), binarize it on the device if asked, evaluate the per-example objective, reduce once (mean), backward, clip,
Adam step. Compiled (``compile=True``, the default for long runs), that whole step is one ``torch.compile``d graph
with the same arithmetic (:class:`WholeStep`). Around it: the KL schedule and learning rate as pure functions of
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

import inspect
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
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
from vaelab.config import AUTO_COMPILE_SAMPLES, LR_DECAYS, PRESETS, TrainConfig, build_model, resolve_device
from vaelab.data import binarize_fixed, binarize_with_bits, random_bits
from vaelab.distributed import all_ranks, average_gradients, init_distributed, mean_over_ranks
from vaelab.estimators import check_values, data_support, elbo_parts, log_marginal, trusted_data
from vaelab.likelihoods import LIKELIHOODS
from vaelab.nets import init_decoder_bias
from vaelab.objectives import OBJECTIVES, ObjectiveOutput
from vaelab.runs import Run, latest_checkpoint, load_run, truncate_metrics
from vaelab.schedules import Constant, make_schedule
from vaelab.steps import WholeStep, adam, grads_finite, host_scalar

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


# --- errors and results ----------------------------------------------------------------------------------------------
class TrainingDiverged(RuntimeError):
    """A non-finite value appeared; the message names the term and the step. Checkpoints already written are intact."""


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
        model: a model built by hand (the :mod:`vaelab.models` interface); None: ``build_model(config, data_shape)``.
            Its weights are used as given (no decoder-bias initialisation); :func:`~vaelab.runs.load_run` can rebuild
            it only if its class is registered (:func:`vaelab.models.register_model`) and named by ``config.model``.
    """

    def __init__(
        self,
        config: TrainConfig,
        train_data: torch.Tensor,
        valid_data: torch.Tensor | None,
        run_dir: str | Path,
        *,
        resume: bool = False,
        model: nn.Module | None = None,
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
        self.rank, self.world = init_distributed(self.device)
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
        built = model is None
        self.model = (build_model(config, self.data_shape) if built else model).to(self.device)
        # Values are checked once here, not on every batch (the steps then run inside estimators.trusted_data()).
        support, support_name = data_support(self.model, self.train_data[:1]), None
        if config.binarizes:
            support, support_name = constraints.unit_interval, "[0, 1] (it is binarized at every step)"
        for name, data in (("train_data", self.train_data), ("valid_data", self.valid_data)):
            if data is not None:
                check_values(data, support, name=name, support_name=support_name)
        # The likelihood's rule, on the network the model says produces its parameters (models without one: skipped)
        likelihood = getattr(self.model, "likelihood", None)
        likelihood = LIKELIHOODS[config.likelihood] if likelihood is None else likelihood
        output_net = getattr(self.model, "output_net", None)
        if config.init_decoder_bias and built and resume_from is None and output_net is not None:
            if likelihood.bias_from_mean is not None:
                init_decoder_bias(output_net, self.train_data.mean(0).clamp(0, 1), likelihood)
        if self.world > 1:
            for tensor in self.model.state_dict().values():
                dist.broadcast(tensor, src=0)  # identical start on every rank
            torch.manual_seed(config.seed + 1_000_003 * self.rank)  # but independent noise per rank
        self.optimizer = adam(self.model.parameters(), config.lr)
        self.objective = OBJECTIVES[config.objective]
        self.objective_options = dict(config.objective_options)
        if "form" in inspect.signature(self.objective).parameters:
            self.objective_options.setdefault("form", config.form)
        self.schedule = make_schedule(config.schedule, **config.schedule_options)
        # Compiled: in one process the whole step is one graph (WholeStep: gradients and the Adam update); under
        # torchrun, where gradients are averaged between the two, the objective is (forward and backward fused).
        # A schedule's changing values go in as 0-d tensors so that they do not trigger a recompilation each.
        self.compiles = compiles = (
            config.compile if config.compile is not None else self.total_steps * self.batch_size >= AUTO_COMPILE_SAMPLES
        )
        self._forward = torch.compile(self._objective, dynamic=False) if compiles else self._objective
        self._whole_step = WholeStep(self) if compiles and self.world == 1 else None
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
        truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
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
            sched = {name: host_scalar(value, self.device) for name, value in sched.items()}
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
            average_gradients(self.model, self.world)
        if self.config.grad_clip is not None:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        else:
            norm = None
        # The step's one host synchronisation: loss and gradients checked together; the culprit is named on failure.
        finite = torch.isfinite(loss) & grads_finite(self.model)
        if not all_ranks(bool(finite), self.world, self.device):
            if not all_ranks(bool(torch.isfinite(loss)), self.world, self.device):
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
                if self.world > 1 and not all_ranks(self._stop is None, self.world, self.device):
                    self._stop = self._stop or "a signal on another rank"
                if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    line = dict(
                        zip(
                            sums,
                            mean_over_ranks([v / count for v in sums.values()], self.world, self.device),
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
    model: nn.Module | None = None,
) -> TrainResult:
    """Train as ``config`` says (or ``model``, built by hand, with the rest of ``config``); see :class:`Trainer`."""
    return Trainer(config, train_data, valid_data, run_dir, resume=resume, model=model).fit()
