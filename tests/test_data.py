"""Datasets: the loaders on the real files, the search order, every kind of bad input, generic data, binarization.

The real files come from the ``shared/data`` folder beside the repository (falling back to ``/work/shared/data``)
and from Debian's ``/usr/share/datasets/fashion-mnist``; a test that needs one skips, saying so, if it is absent.
Bad inputs are real corrupted files written to ``tmp_path``. No test touches the network: every test runs with
``$VAELAB_OFFLINE`` set, the user cache and ``$HOME`` inside ``tmp_path``, and the download test uses a local HTTP
server.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import http.server
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab.data import (
    DATASETS,
    UNLABELLED,
    DataError,
    MappedRows,
    Splits,
    as_float,
    binarize_dynamic,
    binarize_fixed,
    binarize_with_bits,
    download_dataset,
    find_dataset,
    label_subset,
    load_dataset,
    mean_example,
    partly_labelled,
    random_bits,
    read_idx,
    split_indices,
    spread,
)
from vaelab.tolerance import reduction_error_bound


def _shared_data() -> Path:
    beside = Path(__file__).resolve().parents[2] / "shared" / "data"
    return beside if beside.is_dir() else Path("/work/shared/data")


DATA = _shared_data()
MNIST_DIR = DATA / "mnist"
BINARIZED_DIR = DATA / "binarized_mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = DATASETS["mnist"].files

# label counts of the 60,000 training and 10,000 test images, from MNIST's README
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _needs(folder: Path, *names: str):
    missing = [n for n in names if not (folder / n).is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"dataset files absent: {folder} lacks {missing}")


needs_mnist = _needs(MNIST_DIR, *(f + ".gz" for f in IDX_FILES))
needs_fashion = _needs(FASHION_DIR, *(f + ".gz" for f in IDX_FILES))
needs_binarized = _needs(BINARIZED_DIR, *(f + ".gz" for f in DATASETS["binarized-mnist"].files))


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, no data folder from the environment, and a user cache and home inside tmp_path."""
    monkeypatch.setenv("VAELAB_OFFLINE", "1")
    monkeypatch.delenv("VAELAB_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def mnist() -> Splits:
    if not MNIST_DIR.is_dir():
        pytest.skip(f"MNIST absent from {MNIST_DIR}")
    return load_dataset("mnist", data_dir=DATA, download=False)


def _check_images(x: torch.Tensor, n: int, dtype: torch.dtype = torch.uint8) -> None:
    """8-bit images are held as uint8 (as_float converts them); binarized MNIST as float32 0/1."""
    assert x.shape == (n, 1, 28, 28)
    assert x.dtype == dtype
    assert 0 <= as_float(x).min() and as_float(x).max() <= 1


def _write_idx(path: Path, array: np.ndarray, *, compress: bool = False, type_code: int = 0x08) -> Path:
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    content = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


def _fake_copy(folder: Path, source: Path = MNIST_DIR, **replacements: bytes) -> Path:
    """A dataset folder of symbolic links to ``source``'s files, with some files replaced by the bytes given."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.name.endswith(".gz") and f.name not in replacements:
            (folder / f.name).symlink_to(f)
    for name, content in replacements.items():
        (folder / name).write_bytes(content)
    return folder


def _uncompressed(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


# --- the real datasets ------------------------------------------------------------------------------------------------
@needs_mnist
def test_mnist_shapes_ranges_and_label_counts(mnist):
    _check_images(mnist.train, 50000)
    _check_images(mnist.valid, 10000)
    _check_images(mnist.test, 10000)
    assert mnist.data_shape == (1, 28, 28)
    assert not mnist.binary
    assert mnist.source == MNIST_DIR
    for labels in (mnist.train_labels, mnist.valid_labels, mnist.test_labels):
        assert labels.dtype == torch.int64
    all_train = torch.cat([mnist.train_labels, mnist.valid_labels])
    assert len(all_train) == 60000
    assert torch.bincount(all_train).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.test_labels).tolist() == MNIST_TEST_COUNTS
    train = as_float(mnist.train)
    assert train.max() == 1 and train.mean().item() == pytest.approx(0.1307, abs=5e-4)  # MNIST's mean


@needs_fashion
def test_fashion_mnist_six_thousand_per_class():
    splits = load_dataset("fashion-mnist", data_dir=FASHION_DIR, download=False)
    _check_images(splits.train, 50000)
    _check_images(splits.valid, 10000)
    _check_images(splits.test, 10000)
    assert torch.bincount(torch.cat([splits.train_labels, splits.valid_labels])).tolist() == [6000] * 10
    assert torch.bincount(splits.test_labels).tolist() == [1000] * 10
    assert splits.source == FASHION_DIR and not splits.binary


@needs_binarized
def test_binarized_mnist_is_binary_with_its_own_split():
    start = time.perf_counter()
    splits = load_dataset("binarized-mnist", data_dir=DATA, validation_size=123, download=False)
    seconds = time.perf_counter() - start
    for x, n in ((splits.train, 50000), (splits.valid, 10000), (splits.test, 10000)):
        _check_images(x, n, torch.float32)
        assert torch.equal(x, (x == 1).float())  # exactly 0 or 1
    assert splits.binary and splits.train_labels is None and splits.test_labels is None
    # pixel means recorded in the data folder's README
    assert [round(x.mean().item(), 4) for x in (splits.train, splits.valid, splits.test)] == [0.1306, 0.1311, 0.1325]
    assert seconds < 20, "vectorized parsing takes well under 2 s; a per-value Python loop takes minutes"


@needs_mnist
def test_validation_split_is_fixed_and_disjoint(mnist):
    train_idx, valid_idx = split_indices(60000, 10000, seed=0)
    again_train, again_valid = split_indices(60000, 10000, seed=0)
    assert torch.equal(train_idx, again_train) and torch.equal(valid_idx, again_valid)
    assert valid_idx[:5].tolist() == [0, 9, 24, 26, 49]  # pinned: a change of split would silently change results
    assert len(np.intersect1d(train_idx, valid_idx)) == 0
    assert torch.equal(torch.sort(torch.cat([train_idx, valid_idx])).values, torch.arange(60000))
    assert not torch.equal(split_indices(60000, 10000, seed=1)[1], valid_idx)

    full = load_dataset("mnist", data_dir=DATA, validation_size=0, download=False)
    assert full.train.shape[0] == 60000 and full.valid.shape == (0, 1, 28, 28) and full.valid_labels.shape == (0,)
    assert torch.equal(mnist.valid, full.train[valid_idx]) and torch.equal(mnist.train, full.train[train_idx])
    assert torch.equal(mnist.valid_labels, full.train_labels[valid_idx])
    assert torch.equal(mnist.test, full.test)


@pytest.mark.parametrize("total", [1, 7, 10, 60000])
@pytest.mark.parametrize("examples", [None, 1, 3, 10, 70000])
def test_spread_takes_rows_evenly_over_the_whole_split(total, examples):
    rows = spread(total, examples)
    m = total if examples is None else min(total, examples)
    assert len(rows) == m and rows[0] == 0 and rows[-1] < total
    gaps = torch.diff(torch.cat([rows, torch.tensor([total])]))  # the last gap wraps to the end of the split
    assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1  # distinct, in order, and no stretch of the split skipped
    assert torch.equal(spread(total, total), torch.arange(total))
    with pytest.raises(DataError, match="examples"):
        spread(total, 0)


def test_a_subset_of_a_file_ordered_by_class_samples_every_class(tmp_path):
    """Larochelle's binarized MNIST test file is ordered by digit: its first 1000 images are nearly all zeros. A
    subset taken with ``max_examples`` (and by ``vaelab eval --examples``, through the same spread) has every class."""
    y = torch.arange(10).repeat_interleave(30)  # 300 images, class by class
    x = (torch.rand(300, 1, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    path = tmp_path / "ordered.npz"
    np.savez(path, x=x.numpy(), y=y.numpy(), x_test=x.numpy(), y_test=y.numpy())
    small = load_dataset(str(path), validation_size=0, max_examples=20, download=False)
    assert sorted(set(small.test_labels.tolist())) == list(range(10))
    assert torch.equal(small.test, x[spread(300, 20)]) and torch.equal(small.test_labels, y[spread(300, 20)])


@needs_mnist
def test_max_examples_truncates_each_split_after_splitting(mnist):
    small = load_dataset("mnist", data_dir=DATA, max_examples=100, download=False)
    assert [len(t) for t in (small.train, small.valid, small.test, small.train_labels)] == [100] * 4
    rows = spread(len(mnist.train), 100)
    assert torch.equal(small.train, mnist.train[rows]) and torch.equal(small.train_labels, mnist.train_labels[rows])
    assert torch.equal(small.valid, mnist.valid[spread(len(mnist.valid), 100)])
    with pytest.raises(DataError, match="max_examples"):
        load_dataset("mnist", data_dir=DATA, max_examples=0, download=False)
    with pytest.raises(DataError, match="validation_size=60000 leaves no training examples"):
        load_dataset("mnist", data_dir=DATA, validation_size=60000, download=False)


@needs_mnist
def test_uncompressed_files_and_the_dotted_spelling_are_read_and_checksummed(tmp_path, mnist):
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in IDX_FILES:  # train-images.idx3-ubyte, ... uncompressed
        (folder / name.replace("-idx", ".idx")).write_bytes(_uncompressed(MNIST_DIR / f"{name}.gz"))
    splits = load_dataset("mnist", data_dir=folder, download=False)
    assert splits.source == folder
    assert torch.equal(splits.train, mnist.train) and torch.equal(splits.test_labels, mnist.test_labels)


@needs_mnist
def test_8_bit_data_are_held_as_uint8_and_batches_are_the_float_values_bit_for_bit(tmp_path, mnist):
    # 4x less memory than float32: the Trainer keeps the uint8 tensor and converts each batch; the batches are
    # exactly what the float32 data (as loaded before: uint8 as float32, divided by 255) gave
    from vaelab.train import TrainConfig, Trainer

    images = read_idx(MNIST_DIR / "train-images-idx3-ubyte.gz")  # uint8 [60000, 28, 28]
    train_idx, _ = split_indices(60000, 10000, seed=0)
    old = torch.from_numpy(images.numpy()[train_idx.numpy()].astype(np.float32)).div_(255.0).unsqueeze(1)
    assert mnist.train.dtype == torch.uint8 and mnist.train.nbytes * 4 == old.nbytes
    config = TrainConfig(max_steps=3, batch_size=100, progress=False, architecture_options={"hidden": [8]})
    held = Trainer(config, mnist.train, None, tmp_path / "uint8")
    reference = Trainer(config, old, None, tmp_path / "float")
    assert held.train_data["x"].dtype == torch.uint8
    for step in (0, 1, 499, 500, 12345):  # across epochs
        got, expected = held._batch(step)["x"], reference._batch(step)["x"]
        assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_npy_is_memory_mapped_not_read(tmp_path):
    # A 114 MiB uint8 .npy: loaded as a mapping (np.memmap), split by index, batches read on demand; the process's
    # own resident memory (RssAnon) grows by far less than the file when the Trainer is built and takes steps
    import subprocess
    import textwrap

    n, d = 150_000, 800
    array = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(n, d))
    array[:] = np.random.default_rng(0).integers(0, 256, (1, d), dtype=np.uint8)  # one row repeated: cheap to write
    array[::1000, 0] = np.arange(n // 1000) % 256  # a few rows told apart
    array.flush()
    del array
    np.save(tmp_path / "small.npy", np.full((200, d), 7, dtype=np.uint8))
    splits = load_dataset(tmp_path / "big.npy", validation_size=1000, seed=0)
    assert isinstance(splits.train, MappedRows) and isinstance(splits.train.array, np.memmap)
    assert splits.train.shape == (n - 1000, d) and splits.train.dtype == torch.uint8 and len(splits.valid) == 1000
    train_idx, _ = split_indices(n, 1000, seed=0)
    rows = torch.tensor([0, 5, n - 1001])
    expected = np.load(tmp_path / "big.npy", mmap_mode="r")[train_idx[rows].numpy()]
    assert torch.equal(splits.train.index_select(0, rows), torch.from_numpy(expected))
    script = textwrap.dedent(f"""
        import torch
        from vaelab.data import load_dataset
        from vaelab.train import TrainConfig, Trainer
        torch.set_num_threads(1)
        def rss_mb():  # the process's own memory; pages of the mapped file are the page cache's, reclaimable
            status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
            return int(status["RssAnon"].split()[0]) / 1024
        config = TrainConfig(max_steps=5, batch_size=50, likelihood="continuous-bernoulli", binarize=False,
                             init_decoder_bias=False, progress=False, architecture_options={{"hidden": [8]}},
                             latent_dim=2, eval_examples=100, eval_k=2)
        def train(data, run_dir):
            trainer = Trainer(config, data.train, data.valid, run_dir)
            for _ in range(5):
                trainer.train_step()
        # torch's own first-use memory, out of the count:
        train(load_dataset({str(tmp_path / "small.npy")!r}, validation_size=50), {str(tmp_path / "warm-up")!r})
        before = rss_mb()
        train(load_dataset({str(tmp_path / "big.npy")!r}, validation_size=1000), {str(tmp_path / "run")!r})
        print(rss_mb() - before)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown = float(done.stdout.split()[-1])
    assert grown < 30, f"resident memory grew by {grown:.0f} MiB for a {n * d / 2**20:.0f} MiB file"


# --- the search order -------------------------------------------------------------------------------------------------
def _touch_dataset(folder: Path, files=IDX_FILES) -> Path:
    """Empty files with the dataset's names: enough for the search, which only looks for the files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / f"{name}.gz").touch()
    return folder


def _remove_dataset(folder: Path) -> None:
    for f in folder.iterdir():
        f.unlink()


def test_search_order_data_dir_env_cache_system(tmp_path, monkeypatch):
    system = _touch_dataset(tmp_path / "system")
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"], system_dirs=(system,)))
    cache = _touch_dataset(tmp_path / "cache" / "vaelab" / "mnist")
    env = _touch_dataset(tmp_path / "env" / "mnist")  # a parent holding mnist/
    monkeypatch.setenv("VAELAB_DATA_DIR", os.pathsep.join([str(tmp_path / "nothing"), str(tmp_path / "env")]))
    given = _touch_dataset(tmp_path / "given")  # the dataset folder itself

    for expected in (given, env, cache, system):
        assert find_dataset("mnist", data_dir=given) == expected
        _remove_dataset(expected)
    with pytest.raises(DataError, match="not found"):
        find_dataset("mnist", data_dir=given)


def test_cache_defaults_to_home(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    cache = _touch_dataset(
        tmp_path / "home" / ".cache" / "vaelab" / "binarized-mnist", DATASETS["binarized-mnist"].files
    )
    assert find_dataset("binarized-mnist") == cache


def test_parent_folder_layouts(tmp_path):
    torchvision = _touch_dataset(tmp_path / "tv" / "MNIST" / "raw")
    assert find_dataset("mnist", data_dir=tmp_path / "tv") == torchvision
    fashion = _touch_dataset(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert find_dataset("fashion-mnist", data_dir=tmp_path / "tv") == fashion


@needs_mnist
@needs_binarized
def test_shared_data_folder_is_found_as_parent_or_itself():
    assert find_dataset("mnist", data_dir=DATA) == MNIST_DIR
    assert find_dataset("mnist", data_dir=MNIST_DIR) == MNIST_DIR
    assert find_dataset("binarized-mnist", data_dir=DATA) == BINARIZED_DIR
    assert find_dataset("binarized-mnist", data_dir=BINARIZED_DIR) == BINARIZED_DIR


@needs_mnist
def test_a_folder_named_mnist_is_never_taken_for_fashion_mnist(monkeypatch):
    # MNIST and Fashion-MNIST files have the same names
    monkeypatch.setitem(DATASETS, "fashion-mnist", dataclasses.replace(DATASETS["fashion-mnist"], system_dirs=()))
    with pytest.raises(DataError, match="not found"):
        find_dataset("fashion-mnist", data_dir=MNIST_DIR)


@needs_fashion
def test_fashion_mnist_found_in_the_system_copy():
    assert find_dataset("fashion-mnist") == FASHION_DIR


def test_offline_message_lists_the_files_and_the_places(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=empty, download=False)
    message = str(info.value)
    assert "'mnist' not found" in message and "download=False" in message
    for name in IDX_FILES:
        assert name in message
    for place in (str(empty), "$VAELAB_DATA_DIR", str(tmp_path / "cache" / "vaelab" / "mnist"), "mnist/"):
        assert place in message
    assert "https://" in message  # where it would be downloaded from

    with pytest.raises(DataError, match=r"\$VAELAB_OFFLINE is set"):
        load_dataset("binarized-mnist", data_dir=empty)  # download=None, offline by the environment


def test_offline_message_reports_an_incomplete_copy(tmp_path):
    partial = _touch_dataset(tmp_path / "partial", IDX_FILES[:3])
    with pytest.raises(DataError, match=r"holds 3 of the 4 files; missing \['t10k-labels-idx1-ubyte'\]"):
        load_dataset("mnist", data_dir=partial, download=False)


def test_no_connection_means_no_download(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = dataclasses.replace(DATASETS["mnist"], mirrors=(f"http://127.0.0.1:{port}/",))
    monkeypatch.setitem(DATASETS, "mnist", spec)
    monkeypatch.delenv("VAELAB_OFFLINE")
    with pytest.raises(DataError, match=re.escape(f"no connection to 127.0.0.1:{port}")):
        load_dataset("mnist", data_dir=tmp_path)


def test_unknown_name():
    with pytest.raises(DataError, match=r"unknown dataset 'cifar': not a registered name .*binarized-mnist"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        find_dataset("cifar")


# --- downloading, from a local server ---------------------------------------------------------------------------------
@pytest.fixture
def http_root(tmp_path):
    """(folder, base URL): a local HTTP server serving ``folder``."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


@needs_mnist
def test_download_tries_the_mirrors_and_verifies(tmp_path, monkeypatch, http_root, mnist):
    root, url = http_root
    labels = _uncompressed(MNIST_DIR / "train-labels-idx1-ubyte.gz")
    damaged = labels[:100] + bytes([(labels[100] + 1) % 10]) + labels[101:]
    _fake_copy(root / "bad", **{"train-labels-idx1-ubyte.gz": gzip.compress(damaged)})
    _fake_copy(root / "good")
    spec = dataclasses.replace(DATASETS["mnist"], mirrors=(url + "missing/", url + "bad/", url + "good/"))
    monkeypatch.setitem(DATASETS, "mnist", spec)

    splits = load_dataset("mnist", data_dir=tmp_path / "nowhere", download=True)
    cache = tmp_path / "cache" / "vaelab" / "mnist"
    assert splits.source == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(f + ".gz" for f in IDX_FILES)  # no temporary files left
    assert torch.equal(splits.train_labels, mnist.train_labels)

    _remove_dataset(cache)
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(spec, mirrors=(url + "missing/", url + "bad/")))
    with pytest.raises(DataError) as info:
        download_dataset("mnist")
    message = str(info.value)
    assert "train-labels-idx1-ubyte" in message and "checksum mismatch" in message and "404" in message
    assert sorted(p.name for p in cache.iterdir()) == ["train-images-idx3-ubyte.gz"]  # the bad file was not kept


