"""SavedModel export for TF Serving (issue 7): contract, fresh process, saved_model_cli, requests.

Models are tiny (hidden 16, latent 2) with Glorot weights, so that outputs vary across examples
and a wrong wiring shows. Tolerances: a deterministic signature runs the same float32 ops as the
Keras method, in a graph instead of eagerly; fused kernels can round differently, by ~1e-7 on
values of order 1, so 1e-5 (the issue's figure) has a wide margin. Bounds are sums over 784 pixels
(~500 nats), whose float32 rounding is ~5e-5 absolute: compared with rtol 1e-5.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

import keras_aevb
from keras_aevb import export as export_module
from keras_aevb._io import DiskFullError
from keras_aevb.export import (
    DEFAULT_SCORE_NUM_SAMPLES,
    DEFAULT_SCORE_SEED,
    SIGNATURE_NAMES,
    export_saved_model,
    next_version,
)
from keras_aevb.families import FAMILIES, get_family

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLIENT = ROOT / "tests" / "serving_client.py"
LATENT = 2
BERNOULLI_EVENT = (28, 28)
GAUSSIAN_EVENT = (28, 20)  # Frey Face's shape
STATEFUL_RANDOM_OPS = {
    "RandomStandardNormal", "RandomUniform", "RandomUniformInt", "TruncatedNormal",
    "ParameterizedTruncatedNormal", "RandomGamma", "RandomPoisson", "RandomPoissonV2",
    "Multinomial", "RandomShuffle", "StatefulStandardNormalV2", "StatefulUniform",
    "StatefulUniformInt", "StatefulUniformFullInt", "StatefulTruncatedNormal",
}  # fmt: skip


def tiny_model(event, decoder_cls, posterior="normal", prior="standard_normal", **kwargs):
    init = keras.initializers.GlorotUniform(seed=0)
    encoder = keras_aevb.MLPEncoder(LATENT, (16,), posterior=posterior, kernel_initializer=init)
    decoder = decoder_cls(event, (16,), kernel_initializer=init)
    model = keras_aevb.AEVB(encoder, decoder, posterior=posterior, prior=prior, seed=0, **kwargs)
    model.build((None, *event))
    return model


def binary_x(n=5, event=BERNOULLI_EVENT, seed=0):
    return (np.random.default_rng(seed).random((n, *event)) < 0.3).astype(np.float32)


def grey_x(n=5, event=GAUSSIAN_EVENT, seed=0):
    return np.random.default_rng(seed).random((n, *event)).astype(np.float32)


class Export:
    def __init__(self, model, path, x):
        self.model, self.path, self.x = model, path, x
        self.loaded = tf.saved_model.load(path)

    def __call__(self, signature, **inputs):
        outputs = self.loaded.signatures[signature](
            **{k: tf.convert_to_tensor(v) for k, v in inputs.items()}
        )
        return {k: v.numpy() for k, v in outputs.items()}


@pytest.fixture(scope="module")
def bernoulli(tmp_path_factory):
    model = tiny_model(BERNOULLI_EVENT, keras_aevb.BernoulliDecoder)
    base = tmp_path_factory.mktemp("saved_models") / "mnist_vae"
    return Export(model, export_saved_model(model, base), binary_x())


@pytest.fixture(scope="module")
def gaussian(tmp_path_factory):
    # Estimator A (Monte Carlo KL) here, B (analytic KL) in the Bernoulli model: score covers both.
    model = tiny_model(GAUSSIAN_EVENT, keras_aevb.GaussianDecoder, estimator="monte_carlo")
    base = tmp_path_factory.mktemp("saved_models") / "frey_vae"
    return Export(model, export_saved_model(model, base), grey_x())


@pytest.fixture(params=["bernoulli", "gaussian"])
def export(request):
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------- the contract


def _specs(structure):
    return {name: (spec.dtype, tuple(spec.shape.as_list())) for name, spec in structure.items()}


def test_layout_and_signature_contract(bernoulli, gaussian):
    for export, event, extra in ((bernoulli, BERNOULLI_EVENT, {}), (gaussian, GAUSSIAN_EVENT, {})):
        path = pathlib.Path(export.path)
        assert (path / "saved_model.pb").is_file() and (path / "variables").is_dir()
        signatures = export.loaded.signatures
        assert sorted(signatures) == sorted(SIGNATURE_NAMES)
        x = {"x": (tf.float32, (None, *event))}
        latent = (None, LATENT)
        expected = {
            "serving_default": (x, {"reconstruction": (None, *event), "z_mean": latent}),
            "encode": (x, {"z_mean": latent, "z_log_var": latent}),
            "embed": (x, {"embedding": latent}),
            "decode": (
                {"z": (tf.float32, latent)},
                {"x_mean": (None, *event)}
                | ({"x_log_var": (None, *event)} if export is gaussian else extra),
            ),
            "sample": (
                {"num_samples": (tf.int32, ()), "seed": (tf.int32, (2,))},
                {"x_mean": (None, *event), "z": latent},
            ),
            "score": (x, {"elbo": (None,)}),
        }
        for name, (inputs, outputs) in expected.items():
            function = signatures[name]
            assert _specs(function.structured_input_signature[1]) == inputs, name
            got = _specs(function.structured_outputs)
            assert got == {k: (tf.float32, shape) for k, shape in outputs.items()}, name


def test_only_stock_tensorflow_ops_and_no_pyfunc(bernoulli, gaussian):
    for export in (bernoulli, gaussian):
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((pathlib.Path(export.path) / "saved_model.pb").read_bytes())
        (meta_graph,) = proto.meta_graphs
        graph = meta_graph.graph_def
        functions = {f.signature.name for f in graph.library.function}
        op_types = {node.op for node in graph.node}
        for function in graph.library.function:
            op_types.update(node.op for node in function.node_def)
        assert not op_types & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
        # Every op is a registered TensorFlow op (or a call of a function in the graph's own
        # library): nothing a C++ server without this Python package could not run.
        unknown = {op for op in op_types - functions if op_def_registry.get(op) is None}
        assert not unknown, unknown
        # The graph does sample (score, sample), only with stateless ops seeded by its inputs or
        # constants: no stateful random op, whose draws would change from call to call.
        assert {op for op in op_types if op.startswith("StatelessRandom")}
        assert not op_types & STATEFUL_RANDOM_OPS


def test_only_the_weights_are_saved(bernoulli):
    reader = tf.train.load_checkpoint(str(pathlib.Path(bernoulli.path) / "variables" / "variables"))
    shapes = reader.get_variable_to_shape_map()
    saved = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("model_variables/"))
    assert saved == bernoulli.model.count_params()
    # Nothing else but the two recorded score settings (no optimizer or seed-generator state,
    # no second copy of the Keras variables).
    others = {k.split("/")[0] for k in shapes} - {"model_variables", "_CHECKPOINTABLE_OBJECT_GRAPH"}
    assert others == {"score_num_samples", "score_seed"}


# ---------------------------------------------------------------------------- values


def test_deterministic_signatures_match_the_keras_model(export):
    model, x = export.model, export.x
    served = export("serving_default", x=x)
    np.testing.assert_allclose(served["reconstruction"], model.reconstruct(x), atol=1e-5)
    params = model.encode(x)
    posterior_mean = model.posterior_layer.mean(params)
    np.testing.assert_allclose(served["z_mean"], posterior_mean, atol=1e-5)
    np.testing.assert_allclose(export("embed", x=x)["embedding"], model.embed(x), atol=1e-5)
    encoded = export("encode", x=x)
    assert sorted(encoded) == sorted(model.posterior_layer.param_names)
    for name, value in params.items():
        np.testing.assert_allclose(encoded[name], value, atol=1e-5)
    z = np.random.default_rng(1).normal(size=(7, LATENT)).astype(np.float32)
    decoded = export("decode", z=z)
    np.testing.assert_allclose(decoded["x_mean"], model.decode(z), atol=1e-5)
    if model.decoder.likelihood == "gaussian":
        np.testing.assert_allclose(decoded["x_log_var"], model.decoder(z)["x_log_var"], atol=1e-5)
    # The encoder's outputs vary across examples: the comparison above is not of constants.
    assert np.ptp(served["z_mean"], axis=0).min() > 1e-3


def test_sample_is_stateless_and_matches_model_sample(export):
    model = export.model
    seed = np.array([3, 4], np.int32)
    first = export("sample", num_samples=np.int32(6), seed=seed)
    again = export("sample", num_samples=np.int32(6), seed=seed)
    for name in ("x_mean", "z"):
        np.testing.assert_array_equal(first[name], again[name])
    np.testing.assert_allclose(first["z"], model.sample_z(6, seed=seed), atol=1e-5)
    np.testing.assert_allclose(first["x_mean"], model.sample(6, seed=seed), atol=1e-5)
    np.testing.assert_allclose(first["x_mean"], export("decode", z=first["z"])["x_mean"], atol=1e-6)
    other = export("sample", num_samples=np.int32(6), seed=np.array([3, 5], np.int32))
    assert not np.allclose(other["z"], first["z"])
    # num_samples is dynamic: any count, zero included, from the one graph.
    for n in (0, 1, 33):
        assert export("sample", num_samples=np.int32(n), seed=seed)["z"].shape == (n, LATENT)


def test_score_is_the_models_bound_per_example_and_independent_of_the_batch(export):
    model, x = export.model, export.x
    assert int(export.loaded.score_num_samples.numpy()) == DEFAULT_SCORE_NUM_SAMPLES
    np.testing.assert_array_equal(export.loaded.score_seed.numpy(), [DEFAULT_SCORE_SEED, 0])
    score = export("score", x=x)["elbo"]
    assert score.shape == (len(x),)
    expected = [
        model.elbo(x[i : i + 1], num_samples=DEFAULT_SCORE_NUM_SAMPLES, seed=DEFAULT_SCORE_SEED)[0]
        for i in range(len(x))
    ]
    np.testing.assert_allclose(score, expected, rtol=1e-5)
    # Same x, same score: repeated, reordered, or sent alone (TF Serving's batching merges
    # requests, so an example's batch-mates are not the client's choice).
    np.testing.assert_array_equal(export("score", x=x)["elbo"], score)
    order = np.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(export("score", x=x[order])["elbo"], score[order], rtol=1e-6)
    np.testing.assert_allclose(export("score", x=x[2:3])["elbo"], score[2:3], rtol=1e-6)
    # Scores differ across examples: a score that ignored x would pass none of the above.
    assert np.ptp(score) > 1e-3


def test_score_settings_are_arguments_of_the_export(tmp_path):
    model = tiny_model(BERNOULLI_EVENT, keras_aevb.BernoulliDecoder)
    x = binary_x(3)
    loaded = tf.saved_model.load(
        export_saved_model(model, tmp_path / "m", score_num_samples=3, score_seed=(5, 7))
    )
    assert int(loaded.score_num_samples.numpy()) == 3
    np.testing.assert_array_equal(loaded.score_seed.numpy(), [5, 7])
    score = loaded.signatures["score"](x=tf.constant(x))["elbo"].numpy()
    seed = np.array([5, 7], np.int32)
    expected = [model.elbo(x[i : i + 1], num_samples=3, seed=seed)[0] for i in range(3)]
    np.testing.assert_allclose(score, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="score_num_samples must be a positive integer"):
        export_saved_model(model, tmp_path / "m", score_num_samples=0)


def test_score_of_an_iwae_model_is_its_elbo_with_the_analytic_kl(tmp_path):
    # An IWAE model trains on L_k but reports the ELBO with estimator B where TFP has the KL
    # (`model.elbo`); the export's score is that same number, not estimator A's.
    model = tiny_model(
        BERNOULLI_EVENT, keras_aevb.BernoulliDecoder, estimator="iwae", num_samples=3
    )
    x = binary_x(3)
    loaded = tf.saved_model.load(
        export_saved_model(model, tmp_path / "m", score_num_samples=2, score_seed=(5, 7))
    )
    score = loaded.signatures["score"](x=tf.constant(x))["elbo"].numpy()
    seed = np.array([5, 7], np.int32)
    expected = [model.elbo(x[i : i + 1], num_samples=2, seed=seed)[0] for i in range(3)]
    # float32 sums over 784 pixels: 1e-5 relative is a few ulps of ~540 nats (as the test above);
    # estimator A's KL differs from B's by far more (the test below checks it does).
    np.testing.assert_allclose(score, expected, rtol=1e-5)
    assert np.max(np.abs(np.asarray(expected) - _monte_carlo_elbo(model, x, seed))) > 1e-3


def _monte_carlo_elbo(model, x, seed):
    from keras_aevb.estimator import sgvb_terms

    values = []
    for i in range(len(x)):
        params = model.encode(x[i : i + 1])
        z = model.posterior_layer.sample(params, 2, seed=seed)
        posterior = model.posterior_layer.distribution(params)
        log_px = model.decoder.log_likelihood(x[i : i + 1], model.decoder(z))
        terms = sgvb_terms(log_px, posterior, model.prior_distribution, z, "monte_carlo")
        values.append(float(terms["elbo"][0]))
    return np.array(values)


# ---------------------------------------------------------------------------- bad input


def _refused(export, signature, match, **inputs):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        export(signature, **inputs)


@pytest.mark.parametrize("signature", ["serving_default", "encode", "score"])
def test_bad_x_is_refused_with_a_message_naming_the_problem(bernoulli, gaussian, signature):
    x = bernoulli.x.copy()
    x[1, 3, 4] = np.nan
    _refused(bernoulli, signature, "x holds NaN or inf", x=x)
    x[1, 3, 4] = np.inf
    _refused(bernoulli, signature, "x holds NaN or inf", x=x)
    for value in (1.5, -0.25):
        x[1, 3, 4] = value
        _refused(bernoulli, signature, r"x must lie in \[0, 1\] for a Bernoulli model", x=x)
    _refused(
        gaussian,
        signature,
        "x holds NaN or inf",
        x=np.full((2, *GAUSSIAN_EVENT), -np.inf, np.float32),
    )
    # Wrong shapes: the signature's shape, checked in the graph (EnsureShape), so also where a
    # server feeds the graph directly; a flattened (784,) input is refused as well.
    for shape in ((2, 27, 28), (2, 784), (28, 28)):
        _refused(
            bernoulli,
            signature,
            "not compatible with expected shape",
            x=np.zeros(shape, np.float32),
        )
    # Wrong dtype: refused by the signature, no silent cast.
    _refused(bernoulli, signature, "expected to be a float", x=bernoulli.x.astype(np.float64))


def test_bad_z_num_samples_and_seed_are_refused(bernoulli):
    z = np.zeros((3, LATENT), np.float32)
    z[0, 1] = np.nan
    _refused(bernoulli, "decode", "z holds NaN or inf", z=z)
    _refused(bernoulli, "decode", "not compatible", z=np.zeros((3, LATENT + 1), np.float32))
    seed = np.array([1, 2], np.int32)
    _refused(bernoulli, "sample", "num_samples must be >= 0", num_samples=np.int32(-1), seed=seed)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError, TypeError)):
        bernoulli("sample", num_samples=np.int32(2), seed=np.array([1, 2, 3], np.int32))
    _refused(bernoulli, "sample", "expected to be a int", num_samples=np.int64(2), seed=seed)


def test_sample_num_samples_is_capped(bernoulli):
    # 10,000 MNIST samples are 31 MB of float32 output; 1e9 asked for 3 TB and ran out of
    # memory after 10 s. The cap is checked in the graph: a server answers INVALID_ARGUMENT.
    assert export_module.MAX_SAMPLE_NUM_SAMPLES == 10_000
    seed = np.array([3, 4], np.int32)
    at_cap = bernoulli("sample", num_samples=np.int32(10_000), seed=seed)
    np.testing.assert_allclose(at_cap["z"], bernoulli.model.sample_z(10_000, seed=seed), atol=1e-5)
    for too_many in (10_001, 10**9):
        _refused(
            bernoulli,
            "sample",
            "num_samples must be <= 10000",
            num_samples=np.int32(too_many),
            seed=seed,
        )


def test_score_of_a_large_batch_runs_in_chunks_with_the_same_numbers(bernoulli, tmp_path):
    model, x = bernoulli.model, binary_x(7, seed=3)
    # Chunks of 2 examples (20 draws of z at L = 10): 4 chunks, the last one padded.
    original = export_module.SCORE_CHUNK_DRAWS
    export_module.SCORE_CHUNK_DRAWS = 2 * DEFAULT_SCORE_NUM_SAMPLES
    try:
        chunked = tf.saved_model.load(export_saved_model(model, tmp_path / "chunked"))
    finally:
        export_module.SCORE_CHUNK_DRAWS = original
    score = chunked.signatures["score"](x=tf.constant(x))["elbo"].numpy()
    assert score.shape == (7,)
    # Against the default export, where 7 examples are one chunk: the same per-example graph
    # and noise, run on 2 rows instead of 7, gives the same numbers (equal here; a BLAS that
    # summed another row count in another order could differ in the last float32 digit).
    np.testing.assert_array_equal(score, bernoulli("score", x=x)["elbo"])
    expected = [
        model.elbo(x[i : i + 1], num_samples=DEFAULT_SCORE_NUM_SAMPLES, seed=0)[0]
        for i in range(len(x))
    ]
    np.testing.assert_allclose(score, expected, rtol=1e-5)
    assert np.ptp(score) > 1e-3
    # A chunk boundary inside the batch changes nothing for one example either.
    one = chunked.signatures["score"](x=tf.constant(x[4:5]))["elbo"].numpy()
    np.testing.assert_allclose(one, score[4:5], rtol=1e-6)
    empty = chunked.signatures["score"](x=tf.zeros([0, *BERNOULLI_EVENT]))["elbo"].numpy()
    assert empty.shape == (0,)


SCORE_MEMORY = """
import json, resource, sys
import numpy as np
import tensorflow as tf

