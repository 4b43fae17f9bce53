"""A corpus of malformed inputs, each given to a real `vaelab` process: data files, config files, run directories and
checkpoints. Every case must exit 2 with one line (``vaelab COMMAND: error: ...``) naming the file or the field, no
traceback, and must leave the run directory as it was (hashed before and after) or not create it at all.

The cases run three processes at a time (each is mostly torch's import), once per module; each test then checks one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny import TINY_TRAIN_FLAGS, tiny_npy


@dataclass
class Case:
    """``setup(root)`` writes the malformed input under ``root`` and returns the command's arguments; the message
    must contain ``expected``; ``watch`` is the directory that must not change (or, if absent, not appear)."""

    name: str
    setup: Callable[[Path], list]
    expected: str
    watch: str = "run"


def hash_tree(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


# --- the inputs -----------------------------------------------------------------------------------------------------
def train_on(data: Path) -> list:
    return ["train", "--dataset", data, *TINY_TRAIN_FLAGS, "--max-steps", "2", "--out", data.parent / "run"]


def data_case(name: str, write: Callable[[Path], Path], expected: str) -> Case:
    return Case(name, lambda root: train_on(write(root)), expected)


def npy(array) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        np.save(root / "data.npy", array, allow_pickle=True)
        return root / "data.npy"

    return write


def raw_file(name: str, content: bytes) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        (root / name).write_bytes(content)
        return root / name

    return write


def idx(array: np.ndarray) -> bytes:
    return (
        bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes() + array.astype(np.uint8).tobytes()
    )


IDX_GOOD = {
    "train-images-idx3-ubyte": idx(np.zeros((60, 8, 8))),
    "train-labels-idx1-ubyte": idx(np.zeros(60)),
    "t10k-images-idx3-ubyte": idx(np.zeros((10, 8, 8))),
    "t10k-labels-idx1-ubyte": idx(np.zeros(10)),
}


def gzip_bomb() -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [packer.compress(idx(np.zeros((60, 8, 8))))] + [packer.compress(bytes(1 << 20)) for _ in range(256)]
    return b"".join([*parts, packer.flush()])


def idx_folder(name: str, content: bytes, *, gz: bool = False) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        folder = root / "idx"
        folder.mkdir()
        for file, good in IDX_GOOD.items():
            (folder / file).write_bytes(good)
        if gz:
            (folder / name).unlink()
            name_written = name + ".gz"
        else:
            name_written = name
        (folder / name_written).write_bytes(content)
        return folder

    return write


def png(width: int, height: int) -> bytes:
    """A grey PNG of zeros; past a million pixels, its header alone (a decompression bomb's: refused on open)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    body = b""
    if width * height < 10**6:
        body = chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(height))))
    return b"\x89PNG\r\n\x1a\n" + header + body + chunk(b"IEND", b"")


def image_folder(files: dict[str, bytes]) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        folder = root / "images"
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(content)
        return folder

    return write


def npz(**arrays) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        np.savez(root / "data.npz", **arrays)
        return root / "data.npz"

    return write


BARS = (np.arange(240 * 64).reshape(240, 64) % 2).astype(np.uint8) * 255

