"""The run directory that `keras_aevb.training.train` writes: its files, their formats, and
the checks a resume makes before it writes anything.

    config.json         every setting as given ("requested") and as resolved (`config_json`)
    history.csv         HISTORY_COLUMNS, one row per epoch (the data of the paper's Fig. 2)
    model.keras         the trained model (with its optimizer)
    checkpoints/        state.json (the commit point) + the latest epoch's weights

history.csv: `examples_seen` counts training examples (the x axis of Fig. 2); `seconds` is the
wall time of training and evaluation up to the end of the epoch, summed over resumed
invocations; `train_elbo` and `test_elbo` are the bound (nats per datapoint) measured after the
epoch on a fixed set: the test split, and as many training examples (the first ones); for
dynamic binarization both are one fixed Bernoulli draw of the grey images (seeded by the run's
seed), so that the bound of every epoch is measured on the same binary data.

Resuming: running the same configuration on a run directory that holds a checkpoint continues
after the last finished epoch. This is Keras's `BackupAndRestore` idea, done so that a kill at
any instant loses at most the epoch in progress: the weights of epoch k go to a new file, then
`state.json` (epoch k, the history rows 1..k, the weights file's name) is replaced atomically.
That rename is the commit point; history.csv is rewritten from the committed rows on resume, so
every epoch appears in it exactly once. (`BackupAndRestore` writes its weights and its epoch
number as two non-atomic writes, so a kill between them replays or skips an epoch.) A resumed
run keeps its epoch length (`plan_epochs`): a larger budget extends it.

One owner of each format: training writes history.csv with `history_csv_bytes`, plotting and
the figure scripts read it with `read_history`. Every file is written whole, to a temporary
name and renamed (`keras_aevb._io.atomic_write`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from keras_aevb import _io
from keras_aevb._io import atomic_write
from keras_aevb.config import jsonable
from keras_aevb.version import __version__

__all__ = [
    "HISTORY_COLUMNS",
    "Unresumable",
    "config_json",
    "history_csv_bytes",
    "plan_epochs",
    "save_model",
    "save_weights",
    "read_history",
    "read_previous_run",
    "write_bytes",
    "write_json",
]

HISTORY_COLUMNS = ("epoch", "examples_seen", "seconds", "train_elbo", "test_elbo")


def write_bytes(path, payload: bytes):
    atomic_write(path, lambda f: f.write(payload), fsync=True)


def write_json(path, obj):
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def config_json(config, model, resolved):
    """config.json's content: the `TrainConfig` as given under "requested", every setting at
    the top level as resolved (`resolved`: what the run chose or found, e.g. the step size
    used, the data's binarization), the model's class and the versions that trained it.

    `learning_rate` keeps the request ("auto"); the rate used is `learning_rate_used`.
    """
    requested = jsonable(config)
    return {
        "requested": requested,
        **{k: v for k, v in requested.items() if k != "learning_rate"},
        "learning_rate": config.learning_rate,
        **resolved,
        "model_class": type(model).__name__,
        "keras_aevb_version": __version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }


def history_csv_bytes(rows) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for row in rows:
        writer.writerow(
            [
                int(row["epoch"]),
                int(row["examples_seen"]),
                f"{row['seconds']:.3f}",
                f"{row['train_elbo']:.6f}",
                f"{row['test_elbo']:.6f}",
            ]
        )
    return buffer.getvalue().encode()


def read_history(run_dir):
    """Reads `RUN_DIR/history.csv` into a dict of NumPy arrays, one per column.

    Raises:
        FileNotFoundError: no history.csv in `run_dir`.
        ValueError: the file lacks one of `HISTORY_COLUMNS`.
    """
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"no history.csv in {run_dir}; pass a directory written by `keras-aevb train`"
        )
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in HISTORY_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} lacks the columns {missing}; is it a keras-aevb history?")
        rows = list(reader)
    return {
        column: np.array([float(row[column]) for row in rows], dtype=np.float64)
        for column in HISTORY_COLUMNS
    }


class Unresumable(ValueError):
    """A run directory whose files cannot be resumed (the CLI: one line, exit status 2)."""

    def __init__(self, run_dir, problem):
        super().__init__(
            f"{problem}: {run_dir} holds a run that cannot be resumed; pass a new --output to "
            "start fresh"
        )


def read_previous_run(run_dir: Path):
    """`(config, state)` of an earlier run in `run_dir`; `(None, None)` if it is empty/new.

    Every file a resume reads is checked here, before anything is written: config.json and
    checkpoints/state.json parse to what this version writes, the weights file state.json
    names is a whole HDF5 file, and a history.csv with epochs in it has a checkpoint. A run
    killed before its first checkpoint (config.json alone, or with a history.csv of no rows)
    starts again; temporary files and the lock file are not part of a run.

    Raises:
        ValueError: `run_dir` is a file, holds files but no keras-aevb run, or holds a run
            whose files are missing or damaged (the message names the file).
    """
    if not run_dir.exists():
        return None, None
    if not run_dir.is_dir():
        raise ValueError(f"--output {run_dir} is a file; pass a directory")
    names = {p.name for p in run_dir.iterdir() if not _io.is_scratch_file(p.name)}
    config_path = run_dir / "config.json"
    checkpoint_dir = run_dir / "checkpoints"
    if "config.json" not in names:
        if names & {"history.csv", "checkpoints", "model.keras"}:
            raise Unresumable(run_dir, f"{config_path} is missing")
        if names:
            raise ValueError(
                f"--output {run_dir} holds files but no keras-aevb run (no config.json); "
                "pass a new or empty directory"
            )
        return None, None
    config = _read_json(config_path, run_dir)
    if not (
        isinstance(config, dict)
        and isinstance(config.get("requested"), dict)
        and _is_number(config.get("learning_rate_used"))
        and isinstance(config.get("examples_per_epoch"), int)
    ):
        raise Unresumable(run_dir, f"{config_path} is not a keras-aevb config")
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise Unresumable(run_dir, f"{checkpoint_dir} is not a directory")
    state_path = checkpoint_dir / "state.json"
    if not state_path.exists():
        epochs = _history_epochs(run_dir / "history.csv", run_dir)
        if epochs or "model.keras" in names:
            missing = state_path if checkpoint_dir.is_dir() else checkpoint_dir
            held = f"{run_dir}/history.csv holds {epochs} epochs" if epochs else "model.keras"
            raise Unresumable(run_dir, f"{missing} is missing, but {held}")
        return config, None
    state = _read_json(state_path, run_dir)
    if not _is_state(state):
        raise Unresumable(run_dir, f"{state_path} is not a keras-aevb checkpoint state")
    weights = checkpoint_dir / state["weights"]
    if not weights.is_file():
        raise Unresumable(run_dir, f"{weights} is missing (named by {state_path})")
    if not _is_whole_hdf5(weights):
        raise Unresumable(run_dir, f"{weights} is not a readable weights file")
    return config, state


def _read_json(path, run_dir):
    try:
        return json.loads(path.read_bytes())
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise Unresumable(run_dir, f"{path} is not valid JSON") from None
    except OSError as e:
        raise Unresumable(run_dir, f"{path} cannot be read ({e.strerror})") from None


def _is_number(value):
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_state(state):
    """Whether `state` is what RunRecorder commits: epoch k >= 1, rows 1..k, a weights name."""
    if not isinstance(state, dict):
        return False
    epoch, weights, rows = state.get("epoch"), state.get("weights"), state.get("history")
    return (
        isinstance(epoch, int)
        and epoch >= 1
        and isinstance(weights, str)
        and re.fullmatch(r"epoch-\d{6}\.weights\.h5", weights) is not None
        and isinstance(rows, list)
        and len(rows) == epoch
        and all(
            isinstance(row, dict)
            and set(HISTORY_COLUMNS) <= set(row)
            and all(_is_number(row[k]) for k in HISTORY_COLUMNS)
            and row["epoch"] == i
            for i, row in enumerate(rows, 1)
        )
    )


def _history_epochs(path, run_dir):
    """The rows of history.csv (0 if it is missing)."""
    if not path.exists():
        return 0
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        raise Unresumable(run_dir, f"{path} cannot be read") from None
    if not lines or lines[0].split(",") != list(HISTORY_COLUMNS):
        raise Unresumable(run_dir, f"{path} is not a keras-aevb history")
    return len(lines) - 1


def _is_whole_hdf5(path):
    """Whether every dataset of an HDF5 file reads (a truncated file fails at open or read)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            datasets = []
            f.visititems(lambda _, item: datasets.append(item) if hasattr(item, "dtype") else None)
            for dataset in datasets:
                dataset[()]
    except (OSError, RuntimeError, ValueError, KeyError):
        return False
    return True


def save_model(model, path):
    """The `.keras` archive, written by Keras into the temporary file of an atomic write."""
    atomic_write(path, lambda f: _keras_saving_lib().save_model(model, f), fsync=True)


def save_weights(model, path):
    """`model.save_weights(path)` (model and optimizer), as one atomic write.

    Keras writes the HDF5 file into memory and the bytes go through `atomic_write`: HDF5 never
    writes to the run directory itself. When it did, a full disk made HDF5 fail to close the
    file, and HDF5's exit handler then crashed the process on the open objects (segmentation
    fault in H5VL_set_vol_wrapper from H5_term_library, seen on a 2 MB tmpfs).
    """
    saving_lib = _keras_saving_lib()
    buffer = io.BytesIO()
    store = saving_lib.H5IOStore(buffer, mode="w")
    saving_lib._save_state(
        model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set()
    )
    store.close()
    payload = buffer.getvalue()
    write_bytes(path, payload)


def _keras_saving_lib():
    """Keras's saving module: `save_model` and `H5IOStore` take file objects, the public API
    only paths (keras 3.x; tests/test_training.py checks the files load with the public API)."""
    from keras.src.saving import saving_lib

    return saving_lib


def plan_epochs(num_train, config, previous=None):
    """Epochs and epoch length from --epochs / --max-examples / --examples-per-epoch.

    An epoch is one pass over the N training examples unless `examples_per_epoch` says
    otherwise (or `max_examples` < N): then it is a fixed number of steps over a repeated,
    reshuffled stream, and each epoch ends with a test evaluation (a history row).

    A resumed run keeps the epoch length of its config.json (`previous`), however it was
    started: a new --epochs or --max-examples only says how many epochs to reach, so a larger
    budget extends a finished run. An --examples-per-epoch that gives another length is
    refused.

    Returns:
        dict with epochs, examples_per_epoch, steps_per_epoch (None: one pass), repeat.

    Raises:
        ValueError: a resume whose settings give another epoch length, or whose one-pass
            epochs would run over a training set of another size.
    """
    batch = config.batch_size
    if previous is not None:
        examples, steps = int(previous["examples_per_epoch"]), previous.get("steps_per_epoch")
        asked = config.examples_per_epoch
        if asked is not None and asked != examples:
            fresh = plan_epochs(num_train, config)["examples_per_epoch"]
            if fresh != examples:
                raise ValueError(
                    f"{config.output} trains {examples} examples per epoch, "
                    f"--examples-per-epoch {asked} gives {fresh}; resume without "
                    f"--examples-per-epoch (or with {examples}), or pass a new --output"
                )
        if steps is None and previous.get("num_train") not in (None, num_train):
            raise ValueError(
                f"{config.output} was trained in passes over {previous['num_train']} examples, "
                f"these data have {num_train}; resume with the same data, or pass a new --output"
            )
    else:
        per_epoch = config.examples_per_epoch or num_train
        if config.max_examples is not None and config.max_examples < per_epoch:
            per_epoch = config.max_examples
        if per_epoch == num_train:
            steps, examples = None, num_train
        else:
            steps = max(1, per_epoch // batch)
            examples = steps * batch
    if config.max_examples is not None:
        epochs = max(1, config.max_examples // examples)
    else:
        epochs = config.epochs if config.epochs is not None else 10
    return {
        "epochs": int(epochs),
        "examples_per_epoch": int(examples),
        "steps_per_epoch": None if steps is None else int(steps),
        "repeat": steps is not None,
    }
