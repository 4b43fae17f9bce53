"""The training loop end to end, on real files, real processes and real signals (no mocks).

Data: 1600 training / 400 validation images of 64 pixels from a random sigmoid belief net (z ~ N(0, I_4),
p = sigmoid(z W), W ~ 3 N(0, 1)), dynamically binarized; an MLP VAE with one hidden layer of 64 units and 4 latent
dimensions. A few hundred Adam steps of batch 50 take about a second on one CPU core.

Interruption tests run :func:`vaelab.train.train` in a child process (a driver script written to ``tmp_path``, one
torch thread, data and config read from files), stop it by SIGKILL, SIGTERM or SIGINT once a checkpoint exists, resume
it, and compare the final weights bit for bit with an uninterrupted child run of the same config.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vaelab.checkpoint import FAULT_POINTS, CheckpointError, load_checkpoint
from vaelab.steps import EagerStep, WholeStep
from vaelab.train import TrainConfig, Trainer, TrainingDiverged, build_model, latest_checkpoint, train

DATA_DIM, LATENT_DIM = 64, 4


# --- data, configs, run directories -----------------------------------------------------------------------------------
def make_data(seed: int = 0, n_train: int = 1600, n_valid: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel probabilities ``[N, 64]`` from a random sigmoid belief net (binarized by the trainer)."""
    g = torch.Generator().manual_seed(seed)
    weights = 3 * torch.randn(LATENT_DIM, DATA_DIM, generator=g)
    probs = torch.sigmoid(torch.randn(n_train + n_valid, LATENT_DIM, generator=g) @ weights)
    return probs[:n_train].contiguous(), probs[n_train:].contiguous()


TRAIN, VALID = make_data()


def small_config(**overrides) -> TrainConfig:
    options = dict(
        architecture_options={"hidden": [64]},
        latent_dim=LATENT_DIM,
        batch_size=50,
        binarize=True,
        progress=False,
        log_every=10,
        eval_k=10,
        eval_examples=200,
    )
    options.update(overrides)
    return TrainConfig(**options)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def without_timings(line: dict) -> dict:
    """A metric line without its wall-clock fields, which differ from run to run."""
    return {k: v for k, v in line.items() if k not in ("samples_per_sec", "seconds")}


def lines(run_dir: Path, split: str) -> list[dict]:
    return [line for line in read_metrics(run_dir) if line["split"] == split]


def step_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the complete step checkpoints now in ``run_dir`` (temporary and 'best' directories excluded)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in ckpt_dir.iterdir() if re.fullmatch(r"step_\d{8}", p.name))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_all_finite(weights: dict[str, torch.Tensor]) -> None:
    for name, value in weights.items():
        assert bool(torch.isfinite(value).all()), name


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs between {a} and {b}"


pytestmark = pytest.mark.usefixtures("one_thread")


# --- a small run ------------------------------------------------------------------------------------------------------
def test_small_run_learns_and_writes_everything(tmp_path):
    config = small_config(max_steps=160, eval_every=20, checkpoint_every=20, keep_last=2)
    result = train(config, TRAIN, VALID, tmp_path)
    assert result.step == 160 and result.interrupted is None

    # validation ELBO improves by a clear margin (about 40 -> 31 nats on this data)
    valid = lines(tmp_path, "valid")
    assert [line["step"] for line in valid] == list(range(20, 161, 20))
    assert valid[-1]["elbo"] > valid[0]["elbo"] + 5, (valid[0]["elbo"], valid[-1]["elbo"])
    for line in valid:
        assert {"split", "step", "epoch", "elbo", "iwae_10", "examples", "seconds"} <= line.keys()
        assert line["examples"] == 200 and math.isfinite(line["iwae_10"])
        assert line["iwae_10"] >= line["elbo"] - 1.0  # IWAE_10 is the tighter bound (up to Monte Carlo noise)

    train_lines = lines(tmp_path, "train")
    assert [line["step"] for line in train_lines] == list(range(10, 161, 10))
    for line in train_lines:
        assert {"step", "epoch", "elbo", "recon", "kl", "beta", "lr", "samples_per_sec", "loss"} <= line.keys()
        assert line["epoch"] == line["step"] / 32  # 1600 / 50 steps per epoch
        assert line["beta"] == 1.0 and line["lr"] == config.lr and line["samples_per_sec"] > 0
        assert line["elbo"] == pytest.approx(line["recon"] - line["kl"], rel=1e-5)
    assert {line["split"] for line in read_metrics(tmp_path)} == {"train", "valid"}

    # the config round-trips, and every checkpoint carries it
    assert TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == config

    # keep_last step checkpoints plus 'best'; latest.json names the newest; data only (no pickle)
    ckpt_dir = tmp_path / "checkpoints"
    assert {p.suffix for p in ckpt_dir.rglob("*") if p.is_file()} == {".safetensors", ".json"}
    assert step_checkpoints(tmp_path) == [140, 160]
    assert json.loads((ckpt_dir / "latest.json").read_text()) == {"checkpoint": "step_00000160"}
    assert latest_checkpoint(tmp_path) == ckpt_dir / "step_00000160"
    _, _, best_meta = load_checkpoint(ckpt_dir / "best")
    best_line = max(valid, key=lambda line: line["elbo"])
    assert best_meta["step"] == best_line["step"] and best_meta["best_elbo"] == best_line["elbo"]
    assert TrainConfig.from_dict(best_meta["config"]) == config

    # final weights: the last checkpoint's, and they fit the model the config describes
    final = load_file(tmp_path / "model.safetensors")
    last_weights, _, last_meta = load_checkpoint(ckpt_dir / "step_00000160")
    assert last_meta["step"] == 160
    assert final.keys() == last_weights.keys() == build_model(config, (DATA_DIM,)).state_dict().keys()
    assert all(torch.equal(final[k], last_weights[k]) for k in final)

    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(p.stat().st_size > 0 for p in events)


