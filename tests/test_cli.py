"""The command line end to end, as a user runs it: real processes, real MNIST files, real signals."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vaelab.tolerance import Z_TOLERANCE, assert_within_stderr

BESIDE = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = BESIDE if BESIDE.is_dir() else Path("/work/shared/data")
needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"MNIST not found in {DATA}")


def vaelab(*args, env=None, timeout=300, check=False):
    proc = subprocess.run(
        [sys.executable, "-m", "vaelab", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def data_env(**extra) -> dict:
    env = dict(os.environ, VAELAB_DATA_DIR=str(DATA), VAELAB_OFFLINE="1")
    env.update(extra)
    return env


SMALL = [
    "--preset",
    "mlp",
    "--dataset",
    "mnist",
    "--max-examples",
    "400",
    "--batch-size",
    "50",
    "--architecture-options",
    '{"hidden": [64]}',
    "--latent-dim",
    "4",
    "--eval-k",
    "20",
    "--no-progress",
]


@needs_mnist
def test_train_interrupt_resume_eval_sample(tmp_path):
    run = tmp_path / "run"
    env = data_env()
    cmd = [
        sys.executable,
        "-m",
        "vaelab",
        "train",
        *SMALL,
        "--epochs",
        "200",
        "--checkpoint-every",
        "4",
        "--eval-every",
        "40",
        "--out",
        str(run),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list((run / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err and "Traceback" not in err
    stopped_at = json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]
    assert not (run / "model.safetensors").exists()  # not finished

    # resume to the end (a shorter run: the saved config says 200 epochs, so cap it by rewriting nothing:
    # resume honours the saved config exactly, so this finishes the 200 epochs of 8 steps)
    done = vaelab("train", "--resume", "--out", run, env=env, timeout=600, check=True)
    assert "resuming" in done.stdout and "trained 1600 steps" in done.stdout
    assert (run / "model.safetensors").is_file()
    assert stopped_at < json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]
    steps = [(m["split"], m["step"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert len(steps) == len(set(steps))

    report = tmp_path / "eval.json"
    vaelab("eval", run, "--k", "100", "--examples", "40", "--json", report, "--no-progress", env=env, check=True)
    result = json.loads(report.read_text())
    assert result["examples"] == 40 and result["log_px"]["k"] == 100 and result["seconds"] > 0
    assert set(result["elbo"]) == {"joint", "entropy", "kl"}
    iwae = [result["iwae"][k]["mean"] for k in ("1", "10", "100", "1000")]
    assert iwae[0] < iwae[-1]  # the bound tightens with k
    assert result["log_px"]["mean"] > result["elbo"]["kl"]["mean"]
    assert 0 <= result["active_units"] <= 4 and len(result["kl_per_dim"]) == 4
    for key in ("approximation_gap", "amortization_gap", "iwae_curve", "estimator_study", "elbo_forms"):
        assert key in result, key  # the full diagnostics, unless --fast
    gaps = result["approximation_gap"]["mean"] + result["amortization_gap"]["mean"]
    assert abs(gaps - result["gap_decomposition"]["posterior_gap"]["mean"]) < 1e-6  # the decomposition is exact
    assert result["ppca_baseline"].startswith("not applicable: ")  # a Bernoulli model: a mass function on {0,1}^D
    fast = tmp_path / "fast.json"
    vaelab("eval", run, "--k", "50", "--examples", "10", "--fast", "--json", fast, "--no-progress", env=env, check=True)
    assert "approximation_gap" not in json.loads(fast.read_text())
    compiled = tmp_path / "compiled.json"
    vaelab("eval", run, "--k", "50", "--examples", "10", "--fast", "--compile", "--json", compiled, env=env, check=True)
    eager_px, compiled_px = (json.loads(f.read_text())["log_px"] for f in (fast, compiled))
    # the same estimator (other random draws): means over 10 images agree within a per-image Monte Carlo error (the
    # error of a mean is smaller: a loose bound, as the stderr of a k = 50 estimate is itself rough)
    tolerance = Z_TOLERANCE * math.hypot(eager_px["mean_mc_stderr"], compiled_px["mean_mc_stderr"])
    assert abs(compiled_px["mean"] - eager_px["mean"]) <= tolerance

    vaelab("sample", run, "--n", "16", env=env, check=True)
    vaelab("reconstruct", run, "--n", "8", env=env, check=True)
    from matplotlib.image import imread

    samples, recon = imread(run / "samples.png"), imread(run / "reconstructions.png")
    assert samples.shape[0] == samples.shape[1] == 4 * 28 + 5 * 2  # a 4x4 grid with 2-pixel padding
    assert recon.shape[:2] == (2 * 28 + 3 * 2, 8 * 28 + 9 * 2)


@needs_mnist
def test_a_run_finds_its_data_where_it_trained_and_says_when_it_moved(tmp_path):
    # as scripts/run.sh then the README: trained with VAELAB_DATA_DIR set, then evaluated from a fresh shell without it
    copy = tmp_path / "elsewhere" / "mnist"
    copy.mkdir(parents=True)
    for f in (DATA / "mnist").glob("*.gz"):
        (copy / f.name).symlink_to(f)
    run = tmp_path / "run"
    trained = dict(os.environ, VAELAB_DATA_DIR=str(tmp_path / "elsewhere"), VAELAB_OFFLINE="1")
    vaelab("train", *SMALL, "--max-steps", "4", "--out", run, env=trained, check=True)
    assert json.loads((run / "data.json").read_text()) == {"dataset": "mnist", "source": str(copy.resolve())}
    fresh = {k: v for k, v in os.environ.items() if k != "VAELAB_DATA_DIR"}
    fresh.update(VAELAB_OFFLINE="1", XDG_CACHE_HOME=str(tmp_path / "cache"), HOME=str(tmp_path / "home"))
    vaelab("eval", run, "--k", "5", "--examples", "20", "--fast", "--no-progress", env=fresh, check=True)
    vaelab("reconstruct", run, "--n", "4", env=fresh, check=True)

    copy.rename(tmp_path / "elsewhere" / "moved")  # the data moved: a one-line error naming the place and the fix
    proc = vaelab("eval", run, "--k", "5", "--examples", "20", "--fast", "--no-progress", env=fresh)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert str(copy.resolve()) in line and "set VAELAB_DATA_DIR" in line and "Traceback" not in proc.stderr
    moved = dict(fresh, VAELAB_DATA_DIR=str(tmp_path / "elsewhere" / "moved"))
    vaelab("eval", run, "--k", "5", "--examples", "20", "--fast", "--no-progress", env=moved, check=True)


@needs_mnist
def test_config_file_preset_and_flags_precedence(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('preset = "mlp"\nlatent_dim = 8\nlr = 0.002\n[architecture_options]\nhidden = [32]\n')
    run = tmp_path / "run"
    proc = vaelab(
        "train",
        "--config",
        config,
        "--latent-dim",
        "3",
        "--dataset",
        "mnist",
        "--max-examples",
        "100",
        "--max-steps",
        "2",
        "--out",
        run,
        "--no-progress",
        env=data_env(),
        check=True,
    )
    saved = json.loads((run / "config.json").read_text())
    assert saved["latent_dim"] == 3  # flag beats file
    assert saved["lr"] == 0.002 and saved["architecture_options"] == {"hidden": [32]}  # file beats preset/defaults
    assert saved["binarize"] is True  # from the preset named in the file
    assert '"latent_dim": 3' in proc.stdout  # the resolved config is printed


def test_auto_dataset_falls_back_to_fashion_mnist(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    env = data_env(VAELAB_DATA_DIR=str(tmp_path), XDG_CACHE_HOME=str(tmp_path), HOME=str(tmp_path))
    run = tmp_path / "run"
    proc = vaelab("train", "--max-examples", "100", "--max-steps", "1", "--out", run, "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "config.json").read_text())["dataset"] == "fashion-mnist"


def test_offline_error_names_the_files_and_places(tmp_path):
    env = data_env(VAELAB_DATA_DIR=str(tmp_path), XDG_CACHE_HOME=str(tmp_path), HOME=str(tmp_path))
    proc = vaelab("train", "--dataset", "binarized-mnist", "--out", tmp_path / "run", env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "binarized_mnist_train.amat" in proc.stderr and str(tmp_path) in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--epochs", "-1"], "epochs must be >= 0"),
        (["train", "--k", "0"], "k must be an integer >= 1"),
        (["train", "--objective", "nope"], "invalid choice"),
        (["train", "--architecture-options", "[1]"], "expected a JSON object"),
        (["train", "--prior-options", '{"components": 3}'], "unknown prior_options 'components'"),
        (["train", "--model", "iwae-2layer"], "has 150 latent units"),
        (["train", "--config", "/nonexistent.toml"], "not found"),
        (["eval", "/nonexistent-run"], "not a directory"),
        (["sample", "."], "config.json is missing"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message, tmp_path):
    proc = vaelab(*args, env=data_env(), timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("toml", "flags", "message"),
    [
        ('lr = "abc"', [], "lr must be a finite number, got 'abc' (str)"),
        ('epochs = "5"', [], "epochs must be an integer, got '5' (str)"),
        ('architecture_options = "mlp"', [], "architecture_options must be a dict"),
        ("architecture_options = [512, 256]", [], "architecture_options must be a dict"),
        ("dataset = 5", [], "dataset must be a string, got 5 (int)"),
        ('binarize = "yes"', [], "binarize must be a boolean (true/false) or None, got 'yes' (str)"),
        ("lr = inf", [], "lr must be a finite number, got inf (float)"),
        ("lr = nan", [], "lr must be a finite number, got nan (float)"),
        ("seed = -1", [], "seed must be an integer in [0, 2**32), got -1"),
        ('device = "bogus"', [], 'device must be "auto" or a torch device'),
        (None, ["--device", "bogus"], 'device must be "auto" or a torch device'),
        (None, ["--lr", "inf"], "lr must be a finite number, got inf (float)"),
        (None, ["--seed", "-1"], "seed must be an integer in [0, 2**32), got -1"),
    ],
)
def test_config_values_of_the_wrong_type_exit_2_in_one_line_before_anything_is_created(tmp_path, toml, flags, message):
    args = ["train", "--out", tmp_path / "run", *flags]
    if toml is not None:
        (tmp_path / "run.toml").write_text(toml + "\n")
        args += ["--config", tmp_path / "run.toml"]
    proc = vaelab(*args, env=data_env(), timeout=60)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()  # one line, no traceback
    assert line.startswith("vaelab train: error: ") and message in line, line
    assert not (tmp_path / "run").exists()


def test_a_config_file_with_a_bad_form_is_refused_before_any_data_is_read(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('form = "bogus"\n')
    proc = vaelab("train", "--config", config, "--out", tmp_path / "run", env=data_env(), timeout=60)
    assert proc.returncode == 2
    assert "unknown form 'bogus'; choose from joint, entropy, kl" in proc.stderr and "Traceback" not in proc.stderr


def test_train_flags_are_typed_from_the_config_fields_type_hints():
    from vaelab.cli import build_parser, resolve_config

    argv = ["train", "--max-steps", "none", "--grad-clip", "0.5", "--no-binarize", "--latent-dim", "3"]
    argv += ["--prior", "mixture-of-gaussians", "--prior-options", '{"components": 2}', "--model", "vae"]
    config = resolve_config(build_parser().parse_args(argv))
    assert config.max_steps is None and config.grad_clip == 0.5 and config.binarize is False
    assert config.latent_dim == 3 and config.prior_options == {"components": 2}


def test_debug_shows_the_traceback():
    proc = vaelab("--debug", "eval", "/nonexistent-run", timeout=60)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_help_states_defaults():
    proc = vaelab("train", "--help", check=True)
    assert "(default: 100)" in proc.stdout  # batch size
    assert "iwae-1layer" in proc.stdout


@needs_mnist
def test_load_run_from_python_rebuilds_the_model(tmp_path):
    import torch

    import vaelab as vl

    run_dir = tmp_path / "run"
    vaelab("train", *SMALL, "--max-steps", "3", "--out", run_dir, env=data_env(), check=True)
    run = vl.load_run(run_dir)
    assert run.config.dataset == "mnist" and run.config.latent_dim == 4
    assert [m["step"] for m in run.metrics if m["split"] == "train"][-1] == 3
    x = torch.bernoulli(torch.full((2, 1, 28, 28), 0.3))
    assert vl.elbo(run.model, x).shape == (2,)


def test_eval_of_a_gaussian_model_includes_the_exact_ppca_baseline(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(300, 2))
    x = 0.5 + 0.1 * latent @ rng.normal(size=(2, 16)) + 0.02 * rng.normal(size=(300, 16))
    data = tmp_path / "points.npz"
    np.savez(data, x=x[:240].clip(0, 1).astype("float32"), x_test=x[240:].clip(0, 1).astype("float32"))
    run = tmp_path / "run"
    vaelab(
        "train",
        "--dataset",
        data,
        "--likelihood",
        "gaussian",
        "--likelihood-options",
        '{"scale": 0.05}',
        "--latent-dim",
        "2",
        "--architecture-options",
        '{"hidden": [16]}',
        "--max-steps",
        "30",
        "--batch-size",
        "40",
        "--validation-size",
        "40",
        "--out",
        run,
        "--no-progress",
        env=data_env(),
        check=True,
    )
    out = tmp_path / "eval.json"
    vaelab("eval", run, "--k", "50", "--fast", "--json", out, "--no-progress", env=data_env(), check=True)
    result = json.loads(out.read_text())
    baseline = result["ppca_baseline"]
    assert baseline["latent_dim"] == 2 and baseline["examples"] == 60
    assert math.isfinite(baseline["test_log_px"]["mean"])


def test_compare_shows_latent_usage_against_beta(tmp_path):
    import numpy as np

    from tiny import bars

    x, _ = bars(240)
    data = tmp_path / "bars.npz"
    np.savez(data, x=x[:200].numpy(), x_test=x[200:].numpy())
    runs = []
    for beta in (4.0, 0.5):
        run = tmp_path / f"beta{beta}"
        vaelab(
            "train",
            "--dataset",
            data,
            "--latent-dim",
            "3",
            "--architecture-options",
            '{"hidden": [32]}',
            "--schedule",
            "constant",
            "--schedule-options",
            json.dumps({"value": beta}),
            "--max-steps",
            "40",
            "--batch-size",
            "20",
            "--validation-size",
            "40",
            "--out",
            run,
            "--no-progress",
            env=data_env(),
            check=True,
        )
        runs.append(run)
    out, picture = tmp_path / "compare.json", tmp_path / "compare.png"
    proc = vaelab(
        "compare", *runs, "--examples", "40", "--k", "20", "--json", out, "--out", picture, env=data_env(), check=True
    )
    rows = json.loads(out.read_text())
    assert [r["beta"] for r in rows] == [0.5, 4.0]  # sorted by the final KL weight
    for r in rows:
        assert r["latent_dim"] == 3 and len(r["kl_per_dim"]) == 3
        assert r["ppca_baseline"].startswith("not applicable: ")  # binary bars, a Bernoulli model
        assert r["kl_total"] == pytest.approx(sum(r["kl_per_dim"]))
        assert math.isfinite(r["log_px"]["mean"]) and r["log_px"]["mean"] >= r["elbo"]["mean"] - 1.0
    assert "active" in proc.stdout and picture.is_file()
    # both scored on the same 40 images: each run's log p(x) minus the first given (beta 4), paired per image, whose
    # mean is the difference of the two means
    first = next(r for r in rows if r["run"] == str(runs[0]))
    assert first["log_px_minus_first"] == {"mean": 0.0, "sem": 0.0}
    for r in rows:
        difference = r["log_px"]["mean"] - first["log_px"]["mean"]
        assert_within_stderr(r["log_px_minus_first"]["mean"], difference, 0.0, what="paired mean difference")


def binary_784(n: int, seed: int = 0):
    """``n`` binary 28x28 images ``[n, 1, 28, 28]``: noisy copies (5% of pixels flipped) of four random prototypes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prototypes = rng.random((4, 784)) < 0.3
    x = prototypes[rng.integers(0, 4, n)] ^ (rng.random((n, 784)) < 0.05)
    return x.astype("float32").reshape(n, 1, 28, 28)