DATA_CASES = [
    data_case("npy-garbage", raw_file("data.npy", b"\x93NUMPY garbage"), "data.npy: cannot be read as a NumPy"),
    data_case("npy-empty-file", raw_file("data.npy", b""), "data.npy: cannot be read as a NumPy"),
    data_case("npy-pickled-objects", npy(np.array([{"x": 1}] * 3, dtype=object)), "data.npy"),
    data_case("npy-nan", npy(np.full((240, 64), np.nan, dtype=np.float32)), "data.npy"),
    data_case("npy-inf", npy(np.full((240, 64), np.inf, dtype=np.float32)), "data.npy"),
    data_case("npy-one-dimensional", npy(np.zeros(240, dtype=np.uint8)), "data.npy"),
    data_case("npy-out-of-unit-interval", npy(np.full((240, 64), 3.0, dtype=np.float32)), "data.npy: values out"),
    data_case("npy-too-few-examples", npy(BARS[:2]), "validation_size=40 leaves no training examples"),
    data_case("npz-garbage", raw_file("data.npz", b"PK\x03\x04 not a zip"), "data.npz: cannot be read"),
    data_case("npz-without-x", npz(a=BARS, b=BARS), "data.npz: expected an array 'x'"),
    data_case("unsupported-suffix", raw_file("data.csv", b"1,2,3\n"), "data.csv: unsupported data file"),
    data_case("idx-truncated", idx_folder("train-images-idx3-ubyte", idx(np.zeros((60, 8, 8)))[:-10]), "truncated"),
    data_case("idx-trailing-bytes", idx_folder("t10k-images-idx3-ubyte", idx(np.zeros((10, 8, 8))) + b"x"), "t10k"),
    data_case("idx-wrong-magic", idx_folder("train-images-idx3-ubyte", b"PK\x03\x04" + bytes(64)), "not an IDX file"),
    data_case("idx-zero-dims", idx_folder("train-labels-idx1-ubyte", bytes([0, 0, 8, 0])), "declares 0 dimensions"),
    data_case("idx-label-count", idx_folder("train-labels-idx1-ubyte", idx(np.zeros(59))), "count mismatch"),
    data_case(
        "idx-float-images",
        idx_folder("train-images-idx3-ubyte", bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + bytes(4)),
        "unsigned bytes",
    ),
    data_case("idx-gzip-bomb", idx_folder("train-images-idx3-ubyte", gzip_bomb(), gz=True), "decompression bomb"),
    data_case(
        "idx-corrupt-gzip",
        idx_folder("t10k-labels-idx1-ubyte", gzip.compress(b"")[:10] + b"\xff" * 20, gz=True),
        "corrupt gzip",
    ),
    data_case(
        "idx-truncated-gzip",
        idx_folder("t10k-labels-idx1-ubyte", gzip.compress(idx(np.zeros(10)))[:20], gz=True),
        "truncated gzip",
    ),
    data_case("png-bomb", image_folder({"a.png": png(40000, 40000)}), "a.png: refused as a decompression bomb"),
    data_case("png-garbage", image_folder({"a.png": b"\x89PNG\r\n\x1a\nnot really"}), "a.png: cannot be read"),
    data_case("png-sizes-differ", image_folder({"a.png": png(8, 8), "b.png": png(9, 8)}), "b.png: wrong dimensions"),
    data_case("empty-folder", image_folder({}), "no PNG/JPEG images"),
    data_case("missing-path", lambda root: root / "nowhere.npy", "nowhere.npy"),
]


def config_case(name: str, toml: str, expected: str) -> Case:
    def setup(root: Path) -> list:
        (root / "run.toml").write_text(toml + "\n")
        return ["train", "--config", root / "run.toml", "--out", root / "run"]

    return Case(name, setup, expected)