def test_train_takes_a_model_built_by_hand_and_trains_that_object(tmp_path):
    config = small_config(max_steps=3, compile=False, eval_examples=20)
    torch.manual_seed(1)
    model = build_model(config, (DATA_DIM,))
    start = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = Trainer(config, TRAIN, VALID, tmp_path, model=model)
    assert trainer.model is model
    assert all(torch.equal(value.cpu(), start[name]) for name, value in model.state_dict().items())  # as given
    trainer.fit()
    final = load_file(tmp_path / "model.safetensors")  # on the CPU, whatever the training device
    assert all(torch.equal(final[name], value.cpu()) for name, value in model.state_dict().items())
    assert not torch.equal(final["decoder.output_layer.weight"], start["decoder.output_layer.weight"])


def test_validation_on_a_subset_takes_rows_spread_over_the_split(tmp_path):
    """eval_examples m of N validation rows are rows i * N // m (vaelab.data.spread), not the first m: files can be
    ordered (static binarized MNIST's run through the digits). The same rows given as the whole validation set, with
    the same weights and seed, give the same numbers exactly."""
    from vaelab.data import spread

    gen = torch.Generator().manual_seed(3)
    train, valid = (torch.bernoulli(x, generator=gen) for x in (TRAIN, VALID))  # binary already: no binarization
    valid[: len(valid) // 2] = 0  # the first half all zeros, as an ordered file's first rows can be
    scores = []
    for eval_examples, data in ((100, valid), (None, valid[spread(len(valid), 100)])):
        torch.manual_seed(1)
        config = small_config(compile=False, binarize=False, eval_examples=eval_examples)
        scores.append(Trainer(config, train, data, tmp_path / str(eval_examples)).evaluate())
    assert scores[0]["examples"] == scores[1]["examples"] == 100
    assert {k: v for k, v in scores[0].items() if k != "seconds"} == {
        k: v for k, v in scores[1].items() if k != "seconds"
    }


def test_metrics_after_resume_have_no_duplicated_steps(tmp_path):
    """A run that logged past its last checkpoint and died: resuming drops those lines and logs them again once."""
    config = small_config(max_steps=40, log_every=5, eval_every=10, checkpoint_every=20)
    train(config, TRAIN, VALID, tmp_path)
    reference = read_metrics(tmp_path)
    # the state a crash between the step-40 lines and the step-40 checkpoint leaves behind
    ckpt_dir = tmp_path / "checkpoints"
    for p in (ckpt_dir / "step_00000040").iterdir():
        p.unlink()
    (ckpt_dir / "step_00000040").rmdir()
    (ckpt_dir / "latest.json").write_text(json.dumps({"checkpoint": "step_00000020"}))
    (tmp_path / "model.safetensors").unlink()

    result = train(config, TRAIN, VALID, tmp_path, resume=True)
    assert result.step == 40
    resumed = read_metrics(tmp_path)
    keys = [(line["split"], line["step"]) for line in resumed]
    assert len(keys) == len(set(keys))
    assert [without_timings(line) for line in resumed] == [without_timings(line) for line in reference]


def test_the_first_train_line_after_a_resume_averages_the_steps_before_it_too(tmp_path):
    """Checkpoints at steps that are not multiples of log_every: the line after a resume averages the steps since the
    last line, before and after the checkpoint (the running sums travel in it), as the uninterrupted run's did."""
    config = small_config(max_steps=40, log_every=15, eval_every=20, checkpoint_every=10)
    train(config, TRAIN, VALID, tmp_path)
    reference = read_metrics(tmp_path)
    ckpt_dir = tmp_path / "checkpoints"  # as if killed right after the step-20 checkpoint
    for name in ("step_00000030", "step_00000040"):
        shutil.rmtree(ckpt_dir / name)
    (ckpt_dir / "latest.json").write_text(json.dumps({"checkpoint": "step_00000020"}))
    (tmp_path / "model.safetensors").unlink()
    assert train(config, TRAIN, VALID, tmp_path, resume=True).step == 40
    resumed = read_metrics(tmp_path)
    assert [(line["split"], line["step"]) for line in lines(tmp_path, "train")] == [
        ("train", 15),
        ("train", 30),
        ("train", 40),
    ]
    assert [without_timings(line) for line in resumed] == [without_timings(line) for line in reference]


def test_training_throughput_excludes_validation_time(tmp_path, monkeypatch):
    # samples_per_sec is the training steps' rate: an interval that contains a validation pass (here made to take
    # at least a second) must not count that pass, which is logged with its own seconds
    import vaelab.train

    slow = 1.0  # seconds per validation pass, at least: 4 batches of 50 examples, 1/4 s each
    log_marginal = vaelab.train.log_marginal

    def slow_log_marginal(*args, **kwargs):
        time.sleep(slow / 4)
        return log_marginal(*args, **kwargs)

    monkeypatch.setattr(vaelab.train, "log_marginal", slow_log_marginal)
    train(small_config(max_steps=30, eval_every=10, log_every=5), TRAIN, VALID, tmp_path)
    assert [line["seconds"] >= slow for line in lines(tmp_path, "valid")] == [True] * 3
    intervals = [5 * 50 / line["samples_per_sec"] for line in lines(tmp_path, "train")]
    assert len(intervals) == 6 and max(intervals) < slow / 2, intervals


# --- interrupted runs in a child process ------------------------------------------------------------------------------
DRIVER = """\
import json
import sys

import torch
from safetensors.torch import load_file

from vaelab.train import TrainConfig, train

torch.set_num_threads(1)
data_file, config_file, run_dir, mode = sys.argv[1:]
data = load_file(data_file)
config = TrainConfig.from_dict(json.loads(open(config_file).read()))
result = train(config, data["train"], data["valid"], run_dir, resume=mode == "resume")
print(json.dumps({"step": result.step, "interrupted": result.interrupted}))
"""

# one configuration for every child run: 160 steps, a checkpoint every 10, log lines every 5
CHILD_CONFIG = dict(max_steps=160, checkpoint_every=10, eval_every=40, log_every=5)


class Driver:
    """Runs ``DRIVER`` in a fresh Python process: ``start`` returns the Popen, ``run`` waits for it."""

    def __init__(self, root: Path):
        self.root = root
        self.script = root / "driver.py"
        self.script.write_text(DRIVER)
        self.data = root / "data.safetensors"
        save_file({"train": TRAIN, "valid": VALID}, self.data)
        self.env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def config_file(self, **overrides) -> Path:
        config = small_config(**{**CHILD_CONFIG, **overrides})
        text = json.dumps(dataclasses.asdict(config), sort_keys=True)
        path = self.root / f"config-{hashlib.sha1(text.encode()).hexdigest()[:12]}.json"
        path.write_text(text)
        return path

    def start(self, run_dir: Path, *, resume: bool = False, **overrides) -> subprocess.Popen:
        args = [sys.executable, str(self.script), str(self.data), str(self.config_file(**overrides)), str(run_dir)]
        args.append("resume" if resume else "new")
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)

    def run(self, run_dir: Path, *, resume: bool = False, **overrides) -> dict:
        proc = self.start(run_dir, resume=resume, **overrides)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        return json.loads(out.splitlines()[-1]) | {"stderr": err}


def wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 60.0) -> None:
    """Poll (every 2 ms) until ``ready()``; fail if the child exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the child exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Driver:
    return Driver(tmp_path_factory.mktemp("driver"))


@pytest.fixture(scope="module")
def reference_run(driver) -> Path:
    """An uninterrupted child run of ``CHILD_CONFIG``."""
    run_dir = driver.root / "reference"
    assert driver.run(run_dir)["step"] == 160
    return run_dir


def test_sigkill_then_resume_is_bit_identical(driver, reference_run, tmp_path):
    proc = driver.start(tmp_path)
    wait_until(proc, lambda: any(s >= 30 for s in step_checkpoints(tmp_path)), "a checkpoint at step >= 30")
    proc.kill()  # SIGKILL: no handler runs, no final save
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "model.safetensors").exists()  # it really died mid-run
    killed_at = step_checkpoints(tmp_path)[-1]
    assert 30 <= killed_at < 160

    done = driver.run(tmp_path, resume=True)
    assert done["step"] == 160 and done["interrupted"] is None
    assert re.search(r"resumed from .*step_\d{8} at step (\d+)", done["stderr"])
    assert_same_weights(tmp_path / "model.safetensors", reference_run / "model.safetensors")
    for name in ("step_00000160", "best"):  # optimizer moments and RNG state too
        for file in ("model.safetensors", "state.safetensors"):
            assert_same_weights(tmp_path / "checkpoints" / name / file, reference_run / "checkpoints" / name / file)

    # checkpoint steps are multiples of log_every, so even the averaged train lines match the reference's
    resumed, reference = read_metrics(tmp_path), read_metrics(reference_run)
    keys = [(line["split"], line["step"]) for line in resumed]
    assert len(keys) == len(set(keys)), "duplicated metric lines after resume"
    assert keys == [(line["split"], line["step"]) for line in reference]
    for a, b in zip(resumed, reference, strict=True):
        assert without_timings(a) == without_timings(b)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_with_a_checkpoint(driver, reference_run, tmp_path, sig):
    proc = driver.start(tmp_path)
    wait_until(proc, lambda: bool(step_checkpoints(tmp_path)), "the first checkpoint")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    # train() catches the signal, saves and returns normally (TrainResult.interrupted names the signal)
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["interrupted"] == sig.name
    match = re.search(rf"stopped by {sig.name} at step (\d+); checkpoint saved in (\S+)\. Resume with: .*--resume", err)
    assert match, err
    stopped_at = int(match[1])
    assert 10 <= stopped_at < 160
    assert Path(match[2]) == tmp_path / "checkpoints"
    assert not (tmp_path / "model.safetensors").exists()

    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoints" / f"step_{stopped_at:08d}"
    weights, _, meta = load_checkpoint(latest)
    assert meta["step"] == stopped_at
    assert_all_finite(weights)

    done = driver.run(tmp_path, resume=True)
    assert done["step"] == 160 and done["interrupted"] is None
    assert_same_weights(tmp_path / "model.safetensors", reference_run / "model.safetensors")
    keys = [(line["split"], line["step"]) for line in read_metrics(tmp_path)]
    assert len(keys) == len(set(keys)), "duplicated metric lines after resume"


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_a_kill_at_any_point_of_a_save_resumes_or_restarts_to_the_same_weights(driver, reference_run, tmp_path, point):
    # VAELAB_FAULT kills the child (SIGKILL) at the first time it reaches that point of a save: the config file at the
    # start, the first step checkpoint, or the second 'best'. Then resume (or, with no checkpoint yet, a fresh start in
    # the same directory) must work and end with the uninterrupted run's weights, bit for bit.
    args = [sys.executable, str(driver.script), str(driver.data), str(driver.config_file()), str(tmp_path), "new"]
    env = dict(driver.env, VAELAB_FAULT=point)
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "model.safetensors").exists()
    resume = latest_checkpoint(tmp_path) is not None
    assert resume == (point != "text-written" and point != "checkpoint-files-written"), point
    done = driver.run(tmp_path, resume=resume)
    assert done["step"] == 160
    assert_same_weights(tmp_path / "model.safetensors", reference_run / "model.safetensors")
    assert not [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def kill_and_resume(driver: Driver, run_dir: Path, points: tuple[str, ...], kills: int, seed: int) -> list[str]:
    """SIGKILL child runs in ``run_dir`` ``kills`` times (each one resumed, or started afresh when no checkpoint exists
    yet): first at each fault point of ``points``, then after a random delay (seeded) in or around
    the ~2-4 s a child takes to import, load and train. A child that finishes before its kill is not counted. Returns
    where each kill struck."""
    rng = random.Random(seed)
    struck: list[str] = []
    forced = list(points)
    while len(struck) < kills:
        resume = latest_checkpoint(run_dir) is not None
        point = forced.pop(0) if forced else None
        args = [sys.executable, str(driver.script), str(driver.data), str(driver.config_file()), str(run_dir)]
        env = dict(driver.env, VAELAB_FAULT=point) if point else driver.env
        proc = subprocess.Popen(
            [*args, "resume" if resume else "new"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if point is None:
            try:
                proc.wait(timeout=rng.uniform(1.0, 4.5))
            except subprocess.TimeoutExpired:
                proc.kill()
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:  # it finished first: start again from nothing, the kill did not count
            shutil.rmtree(run_dir)
            continue
        assert proc.returncode == -signal.SIGKILL, err[-3000:]
        struck.append(f"{point or 'random'} at {step_checkpoints(run_dir)[-1:] or 'no checkpoint'}")
    done = driver.run(run_dir, resume=latest_checkpoint(run_dir) is not None)
    assert done["step"] == 160
    return struck


def test_kill_9_four_times_then_the_same_weights(driver, reference_run, tmp_path):
    # the short version of the next test (in CI): two forced kills inside a save, two at random moments
    struck = kill_and_resume(driver, tmp_path / "run", FAULT_POINTS[:2], kills=4, seed=0)
    assert len(struck) == 4
    assert_same_weights(tmp_path / "run" / "model.safetensors", reference_run / "model.safetensors")


@pytest.mark.slow
def test_kill_9_at_twenty_four_points_then_the_same_weights(driver, reference_run, tmp_path):
    # every fault point, then 20 random moments, in one run directory: each kill followed by a resume (or a fresh
    # start, when it struck before the first checkpoint); the final weights are the uninterrupted run's, bit for bit
    struck = kill_and_resume(driver, tmp_path / "run", FAULT_POINTS, kills=len(FAULT_POINTS) + 20, seed=1)
    assert len(struck) == len(FAULT_POINTS) + 20
    assert_same_weights(tmp_path / "run" / "model.safetensors", reference_run / "model.safetensors")


def test_resume_passes_over_a_damaged_latest_checkpoint_pointer_and_metric_line(driver, reference_run, tmp_path):
    # killed after a few checkpoints; then the newest checkpoint's weights are damaged, latest.json is torn and so is
    # the last metric line: the resume starts from the newest intact checkpoint and still ends bit for bit the same
    proc = driver.start(tmp_path)
    wait_until(proc, lambda: len(step_checkpoints(tmp_path)) >= 3, "three step checkpoints")
    proc.kill()
    proc.communicate(timeout=60)
    *_, older, newest = step_checkpoints(tmp_path)
    ckpt = tmp_path / "checkpoints"
    (ckpt / f"step_{newest:08d}" / "model.safetensors").write_bytes(b"\x00" * 64)
    (ckpt / "latest.json").write_text('{"checkpoint": "step_')
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "st')
    done = driver.run(tmp_path, resume=True)
    assert f"skipping a damaged checkpoint: cannot read checkpoint {ckpt / f'step_{newest:08d}'}" in done["stderr"]
    assert f"resumed from {ckpt / f'step_{older:08d}'} at step {older}" in done["stderr"]
    assert done["step"] == 160
    assert_same_weights(tmp_path / "model.safetensors", reference_run / "model.safetensors")
    keys = [(line["split"], line["step"]) for line in read_metrics(tmp_path)]
    assert keys == [(line["split"], line["step"]) for line in read_metrics(reference_run)]


def test_restart_after_death_before_first_checkpoint_starts_clean_metrics(driver, tmp_path):
    proc = driver.start(tmp_path, checkpoint_every=1000)
    metrics = tmp_path / "metrics.jsonl"
    wait_until(proc, lambda: metrics.is_file() and metrics.read_text().endswith("\n"), "a metric line")
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not step_checkpoints(tmp_path)
    with pytest.raises(CheckpointError):
        Trainer(small_config(max_steps=10), TRAIN, VALID, tmp_path, resume=True)
    train(small_config(max_steps=10, log_every=5), TRAIN, VALID, tmp_path)
    assert [(line["split"], line["step"]) for line in read_metrics(tmp_path)] == [
        ("train", 5),
        ("train", 10),
        ("valid", 10),
    ]


# --- non-finite values ------------------------------------------------------------------------------------------------
NAN_ROW = 123


def nan_data(binarize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, valid) with a NaN in training row ``NAN_ROW``: probabilities, or one fixed binarization of them."""
    if binarize:
        train_data, valid_data = TRAIN.clone(), VALID
    else:
        g = torch.Generator().manual_seed(1)
        train_data, valid_data = (torch.bernoulli(x, generator=g) for x in (TRAIN, VALID))
    train_data[NAN_ROW, 5] = math.nan
    return train_data, valid_data