def test_eval_and_report_with_defaults_on_a_two_layer_run(tmp_path):
    # q(z1, z2 | x) is a TwoLayerChain (no closed-form mean or variance): every diagnostic must still run, with the
    # default settings apart from a small k, and progress written as plain lines to a non-terminal stderr
    import numpy as np

    x = binary_784(140)
    data = tmp_path / "digits.npz"
    np.savez(data, x=x[:100], x_test=x[100:])
    run = tmp_path / "run"
    vaelab("train", "--preset", "iwae-2layer", "--dataset", data, "--max-steps", "3", "--batch-size", "20",
           "--out", run, "--no-progress", env=data_env(), check=True)  # fmt: skip
    proc = vaelab("eval", run, "--k", "50", env=data_env(), check=True)
    assert "\r" not in proc.stderr and "gap decomposition" in proc.stderr  # one bar per phase, plain lines
    result = json.loads((run / "eval_test.json").read_text())
    assert result["examples"] == 40 and result["diagnostics_examples"] == 40
    decomposition = result["gap_decomposition"]
    assert "samples" in decomposition["q_star_start"]  # q*'s start from samples of the TwoLayerChain
    gaps = result["approximation_gap"]["mean"] + result["amortization_gap"]["mean"]
    assert abs(gaps - decomposition["posterior_gap"]["mean"]) < 1e-6
    assert result["iwae_curve"]["k"][-1] == 50 and result["estimator_study"]["ks"][-1] == 1000  # up to 20 k
    assert result["ppca_baseline"].startswith("not applicable: the model's p(x|z) has support")
    assert "approximation gap" in proc.stdout

    proc = vaelab("report", run, "--k", "50", env=data_env(), check=True)
    assert "report written to" in proc.stdout
    diagnostics = json.loads((run / "diagnostics_test.json").read_text())
    assert diagnostics["gap_decomposition"]["examples"] == 40 and isinstance(diagnostics["approximation_gap"], dict)
    text = (run / "report.html").read_text()
    assert "not applicable: the model&#x27;s p(x|z) has support" in text  # the baseline, shown, not a failure
    assert (run / "pictures" / "gaps.png").is_file()