# --- bad files --------------------------------------------------------------------------------------------------------
@needs_mnist
def test_truncated_gzip(tmp_path):
    raw = (MNIST_DIR / "train-labels-idx1-ubyte.gz").read_bytes()
    path = tmp_path / "labels.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: truncated gzip file"):
        read_idx(path)
    folder = _fake_copy(tmp_path / "mnist", **{"train-labels-idx1-ubyte.gz": raw[: len(raw) // 2]})
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: truncated gzip file"):
        load_dataset("mnist", data_dir=folder, download=False)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"")[:10] + b"\xff" * 20)  # a gzip header, then a deflate block of invalid type
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: corrupt gzip file"):
        read_idx(path)


def test_truncated_idx(tmp_path):
    path = _write_idx(tmp_path / "images", np.zeros((3, 4, 5)))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"truncated: the IDX header promises 3x4x5 values \(76 bytes\), got 69"):
        read_idx(path)
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx(path)
    path.write_bytes(b"")
    with pytest.raises(DataError, match="only 0 bytes"):
        read_idx(path)


def test_trailing_bytes_after_idx(tmp_path):
    path = _write_idx(tmp_path / "labels", np.arange(4))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="1 unexpected bytes after the 4 values"):
        read_idx(path)


def test_a_gzip_bomb_is_refused_before_it_is_inflated(tmp_path):
    # an IDX header declaring 10 images of 28x28 (7,856 bytes), then 256 MiB of zeros: ~256 KiB gzipped
    import tracemalloc
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [packer.compress(bytes([0, 0, 8, 3]) + np.array([10, 28, 28], dtype=">u4").tobytes())]
    zeros = bytes(1 << 20)
    parts += [packer.compress(zeros) for _ in range(256)] + [packer.flush()]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"".join(parts))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"inflates to more than the 7856 bytes its header declares"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # refused after one 1 MiB piece, not after 256 MiB