score = tf.saved_model.load(sys.argv[1]).signatures["score"]
n = int(sys.argv[2])
x = tf.constant((np.random.default_rng(0).random((n, 28, 28), np.float32) < 0.3).astype(np.float32))
score(x=x[:10])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
elbo = score(x=x)["elbo"].numpy()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mb": (after - before) / 1024, "first": elbo[:3].tolist()}))
"""


def test_score_memory_does_not_grow_with_the_batch(bernoulli, tmp_path):
    # 20,000 examples at L = 10: unchunked, each [L, n, 784] float32 tensor of the graph is
    # 627 MB; this script measured +1.8 GB of peak memory on this model exported with
    # SCORE_CHUNK_DRAWS = 1e9 (one chunk), and +94 MB in chunks of 1,000. 300 MB leaves room
    # for allocator slack and is far below what the unchunked graph needs.
    script = tmp_path / "score_memory.py"
    script.write_text(SCORE_MEMORY)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.run(
        [sys.executable, str(script), bernoulli.path, "20000"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(process.stdout.strip().splitlines()[-1])
    assert report["growth_mb"] < 300, report
    x = (np.random.default_rng(0).random((3, 28, 28), np.float32) < 0.3).astype(np.float32)
    np.testing.assert_allclose(report["first"], bernoulli("score", x=x)["elbo"], rtol=1e-6)


def test_a_gaussian_model_takes_values_outside_0_1(gaussian):
    # The [0, 1] check is the Bernoulli likelihood's (a probability of binary data); a Gaussian
    # density is defined everywhere, so its export must not refuse such x.
    x = np.stack([np.full(GAUSSIAN_EVENT, 1.5), np.full(GAUSSIAN_EVENT, -0.5)]).astype(np.float32)
    scores = gaussian("score", x=x)["elbo"]
    expected = [
        gaussian.model.elbo(x[i : i + 1], num_samples=DEFAULT_SCORE_NUM_SAMPLES, seed=0)[0]
        for i in range(2)
    ]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


# ---------------------------------------------------------------------------- serving paths


def test_loads_and_runs_in_a_fresh_process_without_keras_aevb_or_keras(bernoulli, tmp_path):
    x = bernoulli.x
    seed = np.array([9, 1], np.int32)
    nan_x = x[:1].copy()
    nan_x[0, 0, 0] = np.nan
    inputs = {
        "serving_default__x": x,
        "encode__x": x,
        "decode__z": np.linspace(-2, 2, 2 * LATENT, dtype=np.float32).reshape(2, LATENT),
        "sample__num_samples": np.int32(4),
        "sample__seed": seed,
        "score__x": x,
        "bad__score__x": nan_x,
        "bad__serving_default__x": np.full_like(x, 2.0),
    }
    np.savez(tmp_path / "inputs.npz", **inputs)
    process = subprocess.run(
        [sys.executable, str(CLIENT), bernoulli.path, str(tmp_path / "inputs.npz"),
         str(tmp_path / "outputs.npz")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(process.stdout.strip().splitlines()[-1])
    # keras, keras_aevb, TFP and tf_keras were hidden as if uninstalled; none got imported, and
    # TensorFlow imported and ran the model without them.
    assert report["hidden"] == ["keras", "keras_aevb", "tensorflow_probability", "tf_keras"]
    assert report["after_import_tensorflow"] == [] and report["after_run"] == []
    assert report["signatures"] == sorted(SIGNATURE_NAMES)
    outputs = dict(np.load(tmp_path / "outputs.npz"))
    for signature in ("serving_default", "encode", "decode", "sample", "score"):
        feeds = {k.split("__")[1]: v for k, v in inputs.items() if k.startswith(signature + "__")}
        for name, value in bernoulli(signature, **feeds).items():
            # Same graph and inputs in another process: equal up to thread-order rounding.
            np.testing.assert_allclose(outputs[f"{signature}__{name}"], value, rtol=1e-6)
    assert report["errors"]["bad__score__x"][0] == "InvalidArgumentError"
    assert "x holds NaN or inf" in report["errors"]["bad__score__x"][1]
    assert "[0, 1] for a Bernoulli model" in report["errors"]["bad__serving_default__x"][1]


def _saved_model_cli():
    script = pathlib.Path(sys.executable).parent / "saved_model_cli"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


def _cli_run(path, signature, out_dir, *args):
    command = [*_saved_model_cli(), "run", "--dir", path, "--tag_set", "serve",
               "--signature_def", signature, "--outdir", str(out_dir), *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_saved_model_cli_run(bernoulli, tmp_path):
    np.save(tmp_path / "x.npy", bernoulli.x)
    process = _cli_run(
        bernoulli.path, "serving_default", tmp_path / "a", f"--inputs=x={tmp_path / 'x.npy'}"
    )
    assert process.returncode == 0, process.stderr[-3000:]
    expected = bernoulli("serving_default", x=bernoulli.x)
    for name in ("reconstruction", "z_mean"):
        np.testing.assert_allclose(
            np.load(tmp_path / "a" / f"{name}.npy"), expected[name], rtol=1e-6, atol=1e-7
        )
    process = _cli_run(
        bernoulli.path, "sample", tmp_path / "b", "--input_exprs=num_samples=3;seed=[1,2]"
    )
    assert process.returncode == 0, process.stderr[-3000:]
    expected = bernoulli("sample", num_samples=np.int32(3), seed=np.array([1, 2], np.int32))
    np.testing.assert_allclose(np.load(tmp_path / "b" / "z.npy"), expected["z"], rtol=1e-6)


# TF Serving's REST API (https://www.tensorflow.org/tfx/serving/api_rest): the row format
# ("instances": one entry per example, batched along a new axis 0) and the columnar format
# ("inputs": each named input as a whole tensor). The decoder below follows its rules, with the
# dtypes and names of the signature as the server takes them from the SavedModel.


def _decode_rest_body(body, input_specs):
    if "instances" in body:
        instances = body["instances"]
        if len(input_specs) == 1 and not isinstance(instances[0], dict):
            (name,) = input_specs
            instances = [{name: instance} for instance in instances]
        columns = {name: [instance[name] for instance in instances] for name in input_specs}
    else:
        columns = body["inputs"]
        if not isinstance(columns, dict):
            (name,) = input_specs
            columns = {name: columns}
    return {
        name: tf.constant(np.asarray(columns[name], spec.dtype.as_numpy_dtype))
        for name, spec in input_specs.items()
    }


def _example_inputs(input_specs, rng, batch=3):
    """Values for a signature's inputs, made from its specs only (names, dtypes, shapes)."""
    values = {}
    for name, spec in input_specs.items():
        shape = [batch if d is None else d for d in spec.shape.as_list()]
        if spec.dtype == tf.int32:
            values[name] = rng.integers(1, 5, size=shape).astype(np.int32)
        else:
            values[name] = (rng.random(shape) < 0.3).astype(np.float32)
    return values


