"""keras_aevb: Auto-Encoding Variational Bayes (Kingma & Welling, arXiv:1312.6114) for Keras 3.

Public API: the layers (`MLPEncoder`, `ReparameterizedPosterior`, `BernoulliDecoder`,
`GaussianDecoder`), the model (`AEVB`), the paper's set-up (`paper_model`, `paper_optimizer`,
`FusedAdagrad`), posterior families and priors (`posterior_families`, `make_prior`), the
marginal likelihood (`log_likelihood`, `hmc_log_likelihood`), the baselines (`WakeSleep`,
`MonteCarloEM`) and the TF Serving export (`export_saved_model`). Submodules: `data`,
`plotting`, `training`, `cli`, `diagnostics`.
"""

from keras_aevb._backend import require_tensorflow_backend

require_tensorflow_backend()

from keras_aevb.baselines import MonteCarloEM, WakeSleep  # noqa: E402
from keras_aevb.decoder import BernoulliDecoder, GaussianDecoder  # noqa: E402
from keras_aevb.encoder import MLPEncoder  # noqa: E402
from keras_aevb.estimator import gaussian_kl, sgvb_terms  # noqa: E402
from keras_aevb.export import export_saved_model  # noqa: E402
from keras_aevb.families import FAMILIES, Family, posterior_families  # noqa: E402
from keras_aevb.marginal_likelihood import hmc_log_likelihood, log_likelihood  # noqa: E402
from keras_aevb.model import AEVB  # noqa: E402
from keras_aevb.optimizers import FusedAdagrad  # noqa: E402
from keras_aevb.paper import (  # noqa: E402
    PAPER_MNIST_NUM_PARAMS,
    paper_initializer,
    paper_layers,
    paper_model,
    paper_optimizer,
)
from keras_aevb.posterior import ReparameterizedPosterior  # noqa: E402
from keras_aevb.prior import PRIORS, LearnedNormalPrior, make_prior  # noqa: E402
from keras_aevb.version import __version__  # noqa: E402

__all__ = [
    "AEVB",
    "BernoulliDecoder",
    "FAMILIES",
    "Family",
    "FusedAdagrad",
    "GaussianDecoder",
    "LearnedNormalPrior",
    "MLPEncoder",
    "MonteCarloEM",
    "PAPER_MNIST_NUM_PARAMS",
    "PRIORS",
    "ReparameterizedPosterior",
    "WakeSleep",
    "__version__",
    "export_saved_model",
    "gaussian_kl",
    "hmc_log_likelihood",
    "log_likelihood",
    "make_prior",
    "paper_initializer",
    "paper_layers",
    "paper_model",
    "paper_optimizer",
    "posterior_families",
    "sgvb_terms",
]