def test_a_decompression_bomb_png_is_a_one_line_data_error(tmp_path):
    # a PNG whose header declares 40000 x 40000 pixels (1.6e9, over twice Pillow's MAX_IMAGE_PIXELS): refused on open
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match=r"bomb\.png: refused as a decompression bomb") as caught:
        load_dataset(tmp_path, validation_size=0)
    assert "\n" not in str(caught.value)


def test_wrong_magic(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: not an IDX file: magic bytes 50 4b 03 04"):
        read_idx(path)
    _write_idx(path, np.zeros((2, 3)), type_code=0x07)
    with pytest.raises(DataError, match="not an IDX file: magic bytes 00 00 07 02"):
        read_idx(path)


def test_read_idx_types_and_gzip(tmp_path):
    values = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    plain = read_idx(_write_idx(tmp_path / "a", values))
    zipped = read_idx(_write_idx(tmp_path / "a.gz", values, compress=True))
    assert plain.dtype == torch.uint8 and torch.equal(plain, torch.from_numpy(values)) and torch.equal(zipped, plain)
    floats = np.array([[0.5, -2.0]], dtype=">f4")
    (tmp_path / "f").write_bytes(bytes([0, 0, 0x0D, 2, 0, 0, 0, 1, 0, 0, 0, 2]) + floats.tobytes())
    assert read_idx(tmp_path / "f").tolist() == [[0.5, -2.0]]


def _tiny_idx_folder(folder: Path, n_images=5, n_labels=5, image_shape=(4, 4)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    _write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, (n_images, *image_shape)))
    _write_idx(folder / "train-labels-idx1-ubyte", rng.integers(0, 10, n_labels))
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (2, *image_shape)), compress=True)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 2), compress=True)
    return folder


