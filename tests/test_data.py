"""Tests of keras_aevb.data on tiny IDX and .mat files written here, and on the local MNIST."""

from __future__ import annotations

import gzip
import struct
import sys
import time
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from keras_aevb import data
from keras_aevb.data import (
    BINARIZATIONS,
    FREY_FACE_NUM_TEST,
    DataError,
    binarize,
    default_data_dir,
    load_dataset,
    load_frey_face,
    load_mnist,
    make_dataset,
    read_idx,
    split_frey_face,
)

MNIST_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, type code, ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    payload = idx_bytes(array)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def fake_mnist(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the byte range occur
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def write_mnist_dir(directory: Path, compress: bool = True, n_train=7, n_test=5, seed=0):
    """Writes the four MNIST IDX files; returns {split: (uint8 images, uint8 labels)}."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = fake_mnist(rng, n)
        suffix = ".gz" if compress else ""
        write_idx(directory / (MNIST_STEMS[split][0] + suffix), images, compress)
        write_idx(directory / (MNIST_STEMS[split][1] + suffix), labels, compress)
        written[split] = (images, labels)
    return written


def epoch(dataset) -> np.ndarray:
    """One full iteration over `dataset`, batches concatenated."""
    return np.concatenate([batch.numpy() for batch in dataset])


@pytest.fixture(autouse=True)
def isolated_cwd(tmp_path, monkeypatch):
    """Runs each test in an empty directory with no data env var, so data discovery sees only
    what the test puts there (tests of the real files chdir back explicitly)."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    return workdir


REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# read_idx and load_mnist
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_read_idx_round_trip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    path = write_idx(tmp_path / "a.idx", array, compress)
    out = read_idx(path)
    np.testing.assert_array_equal(out, array)
    assert out.dtype == np.uint8


def test_read_idx_detects_gzip_by_magic_bytes_not_suffix(tmp_path):
    array = np.array([[1, 2], [3, 250]], dtype=np.uint8)
    gz_without_suffix = write_idx(tmp_path / "plain-name", array, compress=True)
    raw_with_gz_suffix = write_idx(tmp_path / "name.gz", array, compress=False)
    np.testing.assert_array_equal(read_idx(gz_without_suffix), array)
    np.testing.assert_array_equal(read_idx(raw_with_gz_suffix), array)


@pytest.mark.parametrize(
    "header",
    [bytes([1, 0, 8, 1]), bytes([0, 0, 0x0D, 1]), bytes([0, 0, 8, 0])],
    ids=["nonzero-first-byte", "float-type-code", "zero-dims"],
)
def test_read_idx_wrong_magic(tmp_path, header):
    path = tmp_path / "bad.idx"
    path.write_bytes(header + struct.pack(">I", 3) + bytes(3))
    with pytest.raises(DataError, match="wrong IDX magic number"):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    compressed = gzip.compress(idx_bytes(array))
    path = tmp_path / "cut.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_read_idx_truncated_data(tmp_path, compress):
    # Header says 7 images, only 6 and a half are present.
    payload = idx_bytes(np.zeros((7, 28, 28), np.uint8))[: -28 * 14]
    path = tmp_path / "short.idx"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    with pytest.raises(DataError, match=r"truncated.*5096 data bytes.*needs 5488"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found.*--data-dir"):
        read_idx(tmp_path / "nope")


def gzip_bomb(path: Path, header: bytes, inflated: int, chunk: int = 1 << 20) -> Path:
    """Writes `header` followed by `inflated` zero bytes, gzip-compressed (about 1000:1)."""
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header)
        zeros = bytes(chunk)
        for _ in range(inflated // chunk):
            f.write(zeros)
    return path


def test_read_idx_refuses_a_gzip_bomb_without_inflating_it(tmp_path):
    # The header says 10 images of 28x28 (7840 bytes); the stream inflates to 64 MiB from a
    # file of about 65 kB. The old reader inflated all of it before comparing sizes (a peak of
    # 585 MB for a 256 MiB stream).
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28)
    path = gzip_bomb(tmp_path / "bomb.gz", header, inflated=64 << 20)
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(DataError, match=r"more than .*its header \[10, 28, 28\]"):
            read_idx(path)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Reading stops one byte past the header's 7840 bytes: the peak is the buffers of the
    # gzip reader (80 kB measured), far below the 64 MiB the whole stream inflates to. 4 MiB
    # leaves room for interpreter noise and is still 16 times less.
    assert peak < 4 << 20, peak
    # Inflating the whole stream takes about 0.9 s here; stopping early took 1 ms. 0.25 s
    # leaves room for a loaded machine.
    assert seconds < 0.25, seconds


def test_read_idx_refuses_a_header_the_file_cannot_hold(tmp_path):
    # 60000 x 28 x 28 = 47 MB claimed by a 1 kB gzip file: deflate inflates at most about
    # 1032:1, so the file is truncated for sure and nothing is inflated to find that out.
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 60000, 28, 28)
    path = tmp_path / "claims.gz"
    path.write_bytes(gzip.compress(header + bytes(100)))
    with pytest.raises(DataError, match=r"truncated.*\[60000, 28, 28\]"):
        read_idx(path)
    # A header beyond the cap on decompressed sizes is refused whatever the file holds.
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 4_000_000_000, 28, 28)
    path.write_bytes(header)
    with pytest.raises(DataError, match=r"larger than.*1 GiB"):
        read_idx(path)