def _rest_body(signature, input_specs, values):
    """The JSON body a client sends; row format where every input has a batch axis."""
    if all(spec.shape.rank and spec.shape[0] is None for spec in input_specs.values()):
        if len(values) == 1:
            instances = next(iter(values.values())).tolist()
        else:
            instances = [
                dict(zip(values, row, strict=True))
                for row in zip(*(v.tolist() for v in values.values()), strict=True)
            ]
        return {"signature_name": signature, "instances": instances}
    return {"signature_name": signature, "inputs": {k: v.tolist() for k, v in values.items()}}


def test_rest_and_grpc_requests_built_from_the_signatures_run(bernoulli):
    rng = np.random.default_rng(2)
    try:
        from tensorflow_serving.apis import predict_pb2
    except ImportError:  # tensorflow-serving-api absent: the same TensorProtos, unwrapped.
        predict_pb2 = None
    for signature in SIGNATURE_NAMES:
        function = bernoulli.loaded.signatures[signature]
        input_specs = function.structured_input_signature[1]
        values = _example_inputs(input_specs, rng)
        expected = bernoulli(signature, **values)

        # REST: JSON over HTTP, decoded as TF Serving does.
        body = json.loads(json.dumps(_rest_body(signature, input_specs, values)))
        assert body["signature_name"] == signature
        outputs = function(**_decode_rest_body(body, input_specs))
        for name, value in outputs.items():
            # JSON carries the float32 values exactly (shortest repr round-trips).
            np.testing.assert_array_equal(value.numpy(), expected[name])
        json.dumps(
            {
                "predictions": [
                    dict(zip(outputs, row, strict=True))
                    for row in zip(*(v.numpy().tolist() for v in outputs.values()), strict=True)
                ]
            }
        )

        # gRPC: PredictRequest.inputs maps each input name to a TensorProto.
        protos = {
            name: tf.make_tensor_proto(v, dtype=input_specs[name].dtype)
            for name, v in values.items()
        }
        if predict_pb2 is not None:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "mnist_vae"
            request.model_spec.signature_name = signature
            for name, proto in protos.items():
                request.inputs[name].CopyFrom(proto)
            received = predict_pb2.PredictRequest.FromString(request.SerializeToString())
            assert received.model_spec.signature_name == signature
            protos = dict(received.inputs)
        feeds = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in protos.items()}
        for name, value in function(**feeds).items():
            np.testing.assert_array_equal(value.numpy(), expected[name])