@pytest.mark.parametrize("init_decoder_bias", [False, True], ids=["plain-init", "bias-from-mean"])
@pytest.mark.parametrize("binarize", [False, True], ids=["fixed-binary", "dynamic-binarization"])
def test_bad_training_data_is_rejected_before_training_naming_the_example(tmp_path, binarize, init_decoder_bias):
    # the whole training set is checked once, up front: nothing is written, no step is taken
    config = small_config(max_steps=100, binarize=binarize, init_decoder_bias=init_decoder_bias)
    message = rf"^train_data contains NaN or infinite values: 1 in example {NAN_ROW}, the first$"
    with pytest.raises(ValueError, match=message):
        train(config, *nan_data(binarize), tmp_path)
    assert not tmp_path.joinpath("checkpoints").exists() and not tmp_path.joinpath("metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("binarize", "bad", "message"),
    [
        (True, 1.5, r"valid_data has values outside \[0, 1\] \(it is binarized at every step\), first in example 7"),
        # a Bernoulli likelihood wants 0/1 data
        (False, 0.5, r"valid_data has values outside the likelihood.s support \(Boolean\(\)\), first in example 7"),
    ],
    ids=["probability-above-1", "non-binary-for-bernoulli"],
)
def test_values_outside_the_support_are_rejected_before_training(tmp_path, binarize, bad, message):
    train_data, valid_data = nan_data(binarize)
    train_data[NAN_ROW, 5] = 0.0
    valid_data = valid_data.clone()
    valid_data[7, 3] = bad
    with pytest.raises(ValueError, match=message):
        Trainer(small_config(max_steps=10, binarize=binarize), train_data, valid_data, tmp_path)


def test_8_bit_data_are_checked_as_intensities(tmp_path):
    # uint8 data stand for value / 255: in [0, 1] always (no scan needed for dynamic binarization), but a Bernoulli
    # likelihood without binarization wants exactly 0 or 255, and the example at fault is named
    valid = (VALID > 0.5).to(torch.uint8) * 255
    Trainer(small_config(max_steps=10), (TRAIN * 255).round().to(torch.uint8), valid, tmp_path / "binarized")
    valid[7, 3] = 128
    message = r"valid_data has values outside the likelihood.s support \(Boolean\(\)\), first in example 7"
    with pytest.raises(ValueError, match=message):
        Trainer(small_config(max_steps=10, binarize=False), (TRAIN > 0.5).to(torch.uint8) * 255, valid, tmp_path / "b")


