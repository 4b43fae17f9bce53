"""Training steps: the compiled whole step (gradients and Adam's update in one graph) and the optimizer helpers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from vaelab.objectives import ObjectiveOutput

if TYPE_CHECKING:
    from vaelab.train import Trainer


class WholeStep:
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
        self.module = ObjectiveModule(trainer)  # its parameters are the model's, named "model.<name>"
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
        stats, finite, bad = self.compiled(weights, *moments, host_scalar(factors, x.device), x, sched, bits)
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


class ObjectiveModule(nn.Module):
    """The Trainer's objective as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.model = trainer.model
        self.objective = trainer._objective

    def forward(self, x, sched, bits):
        return self.objective(x, sched, bits)


def adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one kernel per parameter instead of a dozen small ops) where torch has it."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # fused not supported for this device or dtype
        return torch.optim.Adam(params, lr=lr)


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