CONFIG_CASES = [
    config_case("lr-string", 'lr = "abc"', "lr must be a finite number"),
    config_case("epochs-string", 'epochs = "5"', "epochs must be an integer"),
    config_case("k-float", "k = 1.5", "k must be an integer"),
    config_case("latent-dim-bool", "latent_dim = true", "latent_dim must be an integer"),
    config_case("architecture-options-string", 'architecture_options = "mlp"', "architecture_options must be a dict"),
    config_case("architecture-options-list", "architecture_options = [512]", "architecture_options must be a dict"),
    config_case("dataset-int", "dataset = 5", "dataset must be a string"),
    config_case("binarize-string", 'binarize = "yes"', "binarize must be a boolean"),
    config_case("lr-inf", "lr = inf", "lr must be a finite number"),
    config_case("lr-negative", "lr = -0.1", "lr must be > 0"),
    config_case("seed-negative", "seed = -1", "seed must be an integer in [0, 2**32)"),
    config_case("seed-huge", "seed = 1099511627776", "seed must be an integer in [0, 2**32)"),
    config_case("latent-dim-zero", "latent_dim = 0", "latent_dim must be an integer >= 1"),
    config_case("batch-size-negative", "batch_size = -1", "batch_size must be an integer >= 1"),
    config_case("keep-last-zero", "keep_last = 0", "keep_last must be an integer >= 1"),
    config_case("grad-clip-negative", "grad_clip = -1.0", "grad_clip must be > 0"),
    config_case("max-steps-zero", "max_steps = 0", "max_steps must be an integer >= 1"),
    config_case("unknown-field", "colour = 1", "unknown config key(s): colour"),
    config_case("bad-architecture", 'architecture = "bogus"', "unknown architecture 'bogus'"),
    config_case("bad-prior", 'prior = "bogus"', "unknown prior 'bogus'"),
    config_case("bad-likelihood", 'likelihood = "bogus"', "unknown likelihood 'bogus'"),
    config_case("bad-objective", 'objective = "bogus"', "unknown objective 'bogus'"),
    config_case("bad-schedule", 'schedule = "bogus"', "unknown schedule 'bogus'"),
    config_case("bad-lr-decay", 'lr_decay = "bogus"', "unknown lr_decay 'bogus'"),
    config_case("bad-form", 'form = "bogus"', "unknown form 'bogus'"),
    config_case("bad-optimizer", 'optimizer = "bogus"', "unknown optimizer 'bogus'"),
    config_case("bad-model", 'model = "bogus"', "unknown model 'bogus'"),
    config_case("bad-device", 'device = "bogus"', "device must be"),
    config_case("bad-preset", 'preset = "bogus"', "unknown preset 'bogus'"),
    config_case("unknown-prior-option", "prior_options = {components = 3}", "unknown prior_options 'components'"),
    config_case("unknown-schedule-option", "schedule_options = {bogus = 1}", "schedule_options"),
    config_case("unknown-optimizer-option", "optimizer_options = {bogus = 1}", "bogus"),
    config_case("not-toml", "lr = = 1", "is not valid TOML"),
    Case("config-missing", lambda root: ["train", "--config", root / "no.toml", "--out", root / "run"], "no.toml"),
    Case("config-is-a-folder", lambda root: ["train", "--config", root, "--out", root / "run"], "config file"),
]


