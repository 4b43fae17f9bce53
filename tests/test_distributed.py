"""The trainer under a real `torchrun --nproc_per_node 2` (gloo, CPU) against the same run in one process.

Each rank draws its own Monte Carlo noise, so the two runs agree statistically, not bitwise. Stated tolerance: the
final validation ELBO of the 2-process run is within 1 nat of the 1-process run's, while training itself moves it by
more than 5 nats (observed difference: about 0.2 nats).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = """
import sys, torch
from vaelab.train import TrainConfig, train
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
W = torch.randn(4, 64, generator=g) * 3
z = torch.randn(2000, 4, generator=g)
data = torch.bernoulli(torch.sigmoid(z @ W), generator=g)
cfg = TrainConfig(architecture_options={"hidden": [64]}, latent_dim=4, batch_size=50, epochs=4, log_every=8,
                  eval_k=20, progress=False)
train_x, valid_x = data[:1600], data[1600:]
if len(sys.argv) > 2:  # the same data from a memory-mapped uint8 .npy (written by the first, single-process run)
    import os
    import numpy as np
    from vaelab.data import MappedRows, load_dataset
    if not os.path.exists(sys.argv[2]):
        np.save(sys.argv[2], (data * 255).to(torch.uint8).numpy())
    splits = load_dataset(sys.argv[2], validation_size=400)
    assert isinstance(splits.train, MappedRows)
    train_x, valid_x = splits.train, splits.valid
train(cfg, train_x, valid_x, sys.argv[1])
"""

TOLERANCE_NATS = 1.0


def _valid_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [(line["split"], line["step"]) for line in lines]
    assert len(steps) == len(set(steps)), "a metric line was written twice (more than one rank writing?)"
    return [line for line in lines if line["split"] == "valid"]


@pytest.mark.parametrize("source", ["tensor", "npy"], ids=["in-memory", "memory-mapped-npy"])
def test_two_process_torchrun_matches_single_process(tmp_path, source):
    # "npy": each process maps the same uint8 file (vaelab.data.MappedRows) and reads its batches from it
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not found beside the Python interpreter")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    single, double = tmp_path / "single", tmp_path / "double"
    extra = [str(tmp_path / "data.npy")] if source == "npy" else []
    subprocess.run([sys.executable, str(driver), str(single), *extra], check=True, timeout=300, capture_output=True)
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(driver), str(double), *extra],
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _valid_lines(single), _valid_lines(double)
    assert [line["step"] for line in one] == [line["step"] for line in two]
    assert two[-1]["elbo"] - two[0]["elbo"] > 5  # the 2-process run learns
    assert abs(two[-1]["elbo"] - one[-1]["elbo"]) < TOLERANCE_NATS
    assert (double / "model.safetensors").is_file()
    assert sorted(p.name for p in (double / "checkpoints").iterdir() if p.name.startswith("step_"))
