"""Training runs as the paper does them (section 5): one call, one run directory, resumable.

`train(TrainConfig(...))` loads the data, builds the model, picks Adagrad's step size from
{0.01, 0.02, 0.1} "by the bound after the first iterations" if asked, trains with `model.fit`,
evaluates the test bound after every epoch (the data of the paper's Fig. 2) and writes into the
run directory:

    config.json         every setting, resolved (binarization, learning rate, N, weight decay, ...)
    history.csv         epoch, examples_seen, seconds, train_elbo, test_elbo (one row per epoch)
    model.keras         the trained model (with its optimizer)
    checkpoints/        state.json + the latest epoch's weights (model and optimizer)
    logs/               TensorBoard: scalars, plus image grids of samples and reconstructions

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
number as two non-atomic writes, so a kill between them replays or skips an epoch.)

A failed run changes nothing in the run directory: data, model and settings are all checked
before the first file is written, and every file is written to a temporary name and renamed.

Example:
>>> result = train(TrainConfig(dataset="mnist", output="runs/nz20", epochs=3))  # doctest: +SKIP
>>> result.history[-1]["test_elbo"]  # doctest: +SKIP

Reference: Kingma & Welling, "Auto-Encoding Variational Bayes", arXiv:1312.6114, section 5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json
import math
import os
import struct
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from keras_aevb import _io, execution
from keras_aevb import data as data_lib
from keras_aevb._io import atomic_write
from keras_aevb.config import (
    DECODERS,
    METHODS,
    OPTIMIZERS,
    STRATEGIES,
    TrainConfig,
    check_same_run,
    jsonable,
)
from keras_aevb.run_dir import (
    HISTORY_COLUMNS,
    history_csv_bytes,
    read_previous_run,
    write_bytes,
    write_json,
)
from keras_aevb.version import __version__

__all__ = [
    "HISTORY_COLUMNS",
    "LEARNING_RATE_CANDIDATES",
    "METHODS",
    "OPTIMIZERS",
    "STRATEGIES",
    "RunRecorder",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate_bound",
    "is_chief",
    "load_eval_split",
    "make_optimizer",
    "select_learning_rate",
    "train",
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

# The test bound needs a fixed test set: for dynamic binarization it is one Bernoulli draw of
# the test images with this seed offset from the run's seed (the same draw for every epoch and
# for `keras-aevb evaluate`).
TEST_DRAW_SEED_OFFSET = 0

# Examples of the training set on which the step-size candidates are compared.
_LR_EVAL_EXAMPLES = 1000


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the run directory, its resolved config and history rows."""

    run_dir: str
    config: dict
    history: list[dict]
    examples_per_second: float | None
    resumed_from_epoch: int
    model: keras.Model | None = None


# -------------------------------------------------------------------------- small utilities


def _save_keras_atomically(model, path):
    """The `.keras` archive, written by Keras into the temporary file of an atomic write."""
    atomic_write(path, lambda f: _keras_saving_lib().save_model(model, f), fsync=True)


def _save_weights_atomically(model, path):
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


