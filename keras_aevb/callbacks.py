"""The callbacks of a training run and the bound as they measure it.

`RunRecorder` commits each epoch to the run directory (history row, weights, state.json: a kill
at any instant loses at most the epoch in progress); `ImageSummaries` writes sample and
reconstruction grids for TensorBoard; `EventFilesCheck` keeps TensorBoard's event files whole
under a full disk or a kill. `evaluate_bound` and `bound_divergence` are the bound that the
recorder and the step-size search (`keras_aevb.step_size`) read, and the one rule by which a
bound means divergence.
"""

from __future__ import annotations

import math
import os
import struct
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from keras_aevb import _io
from keras_aevb import data as data_lib
from keras_aevb.run_dir import history_csv_bytes, save_weights, write_bytes, write_json

__all__ = [
    "EventFilesCheck",
    "ImageSummaries",
    "RunRecorder",
    "bound_divergence",
    "evaluate_bound",
    "tensorboard_callbacks",
]


def evaluate_bound(model, x, batch_size=100):
    """The model's bound (its `elbo` metric, nats per datapoint) on a fixed array `x`."""
    dataset = data_lib.make_dataset(x, batch_size, "none", shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # grey-value warnings were given already
        return float(model.evaluate(dataset, verbose=0, return_dict=True)["elbo"])


def bound_divergence(bound, decoder):
    """Why a reported bound means that training diverged, or None where the value is possible.

    The one rule of the step-size search (`select_learning_rate`) and of the divergence check
    of `train` (`RunRecorder`): a bound that is NaN or infinite, or above the largest
    log-likelihood the decoder can give (`decoder.max_log_likelihood`: 0 nats for a Bernoulli
    decoder, whose log p(x|z) is a log probability; None: no ceiling known), since
    ELBO <= log p(x) <= that maximum. A bound above it is not a good bound but a wrong one
    (DESIGN 9: a posterior whose log q did not describe its samples reported +1e20 nats on
    binary data, and a search that picks the best bound picked that step size).

    Args:
        bound: the bound in nats per datapoint.
        decoder: the model's decoder (anything with an optional `max_log_likelihood`).

    Returns:
        None, or a sentence naming the problem (for error messages).
    """
    bound = float(bound)
    if not math.isfinite(bound):
        return f"the bound is {bound}"
    ceiling = getattr(decoder, "max_log_likelihood", None)
    if ceiling is not None and bound > ceiling:
        return (
            f"the bound is {bound:.6g} nats, above {ceiling:g}, the largest log-likelihood a "
            f"{type(decoder).__name__} can give: an impossible value"
        )
    return None


class RunRecorder(keras.callbacks.Callback):
    """Writes history.csv and the resumable checkpoint at the end of every epoch.

    Per epoch, in this order: the history row is appended (train bound from fit's logs, test
    bound from its validation logs), the weights (model + optimizer) go to a new file in
    `checkpoints/`, `checkpoints/state.json` is replaced atomically (the commit point: epoch,
    weights file, all history rows), history.csv is rewritten atomically from those rows, and
    the previous weights file is deleted. A kill at any instant leaves a consistent state.

    Epochs whose training bound is NaN are neither recorded nor checkpointed, and stop training
    (like `TerminateOnNaN`); `train` then reports the divergence.

    Args:
        run_dir: the run directory.
        rows: history rows of the epochs already done (from the checkpoint), in order.
        examples_per_epoch: training examples per epoch.
        state_extra: JSON-able dict stored in state.json (e.g. the chosen learning rate).
        write: False on non-chief workers: record, write nothing.
        train_eval_x: fixed training examples on which `train_elbo` is measured at the end of
            each epoch; None: fit's running mean over the epoch's minibatches.
        batch_size: batch size of that evaluation.
    """

    def __init__(
        self,
        run_dir,
        rows,
        examples_per_epoch,
        state_extra=None,
        write=True,
        train_eval_x=None,
        batch_size=100,
    ):
        super().__init__()
        self.train_eval_x = train_eval_x
        self.batch_size = int(batch_size)
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.rows = [dict(r) for r in rows]
        self.examples_per_epoch = int(examples_per_epoch)
        self.state_extra = dict(state_extra or {})
        self.write = write
        self.seconds_offset = float(self.rows[-1]["seconds"]) if self.rows else 0.0
        self.train_seconds = 0.0  # this invocation's time in training steps, no evaluation
        self.epochs_run = 0
        self.diverged_at = None
        self.diverged_reason = None  # bound_divergence's sentence for that epoch
        self._start = self._epoch_start = None
        self._in_epoch = False

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._in_epoch = True

    def on_test_begin(self, logs=None):
        # fit's validation runs the callbacks' test hooks: the epoch's training ends here.
        if self._in_epoch:
            self.train_seconds += time.perf_counter() - self._epoch_start
            self._in_epoch = False

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self._in_epoch:  # no validation ran
            self.train_seconds += time.perf_counter() - self._epoch_start
            self._in_epoch = False
        train_elbo = float(logs.get("elbo", float("nan")))
        if self.train_eval_x is not None and math.isfinite(train_elbo):
            # The bound at the end of the epoch, like the test bound: fit's `elbo` is the mean
            # over the epoch's steps and lags behind the model it reports on.
            train_elbo = evaluate_bound(self.model, self.train_eval_x, self.batch_size)
        test_elbo = float(logs.get("val_elbo", float("nan")))
        self.diverged_reason = bound_divergence(train_elbo, getattr(self.model, "decoder", None))
        if self.diverged_reason:
            self.diverged_at = epoch + 1
            self.model.stop_training = True
            return
        row = {
            "epoch": epoch + 1,
            "examples_seen": (epoch + 1) * self.examples_per_epoch,
            "seconds": self.seconds_offset + time.perf_counter() - self._start,
            "train_elbo": train_elbo,
            "test_elbo": test_elbo,
        }
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        self.epochs_run += 1
        if self.write:
            self._commit(epoch + 1)

    def _commit(self, epoch):
        with _io.no_space_guard(self.checkpoint_dir):
            self.checkpoint_dir.mkdir(exist_ok=True)
        name = f"epoch-{epoch:06d}.weights.h5"
        save_weights(self.model, self.checkpoint_dir / name)
        state = dict(self.state_extra, epoch=epoch, weights=name, history=self.rows)
        write_json(self.checkpoint_dir / "state.json", state)  # the commit point
        write_bytes(self.run_dir / "history.csv", history_csv_bytes(self.rows))
        for old in sorted(self.checkpoint_dir.glob("*.weights.h5")):
            if old.name != name:
                _io.remove(old)  # replaced: state.json names the new file


class ImageSummaries(keras.callbacks.Callback):
    """TensorBoard summaries once per epoch: image grids (samples from p(z), test
    reconstructions) and the posterior-collapse diagnostics of `keras_aevb.diagnostics` on the
    first `num_diagnostic` test examples (scalars `latent/active_units` and
    `latent/mutual_information`, histogram `latent/kl_per_dimension`).

    Nothing here draws from the model's own random generators (fixed seeds only), so a run with
    summaries trains exactly as one without.
    """

    def __init__(
        self, log_dir, test_x, num_samples=64, num_reconstructions=16, seed=0, num_diagnostic=1000
    ):
        super().__init__()
        self.log_dir = str(log_dir)
        self.test_x = np.asarray(test_x[:num_reconstructions], np.float32)
        self.diagnostic_x = np.asarray(test_x[:num_diagnostic], np.float32)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        from keras_aevb import diagnostics
        from keras_aevb.plotting import image_grid, reconstruction_grid

        samples = image_grid(np.asarray(self.model.sample(self.num_samples, seed=self.seed)))
        reconstructions = reconstruction_grid(self.model, self.test_x, cols=8)
        try:
            report = diagnostics.latent_report(self.model, self.diagnostic_x)
        except ValueError:  # a posterior or prior that is not a product of scalars
            report = None
        # Creating the events file writes its first record, and raises on a full disk (later
        # writes fail silently: EventFilesCheck reads them back).
        with _io.no_space_guard(self.log_dir):
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self.log_dir)
            with self._writer.as_default():
                for name, grid in (("samples", samples), ("reconstructions", reconstructions)):
                    tf.summary.image(name, grid[None, :, :, None], step=epoch + 1)
                if report is not None:
                    step = epoch + 1
                    tf.summary.scalar("latent/active_units", report["active_units"], step=step)
                    tf.summary.scalar(
                        "latent/mutual_information", report["mutual_information"], step=step
                    )
                    tf.summary.histogram(
                        "latent/kl_per_dimension", report["kl_per_dimension"], step=step
                    )
            self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class EventFilesCheck(keras.callbacks.Callback):
    """Makes TensorBoard's writes of a run fail loudly and leave whole files.

    TensorFlow's summary writer loses events silently when the disk is full: its flush
    succeeds and the events file ends in a torn record (measured on a full tmpfs). Listed after
    the TensorBoard callbacks, this flushes their writers at the end of every epoch (one write
    point each), then reads what was added to each events file: whole TFRecord frames (length,
    CRC, data, CRC). A torn or missing write closes the writers, cuts the file back to its last
    whole record and raises `DiskFullError` naming it. `repair()` does the same after any
    failure of the run, and at the start for the files of earlier invocations.

    Args:
        writers: a function returning `[(log directory, tf.summary writer)]`, in order.
    """

    def __init__(self, log_dir, writers):
        super().__init__()
        self.log_dir = Path(log_dir)
        self.writers = writers
        self.checked = {}  # events file -> bytes verified as whole records

    def on_train_begin(self, logs=None):
        for path in sorted(self.log_dir.rglob("events.out.tfevents.*")):
            self.checked[path] = _whole_records(path)
            if self.checked[path] < path.stat().st_size:
                with _io.no_space_guard(path):
                    os.truncate(path, self.checked[path])

    def on_epoch_end(self, epoch, logs=None):
        for directory, writer in self.writers():
            path = self._events_file(directory)
            try:
                with _io.no_space_guard(path or directory):
                    _io.fault_point(path or directory, "events")
                    writer.flush()
                    path = path or self._events_file(directory)
                    if path is not None:
                        self._check(path)
            except BaseException:
                self.repair()
                raise

    def on_train_end(self, logs=None):
        for path in list(self.checked):
            self._check(path, grown=False)

    def _events_file(self, directory):
        """This run's newest events file in `directory` (TensorFlow names them by time)."""
        files = [p for p in Path(directory).glob("events.out.tfevents.*") if p.is_file()]
        new = [p for p in files if p not in self.checked] or [p for p in files if p in self.checked]
        return max(new, key=lambda p: p.stat().st_mtime_ns) if new else None

    def _check(self, path, grown=True):
        before = self.checked.get(path, 0)
        whole = _whole_records(path, before)
        size = path.stat().st_size
        if whole < size or (grown and size == before and _free_bytes(path) < 2**20):
            self.checked[path] = whole
            raise _io.DiskFullError(path)
        self.checked[path] = whole

    def repair(self):
        """Closes the writers and cuts every events file back to its whole records."""
        for _, writer in self.writers():
            try:
                writer.close()
            except Exception:  # noqa: BLE001 (a full disk fails the close too; the file is cut below)
                pass
        for path in sorted(self.log_dir.rglob("events.out.tfevents.*")):
            whole = _whole_records(path, self.checked.get(path, 0))
            if whole < path.stat().st_size:
                os.truncate(path, whole)


