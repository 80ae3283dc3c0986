"""The paper's models and optimizer in one call (section 5, App. C)."""

import keras

from keras_aevb.baselines import MonteCarloEM, WakeSleep
from keras_aevb.decoder import BernoulliDecoder, GaussianDecoder
from keras_aevb.encoder import MLPEncoder
from keras_aevb.model import AEVB
from keras_aevb.optimizers import FusedAdagrad
from keras_aevb.schedules import LinearWarmup

__all__ = [
    "build_model",
    "model_for_run",
    "PAPER_DATASETS",
    "PAPER_INIT_STDDEV",
    "PAPER_MNIST_NUM_PARAMS",
    "paper_initializer",
    "paper_layers",
    "paper_model",
    "paper_optimizer",
]

# Parameter count of paper_model("mnist", latent_dim=20): encoder 784*500+500 + 2*(500*20+20),
# decoder 20*500+500 + 500*784+784.
PAPER_MNIST_NUM_PARAMS = 815_824

# The paper's data sets: event shape, decoder, hidden units, training-set size N.
PAPER_DATASETS = {
    "mnist": {"event_shape": (28, 28), "decoder": BernoulliDecoder, "hidden": 500, "N": 60_000},
    "frey_face": {"event_shape": (28, 20), "decoder": GaussianDecoder, "hidden": 200, "N": 1_765},
}

# The paper draws every parameter from N(0, 0.01). Whether 0.01 is the variance or the standard
# deviation is not said; it is read as the standard deviation, as in the authors' later code and
# most reproductions (std 0.1 saturates tanh units of a 784-wide layer at the start).
PAPER_INIT_STDDEV = 0.01


def paper_initializer(seed=None):
    """N(0, 0.01^2): the paper's initialization of every weight and bias (std read as 0.01).

    Seeded through a `keras.random.SeedGenerator`: a Keras 3 initializer seeded with an int (or
    None) returns the same values on every call, so one instance shared by all layers would
    start every weight tensor from one draw; the generator gives each call a fresh draw, and the
    sequence is reproducible from `seed`.
    """
    return keras.initializers.RandomNormal(
        mean=0.0, stddev=PAPER_INIT_STDDEV, seed=keras.random.SeedGenerator(seed)
    )


def paper_model(dataset, latent_dim, hidden_units=None, **kwargs):
    """The paper's AEVB model for "mnist" or "frey_face" (section 5, App. C).

    MNIST: 784 -> 500 tanh -> latent_dim (Gaussian q) -> 500 tanh -> 784 Bernoulli.
    Frey Face: 560 -> 200 tanh -> latent_dim -> 200 tanh -> 560 Gaussian with learned variance.
    Every weight and bias is drawn from N(0, 0.01) (read as std 0.01; see PAPER_INIT_STDDEV).

    Args:
        dataset: "mnist" or "frey_face".
        latent_dim: J (the paper uses 2, 3, 5, 10, 20 and 200).
        hidden_units: hidden layer size(s); default 500 (MNIST) or 200 (Frey Face).
        **kwargs: passed to `AEVB` (posterior, prior, estimator, num_samples, weight_decay,
            seed). `weight_decay` defaults to 1/N of the data set's training split (the paper's
            weight prior N(0, I) per datapoint; pass 0.0 to switch it off, or 1/N for your N).

    Returns:
        A built (not compiled) `AEVB`. Compile it with `paper_optimizer()` for the paper's
        Adagrad.

    Example:
    >>> model = paper_model("mnist", latent_dim=20)
    >>> model.count_params() == PAPER_MNIST_NUM_PARAMS
    True
    """
    spec = _spec(dataset)
    encoder, decoder = paper_layers(
        dataset,
        latent_dim,
        hidden_units,
        posterior=kwargs.get("posterior", "normal"),
        seed=kwargs.get("seed"),
    )
    kwargs.setdefault("weight_decay", 1.0 / spec["N"])
    model = AEVB(encoder, decoder, name=f"aevb_{dataset}", **kwargs)
    model.build((None, *spec["event_shape"]))
    return model


def _spec(dataset):
    try:
        return PAPER_DATASETS[dataset]
    except KeyError:
        raise ValueError(
            f"Unknown dataset {dataset!r}; the paper's are {sorted(PAPER_DATASETS)}."
        ) from None