def _tensorboard_available():
    """tf.summary writes nothing (it raises) unless the tensorboard package is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _make_strategy(name):
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


def _chief_value(strategy, value):
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


# -------------------------------------------------------------------------- settings


def _resolve_likelihood(config):
    if config.decoder == "auto":
        return "gaussian" if config.dataset == "frey_face" else "bernoulli"
    return config.decoder


def _check_settings(config: TrainConfig):
    """Refuses settings that cannot work, before anything is loaded or written."""

    def positive(name, value, allow_none=False):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    if config.output is None:
        raise ValueError("no run directory: pass --output RUN_DIR")
    if config.dataset not in data_lib.DATASETS:
        raise data_lib.DataError(
            f"unknown dataset {config.dataset!r}; use one of {', '.join(data_lib.DATASETS)}"
        )
    for name, choices in (
        ("method", METHODS),
        ("optimizer", OPTIMIZERS),
        ("strategy", STRATEGIES),
        ("decoder", DECODERS),
    ):
        if getattr(config, name) not in choices:
            raise ValueError(f"unknown {name} {getattr(config, name)!r}; use one of {choices}")
    positive("latent_dim", config.latent_dim)
    positive("num_samples", config.num_samples)
    positive("batch_size", config.batch_size)
    positive("lr_search_steps", config.lr_search_steps)
    for name in ("epochs", "max_examples", "examples_per_epoch", "train_examples"):
        positive(name, getattr(config, name), allow_none=True)
    positive("test_examples", config.test_examples, allow_none=True)
    if config.epochs is not None and config.max_examples is not None:
        raise ValueError("pass either --epochs or --max-examples, not both")
    if config.hidden_units is not None:
        for units in config.hidden_units:
            positive("hidden_units", units)
    positive("kl_warmup", config.kl_warmup, allow_none=True)
    for name in ("beta", "free_bits"):
        value = getattr(config, name)
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if config.method != "aevb" and (
        config.estimator == "iwae" or config.gradient != "reparameterization"
    ):
        raise ValueError(
            f"--estimator iwae and --gradient dreg are AEVB's objectives; --method "
            f"{config.method} trains by its own rule: drop them"
        )
    if config.method != "aevb" and (config.beta != 1.0 or config.kl_warmup or config.free_bits):
        raise ValueError(
            f"--beta, --kl-warmup and --free-bits change AEVB's objective; --method "
            f"{config.method} trains by its own rule: drop them"
        )
    if config.optimizer == "iwae_adam" and config.lr_candidates and len(config.lr_candidates) > 1:
        raise ValueError(
            "iwae_adam follows its schedule from one starting step size: give lr_candidates "
            "one value, or --learning-rate"
        )
    if config.weight_decay is not None and not config.weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay!r}")
    if config.learning_rate != "auto":
        try:
            rate = float(config.learning_rate)
        except (TypeError, ValueError):
            raise ValueError(
                f"learning rate must be 'auto' or a positive number, got {config.learning_rate!r}"
            ) from None
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"learning rate must be positive and finite, got {rate!r}")
    binarization = config.binarization or data_lib.DEFAULT_BINARIZATION[config.dataset]
    if binarization not in data_lib.BINARIZATIONS:
        raise data_lib.DataError(
            f"unknown binarization {binarization!r}; use one of {', '.join(data_lib.BINARIZATIONS)}"
        )
    likelihood = _resolve_likelihood(config)
    if likelihood == "bernoulli" and binarization == "none":
        raise ValueError(
            "a Bernoulli decoder needs binary pixels, but --binarization none keeps them grey "
            "(the bound would not be a likelihood); use --binarization dynamic, static or "
            "threshold, or --decoder gaussian"
        )
    if likelihood == "gaussian" and binarization != "none":
        raise ValueError(
            f"a Gaussian decoder on {binarization}-binarized data: its density grows without "
            "limit on binary pixels; use --binarization none, or --decoder bernoulli"
        )
    return binarization, likelihood


def _plan_epochs(num_train, config, previous=None):
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
            fresh = _plan_epochs(num_train, config)["examples_per_epoch"]
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


# -------------------------------------------------------------------------- data


def load_eval_split(dataset, data_dir, split, binarization, seed=0, num_examples=None):
    """One split as a fixed array for evaluation: the test set of Fig. 2 and `evaluate`.

    Static and threshold binarizations are what `load_dataset` returns. "dynamic" is a fresh
    draw each epoch in training; a bound must be computed on one fixed set, so here it is one
    Bernoulli draw (`binarize(..., "static", seed)`), the same for every epoch and every call
    with the same seed.

    Returns:
        `(x, info)`: float32 `[n, *event_shape]`, and load_dataset's info plus
        "evaluation_binarization" (how the returned values were made, in words).
    """
    images, info = data_lib.load_dataset(dataset, data_dir, split, binarization, seed=seed)
    if num_examples is not None:
        images = images[: int(num_examples)]
    info = dict(info, num_examples=int(len(images)))
    if binarization == "dynamic":
        images = data_lib.binarize(images, "static", seed=seed + TEST_DRAW_SEED_OFFSET)
        info["evaluation_binarization"] = (
            f"dynamic (evaluated on one fixed Bernoulli draw, seed {seed + TEST_DRAW_SEED_OFFSET})"
        )
    else:
        info["evaluation_binarization"] = info["binarization"]
    return images.astype(np.float32), info


def _fixed_subset(images, info, num_examples, seed):
    """The first `num_examples` of a split loaded by load_dataset, as `load_eval_split` does."""
    subset = np.asarray(images[: int(num_examples)], np.float32)
    if info["binarization"] == "dynamic":
        return data_lib.binarize(subset, "static", seed=seed + TEST_DRAW_SEED_OFFSET)
    return subset


def _pipeline_binarization(info):
    """What make_dataset still has to do: nothing for data load_dataset already binarized."""
    return "none" if info["binarized"] else info["binarization"]


# -------------------------------------------------------------------------- model


def build_model(
    dataset,
    event_shape,
    latent_dim,
    hidden_units=None,
    likelihood=None,
    posterior="normal",
    prior="standard_normal",
    estimator="auto",
    num_samples=1,
    weight_decay=0.0,
    seed=None,
    method="aevb",
    num_examples=None,
    beta=1.0,
    kl_warmup=None,
    free_bits=0.0,
    gradient="reparameterization",
):
    """The paper's architecture (App. C) for the CLI's settings, built and not compiled.

    Encoder and decoder are one tanh layer each (500 units MNIST, 200 Frey Face, unless
    `hidden_units`), every parameter drawn from N(0, 0.01^2) (`keras_aevb.paper`). Seed the
    initialization with `keras.utils.set_random_seed` before calling.

    Args:
        method: "aevb", or "wake_sleep" / "mcem" (`keras_aevb.baselines`, imported here).
        num_examples: N, for "mcem" (one HMC chain per training example).
        beta, kl_warmup, free_bits: the objective's KL weight, warm-up and floor (AEVB only;
            see `TrainConfig`).

    Raises:
        ValueError: a posterior/prior/estimator combination the model refuses, or a baseline
            whose module is not installed.
    """
    from keras_aevb.model import AEVB
    from keras_aevb.paper import paper_layers

    encoder, decoder = paper_layers(
        dataset,
        latent_dim,
        hidden_units or None,
        posterior=posterior,
        likelihood=likelihood,
        event_shape=event_shape,
    )
    if method == "aevb":
        from keras_aevb.schedules import LinearWarmup

        model = AEVB(
            encoder,
            decoder,
            posterior=posterior,
            prior=prior,
            estimator=estimator,
            num_samples=num_samples,
            weight_decay=weight_decay,
            seed=seed,
            kl_weight=LinearWarmup(kl_warmup, end=beta) if kl_warmup else beta,
            free_bits=free_bits,
            gradient=gradient,
            name=f"aevb_{dataset}",
        )
    elif beta != 1.0 or kl_warmup or free_bits:
        raise ValueError(
            f"--beta, --kl-warmup and --free-bits change AEVB's objective; --method {method} "
            "trains by its own rule: drop them"
        )
    else:
        model_class = _baseline_class(method)
        wanted = dict(
            posterior=posterior,
            prior=prior,
            num_samples=num_samples,
            weight_decay=weight_decay,
            seed=seed,
            num_examples=num_examples,
        )
        parameters = inspect.signature(model_class.__init__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        kwargs = {
            k: v
            for k, v in wanted.items()
            if k in parameters or (takes_any and k != "num_examples")
        }
        model = model_class(encoder, decoder, name=f"{method}_{dataset}", **kwargs)
    model.build((None, *event_shape))
    return model


def _baseline_class(method):
    try:
        from keras_aevb import baselines
    except ImportError as e:
        raise ValueError(
            f"--method {method} needs keras_aevb.baselines, which is not available ({e}); "
            "use --method aevb"
        ) from None
    name = {"wake_sleep": "WakeSleep", "mcem": "MonteCarloEM"}[method]
    if not hasattr(baselines, name):
        raise ValueError(f"keras_aevb.baselines has no {name}; use --method aevb")
    return getattr(baselines, name)


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


# -------------------------------------------------------------------------- step size


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


# -------------------------------------------------------------------------- callbacks


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
        _save_weights_atomically(self.model, self.checkpoint_dir / name)
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


# -------------------------------------------------------------------------- the run directory


# -------------------------------------------------------------------------- train


def train(config: TrainConfig, print_fn=print) -> TrainResult:
    """Trains (or resumes) one run and writes its directory; see the module docstring.

    The run directory is locked for the whole call (`keras_aevb._io.RunLock`: a second process
    is refused at once, naming this one's PID); a call that fails before its first write leaves
    the directory as it found it.

    Args:
        config: the settings.
        print_fn: where the one-line messages go (learning-rate choice, final summary).

    Returns:
        A `TrainResult` with the history rows and the trained model.

    Raises:
        keras_aevb.data.DataError: missing or bad data.
        ValueError: settings that cannot work, a run directory with another run in it, or
            whose files are damaged, or a run whose bound became NaN.
        keras_aevb._io.RunLockedError: another process is using the run directory.
        keras_aevb._io.DiskFullError: the disk filled up; the run resumes once there is space.
    """
    _check_settings(config)
    run_dir = Path(config.output)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--output {run_dir} is a file; pass a directory")
    lock = _io.RunLock(run_dir) if is_chief() else None
    try:
        with lock or contextlib.nullcontext():
            return _train(config, print_fn, lock)
    except _io.DiskFullError:
        raise
    except Exception as e:
        # A full disk anywhere else (TensorFlow, Keras) names the run directory at least.
        if _io.is_no_space(e):
            raise _io.DiskFullError(run_dir) from e
        raise


def _train(config: TrainConfig, print_fn, lock) -> TrainResult:
    binarization, likelihood = _check_settings(config)
    # The strategy before any TensorFlow op (data loading, the initial model and the step-size
    # search all run some): MultiWorkerMirroredStrategy must configure the collectives first.
    strategy = _make_strategy(config.strategy)
    run_dir = Path(config.output)
    requested = jsonable(config)
    previous_config, state = read_previous_run(run_dir)
    if previous_config is not None:
        check_same_run(previous_config, requested, run_dir)

    # ---- data (everything is checked before the first file is written)
    train_x, train_info = data_lib.load_dataset(
        config.dataset, config.data_dir, "train", binarization, seed=config.seed
    )
    if config.train_examples is not None:
        train_x = train_x[: config.train_examples]
    test_x, test_info = load_eval_split(
        config.dataset,
        config.data_dir,
        "test",
        binarization,
        seed=config.seed,
        num_examples=config.test_examples,
    )
    num_train = len(train_x)
    pipeline_binarization = _pipeline_binarization(train_info)
    event_shape = tuple(train_info["event_shape"])
    # A resume keeps the run's epoch length; a run with no checkpoint yet plans afresh.
    plan = _plan_epochs(num_train, config, previous_config if state is not None else None)
    weight_decay = 1.0 / num_train if config.weight_decay is None else float(config.weight_decay)

    # Monte Carlo EM keeps one HMC chain per training example, so its fit takes the training
    # set as one fixed array: dynamic binarization becomes one fixed draw there.
    array_input = config.method == "mcem"
    train_array = (
        _fixed_subset(train_x, train_info, num_train, config.seed) if array_input else None
    )
    if array_input and plan["repeat"]:
        raise ValueError(
            "--method mcem trains in whole passes over its training array: drop "
            "--examples-per-epoch, and give --max-examples of at least one pass "
            f"({num_train} examples)"
        )

    # Steps per epoch: a pass over the data (its last batch may be short) unless the plan says.
    steps_per_epoch = plan["steps_per_epoch"] or math.ceil(num_train / config.batch_size)

    def training_dataset(initial_step=0):
        if array_input:
            return train_array
        # One endless stream addressed by step: a resumed run continues it where it stopped,
        # so it ends as the same command run without a stop would; the step-size search reads
        # the stream's beginning, as the run does.
        return data_lib.make_dataset(
            train_x,
            config.batch_size,
            pipeline_binarization,
            shuffle=True,
            seed=config.seed,
            repeat=True,
            initial_step=initial_step,
        )

    # ---- model: the initial weights every step-size candidate and the run start from
    def build():
        return build_model(
            config.dataset,
            event_shape,
            config.latent_dim,
            hidden_units=config.hidden_units,
            likelihood=likelihood,
            posterior=config.posterior,
            prior=config.prior,
            estimator=config.estimator,
            num_samples=config.num_samples,
            weight_decay=weight_decay,
            seed=config.seed,
            method=config.method,
            num_examples=num_train if array_input else None,
            beta=config.beta,
            kl_warmup=config.kl_warmup,
            free_bits=config.free_bits,
            gradient=config.gradient,
        )

    keras.utils.set_random_seed(config.seed)
    initial = build()
    initial_weights = initial.get_weights()
    estimator = getattr(initial, "estimator", None)
    hidden_units = [layer.units for layer in getattr(initial.encoder, "hidden_layers", [])] or list(
        config.hidden_units or ()
    )
    # The decoder's data check (grey pixels to a Bernoulli decoder, binary to a Gaussian one).
    message = initial.decoder.check_data(test_x[: min(len(test_x), 1000)])
    if message and likelihood == "gaussian":
        warnings.warn(message, UserWarning, stacklevel=2)
    del initial

    # ---- step size
    lr_bounds = None
    candidates = tuple(config.lr_candidates or LEARNING_RATE_CANDIDATES[config.optimizer])
    if state is not None or (previous_config and "learning_rate_used" in previous_config):
        learning_rate = float(previous_config["learning_rate_used"])
        lr_bounds = previous_config.get("learning_rate_search")
    elif config.learning_rate == "auto" and len(candidates) == 1:
        learning_rate = candidates[0]
    elif config.learning_rate == "auto":
        eval_x = _fixed_subset(train_x, train_info, _LR_EVAL_EXAMPLES, config.seed)
        learning_rate, bounds = select_learning_rate(
            build,
            initial_weights,
            training_dataset,
            eval_x,
            optimizer=config.optimizer,
            candidates=candidates,
            steps=config.lr_search_steps,
            seed=config.seed,
            batch_size=config.batch_size,
            print_fn=print_fn,
        )
        lr_bounds = {f"{rate:g}": bound for rate, bound in bounds.items()}
    else:
        learning_rate = float(config.learning_rate)
    learning_rate = _chief_value(strategy, learning_rate)

    # ---- the model that trains, under the distribution strategy
    chief = is_chief()
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = build()
        model.set_weights(initial_weights)
        steps_per_pass = math.ceil(num_train / config.batch_size)
        model.compile(optimizer=make_optimizer(config.optimizer, learning_rate, steps_per_pass))
        initial_epoch, rows = 0, []
        if state is not None:
            model.optimizer.build(model.trainable_variables)
            model.load_weights(run_dir / "checkpoints" / state["weights"])
            initial_epoch, rows = int(state["epoch"]), list(state["history"])

    resolved = {
        "requested": requested,
        **{k: v for k, v in requested.items() if k != "learning_rate"},
        "learning_rate": config.learning_rate,
        "learning_rate_used": learning_rate,
        "learning_rate_search": lr_bounds,
        "binarization": binarization,
        "test_binarization": test_info["evaluation_binarization"],
        "train_binarization": (
            f"one fixed draw (seed {config.seed}) of the training set"
            if array_input and binarization == "dynamic"
            else binarization
        ),
        "decoder": likelihood,
        "estimator": estimator,
        "hidden_units": hidden_units,
        "weight_decay": weight_decay,
        "num_train": num_train,
        "num_test": int(len(test_x)),
        "event_shape": list(event_shape),
        "data_dir": None if config.data_dir is None else str(Path(config.data_dir).resolve()),
        "data_source": train_info["source"],
        "epochs": plan["epochs"],
        "examples_per_epoch": plan["examples_per_epoch"],
        "steps_per_epoch": plan["steps_per_epoch"],
        "model_class": type(model).__name__,
        "keras_aevb_version": __version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }

    # ---- from here on the run directory is written
    if chief:
        lock.begin_writing()  # the PID into .lock; temporary files of dead processes go
        # A run killed between committing a checkpoint and deleting the one it replaced left
        # both: the one state.json names is in place, so the other goes.
        for old in sorted((run_dir / "checkpoints").glob("*.weights.h5")):
            if state is not None and old.name != state["weights"]:
                _io.remove(old)
        write_json(run_dir / "config.json", resolved)
        write_bytes(run_dir / "history.csv", history_csv_bytes(rows))

    # The training bound of history.csv: measured after each epoch, like the test bound, on as
    # many fixed training examples as there are test examples (same noise level).
    train_eval_x = _fixed_subset(train_x, train_info, len(test_x), config.seed)
    recorder = RunRecorder(
        run_dir,
        rows,
        plan["examples_per_epoch"],
        state_extra={"learning_rate_used": learning_rate},
        write=chief,
        train_eval_x=train_eval_x,
        batch_size=config.batch_size,
    )
    callbacks = [recorder]
    tensorboard = config.tensorboard and _tensorboard_available()
    if config.tensorboard and not tensorboard:
        print_fn(
            "keras-aevb: TensorBoard is not installed, so no logs/ are written "
            "(pip install tensorboard)"
        )
    events_check = None
    if chief and tensorboard:
        board = keras.callbacks.TensorBoard(
            log_dir=str(run_dir / "logs"), write_graph=False, update_freq="epoch"
        )
        images = ImageSummaries(run_dir / "logs" / "images", test_x, seed=config.seed)
        # Keras's TensorBoard writes logs/train and logs/validation through `_writers`.
        tb_dirs = {"train": run_dir / "logs" / "train", "val": run_dir / "logs" / "validation"}

        def writers():
            found = [(Path(tb_dirs[k]), w) for k, w in board._writers.items() if k in tb_dirs]
            return found + ([(Path(images.log_dir), images._writer)] if images._writer else [])

        events_check = EventFilesCheck(run_dir / "logs", writers)
        callbacks += [board, images, events_check]
    train_dataset = training_dataset(initial_epoch * steps_per_epoch)
    test_dataset = data_lib.make_dataset(test_x, config.batch_size, "none", shuffle=False)
    if initial_epoch:
        print_fn(f"keras-aevb: resuming {run_dir} after epoch {initial_epoch}")
    with warnings.catch_warnings():
        # Grey-pixel warnings are settled by the binarization check above.
        warnings.filterwarnings("ignore", message="Grey .non-binary. values", category=UserWarning)
        fit_kwargs = {"batch_size": config.batch_size, "shuffle": True} if array_input else {}
        try:
            model.fit(
                train_dataset,
                **fit_kwargs,
                epochs=plan["epochs"],
                initial_epoch=initial_epoch,
                steps_per_epoch=None if array_input else steps_per_epoch,
                validation_data=test_dataset,
                callbacks=callbacks,
                verbose=config.verbose,
            )
        except BaseException:
            if events_check is not None:  # no half record left for the writers to finish
                events_check.repair()
            raise
    if recorder.diverged_at is not None:
        raise ValueError(
            f"training diverged in epoch {recorder.diverged_at}: {recorder.diverged_reason} "
            f"(learning rate {learning_rate:g}); the last good epoch's checkpoint is kept. "
            "Pass a smaller --learning-rate and a new --output"
        )
    if chief:
        _save_keras_atomically(model, run_dir / "model.keras")

    examples_per_second = (
        recorder.epochs_run * plan["examples_per_epoch"] / recorder.train_seconds
        if recorder.epochs_run and recorder.train_seconds > 0
        else None
    )
    rows = recorder.rows
    if rows:
        last = rows[-1]
        speed = f"{examples_per_second:,.0f} examples/s" if examples_per_second else "no epochs run"
        print_fn(
            f"keras-aevb: {run_dir}: epoch {last['epoch']}/{plan['epochs']}, "
            f"{last['examples_seen']:,} examples; bound train {last['train_elbo']:.2f}, "
            f"test {last['test_elbo']:.2f} nats ({test_info['evaluation_binarization']}); "
            f"{speed}"
        )
    return TrainResult(
        run_dir=str(run_dir),
        config=resolved,
        history=rows,
        examples_per_second=examples_per_second,
        resumed_from_epoch=initial_epoch,
        model=model,
    )