def _readme_bodies():
    text = (ROOT / "docs" / "serving.md").read_text()
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.S)]


def test_readme_request_bodies_fit_the_paper_mnist_signatures(tmp_path):
    # The README's complete JSON bodies are for the paper's MNIST model (J = 20, 28x28); the
    # hidden size does not change the signatures, so a 16-unit model stands in for it.
    model = keras_aevb.paper_model("mnist", 20, hidden_units=16, seed=0)
    loaded = tf.saved_model.load(export_saved_model(model, tmp_path / "mnist_vae"))
    bodies = _readme_bodies()
    # What each body's answer must be: the Keras model's own methods on the same inputs.
    expected = {
        "decode": lambda f: {"x_mean": model.decode(f["z"])},
        "sample": lambda f: {
            "x_mean": model.sample(int(f["num_samples"]), seed=f["seed"]),
            "z": model.sample_z(int(f["num_samples"]), seed=f["seed"]),
        },
    }
    assert {body["signature_name"] for body in bodies} == set(expected)
    for body in bodies:
        function = loaded.signatures[body["signature_name"]]
        feeds = _decode_rest_body(body, function.structured_input_signature[1])
        outputs = function(**feeds)
        for name, value in expected[body["signature_name"]](feeds).items():
            np.testing.assert_allclose(outputs[name].numpy(), value, atol=1e-5)


