"""Fail early, with a fix, when Keras is not running on TensorFlow.

TFP distributions, the SavedModel export and tf.data input all need TensorFlow tensors, so the
package refuses other Keras backends at import instead of failing later with an obscure error.
"""

import keras

__all__ = [
    "require_tensorflow_backend",
]


def require_tensorflow_backend():
    """Raises `ImportError` unless Keras uses the TensorFlow backend."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ImportError(
            f"keras_aevb needs Keras's TensorFlow backend, but Keras is using {backend!r}. "
            "Set the environment variable KERAS_BACKEND=tensorflow before Python imports keras "
            '(or put "backend": "tensorflow" in ~/.keras/keras.json) and start a new process.'
        )
