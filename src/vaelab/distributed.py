"""Distributed training helpers for ``torchrun``: no-ops in a single process (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


# --- distributed helpers (no-ops in a single process) ------------------------------------------------------------
def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): joins the process group torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def average_gradients(model: nn.Module, world: int) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_ranks(flag: bool, world: int, device: torch.device) -> bool:
    """True only if ``flag`` holds on every rank (so all ranks take the same branch)."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)  # nccl reduces device tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean_over_ranks(values: list[torch.Tensor], world: int, device: torch.device) -> list[float]:
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in values])
    if world > 1:
        dist.all_reduce(stacked)
        stacked = stacked / world
    return stacked.tolist()
