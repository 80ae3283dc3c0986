"""Every setting of a training run, in one place: `TrainConfig`, its choices and its presets.

`TrainConfig` is the single source of the settings' defaults and their documentation: the
`keras-aevb train` command builds its flags, their defaults and their help from these fields
(`cli_fields`), and `TrainConfig`'s docstring lists them. A preset is a named set of fields
(`PRESETS`); flags or keywords given beside it win:

    config = TrainConfig.from_preset("iwae", output="runs/iwae_k5", epochs=40)

Standard library only, so that `keras-aevb --help` answers before TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from keras_aevb._io import DataError

__all__ = [
    "BINARIZATIONS",
    "DATASETS",
    "DECODERS",
    "DEFAULT_BINARIZATION",
    "METHODS",
    "OPTIMIZERS",
    "POSTERIORS",
    "PRESETS",
    "PRIOR_NAMES",
    "RESUMABLE_CHANGES",
    "STRATEGIES",
    "TrainConfig",
    "check_same_run",
    "cli_fields",
    "default_text",
    "jsonable",
]

# The data sets and binarizations are keras_aevb.data's (which reads them from here). The
# families and priors are spelled here rather than read from keras_aevb.families.FAMILIES and
# keras_aevb.prior.PRIORS, which import TensorFlow; tests/test_cli.py checks that they agree.
DATASETS = ("mnist", "frey_face")
BINARIZATIONS = ("dynamic", "static", "threshold", "none")
POSTERIORS = (
    "normal",
    "laplace",
    "logistic",
    "student_t",
    "cauchy",
    "gumbel",
    "exponential",
    "gamma",
    "chi2",
    "log_normal",
    "weibull",
    "uniform",
    "beta",
    "kumaraswamy",
)
PRIOR_NAMES = ("standard_normal", *POSTERIORS)
DECODERS = ("auto", "bernoulli", "gaussian")
OPTIMIZERS = ("adagrad", "adam", "iwae_adam")
METHODS = ("aevb", "wake_sleep", "mcem")
STRATEGIES = ("default", "mirrored", "multi_worker")
ESTIMATORS = ("auto", "analytic_kl", "monte_carlo", "iwae")
GRADIENTS = ("reparameterization", "dreg")
DEFAULT_BINARIZATION = {"mnist": "dynamic", "frey_face": "none"}

# Named sets of settings. "paper" is Kingma & Welling's protocol (section 5): the defaults.
# "iwae" is Burda, Grosse & Salakhutdinov's (2015, section 5, and their released code, where
# the values below are read): 784-200-200-50 tanh, dynamic binarization, batch 20, the first
# 59,600 training images (the last 400 are their validation set), no weight prior, Adam with
# beta_1 = 0.99, epsilon = 1e-4 and 3^i passes at 1e-3 * 10^(-i/7), i = 0..7 (3,280 passes,
# `keras_aevb.optimizers.IWAELearningRate`), k = 5 samples in the importance-weighted bound.
PRESETS = {
    "paper": {},
    "iwae": {
        "dataset": "mnist",
        "latent_dim": 50,
        "hidden_units": (200, 200),
        "estimator": "iwae",
        "num_samples": 5,
        "batch_size": 20,
        "epochs": 3280,
        "train_examples": 59_600,
        "optimizer": "iwae_adam",
        "weight_decay": 0.0,
        "binarization": "dynamic",
    },
}


# -------------------------------------------------------------------- flag value parsers


def parse_positive_int(text):
    return _parse_int(text, 1, "a positive integer")


def parse_nonnegative_int(text):
    return _parse_int(text, 0, "an integer >= 0")


def _parse_int(text, low, expected):
    """`int(text)` if it is at least `low`; else the flag's error, naming what it expects."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def parse_nonnegative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def parse_learning_rate(text):
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'auto' or a positive number, got {text!r}"
        ) from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text!r}")
    return value


def parse_hidden_units(text):
    try:
        units = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a size or comma-separated sizes (e.g. 500 or 500,500), got {text!r}"
        ) from None
    if not units or min(units) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return units