# --- damaged run directories and checkpoints ------------------------------------------------------------------------
def edit_json(relative: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        for path in sorted(run.glob(relative)):
            value = json.loads(path.read_text())
            change(value)  # in place
            path.write_text(json.dumps(value))

    return damage


def write(relative: str, content: bytes) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        for path in sorted(run.glob(relative)):
            path.write_bytes(content)

    return damage


def remove(relative: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        for path in sorted(run.glob(relative)):
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    return damage


def edit_tensors(relative: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        for path in sorted(run.glob(relative)):
            tensors = load_file(path)
            change(tensors)
            save_file(tensors, path)

    return damage


def first_key(tensors: dict, prefix: str = "") -> str:
    return next(k for k in sorted(tensors) if k.startswith(prefix))


def run_case(name: str, damage: Callable[[Path], None], expected: str, command: str = "sample") -> Case:
    def setup(root: Path) -> list:
        run = root / "run"
        shutil.copytree(FINISHED, run)
        damage(run)
        if command == "sample":
            return ["sample", run, "--n", "2", "--out", root / "run" / "samples.png"]
        return ["train", "--resume", "--out", run]

    return Case(name, setup, expected)


def resume_case(name: str, damage: Callable[[Path], None], expected: str) -> Case:
    return run_case(name, damage, expected, command="resume")


STEPS = "checkpoints/step_*"
RUN_CASES = [
    run_case("config-json-missing", remove("config.json"), "config.json is missing"),
    run_case("config-json-torn", write("config.json", b'{"architecture": "ml'), "config.json is not valid JSON"),
    run_case("config-json-binary", write("config.json", b"\xff\xfe\x00garbage"), "config.json"),
    run_case("config-json-a-list", write("config.json", b"[1, 2]"), "config.json: the saved config is not a JSON"),
    run_case(
        "config-json-no-architecture",
        edit_json("config.json", lambda c: c.pop("architecture")),
        "config.json: the saved config has no architecture",
    ),
    run_case("config-json-no-latent-dim", edit_json("config.json", lambda c: c.pop("latent_dim")), "has no latent_dim"),
    run_case("config-json-no-likelihood", edit_json("config.json", lambda c: c.pop("likelihood")), "has no likelihood"),
    run_case(
        "config-json-wrong-type",
        edit_json("config.json", lambda c: c.update(latent_dim="2")),
        "config.json: latent_dim must be an integer",
    ),
    run_case(
        "config-json-unknown-key",
        edit_json("config.json", lambda c: c.update(colour=1)),
        "config.json: unknown config key",
    ),
    run_case(
        "config-json-bad-enum",
        edit_json("config.json", lambda c: c.update(architecture="bogus")),
        "config.json: unknown architecture",
    ),
    run_case(
        "config-json-other-size", edit_json("config.json", lambda c: c.update(latent_dim=3)), "does not fit the model"
    ),
    run_case("data-shape-torn", write("data_shape.json", b"[1, 8"), "data_shape.json is not valid JSON"),
    run_case("data-shape-zero", write("data_shape.json", b"[0]"), "data_shape.json must hold a list of integers"),
    run_case("data-shape-string", write("data_shape.json", b'"abc"'), "data_shape.json must hold a list of integers"),
    run_case("data-shape-other", write("data_shape.json", b"[65]"), "does not fit the model"),
    run_case(
        "weights-truncated", write("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{"), "model.safetensors"
    ),
    run_case("weights-empty", write("model.safetensors", b""), "model.safetensors"),
    run_case(
        "weights-a-pickle",
        lambda run: torch.save({"a": torch.zeros(1)}, run / "model.safetensors"),
        "model.safetensors",
    ),
    run_case(
        "weights-nan",
        edit_tensors("model.safetensors", lambda w: w.update({first_key(w): w[first_key(w)] * np.nan})),
        "NaN or inf",
    ),
    run_case("weights-missing-tensor", edit_tensors("model.safetensors", lambda w: w.pop(first_key(w))), "missing"),
    run_case(
        "weights-extra-tensor",
        edit_tensors("model.safetensors", lambda w: w.update(extra=torch.zeros(1))),
        "unexpected extra",
    ),
    run_case(
        "weights-wrong-shape",
        edit_tensors("model.safetensors", lambda w: w.update({first_key(w): torch.zeros(3)})),
        "has shape [3]",
    ),
    run_case(
        "latest-checkpoint-no-step",
        lambda run: (remove("model.safetensors")(run), edit_json(f"{STEPS}/state.json", lambda m: m.pop("step"))(run)),
        "state.json: step must be",
    ),
    Case(
        "run-dir-is-a-file", lambda root: (root / "f").write_text("") or ["sample", root / "f"], "not a directory", "f"
    ),
    Case("run-dir-missing", lambda root: ["eval", root / "run"], "not a directory"),
    resume_case("no-checkpoints", remove("checkpoints"), "--resume: no checkpoint in"),
    resume_case(
        "checkpoint-no-step",
        edit_json(f"{STEPS}/state.json", lambda m: m.pop("step")),
        "state.json: step must be an integer",
    ),
    resume_case(
        "checkpoint-step-string",
        edit_json(f"{STEPS}/state.json", lambda m: m.update(step="20")),
        "step must be an integer",
    ),
    resume_case(
        "checkpoint-no-data-shape",
        edit_json(f"{STEPS}/state.json", lambda m: m.pop("data_shape")),
        "state.json: data_shape must be",
    ),
    resume_case(
        "checkpoint-no-config",
        edit_json(f"{STEPS}/state.json", lambda m: m.pop("config")),
        "state.json: the saved config is not",
    ),
    resume_case(
        "checkpoint-config-no-architecture",
        edit_json(f"{STEPS}/state.json", lambda m: m["config"].pop("architecture")),
        "state.json: the saved config has no architecture",
    ),
    resume_case(
        "checkpoint-config-wrong-type",
        edit_json(f"{STEPS}/state.json", lambda m: m["config"].update(lr="abc")),
        "state.json: lr must be",
    ),
    resume_case(
        "checkpoint-no-optimizer",
        edit_json(f"{STEPS}/state.json", lambda m: m.pop("optimizer")),
        "state.json: no optimizer state",
    ),
    resume_case(
        "checkpoint-optimizer-tensor-missing",
        edit_tensors(f"{STEPS}/state.safetensors", lambda t: t.pop(first_key(t, "optim."))),
        "state.safetensors lacks optim.",
    ),
    resume_case(
        "checkpoint-rng-missing",
        edit_tensors(f"{STEPS}/state.safetensors", lambda t: t.pop("rng.torch")),
        "state.safetensors lacks rng.torch",
    ),
    resume_case(
        "checkpoint-format",
        edit_json(f"{STEPS}/state.json", lambda m: m.update(format_version=99)),
        "unknown checkpoint format 99",
    ),
    resume_case("checkpoint-state-json-torn", write(f"{STEPS}/state.json", b'{"step": 1'), "state.json is damaged"),
    resume_case(
        "checkpoint-weights-torn", write(f"{STEPS}/model.safetensors", bytes(64)), "model.safetensors is damaged"
    ),
    resume_case("checkpoint-state-missing", remove(f"{STEPS}/state.safetensors"), "state.safetensors is missing"),
    resume_case(
        "checkpoint-weights-wrong-shape",
        edit_tensors(f"{STEPS}/model.safetensors", lambda w: w.update({first_key(w): torch.zeros(3)})),
        "has shape [3]",
    ),
    resume_case(
        "checkpoint-optimizer-groups",
        edit_json(f"{STEPS}/state.json", lambda m: m["optimizer"]["param_groups"][0].update(params=[0])),
        "the optimizer state does not fit",
    ),
]

CASES = DATA_CASES + CONFIG_CASES + RUN_CASES
FINISHED: Path  # a finished tiny run, copied by every run case (set by the `results` fixture)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, object, object, Case]]:
    """Every case run once: its process, and the watched directory's hash before and after."""
    global FINISHED
    root = tmp_path_factory.mktemp("malformed")
    data = tiny_npy(root / "tiny.npy")
    FINISHED = root / "finished"
    train = ["train", "--dataset", data, *TINY_TRAIN_FLAGS, "--max-steps", "20", "--checkpoint-every", "10"]
    done = subprocess.run(
        [sys.executable, "-m", "vaelab", *map(str, train), "--out", str(FINISHED)], capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    def one(case: Case):
        where = root / case.name
        where.mkdir()
        args = case.setup(where)
        before = hash_tree(where / case.watch)
        proc = subprocess.run(
            [sys.executable, "-m", "vaelab", *map(str, args)], capture_output=True, text=True, timeout=300
        )
        return case.name, (proc, before, hash_tree(where / case.watch), case)

    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(one, CASES))


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 60 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_malformed_input_is_one_line_exit_2_and_changes_nothing(results, name):
    proc, before, after, case = results[name]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("vaelab ") and ": error: " in lines[0], lines[0]
    assert case.expected in lines[0], lines[0]
    assert after == before, f"{case.watch} changed"