def test_eval_help_states_the_cost():
    proc = vaelab("eval", "--help", check=True)
    assert "--diagnostics-examples N" in proc.stdout and "(default: 500)" in proc.stdout
    assert "minutes" in proc.stdout


# --- one writer per run directory -------------------------------------------------------------------------------------
def wait_for(ready, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def lock_holder(run: Path) -> str | None:
    try:
        return (run / ".lock").read_text().strip() or None
    except FileNotFoundError:
        return None


def test_a_second_writer_is_refused_in_one_line_and_a_killed_writers_lock_does_not_block(tmp_path):
    from tiny import TINY_TRAIN_FLAGS, tiny_npy

    data, run = tiny_npy(tmp_path / "tiny.npy"), tmp_path / "run"
    train = ["train", "--dataset", data, *TINY_TRAIN_FLAGS, "--out", run]
    command = [sys.executable, "-m", "vaelab", *map(str, train)]
    first = subprocess.Popen(
        [*command, "--epochs", "1000000", "--checkpoint-every", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: list((run / "checkpoints").glob("step_*")), first, "the first checkpoint")
        assert lock_holder(run) == str(first.pid)
        for extra in ([], ["--resume"], ["--seed", "1"]):  # a fresh start, a resume, another config: all refused
            proc = vaelab(*train, *extra, timeout=120)
            assert proc.returncode == 2, proc.stderr[-3000:]
            line = proc.stderr.strip().splitlines()[-1]
            assert line == (
                f"vaelab train: error: {run} is in use by another process (pid {first.pid}): one writer per run "
                "directory; wait for it to end or stop it"
            ), line
            assert "Traceback" not in proc.stderr
        assert first.poll() is None  # the first run was not disturbed
        config = (run / "config.json").read_text()
    finally:
        first.kill()  # SIGKILL: its .lock file stays, its lock goes with the process
        first.communicate(timeout=60)
    assert lock_holder(run) == str(first.pid) and json.loads(config)["seed"] == 0

    resumed = subprocess.Popen([*command, "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []  # its stderr, read as it comes: the lock is taken before the checkpoint is restored

    def read() -> None:
        for line in resumed.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_for(lambda: lock_holder(run) == str(resumed.pid), resumed, "the resumed run to take the lock")
    wait_for(lambda: any("resumed from" in line for line in list(lines)), resumed, "the resumed run to restore")
    resumed.send_signal(signal.SIGINT)  # it runs: stop it cleanly
    resumed.wait(timeout=120)
    reader.join(timeout=60)
    resumed.stderr.close()
    err = "".join(lines)
    assert resumed.returncode == 130, err[-3000:]
    assert "resumed from" in err and "Traceback" not in err
    assert not (run / ".lock").exists()  # released and removed on the way out


def test_a_finished_or_failed_train_leaves_no_lock_file(tmp_path):
    from tiny import TINY_TRAIN_FLAGS, tiny_npy

    data = tiny_npy(tmp_path / "tiny.npy")
    vaelab("train", "--dataset", data, *TINY_TRAIN_FLAGS, "--max-steps", "5", "--out", tmp_path / "run", check=True)
    assert (tmp_path / "run" / "model.safetensors").is_file() and not (tmp_path / "run" / ".lock").exists()
    # refused by the Trainer after the lock was taken (2 examples, batch 20, validation 40): no directory is left
    proc = vaelab("train", "--dataset", tiny_npy(tmp_path / "two.npy", 2), *TINY_TRAIN_FLAGS, "--out", tmp_path / "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc to see torch being loaded")
def test_ctrl_c_while_torch_is_imported_exits_130_without_a_traceback():
    # importing torch takes seconds (~1.8 s here). The SIGINT goes once torch's C++ library is mapped into the
    # process, i.e. in the middle of that import: a fixed delay (0.4 s, as before) came before the command line was
    # even running on a loaded machine, and Python's own startup died of it (status -2). The child gets SIGINT's
    # default disposition: under a shell's background job (`cmd &`) the tests inherit SIGINT ignored, and a Python
    # started so never turns SIGINT into KeyboardInterrupt (the command then ran to the end: status 0).
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaelab", "train", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "vaelab: interrupted\n", err[-3000:]
    assert "usage" not in out  # stopped before the help was printed: the signal did come during the imports


def test_baselines_ladder_on_tiny_data(tmp_path):
    import numpy as np

    from tiny import bars, tiny_run

    data = tmp_path / "bars.npz"
    x, _ = bars(240, seed=0)
    np.savez(data, x=x[:160].numpy(), x_valid=x[160:200].numpy(), x_test=x[200:].numpy())
    tiny_run(tmp_path / "run", dataset=str(data), steps=20)
    out = tmp_path / "ladder.json"
    args = ["baselines", "--dataset", data, "--runs", tmp_path / "run", "--components", "2", "4", "--k", "10"]
    more = ["--parzen-draws", "10", "100", "--autoencoder-steps", "20"]
    proc = vaelab(*args, *more, "--json", out, check=True)
    # the autoencoder alone has no number: it has no p(x)
    assert proc.stdout.count("not comparable") == 1 and "not comparable: no p(x)" in proc.stdout, proc.stdout
    assert "kde-bernoulli" in proc.stdout and "reconstruction -log p(x | E_q[z|x])" in proc.stdout
    table = json.loads(out.read_text())
    assert table["space"] == "binary" and table["split"] == "bars test, binary as stored"
    run = str(tmp_path / "run")
    names = [r["name"] for r in table["rows"]]
    assert names == ["kde-bernoulli", "bernoulli-mixture", run, "run, Parzen on 10 draws", "run, Parzen on 100 draws",
                     "autoencoder (run)"]  # fmt: skip
    *scored, autoencoder = table["rows"]
    assert all(math.isfinite(r["log_px"]["mean"]) and r["log_px"]["sem"] > 0 for r in scored)
    assert math.isfinite(autoencoder["reconstruction"]["mean"]) and "log_px" not in autoencoder
    # one picture beside the run: a row of samples for the VAE, the autoencoder and each baseline
    picture = tmp_path / "run" / "pictures" / "ladder_samples_binary.png"
    assert Path(table["rows"][2]["samples_picture"]) == picture and picture.is_file()
    assert all("samples" not in r for r in table["rows"])  # the draws themselves stay out of the JSON
    assert vaelab(*args, "--parzen-draws", "0").stderr.endswith("--autoencoder-steps >= 0 (got 2000)\n")
    # beside the run, where vaelab report shows it: every row, the autoencoder's without a log-likelihood
    from vaelab.report import render_report
    from vaelab.runs import load_run

    beside = json.loads((tmp_path / "run" / "ladder_binary.json").read_text())
    assert beside == table
    pictures = {"ladder_samples_binary": picture}
    text = render_report(load_run(tmp_path / "run"), {"ladder": [beside]}, pictures=pictures)
    section = text[text.index('id="ladder"') : text.index('id="json"')]
    assert all(name in section for name in names) and section.count("<tr>") == 1 + len(names)
    assert "no p(x): a deterministic autoencoder" in section and section.count("<img") == 1
    # the binary data as dequantized grey: refused in one line; so are binary-only baselines on grey data
    for bad, why in [
        (["--space", "dequantized"], "is not 8-bit grey data"),
        (["--bandwidths", "0"], "bandwidths must lie in (0, 1.0), got [0.0]"),
        (["--components", "200"], "K = 200 mixture components need at least K training points, got 160"),
    ]:
        proc = vaelab("baselines", "--dataset", data, *bad)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and why in proc.stderr, proc.stderr
    grey = tmp_path / "grey.npz"
    g = np.random.default_rng(0)
    np.savez(
        grey,
        x=g.integers(0, 256, (60, 1, 4, 4), dtype=np.uint8),
        x_test=g.integers(0, 256, (9, 1, 4, 4), dtype=np.uint8),
    )
    proc = vaelab("baselines", "--dataset", grey, "--validation-size", "20", "--baselines", "bernoulli-mixture")
    assert proc.returncode == 2 and "bernoulli-mixture models binary data, not dequantized data" in proc.stderr
    grey_args = ["--validation-size", "20", "--components", "1", "2", "--latent-dims", "2", "--json", out]
    vaelab("baselines", "--dataset", grey, *grey_args, check=True)
    table = json.loads(out.read_text())
    assert table["space"] == "dequantized" and len(table["rows"]) == 5
    assert all(0 < r["bits_per_dim"]["mean"] < 16 for r in table["rows"])


def test_eval_scores_the_checkpoint_asked_for(tmp_path, capsys):
    """``vaelab eval --checkpoint best`` scores the weights with the best validation ELBO (early stopping), and says
    which file it read; the default stays the final weights."""
    import numpy as np

    from tiny import bars, tiny_run
    from vaelab.cli import main

    data = tmp_path / "bars.npz"
    x, _ = bars(240, seed=0)
    np.savez(data, x=x[:160].numpy(), x_valid=x[160:200].numpy(), x_test=x[200:].numpy())
    run = tmp_path / "run"
    tiny_run(run, dataset=str(data), steps=20)  # validates every 10 steps, so a "best" checkpoint exists
    for which, weights in (("best", run / "checkpoints" / "best"), ("final", run / "model.safetensors")):
        out = tmp_path / f"{which}.json"
        argv = ["eval", str(run), "--checkpoint", which, "--k", "5", "--examples", "10", "--fast", "--no-progress"]
        assert main([*argv, "--json", str(out)]) == 0
        assert Path(json.loads(out.read_text())["weights"]).is_relative_to(weights), which
    with pytest.raises(SystemExit):
        main(["eval", str(run), "--checkpoint", "median"])
    assert "invalid choice: 'median'" in capsys.readouterr().err


def test_scoring_commands_take_images_and_their_labels_from_the_same_rows(tmp_path):
    """``eval``, ``report``, ``reconstruct`` and ``compare`` take their examples from ``cli._eval_data``: with fewer
    examples than the split, the images spread over it (:func:`vaelab.data.spread`) and the labels of those images
    (``report`` once coloured its pictures with the split's first labels)."""
    import numpy as np
    import torch

    from tiny import bars, tiny_run
    from vaelab.cli import _eval_data
    from vaelab.data import spread

    x, y = bars(240, seed=1)
    data = tmp_path / "bars.npz"
    np.savez(data, x=x[:160].numpy(), y=y[:160].numpy(), x_test=x[200:].numpy(), y_test=y[200:].numpy())
    run = tiny_run(tmp_path / "run", dataset=str(data), steps=2)
    rows = spread(40, 10)
    taken = _eval_data(run, "test", 10, seed=0)
    assert torch.equal(taken.x.cpu(), x[200:][rows]) and torch.equal(taken.labels.cpu(), y[200:][rows])
    assert not torch.equal(taken.labels.cpu(), y[200:210])  # the first ten differ: the test can tell the two apart
    assert taken.context is None  # a model of x alone is given nothing
