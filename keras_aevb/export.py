"""SavedModel export for TF Serving: six signatures, no Python or keras_aevb needed to serve.

The export is a plain `tf.Module` whose `tf.function`s have explicit input signatures; it holds
only the variables those functions read (no optimizer state, no seed-generator state), and every
op in it is a stock TensorFlow op (the TFP distributions used in tracing lower to plain math and
stateless random ops; no `PyFunc`). TF Serving, `saved_model_cli` and `tf.saved_model.load` in a
process without keras_aevb all run it.

Layout (TF Serving's): `<base>/<version>/saved_model.pb` and `<base>/<version>/variables/`,
`<version>` a positive integer; `next_version(base)` gives the next free one. The path given to
`export_saved_model` (and to `keras-aevb export`) is always `<base>`, the model's directory;
the version goes under it.

A version directory appears whole or not at all: the SavedModel is written into a temporary
directory beside it, `<base>/.tmp-<version>-<host>-<pid>` (TF Serving only loads all-digit
names, so it never sees one), synced to disk, and renamed into place once complete. An export
that fails or is killed leaves no version directory; the temporary directories of dead processes
(on this host) are removed by the next export into the same base.

The six signatures (`SIGNATURE_NAMES`) and the names, dtypes and shapes of their inputs and
outputs, per posterior family and decoder, are a contract written once, in docs/serving.md
("The signatures: the contract"); tests/test_docs.py compares it with real exports.

Resource caps (a request must not size the server's memory): `sample` refuses num_samples above
`MAX_SAMPLE_NUM_SAMPLES` (10,000) with INVALID_ARGUMENT; `score` runs the batch in chunks of
`SCORE_CHUNK_DRAWS // L` examples (1,000 at L = 10), one chunk at a time, so its memory beyond
the request's own tensors does not grow with the batch.

`score` is the SGVB estimate of the lower bound (paper eq. 6/7) per example, with L and the
stateless seed fixed at export, so the same x always gets the same score. Its noise
eps ~ p(eps) is drawn once per sample index l and shared by all examples of a request (common
random numbers): an example's score does not depend on its position in the batch or on the
other examples, which matters because TF Serving's batching merges requests from different
clients. For one example it is exactly `model.elbo(x[None], num_samples=L, seed=seed)`.

Inputs are checked inside the graph, so a server refuses bad requests with INVALID_ARGUMENT:
NaN or inf anywhere ("x holds NaN or inf"), values outside [0, 1] for a Bernoulli model
("x must lie in [0, 1] for a Bernoulli model"), a shape other than the signature's
(`EnsureShape`: neither a function loaded with `tf.saved_model.load` nor a C++ server checks the
signature's shape by itself), num_samples < 0 or above the cap.

Reference: Kingma & Welling, Auto-Encoding Variational Bayes, arXiv:1312.6114.
"""

import errno
import os
import pathlib
import re
import shutil
import socket

import keras
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import saved_model_pb2

from keras_aevb._io import no_space_guard
from keras_aevb.estimator import sgvb_terms
from keras_aevb.families import get_family
from keras_aevb.inputs import positive_int

__all__ = [
    "AEVBServingModule",
    "DEFAULT_SCORE_NUM_SAMPLES",
    "DEFAULT_SCORE_SEED",
    "MAX_SAMPLE_NUM_SAMPLES",
    "SCORE_CHUNK_DRAWS",
    "SIGNATURE_NAMES",
    "check_base_dir",
    "export_saved_model",
    "next_version",
]

# Defaults of `score`: L samples of z per example and the stateless seed. L = 10 cuts the Monte
# Carlo standard deviation of the reconstruction term by sqrt(10) against L = 1, for 10 decoder
# passes per example (benchmarks/serving_latency.py times it: ~0.5 ms per MNIST example on 2
# shared CPU cores, against ~0.06 ms for serving_default).
DEFAULT_SCORE_NUM_SAMPLES = 10
DEFAULT_SCORE_SEED = 0

SIGNATURE_NAMES = ("serving_default", "encode", "embed", "decode", "sample", "score")

