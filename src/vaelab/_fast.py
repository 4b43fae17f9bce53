"""Fast paths: the same mathematics as :mod:`vaelab.nets` and :mod:`vaelab.likelihoods`, computed differently inside
``torch.compile``, where Inductor's own code for it is slower. Eagerly every function here is torch's plain formula.

* :func:`tanh`: compiled on CPU, a large tanh is an opaque call to ATen's kernel (Inductor generates its own, slower
  one for CPUs), bit for bit the eager values, with the derivative 1 - y^2 written out.
* :class:`IndependentBernoulli`: ``Independent(Bernoulli(logits), n)`` whose compiled ``log_prob`` takes one ``exp``
  per value instead of two ``exp`` and a ``log``, and writes its gradient out.

Why each pays, and the measurements behind the thresholds: docs/performance.md ("Fast paths").
"""

from __future__ import annotations

import weakref

import torch
from torch.distributions import Independent

# --- one compiled specialisation per model --------------------------------------------------------------------------
_COMPILED_FOR: set[int] = set()  # ids of the live models compiled for (a tensor cannot key a WeakSet: its == is
# elementwise); each removed when its object is collected


def room_for(model) -> None:
    """Make room in dynamo's cache for ``model``'s own compiled specialisation (once per model).

    vaelab compiles the same functions (the training step, the estimators' log-weights) for every model, and dynamo
    keeps at most ``recompile_limit`` specialisations of one function per process (8 by default); past it, the
    function runs eagerly, with a log warning and no error. So a process that trained or scored a ninth model (a
    notebook, a sweep, ``vaelab compare`` of many runs, a benchmark of several families) silently lost compilation.
    The first time a model is compiled for, the limit rises by one: its own slot. A model is known by its first
    parameter, so the views :func:`vaelab.models.bind` makes of one model (one per batch of labels) share its slot."""
    key = next(iter(model.parameters()), model) if hasattr(model, "parameters") else model
    if id(key) not in _COMPILED_FOR:
        _COMPILED_FOR.add(id(key))
        weakref.finalize(key, _COMPILED_FOR.discard, id(key))
        torch._dynamo.config.recompile_limit += 1


# --- tanh ---------------------------------------------------------------------------------------------------------
# Below this many values the opaque call costs more than Inductor's tanh saves (break-even measured at ~25-30k values
# for a compiled Linear -> tanh -> Linear on CPU: docs/performance.md).
ATEN_TANH_MIN_VALUES = 32768


def tanh(x: torch.Tensor) -> torch.Tensor:
    """``torch.tanh(x)``; compiled on CPU with at least :data:`ATEN_TANH_MIN_VALUES` values, ATen's kernel."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() >= ATEN_TANH_MIN_VALUES:
        return _CompiledTanh.apply(x)
    return torch.tanh(x)


@torch.library.custom_op("vaelab::tanh", mutates_args=())
def _aten_tanh(x: torch.Tensor) -> torch.Tensor:
    """``torch.tanh``, opaque to torch.compile: a compiled graph calls ATen's kernel for it."""
    return torch.tanh(x)


@_aten_tanh.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _CompiledTanh(torch.autograd.Function):
    """tanh through :func:`_aten_tanh`, with its derivative written out from the output: 1 - tanh(x)^2."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _aten_tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


# --- the Bernoulli log-probability -----------------------------------------------------------------------------------
# Values per block of the compiled Bernoulli log-normalizer: each factor 1 + e^-|l| lies in (1, 2], so a block's product
# stays below 2^64 (float32 and bfloat16 reach 2^128) and is accurate to ~64 float32 roundings (~4e-6 relative).
_BERNOULLI_BLOCK = 64


def _largest_divisor(n: int, limit: int) -> int:
    return max(b for b in range(1, min(n, limit) + 1) if n % b == 0)


class IndependentBernoulli(Independent):
    """``Independent(Bernoulli(logits), n)`` whose ``log_prob`` takes one ``exp`` per value inside ``torch.compile``.

    log p(x) = sum_i x_i l_i - softplus(l_i), softplus(l) = max(l, 0) + log(1 + e^-|l|). torch's Bernoulli computes
    each value's BCE-with-logits (two ``exp`` and a ``log``; compiled with its gradient, a second pass over the
    values). Inside ``torch.compile`` the last term is summed instead as sum_blocks log prod_{i in block}
    (1 + e^-|l_i|): one ``exp`` per value and one ``log`` per block of up to 64 values (the largest divisor of the
    event size), and with gradients the derivative is written out, d/dl log p = x - sigmoid(l), with sigmoid(l)
    from the same e^-|l| (the product's own backward is slow). Half-precision logits are summed in float32. Eagerly,
    where the extra passes would cost more than they save, torch's formula.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().log_prob(value)
        logits = self.base_dist.logits
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        n = self.reinterpreted_batch_ndims
        logits, value = logits.flatten(-n), value.flatten(-n)  # (..., D)
        if torch.is_grad_enabled():
            return _BlockedBernoulliLogProb.apply(logits, value)
        return _blocked_bernoulli_log_prob(logits, value)


def _blocked_bernoulli_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum_i x_i l_i - max(l_i, 0) - log(1 + e^-|l_i|) over the last dimension, the logs taken per block."""
    blocks = logits.abs().neg().exp().add(1).unflatten(-1, (-1, _largest_divisor(logits.shape[-1], _BERNOULLI_BLOCK)))
    return (value * logits - logits.clamp(min=0)).sum(-1) - blocks.prod(-1).log().sum(-1)


class _BlockedBernoulliLogProb(torch.autograd.Function):
    """:func:`_blocked_bernoulli_log_prob` with its gradient written out: d/dl = x - sigmoid(l), d/dx = l. The
    sigmoid is recomputed from e^-|l| in the backward (cheaper than storing it: the pass is fused either way)."""

    @staticmethod
    def forward(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return _blocked_bernoulli_log_prob(logits, value)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, value = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        grad_logits = grad_value = None
        if ctx.needs_input_grad[0]:
            e = logits.abs().neg().exp()
            sigmoid = torch.where(logits >= 0, 1, e) / (1 + e)
            grad_logits = grad * (value - sigmoid)
        if ctx.needs_input_grad[1]:
            grad_value = grad * logits
        return grad_logits, grad_value