def test_count_mismatch(tmp_path):
    folder = _tiny_idx_folder(tmp_path / "idx", n_images=5, n_labels=4)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: count mismatch: 4 labels for the 5 images"):
        load_dataset(folder, validation_size=1)


def test_wrong_dimensions(tmp_path):
    folder = _tiny_idx_folder(tmp_path / "mnist", image_shape=(27, 29))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: wrong dimensions: expected \[N, 28x28\] images"):
        load_dataset("mnist", data_dir=folder, download=False)
    (folder / "train-images-idx3-ubyte").unlink()
    _write_idx(folder / "train-images-idx3-ubyte", np.zeros(5))
    with pytest.raises(DataError, match=r"IDX images must be \[N, H, W\] or \[N, D\], got 1-D"):
        load_dataset(folder)


@needs_mnist
def test_checksum_mismatch_names_the_file_and_changes_nothing(tmp_path):
    labels = _uncompressed(MNIST_DIR / "train-labels-idx1-ubyte.gz")
    damaged = gzip.compress(labels[:100] + bytes([(labels[100] + 1) % 10]) + labels[101:])
    folder = _fake_copy(tmp_path / "mnist", **{"train-labels-idx1-ubyte.gz": damaged})
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: checksum mismatch for mnist's train-labels"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    assert (folder / "train-labels-idx1-ubyte.gz").read_bytes() == damaged


