"""Data sets of the paper (MNIST, Frey Face), binarization, and `tf.data` input pipelines.

Everything here reads local files only: there is no download at run time. Where the data
comes from is decided by one helper, `default_data_dir`, so that the CLI, the notebooks and
the tests agree.

Binarization (DESIGN.md section 5) is part of the data's definition, not a detail: a Bernoulli
likelihood is only a likelihood on binary pixels, and bounds on dynamically and statically
binarized MNIST are not comparable. The methods are:

- ``"dynamic"``: a fresh Bernoulli draw ``x ~ Bernoulli(grey)`` every epoch, made inside the
  `tf.data` pipeline (`make_dataset`, grey resolved to 2**-16), reproducible from a seed;
- ``"static"``: one seeded Bernoulli draw, fixed for all epochs;
- ``"threshold"``: ``x = 1 if grey > 0.5 else 0``;
- ``"none"``: grey values in [0, 1] unchanged (for Gaussian decoders, e.g. Frey Face).

Example:

>>> images, info = load_dataset("mnist", split="test")  # doctest: +SKIP
>>> dataset = make_dataset(images, binarization=info["binarization"])  # doctest: +SKIP

Reference: Kingma & Welling, "Auto-Encoding Variational Bayes", arXiv:1312.6114, section 5.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import math
import os
import struct
import sys
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from keras_aevb._io import DataError
from keras_aevb.config import BINARIZATIONS, DATASETS, DEFAULT_BINARIZATION


class _ImportedAtFirstUse:
    """A module imported when one of its attributes is first read.

    TensorFlow (for `make_dataset`) and SciPy (for Frey Face's .mat file) take seconds to
    import; the command line reads this module's names and checks the data files before
    either is needed (`keras-aevb --help` answers at once).
    """

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        return getattr(importlib.import_module(self._name), attribute)


tf = _ImportedAtFirstUse("tensorflow")
scipy_io = _ImportedAtFirstUse("scipy.io")

__all__ = [
    "candidate_dirs",
    "find_file",
    "TEST_DRAW_SEED_OFFSET",
    "fixed_subset",
    "load_eval_split",
    "pipeline_binarization",
    "BINARIZATIONS",
    "DATASETS",
    "DATA_DIR_ENV",
    "DEFAULT_BINARIZATION",
    "FREY_FACE_NUM_TEST",
    "FREY_FACE_SPLIT",
    "MAX_IDX_BYTES",
    "DataError",
    "binarize",
    "default_data_dir",
    "load_dataset",
    "load_frey_face",
    "load_mnist",
    "make_dataset",
    "read_idx",
    "running_on_colab",
    "split_frey_face",
]


# Environment variable naming a directory that holds the data files (or a `<dataset>/` subdir).
DATA_DIR_ENV = "KERAS_AEVB_DATA_DIR"

_MNIST_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_IMAGE_SHAPE = (28, 28)
_MNIST_FIX = (
    "pass --data-dir DIR (a directory holding the four MNIST IDX files) or set " + DATA_DIR_ENV
)

_FREY_FACE_FILE = "frey_rawface.mat"
_FREY_FACE_IMAGE_SHAPE = (28, 20)
_FREY_FACE_FIX = (
    f"pass --data-dir DIR (a directory holding {_FREY_FACE_FILE}, Roweis' original file with "
    f"variable 'ff' of shape (560, N)) or set {DATA_DIR_ENV}"
)

# The paper gives no Frey Face split. Consecutive frames of the video are near duplicates, so a
# random split would put a near copy of every test face in the training set and make the test
# bound say nothing about overfitting (the point of the paper's Fig. 2). The split is therefore
# contiguous in file order: the last 200 frames are the test set, the rest (1765 of 1965) train.
FREY_FACE_NUM_TEST = 200
FREY_FACE_SPLIT = {
    "train": slice(None, -FREY_FACE_NUM_TEST),
    "test": slice(-FREY_FACE_NUM_TEST, None),
    "all": slice(None),
}

_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
# IDX headers asking for more data bytes than this are refused before anything is read: a
# request must not size memory at will (DESIGN 6b). MNIST's largest file holds 47 MB.
MAX_IDX_BYTES = 1 << 30
# deflate codes at best 258 bytes in 2 bits: a gzip file of n bytes inflates to at most 1032 n.
_DEFLATE_MAX_RATIO = 1032
_IDX_CHUNK = 1 << 20  # bytes inflated per read


# --------------------------------------------------------------------------------------------
# Where the data lives
# --------------------------------------------------------------------------------------------


def running_on_colab() -> bool:
    """Returns True inside Google Colab (where notebooks load MNIST through TFDS instead)."""
    return "google.colab" in sys.modules


def candidate_dirs(dataset: str) -> list[Path]:
    """Directories searched, in order, for `dataset`'s files (see `default_data_dir`)."""
    candidates = []
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        candidates += [Path(env_dir), Path(env_dir) / dataset]
    cwd = Path.cwd()
    candidates.append(cwd / "data" / dataset)
    # The shared data copy sits next to the checkout (e.g. <root>/shared/data/mnist beside
    # <root>/main); walking up from the working directory finds it from the checkout, from
    # notebooks/ or from a subdirectory without hard-coding <root>.
    candidates += [parent / "shared" / "data" / dataset for parent in (cwd, *cwd.parents)]
    return list(dict.fromkeys(candidates))  # drop duplicates, keep order


def find_file(directory: Path, stem: str) -> Path | None:
    """Returns `directory/stem` or `directory/stem.gz`, whichever exists (raw first), or None."""
    for name in (stem, stem + ".gz"):
        path = directory / name
        if path.is_file():
            return path
    return None


def _has_dataset(directory: Path, dataset: str) -> bool:
    if dataset == "mnist":
        stems = [stem for pair in _MNIST_SPLITS.values() for stem in pair]
        return all(find_file(directory, stem) is not None for stem in stems)
    return (directory / _FREY_FACE_FILE).is_file()


def default_data_dir(dataset: str = "mnist") -> str | None:
    """Finds the local directory holding `dataset`'s files, or returns None.

    The one place that decides where data comes from. Searched in order:

    1. ``$KERAS_AEVB_DATA_DIR`` itself, then ``$KERAS_AEVB_DATA_DIR/<dataset>``;
    2. ``./data/<dataset>`` under the current working directory;
    3. ``<dir>/shared/data/<dataset>`` for the working directory and each of its parents.

    A directory counts only if it holds all of the data set's files: the four MNIST IDX files
    (raw or ``.gz``) for ``"mnist"``, ``frey_rawface.mat`` for ``"frey_face"``.

    Args:
        dataset: ``"mnist"`` or ``"frey_face"``.

    Returns:
        The directory as a string, or None if no candidate holds the files.

    Raises:
        DataError: `dataset` is not a known data set.
    """
    _check_dataset_name(dataset)
    for directory in candidate_dirs(dataset):
        if _has_dataset(directory, dataset):
            return str(directory)
    return None


def _check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")


# --------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------


def _read_upto(stream, size: int) -> bytes:
    """Up to `size` bytes of `stream` (fewer only at its end)."""
    parts, left = [], size
    while left:
        part = stream.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file of unsigned bytes (the MNIST format), gzip-compressed or raw.

    IDX layout: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    then one big-endian uint32 per dimension, then the data in row-major order. Compression is
    detected from the gzip magic bytes, not from the file name.

    The file is read as a stream, and no more of it than the header's sizes say: a gzip file
    that inflates to more than that (a "gzip bomb", or a corrupt header) is refused once one
    byte past them has come out, not after inflating all of it. Headers asking for more than
    `MAX_IDX_BYTES` (1 GiB), or for more than the file could hold, are refused before reading.

    Args:
        path: the file.

    Returns:
        A uint8 array with the shape stored in the header.

    Raises:
        DataError: the file is missing, has a wrong magic number or type code, is truncated
            (gzip stream cut short, or fewer data bytes than the header's dimensions imply),
            holds more bytes than its header implies, or is larger than `MAX_IDX_BYTES`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}; pass --data-dir pointing at its directory")
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        file_size = os.fstat(raw.fileno()).st_size
        try:
            if not compressed:
                return _read_idx_stream(raw, path, file_size, compressed)
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                return _read_idx_stream(stream, path, file_size, compressed)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(
                f"gzip file is truncated or corrupt: {path} ({e}); download it again"
            ) from None


def _read_idx_stream(stream, path: Path, file_size: int, compressed: bool) -> np.ndarray:
    head = _read_upto(stream, 4)
    if len(head) < 4:
        raise DataError(f"IDX file is truncated: {path} has {len(head)} bytes; download it again")
    zero0, zero1, type_code, ndim = head
    if zero0 != 0 or zero1 != 0 or type_code != _IDX_UBYTE or ndim == 0:
        raise DataError(
            f"wrong IDX magic number 0x{head.hex()} in {path} (expected 0x000008NN: "
            "unsigned bytes, NN dimensions); is it an MNIST IDX file?"
        )
    dims = _read_upto(stream, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"IDX file is truncated in its header: {path}; download it again")
    shape = struct.unpack(f">{ndim}I", dims)
    header_size = 4 + 4 * ndim
    expected = math.prod(shape)  # a Python int: no overflow for any header
    if expected > MAX_IDX_BYTES:
        raise DataError(
            f"IDX file {path} has a header {list(shape)} of {expected} data bytes, larger than "
            f"the {MAX_IDX_BYTES >> 30} GiB this reader accepts (MNIST's largest file holds "
            "47 MB); is it an MNIST IDX file?"
        )
    if not compressed and file_size - header_size < expected:
        raise DataError(
            f"IDX file is truncated: {path} holds {file_size - header_size} data bytes, its "
            f"header {list(shape)} needs {expected}; download it again"
        )
    if compressed and expected > _DEFLATE_MAX_RATIO * file_size:
        raise DataError(
            f"IDX file is truncated: {path} ({file_size} bytes of gzip) cannot inflate to the "
            f"{expected} data bytes its header {list(shape)} needs; download it again"
        )
    images = np.empty(expected, dtype=np.uint8)
    buffer, filled = memoryview(images), 0
    while filled < expected:
        count = stream.readinto(buffer[filled : filled + _IDX_CHUNK])
        if not count:
            raise DataError(
                f"IDX file is truncated: {path} holds {filled} data bytes, its header "
                f"{list(shape)} needs {expected}; download it again"
            )
        filled += count
    if stream.read(1):  # one byte past the header's sizes: refused without reading the rest
        raise DataError(
            f"IDX file is corrupt: {path} holds more than the {expected} data bytes its "
            f"header {list(shape)} implies; download it again"
        )
    return images.reshape(shape)


def _load_mnist_idx(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_stem, label_stem = _MNIST_SPLITS[split]
    paths = []
    for stem in (image_stem, label_stem):
        path = find_file(directory, stem)
        if path is None:
            raise DataError(
                f"MNIST IDX file not found: {directory / stem}(.gz); pass --data-dir pointing at "
                "a directory with the four MNIST IDX files"
            )
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != _MNIST_IMAGE_SHAPE:
        raise DataError(
            f"MNIST images in {paths[0]} have shape {list(images.shape)}, expected "
            "[N, 28, 28]; is it the images file?"
        )
    if labels.ndim != 1:
        raise DataError(
            f"MNIST labels in {paths[1]} have shape {list(labels.shape)}, expected [N]; "
            "is it the labels file?"
        )
    if len(images) == 0:
        raise DataError(f"MNIST {split} images in {paths[0]} hold 0 images; download it again")
    if len(images) != len(labels):
        raise DataError(
            f"MNIST {split} has {len(images)} images but {len(labels)} labels "
            f"({paths[0].name}, {paths[1].name}); the files come from different sets, "
            "download both again"
        )
    if labels.size and labels.max() > 9:
        raise DataError(
            f"MNIST labels in {paths[1]} go up to {labels.max()}, expected 0-9; "
            "is it the labels file?"
        )
    return images, labels


def _load_mnist_tfds(split: str, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Loads MNIST through TFDS: from its copy on disk, or downloading only if asked."""
    try:
        import tensorflow_datasets as tfds

        # data_dir=None: TFDS's own default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
        data = tfds.load(
            "mnist",
            split=split,
            data_dir=None,
            download=download,
            batch_size=-1,
            as_supervised=True,
        )
        images, labels = tfds.as_numpy(data)
    except Exception as e:  # any TFDS failure (not installed, not prepared) means "not found"
        reason = " ".join(str(e).split())[:200]  # one line, bounded
        raise DataError(
            f"MNIST not found: no local IDX files and no TFDS copy ({type(e).__name__}: "
            f"{reason}); {_MNIST_FIX}"
        ) from None
    images = np.asarray(images)
    return images.reshape(images.shape[0], *_MNIST_IMAGE_SHAPE), np.asarray(labels)


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    use_tfds: bool | None = None,
    download: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads MNIST from local IDX files (or a TFDS copy on disk), grey values in [0, 1].

    Args:
        data_dir: directory holding ``train-images-idx3-ubyte[.gz]``,
            ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` and
            ``t10k-labels-idx1-ubyte[.gz]``. None: `default_data_dir` decides.
        split: ``"train"`` (60000 images) or ``"test"`` (10000).
        use_tfds: None: use TFDS only when `data_dir` is None and no local IDX files are found.
            True: use TFDS only. False: never.
        download: let TFDS download MNIST when no copy is found (for Colab; the notebooks pass
            ``download=running_on_colab()``). False by default: nothing is fetched at run time.

    Returns:
        ``(images, labels)``: images float32 ``[N, 28, 28]`` equal to the bytes / 255, labels
        int64 ``[N]`` in 0-9.

    Raises:
        DataError: unknown split, files missing, corrupt or inconsistent.
    """
    if split not in _MNIST_SPLITS:
        raise DataError(f"unknown MNIST split {split!r}; use one of {', '.join(_MNIST_SPLITS)}")
    if use_tfds:
        images, labels = _load_mnist_tfds(split, download)
    elif data_dir is not None:
        directory = Path(data_dir)
        if not directory.is_dir():
            raise DataError(f"MNIST data directory not found: {directory}; {_MNIST_FIX}")
        images, labels = _load_mnist_idx(directory, split)
    else:
        found = default_data_dir("mnist")
        if found is not None:
            images, labels = _load_mnist_idx(Path(found), split)
        elif use_tfds is None:
            images, labels = _load_mnist_tfds(split, download)
        else:
            searched = ", ".join(str(d) for d in candidate_dirs("mnist"))
            raise DataError(f"MNIST not found: no IDX files in {searched}; {_MNIST_FIX}")
    return _to_unit_interval(images), labels.astype(np.int64)


def _to_unit_interval(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1] (x / 255, so 0 -> 0.0 and 255 -> 1.0 exactly)."""
    return pixels.astype(np.float32) / np.float32(255.0)


# --------------------------------------------------------------------------------------------
# Frey Face
# --------------------------------------------------------------------------------------------


def load_frey_face(path: str | os.PathLike, split: str = "all") -> np.ndarray:
    """Loads the Frey Face video frames from Roweis' ``frey_rawface.mat``.

    The file holds one variable ``ff``: uint8 of shape ``(560, N)`` (N = 1965), one image per
    column, each stored row-major so that ``ff[:, i].reshape(28, 20)`` is the upright face
    (28 rows, 20 columns).

    Args:
        path: the ``.mat`` file, or a directory holding ``frey_rawface.mat``.
        split: ``"all"``, ``"train"`` or ``"test"``; see `split_frey_face`.

    Returns:
        float32 ``[N, 28, 20]`` (``[1965, 28, 20]`` for ``"all"``) equal to the bytes / 255.

    Raises:
        DataError: the file is missing or unreadable, has no ``ff``, or ``ff`` does not have
            560 rows; or the split is unknown.
    """
    path = Path(path)
    if path.is_dir():
        path = path / _FREY_FACE_FILE
    if not path.is_file():
        raise DataError(f"Frey Face file not found: {path}; {_FREY_FACE_FIX}")
    try:
        contents = scipy_io.loadmat(path)
    except Exception as e:  # scipy raises several types for a corrupt or non-.mat file
        reason = " ".join(str(e).split())[:200]
        raise DataError(f"cannot read {path} as a .mat file ({reason}); {_FREY_FACE_FIX}") from None
    if "ff" not in contents:
        names = ", ".join(k for k in contents if not k.startswith("__")) or "none"
        raise DataError(f"no variable 'ff' in {path} (variables: {names}); {_FREY_FACE_FIX}")
    ff = np.asarray(contents["ff"])
    pixels = _FREY_FACE_IMAGE_SHAPE[0] * _FREY_FACE_IMAGE_SHAPE[1]
    if ff.ndim != 2 or ff.shape[0] != pixels:
        raise DataError(
            f"'ff' in {path} has shape {list(ff.shape)}, expected [560, N] (one 28x20 image "
            f"per column); {_FREY_FACE_FIX}"
        )
    # Columns are images; each column is a row-major 28x20 image.
    images = _to_unit_interval(np.ascontiguousarray(ff.T).reshape(-1, *_FREY_FACE_IMAGE_SHAPE))
    return split_frey_face(images, split)


def split_frey_face(images: np.ndarray, split: str) -> np.ndarray:
    """Selects the Frey Face train or test frames (the paper states no split).

    The split is contiguous in file order (`FREY_FACE_SPLIT`): the last `FREY_FACE_NUM_TEST`
    (200) frames are the test set, all earlier ones (1765 of 1965) the training set. Not a
    random split, because consecutive video frames are near duplicates and a random split
    would leak near copies of the test faces into training.

    Args:
        images: all frames, ``[N, ...]`` in file order.
        split: ``"train"``, ``"test"`` or ``"all"``.

    Returns:
        The selected frames (a view of `images`).

    Raises:
        DataError: unknown split, or too few frames to hold out the test set.
    """
    if split not in FREY_FACE_SPLIT:
        raise DataError(
            f"unknown Frey Face split {split!r}; use one of {', '.join(FREY_FACE_SPLIT)}"
        )
    if split != "all" and len(images) <= FREY_FACE_NUM_TEST:
        raise DataError(
            f"Frey Face has {len(images)} frames, too few to hold out {FREY_FACE_NUM_TEST} for "
            "testing; use split='all' or the full 1965-frame file"
        )
    return images[FREY_FACE_SPLIT[split]]


# --------------------------------------------------------------------------------------------
# Binarization
# --------------------------------------------------------------------------------------------


def _check_binarization(method: str) -> None:
    if method not in BINARIZATIONS:
        raise DataError(f"unknown binarization {method!r}; use one of {', '.join(BINARIZATIONS)}")


def _check_unit_interval(images: np.ndarray, method: str) -> None:
    if images.size and (np.nanmin(images) < 0.0 or np.nanmax(images) > 1.0):
        raise DataError(
            f"{method} binarization needs grey values in [0, 1], got "
            f"[{np.nanmin(images):g}, {np.nanmax(images):g}]; scale the pixels (e.g. by 1/255)"
        )
    if np.isnan(images).any():
        raise DataError(f"{method} binarization got NaN pixels; clean the data first")


def binarize(images: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """Binarizes grey images once, in NumPy (for the fixed methods).

    - ``"static"``: ``x = 1 if u < grey else 0`` with ``u ~ Uniform[0, 1)`` drawn once from
      ``np.random.default_rng(seed)``, i.e. one Bernoulli(grey) draw per pixel, the same for
      every epoch and for every call with the same seed. Binary input is left unchanged.
    - ``"threshold"``: ``x = 1 if grey > 0.5 else 0`` (strict: a pixel of exactly 0.5 becomes 0;
      on /255 MNIST no pixel is 0.5, and this equals ``byte >= 128``).
    - ``"none"``: the images unchanged (as float32).

    ``"dynamic"`` is not done here: it is a fresh draw every epoch, made by `make_dataset`.

    Args:
        images: grey values in [0, 1], any shape.
        method: ``"static"``, ``"threshold"`` or ``"none"``.
        seed: seed of the static draw.

    Returns:
        float32 array of the same shape.

    Raises:
        DataError: unknown method, ``"dynamic"``, or grey values outside [0, 1] (static).
    """
    _check_binarization(method)
    images = np.asarray(images, dtype=np.float32)
    if method == "dynamic":
        raise DataError(
            "dynamic binarization is a fresh draw every epoch, applied by make_dataset("
            "binarization='dynamic'); pass the grey images there instead of calling binarize"
        )
    if method == "static":
        _check_unit_interval(images, method)
        uniform = np.random.default_rng(seed).random(images.shape, dtype=np.float32)
        return (uniform < images).astype(np.float32)
    if method == "threshold":
        return (images > 0.5).astype(np.float32)
    return images


# --------------------------------------------------------------------------------------------
# tf.data pipeline
# --------------------------------------------------------------------------------------------


class BatchSpec(NamedTuple):
    """The static shape of an `AddressedBatches` stream (hashable: a trace key)."""

    batch_size: int
    num_examples: int
    num_batches: int
    event_shape: tuple
    shuffle: bool
    dynamic: bool
    drop_remainder: bool


class AddressedBatches:
    """The batches of `make_dataset`, built from their addresses where they are used.

    An address is `[epoch seed (4 int64), batch index]`: the epoch seed gives the epoch's
    order (`stateless_shuffle` of its first two values) and, for ``"dynamic"``, the key of its
    Bernoulli draws (the third); batch i is rows `order[i M : (i + 1) M]` of the table, drawn
    from the stateless seed `(key, i)`. `make_dataset` builds its batches with `batch`, and
    `AEVB.fit` builds the same batches from the addresses with `materialize`, next to the
    training steps (keras_aevb.execution): tf.data then only hands over addresses, where
    building each batch on tf.data's thread competed with the step for the CPU.

    Attributes:
        table: the data, or the Bernoulli thresholds for ``"dynamic"`` (int32 in [0, 2**16]);
            a compiled function that builds batches takes it as an argument (a tensor), so one
            trace serves every table of the same `spec`.
        spec: a `BatchSpec` (hashable: the trace key).
    """

    def __init__(self, table, spec):
        self.table = table
        self.spec = spec
        batch = spec.batch_size if spec.drop_remainder else None
        self._batch_shape = [batch, *spec.event_shape]

    @classmethod
    def of(cls, table, batch_size, shuffle, dynamic, drop_remainder=False):
        """The stream of `table` in batches of `batch_size` (see `make_dataset`)."""
        num_examples = int(table.shape[0])
        num_batches = num_examples // batch_size
        if not drop_remainder and num_examples % batch_size:
            num_batches += 1
        event_shape = tuple(int(d) for d in table.shape[1:])
        spec = BatchSpec(
            batch_size, num_examples, num_batches, event_shape, bool(shuffle), bool(dynamic),
            bool(drop_remainder),
        )  # fmt: skip
        return cls(table, spec)

    def order(self, epoch_seed):
        """The epoch's order of the examples (None: their natural order)."""
        if not self.spec.shuffle:
            return None
        return tf.random.experimental.stateless_shuffle(
            tf.range(self.spec.num_examples, dtype=tf.int32), seed=epoch_seed[:2]
        )

    def batch(self, order, draw_key, i):
        """Batch i of the epoch with this order and draw key, float32 `[m, *event_shape]`."""
        table = self.table
        m, n = self.spec.batch_size, self.spec.num_examples
        i = tf.cast(i, tf.int32)
        start = i * m
        stop = tf.minimum(start + m, n)
        rows = tf.gather(table, order[start:stop]) if order is not None else table[start:stop]
        if self.spec.dynamic:
            rows = _bernoulli16(rows, tf.stack([draw_key, tf.cast(i, tf.int64)]))
        return tf.ensure_shape(tf.cast(rows, tf.float32), self._batch_shape)

    def is_full(self, address):
        """Whether the batch at `address` holds `batch_size` examples (not a short last one)."""
        return (address[4] + 1) * self.spec.batch_size <= self.spec.num_examples

    def materialize(self, addresses):
        """The batches at `addresses` `[k, 5]`, one after another: `[k, m, *event_shape]`.

        Every batch in a block must have the same size (the caller checks `is_full`). The
        order is computed once per epoch seed met, not once per batch.
        """
        k = tf.shape(addresses)[0]
        shuffle = self.spec.shuffle

        def body(j, order, seed, batches):
            address = addresses[j]
            if shuffle:
                order = tf.cond(
                    tf.reduce_all(address[:2] == seed), lambda: order, lambda: self.order(address)
                )
            batch = self.batch(order if shuffle else None, address[2], address[4])
            return j + 1, order, address[:2], batches.write(j, batch)

        first = addresses[0]
        order = self.order(first) if shuffle else tf.zeros([0], tf.int32)  # unused unshuffled
        batches = tf.TensorArray(
            tf.float32, size=k, element_shape=[self.spec.batch_size, *self.spec.event_shape]
        )
        _, _, _, batches = tf.while_loop(
            lambda j, *_: j < k, body, (tf.constant(0), order, first[:2], batches)
        )
        return batches.stack()

    def materialize_one(self, address):
        """The batch at one address, `[m, *event_shape]` (a short last batch included)."""
        return self.batch(self.order(address), address[2], address[4])


def make_dataset(
    images: np.ndarray,
    batch_size: int = 100,
    binarization: str = "dynamic",
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = False,
    repeat: bool = False,
    initial_step: int = 0,
) -> tf.data.Dataset:
    """Builds the input pipeline: batches ``x`` of shape ``[batch, *event_shape]``, no labels.

    Each iteration over the returned dataset is one epoch: a new shuffle order (if `shuffle`)
    and, for ``"dynamic"``, a new Bernoulli draw of every pixel. Both are reproducible: two
    datasets built with the same seed yield the same sequence of epochs. With ``shuffle=False``
    and ``"dynamic"`` it serves a test set whose bound is reproducible from `seed`; with
    ``shuffle=False`` the examples come in their natural order.

    How (cheap per batch, since the pipeline shares the CPU with the training step):

    - Each iteration draws one epoch seed from ``Dataset.random(seed,
      rerandomize_each_iteration=True)``: new on every iteration (each epoch, each pass of
      ``repeat()``), the same sequence of epoch seeds for the same `seed`.
    - The epoch's order is one ``stateless_shuffle`` of ``range(N)`` (a uniform random
      permutation: every example exactly once per epoch), sliced into batches of `batch_size`
      (the last one smaller unless `drop_remainder`); each batch is one gather of whole images.
    - ``"dynamic"`` draws batch ``i`` of an epoch from the stateless seed ``(epoch key, i)``:
      16 random bits ``u`` per pixel (two pixels per 32-bit Philox word, half the random-number
      cost of a float32 uniform), and ``x = 1 if u < round(65536 * grey) else 0``. So
      ``P(x = 1) = round(65536 * grey) / 65536``: a Bernoulli draw whose probability is grey
      rounded to a multiple of 2**-16, i.e. biased by at most 2**-17 (7.6e-6) per pixel (not
      at all for grey a multiple of 2**-16; up to 7.6e-6 for MNIST's levels byte/255). Grey 0
      gives 0 and grey 1 gives 1, always.

    Its cost per batch against the shuffle buffer and float32 uniforms it replaced:
    benchmarks/BENCHMARKS.md, "What the defaults do" (cheaper input pipeline).

    Args:
        images: float array ``[N, *event_shape]``; grey values in [0, 1] for ``"dynamic"`` and
            ``"static"`` (binary images pass through both unchanged).
        batch_size: examples per batch.
        binarization: one of `BINARIZATIONS`; ``"static"``/``"threshold"`` are applied once with
            `binarize`, ``"dynamic"`` per epoch and batch inside the pipeline.
        shuffle: reshuffle all N examples every epoch.
        seed: seed of the shuffle order and of the static or dynamic draws.
        drop_remainder: drop the last batch if smaller than `batch_size`.
        repeat: an endless stream of passes over the data, addressed by step: pass ``p`` draws
            its order and binarization from the ``p``-th epoch seed of `seed` (a fixed
            sequence, ``Dataset.random(seed)``), so the stream is the same however it is cut.
            What a resumable run needs: `initial_step` restarts the stream where it stopped.
        initial_step: with `repeat`, the number of batches of the stream to skip (without
            computing them): the stream starts with batch ``initial_step % batches_per_pass``
            of pass ``initial_step // batches_per_pass``.

    Returns:
        A `tf.data.Dataset` of float32 batches.

    Raises:
        DataError: unknown binarization, bad `batch_size`, empty images, or grey values outside
            [0, 1] for a Bernoulli draw.
    """
    source = _batch_source(images, batch_size, binarization, shuffle, seed, drop_remainder)
    stream = _epoch_stream(seed, source.spec.num_batches, repeat, initial_step)
    dataset = _pipeline_options(stream(functools.partial(_epoch_batches, source)))
    # The same stream as addresses, for `AEVB.fit`, which builds the batches itself.
    addresses = _pipeline_options(stream(functools.partial(_epoch_addresses, source)))
    dataset._keras_aevb_addressed = (source, addresses)
    return dataset


def _batch_source(images, batch_size, binarization, shuffle, seed, drop_remainder):
    """The checked images as an `AddressedBatches` table (thresholds for "dynamic")."""
    _check_binarization(binarization)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size}")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim < 1 or len(images) == 0:
        raise DataError(f"no examples to batch (images of shape {list(images.shape)})")
    if binarization == "dynamic":
        _check_unit_interval(images, binarization)
        # The Bernoulli thresholds, once: x = 1 iff a 16-bit uniform integer is below them.
        # grey * 65536 is exact in float32, so 0 -> 0 (never 1) and 1 -> 65536 (always 1).
        table = tf.constant(np.rint(images * np.float32(_DRAW_LEVELS)).astype(np.int32))
    else:
        table = tf.constant(binarize(images, binarization, seed=seed))
    return AddressedBatches.of(
        table, int(batch_size), shuffle, binarization == "dynamic", drop_remainder
    )


def _epoch_batches(source, epoch_seed, first_batch=0):
    """The batches of one epoch from `first_batch` on; `epoch_seed` is 4 int64."""
    order = source.order(epoch_seed)
    batch_index = tf.data.Dataset.range(first_batch, source.spec.num_batches, output_type=tf.int32)
    return batch_index.map(lambda i: source.batch(order, epoch_seed[2], i), num_parallel_calls=None)


def _epoch_addresses(source, epoch_seed, first_batch=0):
    """The same epoch's batches as addresses: `[epoch seed (4), batch index]`, int64."""
    batch_index = tf.data.Dataset.range(first_batch, source.spec.num_batches, output_type=tf.int64)
    return batch_index.map(lambda i: tf.concat([epoch_seed, [i]], axis=0))


def _epoch_stream(seed, num_batches, repeat, initial_step):
    """`stream(per_epoch)`: the dataset of `per_epoch(epoch_seed[, first_batch])` over epochs.

    Without `repeat`, one epoch per iteration (a new epoch seed each time); with it, an endless
    stream of passes that starts `initial_step` batches in.
    """
    if not repeat:
        # One element (4 int64) per iteration: a new epoch seed every epoch, reproducible.
        # Both streams of `make_dataset` share it, so an iteration of either (a peek at the
        # first batch included) moves both to the next epoch's seed.
        epoch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

        def stream(per_epoch):
            dataset = epoch_seeds.take(4).batch(4, drop_remainder=True).flat_map(per_epoch)
            # flat_map hides the number of batches; Keras needs it (steps per epoch, progress
            # bars).
            return dataset.apply(tf.data.experimental.assert_cardinality(num_batches))

        return stream
    if isinstance(initial_step, bool) or int(initial_step) != initial_step or initial_step < 0:
        raise DataError(f"initial_step must be an integer >= 0, got {initial_step!r}")
    first_pass, first_batch = divmod(int(initial_step), num_batches)

    def stream(per_epoch):
        # Pass p's seed is the p-th group of 4 of one fixed random sequence: addressable.
        epoch_seeds = tf.data.Dataset.random(seed=seed).batch(4).skip(first_pass)

        def pass_batches(p, epoch_seed):
            start = tf.where(p == 0, tf.constant(first_batch, tf.int64), tf.constant(0, tf.int64))
            return per_epoch(epoch_seed, start)

        return epoch_seeds.enumerate().flat_map(pass_batches)

    return stream


def _pipeline_options(dataset):
    # Fixed prefetch, no parallel calls and no autotuning: on 2-core CPUs tf.data's autotuner
    # stalled the end of a fit call by seconds in about half the epochs (DESIGN.md section 9);
    # parallel map calls did not lower the CPU cost per batch.
    dataset = dataset.prefetch(2)
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    return dataset.with_options(options)


# Resolution of the dynamic Bernoulli draw: 16 random bits per pixel.
_DRAW_BITS = 16
_DRAW_LEVELS = 2**_DRAW_BITS


def _bernoulli16(thresholds: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """float32 ``x = 1 if u < thresholds else 0``, ``u`` uniform on {0, ..., 2**16 - 1}.

    `thresholds` is int32 ``[m, *event_shape]`` in [0, 2**16]; the bits come from
    ``ceil(size / 2)`` stateless Philox uint32 words per example, split into two 16-bit halves.
    """
    shape = tf.shape(thresholds)
    num_examples = shape[0]
    event_size = int(np.prod(thresholds.shape[1:]))
    words = (event_size + 1) // 2
    bits = tf.random.stateless_uniform(
        tf.stack([num_examples, words]), seed=seed, dtype=tf.uint32, minval=None, maxval=None
    )
    uniform = tf.reshape(tf.bitcast(bits, tf.uint16), [num_examples, 2 * words])
    if 2 * words != event_size:
        uniform = uniform[:, :event_size]
    uniform = tf.reshape(tf.cast(uniform, tf.int32), shape)
    return tf.cast(uniform < thresholds, tf.float32)


# --------------------------------------------------------------------------------------------
# One entry point
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    binarization: str | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Loads one of the paper's data sets, binarized as asked (the CLI's and notebooks' entry).

    Args:
        name: ``"mnist"`` or ``"frey_face"``.
        data_dir: directory holding the files; None: `default_data_dir` (and, for MNIST, a TFDS
            copy on disk) decides.
        split: ``"train"`` or ``"test"`` (Frey Face also ``"all"``; see `split_frey_face`).
        binarization: one of `BINARIZATIONS`; None picks `DEFAULT_BINARIZATION` (``"dynamic"``
            for MNIST, ``"none"`` for Frey Face).
        seed: seed of a ``"static"`` draw.

    Returns:
        ``(images, info)``. Images are float32 ``[N, *event_shape]``: already binary for
        ``"static"`` and ``"threshold"``; still grey for ``"dynamic"`` (`make_dataset` draws
        them each epoch) and ``"none"``. ``info`` is a dict with ``dataset``, ``split``,
        ``binarization``, ``binarized`` (True if the returned images are already binary),
        ``num_examples``, ``event_shape`` (tuple) and ``source`` (a path, or ``"tfds"``).

    Raises:
        DataError: unknown name, split or binarization, or missing/corrupt files.
    """
    _check_dataset_name(name)
    binarization = DEFAULT_BINARIZATION[name] if binarization is None else binarization
    _check_binarization(binarization)

    if name == "mnist":
        directory = data_dir if data_dir is not None else default_data_dir("mnist")
        images, _ = load_mnist(directory, split=split, use_tfds=None)
        source = str(directory) if directory is not None else "tfds"
    else:
        directory = data_dir if data_dir is not None else default_data_dir("frey_face")
        if directory is None:
            searched = ", ".join(str(d) for d in candidate_dirs("frey_face"))
            raise DataError(
                f"Frey Face not found: no {_FREY_FACE_FILE} in {searched}; {_FREY_FACE_FIX}"
            )
        path = Path(directory)
        path = path / _FREY_FACE_FILE if path.is_dir() else path
        images = load_frey_face(path, split=split)
        source = str(path)

    binarized = binarization in ("static", "threshold")
    if binarized:
        images = binarize(images, binarization, seed=seed)
    info = {
        "dataset": name,
        "split": split,
        "binarization": binarization,
        "binarized": binarized,
        "num_examples": int(len(images)),
        "event_shape": tuple(int(d) for d in images.shape[1:]),
        "source": source,
    }
    return images, info


# ------------------------------------------------------------------ evaluation splits

# The test bound needs a fixed test set: for dynamic binarization it is one Bernoulli draw of
# the test images with this seed offset from the run's seed (the same draw for every epoch and
# for `keras-aevb evaluate`).
TEST_DRAW_SEED_OFFSET = 0


def load_eval_split(dataset, data_dir, split, binarization, seed=0, num_examples=None):
    """One split as a fixed array for evaluation: the test set of Fig. 2 and `evaluate`.

    Static and threshold binarizations are what `load_dataset` returns. "dynamic" is a fresh
    draw each epoch in training; a bound must be computed on one fixed set, so here it is one
    Bernoulli draw (`binarize(..., "static", seed)`), the same for every epoch and every call
    with the same seed.

    Returns:
        `(x, info)`: float32 `[n, *event_shape]`, and load_dataset's info plus
        "evaluation_binarization" (how the returned values were made, in words).
    """
    images, info = load_dataset(dataset, data_dir, split, binarization, seed=seed)
    if num_examples is not None:
        images = images[: int(num_examples)]
    info = dict(info, num_examples=int(len(images)))
    if binarization == "dynamic":
        images = binarize(images, "static", seed=seed + TEST_DRAW_SEED_OFFSET)
        info["evaluation_binarization"] = (
            f"dynamic (evaluated on one fixed Bernoulli draw, seed {seed + TEST_DRAW_SEED_OFFSET})"
        )
    else:
        info["evaluation_binarization"] = info["binarization"]
    return images.astype(np.float32), info


def fixed_subset(images, info, num_examples, seed):
    """The first `num_examples` of a split loaded by load_dataset, as `load_eval_split` does."""
    subset = np.asarray(images[: int(num_examples)], np.float32)
    if info["binarization"] == "dynamic":
        return binarize(subset, "static", seed=seed + TEST_DRAW_SEED_OFFSET)
    return subset


def pipeline_binarization(info):
    """What make_dataset still has to do: nothing for data load_dataset already binarized."""
    return "none" if info["binarized"] else info["binarization"]
