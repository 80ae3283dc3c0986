"""The one check of the data a model scores: layout, finite values, the likelihood's support.

Every public entry point that scores data (`fit`, `evaluate`, `predict`, `elbo`, `encode`,
`reconstruct`, `log_likelihood`, `hmc_log_likelihood`, and the baselines, which inherit them)
goes through the functions here, so a problem gets the same message wherever it is found:

- `event_layout`: an example must have the model's event shape, the event shape plus a
  trailing 1 (a channel axis), or be flat (`(28, 28)`, `(28, 28, 1)`, `(784,)` for MNIST). Any
  other shape is refused, even with the right number of values: a transposed `(20, 28)` Frey
  Face batch would otherwise be reshaped into nonsense and scored silently.
- `value_error`: NaN or infinite values, and values outside the decoder's support
  (`decoder.data_range`: [0, 1] for a Bernoulli decoder), are errors.
- `batch_statistics`: the three numbers the check needs, computed inside a compiled step for
  every batch (sum, min, max: cheap reductions next to the step's matrix products; the sum is
  finite exactly when every value is). `AEVB` records the first failing batch of an execution
  and raises `DataError` naming it after the execution (keras_aevb.execution).
"""

import math
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_aevb._cache import model_cache
from keras_aevb.data import DataError

__all__ = [
    "positive_int",
    "DataError",
    "accepted_layouts",
    "array_statistics",
    "as_event",
    "batch_is_bad",
    "batch_statistics",
    "check_data",
    "check_seed",
    "event_data",
    "event_layout",
    "event_validation_data",
    "statistics_error",
    "unpack_data",
    "value_error",
    "weighted_mean",
]


def unpack_data(data):
    """`(x, sample_weight)` of a batch as Keras passes it to a step (targets are ignored)."""
    x, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    return x, sample_weight


def weighted_mean(values, sample_weight):
    """The batch mean of per-example `values`, weighted by `sample_weight` if given."""
    if sample_weight is None:
        return ops.mean(values)
    sample_weight = ops.cast(ops.reshape(sample_weight, ops.shape(values)), values.dtype)
    return ops.sum(values * sample_weight) / ops.maximum(ops.sum(sample_weight), 1e-12)


def accepted_layouts(event_shape):
    """The example shapes a model with this event shape takes, in the order messages list them."""
    event_shape = tuple(int(d) for d in event_shape)
    layouts = [event_shape, (*event_shape, 1), (math.prod(event_shape),)]
    return list(dict.fromkeys(layouts))  # a 1-D event: the flat layout is the event itself


def layout_message(shape, event_shape):
    names = [str(tuple(layout)) for layout in accepted_layouts(event_shape)]
    listed = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
    return (
        f"Expected examples of shape {listed}, got {tuple(shape)}: reshape the data to the "
        "model's event shape (an array with the right number of values in another layout, "
        "e.g. transposed, would be scored as nonsense)."
    )


def event_layout(shape, event_shape):
    """Checks one example's shape (`x.shape[1:]`); returns it as a tuple.

    Raises:
        ValueError: a shape other than the three accepted layouts.
    """
    shape = tuple(None if d is None else int(d) for d in shape)
    if None in shape:
        # Unknown sizes (a symbolic batch): the step checks the real shape when it runs.
        return shape
    if shape not in accepted_layouts(event_shape):
        raise ValueError(layout_message(shape, event_shape))
    return shape


def value_error(decoder, nonfinite, low, high):
    """The message for data the decoder cannot score, or None.

    Args:
        decoder: the model's decoder (its `data_range` is the support of p(x|z), or None).
        nonfinite: whether some value is NaN or infinite.
        low, high: the smallest and largest finite value seen.
    """
    if nonfinite:
        return (
            "The data hold NaN or infinite values; the bound would be NaN and training would "
            "turn every weight into NaN: remove or impute them."
        )
    data_range = getattr(decoder, "data_range", None)
    if data_range is not None and (low < data_range[0] or high > data_range[1]):
        return decoder.range_message(low, high)
    return None