# ---------------------------------------------------------------------------- families


# Priors to try for a family, first those with a closed-form quantile (the model's sample_z uses
# it; Beta's and Gamma's are long iterative graphs that only slow the test down), then the rest
# of the family's support; the first the model accepts (supports and tails match) is used.
PREFERRED_PRIORS = ("standard_normal", "exponential", "uniform")


def _family_model(family):
    names = [n for n in PREFERRED_PRIORS if n in keras_aevb.PRIORS]
    names += sorted(set(keras_aevb.PRIORS) - set(names))
    for prior in names:
        if keras_aevb.PRIORS[prior][1] != family.support:
            continue
        try:
            return tiny_model(
                BERNOULLI_EVENT, keras_aevb.BernoulliDecoder, posterior=family.name, prior=prior
            )
        except ValueError:
            continue
    pytest.skip(f"no prior in PRIORS that the {family.name!r} posterior accepts")


def _has_mean(family):
    params = {n: family.constrain[n](tf.zeros([1, LATENT])) for n in family.param_names}
    try:
        return bool(tf.reduce_all(tf.math.is_finite(family.distribution(params).mean())))
    except NotImplementedError:
        return False


# Fast: the explicit-g path (normal), the TFP-sampled path (gamma: implicit reparameterization,
# a map_fn in score) and a refused family without a mean. The others run in the slow job: each
# export traces its own TFP graphs (2-8 s apiece here).
FAST_FAMILIES = {"normal", "gamma", "cauchy"}