@needs_binarized
def test_bad_amat_files(tmp_path):
    line = " ".join(["0"] * 783 + ["1"]) + "\n"
    good = {f"binarized_mnist_{p}.amat.gz": (BINARIZED_DIR / f"binarized_mnist_{p}.amat.gz").read_bytes()
            for p in ("train", "valid", "test")}  # fmt: skip
    folder = tmp_path / "binarized_mnist"

    def load_with(train: bytes):
        if folder.exists():
            _remove_dataset(folder)
        _fake_copy(folder, BINARIZED_DIR, **{**good, "binarized_mnist_train.amat.gz": gzip.compress(train)})
        return load_dataset("binarized-mnist", data_dir=tmp_path, download=False)

    with pytest.raises(DataError, match=r"binarized_mnist_train\.amat\.gz: line 2 is not 784 values '0' or '1'"):
        load_with((line + line.replace("1", "2") + line).encode())
    with pytest.raises(DataError, match="4700 bytes is not a whole number of 1568-byte lines"):
        load_with((3 * line).encode()[:-4])
    with pytest.raises(DataError, match="line 1 is not 784"):
        load_with(line.replace("\n", "\r").encode())
    with pytest.raises(DataError, match=r"binarized_mnist_train\.amat\.gz: checksum mismatch"):
        load_with((3 * line).encode())


