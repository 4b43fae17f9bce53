"""Training steps behind one interface: ``step(batch, sched, lr) -> stats``, chosen once by the Trainer.

* :class:`EagerStep`: the objective, backward, gradient all-reduce (under torchrun), clipping, one finiteness check
  (the step's one host synchronisation), the optimizer's ``step()``.
* :class:`CompiledObjectiveStep`: the same, with the objective (forward and backward fused) through ``torch.compile``:
  for torchrun, where gradients are averaged between backward and update, and for optimizers other than plain Adam.
* :class:`WholeStep`: gradients, clipping and Adam's update as one compiled graph (plain Adam, one process).

The compiled steps run their first step eagerly (it fills torch.distributions' KL dispatch cache, whose lookup
torch.compile cannot trace, and shows errors in the objective without a compiler's traceback), and if the compiler
fails (no C++ compiler, say) they warn and run eagerly from then on. A step that finds a non-finite loss or gradient
changes nothing and raises :class:`TrainingDiverged` naming the term or the parameters.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vaelab._fast import room_for
from vaelab.data import random_bits
from vaelab.distributed import all_ranks, average_gradients
from vaelab.estimators import trusted_data
from vaelab.objectives import ObjectiveOutput
from vaelab.optimizers import adam, is_plain_adam
from vaelab.schedules import Constant

if TYPE_CHECKING:
    from vaelab.train import Trainer

__all__ = ["CompiledObjectiveStep", "EagerStep", "TrainingDiverged", "WholeStep", "adam", "make_step"]

Batch = dict[str, torch.Tensor]


class TrainingDiverged(RuntimeError):
    """A non-finite value appeared; the message names the term and the step. Checkpoints already written are intact."""


def make_step(trainer: Trainer) -> EagerStep:
    """The step a Trainer runs: eager, or compiled (the whole step: plain Adam in one process; else the objective)."""
    if not trainer.compiles:
        return EagerStep(trainer)
    if trainer.world == 1 and is_plain_adam(trainer.optimizer):
        return WholeStep(trainer)
    return CompiledObjectiveStep(trainer)


class EagerStep:
    """One training step as torch runs it, op by op. Called as ``step(batch, sched, lr)``: the batch (``x`` in
    [0, 1], unbinarized, plus any context), the schedule's keyword arguments for the objective, the learning rate.
    Returns the batch means of loss, elbo, recon and kl (where the objective has them) and grad_norm (when clipping),
    as 0-d tensors (no host synchronisation beyond the finiteness check)."""

    def __init__(self, trainer: Trainer):
        self.model, self.optimizer, self.config = trainer.model, trainer.optimizer, trainer.config
        self.objective = trainer.objective_outputs  # (batch, sched, bits) -> (loss, elbo, recon, kl)
        self.world, self.device, self.rank = trainer.world, trainer.device, trainer.rank
        self.compiled = False  # whether a compiled graph has run (then validation's log p(x) compiles as well)
        self.failed = False  # the compiler failed: eager from then on
        self.steps = 0  # taken by this object: the first runs eagerly in every step kind

    def __call__(self, batch: Batch, sched: dict[str, Any], lr: float) -> dict[str, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Dynamic binarization: the random bits drawn here by torch's generator (faster on CPU than compiled random
        # numbers, and the same stream compiled or not), compared with the batch inside the objective.
        bits = random_bits(batch["x"].shape, device=batch["x"].device) if self.config.binarizes else None
        return self._update(batch, sched, bits, lr)

    def _forward(self, batch: Batch, sched: dict[str, Any], bits) -> ObjectiveOutput:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16), trusted_data():
            return ObjectiveOutput(*self.objective(batch, sched, bits))

    def _update(self, batch: Batch, sched: dict[str, Any], bits, lr: float) -> dict[str, torch.Tensor]:
        out = self._forward(batch, sched, bits)
        self.steps += 1
        loss = out.loss.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # harmless if the loss is not finite: nothing is applied before the check below
        if self.world > 1:
            average_gradients(self.model, self.world)
        norm = None
        if self.config.grad_clip is not None:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        # The step's one host synchronisation: loss and gradients checked together; the culprit is named on failure.
        finite = torch.isfinite(loss) & grads_finite(self.model)
        if not all_ranks(bool(finite), self.world, self.device):
            if not all_ranks(bool(torch.isfinite(loss)), self.world, self.device):
                raise diverged(out, loss, [])
            bad = [n for n, p in self.model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
            raise diverged(out, loss, bad)
        self.optimizer.step()
        stats = {"loss": loss.detach(), "elbo": out.elbo.mean()}
        if out.recon is not None:
            stats["recon"], stats["kl"] = out.recon.mean(), out.kl.mean()
        if norm is not None:
            stats["grad_norm"] = norm.detach()
        return stats

    def _try_compiled(self, function, *args):
        """``function(*args)``, a compiled function; None if it fails to compile (no C++ compiler, say): then a
        warning, and this step runs eagerly from then on."""
        if not self.compiled and self.config.progress and self.rank == 0:
            from vaelab.config import AUTO_COMPILE_SAMPLES

            why = "" if self.config.compile else f": automatic for runs of >= {AUTO_COMPILE_SAMPLES:,} examples"
            skip = "compile=False / --no-compile to skip"
            print(f"compiling the training step (once, ~10-60 s{why}; {skip})", file=sys.stderr)
        try:
            result = function(*args)
        except ValueError:
            raise
        except Exception as err:
            if self.compiled:  # it compiled and ran before: this is not a compiler failure
                raise
            message = f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); training eagerly"
            warnings.warn(message, stacklevel=5)
            self.failed = True
            return None
        self.compiled = True
        return result


class CompiledObjectiveStep(EagerStep):
    """:class:`EagerStep` with the objective through ``torch.compile`` (forward and backward fused). A schedule's
    changing values go in as 0-d tensors so that they do not trigger a recompilation each."""

    def __init__(self, trainer: Trainer):
        super().__init__(trainer)
        self.compiled_objective = torch.compile(self.objective, dynamic=False)
        room_for(trainer.model)
        self.schedule_as_tensors = not isinstance(trainer.schedule, Constant)

    def _forward(self, batch: Batch, sched: dict[str, Any], bits) -> ObjectiveOutput:
        if self.failed or self.steps == 0:
            return super()._forward(batch, sched, bits)
        if self.schedule_as_tensors:
            sched = {name: host_scalar(value, self.device) for name, value in sched.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16), trusted_data():
            result = self._try_compiled(self.compiled_objective, batch, sched, bits)
        return super()._forward(batch, sched, bits) if result is None else ObjectiveOutput(*result)


class WholeStep(EagerStep):
    """A training step as one compiled function, for ``compile=True`` in a single process: the objective's gradients
    by ``torch.func.grad_and_value`` (forward and backward traced once into one graph, so no autograd engine runs
    per step), gradient clipping, and the Adam update written out (torch.optim.Adam's formula) on the optimizer's
    own state tensors, so checkpoints and resume are those of the eager step. The update is applied only where the
    loss and every gradient are finite (``torch.where`` in the graph): a step that fails the host's check leaves
    parameters and optimizer state as they were, as the eager step does. On this project's CPU it took training at
    batch 100 from 1.15x to ~1.6x a hand-written loop's samples/s (the compiled objective with eager backward and
    fused Adam before; docs/performance.md).

    The first step, and every step until one has filled Adam's state, runs eagerly (:class:`EagerStep`).
    """

    def __init__(self, trainer: Trainer):
        super().__init__(trainer)
        named = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.module = ObjectiveModule(trainer)  # its parameters are the model's, named "model.<name>"
        if not is_plain_adam(trainer.optimizer):
            raise ValueError("the compiled whole step implements plain Adam only")
        (group,) = trainer.optimizer.param_groups
        # constants of the graph, read once (the graph would otherwise guard on the param group's changing lr)
        (self.beta1, self.beta2), self.eps = group["betas"], group["eps"]
        self.bf16, self.grad_clip = trainer.config.bf16, trainer.config.grad_clip
        self.compiled_step = torch.compile(self._step, dynamic=False)
        room_for(trainer.model)
        self.schedule_as_tensors = not isinstance(trainer.schedule, Constant)
        self._counter: torch.Tensor | None = None  # the optimizer's step count, mirrored on the host as _count
        self._count = 0.0

    def _update(self, batch: Batch, sched: dict[str, Any], bits, lr: float) -> dict[str, torch.Tensor]:
        if self.failed or self.steps == 0 or not self.optimizer.state:
            return super()._update(batch, sched, bits, lr)
        if self.schedule_as_tensors:
            sched = {name: host_scalar(value, self.device) for name, value in sched.items()}
        with trusted_data():
            result = self._try_compiled(self._whole, batch, sched, bits, lr)
        if result is None:
            return super()._update(batch, sched, bits, lr)
        stats, finite, bad = result
        self.steps += 1
        if not finite:  # the graph left parameters and optimizer state as they were
            out = ObjectiveOutput(stats["loss"], stats["elbo"], stats.get("recon"), stats.get("kl"))
            bad_names = [name for name, flag in zip(self.names, bad.tolist(), strict=True) if flag]
            raise diverged(out, stats["loss"], bad_names)
        return stats

    def _whole(self, batch, sched, bits, lr: float):
        """(stats, finite, bad): the step's batch means, whether the update was applied (a bool: the step's one host
        synchronisation), and per parameter whether its gradient had a non-finite value."""
        state = [self.optimizer.state[p] for p in self.params]  # filled by the first (eager) step
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
        device = batch["x"].device
        stats, finite, bad = self.compiled_step(weights, *moments, host_scalar(factors, device), batch, sched, bits)
        finite = bool(finite)
        self._count += finite
        return stats, finite, bad

    def _loss(self, weights, batch, sched, bits):
        named = {f"model.{name}": w for name, w in zip(self.names, weights, strict=True)}
        out = ObjectiveOutput(*torch.func.functional_call(self.module, named, (batch, sched, bits)))
        means = {"elbo": out.elbo.mean()}
        if out.recon is not None:
            means["recon"], means["kl"] = out.recon.mean(), out.kl.mean()
        return out.loss.mean(), means

    def _step(self, weights, exp_avgs, exp_avg_sqs, steps, factors, batch, sched, bits):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            grads, (loss, means) = torch.func.grad_and_value(self._loss, has_aux=True)(weights, batch, sched, bits)
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


class ObjectiveModule(nn.Module):
    """The Trainer's objective as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.model = trainer.model
        self.objective = trainer.objective_outputs

    def forward(self, batch, sched, bits):
        return self.objective(batch, sched, bits)


