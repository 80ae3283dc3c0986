"""How `AEVB.fit` and `AEVB.evaluate` run their steps: many per call, exactly as many as asked.

`Executions` is the part of `AEVB` that is about running steps, not about the model: the
`compile`/`fit`/`evaluate`/`predict` overrides and the train/test functions Keras calls. Keras
calls a model's train function once per "execution" of `steps_per_execution` steps. At the
paper's minibatch (M = 100) a step of the MNIST model is a few milliseconds on a CPU, so what
runs around the steps matters as much as the steps (benchmarks/BENCHMARKS.md):

- `make_execution_function` builds a lean loop: one `tf.function` call runs up to `limit`
  steps, each on the iterator's next element, with no `tf.cond` around the step (Keras 3's own
  loop wraps every step in one and in `tf.experimental.Optional`s, measured slower).
- XLA blocks (`keras_aevb.xla_blocks`): consecutive full batches run inside one XLA
  computation. A model takes part by declaring its step as blocks run it: `block_step()`, a
  function `(x, noise) -> logs`, and `step_noise(batch_size)`, the random draws of one step
  from the model's generators (AEVB: eps ~ p(eps)), which blocks draw before the block, in the
  order step-by-step training draws them. A subclass with a `train_step` of its own trains step
  by step unless it declares its block step too.
- `limit` comes from `ExecutionCursor`, so an execution never runs past `steps_per_epoch` or
  `evaluate(steps=...)`: Keras alone runs whole executions, which trains more steps than asked
  whenever `steps_per_execution` does not divide them.
- Every batch is checked inside the step (`keras_aevb.data_guard`); a bad batch undoes the
  execution and raises `DataError` naming it.

Only models on the default (single-device) strategy take these paths; under a `tf.distribute`
strategy Keras's own functions run, with the two workarounds at the end of this module.
"""

import contextlib
import math
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_aevb import inputs
from keras_aevb._cache import model_cache
from keras_aevb._io import DataError
from keras_aevb.data_guard import DataGuard, active_guard, data_guard, raise_data_error
from keras_aevb.xla_blocks import MAX_BLOCK_BYTES, bounded_fetch, make_block_runner

__all__ = [
    "DEFAULT_STEPS_PER_EXECUTION",
    "DataGuard",
    "ExecutionCursor",
    "Executions",
    "MAX_BLOCK_BYTES",
    "MIN_ADDRESSED_VALUES",
    "active_guard",
    "data_guard",
    "execution_limit",
    "is_default_strategy",
    "make_execution_function",
    "reducible_logs",
    "steps_in",
    "training_state",
]

# Training steps per call of the train function when `compile` is not told. Each call has a
# fixed cost of Python and dispatch, of the order of a paper-model step at M = 100 on a CPU;
# 100 steps per call hide it (benchmarks/BENCHMARKS.md, "What the defaults do"). An execution
# stops at `steps_per_epoch` / `steps`, so the value never changes how many steps run.
DEFAULT_STEPS_PER_EXECUTION = 100

# Batches of fewer values than this stay with tf.data in `fit`: building batches next to the
# steps (`data.AddressedBatches`) was faster for the paper's MNIST model at M = 100 and 1000 on
# 2 CPU cores and slower at M = 20, where a batch's fixed costs weigh more than tf.data's thread
# beside the step (benchmarks/BENCHMARKS.md).
MIN_ADDRESSED_VALUES = 50_000