def array_statistics(x):
    """`(nonfinite, low, high)` of a NumPy array (low/high over its finite values)."""
    x = np.asarray(x)
    finite = np.isfinite(x)
    nonfinite = not bool(np.all(finite))
    values = x[finite] if nonfinite else x
    if values.size == 0:
        return nonfinite, 0.0, 0.0
    return nonfinite, float(np.min(values)), float(np.max(values))


def batch_statistics(x):
    """float32 `[3]`: sum, min and max of a batch, for the in-step check.

    The sum is NaN or infinite exactly when some value is (a sum of finite float32 values this
    size cannot overflow: |x| <= 1 for Bernoulli data), so three reductions cover NaN, inf and
    the support.
    """
    x = tf.cast(tf.reshape(x, [-1]), tf.float32)
    return tf.stack([tf.reduce_sum(x), tf.reduce_min(x), tf.reduce_max(x)])


def statistics_error(decoder, statistics):
    """`value_error` from `batch_statistics`' three numbers (NumPy)."""
    total, low, high = (float(v) for v in statistics)
    return value_error(decoder, not math.isfinite(total), low, high)


def batch_is_bad(decoder, statistics):
    """In-graph bool: whether `batch_statistics` show data `value_error` would refuse."""
    total, low, high = tf.unstack(statistics)
    bad = tf.logical_not(tf.math.is_finite(total))
    data_range = getattr(decoder, "data_range", None)
    if data_range is not None:
        bad = bad | (low < data_range[0]) | (high > data_range[1])
    return bad


def positive_int(value, name):
    """`value` as an int, if it is a whole number >= 1 (5000 or 5e3); `name` names it in the
    error. A count of samples, chains or examples is never truncated (int(1.5) == 1) or parsed
    from text in silence.

    Raises:
        ValueError: a fraction, a number below 1, NaN, a bool, a string or anything else.
    """
    number = isinstance(value, int | float | np.integer | np.floating)
    if (
        isinstance(value, bool | np.bool_)
        or not number
        or not math.isfinite(value)  # before int(value), which raises on NaN and inf
        or value != int(value)
        or value < 1
    ):
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def check_seed(seed):
    """Accepts seeds of every integer type (Python, NumPy) and int32 pairs; returns int32 `[2]`.

    Raises:
        ValueError: a float, a string, a bool or anything else that is not an integer seed.
    """
    if seed is None:
        return None
    if isinstance(seed, bool | np.bool_):
        raise ValueError(f"seed must be an integer or a pair of integers, got {seed!r}.")
    if isinstance(seed, int | np.integer):
        return tf.constant([int(seed) % 2**31, 0], tf.int32)
    if isinstance(seed, tf.Tensor | tf.Variable | np.ndarray | list | tuple):
        dtype = getattr(seed, "dtype", None)
        if dtype is None:
            dtype = np.asarray(seed).dtype
        shape = tuple(seed.shape) if hasattr(seed, "shape") else np.shape(seed)
        if not tf.as_dtype(dtype).is_integer or shape != (2,):
            raise ValueError(f"seed must be an integer or a pair of integers, got {seed!r}.")
        return tf.cast(seed, tf.int32)
    raise ValueError(f"seed must be an integer or a pair of integers, got {seed!r}.")


# ------------------------------------------------------------- the data a model is given


def as_event(x, event_shape, decoder, dtype):
    """x as `[batch, *event_shape]` in `dtype`, checked.

    Takes the event shape, the event shape plus a trailing 1, or flat examples
    ((28, 28), (28, 28, 1) or (784,) for MNIST) and refuses any other layout. Eager values
    are checked here too (NaN, inf, the decoder's support); inside a compiled step the
    step's own check (`AEVB.check_step_data`) sees every batch.
    """
    event_shape = tuple(event_shape)
    x = tf.convert_to_tensor(x)
    if x.dtype != dtype:
        x = tf.cast(x, dtype)
    if x.shape.rank is None:
        # A step traced for several layouts (reduce_retracing): fit and evaluate hand it
        # batches already in the event shape (`event_data`), so only the batch size is new.
        return tf.reshape(x, (-1, *event_shape))
    event_layout(x.shape[1:], event_shape)
    if hasattr(x, "numpy") and tf.executing_eagerly():
        _raise_for_values(decoder, x.numpy())
    if tuple(x.shape[1:]) == event_shape:
        return x
    return tf.reshape(x, (-1, *event_shape))


