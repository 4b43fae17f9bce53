"""Tests for vaelab._malloc: glibc's malloc kept from re-faulting streamed evaluation's temporaries.

Real processes: each case runs a fresh interpreter, whose allocator starts from glibc's defaults, and counts the
minor page faults of one eager ``log_marginal`` call (100 MNIST-sized images, k = 2000; ~150 chunks). The setting is
process-wide, so the library never makes it by itself: the command line and the benchmarks opt in.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vaelab._malloc import MALLOPT, keep_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

_SCRIPT = """
import resource, torch
import vaelab
from vaelab.likelihoods import BernoulliLikelihood
from vaelab.models import VAE
from vaelab.nets import iwae_1layer_pair
from vaelab.priors import StandardNormal
torch.manual_seed(0)
encoder, decoder = iwae_1layer_pair((784,), 50)
model = VAE(prior=StandardNormal(50), encoder=encoder, decoder=decoder, likelihood=BernoulliLikelihood((784,)))
x = (torch.rand(100, 784) < 0.3).float()
if OPT_IN:
    vaelab.keep_freed_memory()
with torch.no_grad():
    vaelab.log_marginal(model, x, k=100)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    vaelab.log_marginal(model, x, k=2000)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, vaelab.keep_freed_memory.cache_info().currsize)
"""


def _page_faults(opt_in: bool, **malloc_env: str) -> tuple[int, int]:
    """(minor page faults of the call, how many times keep_freed_memory ran in the process)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")} | malloc_env
    script = f"OPT_IN = {opt_in}\n" + _SCRIPT
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    faults, calls = out.stdout.split()[-2:]
    return int(faults), int(calls)


def test_opting_in_keeps_streamed_evaluation_from_refaulting_its_temporaries():
    # with glibc's own static thresholds (128 KiB, forced here from the environment) every chunk's 4 MiB temporaries
    # are mapped and zero-filled anew; opting in keeps them (and the environment's settings win, which is the opt-out)
    tuned, _ = _page_faults(opt_in=True)
    untuned, _ = _page_faults(opt_in=True, MALLOC_TRIM_THRESHOLD_="131072", MALLOC_MMAP_THRESHOLD_="131072")
    assert untuned > 20_000, untuned  # the premise: ~150 chunks x several 4 MiB tensors faulted in
    assert tuned * 10 < untuned, (tuned, untuned)


def test_the_library_leaves_the_process_allocator_alone():
    # log_marginal on CPU, without opting in, never calls mallopt (keep_freed_memory is its only caller in vaelab)
    assert _page_faults(opt_in=False)[1] == 0
    assert _page_faults(opt_in=True)[1] == 1


def test_the_command_line_opts_in(tmp_path):
    # any command (here one that fails at once: no such run) sets it before it runs
    script = (
        f"import vaelab, vaelab.cli\nrc = vaelab.cli.main(['sample', {str(tmp_path / 'missing')!r}])\n"
        "print(rc, vaelab.keep_freed_memory.cache_info().currsize)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2", "1"], done.stdout + done.stderr


def test_settings_from_the_environment_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1")
    assert keep_freed_memory.__wrapped__() == ("MALLOC_MMAP_THRESHOLD_",)
    for name in MALLOPT:
        monkeypatch.setenv(name, "1")
    assert keep_freed_memory.__wrapped__() == ()