def paper_layers(
    dataset,
    latent_dim,
    hidden_units=None,
    posterior="normal",
    likelihood=None,
    event_shape=None,
    seed=None,
):
    """The paper's encoder and decoder layers for a data set (App. C), N(0, 0.01) initialized.

    Args:
        dataset: "mnist" or "frey_face" (picks the defaults below).
        latent_dim: J.
        hidden_units: hidden layer size(s); default 500 (MNIST) or 200 (Frey Face).
        posterior: the encoder's posterior family.
        likelihood: "bernoulli" or "gaussian"; default: the data set's (App. C.1 / C.2).
        event_shape: shape of one datapoint; default: the data set's.
        seed: seed of the initialization's generator (None: from the global seed).

    Returns:
        `(encoder, decoder)`, not built.
    """
    spec = _spec(dataset)
    if hidden_units is None:
        hidden_units = (spec["hidden"],)
    elif isinstance(hidden_units, int):
        hidden_units = (hidden_units,)
    hidden_units = tuple(hidden_units)
    decoders = {"bernoulli": BernoulliDecoder, "gaussian": GaussianDecoder}
    decoder_class = spec["decoder"] if likelihood is None else decoders[likelihood]
    initializer = paper_initializer(seed)
    encoder = MLPEncoder(
        latent_dim,
        hidden_units=hidden_units,
        posterior=posterior,
        kernel_initializer=initializer,
        bias_initializer=initializer,
        name="encoder",
    )
    decoder = decoder_class(
        tuple(event_shape or spec["event_shape"]),
        hidden_units=tuple(reversed(hidden_units)),
        kernel_initializer=initializer,
        bias_initializer=initializer,
        name="decoder",
    )
    return encoder, decoder


def paper_optimizer(learning_rate=0.02):
    """Adagrad as the paper uses it (Duchi et al.): squared-gradient sum starting at 0.

    `keras.optimizers.Adagrad` starts the accumulator at 0.1, which with the paper's small initial
    weights shrinks early steps by orders of magnitude (DESIGN 9: about -192 vs -171 nats after
    5 epochs on 10k MNIST examples). The paper chose the step size from {0.01, 0.02, 0.1}.
    Returns a `keras_aevb.FusedAdagrad` (epsilon 1e-8 added to sqrt(accumulator), as in Duchi et
    al. and PyTorch; one fused kernel per weight).
    """
    return FusedAdagrad(learning_rate=learning_rate, initial_accumulator_value=0.0, epsilon=1e-8)


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
    """The paper's architecture (App. C) for a run's settings (`keras_aevb.training.train`),
    built and not compiled.

    Encoder and decoder are one tanh layer each (500 units MNIST, 200 Frey Face, unless
    `hidden_units`), every parameter drawn from N(0, 0.01^2) (`keras_aevb.paper`). Seed the
    initialization with `keras.utils.set_random_seed` before calling.

    Args:
        method: "aevb", or the baselines "wake_sleep" / "mcem" (`keras_aevb.baselines`).
        num_examples: N, for "mcem" (one HMC chain per training example).
        beta, kl_warmup, free_bits: the objective's KL weight, warm-up and floor (AEVB only;
            see `TrainConfig`).

    Raises:
        ValueError: a posterior/prior/estimator combination the model refuses.
    """
    encoder, decoder = paper_layers(
        dataset,
        latent_dim,
        hidden_units or None,
        posterior=posterior,
        likelihood=likelihood,
        event_shape=event_shape,
    )
    if method == "aevb":
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
        model_class = {"wake_sleep": WakeSleep, "mcem": MonteCarloEM}[method]
        kwargs = dict(
            posterior=posterior,
            prior=prior,
            num_samples=num_samples,
            weight_decay=weight_decay,
            seed=seed,
        )
        if method == "mcem":  # one HMC chain per training example
            kwargs["num_examples"] = num_examples
        model = model_class(encoder, decoder, name=f"{method}_{dataset}", **kwargs)
    model.build((None, *event_shape))
    return model


def model_for_run(config, event_shape, likelihood, weight_decay, num_examples=None):
    """`build_model` for a run's `TrainConfig` (`keras_aevb.training`): the settings the config
    holds, and those the run resolved (the data's event shape and likelihood, weight decay,
    N for Monte Carlo EM)."""
    settings = {name: getattr(config, name) for name in _MODEL_SETTINGS}
    return build_model(
        config.dataset, tuple(event_shape), config.latent_dim, likelihood=likelihood,
        weight_decay=weight_decay, num_examples=num_examples, **settings,
    )  # fmt: skip


# The `TrainConfig` fields that are `build_model` arguments of the same name.
_MODEL_SETTINGS = (
    "hidden_units", "posterior", "prior", "estimator", "num_samples", "seed", "method", "beta",
    "kl_warmup", "free_bits", "gradient",
)  # fmt: skip