# -------------------------------------------------------------------- the settings


def _setting(default, help, **cli):
    """A field with its documentation and how the CLI spells it.

    cli: `type` (a parser of the flag's text), `choices`, `metavar`, `flag` (other than
    --field-name), `action`, `required`, `group` (a mutually exclusive group's name),
    `default_text` (the default as --help states it, where the value alone says too little),
    `cli=False` (set from Python only).
    """
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (`keras_aevb.training.train`; `keras-aevb train -h`).

    Construct it with keywords (`TrainConfig(dataset="mnist", output="runs/nz20")`), or from a
    named preset with `TrainConfig.from_preset`.
    """

    dataset: str = _setting("mnist", "the data set", choices=DATASETS)
    output: str | None = _setting(None, "the run directory", metavar="RUN_DIR", required=True)
    data_dir: str | None = _setting(
        None,
        "directory with the data files",
        default_text="keras_aevb.data.default_data_dir(): $KERAS_AEVB_DATA_DIR, ./data/DATASET, "
        "or shared/data/DATASET in the working directory or above",
    )
    latent_dim: int = _setting(
        20, "N_z, the latent dimension (J in the paper)", type=parse_positive_int
    )
    hidden_units: tuple[int, ...] | None = _setting(
        None,
        "hidden layer size(s) of the encoder and of the decoder, e.g. 500 or 500,500",
        type=parse_hidden_units,
        default_text="the paper's: 500 MNIST, 200 Frey Face",
    )
    decoder: str = _setting(
        "auto", "p(x|z); auto: Bernoulli for MNIST, Gaussian for Frey Face", choices=DECODERS
    )
    posterior: str = _setting(
        "normal", "the family of q(z|x) (keras_aevb.FAMILIES)", choices=POSTERIORS
    )
    prior: str = _setting("standard_normal", "p(z) (keras_aevb.PRIORS)", choices=PRIOR_NAMES)
    estimator: str = _setting(
        "auto",
        "SGVB estimator B (analytic_kl, eq. 7) or A (monte_carlo, eq. 6); auto: B where the KL "
        "has a closed form (the paper's choice); iwae: the importance-weighted bound with "
        "k = --num-samples as the objective (Burda et al.)",
        choices=ESTIMATORS,
    )
    gradient: str = _setting(
        "reparameterization",
        "dreg: the doubly-reparameterized encoder gradient (Tucker et al.), with --estimator iwae",
        choices=GRADIENTS,
    )
    num_samples: int = _setting(
        1, "L (k for iwae): samples of z per datapoint", type=parse_positive_int
    )
    batch_size: int = _setting(100, "M, datapoints per minibatch", type=parse_positive_int)
    epochs: int | None = _setting(
        None,
        "passes over the training set",
        type=parse_positive_int,
        group="length",
        default_text="10",
    )
    max_examples: int | None = _setting(
        None,
        "stop after this many training examples (the x axis of the paper's Fig. 2)",
        type=parse_positive_int,
        group="length",
        default_text="none",
    )
    examples_per_epoch: int | None = _setting(
        None,
        "examples between test evaluations (history rows); smaller values give more points on "
        "the Fig. 2 curve",
        type=parse_positive_int,
        default_text="one pass over the training set",
    )
    train_examples: int | None = _setting(
        None, "use only the first N training examples", type=parse_positive_int, default_text="all"
    )
    test_examples: int | None = _setting(
        None, "use only the first N test examples", type=parse_positive_int, default_text="all"
    )
    optimizer: str = _setting(
        "adagrad",
        "adagrad: the paper's (accumulator from 0); adam; iwae_adam: Adam as Burda et al. "
        "train the IWAE (beta_1 0.99, epsilon 1e-4, the learning rate divided by 10^(1/7) after "
        "1, 3, 9, ... passes)",
        choices=OPTIMIZERS,
    )
    learning_rate: float | str = _setting(
        "auto",
        "a number, or auto: the best bound after --lr-search-steps steps among 0.01, 0.02, 0.1 "
        "(adagrad) or 3e-4, 1e-3, 3e-3 (adam); 1e-3 for iwae_adam (its schedule's start)",
        type=parse_learning_rate,
    )
    lr_candidates: tuple[float, ...] | None = _setting(
        None, "step sizes --learning-rate auto compares", cli=False
    )
    lr_search_steps: int = _setting(
        200, "steps per candidate of --learning-rate auto", type=parse_positive_int
    )
    weight_decay: float | None = _setting(
        None,
        "precision of the N(0, I) weight prior per datapoint",
        type=float,
        default_text="1/N, the paper's MAP prior",
    )
    binarization: str | None = _setting(
        None,
        "how grey pixels become binary",
        choices=BINARIZATIONS,
        default_text="dynamic for MNIST, none for Frey Face",
    )
    seed: int = _setting(
        0, "seeds the initialization, the data order, the binarization and the noise", type=int
    )
    beta: float = _setting(
        1.0,
        "weight of the KL term in the objective (1: the paper's bound); the reported elbo "
        "stays the true bound",
        type=parse_nonnegative_float,
    )
    kl_warmup: int | None = _setting(
        None,
        "raise the KL weight linearly from 0 to --beta over this many steps",
        type=parse_positive_int,
        metavar="STEPS",
        default_text="none",
    )
    free_bits: float = _setting(
        0.0,
        "floor of each latent dimension's KL in the objective, nats (0: none)",
        type=parse_nonnegative_float,
        metavar="LAMBDA",
    )
    method: str = _setting(
        "aevb", "aevb, or the baselines wake_sleep and mcem (keras_aevb.baselines)", choices=METHODS
    )
    strategy: str = _setting("default", "the tf.distribute strategy", choices=STRATEGIES)
    verbose: int = _setting(
        1,
        "0 silent, 1 progress bar, 2 one line per epoch and TensorFlow's start-up logs",
        type=int,
        choices=(0, 1, 2),
    )
    tensorboard: bool = _setting(
        True,
        "write TensorBoard logs (scalars and image grids) under RUN_DIR/logs",
        flag="--no-tensorboard",
        action="store_false",
        default_text="write them",
    )
    preset: str | None = _setting(
        None, "the preset these settings started from (`from_preset`), for the record", cli=False
    )

    def likelihood(self):
        """The decoder's likelihood: "auto" is Gaussian for Frey Face, Bernoulli otherwise."""
        if self.decoder == "auto":
            return "gaussian" if self.dataset == "frey_face" else "bernoulli"
        return self.decoder

    def check(self):
        """Refuses settings that cannot work, before anything is loaded or written.

        Returns:
            `(binarization, likelihood)`: the data set's binarization and the decoder's
            likelihood, resolved ("auto" and None become the data set's defaults).

        Raises:
            ValueError, or keras_aevb.data.DataError for an unknown data set or binarization.
        """
        self._check_values()
        self._check_objective()
        return self._check_data_and_decoder()

    def _check_values(self):
        """Each setting alone: a known choice, a positive count, a finite number."""
        import numpy as np  # not needed by --help

        def positive(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        if self.output is None:
            raise ValueError("no run directory: pass --output RUN_DIR")
        if self.dataset not in DATASETS:
            raise DataError(f"unknown dataset {self.dataset!r}; use one of {', '.join(DATASETS)}")
        for name, choices in (
            ("method", METHODS),
            ("optimizer", OPTIMIZERS),
            ("strategy", STRATEGIES),
            ("decoder", DECODERS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; use one of {choices}")
        for name in ("latent_dim", "num_samples", "batch_size", "lr_search_steps"):
            positive(name, getattr(self, name))
        for name in (
            "epochs",
            "max_examples",
            "examples_per_epoch",
            "train_examples",
            "test_examples",
            "kl_warmup",
        ):
            positive(name, getattr(self, name), allow_none=True)
        if self.epochs is not None and self.max_examples is not None:
            raise ValueError("pass either --epochs or --max-examples, not both")
        for units in self.hidden_units or ():
            positive("hidden_units", units)
        for name in ("beta", "free_bits"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.learning_rate != "auto":
            try:
                rate = float(self.learning_rate)
            except (TypeError, ValueError):
                raise ValueError(
                    f"learning rate must be 'auto' or a positive number, got {self.learning_rate!r}"
                ) from None
            if not rate > 0 or not math.isfinite(rate):
                raise ValueError(f"learning rate must be positive and finite, got {rate!r}")

    def _check_objective(self):
        """The objective's settings against the method and the optimizer."""
        if self.method != "aevb" and (
            self.estimator == "iwae" or self.gradient != "reparameterization"
        ):
            raise ValueError(
                f"--estimator iwae and --gradient dreg are AEVB's objectives; --method "
                f"{self.method} trains by its own rule: drop them"
            )
        if self.method != "aevb" and (self.beta != 1.0 or self.kl_warmup or self.free_bits):
            raise ValueError(
                f"--beta, --kl-warmup and --free-bits change AEVB's objective; --method "
                f"{self.method} trains by its own rule: drop them"
            )
        if self.optimizer == "iwae_adam" and self.lr_candidates and len(self.lr_candidates) > 1:
            raise ValueError(
                "iwae_adam follows its schedule from one starting step size: give lr_candidates "
                "one value, or --learning-rate"
            )

    def _check_data_and_decoder(self):
        """The binarization against the decoder: binary pixels for Bernoulli, grey for Gaussian."""
        binarization = self.binarization or DEFAULT_BINARIZATION[self.dataset]
        if binarization not in BINARIZATIONS:
            raise DataError(
                f"unknown binarization {binarization!r}; use one of {', '.join(BINARIZATIONS)}"
            )
        likelihood = self.likelihood()
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

    @classmethod
    def from_preset(cls, name, **settings):
        """The preset's settings (`PRESETS[name]`), with `settings` given here on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **settings, "preset": name})


def cli_fields():
    """The fields `keras-aevb train` has a flag for, in declaration order."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]


def default_text(field):
    """The default as --help states it."""
    if "default_text" in field.metadata:
        return field.metadata["default_text"]
    return str(field.default)


def _document(cls):
    lines = [cls.__doc__.rstrip(), "", "    Attributes:"]
    for field in dataclasses.fields(cls):
        lines.append(
            f"        {field.name}: {field.metadata['help']} (default: {default_text(field)})."
        )
    cls.__doc__ = "\n".join(lines) + "\n"


_document(TrainConfig)


# Settings that may change between a run and its resumption: they say how long or where to run,
# not what is trained. Every other setting must match the run directory's config.json.
RESUMABLE_CHANGES = frozenset(
    {
        "output",
        "data_dir",
        "epochs",
        "max_examples",
        "examples_per_epoch",  # checked against the run's epoch length by run_dir.plan_epochs
        "verbose",
        "strategy",
        "tensorboard",
        "preset",  # what the settings started from; the settings themselves are compared
    }
)


def check_same_run(previous, requested, run_dir):
    """Raises ValueError unless `requested` (a `jsonable` config) trains what the run directory's
    config.json (`previous`) trained: only `RESUMABLE_CHANGES` may differ."""
    before = previous.get("requested", {})
    # A setting added after the run was written had its default value then.
    defaults = jsonable(TrainConfig())
    differing = sorted(
        key
        for key in set(before) | set(requested)
        if key not in RESUMABLE_CHANGES and before.get(key, defaults.get(key)) != requested.get(key)
    )
    if differing:
        details = "; ".join(
            f"{k}: {before.get(k, defaults.get(k))!r} there, {requested.get(k)!r} now"
            for k in differing
        )
        raise ValueError(
            f"{run_dir} holds a run with other settings ({details}); rerun it with the same "
            "settings to resume, or pass a new --output"
        )


def jsonable(config: TrainConfig):
    """The settings as config.json holds them (tuples as lists)."""
    out = dataclasses.asdict(config)
    for key, value in out.items():
        if isinstance(value, tuple):
            out[key] = list(value)
    return out
