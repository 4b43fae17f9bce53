"""Tests for vaelab._malloc: glibc's malloc kept from re-faulting streamed evaluation's temporaries.

Real processes: each case runs a fresh interpreter, whose allocator starts from glibc's defaults, and counts the
minor page faults of one eager ``log_marginal`` call (100 MNIST-sized images, k = 2000; ~150 chunks).
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
with torch.no_grad():
    vaelab.log_marginal(model, x, k=100)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    vaelab.log_marginal(model, x, k=2000)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(**malloc_env: str) -> int:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")} | malloc_env
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_streamed_evaluation_does_not_refault_its_temporaries():
    # log_marginal sets the allocator itself on CPU; with glibc's own static thresholds (128 KiB, what the user gets
    # by opting out this way) every chunk's 4 MiB temporaries are mapped and zero-filled anew
    tuned = _page_faults()
    untuned = _page_faults(MALLOC_TRIM_THRESHOLD_="131072", MALLOC_MMAP_THRESHOLD_="131072")
    assert untuned > 20_000, untuned  # the premise: ~150 chunks x several 4 MiB tensors faulted in
    assert tuned * 10 < untuned, (tuned, untuned)


def test_settings_from_the_environment_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1")
    assert keep_freed_memory.__wrapped__() == ("MALLOC_MMAP_THRESHOLD_",)
    for name in MALLOPT:
        monkeypatch.setenv(name, "1")
    assert keep_freed_memory.__wrapped__() == ()