@pytest.mark.parametrize("split", ["train", "test"])
def test_load_mnist_zero_images(tmp_path, split):
    write_mnist_dir(tmp_path / "mnist")
    for stem, array in zip(
        MNIST_STEMS[split], (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8)), strict=True
    ):
        write_idx(tmp_path / "mnist" / (stem + ".gz"), array, compress=True)
    with pytest.raises(DataError, match=r"0 images.*download it again"):
        load_mnist(tmp_path / "mnist", split=split)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_load_mnist_values_scale_and_dtype(tmp_path, compress):
    written = write_mnist_dir(tmp_path / "mnist", compress=compress)
    for split in ("train", "test"):
        images, labels = load_mnist(tmp_path / "mnist", split=split)
        raw_images, raw_labels = written[split]
        assert images.dtype == np.float32 and labels.dtype == np.int64
        assert images.shape == raw_images.shape
        # Exactly byte / 255: 0 -> 0.0 and 255 -> 1.0.
        np.testing.assert_array_equal(images, raw_images.astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(labels, raw_labels)
    images, _ = load_mnist(tmp_path / "mnist")
    assert images[0, 0, 0] == 0.0 and images[0, 0, 1] == 1.0


def test_load_mnist_count_mismatch(tmp_path):
    write_mnist_dir(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(6, np.uint8), True)
    with pytest.raises(DataError, match="7 images but 6 labels"):
        load_mnist(tmp_path / "mnist")


def test_load_mnist_wrong_image_shape(tmp_path):
    write_mnist_dir(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", np.zeros((7, 28, 27)), True)
    with pytest.raises(DataError, match=r"expected \[N, 28, 28\]"):
        load_mnist(tmp_path / "mnist")


def test_load_mnist_unknown_split(tmp_path):
    write_mnist_dir(tmp_path / "mnist")
    with pytest.raises(DataError, match="unknown MNIST split 'valid'.*train, test"):
        load_mnist(tmp_path / "mnist", split="valid")


def test_load_mnist_missing_dir_names_data_dir(tmp_path):
    with pytest.raises(DataError, match="--data-dir") as error:
        load_mnist(tmp_path / "absent")
    assert "\n" not in str(error.value)


def test_load_mnist_missing_file_names_it(tmp_path):
    write_mnist_dir(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\(\.gz\).*--data-dir"):
        load_mnist(tmp_path / "mnist", split="test")


def test_load_mnist_nothing_found_anywhere(monkeypatch):
    # No local files (isolated cwd, tmp paths have no shared/data) and TFDS not used.
    monkeypatch.setattr(data, "candidate_dirs", lambda dataset: [Path("/nonexistent")])
    with pytest.raises(DataError, match="MNIST not found.*--data-dir.*KERAS_AEVB_DATA_DIR"):
        load_mnist(use_tfds=False)


def test_load_mnist_tfds_fallback_failure_is_data_error(monkeypatch):
    def failing_load(*args, **kwargs):
        assert kwargs["download"] is False
        raise RuntimeError("dataset mnist not found\nin ~/tensorflow_datasets")

    fake = types.SimpleNamespace(load=failing_load, as_numpy=lambda x: x)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    monkeypatch.setattr(data, "candidate_dirs", lambda dataset: [Path("/nonexistent")])
    with pytest.raises(DataError, match="no TFDS copy.*--data-dir") as error:
        load_mnist()
    assert "\n" not in str(error.value)


def test_load_mnist_tfds_fallback_success(monkeypatch):
    raw = np.random.default_rng(1).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    calls = []

    def fake_load(name, split, data_dir, download, batch_size, as_supervised):
        calls.append((name, split, download, batch_size))
        return raw, np.array([4, 0, 9])

    fake = types.SimpleNamespace(load=fake_load, as_numpy=lambda x: x)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    monkeypatch.setattr(data, "candidate_dirs", lambda dataset: [Path("/nonexistent")])
    images, labels = load_mnist(split="test")
    assert calls == [("mnist", "test", False, -1)]
    np.testing.assert_array_equal(images, raw[..., 0] / np.float32(255))
    np.testing.assert_array_equal(labels, [4, 0, 9])
    _, info = load_dataset("mnist", split="test")
    assert info["source"] == "tfds"


# ----------------------------------------------------------------------------------------------
# default_data_dir
# ----------------------------------------------------------------------------------------------


def test_default_data_dir_search_order(tmp_path, isolated_cwd, monkeypatch):
    assert default_data_dir("mnist") is None
    # shared/data/mnist found from a subdirectory of a sibling checkout.
    shared = tmp_path / "shared" / "data" / "mnist"
    write_mnist_dir(shared)
    assert default_data_dir("mnist") == str(shared)
    # ./data/mnist wins over shared/.
    local = isolated_cwd / "data" / "mnist"
    write_mnist_dir(local, compress=False)
    assert default_data_dir("mnist") == str(local)
    # The env var wins over both, pointing at the files or at a parent holding mnist/.
    env_files = tmp_path / "env_files"
    write_mnist_dir(env_files)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(env_files))
    assert default_data_dir("mnist") == str(env_files)
    env_parent = tmp_path / "env_parent"
    write_mnist_dir(env_parent / "mnist")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(env_parent))
    assert default_data_dir("mnist") == str(env_parent / "mnist")


def test_default_data_dir_needs_all_four_files(isolated_cwd):
    local = isolated_cwd / "data" / "mnist"
    write_mnist_dir(local)
    (local / "t10k-images-idx3-ubyte.gz").unlink()
    assert default_data_dir("mnist") is None


def test_default_data_dir_frey_face(isolated_cwd):
    assert default_data_dir("frey_face") is None
    local = isolated_cwd / "data" / "frey_face"
    write_frey_mat(local / "frey_rawface.mat", np.zeros((560, 3), np.uint8))
    assert default_data_dir("frey_face") == str(local)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'.*mnist, frey_face"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="unknown dataset"):
        default_data_dir("cifar")


# ----------------------------------------------------------------------------------------------
# Binarization
# ----------------------------------------------------------------------------------------------


def test_unknown_binarization():
    with pytest.raises(DataError, match="unknown binarization 'otsu'.*dynamic, static"):
        binarize(np.zeros((2, 2)), "otsu")
    with pytest.raises(DataError, match="unknown binarization"):
        make_dataset(np.zeros((2, 2)), binarization="otsu")
    assert BINARIZATIONS == ("dynamic", "static", "threshold", "none")


def test_binarize_dynamic_is_refused():
    with pytest.raises(DataError, match="make_dataset"):
        binarize(np.zeros((2, 2)), "dynamic")


def test_static_binarization_reproducible_and_unbiased():
    grey = np.random.default_rng(0).random((50, 28, 28), dtype=np.float32)
    first, again = binarize(grey, "static", seed=3), binarize(grey, "static", seed=3)
    other = binarize(grey, "static", seed=4)
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.2  # independent draws disagree on ~1/3 of pixels
    assert set(np.unique(first)) == {0.0, 1.0}
    # Mean of n = 39200 independent Bernoulli(p_i): std = sqrt(sum p_i (1 - p_i)) / n
    # (about 0.0021 here); 5 std.
    n = grey.size
    std = np.sqrt(np.sum(grey * (1 - grey))) / n
    assert abs(first.mean() - grey.mean()) < 5 * std
    # Binary input is a fixed point; 0 and 1 are never flipped.
    np.testing.assert_array_equal(binarize(first, "static", seed=9), first)


def test_static_binarization_rejects_out_of_range():
    with pytest.raises(DataError, match=r"\[0, 1\].*1/255"):
        binarize(np.array([0.0, 255.0]), "static")


def test_threshold_binarization_exact():
    grey = np.array([0.0, 0.25, 0.4999, 0.5, 0.5001, 1.0], np.float32)
    np.testing.assert_array_equal(binarize(grey, "threshold"), [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(binarize(grey, "none"), grey)


# ----------------------------------------------------------------------------------------------
# make_dataset
# ----------------------------------------------------------------------------------------------


def grey_ramp(n=12, shape=(4, 4)) -> np.ndarray:
    """Distinct grey values in (0, 1), one per pixel, so every example is identifiable."""
    size = n * int(np.prod(shape))
    return (np.arange(1, size + 1, dtype=np.float32) / (size + 1)).reshape(n, *shape)


def test_dynamic_fresh_each_epoch_and_reproducible():
    grey = grey_ramp()
    dataset = make_dataset(grey, batch_size=5, shuffle=False, seed=7)
    first, second = epoch(dataset), epoch(dataset)
    assert first.shape == grey.shape and first.dtype == np.float32
    assert set(np.unique(first)) == {0.0, 1.0}
    # 192 pixels drawn afresh: equal epochs would mean the draw is replayed.
    assert (first != second).mean() > 0.2
    same_seed = make_dataset(grey, batch_size=5, shuffle=False, seed=7)
    np.testing.assert_array_equal(epoch(same_seed), first)
    np.testing.assert_array_equal(epoch(same_seed), second)
    other_seed = make_dataset(grey, batch_size=5, shuffle=False, seed=8)
    assert (epoch(other_seed) != first).mean() > 0.2


def test_dynamic_mean_over_epochs_approaches_grey():
    grey = grey_ramp(n=8, shape=(4, 4))
    dataset = make_dataset(grey, batch_size=8, shuffle=False, seed=1)
    epochs = 300
    # repeat() re-iterates the pipeline, so each repetition is a new epoch with a new draw.
    draws = epoch(dataset.repeat(epochs)).reshape(epochs, *grey.shape)
    mean = draws.mean(axis=0)
    # Per pixel: mean of 300 Bernoulli(p) draws, std = sqrt(p (1 - p) / 300) <= 0.029.
    # 5 std per pixel (128 pixels; a false failure has probability ~1e-4, and the seed is fixed).
    std = np.sqrt(grey * (1 - grey) / epochs)
    assert np.all(np.abs(mean - grey) < 5 * std + 1e-6)


def test_dynamic_fresh_under_repeat():
    grey = grey_ramp()
    both = epoch(make_dataset(grey, batch_size=6, shuffle=False, seed=2).repeat(2))
    assert (both[:12] != both[12:]).mean() > 0.2


def test_shuffle_covers_every_example_once_and_reshuffles():
    n = 23
    images = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)  # example i is all i
    dataset = make_dataset(images, batch_size=4, binarization="none", shuffle=True, seed=0)
    orders = [epoch(dataset)[:, 0] for _ in range(3)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))  # a permutation
    assert not np.array_equal(orders[0], orders[1])  # 1/23! chance of a false failure
    again = make_dataset(images, batch_size=4, binarization="none", shuffle=True, seed=0)
    np.testing.assert_array_equal(epoch(again)[:, 0], orders[0])
    unshuffled = make_dataset(images, batch_size=4, binarization="none", shuffle=False)
    np.testing.assert_array_equal(epoch(unshuffled)[:, 0], np.arange(n))


def test_batch_sizes_and_drop_remainder():
    images = grey_ramp(n=23)
    sizes = [len(b) for b in make_dataset(images, batch_size=10)]
    assert sizes == [10, 10, 3]
    sizes = [len(b) for b in make_dataset(images, batch_size=10, drop_remainder=True)]
    assert sizes == [10, 10]
    batch = next(iter(make_dataset(images, batch_size=10)))
    assert tuple(batch.shape) == (10, 4, 4)


def test_make_dataset_fixed_binarizations():
    grey = grey_ramp()
    thresholded = epoch(make_dataset(grey, binarization="threshold", shuffle=False))
    np.testing.assert_array_equal(thresholded, (grey > 0.5).astype(np.float32))
    static = make_dataset(grey, binarization="static", shuffle=False, seed=4)
    np.testing.assert_array_equal(epoch(static), epoch(static))  # same every epoch
    np.testing.assert_array_equal(epoch(static), binarize(grey, "static", seed=4))
    np.testing.assert_array_equal(
        epoch(make_dataset(grey, binarization="none", shuffle=False)), grey
    )


def identifiable_binary(n: int, bits: int = 6) -> np.ndarray:
    """Binary images [n, bits] whose pixels spell the example's index in base 2, so they pass
    through every binarization unchanged and the index can be read back from a batch."""
    return ((np.arange(n)[:, None] >> np.arange(bits)) & 1).astype(np.float32)


def read_indices(batch: np.ndarray) -> np.ndarray:
    return (batch.astype(np.int64) << np.arange(batch.shape[1])).sum(axis=1)


@pytest.mark.parametrize("binarization", ["dynamic", "static", "threshold", "none"])
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_every_example_once_per_epoch(binarization, drop_remainder):
    n, batch_size = 37, 8
    images = identifiable_binary(n)
    dataset = make_dataset(images, batch_size, binarization, seed=3, drop_remainder=drop_remainder)
    expected_batches = n // batch_size if drop_remainder else -(-n // batch_size)
    assert int(dataset.cardinality()) == expected_batches
    orders = []
    for _ in range(3):
        batches = [b.numpy() for b in dataset]
        assert len(batches) == expected_batches
        sizes = [len(b) for b in batches]
        assert sizes == [8, 8, 8, 8] + ([] if drop_remainder else [5])
        order = read_indices(np.concatenate(batches))
        assert len(set(order)) == len(order)  # no example twice in an epoch
        if not drop_remainder:
            np.testing.assert_array_equal(np.sort(order), np.arange(n))
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])  # a new order every epoch
    # The same seed gives the same sequence of epochs.
    again = make_dataset(images, batch_size, binarization, seed=3, drop_remainder=drop_remainder)
    for order in orders:
        np.testing.assert_array_equal(read_indices(epoch(again)), order)
    spec = dataset.element_spec
    assert spec.dtype.name == "float32"
    assert tuple(spec.shape) == ((batch_size if drop_remainder else None), 6)


