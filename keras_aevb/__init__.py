"""keras_aevb: Auto-Encoding Variational Bayes (Kingma & Welling, arXiv:1312.6114) for Keras 3.

Public API: the layers (`MLPEncoder`, `ReparameterizedPosterior`, `BernoulliDecoder`,
`GaussianDecoder`), the model (`AEVB`), the paper's set-up (`paper_model`, `paper_optimizer`,
`FusedAdagrad`), posterior families and priors (`posterior_families`, `make_prior`), the
marginal likelihood (`log_likelihood`, `hmc_log_likelihood`), the baselines (`WakeSleep`,
`MonteCarloEM`) and the TF Serving export (`export_saved_model`). Submodules: `data`,
`plotting`, `training`, `cli`, `diagnostics`.

`import keras_aevb` imports the whole package, TensorFlow included: every layer and model class
is then registered with Keras, so `keras.saving.load_model("model.keras")` works at once, and
a Keras backend other than TensorFlow is an `ImportError` with the fix. The `keras-aevb`
program (its console script, or `python -m keras_aevb`) is the one exception: there the names
stay unimported until first use (PEP 562 `__getattr__`, backend check included), and the
program imports them itself after checking its arguments, so that `keras-aevb --help` and an
argument error answer without TensorFlow's seconds of start-up.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

from keras_aevb.version import __version__  # noqa: F401 (in __all__)

# Public name -> the module that defines it.
_EXPORTS = {
    "AEVB": "model",
    "BernoulliDecoder": "decoder",
    "DataError": "data",
    "FAMILIES": "families",
    "Family": "families",
    "FusedAdagrad": "optimizers",
    "GaussianDecoder": "decoder",
    "LearnedNormalPrior": "prior",
    "MLPEncoder": "encoder",
    "MonteCarloEM": "baselines",
    "PAPER_MNIST_NUM_PARAMS": "paper",
    "PRIORS": "prior",
    "ReparameterizedPosterior": "posterior",
    "WakeSleep": "baselines",
    "export_saved_model": "export",
    "gaussian_kl": "estimator",
    "hmc_log_likelihood": "marginal_likelihood",
    "log_likelihood": "marginal_likelihood",
    "make_prior": "prior",
    "paper_initializer": "paper",
    "paper_layers": "paper",
    "paper_model": "paper",
    "paper_optimizer": "paper",
    "posterior_families": "prior",
    "pretrained": "pretrained_models",
    "sgvb_terms": "estimator",
}

__all__ = sorted([*_EXPORTS, "__version__"])

# Submodules that need no TensorFlow (the command line's own); any other is TensorFlow code.
_LIGHT_SUBMODULES = frozenset(
    {"_io", "cli", "config", "data", "plotting", "reproduce", "run_dir", "version"}
)


def _require_tensorflow_backend():
    from keras_aevb._backend import require_tensorflow_backend

    require_tensorflow_backend()


def __getattr__(name):
    if name in _EXPORTS:
        _require_tensorflow_backend()
        value = getattr(importlib.import_module(f"keras_aevb.{_EXPORTS[name]}"), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"keras_aevb.{name}"):
        # A submodule: `keras_aevb.training` works after `import keras_aevb` alone.
        if name not in _LIGHT_SUBMODULES:
            _require_tensorflow_backend()
        value = importlib.import_module(f"keras_aevb.{name}")
    else:
        raise AttributeError(f"module 'keras_aevb' has no attribute {name!r}")
    globals()[name] = value  # later reads skip this function
    return value


def __dir__():
    return sorted({*globals(), *__all__})


def _load_everything():
    """Imports every public name: registers all classes with Keras and checks the backend."""
    package = sys.modules[__name__]
    for name in __all__:
        getattr(package, name)


def _started_as_the_command_line():
    """True while the `keras-aevb` program starts: its console script or `python -m`."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    if Path(main_file).stem.removesuffix("-script") == "keras-aevb":
        return True
    # `python -m keras_aevb`: sys.argv[0] is "-m" while the module is being located.
    argv = getattr(sys, "orig_argv", ())
    return sys.argv[:1] == ["-m"] and any(
        flag == "-m" and module.split(".")[0] == "keras_aevb"
        for flag, module in zip(argv, argv[1:], strict=False)
    )


if not _started_as_the_command_line():
    _load_everything()