# --- generic data -----------------------------------------------------------------------------------------------------
def test_npz_with_labels_and_its_own_splits(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 1, 5, 5), dtype=np.uint8)
    y = rng.integers(0, 3, 30)
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=y, x_valid=x[:4] / 255.0, x_test=(x[:6] > 127), y_test=y[:6])
    splits = load_dataset(path)
    assert splits.name == "toy" and splits.source == path and splits.data_shape == (1, 5, 5)
    assert splits.train.dtype == torch.uint8 and torch.equal(splits.train, torch.from_numpy(x))  # kept 8-bit
    assert torch.equal(as_float(splits.train), torch.from_numpy(x).float() / 255)  # x_valid given: nothing carved
    assert splits.valid.dtype == torch.float32 and splits.valid.shape == (4, 1, 5, 5) and splits.valid_labels is None
    assert (
        torch.equal(splits.test, torch.from_numpy(x[:6] > 127).float())
        and splits.test_labels.tolist() == y[:6].tolist()
    )
    assert splits.train_labels.dtype == torch.int64 and not splits.binary


def test_npz_carves_validation_and_npy_has_no_test_set(tmp_path):
    x = (np.random.default_rng(1).random((20, 7)) > 0.5).astype(np.float64)
    np.savez(tmp_path / "only.npz", x)  # the only array, under numpy's default name
    splits = load_dataset(str(tmp_path / "only.npz"), validation_size=5, seed=3)
    train_idx, valid_idx = split_indices(20, 5, seed=3)
    assert torch.equal(splits.valid, torch.from_numpy(x[valid_idx.numpy()]).float())
    assert torch.equal(splits.train, torch.from_numpy(x[train_idx.numpy()]).float())
    assert splits.test.shape == (0, 7) and splits.binary

    np.save(tmp_path / "x.npy", x.astype(np.float32))
    splits = load_dataset(tmp_path / "x.npy", validation_size=0, max_examples=8)
    assert splits.train.shape == (8, 7) and splits.valid.shape == (0, 7) and splits.train_labels is None


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.full((3, 2), 1.5)}, r"'x' values out of range \[0, 1\]: min 1.5, max 1.5"),
        ({"x": np.array([[0.1, np.nan], [0.2, 0.3]])}, "'x' contains 1 NaN values"),
        ({"x": np.array([[0.1, np.inf]])}, "out of range"),
        ({"x": np.arange(4, dtype=np.int64).reshape(2, 2)}, "uint8 data are divided by 255"),
        ({"x": np.zeros(5)}, r"'x' expected examples along the first axis, \[N, ...\], got shape \[5\]"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, dtype=int)}, "count mismatch: 3 labels in 'y' for 4 examples"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, "'y' labels must be 1-D integers"),
        ({"x": np.zeros((4, 2)), "x_test": np.zeros((2, 3))}, r"wrong dimensions: 'x_test' examples are \[3\]"),
        ({"a": np.zeros((4, 2)), "b": np.zeros((4, 2))}, r"expected an array 'x' \(or a single array\)"),
        ({"x": np.array([["a", "b"]])}, "expected numbers"),
    ],
)
def test_bad_npz(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: .*{message}"):
        load_dataset(path, validation_size=1)


def test_unreadable_array_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"junk\.npz: cannot be read as a NumPy \.npz file"):
        load_dataset(tmp_path / "junk.npz")
    np.save(tmp_path / "objects.npy", np.array([{}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"objects\.npy: cannot be read"):
        load_dataset(tmp_path / "objects.npy")
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="unsupported data file"):
        load_dataset(tmp_path / "data.csv")


def test_idx_folder_as_generic_data(tmp_path):
    folder = _tiny_idx_folder(tmp_path / "kmnist", image_shape=(6, 6))
    splits = load_dataset(folder, validation_size=2)
    assert splits.name == "kmnist" and splits.data_shape == (1, 6, 6)
    assert [len(splits.train), len(splits.valid), len(splits.test)] == [3, 2, 2]
    assert splits.test_labels.dtype == torch.int64


def test_image_folder(tmp_path):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 6, 5), dtype=np.uint8)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(pixels):
        image.fromarray(p).save(flat / f"{i}.png")
    splits = load_dataset(flat, validation_size=1, seed=0)
    _, valid_idx = split_indices(4, 1, seed=0)
    assert torch.equal(as_float(splits.valid), torch.from_numpy(pixels[valid_idx.numpy(), None]).float() / 255)
    assert splits.train.shape == (3, 1, 6, 5) and splits.train_labels is None

    classes = tmp_path / "classes"
    for i, p in enumerate(pixels):
        (classes / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        image.fromarray(np.stack([p] * 3, axis=-1)).save(classes / f"class{i % 2}" / f"{i}.png")
    splits = load_dataset(classes, validation_size=0)
    assert splits.data_shape == (3, 6, 5) and splits.train_labels.tolist() == [0, 0, 1, 1]

    image.fromarray(pixels[0, :5]).save(flat / "odd.png")
    with pytest.raises(DataError, match=r"odd\.png: wrong dimensions: \[5, 5\] where 0\.png is \[6, 5\]"):
        load_dataset(flat, validation_size=1)
    (flat / "z.jpg").write_bytes(b"not a jpeg")
    (flat / "odd.png").unlink()
    with pytest.raises(DataError, match=r"z\.jpg: cannot be read as an image"):
        load_dataset(flat, validation_size=1)


def test_image_folder_without_pillow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `import PIL` fail
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="pip install pillow"):
        load_dataset(tmp_path)