class Executions:
    """`keras.Model`'s compile/fit/evaluate/predict as keras_aevb runs them (a mixin of `AEVB`).

    The model provides `train_step`, `test_step`, `metric_logs()`, `event_shape`, `decoder`
    and the block hooks `block_step()` / `step_noise(batch_size)`.
    """

    # ------------------------------------------------------------ the hooks a model declares

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A subclass that writes its own train_step and not how a block runs it trains step by
        # step: blocks would run the inherited block step instead of its own.
        if "train_step" in cls.__dict__ and "block_step" not in cls.__dict__:
            cls.block_step = Executions.block_step

    def block_step(self):
        """The training step as XLA blocks run it: `(x, noise) -> logs`, or None.

        `x` is one full batch and `noise` that step's `step_noise`. None: the model trains
        step by step (its `train_step` on every batch), without XLA blocks.
        """
        return None

    def step_noise(self, batch_size):
        """The random draws of one training step, from the model's generators (a nest)."""
        raise NotImplementedError(
            f"{type(self).__name__} declares a block_step but no step_noise: XLA blocks draw "
            "each step's noise ahead with it (see keras_aevb.execution)."
        )

    def block_noise(self, steps, batch_size):
        """`step_noise` of `steps` consecutive steps, stacked on a leading axis.

        Drawn in the order of the steps from the same generators, so the same seed gives the
        same noise stream in XLA blocks or step by step.
        """
        first = self.step_noise(batch_size)
        leaves = tf.nest.flatten(first)
        arrays = [tf.TensorArray(leaf.dtype, size=steps).write(0, leaf) for leaf in leaves]

        def body(k, arrays):
            draws = tf.nest.flatten(self.step_noise(batch_size))
            return k + 1, [a.write(k, d) for a, d in zip(arrays, draws, strict=True)]

        _, arrays = tf.while_loop(lambda k, arrays: k < steps, body, (tf.constant(1), arrays))
        return tf.nest.pack_sequence_as(first, [a.stack() for a in arrays])

    def uses_xla_blocks(self):
        """Whether `fit` runs the model's full batches in XLA blocks.

        Needs `compile(jit_compile="auto" or True)` on one device, a declared `block_step`,
        and no layer declaring `supports_jit = False` (Keras's flag for ops XLA cannot
        compile, which turns Keras's own "auto" off too).
        """
        return (
            getattr(self, "xla_blocks", False)
            and self.block_step() is not None
            and all(getattr(layer, "supports_jit", True) for layer in self._flatten_layers())
        )

    def check_step_data(self, x):
        """The data check of every batch, inside the compiled step; returns x in event shape.

        In keras_aevb's executions the first bad batch is recorded and the execution raises
        `DataError` naming it, with the weights restored (`keras_aevb.data_guard`): XLA drops
        assertions. Run eagerly, the step raises at once; in Keras's own loop (a
        `tf.distribute` strategy) an assertion stops the step before its update.
        """
        x = self.as_event(x)
        statistics = inputs.batch_statistics(x)
        guard = active_guard(self)
        if guard is not None:
            guard.record(inputs.batch_is_bad(self.decoder, statistics), statistics)
            return x
        if tf.executing_eagerly():
            message = inputs.statistics_error(self.decoder, statistics.numpy())
            if message:
                raise DataError(message)
            return x
        check = tf.debugging.Assert(
            tf.logical_not(inputs.batch_is_bad(self.decoder, statistics)),
            ["keras_aevb: a batch holds NaN, inf or values outside the decoder's support; "
             "sum, min and max of the batch:", statistics],
        )  # fmt: skip
        with tf.control_dependencies([check]):
            return tf.identity(x)

    # ------------------------------------------------------------ compiling

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        loss_weights=None,
        metrics=None,
        weighted_metrics=None,
        run_eagerly=False,
        steps_per_execution=None,
        jit_compile="auto",
        **kwargs,
    ):
        """`keras.Model.compile` with defaults chosen by measurement for this model.

        - `steps_per_execution`: `DEFAULT_STEPS_PER_EXECUTION` (100; 1 when `run_eagerly` or
          under a `tf.distribute` strategy, where Keras's own loop runs). `fit` and `evaluate`
          still run exactly `steps_per_epoch` / `steps` steps (an execution stops there);
          batch-level callbacks see every execution's last batch.
        - `jit_compile="auto"`: training runs in XLA blocks (`xla_blocks`): the steps of an
          execution's full batches run inside one XLA computation, with the noise drawn
          outside it. Taken where the model declares a block step (AEVB: where the posterior
          family has an explicit z = g(eps, phi): normal, laplace, logistic, ...; families
          sampled by TFP's implicit reparameterization train step by step without XLA).
          Single steps (evaluation, an epoch's short last batch) run without XLA, Keras's
          rule on CPU. `jit_compile=True` also compiles those single steps; `False` turns XLA
          off everywhere.

        Any value the caller passes is used as given. Under a `tf.distribute` strategy with
        several replicas Keras's own loop runs, with a default of 1 step per execution: Keras 3
        fails on `steps_per_execution > 1` with `MirroredStrategy` (keras-team/keras#19246,
        "You must feed a value for placeholder").
        """
        replicas = self.distribute_strategy.num_replicas_in_sync
        if steps_per_execution is None:
            # Keras's own loop (eager, or any tf.distribute strategy, even of one replica) runs
            # whole executions: more steps than `steps_per_epoch` asks on an endless dataset.
            own_loop = run_eagerly or not is_default_strategy(self.distribute_strategy)
            steps_per_execution = 1 if own_loop else DEFAULT_STEPS_PER_EXECUTION
        elif steps_per_execution > 1 and replicas > 1:
            warnings.warn(
                f"steps_per_execution={steps_per_execution} with {replicas} replicas: Keras 3 "
                "fails on this with MirroredStrategy (keras-team/keras#19246); pass "
                "steps_per_execution=1 if fit raises 'You must feed a value for placeholder'.",
                UserWarning,
                stacklevel=2,
            )
        self.xla_blocks = bool(jit_compile) and not run_eagerly and replicas == 1
        super().compile(
            optimizer=optimizer,
            loss=loss,
            loss_weights=loss_weights,
            metrics=metrics,
            weighted_metrics=weighted_metrics,
            run_eagerly=run_eagerly,
            steps_per_execution=steps_per_execution,
            # "auto": XLA for the blocks only (above); Keras's "auto" (off on CPU) elsewhere.
            jit_compile=jit_compile,
            **kwargs,
        )
        # Keras saves the resolved value (False on a CPU for "auto"); a loaded model must
        # resolve "auto" again, or it would lose its XLA blocks.
        self._compile_config.config["jit_compile"] = jit_compile

    def compile_from_config(self, config):
        """Recompiles a loaded model (Keras skips models whose `compile` is overridden)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if hasattr(self, "optimizer") and self.built:
            # Creates the optimizer's variables so its saved state can be loaded into them.
            self.optimizer.build(self.trainable_variables)

    # ------------------------------------------------------------ fit, evaluate, predict

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=None,
        sample_weight=None,
        steps_per_epoch=None,
        **kwargs,
    ):
        """`keras.Model.fit` with the data checked and sample weights kept without targets.

        `sample_weight` weights each example's bound in the objective and the metrics (Keras
        itself drops sample weights when `y` is None). A `tf.data.Dataset` carries them as
        `(x, None, sample_weight)` elements.
        """
        x, y, sample_weight = self._event_data(x, y, sample_weight)
        if validation_data is not None:
            validation_data = inputs.event_validation_data(self, validation_data)
        if shuffle is None:
            # A dataset is shuffled by its own pipeline; Keras would warn that shuffle=True is
            # ignored on every call.
            shuffle = not isinstance(x, tf.data.Dataset)
        x, source = self._addressed_batches(x)
        with self._bounded_executions("train", x, batch_size, steps_per_epoch, source):
            return super().fit(
                x=x,
                y=y,
                batch_size=batch_size,
                epochs=epochs,
                verbose=verbose,
                callbacks=self._with_cursor(callbacks),
                validation_split=validation_split,
                validation_data=validation_data,
                shuffle=shuffle,
                sample_weight=sample_weight,
                steps_per_epoch=steps_per_epoch,
                **kwargs,
            )

    def evaluate(
        self,
        x=None,
        y=None,
        batch_size=None,
        verbose="auto",
        sample_weight=None,
        steps=None,
        callbacks=None,
        **kwargs,
    ):
        """`keras.Model.evaluate`: the metrics are the `sample_weight`-weighted means if given."""
        x, y, sample_weight = self._event_data(x, y, sample_weight)
        with self._bounded_executions("test", x, batch_size, steps):
            return super().evaluate(
                x=x,
                y=y,
                batch_size=batch_size,
                verbose=verbose,
                sample_weight=sample_weight,
                steps=steps,
                callbacks=self._with_cursor(callbacks),
                **kwargs,
            )

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        """Deterministic reconstructions `[N, *event_shape]` (the posterior mean; any L)."""
        x, _, _ = self._event_data(x, None, None)
        return super().predict(
            x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks
        )

    def _event_data(self, x, y, sample_weight):
        if not self.built:
            # Keras's own symbolic build in fit() builds the layers but not the model flag,
            # which saving needs.
            self.build()
        return inputs.event_data(self, x, y, sample_weight)

    # ------------------------------------------------------------ the functions Keras calls

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        if not self._runs_lean_executions():
            return super().make_train_function(force=force)
        block = (self.block_step(), self.block_noise) if self.uses_xla_blocks() else None
        self.train_function = make_execution_function(
            self, self.train_step, "train", jit_step=self.jit_compile, block=block
        )
        return self.train_function

    def make_test_function(self, force=False):
        if self.test_function is not None and not force:
            return self.test_function
        if not self._runs_lean_executions():
            return super().make_test_function(force=force)
        self.test_function = make_execution_function(
            self, self.test_step, "test", jit_step=self.jit_compile
        )
        return self.test_function

    def _runs_lean_executions(self):
        """Whether fit/evaluate use keras_aevb's executions (one device) or Keras's."""
        return not self.run_eagerly and is_default_strategy(self.distribute_strategy)

    @property
    def _execution_state(self):
        return model_cache(self, "execution_state")

    @contextlib.contextmanager
    def _bounded_executions(self, mode, x, batch_size, steps, source=None):
        """Runs fit/evaluate with executions that stop at the epoch's `steps` (exact counts).

        Where the epoch's length is known and shorter than `steps_per_execution`, executions
        are that long for this call, so progress bars count real steps. `source`: the
        `AddressedBatches` whose addresses x yields (see `_addressed_batches`).
        """
        state = self._execution_state
        saved = dict(state), getattr(self, "steps_per_execution", 1)
        state[f"{mode}_source"] = source
        state[f"{mode}_steps"] = None if steps is None else int(steps)
        state[f"{mode}_begin"] = 0
        if mode == "train":
            state["fitting"] = True  # validation batches are named as such in data errors
        known = steps_in(x, batch_size, steps)
        if known and self._runs_lean_executions() and known < self.steps_per_execution:
            self.steps_per_execution = known
        try:
            yield
        finally:
            state.clear()
            state.update(saved[0])
            self.steps_per_execution = saved[1]

    def _addressed_batches(self, x):
        """`(data for Keras, source)`: a `make_dataset` stream as its batches' addresses.

        Where the steps run in XLA blocks, the executions build each batch of a
        `keras_aevb.data.make_dataset` stream from its address next to the steps
        (`data.AddressedBatches`): the same batches, without tf.data building them on a
        thread of its own that competes with the step for the CPU. Small batches stay with
        tf.data (`MIN_ADDRESSED_VALUES`), where its thread runs beside the step for free.
        Any other data: `(x, None)`.
        """
        addressed = getattr(x, "_keras_aevb_addressed", None)
        if addressed is None or not (self._runs_lean_executions() and self.uses_xla_blocks()):
            return x, None
        source, addresses = addressed
        if source.spec.event_shape != tuple(self.event_shape):
            return x, None
        if source.spec.batch_size * math.prod(source.spec.event_shape) < MIN_ADDRESSED_VALUES:
            return x, None
        return addresses, source

    def _with_cursor(self, callbacks):
        """Adds the `ExecutionCursor` that tells executions where the epoch stands."""
        if isinstance(callbacks, keras.callbacks.CallbackList):
            if not any(isinstance(c, ExecutionCursor) for c in callbacks.callbacks):
                callbacks.append(ExecutionCursor(self._execution_state))
            return callbacks
        return [ExecutionCursor(self._execution_state), *(callbacks or [])]


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
        model: an `Executions` model (its `steps_per_execution` and execution state are read
            per call).
        step_function: `train_step` or `test_step`.
        mode: "train" or "test" (which count of the execution state bounds the execution).
        jit_step: compile each single step with XLA (Keras's `jit_compile=True`).
        block: None, or `(block_step, draw_noise)` for XLA blocks
            (`keras_aevb.xla_blocks.make_block_runner`).
    """
    one_step = tf.function(step_function, reduce_retracing=True, jit_compile=bool(jit_step))
    run_blocks = make_block_runner(model, one_step, *block) if block else None
    run_steps = _step_loop(one_step)
    state = model._execution_state

    def run(iterator):
        if not isinstance(iterator, tf.data.Iterator | tf.distribute.DistributedIterator):
            # train_on_batch / test_on_batch pass a Python generator of one batch.
            logs = None
            for data in iterator:
                logs = one_step(data)
            return logs
        limit = tf.constant(execution_limit(state, mode, model.steps_per_execution))
        if run_blocks is None or not _single_tensor(iterator.element_spec):
            return run_steps(iterator, limit)
        source = state.get("train_source") if mode == "train" else None
        if source is not None:
            return run_blocks(iterator, limit, source.table, source.spec)
        return run_blocks(iterator, limit)

    guard = data_guard(model)

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
            raise_data_error(model.decoder, state, mode, *failure)
        return logs

    return function


