"""Where a training process stands in a `tf.distribute` cluster (TF_CONFIG), and the strategy.

`keras-aevb train --strategy {default,mirrored,multi_worker}`: every worker runs the same
`train`; the chief alone writes the run directory, and values one process chose (the step
size) are taken from the chief, so every worker trains the same run.
"""

import json
import os

import tensorflow as tf

from keras_aevb.config import STRATEGIES

__all__ = ["chief_value", "is_chief", "make_strategy", "tensorboard_available"]


def is_chief() -> bool:
    """Whether this process writes the run's files under a multi-worker strategy.

    True without TF_CONFIG, for task type "chief", and for worker 0 of a cluster with no chief
    (the convention of `tf.distribute.MultiWorkerMirroredStrategy`).
    """
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        return True
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError("TF_CONFIG is not valid JSON; fix or unset it") from None
    task = tf_config.get("task") or {}
    task_type, index = task.get("type"), int(task.get("index", 0))
    if not task_type or task_type == "chief":
        return True
    if task_type == "worker":
        return index == 0 and "chief" not in (tf_config.get("cluster") or {})
    return False


def tensorboard_available():
    """tf.summary writes nothing (it raises) unless the tensorboard package is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def make_strategy(name):
    """The `tf.distribute` strategy of `--strategy NAME`.

    Call it before any other TensorFlow op of the process: `MultiWorkerMirroredStrategy`
    configures TensorFlow's collective ops, which TensorFlow refuses once it has run an op
    ("Collective ops must be configured at program startup", DESIGN 9).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}")


def chief_value(strategy, value):
    """`value` as the chief (global replica 0) has it, on every worker of a multi-worker run.

    Each worker picks the step size by itself (the same search on the same data and seed); on
    machines whose CPUs round differently two nearly equal candidates could be ordered
    differently, so the cluster takes the chief's choice, the one its config.json records.
    Every worker must call this (it is a collective op); without workers it returns `value`.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return value

    def replica_value():
        context = tf.distribute.get_replica_context()
        first = tf.cast(tf.equal(context.replica_id_in_sync_group, 0), tf.float64)
        return first * tf.constant(value, tf.float64)

    @tf.function(autograph=False)  # eagerly, the strategy warns of its overhead
    def chief_total():
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_value), axis=None)

    return float(chief_total().numpy())