# --- binarization -----------------------------------------------------------------------------------------------------
def test_binarize_fixed_is_deterministic_binary_and_unbiased():
    x = torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(1234))
    a, b, c = binarize_fixed(x, seed=0), binarize_fixed(x, seed=0), binarize_fixed(x, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == x.dtype and a.shape == x.shape and torch.equal(a, (a == 1).float())
    assert torch.equal(binarize_fixed(x[:7], seed=0), a[:7])  # a prefix gets the same draws
    # E[b] = x: the mean over 392,000 draws has standard error <= 0.5 / sqrt(392000) < 1e-3; 5 standard errors
    assert (a - x).mean().abs() < 5e-3
    assert torch.equal(binarize_fixed(torch.tensor([0.0, 1.0, 1.0, 0.0])), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(DataError, match=r"must lie in \[0, 1\]"):
        binarize_fixed(torch.tensor([0.5, 1.5]))
    with pytest.raises(DataError, match=r"must lie in \[0, 1\]"):
        binarize_fixed(torch.tensor([0.5, float("nan")]))
    with pytest.raises(DataError, match="floating-point"):
        binarize_fixed(torch.tensor([0, 1]))


def test_binarize_dynamic_draws_afresh():
    x = torch.full((10000,), 0.3)
    g = torch.Generator().manual_seed(0)
    a, b = binarize_dynamic(x, generator=g), binarize_dynamic(x, generator=g)
    assert not torch.equal(a, b) and torch.equal(a, (a == 1).float())
    assert torch.equal(binarize_dynamic(x, generator=torch.Generator().manual_seed(0)), a)
    assert abs(a.mean().item() - 0.3) < 5 * (0.3 * 0.7 / 10000) ** 0.5  # 5 standard errors


def test_splits_repr_is_short(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 3), dtype=np.uint8))
    text = repr(load_dataset(tmp_path / "x.npy", validation_size=1))
    assert (
        text == f"Splits(name='x', data_shape=(3,), train=3, valid=1, test=0, binary=True, source='{tmp_path}/x.npy')"
    )