def test_shuffle_is_uniform_over_positions():
    n, epochs = 6, 600
    images = identifiable_binary(n, bits=3)
    dataset = make_dataset(images, n, "none", seed=5).repeat(epochs)
    first = read_indices(epoch(dataset))[::n]  # the example at position 0 of every epoch
    counts = np.bincount(first, minlength=n)
    # Binomial(600, 1/6): mean 100, std 9.1; 5 std.
    assert np.all(np.abs(counts - epochs / n) < 5 * np.sqrt(epochs / n * (1 - 1 / n)))


def test_drop_remainder_with_fewer_examples_than_a_batch():
    dataset = make_dataset(grey_ramp(n=3), batch_size=5, drop_remainder=True)
    assert int(dataset.cardinality()) == 0 and list(dataset) == []
    assert [len(b) for b in make_dataset(grey_ramp(n=3), batch_size=5)] == [3]


def test_dynamic_shuffled_reproducible_and_fresh():
    grey = grey_ramp(n=20)
    first = epoch(make_dataset(grey, 6, seed=11).repeat(3))
    np.testing.assert_array_equal(epoch(make_dataset(grey, 6, seed=11).repeat(3)), first)
    epochs = first.reshape(3, *grey.shape)
    assert (epochs[0] != epochs[1]).mean() > 0.2 and (epochs[1] != epochs[2]).mean() > 0.2
    assert (epoch(make_dataset(grey, 6, seed=12)) != epochs[0]).mean() > 0.2


