"""Schedules of the KL weight beta in the training objective, evaluated per step in the graph.

The objective AEVB ascends is, per datapoint,

    E_q[log p(x|z)] - beta_t * KL(q(z|x) || p(z))

with beta_t = 1 the paper's bound (eq. 7). Annealing beta from 0 to 1 early in training ("KL
warm-up", Bowman et al., 2016; Sonderby et al., 2016) or in cycles (Fu et al., 2019) keeps the
encoder from collapsing onto the prior before the decoder has learned to use z. A schedule is a
function of the optimizer's step count, like a `keras.optimizers.schedules.LearningRateSchedule`:
the train step evaluates it at every step (so `steps_per_execution` and XLA blocks see the exact
value of each step), and it is saved with the model's config.

    model = AEVB(encoder, decoder, kl_weight=keras_aevb.schedules.LinearWarmup(10_000))

Only the objective changes: the `elbo`, `reconstruction_log_likelihood` and `kl` metrics stay
the true bound and its terms; the objective is the `loss` metric (its negative).
"""

import keras
from keras import ops

__all__ = ["CyclicalAnnealing", "KLSchedule", "KLWeight", "LinearWarmup"]


class KLSchedule:
    """Base class: `schedule(step)` is beta for the step that follows `step` steps (a float32
    tensor), `get_config()` what rebuilds it."""

    def __call__(self, step):
        raise NotImplementedError

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


def _check(name, value, low=None, positive=False):
    value = float(value)
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


@keras.saving.register_keras_serializable(package="keras_aevb")
class LinearWarmup(KLSchedule):
    """beta_t = start + (end - start) * min(1, t / warmup_steps): linear warm-up, then `end`.

    Step t = 0 (the first) trains with `start`; from step `warmup_steps` on with `end`.
    """

    def __init__(self, warmup_steps, start=0.0, end=1.0):
        self.warmup_steps = int(_check("warmup_steps", warmup_steps, positive=True))
        self.start = _check("start", start, low=0.0)
        self.end = _check("end", end, low=0.0)

    def __call__(self, step):
        t = ops.cast(step, "float32")
        fraction = ops.minimum(1.0, t / float(self.warmup_steps))
        return self.start + (self.end - self.start) * fraction

    def get_config(self):
        return {"warmup_steps": self.warmup_steps, "start": self.start, "end": self.end}


@keras.saving.register_keras_serializable(package="keras_aevb")
class CyclicalAnnealing(KLSchedule):
    """Cyclical annealing (Fu et al., 2019): in each cycle of `cycle_steps` steps beta rises
    linearly from `start` to `end` over the first `ramp_fraction` of the cycle, then stays at
    `end`; the next cycle starts again from `start`."""

    def __init__(self, cycle_steps, ramp_fraction=0.5, start=0.0, end=1.0):
        self.cycle_steps = int(_check("cycle_steps", cycle_steps, positive=True))
        self.ramp_fraction = _check("ramp_fraction", ramp_fraction, positive=True)
        if self.ramp_fraction > 1:
            raise ValueError(f"ramp_fraction must be in (0, 1], got {ramp_fraction}")
        self.start = _check("start", start, low=0.0)
        self.end = _check("end", end, low=0.0)

    def __call__(self, step):
        position = ops.cast(ops.mod(ops.cast(step, "int64"), self.cycle_steps), "float32")
        fraction = ops.minimum(1.0, position / (self.ramp_fraction * self.cycle_steps))
        return self.start + (self.end - self.start) * fraction

    def get_config(self):
        return {
            "cycle_steps": self.cycle_steps,
            "ramp_fraction": self.ramp_fraction,
            "start": self.start,
            "end": self.end,
        }


class KLWeight:
    """beta as a model holds it: a number or a `KLSchedule`, and a variable with its value.

    The variable (`keras.Variable`, float32, not trainable) holds beta of the last step: a
    callback may assign it between steps without retracing; with a schedule the train step
    assigns it at every step. A plain object, outside Keras's attribute tracking: beta is a
    setting, not a weight, so it is neither in `get_weights()`/`count_params()` nor in .keras
    files (older files load).

    Args:
        kl_weight: a finite number >= 0, a `KLSchedule`, or a schedule's serialized config.
    """

    def __init__(self, kl_weight):
        if isinstance(kl_weight, dict):
            kl_weight = keras.saving.deserialize_keras_object(kl_weight)
        self.schedule = kl_weight if isinstance(kl_weight, KLSchedule) else None
        initial = float(kl_weight(0)) if self.schedule is not None else float(kl_weight)
        if not 0.0 <= initial < float("inf"):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}.")
        self.initial = initial
        self.variable = keras.Variable(
            initial, trainable=False, dtype="float32", name="kl_weight",
            aggregation="only_first_replica",
        )  # fmt: skip

    def at(self, step, dtype):
        """beta for the step after `step` steps (schedules; None: the variable's value)."""
        if self.schedule is not None and step is not None:
            beta = ops.cast(self.schedule(step), dtype)
            self.variable.assign(beta)
            return beta
        return ops.cast(self.variable, dtype)

    def get_config(self):
        """What `KLWeight(config)` rebuilds it from: the number, or the schedule serialized."""
        if self.schedule is None:
            return self.initial
        return keras.saving.serialize_keras_object(self.schedule)