def _raise_for_values(decoder, x):
    """Raises `DataError` for NaN, inf or values outside the decoder's support."""
    message = value_error(decoder, *array_statistics(x))
    if message:
        raise DataError(message)


def check_data(model, x):
    """Refuses data the model's likelihood cannot score; warns once about data it scores poorly.

    Arrays are checked in full, a `tf.data.Dataset` on its first batch here and on every batch
    inside the compiled step (`AEVB.check_step_data`).
    """
    sample = _peek(x)
    if sample is None:
        return
    if sample.ndim >= 1:
        event_layout(sample.shape[1:], model.event_shape)
    _raise_for_values(model.decoder, sample)
    message = model.decoder.check_data(sample) if sample.size else None
    if message:
        seen = model_cache(model, "warned")  # once per message and model
        if message not in seen:
            seen[message] = True
            warnings.warn(message, UserWarning, stacklevel=4)


def event_data(model, x, y, sample_weight):
    """`(x, y, sample_weight)` for Keras: x checked and in the model's event shape.

    Arrays are reshaped here and datasets mapped (only where their layout differs), so a
    compiled step sees `[batch, *event_shape]` whichever accepted layout came in: steps traced
    for one layout then serve the others. Sample weights without targets get placeholder
    targets, or Keras would drop the weights.
    """
    check_data(model, x)
    event_shape = tuple(model.event_shape)
    if isinstance(x, tf.data.Dataset):
        x = _event_dataset(x, event_shape)
    elif isinstance(x, np.ndarray | tf.Tensor) and x.ndim >= 2:
        if tuple(x.shape[1:]) != event_shape:
            reshape = tf.reshape if isinstance(x, tf.Tensor) else np.reshape
            x = reshape(x, (-1, *event_shape))
    if sample_weight is not None and y is None and x is not None:
        if isinstance(x, tf.data.Dataset):
            raise ValueError(
                "sample_weight with a tf.data.Dataset: put the weights in the dataset, as "
                "(x, None, sample_weight) elements."
            )
        y = np.zeros((len(x),), np.float32)  # ignored by the steps; keeps the weights
    return x, y, sample_weight


def event_validation_data(model, validation_data):
    """`fit`'s `validation_data` (a tuple or a dataset) through `event_data`."""
    if isinstance(validation_data, tuple | list):
        x, *rest = validation_data
        y = rest[0] if rest else None
        weights = rest[1] if len(rest) > 1 else None
        x, y, weights = event_data(model, x, y, weights)
        return (x,) if y is None else (x, y) if weights is None else (x, y, weights)
    return event_data(model, validation_data, None, None)[0]


def _event_dataset(dataset, event_shape):
    """The dataset with its examples in the event shape (a reshape, only where needed)."""
    spec = dataset.element_spec
    first = spec[0] if isinstance(spec, tuple) else spec
    if not isinstance(first, tf.TensorSpec):
        return dataset
    if first.shape.rank is not None:
        if event_layout(first.shape[1:], event_shape) == event_shape:
            return dataset

    def reshape(*element):
        x = tf.reshape(element[0], (-1, *event_shape))
        return x if len(element) == 1 else (x, *element[1:])

    return dataset.map(reshape)


def _peek(x):
    """A NumPy view of the data to check: the array itself, or a dataset's first batch."""
    if x is None:
        return None
    if isinstance(x, tf.data.Dataset):
        element = next(iter(x.take(1)), None)
        if element is None:
            return None
        x = element[0] if isinstance(element, tuple | list) else element
    if isinstance(x, tuple | list) and x and not np.isscalar(x[0]):
        x = x[0]
    if isinstance(x, dict):
        return None
    try:
        return np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        return None
