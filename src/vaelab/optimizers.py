"""Optimizers by name: the config's ``optimizer`` and ``optimizer_options`` (``{name, options}``) become one.

:data:`OPTIMIZERS` maps a name to ``factory(params, lr, **options) -> torch.optim.Optimizer``. Adam (the default) takes
torch's fused kernel where it can; the others are the standard ``torch.optim`` classes, their keyword arguments passed
through as they are (``{"weight_decay": 0.01}``, ``{"momentum": 0.9}``). The compiled whole step
(:class:`vaelab.steps.WholeStep`) writes plain Adam's update into its graph; every other optimizer, and Adam with
options that formula does not cover, runs torch's own ``step()`` after a compiled objective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def adam(params: Iterable[torch.Tensor], lr: float, **options: Any) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one kernel per parameter instead of a dozen small ops) where torch has it."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **options)
    except (RuntimeError, ValueError):  # fused not supported for this device or dtype, or with these options
        return torch.optim.Adam(params, lr=lr, **options)


# name -> factory(params, lr, **options); a new optimizer is one line here.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": adam,
    "adamw": lambda params, lr, **options: torch.optim.AdamW(params, lr=lr, **options),
    "sgd": lambda params, lr, **options: torch.optim.SGD(params, lr=lr, **options),
}


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float, options: dict[str, Any]):
    """``OPTIMIZERS[name](params, lr, **options)``, refusing an unknown name or option with a message naming it."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    try:
        return OPTIMIZERS[name](params, lr, **options)
    except TypeError as err:  # an unknown keyword
        raise ValueError(f"optimizer_options {options} are not accepted by {name!r}: {err}") from None


def is_plain_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is Adam whose update is the formula :class:`vaelab.steps.WholeStep` writes out."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return False
    (group,) = optimizer.param_groups
    return not (group["weight_decay"] or group["amsgrad"] or group["maximize"] or group.get("decoupled_weight_decay"))