def host_scalar(value, device: torch.device) -> torch.Tensor:
    """A number (or list of numbers) from the host as a tensor on ``device``, without a host synchronisation: on a
    GPU ``torch.tensor(value, device=...)`` copies from pageable memory and waits for the stream (a copy that is not
    ``non_blocking`` synchronises), so the value goes through pinned memory, asynchronously."""
    if device.type != "cuda":
        return torch.tensor(value, device=device)
    return torch.tensor(value, pin_memory=True).to(device, non_blocking=True)


def grads_finite(model: nn.Module) -> torch.Tensor:
    """Whether every gradient is finite, as a 0-d bool tensor (no host synchronisation)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    return torch.stack(torch._foreach_norm(grads)).isfinite().all()


def diverged(out: ObjectiveOutput, loss: torch.Tensor, bad_gradients: list[str]) -> TrainingDiverged:
    """The error for a step whose loss (then the term that made it so is named) or gradients are not finite; the
    Trainer adds the step."""
    if not bool(torch.isfinite(loss)):
        return TrainingDiverged(f"{_non_finite_term(out)} is not finite (loss = {loss.item()})")
    return TrainingDiverged(f"the gradient of {', '.join(bad_gradients) or 'a parameter'} is not finite")


def _non_finite_term(out: ObjectiveOutput) -> str:
    for name, value in (("reconstruction term E_q[log p(x|z)]", out.recon), ("KL term", out.kl)):
        if value is not None and not bool(torch.isfinite(value).all()):
            return name
    if not bool(torch.isfinite(out.elbo).all()):
        return "the log-weights log p(x,z) - log q(z|x)"
    return "the loss"
