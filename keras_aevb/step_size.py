"""The optimizer of a run and its step size, chosen as the paper does (section 5): "the
Adagrad global stepsize parameters were chosen from {0.01, 0.02, 0.1} based on performance on
the training set in the first few iterations"."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_aevb import execution
from keras_aevb.callbacks import bound_divergence, evaluate_bound
from keras_aevb.config import OPTIMIZERS

__all__ = [
    "LEARNING_RATE_CANDIDATES",
    "LR_EVAL_EXAMPLES",
    "choose_learning_rate",
    "make_optimizer",
    "select_learning_rate",
]

# The paper (section 5): "Stepsizes were adapted with Adagrad [...]; the Adagrad global stepsize
# parameters were chosen from {0.01, 0.02, 0.1} based on performance on the training set in the
# first few iterations." Adam is not the paper's; its candidates bracket its usual 1e-3. Burda
# et al. start their schedule at 1e-3 without a search: one candidate, nothing to compare.
LEARNING_RATE_CANDIDATES = {
    "adagrad": (0.01, 0.02, 0.1),
    "adam": (3e-4, 1e-3, 3e-3),
    "iwae_adam": (1e-3,),
}

# Examples of the training set on which the step-size candidates are compared.
LR_EVAL_EXAMPLES = 1000


def make_optimizer(name, learning_rate, steps_per_pass=None):
    """The optimizer: "adagrad" is the paper's (`keras_aevb.paper_optimizer`), "adam", or
    "iwae_adam", Burda et al.'s (`keras_aevb.optimizers.iwae_adam`), whose learning-rate
    schedule starts at `learning_rate` and counts passes of `steps_per_pass` steps."""
    from keras_aevb.optimizers import iwae_adam
    from keras_aevb.paper import paper_optimizer

    if name == "adagrad":
        return paper_optimizer(float(learning_rate))
    if name == "adam":
        return keras.optimizers.Adam(float(learning_rate))
    if name == "iwae_adam":
        if steps_per_pass is None:
            raise ValueError("iwae_adam's schedule counts passes: pass steps_per_pass")
        return iwae_adam(steps_per_pass, float(learning_rate))
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def choose_learning_rate(config, previous_config, resuming, search):
    """A run's step size: a resumed run's, the one candidate, the search's, or the given.

    Args:
        config: the run's `TrainConfig` (`learning_rate`, `lr_candidates`, `optimizer`).
        previous_config: config.json of the run directory's earlier run, or None.
        resuming: whether a checkpoint is resumed.
        search: `search(candidates) -> (rate, {rate: bound})` (`select_learning_rate`),
            called only when the search is what chooses.

    Returns:
        `(learning_rate, bounds)`: bounds are the search's, by rate, for config.json (a
        resumed run keeps its earlier search's), or None.
    """
    candidates = tuple(config.lr_candidates or LEARNING_RATE_CANDIDATES[config.optimizer])
    if resuming or (previous_config and "learning_rate_used" in previous_config):
        previous = float(previous_config["learning_rate_used"])
        return previous, previous_config.get("learning_rate_search")
    if config.learning_rate == "auto" and len(candidates) == 1:
        return candidates[0], None
    if config.learning_rate == "auto":
        learning_rate, bounds = search(candidates)
        return learning_rate, {f"{rate:g}": bound for rate, bound in bounds.items()}
    return float(config.learning_rate), None


def select_learning_rate(
    build,
    initial_weights,
    train_dataset_fn,
    eval_x,
    optimizer="adagrad",
    candidates=None,
    steps=200,
    seed=0,
    batch_size=100,
    print_fn=print,
):
    """Picks the step size as the paper does: by the bound after the first iterations.

    Each candidate trains a fresh model from the same initial weights, on the same data stream
    and noise, for `steps` steps; the bound is then measured on `eval_x` (training examples,
    the paper's "performance on the training set"). Candidates whose bound is NaN, infinite,
    impossible (above the decoder's largest log-likelihood, e.g. > 0 on binary data: see
    `bound_divergence`) or no better than at initialization are rejected: plain Adagrad at 0.1
    can blow up from the paper's initialization (DESIGN 9).

    Args:
        build: a function returning a fresh, built, uncompiled model.
        initial_weights: the weights every candidate starts from (`model.get_weights()`).
        train_dataset_fn: a function returning the training `tf.data.Dataset` (repeated), or
            the training array for models whose `fit` needs one (Monte Carlo EM).
        eval_x: fixed array of examples to measure the bound on.
        optimizer, candidates: optimizer name and step sizes (default
            `LEARNING_RATE_CANDIDATES[optimizer]`).
        steps: training steps per candidate.

    Returns:
        `(best_rate, {rate: bound or None})`; None marks a rejected candidate's NaN bound.

    Raises:
        ValueError: every candidate diverged.
    """
    candidates = tuple(candidates or LEARNING_RATE_CANDIDATES[optimizer])
    # Each candidate is a new model, so TensorFlow traces its functions anew and warns about
    # "excessive retracing" from the third on: expected here, so its logger is quieted.
    tf_logger = tf.get_logger()
    level = tf_logger.level
    tf_logger.setLevel("ERROR")
    try:
        bounds, initial_bound = _compare_rates(
            build,
            initial_weights,
            train_dataset_fn,
            eval_x,
            optimizer,
            candidates,
            steps,
            seed,
            batch_size,
        )
    finally:
        tf_logger.setLevel(level)
    accepted = {r: b for r, b in bounds.items() if b is not None and b > initial_bound}
    report = ", ".join(
        f"{r:g}: {'diverged' if r not in accepted else f'{b:.2f}'}" for r, b in bounds.items()
    )
    if not accepted:
        raise ValueError(
            f"every learning rate diverged in the first {steps} steps ({report}; bound at "
            f"initialization {initial_bound:.2f}; a bound that is NaN, infinite or above the "
            "decoder's largest log-likelihood, 0 nats for a Bernoulli decoder, is divergence); "
            "pass a smaller --learning-rate"
        )
    best = max(accepted, key=accepted.get)
    print_fn(
        f"keras-aevb: learning rate auto: bound after {steps} steps {{{report}}} "
        f"(at initialization {initial_bound:.2f}); chose {best:g}"
    )
    return best, bounds


def _compare_rates(
    build, initial_weights, train_dataset_fn, eval_x, optimizer, candidates, steps, seed, batch_size
):
    """The bound at initialization and after `steps` steps of each candidate (NaN: None).

    Every candidate trains the same model, restored before it to the same state (weights,
    optimizer slots, noise generators' states), so every candidate sees the same data, noise
    and order, and the model's train and test functions are traced and compiled once for the
    whole search (a model per candidate compiled them anew each time: most of a short run's
    cost). The bound at initialization is measured before any candidate, its noise draws
    undone by the same restore.
    """
    keras.utils.set_random_seed(seed)
    model = build()
    model.set_weights(initial_weights)
    model.compile(optimizer=make_optimizer(optimizer, candidates[0]))
    model.optimizer.build(model.trainable_variables)
    state = execution.training_state(model)
    start = [np.array(v.numpy()) for v in state]

    initial_bound = evaluate_bound(model, eval_x, batch_size)
    bounds = {}
    for rate in candidates:
        for variable, value in zip(state, start, strict=True):
            variable.assign(value)
        model.optimizer.learning_rate = float(rate)  # a variable: no retracing
        keras.utils.set_random_seed(seed)  # what Keras's own shuffling draws from
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            train_data = train_dataset_fn()
            if isinstance(train_data, np.ndarray):  # models that take the training array
                batches = math.ceil(len(train_data) / batch_size)
                model.fit(
                    train_data,
                    batch_size=batch_size,
                    shuffle=True,
                    steps_per_epoch=min(steps, batches),
                    epochs=1,
                    verbose=0,
                )
            else:
                model.fit(train_data, steps_per_epoch=steps, epochs=1, verbose=0)
        bound = evaluate_bound(model, eval_x, batch_size)
        bounds[rate] = None if bound_divergence(bound, model.decoder) else bound
    del model
    return bounds, initial_bound