def _step_loop(one_step):
    """`run_steps(iterator, limit)`: up to `limit` steps, one per element, in one call."""

    @tf.function(reduce_retracing=True)
    def run_steps(iterator, limit):
        # The first step may raise OutOfRangeError: Keras's epoch iterator ends the epoch on it.
        logs = one_step(iterator.get_next())
        fetch = bounded_fetch(iterator, limit)

        def body(steps, logs, next_element):
            return steps + 1, one_step(next_element.get_value()), fetch(steps + 1)

        _, logs, _ = tf.while_loop(
            lambda steps, logs, next_element: next_element.has_value(),
            body,
            (tf.constant(1), logs, fetch(tf.constant(1))),
        )
        return logs

    return run_steps


def _single_tensor(element_spec):
    specs = tf.nest.flatten(element_spec)
    return len(specs) == 1 and isinstance(specs[0], tf.TensorSpec)


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


# ---------------------------------------------------------------- tf.distribute workarounds


def is_default_strategy(strategy):
    """Whether `strategy` is TensorFlow's default (no `tf.distribute` strategy in use).

    TensorFlow's private names in the package stand in this section, each with its reason.
    Here: `tf.distribute.get_strategy()` returns the default strategy outside any scope, but
    no public API tells it apart from a user's one-device strategy, whose loop Keras runs.
    """
    from tensorflow.python.distribute import distribute_lib

    return strategy is distribute_lib._get_default_strategy()


def reducible_logs(logs):
    """Gives the step's metric values a leading axis of 1 under multi-worker training.

    Keras 3 reduces the logs of every step under `MultiWorkerMirroredStrategy` with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars ("Invalid reduction
    dimension 0 for input with 0 dimensions", tensorflow/tensorflow#72388); with shape [1] it
    returns the scalar mean over workers. Elsewhere the logs are returned as they are.
    (`_in_multi_worker_mode`: no public API says whether a strategy spans several workers.)
    """
    strategy = tf.distribute.get_strategy()
    in_multi_worker_mode = getattr(strategy.extended, "_in_multi_worker_mode", None)
    if not (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and in_multi_worker_mode is not None
        and in_multi_worker_mode()
    ):
        return logs
    return {name: ops.reshape(value, (1,)) for name, value in logs.items()}
