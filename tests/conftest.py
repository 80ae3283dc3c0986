"""Shared fixtures: seeds, and tiny MNIST / Frey Face files written into temporary directories.

The data are synthetic, so the tests never need the real files: 28x28 "digits" made of a
blurred stroke (a line for even classes, an arc for odd ones) with grey edges, so that the
binarizations differ, written as gzip IDX files exactly like MNIST's.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import keras
import numpy as np
import pytest
import scipy.io

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FREY_FACE_FILE = "frey_rawface.mat"


@pytest.fixture(autouse=True)
def keras_seed():
    """Seeds Python, NumPy and TensorFlow (via Keras) before every test: reruns are identical."""
    keras.utils.set_random_seed(1234)
    return 1234


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, 0x08 (unsigned byte), ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def synthetic_digits(n: int, seed: int = 0, shape=(28, 28)) -> tuple[np.ndarray, np.ndarray]:
    """`n` digit-like uint8 images `[n, *shape]` and labels in 0-9.

    Class c is a blurred stroke: a line at angle pi*c/10 (even c) or an arc of radius 4 + c/2
    (odd c), jittered in position, with Gaussian edges of std 1.2 pixels (grey values).
    """
    rng = np.random.default_rng(seed)
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    labels = rng.integers(0, 10, size=n)
    t = np.linspace(-1.0, 1.0, 15)
    images = np.empty((n, height, width), np.float32)
    for i, c in enumerate(labels):
        cy, cx = height / 2 + rng.normal(0, 1.5), width / 2 + rng.normal(0, 1.5)
        if c % 2 == 0:
            angle = np.pi * c / 10 + rng.normal(0, 0.1)
            py, px = cy + 0.3 * height * t * np.sin(angle), cx + 0.3 * width * t * np.cos(angle)
        else:
            radius = 4 + c / 2
            py, px = cy + radius * np.sin(np.pi * t), cx + radius * np.cos(np.pi * t)
        d2 = np.min((yy[None] - py[:, None, None]) ** 2 + (xx[None] - px[:, None, None]) ** 2, 0)
        images[i] = np.exp(-d2 / (2 * 1.2**2))
    return np.round(images * 255).astype(np.uint8), labels.astype(np.uint8)


def write_mnist(directory: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """Writes the four gzip MNIST IDX files of synthetic digits into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        images, labels = synthetic_digits(n, seed=seed + k)
        image_file, label_file = MNIST_FILES[split]
        (directory / image_file).write_bytes(gzip.compress(idx_bytes(images)))
        (directory / label_file).write_bytes(gzip.compress(idx_bytes(labels)))
    return directory


def write_frey_face(directory: Path, n: int = 260, seed: int = 0) -> Path:
    """Writes `frey_rawface.mat` (variable `ff`, uint8 `(560, n)`, one 28x20 face per column)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images, _ = synthetic_digits(n, seed=seed, shape=(28, 20))
    # Faces are grey everywhere: lift the background so that no pixel is exactly 0 or 1.
    faces = (40 + images.astype(np.float32) * (170 / 255)).astype(np.uint8)
    scipy.io.savemat(directory / FREY_FACE_FILE, {"ff": faces.reshape(n, 560).T})
    return directory


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """A directory holding tiny MNIST IDX files: 300 train and 100 test synthetic digits."""
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture
def make_mnist_dir(tmp_path):
    """Factory: `make_mnist_dir(name, n_train=300, n_test=100)` writes a fresh copy to corrupt."""

    def make(name: str = "mnist_copy", **kwargs) -> Path:
        return write_mnist(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def frey_dir(tmp_path_factory) -> Path:
    """A directory holding a tiny `frey_rawface.mat` of 260 synthetic 28x20 faces."""
    return write_frey_face(tmp_path_factory.mktemp("frey"))
