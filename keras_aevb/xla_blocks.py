"""XLA blocks: consecutive full training batches whose steps run inside one XLA computation.

`make_block_runner` returns `run(iterator, limit)`, which reads up to `limit` batches of the
epoch, stacks them into blocks of equal size and runs each block as one `jit_compile=True`
function over a `tf.while_loop` of the model's `block_step`: XLA fuses the element-wise work of
the step and keeps the weights in place between steps, where TensorFlow's executor runs each
element-wise op as its own pass over memory. The noise of a block's steps is drawn before the
block, outside XLA (XLA's CPU random number generators were measured far slower than
TensorFlow's kernels for these shapes; benchmarks/BENCHMARKS.md), from the same generators in
the same order as step-by-step training draws it, so the same seed trains the same weights
either way. A block that would hold a short or uneven batch (an epoch's last) runs step by step.
"""

import math

import tensorflow as tf

from keras_aevb.data import AddressedBatches

__all__ = ["MAX_BLOCK_BYTES", "bounded_fetch", "make_block_runner"]

# Largest block of stacked input batches: bounds the extra memory of XLA blocks (the paper's
# M = 100 MNIST batches are 0.31 MB, so a 100-step execution is one 31 MB block; larger batches
# are split into more, smaller blocks per execution).
MAX_BLOCK_BYTES = 64 * 2**20


def bounded_fetch(iterator, limit):
    """`fetch(steps)`: the next element as an Optional, or an empty one once `limit` is reached.

    Never reads past the limit: an element read and not trained on would be lost to the epoch.
    """
    empty = tf.experimental.Optional.empty(iterator.element_spec)
    return lambda steps: tf.cond(steps < limit, iterator.get_next_as_optional, lambda: empty)


def make_block_runner(model, one_step, block_step, draw_noise):
    """`run(iterator, limit, table=None, batch_spec=None)`: up to `limit` training steps.

    Args:
        model: the model (its metric logs start the loop).
        one_step: the compiled single step, for batches that do not fill a block.
        block_step: `(x, noise) -> logs`, one step on a full batch with its noise given.
        draw_noise: `(steps, batch_size) -> noise`, a tensor or nest of tensors with a leading
            axis of `steps`, drawn outside XLA.
    `table`, `batch_spec`: the iterator yields addresses of `AddressedBatches` batches, built
    next to the steps (`keras_aevb.data.AddressedBatches`).
    """

    @tf.function(jit_compile=True, reduce_retracing=True)
    def xla_block(xs, noise):
        def at(k):
            return tf.nest.map_structure(lambda n: n[k], noise)

        # The logs of the last step are the trackers' running means after it.
        logs = block_step(xs[0], at(0))
        _, logs = tf.while_loop(
            lambda k, logs: k < tf.shape(xs)[0],
            lambda k, logs: (k + 1, block_step(xs[k], at(k))),
            (tf.constant(1), logs),
        )
        return logs

    @tf.function(reduce_retracing=True)
    def run(iterator, limit, table=None, batch_spec=None):
        spec = tf.nest.flatten(iterator.element_spec)[0]
        first = tf.nest.flatten(iterator.get_next())[0]  # OutOfRangeError ends the epoch
        batches = _Batches(first, spec, table, batch_spec)
        block_size = _block_size(batches.batch_bytes, limit)
        fetch = bounded_fetch(iterator, limit)

        def step_by_step(read, count, logs):
            _, logs = tf.while_loop(
                lambda i, logs: i < count,
                lambda i, logs: (i + 1, one_step(batches.one(read.read(i)))),
                (tf.constant(0), logs),
            )
            return logs

        def outer_body(done, logs, pending):
            n, read, full = _collect(spec, batches.is_full, fetch, done, pending,
                                     tf.minimum(block_size, limit - done), block_size)  # fmt: skip
            logs = tf.cond(
                full,
                lambda: xla_block(batches.block(read), draw_noise(n, batches.batch_size)),
                lambda: step_by_step(read, n, logs),
            )
            done = done + n
            return done, logs, fetch(done)

        pending = tf.experimental.Optional.from_value(
            tf.nest.pack_sequence_as(iterator.element_spec, [first])
        )
        _, logs, _ = tf.while_loop(
            lambda done, logs, pending: pending.has_value(),
            outer_body,
            (tf.constant(0), model.metric_logs(training=True), pending),
        )
        return logs

    return run


class _Batches:
    """What the iterator's elements are: batches themselves, or addresses of batches."""

    def __init__(self, first, spec, table, batch_spec):
        if batch_spec is None:
            self.batch_bytes = tf.size(first, tf.int64) * spec.dtype.size
            self.batch_size = tf.shape(first)[0]
            self.block = lambda read: read.stack()
            self.one = lambda element: element
            self.is_full = lambda x: tf.equal(tf.shape(x)[0], self.batch_size)
        else:
            source = AddressedBatches(table, batch_spec)
            values = batch_spec.batch_size * math.prod(batch_spec.event_shape)
            self.batch_bytes = tf.constant(values * 4, tf.int64)
            self.batch_size = tf.constant(batch_spec.batch_size)
            self.block = lambda read: source.materialize(read.stack())
            self.one = source.materialize_one
            self.is_full = source.is_full


def _block_size(batch_bytes, limit):
    """Steps per block: as few equal blocks per execution as `MAX_BLOCK_BYTES` allows, so
    every block of the execution compiles to one shape."""
    total = tf.cast(batch_bytes, tf.float64) * tf.cast(limit, tf.float64)
    blocks = tf.maximum(tf.cast(tf.math.ceil(total / MAX_BLOCK_BYTES), tf.int32), 1)
    return (limit + blocks - 1) // blocks


def _collect(spec, is_full, fetch, done, pending, size, block_size):
    """Reads up to `size` elements, starting with `pending` (which has a value).

    Returns `(n, elements as a TensorArray, whether they fill a block of full batches)`.
    """
    read = tf.TensorArray(
        spec.dtype, size=0, dynamic_size=True, infer_shape=False, element_shape=spec.shape
    )

    def body(n, read, uniform, element):
        x = tf.nest.flatten(element.get_value())[0]
        uniform = uniform & is_full(x)
        n = n + 1
        empty = tf.experimental.Optional.empty(element.element_spec)
        nxt = tf.cond(n < size, lambda: fetch(done + n), lambda: empty)
        return n, read.write(n - 1, x), uniform, nxt

    n, read, uniform, _ = tf.while_loop(
        lambda n, read, uniform, element: element.has_value(),
        body,
        (tf.constant(0), read, tf.constant(True), pending),
    )
    return n, read, uniform & tf.equal(n, block_size)