@pytest.mark.parametrize(
    "name",
    [
        n if n in FAST_FAMILIES else pytest.param(n, marks=pytest.mark.slow)
        for n in sorted(FAMILIES)
    ],
)
def test_every_posterior_family_with_a_mean_exports(name, tmp_path):
    family = get_family(name)
    model = _family_model(family)
    if not _has_mean(family):
        with pytest.raises(ValueError, match="has no mean"):
            export_saved_model(model, tmp_path / "m")
        return
    export = Export(model, export_saved_model(model, tmp_path / "m"), binary_x(4))
    x = export.x
    assert sorted(export.loaded.signatures["encode"].structured_outputs) == sorted(
        family.param_names
    )
    served = export("serving_default", x=x)
    np.testing.assert_allclose(
        served["z_mean"], model.posterior_layer.mean(model.encode(x)), atol=1e-5
    )
    np.testing.assert_allclose(served["reconstruction"], model.reconstruct(x), atol=1e-5)
    score = export("score", x=x)["elbo"]
    expected = [
        model.elbo(x[i : i + 1], num_samples=DEFAULT_SCORE_NUM_SAMPLES, seed=DEFAULT_SCORE_SEED)[0]
        for i in range(len(x))
    ]
    np.testing.assert_allclose(score, expected, rtol=1e-5)
    np.testing.assert_allclose(export("score", x=x[::-1])["elbo"], score[::-1], rtol=1e-6)


# ---------------------------------------------------------------------------- paths


