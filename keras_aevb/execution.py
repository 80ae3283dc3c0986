"""How `AEVB.fit` and `AEVB.evaluate` run their steps: many per call, exactly as many as asked.

Keras calls a model's train function once per "execution" of `steps_per_execution` steps. At
the paper's minibatch (M = 100) a step of the MNIST model is a few milliseconds on a CPU, so
what runs around the steps matters as much as the steps (benchmarks/BENCHMARKS.md):

- `make_execution_function` builds a lean loop: one `tf.function` call runs up to `limit`
  steps, each on the iterator's next element, with no `tf.cond` around the step (Keras 3's own
  loop wraps every step in one and in `tf.experimental.Optional`s, measured slower).
- With `xla_blocks`, consecutive full batches are stacked into blocks and each block's steps
  run inside one XLA computation (`jit_compile=True` over a `tf.while_loop` of steps): XLA
  fuses the element-wise work of the step and keeps the weights in place between steps, where
  TensorFlow's executor runs each element-wise op as its own pass over memory. The noise
  eps ~ p(eps) of the block's steps is drawn before the block, outside XLA: XLA's CPU random
  number generators were measured an order of magnitude slower than TensorFlow's kernels for
  these shapes.
  A block that would hold a short or uneven batch (an epoch's last) runs step by step.
- `limit` comes from `ExecutionCursor`, so an execution never runs past `steps_per_epoch` or
  `evaluate(steps=...)`: Keras alone runs whole executions, which trains more steps than asked
  whenever `steps_per_execution` does not divide them.

Only models on the default (single-device) strategy take these paths; under a `tf.distribute`
strategy with several replicas Keras's own functions run (`AEVB.make_train_function`).
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_aevb._cache import model_cache

__all__ = [
    "DataGuard",
    "ExecutionCursor",
    "MAX_BLOCK_BYTES",
    "active_guard",
    "data_guard",
    "execution_limit",
    "make_execution_function",
    "steps_in",
    "training_state",
]

# Largest block of stacked input batches: bounds the extra memory of `xla_blocks` (the paper's
# M = 100 MNIST batches are 0.31 MB, so a 100-step execution is one 31 MB block; larger batches
# are split into more, smaller blocks per execution).
MAX_BLOCK_BYTES = 64 * 2**20


class DataGuard:
    """Records the first batch of an execution whose data the model refuses (keras_aevb.inputs).

    Each step of an execution calls `record` with its batch's statistics (in the compiled step,
    XLA blocks included: a variable update, no assertion, which XLA would drop). After the
    execution, `failure()` says which step failed; the execution function then restores the
    state it had before the execution and raises `DataError` naming the batch.
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


def training_state(model):
    """Everything a training execution changes: weights, optimizer, noise generators' states."""
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        variables += list(optimizer.variables)
    # Monte Carlo EM's recognition model has an optimizer of its own.
    recognition = getattr(model, "recognition_optimizer", None)
    if recognition is not None:
        variables += list(recognition.variables)
    unique = {id(v): v for v in variables}
    return list(unique.values())


