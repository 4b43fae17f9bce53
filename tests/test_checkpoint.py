"""Checkpoints: an exact round trip of weights, optimizer state and RNG state; data only (no pickle); loud errors on
damaged files; atomic writes that leave nothing behind; leftovers of a crashed save ignored.

Everything runs on real files in ``tmp_path`` with a small MLP VAE (64 pixels, 4 latent dimensions), a few Adam steps
so the optimizer holds non-trivial state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vaelab.checkpoint import (
    FAULT_POINTS,
    FORMAT_VERSION,
    CheckpointError,
    atomic_write_text,
    complete_checkpoints,
    load_checkpoint,
    remove_leftovers,
    restore_optimizer,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vaelab.objectives import elbo_objective
from vaelab.train import TrainConfig, build_model, latest_checkpoint

DATA_DIM, LATENT_DIM, BATCH = 64, 4, 32
FILES = ("model.safetensors", "state.safetensors", "state.json")


# --- fixtures ---------------------------------------------------------------------------------------------------------
def small_config() -> TrainConfig:
    return TrainConfig(architecture_options={"hidden": [32]}, latent_dim=LATENT_DIM, progress=False)


def batch(seed: int = 0) -> torch.Tensor:
    """Binary data ``[BATCH, DATA_DIM]`` from a random sigmoid belief net (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    weights = 3 * torch.randn(LATENT_DIM, DATA_DIM, generator=g)
    return torch.bernoulli(torch.sigmoid(torch.randn(BATCH, LATENT_DIM, generator=g) @ weights), generator=g)


def adam_step(model, optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    elbo_objective(model, x, form="kl").loss.mean().backward()
    optimizer.step()


def trained(seed: int = 0, steps: int = 3):
    """A model and its Adam optimizer after ``steps`` steps (so Adam holds step counts and both moments)."""
    torch.manual_seed(seed)
    model = build_model(small_config(), (DATA_DIM,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = batch()
    for _ in range(steps):
        adam_step(model, optimizer, x)
    return model, optimizer


def assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    # hyper-parameters travel as JSON, where Adam's betas tuple becomes a list; Adam reads either the same way
    assert json.loads(json.dumps(sa["param_groups"])) == json.loads(json.dumps(sb["param_groups"]))
    assert sa["state"].keys() == sb["state"].keys()
    for idx, entry in sa["state"].items():
        assert entry.keys() == sb["state"][idx].keys()
        for name, value in entry.items():
            other = sb["state"][idx][name]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), (idx, name)
            else:
                assert value == other, (idx, name)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    model, optimizer = trained()
    return save_checkpoint(tmp_path / "step_00000003", model=model, optimizer=optimizer, meta={"step": 3})


# --- round trip -------------------------------------------------------------------------------------------------------
def test_round_trip_restores_weights_optimizer_and_rng_exactly(tmp_path):
    model, optimizer = trained(seed=0)
    meta = {"step": 3, "config": {"lr": 1e-3, "hidden": [32]}, "best_elbo": -12.5}
    torch.manual_seed(1234)
    torch.rand(7)  # move the global RNG somewhere that is neither a fresh seed nor the model's init
    directory = save_checkpoint(tmp_path / "step_00000003", model=model, optimizer=optimizer, meta=meta)
    after_save = torch.rand(10)  # what the RNG gives next, from the state the checkpoint holds

    weights, tensors, loaded_meta = load_checkpoint(directory)
    assert loaded_meta["step"] == 3 and loaded_meta["config"] == meta["config"] and loaded_meta["best_elbo"] == -12.5
    assert loaded_meta["format_version"] == FORMAT_VERSION

    # a different model and a fresh optimizer, then everything restored from the checkpoint
    restored, restored_optimizer = trained(seed=1, steps=0)
    restored.load_state_dict(weights)
    restore_optimizer(restored_optimizer, tensors, loaded_meta)
    for (name, p), (_, q) in zip(model.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert_same_optimizer_state(optimizer, restored_optimizer)
    set_rng_state(tensors)
    assert torch.equal(torch.rand(10), after_save)

    # the restored pair takes the same next step, bit for bit (same batch, same reparameterization noise)
    x = batch(seed=5)
    torch.manual_seed(99)
    adam_step(model, optimizer, x)
    torch.manual_seed(99)
    adam_step(restored, restored_optimizer, x)
    for (name, p), (_, q) in zip(model.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert_same_optimizer_state(optimizer, restored_optimizer)


def test_rng_state_round_trips_through_set_rng_state():
    state = rng_state()
    expected = torch.randn(5)
    set_rng_state(state)
    assert torch.equal(torch.randn(5), expected)


def test_checkpoint_without_optimizer(tmp_path):
    model, _ = trained(steps=0)
    directory = save_checkpoint(tmp_path / "best", model=model, optimizer=None, meta={"step": 0})
    weights, tensors, meta = load_checkpoint(directory)
    assert "optimizer" not in meta and "rng.torch" in tensors
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_checkpoint_is_data_only(checkpoint):
    """No pickle anywhere: safetensors for tensors, JSON for the rest, so loading never needs torch.load."""
    files = sorted(p.name for p in checkpoint.iterdir())
    assert files == sorted(FILES)
    assert all(p.is_file() for p in checkpoint.iterdir())
    for name in ("model.safetensors", "state.safetensors"):
        with safe_open(checkpoint / name, framework="pt") as f:  # parses as safetensors: header + raw tensor bytes
            assert len(list(f.keys())) > 0
    json.loads((checkpoint / "state.json").read_text())
    for path in checkpoint.iterdir():
        head = path.read_bytes()[:2]
        assert head != b"PK" and head[:1] != b"\x80", f"{path.name} looks like a torch.save zip or a pickle"


def test_resaving_a_name_replaces_it_and_leaves_no_temporaries(tmp_path):
    model, optimizer = trained()
    save_checkpoint(tmp_path / "best", model=model, optimizer=optimizer, meta={"step": 3})
    adam_step(model, optimizer, batch())
    save_checkpoint(tmp_path / "best", model=model, optimizer=optimizer, meta={"step": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    weights, _, meta = load_checkpoint(tmp_path / "best")
    assert meta["step"] == 4
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


# --- damaged checkpoints ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FILES)
def test_missing_file_raises_checkpoint_error_naming_it(checkpoint, name):
    (checkpoint / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(checkpoint)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble_json(path: Path) -> None:
    path.write_text(path.read_text()[:-20])


DAMAGE = [
    pytest.param("model.safetensors", truncate, id="truncated-model"),
    pytest.param("model.safetensors", lambda p: p.write_bytes(b""), id="empty-model"),
    pytest.param("state.safetensors", truncate, id="truncated-state"),
    pytest.param("state.json", garble_json, id="truncated-json"),
]


@pytest.mark.parametrize(("name", "damage"), DAMAGE)
def test_damaged_file_raises_checkpoint_error(checkpoint, name, damage):
    damage(checkpoint / name)
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as info:
        load_checkpoint(checkpoint)
    assert str(checkpoint) in str(info.value)


@pytest.mark.parametrize(("name", "damage"), DAMAGE)
def test_damaged_file_error_names_the_file(checkpoint, name, damage):
    damage(checkpoint / name)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(checkpoint)


def test_unknown_format_version_raises(checkpoint):
    meta = json.loads((checkpoint / "state.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (checkpoint / "state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(checkpoint)


def test_not_a_checkpoint_directory_raises(tmp_path):
    with pytest.raises(CheckpointError, match="not a complete vaelab checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


# --- atomic writes and crashed saves ----------------------------------------------------------------------------------
def test_atomic_write_text_replaces_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "latest.json"
    atomic_write_text(target, '{"checkpoint": "step_00000010"}')
    atomic_write_text(target, '{"checkpoint": "step_00000020"}')
    assert json.loads(target.read_text()) == {"checkpoint": "step_00000020"}
    assert [p.name for p in tmp_path.iterdir()] == ["latest.json"]


def test_latest_checkpoint_ignores_a_crashed_save(tmp_path):
    """A save killed mid-way leaves ``.step_X.tmp``: never picked as the latest, cleared by the next save there."""
    ckpt_dir = tmp_path / "checkpoints"
    model, optimizer = trained()
    good = save_checkpoint(ckpt_dir / "step_00000010", model=model, optimizer=optimizer, meta={"step": 10})
    atomic_write_text(ckpt_dir / "latest.json", json.dumps({"checkpoint": good.name}))
    crashed = ckpt_dir / ".step_00000020.tmp"  # what save_checkpoint leaves if killed before its rename
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half a file")

    assert latest_checkpoint(tmp_path) == good
    (ckpt_dir / "latest.json").unlink()  # without the pointer: the highest complete step directory
    assert latest_checkpoint(tmp_path) == good

    adam_step(model, optimizer, batch())
    save_checkpoint(ckpt_dir / "step_00000020", model=model, optimizer=optimizer, meta={"step": 20})
    assert not crashed.exists()
    assert latest_checkpoint(tmp_path) == ckpt_dir / "step_00000020"
    assert load_checkpoint(latest_checkpoint(tmp_path))[2]["step"] == 20


def test_latest_checkpoint_falls_back_when_the_pointer_is_stale(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    model, optimizer = trained()
    for step in (10, 20):
        save_checkpoint(ckpt_dir / f"step_{step:08d}", model=model, optimizer=optimizer, meta={"step": step})
    atomic_write_text(ckpt_dir / "latest.json", json.dumps({"checkpoint": "step_00000030"}))  # pruned or never made
    assert latest_checkpoint(tmp_path) == ckpt_dir / "step_00000020"
    shutil.rmtree(ckpt_dir)
    assert latest_checkpoint(tmp_path) is None


# --- failed and killed saves ------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (a full disk on demand); needs root and mount(8), else the test is skipped."""
    import subprocess

    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_is_one_line_error_that_cleans_up_and_keeps_the_last_checkpoint(small_disk):
    small_model = torch.nn.Linear(4, 4)  # a checkpoint of a few kB: fits
    first = save_checkpoint(small_disk / "step_00000001", model=small_model, optimizer=None, meta={"step": 1})
    before = {name: (first / name).read_bytes() for name in FILES}
    big_model = torch.nn.Linear(1000, 100)  # ~400 kB of weights: does not fit on 256 KiB
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(small_disk / "step_00000002", model=big_model, optimizer=None, meta={"step": 2})
    message = str(caught.value)
    assert "\n" not in message and "step_00000002" in message and "No space left on device" in message
    assert sorted(p.name for p in small_disk.iterdir()) == ["step_00000001"]  # the temporary directory is gone
    assert {name: (first / name).read_bytes() for name in FILES} == before
    load_checkpoint(first)  # still a complete checkpoint


def test_leftovers_of_killed_saves_are_not_checkpoints_and_are_removed(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt_dir = tmp_path / "checkpoints"
    save_checkpoint(ckpt_dir / "step_00000005", model=model, optimizer=None, meta={"step": 5})
    save_checkpoint(ckpt_dir / "best", model=model, optimizer=None, meta={"step": 5})
    (ckpt_dir / ".step_00000010.tmp").mkdir()  # killed while writing step 10
    os_rename = __import__("os").rename
    os_rename(ckpt_dir / "best", ckpt_dir / ".best.old")  # killed between the two renames of re-saving 'best'
    assert complete_checkpoints(ckpt_dir) == [ckpt_dir / "step_00000005"]
    assert remove_leftovers(ckpt_dir) == [ckpt_dir / ".step_00000010.tmp"]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best", "step_00000005"]  # the old 'best' put back
    load_checkpoint(ckpt_dir / "best")
    assert complete_checkpoints(tmp_path / "nowhere") == [] and remove_leftovers(tmp_path / "nowhere") == []


def test_every_fault_point_is_reached_by_a_save(tmp_path):
    # each named point kills a real child process (SIGKILL) at its place; what it leaves is then what a crash leaves
    import os
    import signal
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from vaelab.checkpoint import atomic_write_text, save_checkpoint\n"
        "d = Path(sys.argv[1])\n"
        "m = torch.nn.Linear(2, 2)\n"
        "save_checkpoint(d / 'best', model=m, optimizer=None, meta={})\n"
        "save_checkpoint(d / 'best', model=m, optimizer=None, meta={})\n"
        "atomic_write_text(d / 'latest.json', '{}')\n"
    )
    for point in FAULT_POINTS:
        where = tmp_path / point
        env = dict(os.environ, VAELAB_FAULT=point)
        done = subprocess.run([sys.executable, "-c", script, str(where)], env=env, capture_output=True, timeout=120)
        assert done.returncode == -signal.SIGKILL, (point, done.stderr.decode()[-2000:])
        remove_leftovers(where)
        assert not [p for p in where.iterdir() if p.name.startswith(".")], point  # nothing half-done stays
        if (where / "best").exists():
            load_checkpoint(where / "best")  # and what is there is whole


# --- weights that do not fit, or are not finite, are refused on load -------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from vaelab.train import train

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    config = dataclasses.replace(small_config(), max_steps=2, validation_size=0, eval_k=2, compile=False)
    train(config, batch(), None, run_dir)
    return run_dir


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda w: w.update({next(iter(w)): torch.full_like(next(iter(w.values())), math.nan)}), "holds NaN or inf in"),
        (lambda w: w.pop(next(iter(w))), "does not fit the model .*: missing "),
        (lambda w: w.update(extra=torch.zeros(2)), "does not fit the model .*: unexpected extra"),
        (lambda w: w.update({next(iter(w)): torch.zeros(3, 3)}), r"has shape \[3, 3\], the config's model needs"),
    ],
    ids=["nan", "missing", "extra", "shape"],
)
def test_load_run_refuses_weights_that_do_not_fit_or_are_not_finite(finished_run, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    from vaelab.runs import load_run

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    weights = load_file(run_dir / "model.safetensors")
    damage(weights)
    save_file(weights, run_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=message) as caught:
        load_run(run_dir)
    assert str(run_dir / "model.safetensors") in str(caught.value) and "\n" not in str(caught.value)


def test_eval_of_nan_weights_is_a_one_line_error_not_nan_numbers(finished_run, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    weights = {
        name: torch.full_like(value, math.nan) for name, value in load_file(run_dir / "model.safetensors").items()
    }
    save_file(weights, run_dir / "model.safetensors")
    done = subprocess.run(
        [sys.executable, "-m", "vaelab", "eval", str(run_dir), "--k", "2"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("vaelab eval: error: ") and "NaN or inf" in done.stderr
    assert not (run_dir / "eval_test.json").exists()


# --- one writer per run directory -------------------------------------------------------------------------------------
def test_run_lock_admits_one_holder_and_leaves_nothing_behind(tmp_path):
    import os

    from vaelab.runs import RunInUse, RunLock

    run_dir = tmp_path / "run"
    held = RunLock(run_dir)  # creates the directory
    assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(RunInUse, match=rf"{run_dir} is in use by another process \(pid {os.getpid()}\)"):
        RunLock(run_dir)  # flock is per open file: refused in the same process too
    held.release()
    assert not run_dir.exists()  # taking the lock created it, nothing else was written: removed with the lock
    run_dir.mkdir()
    (run_dir / ".lock").write_text("12345\n")  # left by a killed holder: no lock on it, so it does not block
    again = RunLock(run_dir)
    (run_dir / "config.json").write_text("{}")
    again.release()
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