def test_next_version(tmp_path):
    assert next_version(tmp_path / "missing") == 1
    assert next_version(tmp_path) == 1
    for name in ("1", "3", "latest", "0010x"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a version")
    assert next_version(tmp_path) == 4


def test_the_path_is_the_models_base_directory_and_versions_go_under_it(tmp_path):
    model = tiny_model(BERNOULLI_EVENT, keras_aevb.BernoulliDecoder)
    base = tmp_path / "saved_models" / "mnist_vae"
    assert export_saved_model(model, base) == str(base / "1")
    assert export_saved_model(model, str(base)) == str(base / "2")
    assert export_saved_model(model, base, version=7) == str(base / "7")
    assert export_saved_model(model, base) == str(base / "8")
    # Only the versions: no temporary directory is left beside them.
    assert sorted(p.name for p in base.iterdir()) == ["1", "2", "7", "8"]
    for bad in (0, -1, "latest", 1.5):
        with pytest.raises(ValueError, match="positive integer"):
            export_saved_model(model, base, version=bad)


def test_an_existing_version_is_never_overwritten(bernoulli):
    base = pathlib.Path(bernoulli.path).parent
    before = (pathlib.Path(bernoulli.path) / "saved_model.pb").read_bytes()
    with pytest.raises(FileExistsError, match=r"never overwritten.*version=2"):
        export_saved_model(bernoulli.model, base, version=1)
    # Not even with force: force only overrides the base directory checks.
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_saved_model(bernoulli.model, base, version=1, force=True)
    assert (pathlib.Path(bernoulli.path) / "saved_model.pb").read_bytes() == before
    assert next_version(base) == 2
    assert sorted(p.name for p in base.iterdir()) == ["1"]


def test_a_base_directory_that_looks_like_a_version_is_refused_unless_forced(tmp_path):
    model = tiny_model(BERNOULLI_EVENT, keras_aevb.BernoulliDecoder)
    base = tmp_path / "mnist_vae"
    version_dir = export_saved_model(model, base)
    # The mistake of the old CLI: a version directory given as the base would get base/1/1,
    # a directory TF Serving cannot load. Refused whether or not it exists yet.
    for looks_like_a_version in (version_dir, base / "2"):
        with pytest.raises(ValueError, match=r"looks like a version directory.*mnist_vae"):
            export_saved_model(model, looks_like_a_version)
    assert sorted(p.name for p in base.iterdir()) == ["1"]
    assert sorted(p.name for p in pathlib.Path(version_dir).iterdir()) == sorted(
        ["assets", "fingerprint.pb", "saved_model.pb", "variables"]
    )
    # A SavedModel directory under another name is no base directory either.
    plain = tmp_path / "exported"
    export_saved_model(model, plain, version=1)
    (plain / "1").rename(tmp_path / "single")
    with pytest.raises(ValueError, match="holds a saved_model.pb itself"):
        export_saved_model(model, tmp_path / "single")
    # force: the caller means it (a model whose name is a number).
    assert export_saved_model(model, base / "2", force=True) == str(base / "2" / "1")


def test_a_base_directory_of_another_model_is_refused_unless_forced(bernoulli, tmp_path):
    base = tmp_path / "mnist_vae"
    export_saved_model(bernoulli.model, base)
    other = tiny_model(GAUSSIAN_EVENT, keras_aevb.GaussianDecoder)  # other x shape, x_log_var
    with pytest.raises(ValueError, match=r"another model.*different signatures.*force"):
        export_saved_model(other, base)
    assert sorted(p.name for p in base.iterdir()) == ["1"]  # nothing written, no temp left
    # The same architecture with other weights (a retrained model) is a new version.
    retrained = tiny_model(BERNOULLI_EVENT, keras_aevb.BernoulliDecoder)
    retrained.set_weights([w + 0.1 for w in retrained.get_weights()])
    assert export_saved_model(retrained, base) == str(base / "2")
    assert export_saved_model(other, base, force=True) == str(base / "3")
    # A version that holds no readable SavedModel is no model to compare with: the newest
    # readable one (3, the Gaussian model's) is.
    (base / "4").mkdir()
    (base / "4" / "saved_model.pb").write_bytes(b"\xff\xff not a protocol buffer")
    assert export_saved_model(other, base) == str(base / "5")
    with pytest.raises(ValueError, match="version 5 has different signatures"):
        export_saved_model(bernoulli.model, base)


# ---------------------------------------------------------------------------- failed exports

PARTIAL_SAVE = """
import os, sys, signal, pathlib
import tensorflow as tf
import keras, keras_aevb
from keras_aevb.export import export_saved_model

def partial_save(obj, export_dir, *args, **kwargs):
    # What a save cut short leaves: a graph file and no variables.
    pathlib.Path(export_dir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(export_dir) / "saved_model.pb").write_bytes(b"half a graph")
    print("PARTIAL " + str(export_dir), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

tf.saved_model.save = partial_save
encoder = keras_aevb.MLPEncoder(2, (4,))
model = keras_aevb.AEVB(encoder, keras_aevb.BernoulliDecoder((4, 4), (4,)), seed=0)
model.build((None, 4, 4))
export_saved_model(model, sys.argv[1])
"""


def _version_dirs(base):
    return sorted(p.name for p in pathlib.Path(base).iterdir() if p.name.isdigit())


def test_a_failure_mid_export_leaves_no_version_directory(tmp_path, monkeypatch):
    model = tiny_model(BERNOULLI_EVENT, keras_aevb.BernoulliDecoder)
    base = tmp_path / "mnist_vae"
    real_save = tf.saved_model.save

    def failing_save(obj, export_dir, *args, **kwargs):
        real_save(obj, export_dir, *args, **kwargs)
        # The graph and the weights are written; then the disk fills up.
        (pathlib.Path(export_dir) / "saved_model.pb").write_bytes(b"truncated")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", failing_save)
    # One line naming the version that could not be written (the CLI prints it, exit 1).
    with pytest.raises(DiskFullError, match=r"^no space left on device writing .*mnist_vae.1;"):
        export_saved_model(model, base)
    assert list(base.iterdir()) == []  # no version, and the temporary directory removed
    monkeypatch.setattr(tf.saved_model, "save", real_save)
    path = export_saved_model(model, base)
    assert path == str(base / "1")
    score = tf.saved_model.load(path).signatures["score"](x=tf.constant(binary_x(2)))["elbo"]
    expected = [
        model.elbo(binary_x(2)[i : i + 1], num_samples=DEFAULT_SCORE_NUM_SAMPLES, seed=0)[0]
        for i in range(2)
    ]
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-5)