class ExecutionCursor(keras.callbacks.Callback):
    """Tells the model's execution functions where in the epoch each execution starts.

    Keras passes `on_*_batch_begin` the index of the first step of the execution it is about
    to run; with the epoch's step count (`steps_per_epoch`, `evaluate(steps=...)`) that bounds
    the execution.
    """

    def __init__(self, state):
        super().__init__()
        self.state = state

    def on_epoch_begin(self, epoch, logs=None):
        self.state["train_begin"] = 0
        self.state["epoch"] = int(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        self.state["train_begin"] = int(batch)

    def on_test_begin(self, logs=None):
        self.state["test_begin"] = 0

    def on_test_batch_begin(self, batch, logs=None):
        self.state["test_begin"] = int(batch)


def execution_limit(state, mode, steps_per_execution):
    """Steps the next execution may run: `steps_per_execution`, or fewer at the epoch's end."""
    total = state.get(f"{mode}_steps")
    if total is None:
        return int(steps_per_execution)
    return int(max(1, min(steps_per_execution, total - state.get(f"{mode}_begin", 0))))


def make_execution_function(model, step_function, mode, jit_step=False, block=None):
    """Returns `function(iterator) -> logs` for Keras's fit/evaluate loops.

    Args:
        model: the model (its `steps_per_execution` and `_execution_state` are read per call).
        step_function: `train_step` or `test_step`.
        mode: "train" or "test" (which count of `_execution_state` bounds the execution).
        jit_step: compile each single step with XLA (Keras's `jit_compile=True`).
        block: None, or `(block_step, draw_noise)` for XLA blocks: `block_step(x, eps)` runs one
            training step on batch x with noise eps and returns the logs;
            `draw_noise(steps, batch_size)` draws eps `[steps, L, batch_size, latent_dim]`
            outside XLA.
    """
    one_step = tf.function(step_function, reduce_retracing=True, jit_compile=bool(jit_step))

    @tf.function(reduce_retracing=True)
    def run_steps(iterator, limit):
        # The first step may raise OutOfRangeError: Keras's epoch iterator ends the epoch on it.
        logs = one_step(iterator.get_next())
        fetch = _bounded_fetch(iterator, limit)

        def body(steps, logs, next_element):
            return steps + 1, one_step(next_element.get_value()), fetch(steps + 1)

        _, logs, _ = tf.while_loop(
            lambda steps, logs, next_element: next_element.has_value(),
            body,
            (tf.constant(1), logs, fetch(tf.constant(1))),
        )
        return logs

    run_blocks = _make_block_runner(model, one_step, *block) if block else None

    guard = data_guard(model)

    def run(iterator):
        if not isinstance(iterator, tf.data.Iterator | tf.distribute.DistributedIterator):
            # train_on_batch / test_on_batch pass a Python generator of one batch.
            logs = None
            for data in iterator:
                logs = one_step(data)
            return logs
        limit = execution_limit(model._execution_state, mode, model.steps_per_execution)
        if run_blocks is not None and _single_tensor(iterator.element_spec):
            source = model._execution_state.get("train_source") if mode == "train" else None
            if source is not None:
                return run_blocks(iterator, tf.constant(limit), source.table, source.spec)
            return run_blocks(iterator, tf.constant(limit))
        return run_steps(iterator, tf.constant(limit))

    def function(iterator):
        # The state to restore if a batch of this execution holds bad data: copies (DeepCopy),
        # since XLA and the fused optimizer kernels may update a variable's buffer in place.
        saved = None
        if mode == "train":
            optimizer = getattr(model, "optimizer", None)
            if optimizer is not None and not optimizer.built:
                optimizer.build(model.trainable_variables)  # its state is saved too
            variables = training_state(model)
            saved = [tf.raw_ops.DeepCopy(x=tf.convert_to_tensor(v)) for v in variables]
        guard.reset()
        guard.active = True
        try:
            logs = run(iterator)
        finally:
            guard.active = False
        failure = guard.failure()
        if failure is not None:
            if saved is not None:
                for variable, value in zip(variables, saved, strict=True):
                    variable.assign(value)
            _raise_data_error(model, mode, *failure)
        return logs

    return function


def _raise_data_error(model, mode, step, statistics):
    from keras_aevb.data import DataError
    from keras_aevb.inputs import statistics_error

    state = model._execution_state
    batch = state.get(f"{mode}_begin", 0) + step + 1
    if mode == "train":
        where = f"batch {batch} of epoch {state.get('epoch', 0) + 1}"
        undone = "the weights are as they were before this execution's first step"
    else:
        where = f"batch {batch} of {'the validation data' if state.get('fitting') else 'evaluate'}"
        undone = "nothing was changed"
    message = statistics_error(model.decoder, statistics)
    raise DataError(f"{where}: {message} ({undone}).")


def _bounded_fetch(iterator, limit):
    """`fetch(steps)`: the next element as an Optional, or an empty one once `limit` is reached.

    Never reads past the limit: an element read and not trained on would be lost to the epoch.
    """
    empty = tf.experimental.Optional.empty(iterator.element_spec)
    return lambda steps: tf.cond(steps < limit, iterator.get_next_as_optional, lambda: empty)


def _single_tensor(element_spec):
    specs = tf.nest.flatten(element_spec)
    return len(specs) == 1 and isinstance(specs[0], tf.TensorSpec)


def _make_block_runner(model, one_step, block_step, draw_noise):
    """`run(iterator, limit)`: up to `limit` training steps, in XLA blocks of full batches."""

    @tf.function(jit_compile=True, reduce_retracing=True)
    def xla_block(xs, eps):
        # The logs of the last step are the trackers' running means after it.
        logs = block_step(xs[0], eps[0])
        _, logs = tf.while_loop(
            lambda k, logs: k < tf.shape(xs)[0],
            lambda k, logs: (k + 1, block_step(xs[k], eps[k])),
            (tf.constant(1), logs),
        )
        return logs

    @tf.function(reduce_retracing=True)
    def run(iterator, limit, table=None, batch_spec=None):
        """`table`, `batch_spec`: the iterator yields addresses of `AddressedBatches` batches."""
        spec = tf.nest.flatten(iterator.element_spec)[0]
        first = tf.nest.flatten(iterator.get_next())[0]  # OutOfRangeError ends the epoch
        if batch_spec is None:
            batch_bytes = tf.size(first, tf.int64) * spec.dtype.size
            batch_size = tf.shape(first)[0]

            def is_full(x):
                return tf.equal(tf.shape(x)[0], batch_size)

            def block_of(batches):
                return batches.stack()

            def batch_of(element):
                return element
        else:
            from keras_aevb.data import AddressedBatches

            source = AddressedBatches(table, batch_spec)
            batch_bytes = tf.constant(
                batch_spec.batch_size * math.prod(batch_spec.event_shape) * 4, tf.int64
            )
            batch_size = tf.constant(batch_spec.batch_size)
            is_full = source.is_full

            def block_of(addresses):
                return source.materialize(addresses.stack())

            batch_of = source.materialize_one
        # Blocks per execution, then equal block sizes, so every block compiles to one shape.
        blocks = tf.maximum(
            tf.cast(
                tf.math.ceil(
                    tf.cast(batch_bytes, tf.float64) * tf.cast(limit, tf.float64) / MAX_BLOCK_BYTES
                ),
                tf.int32,
            ),
            1,
        )
        block_size = (limit + blocks - 1) // blocks
        fetch = _bounded_fetch(iterator, limit)

        def step_by_step(batches, count, logs):
            _, logs = tf.while_loop(
                lambda i, logs: i < count,
                lambda i, logs: (i + 1, one_step(batch_of(batches.read(i)))),
                (tf.constant(0), logs),
            )
            return logs

        def collect(done, pending):
            """Reads up to block_size batches, starting with `pending` (which has a value)."""
            size = tf.minimum(block_size, limit - done)
            batches = tf.TensorArray(
                spec.dtype,
                size=0,
                dynamic_size=True,
                infer_shape=False,
                element_shape=spec.shape,
            )

            def body(n, batches, uniform, element):
                x = tf.nest.flatten(element.get_value())[0]
                uniform = uniform & is_full(x)
                n = n + 1
                nxt = tf.cond(n < size, lambda: fetch(done + n), lambda: _empty_like(element))
                return n, batches.write(n - 1, x), uniform, nxt

            n, batches, uniform, _ = tf.while_loop(
                lambda n, batches, uniform, element: element.has_value(),
                body,
                (tf.constant(0), batches, tf.constant(True), pending),
            )
            return n, batches, uniform & tf.equal(n, block_size)

        def outer_body(done, logs, pending):
            n, batches, full = collect(done, pending)
            logs = tf.cond(
                full,
                lambda: xla_block(block_of(batches), draw_noise(n, batch_size)),
                lambda: step_by_step(batches, n, logs),
            )
            done = done + n
            return done, logs, fetch(done)

        logs = model._metric_logs()
        pending = tf.experimental.Optional.from_value(_as_element(first, iterator.element_spec))
        _, logs, _ = tf.while_loop(
            lambda done, logs, pending: pending.has_value(),
            outer_body,
            (tf.constant(0), logs, pending),
        )
        return logs

    return run


def _as_element(tensor, element_spec):
    return tf.nest.pack_sequence_as(element_spec, [tensor])


def _empty_like(optional):
    return tf.experimental.Optional.empty(optional.element_spec)


def steps_in(x, batch_size, steps):
    """The number of steps an epoch over `x` takes, where Keras can know it; else None."""
    if steps is not None:
        return int(steps)
    if isinstance(x, tf.data.Dataset):
        cardinality = int(x.cardinality())
        return cardinality if cardinality >= 0 else None
    first = x[0] if isinstance(x, tuple | list) and x else x
    if hasattr(first, "shape") and len(getattr(first, "shape", ())) > 0:
        return int(np.ceil(first.shape[0] / (batch_size or 32)))
    return None
