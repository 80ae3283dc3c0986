"""Packaging for keras_aevb: Auto-Encoding Variational Bayes on Keras 3 + TFP."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "keras_aevb" / "version.py").read_text(), re.M
).group(1)

setup(
    name="keras_aevb",
    version=VERSION,
    description=(
        "Auto-Encoding Variational Bayes (Kingma & Welling, arXiv:1312.6114) "
        "for Keras 3, TensorFlow and TensorFlow Probability"
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["keras_aevb", "keras_aevb.*"]),
    # The pretrained models (keras_aevb.pretrained): a wheel installs them where
    # keras_aevb.pretrained_models.pretrained_dir looks for them outside a source tree.
    data_files=[
        (
            "share/keras_aevb/pretrained",
            sorted(
                str(p.relative_to(HERE)) for p in (HERE / "saved_models" / "pretrained").glob("*")
            ),
        )
    ],
    python_requires=">=3.10",
    install_requires=[
        # Tested with TensorFlow 2.21, TFP 0.25, Keras 3.15. TFP's `[tf]` extra brings
        # tf-keras, which TFP needs for its own import; this package itself uses Keras 3.
        "tensorflow>=2.16,<2.22",
        "tensorflow-probability[tf]>=0.24,<0.26",
        "keras>=3.3,<4",
        "tensorflow-datasets>=4.9",
        # tf.summary (TensorBoard logs of `keras-aevb train`); TensorFlow 2.21 does not bring it.
        "tensorboard>=2.16",
        "numpy>=1.26",
        "scipy>=1.11",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "ruff>=0.6",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
            # The gRPC PredictRequest test; 2.21 installs beside TensorFlow 2.21 unchanged.
            "tensorflow-serving-api>=2.16,<2.22",
        ],
        # Only for benchmarks/peers/ (train_throughput.py --peers); never needed by the package.
        "bench": ["jax>=0.4.30", "jaxlib>=0.4.30", "torch>=2.4"],
    },
    entry_points={"console_scripts": ["keras-aevb=keras_aevb.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