def test_a_killed_export_leaves_no_version_and_the_next_export_cleans_up(tmp_path):
    base = tmp_path / "mnist_vae"
    script = tmp_path / "partial_save.py"
    script.write_text(PARTIAL_SAVE)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.run(
        [sys.executable, str(script), str(base)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == -9, process.stderr[-3000:]
    assert "PARTIAL" in process.stdout, process.stderr[-3000:]
    # TF Serving would serve the highest all-digit directory: there is none.
    assert _version_dirs(base) == []
    (stale,) = base.iterdir()
    assert not stale.name.isdigit() and (stale / "saved_model.pb").is_file()
    # A live process's temporary directory (this process's pid) is left alone; the dead one's
    # is removed by the next export.
    live = base / f".tmp-9-{socket.gethostname()}-{os.getpid()}"
    live.mkdir()
    model = tiny_model(BERNOULLI_EVENT, keras_aevb.BernoulliDecoder)
    assert export_saved_model(model, base) == str(base / "1")
    assert sorted(p.name for p in base.iterdir()) == sorted(["1", live.name])


def test_export_from_a_keras_file_and_argument_errors(tmp_path):
    model = tiny_model(GAUSSIAN_EVENT, keras_aevb.GaussianDecoder)
    model.save(tmp_path / "model.keras")
    path = export_saved_model(str(tmp_path / "model.keras"), tmp_path / "frey_vae")
    assert path == str(tmp_path / "frey_vae" / "1")
    loaded = tf.saved_model.load(path)
    x = grey_x(2)
    np.testing.assert_allclose(
        loaded.signatures["serving_default"](x=tf.constant(x))["reconstruction"].numpy(),
        model.reconstruct(x),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match=r"\.keras file"):
        export_saved_model(str(tmp_path / "model.h5"), tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        export_saved_model(str(tmp_path / "absent.keras"), tmp_path / "x")
    with pytest.raises(ValueError, match="keras_aevb.AEVB"):
        export_saved_model(keras.Sequential([keras.layers.Dense(1)]), tmp_path / "x")
    unbuilt = keras_aevb.AEVB(
        keras_aevb.MLPEncoder(2, (4,)), keras_aevb.BernoulliDecoder((3, 3), (4,))
    )
    with pytest.raises(ValueError, match="not built"):
        export_saved_model(unbuilt, tmp_path / "x")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match="a_file"):
        export_saved_model(model, tmp_path / "a_file")
    assert not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------------------- the CLI


def test_cli_export_takes_the_base_directory_like_python(tmp_path, capsys):
    from keras_aevb.cli import main

    model = tiny_model(BERNOULLI_EVENT, keras_aevb.BernoulliDecoder)
    model.save(tmp_path / "model.keras")
    base = tmp_path / "saved_models" / "mnist_vae"
    keras_file = str(tmp_path / "model.keras")
    assert main(["export", keras_file, str(base)]) == 0
    assert capsys.readouterr().out.strip() == str(base / "1")
    assert main(["export", keras_file, str(base), "--version", "5"]) == 0
    assert capsys.readouterr().out.strip() == str(base / "5")
    # The version directory as the path: refused (it used to write .../5/1), one line, exit 2.
    assert main(["export", keras_file, str(base / "5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("keras-aevb: error: ")
    assert "looks like a version directory" in err and f"{base} --version 5" in err
    assert main(["export", keras_file, str(base), "--version", "5"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    # Another model's directory: refused unless --force.
    other = tiny_model(GAUSSIAN_EVENT, keras_aevb.GaussianDecoder)
    other.save(tmp_path / "other.keras")
    assert main(["export", str(tmp_path / "other.keras"), str(base)]) == 2
    assert "different signatures" in capsys.readouterr().err
    assert _version_dirs(base) == ["1", "5"]
    assert main(["export", str(tmp_path / "other.keras"), str(base), "--force"]) == 0
    assert capsys.readouterr().out.strip() == str(base / "6")
    assert main(["export", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "base directory" in help_text and "--force" in help_text


# ---------------------------------------------------------------------------- anomaly scores


def test_score_flags_noise_and_accepts_digits(tmp_path):
    """docs/serving.md's recipe: threshold = the 1 % quantile of training scores."""
    from keras_aevb import data as data_lib

    directory = data_lib.default_data_dir("mnist")
    if directory is None or "mnist_nz20" not in keras_aevb.pretrained():
        pytest.skip("needs ../shared/data/mnist and the shipped mnist_nz20 model")
    model = keras_aevb.pretrained("mnist_nz20")
    loaded = tf.saved_model.load(export_saved_model(model, tmp_path / "mnist_vae"))
    score = loaded.signatures["score"]
    rng = np.random.default_rng(0)
    train, _ = data_lib.load_mnist(directory, "train")
    test, _ = data_lib.load_mnist(directory, "test")
    train_x = (rng.random((2000, 28, 28)) < train[:2000]).astype(np.float32)
    test_x = (rng.random((2000, 28, 28)) < test[:2000]).astype(np.float32)
    noise_x = (rng.random((200, 28, 28)) < 0.2).astype(np.float32)  # as dark as digits on average
    train_scores = score(x=tf.constant(train_x))["elbo"].numpy()
    threshold = np.quantile(train_scores, 0.01)
    test_flagged = np.mean(score(x=tf.constant(test_x))["elbo"].numpy() < threshold)
    noise_scores = score(x=tf.constant(noise_x))["elbo"].numpy()
    # Held-out digits: flagged at about the 1 % the quantile promises (binomial noise on 2000
    # draws and a small train-test gap: below 3 %).
    assert test_flagged < 0.03, test_flagged
    # Every noise image scores below the threshold, by hundreds of nats.
    assert np.all(noise_scores < threshold - 100), (noise_scores.max(), threshold)