@pytest.mark.parametrize("event_shape", [(28, 28), (5, 5), (3,)], ids=["even", "odd", "1-d"])
def test_dynamic_draw_is_bernoulli_of_grey(event_shape):
    # Every MNIST grey level byte/255, plus 0 and 1, on many pixels; odd event sizes take the
    # path that discards the unused half of the last 32-bit random word.
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    size = int(np.prod(event_shape))
    n = -(-256 * 200 // size)  # about 200 draws of every level per epoch
    grey = np.resize(levels, n * size).reshape(n, *event_shape)
    # Two epochs in the natural order (shuffle=False keeps pixels aligned with `grey`).
    draws = epoch(make_dataset(grey, 64, shuffle=False, seed=2).repeat(2)).reshape(2, -1)
    assert set(np.unique(draws)) == {0.0, 1.0}
    flat = grey.reshape(-1)
    np.testing.assert_array_equal(draws[:, flat == 0], 0)  # 0 never becomes 1
    np.testing.assert_array_equal(draws[:, flat == 1], 1)  # 1 never becomes 0
    for level in levels[1:-1]:
        hits = draws[:, flat == level]
        # Mean of k Bernoulli(p) draws: std sqrt(p (1 - p) / k); 5.5 std for each of 254 levels
        # (a false failure has probability ~1e-5; the seeds are fixed anyway).
        tolerance = 5.5 * np.sqrt(level * (1 - level) / hits.size)
        assert abs(hits.mean() - level) < tolerance, (level, hits.mean())


def test_dynamic_draw_resolution_is_2_to_the_minus_16():
    # P(x = 1) = round(65536 grey) / 65536: grey 2**-16 is drawn as 1 with probability 2**-16
    # (about 16 ones in 2**20 pixels), grey 2**-18 rounds to probability 0, and symmetrically
    # near 1.
    shape = (1024, 32, 32)

    def draw(value):
        images = np.full(shape, value, np.float32)
        return epoch(make_dataset(images, 1024, shuffle=False, seed=0))

    ones = draw(2.0**-16).sum()
    assert 1 <= ones <= 45  # Poisson(16): P(0) = 1e-7, P(> 45) < 1e-8
    assert draw(2.0**-18).sum() == 0
    zeros = (1 - draw(1 - 2.0**-16)).sum()
    assert 1 <= zeros <= 45
    assert (1 - draw(1 - 2.0**-18)).sum() == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"images": np.zeros((0, 4))}, "no examples"),
        ({"images": np.full((3, 4), 2.0)}, r"\[0, 1\]"),
    ],
)
def test_make_dataset_bad_input(kwargs, message):
    kwargs = {"images": grey_ramp(), **kwargs}
    with pytest.raises(DataError, match=message):
        make_dataset(**kwargs)


