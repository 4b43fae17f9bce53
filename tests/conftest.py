"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: faster for tiny networks, and no OpenMP spinning when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after: every case compiles its own graph (no recompile limit across
    parametrized cases, no graph reused from another test)."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