def poison_decoder(model) -> None:
    model.decoder.output_layer.weight[0, 0] = math.nan


def huge_encoder_loc(model) -> None:
    # loc = 1e20 for every example: loc^2 overflows float32, so the analytic KL is inf while z and the
    # decoder's log-likelihood (tanh hidden layer) stay finite
    head = model.encoder.output_layer
    head.weight[:LATENT_DIM] = 0.0
    head.bias[:LATENT_DIM] = 1e20


@pytest.mark.parametrize(
    ("objective", "poison", "term"),
    [
        ("elbo", poison_decoder, "reconstruction term"),
        ("elbo", huge_encoder_loc, "KL term"),
        ("iwae", poison_decoder, "log-weights"),
    ],
    ids=["recon", "kl", "iwae-log-weights"],
)
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_non_finite_term_is_named_with_the_step(tmp_path, objective, poison, term, compile):
    config = small_config(objective=objective, k=5 if objective == "iwae" else 1, compile=compile)
    trainer = Trainer(config, TRAIN, VALID, tmp_path)
    for _ in range(3):
        stats = trainer.train_step()
        assert all(bool(torch.isfinite(v)) for v in stats.values())
    with torch.no_grad():
        poison(trainer.model)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    optimizer_before = copy.deepcopy(trainer.optimizer.state_dict())
    with pytest.raises(TrainingDiverged, match=rf"^step 3: .*{term}.* is not finite"):
        trainer.train_step()
    assert trainer.step == 3  # no optimizer step was taken
    torch.testing.assert_close(trainer.model.state_dict(), before, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(trainer.optimizer.state_dict(), optimizer_before, rtol=0, atol=0)


# --- resume errors ----------------------------------------------------------------------------------------------------
def step_in_lockstep(eager: Trainer, compiled: Trainer, steps: int) -> dict[str, torch.Tensor]:
    """``steps`` training steps of two Trainers, each seeded by its step, their stats compared after each; returns
    the compiled Trainer's last stats. (With inductor's fallback_random the two draw the same noise, so they differ
    by float rounding only; the tolerance is the one these comparisons have always used, not a derived bound: after
    a few Adam steps of lr 1e-3 rounding differences are amplified where m / sqrt(v) is near a sign change.)"""
    for _ in range(steps):
        torch.manual_seed(eager.step)
        expected = eager.train_step()
        torch.manual_seed(compiled.step)
        got = compiled.train_step()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    return got


@pytest.mark.parametrize(
    "overrides",
    [
        dict(schedule="linear", schedule_options={"steps": 6}),  # beta changes every step: a 0-d tensor input
        dict(objective="iwae", k=3),
        dict(grad_clip=0.5, lr_decay="cosine"),  # clipping and the learning rate in the compiled step
        dict(objective="iwae_dreg", k=3),  # gradients through stop-gradients, by torch.func
        dict(prior="learned-gaussian", likelihood="gaussian-learned", binarize=False),  # more parameters
        # the priors, posteriors and bounds users compare (each in its own file): one graph each, no fallback
        dict(prior="vamp", prior_options={"pseudo_inputs": 7}),  # p(z) through the encoder, pseudo-inputs learned
        dict(posterior="planar", posterior_options={"layers": 2}),
        dict(posterior="iaf", posterior_options={"layers": 2, "hidden": [16]}),
        dict(objective="miwae", k=3, objective_options={"m": 2}),
        dict(objective="piwae", k=3, objective_options={"m": 2}),
        dict(objective="ciwae", k=3, objective_options={"elbo_weight": 0.3}),
        dict(likelihood="discretized-logistic-mixture", likelihood_options={"components": 2}),  # 3K outputs a value
    ],
    ids=[
        "elbo-beta-warmup",
        "iwae",
        "clip-cosine",
        "dreg",
        "learned-prior-and-scale",
        "vamp",
        "planar",
        "iaf",
        "miwae",
        "piwae",
        "ciwae",
        "logistic-mixture",
    ],
)
def test_compiled_steps_match_eager_steps_without_recompiling(tmp_path, overrides, monkeypatch):
    # With inductor's random draws replaced by torch's own (fallback_random), a compiled step draws the same noise as
    # an eager one, so the two runs must take the same steps up to float rounding; and a schedule whose value changes
    # every step must not trigger a compilation per value. In one process the compiled step is the whole step
    # (gradients and Adam's update in one graph): parameters and optimizer state must follow the eager step's.
    import torch._dynamo
    import torch._inductor.config

    config = small_config(max_steps=8, **overrides)
    eager = Trainer(config, TRAIN, VALID, tmp_path / "eager")
    compiled = Trainer(dataclasses.replace(config, compile=True), TRAIN, VALID, tmp_path / "compiled")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch(fallback_random=True), torch._dynamo.config.patch(error_on_recompile=True):
        got = step_in_lockstep(eager, compiled, 6)
    # no part of the step fell back to eager: no graph break, no compiler failure
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert not compiled.take_step.failed
    torch.testing.assert_close(compiled.model.state_dict(), eager.model.state_dict(), rtol=1e-4, atol=1e-5)
    assert isinstance(compiled.take_step, WholeStep) and all(p.grad is None for p in compiled.model.parameters())
    if "grad_clip" in overrides:
        assert got["grad_norm"] > overrides["grad_clip"]  # the clipping was active
    torch.testing.assert_close(compiled.optimizer.state_dict(), eager.optimizer.state_dict(), rtol=1e-4, atol=1e-6)
    # once the objective has compiled, validation's log p(x) is compiled too: with torch's own random draws
    # (fallback_random) it draws the same samples as the eager trainer's, so the bounds agree to rounding
    assert compiled.take_step.compiled
    import vaelab.estimators

    compiled_chunks = []
    compiled_chunk = vaelab.estimators._compiled_chunk
    monkeypatch.setattr(
        vaelab.estimators, "_compiled_chunk", lambda *a: compiled_chunks.append(1) or compiled_chunk(*a)
    )
    with torch._inductor.config.patch(fallback_random=True):
        got = compiled.evaluate()
        assert compiled_chunks, "the compiled trainer's validation ran eagerly"
        expected = eager.evaluate()
    key = f"iwae_{config.eval_k}"
    assert got[key] == pytest.approx(expected[key], rel=1e-4)
    assert got["elbo"] == pytest.approx(expected["elbo"], rel=1e-4)


def test_every_compiled_trainer_in_a_process_gets_its_own_compiled_step(tmp_path):
    # dynamo keeps a bounded number of specialisations of one function (8 by default, here 1 so that three models
    # show it): without a slot per trainer, the second and third models' steps would run eagerly without an error
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(recompile_limit=1):
        for latent_dim in (2, 3, 4):  # three models whose steps cannot share a graph
            config = small_config(max_steps=4, latent_dim=latent_dim, compile=True)
            trainer = Trainer(config, TRAIN, VALID, tmp_path / str(latent_dim))
            for _ in range(3):  # the first step is eager (it fills Adam's state), the next two compiled
                trainer.train_step()
            assert trainer.take_step.compiled and not trainer.take_step.failed
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3, dict(torch._dynamo.utils.counters["stats"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations are a GPU matter")
def test_compiled_step_synchronises_the_host_once_on_cuda(tmp_path):
    # The step's one synchronisation is its finiteness check; the schedule's values and Adam's step factors go to the
    # device without one (a plain torch.tensor(..., device="cuda") copy would wait for the stream each step).
    import warnings

    config = small_config(max_steps=20, device="cuda", compile=True, schedule="linear", schedule_options={"steps": 20})
    trainer = Trainer(config, TRAIN, VALID, tmp_path)
    for _ in range(3):  # eager, then compiling
        trainer.train_step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(5):
                trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert isinstance(trainer.take_step, WholeStep)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 5, syncs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(objective="capacity"), r"'capacity' objective needs capacity, gamma: .*--schedule capacity"),
        (dict(objective="free_bits"), r"'free_bits' objective needs free_nats: .*objective_options"),
        (dict(objective_options={"beta": 2.0}), r"beta of the 'elbo' objective is set by the 'constant' schedule"),
        (dict(objective_options={"bogus": 1}), r"unknown objective_options bogus for the 'elbo' objective"),
    ],
    ids=["capacity-without-schedule", "free-bits-without-free-nats", "beta-twice", "unknown-option"],
)
def test_objective_arguments_are_checked_before_training(tmp_path, overrides, message):
    # refused when the Trainer is built, with what to set where, instead of a TypeError at the first step
    with pytest.raises(ValueError, match=message):
        Trainer(small_config(max_steps=5, **overrides), TRAIN, VALID, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_compilation_is_automatic_for_long_runs_only(tmp_path):
    # compile=None (the default) compiles runs on >= AUTO_COMPILE_SAMPLES examples, where the compilation repays
    # itself; an explicit choice wins either way
    from vaelab.train import AUTO_COMPILE_SAMPLES

    assert TrainConfig().compile is None
    short = Trainer(small_config(max_steps=100), TRAIN, VALID, tmp_path / "short")
    assert short.total_steps * short.batch_size < AUTO_COMPILE_SAMPLES and not short.compiles
    assert type(short.take_step) is EagerStep
    steps = AUTO_COMPILE_SAMPLES // short.batch_size
    long = Trainer(small_config(max_steps=steps, epochs=10**6), TRAIN, VALID, tmp_path / "long")
    assert long.total_steps * long.batch_size >= AUTO_COMPILE_SAMPLES and long.compiles
    assert isinstance(long.take_step, WholeStep)
    forced_off = small_config(max_steps=steps, epochs=10**6, compile=False)
    assert not Trainer(forced_off, TRAIN, VALID, tmp_path / "a").compiles
    assert Trainer(small_config(max_steps=100, compile=True), TRAIN, VALID, tmp_path / "b").compiles
    with pytest.raises(ValueError, match="compile must be"):
        small_config(compile="yes")


def test_compiled_training_recovers_from_a_first_step_that_diverged(tmp_path):
    # the compiled step works on Adam's state, which only a successful (eager) step creates: after a first step that
    # was refused, the next steps must still run (eagerly until one succeeds, then compiled)
    trainer = Trainer(small_config(max_steps=10, compile=True), TRAIN, VALID, tmp_path)
    weight = trainer.model.decoder.output_layer.weight
    with torch.no_grad():
        saved, weight[0, 0] = weight[0, 0].item(), math.nan
    with pytest.raises(TrainingDiverged, match=r"^step 0: "):
        trainer.train_step()
    with torch.no_grad():
        weight[0, 0] = saved
    stats = [trainer.train_step() for _ in range(3)]
    assert trainer.step == 3 and all(bool(torch.isfinite(s["loss"])) for s in stats)
    assert isinstance(trainer.take_step, WholeStep) and trainer.take_step.compiled


def test_compiled_training_resumes_from_its_checkpoint(tmp_path):
    # the compiled step updates the optimizer's own state tensors, so a compiled run's checkpoint holds its moments
    # and step count, and a resumed compiled run (whose first step runs eagerly, then compiled on the loaded state)
    # ends where the uninterrupted one does, up to float rounding (torch's random draws: fallback_random)
    import shutil

    import torch._inductor.config

    config = small_config(max_steps=12, checkpoint_every=6, compile=True)
    with torch._inductor.config.patch(fallback_random=True):
        train(config, TRAIN, VALID, tmp_path / "reference")
        resumed = tmp_path / "resumed"  # the reference as a crash after its step-6 checkpoint would have left it
        shutil.copytree(tmp_path / "reference", resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000012")
        (resumed / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "step_00000006"}))
        (resumed / "model.safetensors").unlink()
        assert train(config, TRAIN, VALID, resumed, resume=True).step == 12
    for file in ("model.safetensors", "checkpoints/step_00000012/state.safetensors"):
        got, expected = load_file(resumed / file), load_file(tmp_path / "reference" / file)
        assert got.keys() == expected.keys() and any(key.startswith("optim") for key in got) == ("state" in file)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_compiled_training_without_a_working_compiler_warns_and_trains_eagerly(tmp_path, monkeypatch):
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()  # nothing compiled before may be reused (in memory or on disk): the compiler must run
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    trainer = Trainer(small_config(max_steps=20, compile=True), TRAIN, VALID, tmp_path / "run")
    broken = {"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}
    try:
        with torch._inductor.config.patch(broken), pytest.warns(UserWarning, match="torch.compile failed"):
            stats = [trainer.train_step() for _ in range(5)]
    finally:
        torch._dynamo.reset()
    assert trainer.step == 5 and all(bool(torch.isfinite(s["loss"])) for s in stats)


def test_resume_without_a_checkpoint_raises(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        train(small_config(max_steps=10), TRAIN, VALID, tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        train(small_config(max_steps=10), TRAIN, VALID, tmp_path / "missing", resume=True)


def test_new_run_in_a_used_directory_raises_and_overwrites_nothing(tmp_path):
    config = small_config(max_steps=20, checkpoint_every=10)
    train(config, TRAIN, VALID, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="already holds a run"):
        train(small_config(max_steps=30, lr=3e-3), TRAIN, VALID, tmp_path)
    assert snapshot(tmp_path) == before


def test_resume_uses_the_saved_config(tmp_path):
    config = small_config(max_steps=20, checkpoint_every=10)
    train(config, TRAIN, VALID, tmp_path)
    trainer = Trainer(small_config(max_steps=999, lr=0.5), TRAIN, VALID, tmp_path, resume=True)
    assert trainer.config == config and trainer.step == 20


# --- data as aligned tensors, models with context --------------------------------------------------------------------
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_model_with_context_trains_and_validates_given_each_examples_labels(tmp_path, compile):
    # The Trainer gathers x and y with one index and trains model.given(y=...); validation binds each example's label.
    # The model's encoder is its exact posterior, so the validation ELBO (joint form: log p(x,z) - log q(z|x) at one
    # z) and IWAE bound are the exact mean log p(x|y) of its current weights for any draw, up to float32 rounding
    # (vaelab.tolerance's slack; no Monte Carlo error).
    from tiny import ClassMeanGaussian
    from vaelab.tolerance import tolerance

    truth = ClassMeanGaussian(6, 2, classes=3, seed=0)
    x, y = truth.sample(1200, classes=3, seed=1)
    model = ClassMeanGaussian(6, 2, classes=3, seed=5)  # another start
    before = model.log_marginal_exact(x[1000:], y[1000:]).mean()
    config = small_config(max_steps=300, binarize=False, likelihood="gaussian", lr=0.02, eval_every=300,
                          eval_examples=None, form="joint", compile=compile)  # fmt: skip
    trainer = Trainer(config, {"x": x[:1000], "y": y[:1000]}, {"x": x[1000:], "y": y[1000:]}, tmp_path, model=model)
    result = trainer.fit().last_eval
    assert trainer.take_step.compiled == compile  # compiled: the whole step and validation's log p(x), bound inside
    exact = model.log_marginal_exact(x[1000:], y[1000:]).mean()
    allowed = tolerance(torch.tensor(0.0), exact.float())  # rounding slack of the float32 computation, no stderr
    for key in ("elbo", "iwae_10"):
        assert abs(result[key] - exact) <= allowed, (key, result[key], exact.item(), allowed.item())
    # it learned, and learned class means: the labels really reached the model aligned with x
    assert exact > before + 1
    shuffled = y[1000:][torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    assert exact > model.log_marginal_exact(x[1000:], shuffled).mean() + 1
    with pytest.raises(ValueError, match="the model reads y, which train_data does not hold"):
        Trainer(config, x[:1000], None, tmp_path / "no-labels", model=model)
    with pytest.raises(ValueError, match=r"train_data\['y'\] has 999 rows, not 1000 as x"):
        Trainer(config, {"x": x[:1000], "y": y[:999]}, None, tmp_path / "misaligned", model=model)


# --- optimizers -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("optimizer", "options"),
    [("adamw", {"weight_decay": 0.05}), ("sgd", {"momentum": 0.9})],
    ids=["adamw", "sgd-momentum"],
)
def test_other_optimizers_train_and_resume_bit_identically(driver, tmp_path, optimizer, options):
    # as the Adam runs above: killed after a checkpoint (SIGKILL, in a child process), resumed, bit for bit the
    # uninterrupted run's weights and optimizer state (AdamW's moments, SGD's momentum buffers)
    overrides = dict(optimizer=optimizer, optimizer_options=options, lr=0.01 if optimizer == "sgd" else 1e-3)
    reference = tmp_path / "reference"
    assert driver.run(reference, **overrides)["step"] == 160
    first, last = lines(reference, "valid")[0], lines(reference, "valid")[-1]
    assert last["elbo"] > first["elbo"] + 1  # it learns
    meta = json.loads((reference / "checkpoints" / "step_00000160" / "state.json").read_text())
    assert any(
        key.startswith("optim") for key in load_file(reference / "checkpoints" / "step_00000160" / "state.safetensors")
    )
    assert next(iter(options)) in json.dumps(meta)  # the optimizer's own hyper-parameters were saved

    proc = driver.start(tmp_path / "run", **overrides)
    wait_until(proc, lambda: any(s >= 30 for s in step_checkpoints(tmp_path / "run")), "a checkpoint at step >= 30")
    proc.kill()
    proc.communicate(timeout=60)
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert driver.run(tmp_path / "run", resume=True, **overrides)["step"] == 160
    for file in ("model.safetensors", "checkpoints/step_00000160/state.safetensors"):
        assert_same_weights(tmp_path / "run" / file, reference / file)


def test_the_step_is_chosen_once_by_optimizer_and_compilation(tmp_path):
    from vaelab.steps import CompiledObjectiveStep

    def step_kind(**overrides):
        return type(Trainer(small_config(max_steps=5, **overrides), TRAIN, VALID, tmp_path / "x").take_step)

    assert step_kind(compile=False) is EagerStep
    assert step_kind(compile=True) is WholeStep  # plain Adam, one process
    assert step_kind(compile=True, optimizer_options={"betas": [0.8, 0.99]}) is WholeStep
    assert step_kind(compile=True, optimizer="adamw") is CompiledObjectiveStep
    assert step_kind(compile=True, optimizer_options={"amsgrad": True}) is CompiledObjectiveStep
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'; choose from adam, adamw, sgd"):
        small_config(optimizer="lbfgs")
    with pytest.raises(ValueError, match=r"optimizer_options .* not accepted by 'sgd'"):
        small_config(optimizer="sgd", optimizer_options={"betas": [0.9, 0.99]})


def test_compiled_objective_step_matches_eager_for_adamw(tmp_path):
    import torch._dynamo
    import torch._inductor.config

    config = small_config(max_steps=8, optimizer="adamw", optimizer_options={"weight_decay": 0.05})
    eager = Trainer(config, TRAIN, VALID, tmp_path / "eager")
    compiled = Trainer(dataclasses.replace(config, compile=True), TRAIN, VALID, tmp_path / "compiled")
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        step_in_lockstep(eager, compiled, 4)
    assert compiled.take_step.compiled
    torch.testing.assert_close(compiled.model.state_dict(), eager.model.state_dict(), rtol=1e-4, atol=1e-5)


# --- schedules, objectives, config validation -------------------------------------------------------------------------
def test_linear_kl_warmup_is_logged(tmp_path):
    config = small_config(max_steps=60, log_every=5, schedule="linear", schedule_options={"steps": 40})
    train(config, TRAIN, VALID, tmp_path)
    betas = [line["beta"] for line in lines(tmp_path, "train")]
    assert betas[0] <= 0.15 and betas[-1] == 1.0
    assert all(a <= b for a, b in itertools.pairwise(betas))
    assert sum(b < 1 for b in betas) >= 6  # it really ramped over the first 40 steps


def test_iwae_objective_trains(tmp_path):
    config = small_config(max_steps=40, objective="iwae", k=5, eval_every=20)
    result = train(config, TRAIN, VALID, tmp_path)
    assert result.step == 40 and (tmp_path / "model.safetensors").is_file()
    for line in lines(tmp_path, "train"):
        assert math.isfinite(line["elbo"]) and line["beta"] == 1.0
        assert "recon" not in line  # IWAE's log-weights come unsplit
    valid = lines(tmp_path, "valid")
    assert len(valid) == 2 and all(math.isfinite(line["iwae_10"]) for line in valid)


def test_bf16_autocast_rounds_the_steps_but_learns_as_well(tmp_path):
    # bf16 changes the arithmetic of the step (so the option has an effect), keeps the weights in float32, and
    # after 300 steps the validation bounds (computed in float32) are within a nat of a float32 run's
    runs = {}
    for bf16 in (False, True):
        trainer = Trainer(small_config(max_steps=300, bf16=bf16), TRAIN, VALID, tmp_path / str(bf16))
        torch.manual_seed(1)
        first = trainer.train_step()["loss"].item()
        for _ in range(299):
            trainer.train_step()
        runs[bf16] = first, trainer.evaluate(), trainer.model
    (loss32, eval32, _), (loss16, eval16, model16) = runs[False], runs[True]
    assert loss16 != loss32 and abs(loss16 - loss32) < 0.05 * abs(loss32)
    assert all(p.dtype == torch.float32 for p in model16.parameters())
    assert abs(eval16["elbo"] - eval32["elbo"]) < 1.0 and abs(eval16["iwae_10"] - eval32["iwae_10"]) < 1.0
    assert eval16["elbo"] > eval32["elbo"] - 1.0


def test_compiled_bf16_step_autocasts_inside_the_graph(tmp_path):
    # compile=True with bf16: the compiled whole step rounds its matmuls to bfloat16 (so its steps differ from the
    # float32 compiled steps drawn with the same noise), keeps weights and optimizer state in float32, and stays
    # within a few percent of the float32 loss
    import torch._inductor.config

    runs = {}
    for bf16 in (False, True):
        trainer = Trainer(small_config(max_steps=8, compile=True, bf16=bf16), TRAIN, VALID, tmp_path / str(bf16))
        with torch._inductor.config.patch(fallback_random=True):
            for step in range(6):
                torch.manual_seed(step)
                loss = trainer.train_step()["loss"].item()
        runs[bf16] = loss, trainer
    (loss32, trainer32), (loss16, trainer16) = runs[False], runs[True]
    assert isinstance(trainer16.take_step, WholeStep) and trainer16.take_step.compiled
    assert loss16 != loss32 and abs(loss16 - loss32) < 0.05 * abs(loss32)
    weights16, weights32 = trainer16.model.state_dict(), trainer32.model.state_dict()
    assert all(w.dtype == torch.float32 for w in weights16.values())
    assert any(not torch.equal(weights16[k], weights32[k]) for k in weights32)
    for state in trainer16.optimizer.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


def test_cosine_lr_decay_is_logged(tmp_path):
    config = small_config(max_steps=50, log_every=5, lr_decay="cosine")
    train(config, TRAIN, VALID, tmp_path)
    lrs = [line["lr"] for line in lines(tmp_path, "train")]
    assert lrs[0] < config.lr and lrs[0] > 0.9 * config.lr
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert lrs[-1] < 0.01 * config.lr


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"architecture": "transformer"}, "architecture"),
        ({"k": 0}, "k"),
        ({"lr": 0.0}, "lr"),
        ({"lr_decay": "step"}, "lr_decay"),
        ({"keep_last": 0}, "keep_last"),
        ({"max_steps": 0}, "max_steps"),
        ({"grad_clip": -1.0}, "grad_clip"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        small_config(**overrides)


def test_config_from_dict_rejects_unknown_keys():
    data = dataclasses.asdict(small_config())
    data["learning_rate"] = 1e-3
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict(data)


def test_tensorboard_gets_scalars_and_image_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tiny import tiny_run

    tiny_run(tmp_path, latent_dim=2, steps=20)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"samples", "reconstructions"} <= set(tags["images"])
    assert {"train/elbo", "train/kl", "valid/elbo"} <= set(tags["scalars"])
