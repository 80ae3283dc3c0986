"""Models trained with the paper's protocol, shipped with the package and loaded offline.

    >>> import keras_aevb
    >>> keras_aevb.pretrained()  # doctest: +SKIP
    ['frey_face_nz2', 'frey_face_nz20', 'mnist_nz2', 'mnist_nz20']
    >>> model = keras_aevb.pretrained("mnist_nz20")  # doctest: +SKIP
    >>> model.sample(16, seed=0).shape  # doctest: +SKIP
    TensorShape([16, 28, 28])

Each model is `saved_models/pretrained/<name>.keras` (the weights, float32, and the model's
config; no optimizer state) with `<name>.json` beside it: the protocol, the run's budget, its
history's last test bound and a reproducible test bound (`test_bound`: the mean SGVB bound with
`num_samples` draws per test example from a fixed seed, on the recorded binarization draw of the
test set), which `pretrained_test_bound` recomputes. `keras-aevb reproduce` trains them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from keras_aevb._io import atomic_write

__all__ = ["pretrained", "pretrained_dir", "pretrained_info", "pretrained_test_bound"]

# The names `keras-aevb reproduce` ships: run name -> pretrained name.
SHIPPED_RUNS = {
    "mnist_nz20_aevb": "mnist_nz20",
    "mnist_nz2_aevb": "mnist_nz2",
    "frey_face_nz2_aevb": "frey_face_nz2",
    "frey_face_nz20_aevb": "frey_face_nz20",
}
# The recorded test bound: L draws per test example, a fixed seed (see `pretrained_test_bound`).
# Enough draws that the Monte Carlo error of the mean is well under 0.1 nats: Frey Face's test
# set has 200 examples (MNIST's 10,000), with a per-example spread of several nats.
TEST_BOUND_NUM_SAMPLES = {"mnist": 100, "frey_face": 2000}
TEST_BOUND_SEED = 1234


def pretrained_dir() -> Path:
    """The directory of the shipped models: the source tree's `saved_models/pretrained`, or
    the copy an installed wheel puts under `<prefix>/share/keras_aevb/pretrained`."""
    candidates = [
        Path(__file__).resolve().parent.parent / "saved_models" / "pretrained",
        Path(sys.prefix) / "share" / "keras_aevb" / "pretrained",
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[0]


def _names(directory):
    return sorted(
        p.stem for p in directory.glob("*.json") if (directory / f"{p.stem}.keras").is_file()
    )


def pretrained_info(name: str) -> dict:
    """The JSON record of a shipped model: protocol, budget, test bounds, the command."""
    directory = pretrained_dir()
    path = directory / f"{name}.json"
    if not path.is_file() or not (directory / f"{name}.keras").is_file():
        available = ", ".join(_names(directory)) or "none (this installation ships no models)"
        raise ValueError(f"no pretrained model {name!r}; the shipped ones are: {available}")
    return json.loads(path.read_text())


def pretrained(name: str | None = None):
    """Loads a shipped pretrained model by name (uncompiled); with no name, lists the names.

    Args:
        name: e.g. "mnist_nz20" (see `pretrained()`).

    Returns:
        The `AEVB` model, ready for `encode`, `decode`, `sample`, `elbo`, `log_likelihood`
        and `export_saved_model`; compile it to train on. With no name: the sorted names.

    Raises:
        ValueError: no model of that name (the message lists the ones there are).
    """
    if name is None:
        return _names(pretrained_dir())
    pretrained_info(name)  # a clear error for an unknown name
    import keras

    import keras_aevb  # noqa: F401 (registers the package's classes with Keras)

    return keras.saving.load_model(pretrained_dir() / f"{name}.keras", compile=False)


def _test_x(info, data_dir=None):
    from keras_aevb import training

    x, _ = training.load_eval_split(
        info["dataset"], data_dir, "test", info["binarization"], seed=info["seed"]
    )
    return x


def pretrained_test_bound(model, info, data_dir=None, num_samples=None, seed=None):
    """The mean SGVB bound (estimator of the model) on the recorded test draw, nats per example.

    The test set is the one the run's history used (the same Bernoulli draw of MNIST's test
    images for dynamic binarization; Frey Face's last 200 frames); each example gets
    `num_samples` draws of z (default `TEST_BOUND_NUM_SAMPLES` of the data set) from `seed`.
    """
    x = _test_x(info, data_dir)
    if num_samples is None:
        num_samples = TEST_BOUND_NUM_SAMPLES[info["dataset"]]
    seed = TEST_BOUND_SEED if seed is None else int(seed)
    values = [
        np.asarray(model.elbo(x[i : i + 100], num_samples=num_samples, seed=seed + i))
        for i in range(0, len(x), 100)
    ]
    return float(np.mean(np.concatenate(values)))


def save_pretrained(run_dir, name, directory=None, data_dir=None, command=None):
    """Writes `<name>.keras` (weights and config only) and `<name>.json` from a finished run.

    Returns:
        The two paths written.
    """
    import keras

    import keras_aevb  # noqa: F401

    run_dir = Path(run_dir)
    directory = Path(directory) if directory is not None else pretrained_dir()
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((run_dir / "config.json").read_text())
    trained = keras.saving.load_model(run_dir / "model.keras", compile=False)
    # A fresh model from the config holds no optimizer and no training state.
    model = type(trained).from_config(trained.get_config())
    model.build((None, *config["event_shape"]))
    model.set_weights([np.asarray(w, np.float32) for w in trained.get_weights()])
    with open(run_dir / "history.csv") as f:
        header, *rows = [line.strip().split(",") for line in f if line.strip()]
    last = dict(zip(header, rows[-1], strict=True))
    info = {
        "name": name,
        "dataset": config["dataset"],
        "latent_dim": config["latent_dim"],
        "hidden_units": config["hidden_units"],
        "decoder": config["decoder"],
        "method": config["method"],
        "protocol": (
            "Kingma & Welling (2013) section 5 / App. C: N(0, 0.01) init, minibatch "
            f"{config['batch_size']}, Adagrad (accumulator from 0) at step size "
            f"{config['learning_rate_used']:g} chosen by the bound after "
            f"{config['lr_search_steps']} steps, weight decay {config['weight_decay']:.3g} (1/N), "
            f"{config['binarization']} binarization, seed {config['seed']}"
        ),
        "examples_seen": int(float(last["examples_seen"])),
        "train_seconds": float(last["seconds"]),
        "binarization": config["binarization"],
        "seed": config["seed"],
        "num_test": config["num_test"],
        "history_test_elbo": float(last["test_elbo"]),
        "history_train_elbo": float(last["train_elbo"]),
        "command": command,
        "keras_aevb_version": config["keras_aevb_version"],
    }
    model_path = directory / f"{name}.keras"
    tmp = directory / f".{name}.tmp.keras"
    model.save(tmp)
    tmp.replace(model_path)
    # The bound of the file as users load it.
    shipped = keras.saving.load_model(model_path, compile=False)
    info["test_bound"] = {
        "value": pretrained_test_bound(shipped, info, data_dir),
        "num_samples": TEST_BOUND_NUM_SAMPLES[info["dataset"]],
        "seed": TEST_BOUND_SEED,
        "test_set": config["test_binarization"],
    }
    info_path = directory / f"{name}.json"
    payload = (json.dumps(info, indent=1) + "\n").encode()
    atomic_write(info_path, lambda f: f.write(payload))
    return [model_path, info_path]