def tensorboard_callbacks(log_dir, test_x, seed):
    """A run's TensorBoard callbacks: Keras's scalars (logs/train, logs/validation), the
    image grids (logs/images) and the check that keeps their event files whole.

    Returns:
        `(callbacks, events_check)`.
    """
    log_dir = Path(log_dir)
    board = keras.callbacks.TensorBoard(
        log_dir=str(log_dir), write_graph=False, update_freq="epoch"
    )
    images = ImageSummaries(log_dir / "images", test_x, seed=seed)
    # Keras's TensorBoard writes logs/train and logs/validation through `_writers`.
    tb_dirs = {"train": log_dir / "train", "val": log_dir / "validation"}

    def writers():
        found = [(Path(tb_dirs[k]), w) for k, w in board._writers.items() if k in tb_dirs]
        return found + ([(Path(images.log_dir), images._writer)] if images._writer else [])

    events_check = EventFilesCheck(log_dir, writers)
    return [board, images, events_check], events_check


def _whole_records(path, offset=0):
    """The length of the prefix of a TFRecord file made of whole frames, from `offset` on."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        while offset + 12 <= size:
            f.seek(offset)
            (length,) = struct.unpack("<Q", f.read(8))
            end = offset + 12 + length + 4
            if end > size:
                break
            offset = end
    return offset


def _free_bytes(path):
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize
