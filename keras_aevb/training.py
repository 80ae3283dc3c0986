"""Training runs as the paper does them (section 5): one call, one run directory, resumable.

`train(TrainConfig(...))` loads the data, builds the model, picks Adagrad's step size from
{0.01, 0.02, 0.1} "by the bound after the first iterations" if asked, trains with `model.fit`,
evaluates the bound on the test set and as many training examples after every epoch (the data
of the paper's Fig. 2) and writes the run directory (its files, their formats and how a resume
loses at most the epoch in progress: `keras_aevb.run_dir`). A failed run changes nothing in
the run directory: data, model and settings are all checked before the first file is written.

`train` runs a run's phases in order (`_train`); each phase's machinery lives in its own
module: the settings and their checks in `keras_aevb.config`, the run directory's files and the
epoch plan in `keras_aevb.run_dir`, the model factory in `keras_aevb.paper`, the step size in
`keras_aevb.step_size`, the per-epoch record and TensorBoard in `keras_aevb.callbacks`, the
cluster (TF_CONFIG, the strategy) in `keras_aevb.cluster`.

Example:
>>> result = train(TrainConfig(dataset="mnist", output="runs/nz20", epochs=3))  # doctest: +SKIP
>>> result.history[-1]["test_elbo"]  # doctest: +SKIP

Reference: Kingma & Welling, "Auto-Encoding Variational Bayes", arXiv:1312.6114, section 5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from pathlib import Path

import keras
import numpy as np

from keras_aevb import _io
from keras_aevb import data as data_lib
from keras_aevb.callbacks import (
    RunRecorder,
    bound_divergence,
    evaluate_bound,
    tensorboard_callbacks,
)
from keras_aevb.cluster import chief_value, is_chief, make_strategy, tensorboard_available
from keras_aevb.config import (
    DECODERS,
    METHODS,
    OPTIMIZERS,
    STRATEGIES,
    TrainConfig,
    check_same_run,
    jsonable,
)
from keras_aevb.data import load_eval_split
from keras_aevb.paper import build_model, model_for_run
from keras_aevb.run_dir import (
    HISTORY_COLUMNS,
    config_json,
    history_csv_bytes,
    plan_epochs,
    read_previous_run,
    save_model,
    write_bytes,
    write_json,
)
from keras_aevb.step_size import (
    LEARNING_RATE_CANDIDATES,
    LR_EVAL_EXAMPLES,
    choose_learning_rate,
    make_optimizer,
    select_learning_rate,
)

__all__ = [
    "DECODERS",
    "HISTORY_COLUMNS",
    "LEARNING_RATE_CANDIDATES",
    "METHODS",
    "OPTIMIZERS",
    "STRATEGIES",
    "RunRecorder",
    "TrainConfig",
    "TrainResult",
    "bound_divergence",
    "build_model",
    "evaluate_bound",
    "is_chief",
    "load_eval_split",
    "make_optimizer",
    "select_learning_rate",
    "train",
]


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the run directory, its resolved config and history rows."""

    run_dir: str
    config: dict
    history: list[dict]
    examples_per_second: float | None
    resumed_from_epoch: int
    model: keras.Model | None = None


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
    config.check()
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


@dataclasses.dataclass
class _Run:
    """What the phases of `_train` share: the settings, then what each phase found."""

    config: TrainConfig
    print_fn: object
    binarization: str
    likelihood: str
    strategy: object
    run_dir: Path
    previous_config: dict | None
    state: dict | None
    train_x: np.ndarray | None = None
    train_info: dict | None = None
    test_x: np.ndarray | None = None
    test_info: dict | None = None
    plan: dict | None = None
    weight_decay: float | None = None
    array_input: bool = False  # Monte Carlo EM: fit takes the training set as one array
    train_array: np.ndarray | None = None
    initial_weights: list | None = None
    model_description: dict | None = None  # the estimator and hidden units the model resolved
    learning_rate: float | None = None
    lr_bounds: dict | None = None

    @property
    def num_train(self):
        return len(self.train_x)

    @property
    def steps_per_pass(self):
        """Steps of one pass over the training set (its last batch may be short)."""
        return math.ceil(self.num_train / self.config.batch_size)

    @property
    def steps_per_epoch(self):
        """A pass over the data unless the plan says otherwise."""
        return self.plan["steps_per_epoch"] or self.steps_per_pass

    def training_dataset(self, initial_step=0):
        """The training input: one endless stream addressed by step, so a resumed run continues
        it where it stopped (and ends as the same command run without a stop would) and the
        step-size search reads the stream's beginning, as the run does."""
        if self.array_input:
            return self.train_array
        return data_lib.make_dataset(
            self.train_x,
            self.config.batch_size,
            data_lib.pipeline_binarization(self.train_info),
            shuffle=True,
            seed=self.config.seed,
            repeat=True,
            initial_step=initial_step,
        )

    def build(self):
        """A fresh model of the run's settings (uncompiled)."""
        num_examples = self.num_train if self.array_input else None
        return model_for_run(
            self.config, self.train_info["event_shape"], self.likelihood, self.weight_decay,
            num_examples,
        )  # fmt: skip


def _train(config: TrainConfig, print_fn, lock) -> TrainResult:
    run = _open_run(config, print_fn)
    _load_data(run)  # everything is checked before the first file is written
    _plan_run(run)
    _initial_model(run)
    _choose_step_size(run)
    model, initial_epoch, rows = _compiled_model(run)
    resolved = _resolved_config(run, model)
    if is_chief():
        _begin_writing(run, lock, resolved, rows)
    recorder, callbacks, events_check = _callbacks(run, rows)
    _fit(run, model, initial_epoch, callbacks, events_check)
    return _finish(run, model, recorder, resolved, initial_epoch)


def _open_run(config, print_fn):
    """Checks the settings and the run directory's earlier run; makes the strategy."""
    binarization, likelihood = config.check()
    # The strategy before any TensorFlow op (data loading, the initial model and the step-size
    # search all run some): MultiWorkerMirroredStrategy must configure the collectives first.
    strategy = make_strategy(config.strategy)
    run_dir = Path(config.output)
    previous_config, state = read_previous_run(run_dir)
    if previous_config is not None:
        check_same_run(previous_config, jsonable(config), run_dir)
    return _Run(
        config, print_fn, binarization, likelihood, strategy, run_dir, previous_config, state
    )


def _load_data(run):
    config = run.config
    run.train_x, run.train_info = data_lib.load_dataset(
        config.dataset, config.data_dir, "train", run.binarization, seed=config.seed
    )
    if config.train_examples is not None:
        run.train_x = run.train_x[: config.train_examples]
    run.test_x, run.test_info = load_eval_split(
        config.dataset,
        config.data_dir,
        "test",
        run.binarization,
        seed=config.seed,
        num_examples=config.test_examples,
    )


def _plan_run(run):
    """Epochs, weight decay and the input form (a stream, or Monte Carlo EM's fixed array)."""
    config, num_train = run.config, run.num_train
    # A resume keeps the run's epoch length; a run with no checkpoint yet plans afresh.
    previous = run.previous_config if run.state is not None else None
    run.plan = plan_epochs(num_train, config, previous)
    run.weight_decay = (
        1.0 / num_train if config.weight_decay is None else float(config.weight_decay)
    )
    # Monte Carlo EM keeps one HMC chain per training example, so its fit takes the training
    # set as one fixed array: dynamic binarization becomes one fixed draw there.
    run.array_input = config.method == "mcem"
    if run.array_input:
        run.train_array = data_lib.fixed_subset(run.train_x, run.train_info, num_train, config.seed)
        if run.plan["repeat"]:
            raise ValueError(
                "--method mcem trains in whole passes over its training array: drop "
                "--examples-per-epoch, and give --max-examples of at least one pass "
                f"({num_train} examples)"
            )


def _initial_model(run):
    """The initial weights every step-size candidate and the run start from; the decoder's
    data check (grey pixels to a Bernoulli decoder, binary ones to a Gaussian one)."""
    keras.utils.set_random_seed(run.config.seed)
    initial = run.build()
    run.initial_weights = initial.get_weights()
    hidden = [layer.units for layer in getattr(initial.encoder, "hidden_layers", [])]
    run.model_description = {
        "estimator": getattr(initial, "estimator", None),
        "hidden_units": hidden or list(run.config.hidden_units or ()),
    }
    message = initial.decoder.check_data(run.test_x[: min(len(run.test_x), 1000)])
    if message and run.likelihood == "gaussian":
        warnings.warn(message, UserWarning, stacklevel=3)


def _choose_step_size(run):
    """The run's step size: a resumed run's, the one candidate, the search's, or the given."""
    config = run.config

    def search(candidates):
        eval_x = data_lib.fixed_subset(run.train_x, run.train_info, LR_EVAL_EXAMPLES, config.seed)
        return select_learning_rate(
            run.build, run.initial_weights, run.training_dataset, eval_x,
            optimizer=config.optimizer, candidates=candidates, steps=config.lr_search_steps,
            seed=config.seed, batch_size=config.batch_size, print_fn=run.print_fn,
        )  # fmt: skip

    resuming = run.state is not None
    learning_rate, run.lr_bounds = choose_learning_rate(
        config, run.previous_config, resuming, search
    )
    run.learning_rate = chief_value(run.strategy, learning_rate)


def _compiled_model(run):
    """The model that trains, under the strategy, restored from the checkpoint if any.

    Returns:
        `(model, initial_epoch, history rows so far)`.
    """
    config = run.config
    keras.utils.set_random_seed(config.seed)
    with run.strategy.scope():
        model = run.build()
        model.set_weights(run.initial_weights)
        optimizer = make_optimizer(config.optimizer, run.learning_rate, run.steps_per_pass)
        model.compile(optimizer=optimizer)
        if run.state is None:
            return model, 0, []
        model.optimizer.build(model.trainable_variables)
        model.load_weights(run.run_dir / "checkpoints" / run.state["weights"])
    return model, int(run.state["epoch"]), list(run.state["history"])


def _resolved_config(run, model):
    """config.json (`run_dir.config_json`): the settings and what the run resolved."""
    config, plan, binarization = run.config, run.plan, run.binarization
    return config_json(config, model, {
        "learning_rate_used": run.learning_rate,
        "learning_rate_search": run.lr_bounds,
        "binarization": binarization,
        "test_binarization": run.test_info["evaluation_binarization"],
        "train_binarization": (
            f"one fixed draw (seed {config.seed}) of the training set"
            if run.array_input and binarization == "dynamic"
            else binarization
        ),
        "decoder": run.likelihood,
        **run.model_description,
        "weight_decay": run.weight_decay,
        "num_train": run.num_train,
        "num_test": int(len(run.test_x)),
        "event_shape": list(run.train_info["event_shape"]),
        "data_dir": None if config.data_dir is None else str(Path(config.data_dir).resolve()),
        "data_source": run.train_info["source"],
        "epochs": plan["epochs"],
        "examples_per_epoch": plan["examples_per_epoch"],
        "steps_per_epoch": plan["steps_per_epoch"],
    })  # fmt: skip


def _begin_writing(run, lock, resolved, rows):
    """From here on the run directory is written: config.json and the history so far."""
    lock.begin_writing()  # the PID into .lock; temporary files of dead processes go
    # A run killed between committing a checkpoint and deleting the one it replaced left
    # both: the one state.json names is in place, so the other goes.
    for old in sorted((run.run_dir / "checkpoints").glob("*.weights.h5")):
        if run.state is not None and old.name != run.state["weights"]:
            _io.remove(old)
    write_json(run.run_dir / "config.json", resolved)
    write_bytes(run.run_dir / "history.csv", history_csv_bytes(rows))


