"""Small numerical helpers shared by every module (one home for each trick)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def positive_scale(raw: torch.Tensor, floor: float) -> torch.Tensor:
    """Map an unconstrained tensor to a scale > ``floor``: ``softplus(raw) + floor``.

    softplus keeps gradients alive for very negative ``raw`` (unlike ``exp``, it does not underflow to a scale of 0
    in float32) and grows linearly for large ``raw`` (no overflow).
    """
    return F.softplus(raw) + floor


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """The ``raw`` with ``softplus(raw) == y`` for ``y > 0``: ``y + log(-expm1(-y))``."""
    return y + torch.log(-torch.expm1(-y))


def log_mean_exp(log_values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log(mean(exp(log_values)))`` along ``dim``, computed stably with ``logsumexp``."""
    return torch.logsumexp(log_values, dim=dim) - math.log(log_values.shape[dim])