# ----------------------------------------------------------------------------------------------
# Frey Face
# ----------------------------------------------------------------------------------------------


def write_frey_mat(path: Path, ff: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"ff": ff})
    return path


def asymmetric_face() -> np.ndarray:
    """A 28x20 uint8 image whose orientation is unambiguous: a bright top row and left column,
    and a single distinct pixel at (row 27, column 19)."""
    image = np.zeros((28, 20), np.uint8)
    image[0, :] = 200
    image[:, 0] = 100
    image[27, 19] = 255
    return image


def frey_file(path: Path, n: int = 5) -> tuple[Path, np.ndarray]:
    """Writes a .mat of Roweis' layout: ff (560, n), column i = image i flattened row-major."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 20), dtype=np.uint8)
    images[0] = asymmetric_face()
    ff = images.reshape(n, 560).T  # (560, n): one image per column
    return write_frey_mat(path, ff), images


def test_frey_face_upright_and_scaled(tmp_path):
    path, images = frey_file(tmp_path / "frey_rawface.mat")
    loaded = load_frey_face(path)
    assert loaded.shape == (5, 28, 20) and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, images.astype(np.float32) / np.float32(255))
    face = loaded[0]
    assert face[27, 19] == 1.0 and face[0, 19] == pytest.approx(200 / 255)
    assert face[27, 0] == pytest.approx(100 / 255) and face[1:27, 1:19].max() == 0.0
    np.testing.assert_array_equal(load_frey_face(tmp_path), loaded)  # a directory works too


def test_frey_face_split_sizes_and_disjoint(tmp_path):
    path, _ = frey_file(tmp_path / "frey_rawface.mat", n=1965)
    full = load_frey_face(path)
    train, test = load_frey_face(path, split="train"), load_frey_face(path, split="test")
    assert (len(train), len(test)) == (1765, FREY_FACE_NUM_TEST)
    # Contiguous in file order: train then test reassemble the file exactly, no overlap.
    np.testing.assert_array_equal(np.concatenate([train, test]), full)
    flat_train = {row.tobytes() for row in train}
    assert not any(row.tobytes() in flat_train for row in test)
    images, info = load_dataset("frey_face", data_dir=tmp_path, split="test")
    assert info == {
        "dataset": "frey_face",
        "split": "test",
        "binarization": "none",
        "binarized": False,
        "num_examples": 200,
        "event_shape": (28, 20),
        "source": str(path),
    }
    np.testing.assert_array_equal(images, test)


def test_frey_face_split_errors():
    with pytest.raises(DataError, match="unknown Frey Face split 'val'"):
        split_frey_face(np.zeros((300, 28, 20)), "val")
    with pytest.raises(DataError, match="too few"):
        split_frey_face(np.zeros((150, 28, 20)), "train")


def test_frey_face_bad_files(tmp_path):
    with pytest.raises(DataError, match="Frey Face file not found.*--data-dir"):
        load_frey_face(tmp_path / "absent.mat")
    scipy.io.savemat(tmp_path / "no_ff.mat", {"faces": np.zeros((560, 2))})
    with pytest.raises(DataError, match="no variable 'ff'.*faces"):
        load_frey_face(tmp_path / "no_ff.mat")
    write_frey_mat(tmp_path / "rows.mat", np.zeros((20, 28), np.uint8))
    with pytest.raises(DataError, match=r"shape \[20, 28\], expected \[560, N\]"):
        load_frey_face(tmp_path / "rows.mat")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(DataError, match="cannot read"):
        load_frey_face(tmp_path / "junk.mat")
    with pytest.raises(DataError, match="Frey Face not found.*--data-dir"):
        load_dataset("frey_face")


# ----------------------------------------------------------------------------------------------
# load_dataset
# ----------------------------------------------------------------------------------------------


def test_load_dataset_mnist_binarizations(tmp_path):
    written = write_mnist_dir(tmp_path / "mnist")
    grey = written["train"][0].astype(np.float32) / np.float32(255)
    images, info = load_dataset("mnist", data_dir=tmp_path / "mnist")
    assert info["binarization"] == "dynamic" and info["binarized"] is False
    assert info["num_examples"] == 7 and info["event_shape"] == (28, 28)
    assert info["source"] == str(tmp_path / "mnist")
    np.testing.assert_array_equal(images, grey)  # dynamic: still grey
    images, info = load_dataset("mnist", data_dir=tmp_path / "mnist", binarization="threshold")
    assert info["binarized"] is True
    np.testing.assert_array_equal(images, (grey > 0.5).astype(np.float32))
    images, _ = load_dataset("mnist", tmp_path / "mnist", binarization="static", seed=2)
    np.testing.assert_array_equal(images, binarize(grey, "static", seed=2))
    with pytest.raises(DataError, match="unknown binarization"):
        load_dataset("mnist", tmp_path / "mnist", binarization="otsu")


# ----------------------------------------------------------------------------------------------
# The real MNIST files on this machine
# ----------------------------------------------------------------------------------------------


def test_real_mnist_from_default_data_dir(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    directory = default_data_dir("mnist")
    if directory is None:
        pytest.skip("no local MNIST copy (shared/data/mnist) next to the checkout")
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_mnist(directory, split=split)
        assert images.shape == (n, 28, 28)
        np.testing.assert_array_equal(np.unique(labels), np.arange(10))
        assert images.min() == 0.0 and images.max() == 1.0
        # MNIST's mean grey level is 0.1307 (train) / 0.1325 (test), the usual normalization.
        assert abs(images.mean() - {"train": 0.1307, "test": 0.1325}[split]) < 5e-4