def _callbacks(run, rows):
    """The recorder (history rows and checkpoints) and TensorBoard's callbacks.

    Returns:
        `(recorder, callbacks, events_check or None)`.
    """
    config, run_dir, chief = run.config, run.run_dir, is_chief()
    # The training bound of history.csv: measured after each epoch, like the test bound, on as
    # many fixed training examples as there are test examples (same noise level).
    train_eval_x = data_lib.fixed_subset(run.train_x, run.train_info, len(run.test_x), config.seed)
    recorder = RunRecorder(
        run_dir,
        rows,
        run.plan["examples_per_epoch"],
        state_extra={"learning_rate_used": run.learning_rate},
        write=chief,
        train_eval_x=train_eval_x,
        batch_size=config.batch_size,
    )
    tensorboard = config.tensorboard and tensorboard_available()
    if config.tensorboard and not tensorboard:
        run.print_fn(
            "keras-aevb: TensorBoard is not installed, so no logs/ are written "
            "(pip install tensorboard)"
        )
    if not (chief and tensorboard):
        return recorder, [recorder], None
    board, events_check = tensorboard_callbacks(run_dir / "logs", run.test_x, config.seed)
    return recorder, [recorder, *board], events_check


def _fit(run, model, initial_epoch, callbacks, events_check):
    config = run.config
    train_dataset = run.training_dataset(initial_epoch * run.steps_per_epoch)
    test_dataset = data_lib.make_dataset(run.test_x, config.batch_size, "none", shuffle=False)
    if initial_epoch:
        run.print_fn(f"keras-aevb: resuming {run.run_dir} after epoch {initial_epoch}")
    with warnings.catch_warnings():
        # Grey-pixel warnings are settled by the binarization check of TrainConfig.check.
        warnings.filterwarnings("ignore", message="Grey .non-binary. values", category=UserWarning)
        fit_kwargs = {"batch_size": config.batch_size, "shuffle": True} if run.array_input else {}
        try:
            model.fit(
                train_dataset,
                **fit_kwargs,
                epochs=run.plan["epochs"],
                initial_epoch=initial_epoch,
                steps_per_epoch=None if run.array_input else run.steps_per_epoch,
                validation_data=test_dataset,
                callbacks=callbacks,
                verbose=config.verbose,
            )
        except BaseException:
            if events_check is not None:  # no half record left for the writers to finish
                events_check.repair()
            raise


def _finish(run, model, recorder, resolved, initial_epoch):
    """Divergence is an error; otherwise model.keras, the one-line summary and the result."""
    if recorder.diverged_at is not None:
        raise ValueError(
            f"training diverged in epoch {recorder.diverged_at}: {recorder.diverged_reason} "
            f"(learning rate {run.learning_rate:g}); the last good epoch's checkpoint is kept. "
            "Pass a smaller --learning-rate and a new --output"
        )
    if is_chief():
        save_model(model, run.run_dir / "model.keras")
    plan = run.plan
    examples_per_second = (
        recorder.epochs_run * plan["examples_per_epoch"] / recorder.train_seconds
        if recorder.epochs_run and recorder.train_seconds > 0
        else None
    )
    rows = recorder.rows
    if rows:
        last = rows[-1]
        speed = f"{examples_per_second:,.0f} examples/s" if examples_per_second else "no epochs run"
        run.print_fn(
            f"keras-aevb: {run.run_dir}: epoch {last['epoch']}/{plan['epochs']}, "
            f"{last['examples_seen']:,} examples; bound train {last['train_elbo']:.2f}, "
            f"test {last['test_elbo']:.2f} nats ({run.test_info['evaluation_binarization']}); "
            f"{speed}"
        )
    return TrainResult(
        run_dir=str(run.run_dir),
        config=resolved,
        history=rows,
        examples_per_second=examples_per_second,
        resumed_from_epoch=initial_epoch,
        model=model,
    )
