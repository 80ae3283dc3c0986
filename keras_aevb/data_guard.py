"""The data check of keras_aevb's executions: the first bad batch, recorded inside the step.

XLA drops assertions, so a compiled step cannot raise on a batch of NaN or of values outside
the decoder's support. Each step of an execution records its batch's statistics instead (a
variable update, which XLA keeps); after the execution, the execution function restores the
state it had before the execution and raises `DataError` naming the batch
(`keras_aevb.execution.make_execution_function`).
"""

import tensorflow as tf

from keras_aevb._cache import model_cache
from keras_aevb._io import DataError
from keras_aevb.inputs import statistics_error

__all__ = ["DataGuard", "active_guard", "data_guard", "raise_data_error"]


class DataGuard:
    """Records the first batch of an execution whose data the model refuses (keras_aevb.inputs).

    Each step of an execution calls `record` with its batch's statistics (in the compiled step,
    XLA blocks included). After the execution, `failure()` says which step failed.
    """

    def __init__(self):
        self.steps = tf.Variable(0, dtype=tf.int32, trainable=False, name="guard_steps")
        # [step of the first bad batch (-1: none), its sum, min and max]
        self.first = tf.Variable([-1.0, 0.0, 0.0, 0.0], trainable=False, name="guard_first")
        self.active = False  # read when a step is traced: whether it runs in an execution here

    def reset(self):
        self.steps.assign(0)
        self.first.assign([-1.0, 0.0, 0.0, 0.0])

    def record(self, bad, statistics):
        step = tf.cast(self.steps.assign_add(1), tf.float32) - 1.0
        first = self.first.read_value()
        entry = tf.concat([tf.reshape(step, [1]), tf.cast(statistics, tf.float32)], axis=0)
        self.first.assign(tf.where((first[0] < 0.0) & bad, entry, first))

    def failure(self):
        """`(step in the execution, statistics)` of the first bad batch, or None."""
        first = self.first.numpy()
        return None if first[0] < 0 else (int(first[0]), first[1:])


def data_guard(model):
    """The model's `DataGuard` (created once, outside any function; not saved with the model)."""
    cache = model_cache(model, "execution")
    if "data_guard" not in cache:
        with tf.init_scope():
            cache["data_guard"] = DataGuard()
    return cache["data_guard"]


def active_guard(model):
    """The guard of the execution being traced or run, or None (Keras's own loops)."""
    guard = model_cache(model, "execution").get("data_guard")
    return guard if guard is not None and guard.active else None


def raise_data_error(decoder, state, mode, step, statistics):
    """Raises `DataError` for the `step`-th batch of the execution that `state` describes.

    `state`: the model's execution state (where the execution began in its epoch, and whether
    a `fit` is running, so validation batches are named as such).
    """
    batch = state.get(f"{mode}_begin", 0) + step + 1
    if mode == "train":
        where = f"batch {batch} of epoch {state.get('epoch', 0) + 1}"
        undone = "the weights are as they were before this execution's first step"
    else:
        where = f"batch {batch} of {'the validation data' if state.get('fitting') else 'evaluate'}"
        undone = "nothing was changed"
    raise DataError(f"{where}: {statistics_error(decoder, statistics)} ({undone}).")
