"""keras_aevb: Auto-Encoding Variational Bayes (Kingma & Welling, arXiv:1312.6114) for Keras 3.

Public API: the layers (`MLPEncoder`, `ReparameterizedPosterior`, `BernoulliDecoder`,
`GaussianDecoder`), the model (`AEVB`) and the paper's set-up (`paper_model`, `paper_optimizer`).
"""

from keras_aevb._backend import require_tensorflow_backend

require_tensorflow_backend()

from keras_aevb.decoder import BernoulliDecoder, GaussianDecoder  # noqa: E402
from keras_aevb.encoder import MLPEncoder  # noqa: E402
from keras_aevb.estimator import gaussian_kl, sgvb_terms  # noqa: E402
from keras_aevb.families import FAMILIES, Family  # noqa: E402
from keras_aevb.model import AEVB  # noqa: E402
from keras_aevb.paper import (  # noqa: E402
    PAPER_MNIST_NUM_PARAMS,
    paper_initializer,
    paper_model,
    paper_optimizer,
)
from keras_aevb.posterior import ReparameterizedPosterior  # noqa: E402
from keras_aevb.prior import PRIORS, make_prior  # noqa: E402
from keras_aevb.version import __version__  # noqa: E402

__all__ = [
    "AEVB",
    "BernoulliDecoder",
    "FAMILIES",
    "Family",
    "GaussianDecoder",
    "MLPEncoder",
    "PAPER_MNIST_NUM_PARAMS",
    "PRIORS",
    "ReparameterizedPosterior",
    "__version__",
    "gaussian_kl",
    "make_prior",
    "paper_initializer",
    "paper_model",
    "paper_optimizer",
    "sgvb_terms",
]