def test_binarize_with_bits_compares_the_low_24_bits_as_torch_rand_does():
    grid = 2.0**-24
    bits = torch.tensor([0, 1, 2**24 - 1, 2**24, -1, 5 * 2**24 + 3], dtype=torch.int32)  # low 24 bits: 0 1 max 0 max 3
    x = torch.full((6,), grid)  # probability 2^-24: 1 only where the low bits are 0
    assert binarize_with_bits(x, bits).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert binarize_with_bits(torch.zeros(6), bits).tolist() == [0.0] * 6  # x = 0: never
    assert binarize_with_bits(torch.ones(6), bits).tolist() == [1.0] * 6  # x = 1: always
    # on random bits and intensities: exactly torch's CPU uniform, u = (low 24 bits) / 2^24, compared with x
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (100_000,), generator=g, dtype=torch.int32)
    x = torch.rand(100_000, generator=g)
    u = (bits.long() & (2**24 - 1)).float() * grid  # exact in float32
    assert torch.equal(binarize_with_bits(x, bits), (u < x).float())


def test_random_bits_are_uniform_and_independent():
    bits = random_bits((1000, 784), generator=torch.Generator().manual_seed(1)).long()
    assert bits.shape == (1000, 784) and bits.dtype == torch.long
    n = bits.numel()
    frequencies = torch.stack([(bits >> i) & 1 for i in range(24)]).double().mean((1, 2))
    assert (frequencies - 0.5).abs().max() < 5 * (0.25 / n) ** 0.5  # every bit fair, within 5 standard errors
    low = (bits & (2**24 - 1)).double().flatten() / 2**24
    corr = torch.corrcoef(torch.stack([low[0::2], low[1::2]]))[0, 1]  # the two halves of one 64-bit draw
    assert abs(corr) < 5 / (n / 2) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_binarize_dynamic_keeps_the_dtype_and_the_probability(dtype):
    x = torch.full((200_000,), 0.3, dtype=dtype)
    b = binarize_dynamic(x, generator=torch.Generator().manual_seed(2))
    assert b.dtype == dtype and set(b.unique().tolist()) <= {0.0, 1.0}
    p = x[0].item()  # 0.3 as rounded in this dtype
    assert abs(b.double().mean().item() - p) < 5 * (p * (1 - p) / len(x)) ** 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_mean_example_of_a_memory_mapped_split(tmp_path, dtype):
    # the decoder bias starts at this mean: a mapped float .npy of few rows (one read, not a tensor) failed here
    rng = np.random.default_rng(3)
    values = rng.random((300, 12)) if dtype == np.float32 else rng.integers(0, 256, (300, 12))
    np.save(tmp_path / "a.npy", values.astype(dtype))
    splits = load_dataset(tmp_path / "a.npy", validation_size=50, seed=0)
    assert isinstance(splits.train, MappedRows)
    rows = as_float(splits.train[:]).double()
    got = mean_example(splits.train).double()
    # float32 sums of 250 rows, each within rounding of the float64 mean (vaelab.tolerance)
    assert ((got - rows.mean(0)).abs() <= reduction_error_bound(rows.abs().mean(0), 250 + 2, torch.float32)).all()


# --- semi-supervised label subsets ------------------------------------------------------------------------------------
def _labels(n: int = 500, classes: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def test_label_subset_is_balanced_sorted_and_reproducible_from_the_seed():
    labels = _labels()
    subset = label_subset(labels, 100, seed=3)
    assert subset.dtype == torch.int64 and len(subset) == 100 and len(subset.unique()) == 100
    assert torch.equal(subset, subset.sort().values)
    assert torch.bincount(labels[subset], minlength=10).tolist() == [10] * 10
    assert torch.equal(subset, label_subset(labels.clone(), 100, seed=3))  # the same seed: the same examples
    assert not torch.equal(subset, label_subset(labels, 100, seed=4))  # another seed: others
    # an MNIST-sized draw: 10 of each digit out of 50,000
    big = _labels(50_000, seed=1)
    assert torch.bincount(big[label_subset(big, 100, seed=0)]).tolist() == [10] * 10


def test_partly_labelled_hides_all_but_the_subset():
    labels = _labels()
    y = partly_labelled(labels, 20, seed=1)
    kept = (y != UNLABELLED).nonzero()[:, 0]
    assert UNLABELLED == -1 and torch.equal(kept, label_subset(labels, 20, seed=1))
    assert torch.equal(y[kept], labels[kept]) and int((y == UNLABELLED).sum()) == 480


@pytest.mark.parametrize(
    ("n", "message"),
    [
        (15, "15 labelled examples cannot be balanced over the 10 classes: pass a multiple of 10"),
        (0, "must be an integer >= 1, got 0"),
        (True, "must be an integer >= 1, got True"),
        (600, "600 labelled examples need 60 of each class, but class"),
    ],
)
def test_label_subset_refuses_bad_counts_in_one_line(n, message):
    with pytest.raises(ValueError, match=None) as err:
        label_subset(_labels(), n, seed=0)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_label_subset_refuses_labels_already_hidden():
    with pytest.raises(ValueError, match="already partly unlabelled"):
        label_subset(partly_labelled(_labels(), 10, seed=0), 10)