# The most samples one `sample` request may ask for: 10,000 MNIST samples are 31 MB of float32
# x_mean; num_samples = 1e9 would need 3 TB and ended in RESOURCE_EXHAUSTED after 10 s.
MAX_SAMPLE_NUM_SAMPLES = 10_000

# `score` evaluates at most this many (example, z) pairs at once: SCORE_CHUNK_DRAWS // L examples
# per chunk (1,000 at L = 10), chunks one after another. Unchunked, a batch of 100,000 MNIST
# examples at L = 10 needed 7 GB; a chunk of the paper's model needs ~70 MB.
SCORE_CHUNK_DRAWS = 10_000

_TEMP_PREFIX = ".tmp-"
_TEMP_NAME = re.compile(r"^\.tmp-(\d+)-(.+)-(\d+)$")


class AEVBServingModule(tf.Module):
    """The exported object: `tf.function`s over the model's variables (see module docstring).

    Args:
        model: a built `keras_aevb.AEVB`.
        score_num_samples: L of the `score` signature.
        score_seed: stateless seed of `score`: an int (used as `[seed, 0]`) or an int pair.
    """

    def __init__(self, model, score_num_samples, score_seed, name="keras_aevb_serving"):
        super().__init__(name=name)
        # Not tracked by tf.Module: saving the Keras model itself would write a second copy of
        # every weight (its Keras variables) next to the tf.Variables the functions read.
        object.__setattr__(self, "_model", model)
        self._family = get_family(model.posterior)
        self._score_num_samples = int(score_num_samples)
        self._score_seed = _seed_pair(score_seed)
        event_shape = list(model.event_shape)
        x_spec = tf.TensorSpec([None, *event_shape], tf.float32, name="x")
        z_spec = tf.TensorSpec([None, model.latent_dim], tf.float32, name="z")
        # autograph=False: the bodies have no data-dependent Python control flow; the traced
        # graphs are what one reads in the code (and AutoGraph's conversion cache, keyed on code
        # objects, once handed `sample` another method's conversion in a long test session).
        self.serving_default = tf.function(
            self._serving_default, input_signature=[x_spec], autograph=False
        )
        self.encode = tf.function(self._encode, input_signature=[x_spec], autograph=False)
        self.embed = tf.function(self._embed, input_signature=[x_spec], autograph=False)
        self.decode = tf.function(self._decode, input_signature=[z_spec], autograph=False)
        # num_samples stays a dynamic graph input: sample_prior takes it as a tensor.
        self.sample = tf.function(
            self._sample,
            input_signature=[
                tf.TensorSpec([], tf.int32, name="num_samples"),
                tf.TensorSpec([2], tf.int32, name="seed"),
            ],
            autograph=False,
        )
        self.score = tf.function(self._score, input_signature=[x_spec], autograph=False)
        # Recorded in the SavedModel (loaded.score_num_samples, loaded.score_seed) so a deployment
        # can tell which estimator its scores come from.
        self.score_num_samples = tf.Variable(
            self._score_num_samples, dtype=tf.int32, trainable=False, name="score_num_samples"
        )
        self.score_seed = tf.Variable(
            self._score_seed, dtype=tf.int32, trainable=False, name="score_seed"
        )

    def concrete_functions(self):
        """The signatures as concrete functions, keyed by signature name."""
        return {name: getattr(self, name).get_concrete_function() for name in SIGNATURE_NAMES}

    # ------------------------------------------------------------------ the signatures

    def _serving_default(self, x):
        model = self._model
        x = self._checked_x(x)
        params = model.encoder(x, training=False)
        z_mean = model.posterior_layer.mean(params)
        reconstruction = model.decoder.mean(model.decoder(z_mean, training=False))
        return _float32({"reconstruction": reconstruction, "z_mean": z_mean})

    def _encode(self, x):
        return _float32(dict(self._model.encoder(self._checked_x(x), training=False)))

    def _embed(self, x):
        params = self._model.encoder(self._checked_x(x), training=False)
        return _float32({"embedding": self._model.posterior_layer.mean(params)})

    def _decode(self, z):
        z = tf.ensure_shape(z, [None, self._model.latent_dim])
        z = tf.debugging.assert_all_finite(z, "z holds NaN or inf")
        return self._decoded(z)

    def _sample(self, num_samples, seed):
        checks = [
            tf.debugging.assert_non_negative(num_samples, message="num_samples must be >= 0"),
            tf.debugging.assert_less_equal(
                num_samples,
                tf.constant(MAX_SAMPLE_NUM_SAMPLES, tf.int32),
                message=f"num_samples must be <= {MAX_SAMPLE_NUM_SAMPLES} (the export's cap; "
                "send several requests with other seeds for more)",
            ),
        ]
        with tf.control_dependencies(checks):
            # The model's own stateless prior sampler with the caller's seed: the same z as
            # AEVB.sample_z(num_samples, seed=seed) in Python.
            z = self._model.sample_z(num_samples, seed=seed)
        outputs = self._decoded(z)
        return _float32({"x_mean": outputs["x_mean"], "z": z})

    def _score(self, x):
        """Per-example SGVB bound (eq. 6 or 7, the model's estimator) with fixed L and seed.

        The batch runs in chunks of at most `SCORE_CHUNK_DRAWS // L` examples, one at a time
        (`tf.map_fn`, parallel_iterations=1), so memory stays bounded for any batch size. A
        batch no larger than a chunk is one chunk, unpadded; a larger one is padded with zeros
        to whole chunks and the padding's scores dropped. The noise does not depend on the
        batch (see `_common_noise_sample`), so chunking does not change an example's score.
        """
        x = self._checked_x(x)
        chunk = max(1, SCORE_CHUNK_DRAWS // self._score_num_samples)
        n = tf.shape(x)[0]
        size = tf.clip_by_value(n, 1, chunk)
        num_chunks = tf.maximum((n + size - 1) // size, 1)
        rank = len(self._model.event_shape)
        padded = tf.pad(x, [[0, num_chunks * size - n]] + [[0, 0]] * rank)
        chunks = tf.reshape(padded, tf.concat([[num_chunks, size], tf.shape(x)[1:]], 0))
        elbo = tf.map_fn(
            self._score_chunk,
            chunks,
            fn_output_signature=tf.TensorSpec([None], x.dtype),
            parallel_iterations=1,
        )
        return _float32({"elbo": tf.reshape(elbo, [-1])[:n]})

    def _score_chunk(self, x):
        """The bound of each example of one chunk `[size, *event_shape]` (x already checked)."""
        model = self._model
        params = model.encoder(x, training=False)
        posterior = model.posterior_layer.distribution(params)
        z = self._common_noise_sample(params)
        log_px_given_z = model.decoder.log_likelihood(x, model.decoder(z, training=False))
        terms = sgvb_terms(
            log_px_given_z, posterior, model.prior_distribution, z, model.elbo_estimator
        )
        return tf.cast(terms["elbo"], x.dtype)

    # ------------------------------------------------------------------ helpers

    def _decoded(self, z):
        decoder = self._model.decoder
        outputs = decoder(z, training=False)
        result = {"x_mean": decoder.mean(outputs)}
        if isinstance(outputs, dict):
            # Gaussian decoder: x_log_var too (and any other head a decoder has).
            result.update({k: v for k, v in outputs.items() if k != "x_mean"})
        return _float32(result)

    def _common_noise_sample(self, params):
        """z `[L, batch, latent_dim]` with the same noise for every example of the batch.

        With an explicit g (eq. 4), eps `[L, 1, latent_dim]` is drawn once from the fixed seed and
        broadcast. Families that TFP samples implicitly are sampled per example with the same
        seed (a `tf.map_fn` loop). Either way an example's z does not depend on its batch.
        """
        family = self._family
        num_samples, seed = self._score_num_samples, tf.constant(self._score_seed, tf.int32)
        reference = params[family.param_names[0]]
        latent_dim = self._model.latent_dim
        if family.g is not None:
            eps = family.noise((num_samples, 1, latent_dim), reference.dtype, seed)
            return family.sample(params, num_samples, seed, eps=eps)

        def one_example(example_params):
            batch_of_one = {k: v[None] for k, v in example_params.items()}
            return family.sample(batch_of_one, num_samples, seed)[:, 0]

        z = tf.map_fn(
            one_example,
            dict(params),
            fn_output_signature=tf.TensorSpec([num_samples, latent_dim], reference.dtype),
        )
        return tf.transpose(z, [1, 0, 2])

    def _checked_x(self, x):
        """x with its checks attached: shape, finiteness, and [0, 1] for a Bernoulli model."""
        model = self._model
        # A loaded signature function, like a C++ server, feeds any shape of the right dtype to
        # the graph (only TF1 sessions, e.g. saved_model_cli, check it): EnsureShape refuses
        # other shapes at run time, where a [n, 784] batch would otherwise be reshaped silently.
        x = tf.ensure_shape(x, [None, *model.event_shape])
        x = tf.debugging.assert_all_finite(x, "x holds NaN or inf")
        if getattr(model.decoder, "likelihood", None) == "bernoulli":
            in_range = tf.reduce_all((x >= 0.0) & (x <= 1.0))
            check = tf.debugging.Assert(
                in_range,
                [
                    "x must lie in [0, 1] for a Bernoulli model; min and max of x:",
                    tf.reduce_min(x),
                    tf.reduce_max(x),
                ],
            )
            with tf.control_dependencies([check]):
                x = tf.identity(x)
        if x.dtype != model.compute_dtype:
            x = tf.cast(x, model.compute_dtype)
        return x


def export_saved_model(
    model,
    base_dir,
    version=None,
    *,
    force=False,
    score_num_samples=DEFAULT_SCORE_NUM_SAMPLES,
    score_seed=DEFAULT_SCORE_SEED,
):
    """Writes a TF Serving SavedModel of an `AEVB` as a new version under `base_dir`.

    Args:
        model: a built `keras_aevb.AEVB`, or the path of a `.keras` file holding one.
        base_dir: the model's base directory, e.g. "saved_models/mnist_vae" (TF Serving's
            `--model_base_path`): the SavedModel goes to `<base_dir>/<version>`. Created if
            missing. (`keras-aevb export MODEL BASE_DIR` takes the same path.)
        version: the version, a positive integer; None (default): `next_version(base_dir)`.
        force: also export into a `base_dir` that looks like a version directory (an all-digit
            name, or one holding saved_model.pb) or whose newest version is another model's
            (different signatures). An existing version is never overwritten, even so.
        score_num_samples: L of the `score` signature (samples of z per example).
        score_seed: stateless seed of `score`: an int (`[seed, 0]`) or a pair of ints.

    Returns:
        The version directory written, `<base_dir>/<version>`, as a string.

    Raises:
        FileExistsError: `<base_dir>/<version>` exists and is not empty (versions are never
            overwritten).
        NotADirectoryError: `base_dir` is a file.
        ValueError: the model is not a built AEVB, its posterior has no mean, L < 1, a version
            that is not a positive integer, or (without `force`) a `base_dir` that looks like a
            version directory or holds another model.
        keras_aevb._io.DiskFullError: the disk filled up (an OSError); no version is left.
        OSError: writing failed otherwise; no version directory is left either.

    Example:
    >>> model = keras_aevb.paper_model("mnist", latent_dim=2, hidden_units=16)
    >>> path = export_saved_model(model, os.path.join(tmp, "mnist_vae"))  # .../mnist_vae/1
    >>> loaded = tf.saved_model.load(path)
    >>> sorted(loaded.signatures)
    ['decode', 'embed', 'encode', 'sample', 'score', 'serving_default']
    """
    if isinstance(model, str | os.PathLike):
        model = _load_keras_file(model)
    _check_model(model)
    score_num_samples = positive_int(score_num_samples, "score_num_samples")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise ValueError(f"version must be a positive integer, got {version!r}.")
    base = pathlib.Path(base_dir)
    check_base_dir(base, version, force)
    module = AEVBServingModule(model, score_num_samples, score_seed)
    signatures = module.concrete_functions()
    # Track exactly the variables the signatures read: the model's weights, not its optimizer
    # slots or random-generator state, which a server has no use for.
    module.model_variables = _captured_variables(signatures.values())
    return _write_version(module, signatures, pathlib.Path(base_dir), version, force)


def _write_version(module, signatures, base, version, force):
    """Saves `module` into a temporary directory, then renames it to `<base>/<version>`.

    A reader never sees a half-written version, and a failed export leaves none.
    """
    base.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(base)
    planned = version if version is not None else next_version(base)
    temp = base / f"{_TEMP_PREFIX}{planned}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)  # this process's own leftover, if any
    try:
        # A full disk, however TensorFlow reports it, becomes one DiskFullError naming the
        # version (the CLI prints that line).
        with no_space_guard(base / str(planned)):
            # No custom gradients: a server never differentiates, and tracing the gradients of
            # TFP's special functions (betainc, igammainv: the quantiles of Beta, Gamma, ...
            # priors) would multiply the export time and the graph's size for nothing.
            options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
            tf.saved_model.save(module, str(temp), signatures=signatures, options=options)
            if not force:
                _check_same_model(base, temp)
            _sync_tree(temp)
            target = _rename_into_place(temp, base, version, planned)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return str(target)


def next_version(base_dir):
    """1 + the largest integer version directory under `base_dir`; 1 if there is none."""
    base = pathlib.Path(base_dir)
    if not base.is_dir():
        return 1
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


# ---------------------------------------------------------------------------- the version path


def check_base_dir(base_dir, version=None, force=False):
    """Refuses a base path that cannot be what the caller means, before anything is written.

    The checks of `export_saved_model` on `base_dir` and `version` (see there), without a model:
    `keras-aevb export` runs them before it loads the model.
    """
    base = pathlib.Path(base_dir)
    if base.exists() and not base.is_dir():
        raise NotADirectoryError(
            f"{base} is a file; pass the model's base directory, e.g. saved_models/NAME"
        )
    if not force:
        if base.name.isdigit():
            hint = f" --version {base.name}" if version is None else ""
            raise ValueError(
                f"{base} looks like a version directory (its name is a number), but the path "
                f"is the model's base directory: versions go under it, so this would write "
                f"{base / str(version or next_version(base))}, which TF Serving cannot load. "
                f"Pass {base.parent}{hint} instead (Python: version={base.name}), or --force "
                "(force=True) for a model directory named by a number."
            )
        if (base / "saved_model.pb").exists():
            raise ValueError(
                f"{base} holds a saved_model.pb itself: it is a SavedModel (a version "
                "directory), not a model's base directory. Pass its parent or a new directory, "
                "or --force (force=True)."
            )
    if version is not None:
        target = base / str(version)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            free = next_version(base)
            raise FileExistsError(
                f"{target} already exists; exported versions are never overwritten. Pass "
                f"version={free} (--version {free}) or leave the version out for the next "
                "free one."
            )


def _signature_contract(saved_model_dir):
    """{signature: (inputs, outputs)} of a SavedModel directory, names, dtypes and shapes; None
    when it holds no readable SavedModel."""
    try:
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((pathlib.Path(saved_model_dir) / "saved_model.pb").read_bytes())
    except (OSError, DecodeError):
        return None
    if len(proto.meta_graphs) != 1:
        return None

    def specs(tensor_infos):
        return {
            name: (info.dtype, tuple(d.size for d in info.tensor_shape.dim))
            for name, info in tensor_infos.items()
        }

    contract = {
        name: (specs(signature.inputs), specs(signature.outputs))
        for name, signature in proto.meta_graphs[0].signature_def.items()
        if not name.startswith("__")
    }
    return contract or None


def _check_same_model(base, new_dir):
    """Refuses a new version whose signatures differ from the newest readable version's."""
    versions = sorted(
        (int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True
    )
    for existing in versions:
        old = _signature_contract(base / str(existing))
        if old is None:
            continue  # not a readable SavedModel: nothing to compare with
        new = _signature_contract(new_dir)
        if old != new:
            differing = sorted(
                name for name in set(old) | set(new) if old.get(name) != new.get(name)
            )
            raise ValueError(
                f"{base} holds a SavedModel of another model: version {existing} has different "
                f"signatures ({', '.join(differing)} differ in names, dtypes or shapes), and TF "
                "Serving would serve the new version in its place to the same clients. Export "
                "to another base directory, or pass --force (force=True) to add it anyway."
            )
        return


def _remove_stale_temp_dirs(base):
    """Removes the temporary directories that dead processes of this host left in `base`."""
    host = socket.gethostname()
    for path in base.iterdir():
        match = _TEMP_NAME.match(path.name)
        if not match or match.group(2) != host or not path.is_dir():
            continue
        if not _process_alive(int(match.group(3))):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _sync_tree(root):
    """fsyncs every file and directory under `root`, so that the rename publishes whole files."""
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(directory, name), os.O_RDONLY)
        _fsync(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path, flags):
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_into_place(temp, base, version, planned):
    """Renames the finished export to `<base>/<version>` (atomic); returns that path.

    Without a fixed version, a number another export took meanwhile is skipped.
    """
    candidate = planned
    while True:
        target = base / str(candidate)
        try:
            os.rename(temp, target)  # replaces only a missing or empty directory
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            if version is not None:
                free = next_version(base)
                raise FileExistsError(
                    f"{target} already exists; exported versions are never overwritten. Pass "
                    f"version={free} (--version {free}) or leave the version out."
                ) from None
            candidate = max(candidate + 1, next_version(base))
            continue
        _fsync(base, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        return target


def _load_keras_file(path):
    path = pathlib.Path(path)
    if path.suffix != ".keras":
        raise ValueError(
            f"Expected an AEVB model or the path of a .keras file, got {str(path)!r}: save the "
            "model with model.save('model.keras') first."
        )
    if not path.is_file():
        raise FileNotFoundError(f"No model file at {path}.")
    return keras.saving.load_model(path, compile=False)


def _check_model(model):
    from keras_aevb.model import AEVB

    if not isinstance(model, AEVB):
        raise ValueError(
            f"export_saved_model needs a keras_aevb.AEVB model, got {type(model).__name__}."
        )
    if not model.built:
        raise ValueError(
            "The model is not built: call it on a batch or model.build((None, *event_shape)) "
            "before exporting (models from keras_aevb.paper_model are built)."
        )
    family = get_family(model.posterior)
    params = {
        name: family.constrain[name](tf.zeros([1, model.latent_dim])) for name in family.param_names
    }
    # TFP answers "no mean" either by raising or, with allow_nan_stats (its default), with NaN
    # (Cauchy): both are refused, since serving_default's z_mean would be meaningless.
    try:
        mean = family.distribution(params).mean()
    except NotImplementedError:
        mean = None
    if mean is None or not bool(tf.reduce_all(tf.math.is_finite(mean))):
        raise ValueError(
            f"The posterior family {model.posterior!r} has no mean, but the serving signatures "
            "return z_mean (the posterior mean) and reconstruct through it: export a model "
            "whose posterior family has a mean."
        )


def _captured_variables(concrete_functions):
    seen, variables = set(), []
    for function in concrete_functions:
        for variable in function.variables:
            key = id(variable)
            if key not in seen:
                seen.add(key)
                variables.append(variable)
    # Sorted by name ("aevb_mnist/encoder/hidden_0/kernel:0", ...): the same order every export.
    return sorted(variables, key=lambda variable: variable.name)


def _seed_pair(seed):
    if isinstance(seed, int):
        return [int(seed), 0]
    pair = [int(s) for s in seed]
    if len(pair) != 2:
        raise ValueError(f"score_seed must be an int or a pair of ints, got {seed!r}.")
    return pair


def _float32(outputs):
    return {k: tf.cast(v, tf.float32) for k, v in outputs.items()}
