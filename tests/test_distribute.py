"""AEVB under tf.distribute: MirroredStrategy over 2 logical CPUs, MultiWorkerMirroredStrategy.

Each test runs its TensorFlow program in a fresh subprocess: logical devices must be configured
before TensorFlow initialises its devices, and a multi-worker cluster is one process per worker.
"""

import csv
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import keras_aevb  # noqa: F401  (the package under test must import in the test process too)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny AEVB with fixed initial weights, on fixed binary data: the same model in every process.
COMMON = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np

    def binary_data(n=64, seed=0):
        return (np.random.default_rng(seed).random((n, 4, 4)) < 0.4).astype("float32")

    def tiny_model(weight_decay=0.0):
        import keras
        from keras_aevb import AEVB, BernoulliDecoder, MLPEncoder

        def init(seed):
            return keras.initializers.RandomNormal(stddev=0.3, seed=seed)

        encoder = MLPEncoder(2, (8,), kernel_initializer=init(1), bias_initializer=init(2))
        decoder = BernoulliDecoder(
            (4, 4), (8,), kernel_initializer=init(3), bias_initializer=init(4)
        )
        model = AEVB(encoder, decoder, seed=0, weight_decay=weight_decay)
        # Built here, inside the caller's strategy scope, so the weights are distributed
        # variables (a model built lazily by fit is built outside the scope).
        model.build()
        return model
    """
)


def run_python(code, tmp_path, name, env=None):
    """Starts `code` (after COMMON) in a fresh Python with the repository on its path."""
    script = tmp_path / f"{name}.py"
    script.write_text(COMMON + textwrap.dedent(code))
    full_env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    full_env.update(PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=str(tmp_path),
    )


def finish(process, timeout=240):
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"subprocess timed out after {timeout} s; stderr tail:\n{err[-3000:]}")
    assert process.returncode == 0, f"subprocess failed; stderr tail:\n{err[-4000:]}"
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line; stdout:\n{out[-2000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


MIRRORED = """
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras

GLOBAL_BATCH, STEPS = 32, 12


def posterior_mean(params, num_samples=None, seed=None, eps=None):
    # z = posterior mean (eps = 0): one device and two replicas then optimise exactly the same
    # deterministic objective, and differ only in how the gradient is combined. (With noise
    # they would not: each replica draws its own eps for its half of the batch.)
    return params["z_mean"][None]


def run(strategy, steps_per_execution=None, wrong_scale=False):
    data = tf.data.Dataset.from_tensor_slices(binary_data(128)).batch(GLOBAL_BATCH).repeat()
    with strategy.scope():
        model = tiny_model(weight_decay=0.01)
        model.posterior_layer.sample = posterior_mean
        kwargs = {} if steps_per_execution is None else {"steps_per_execution": steps_per_execution}
        # Plain SGD: Adagrad would hide a wrong gradient scale (it divides by the gradient's
        # own size), so the test could not see the 1/replicas scaling it is here to check.
        model.compile(optimizer=keras.optimizers.SGD(0.2), **kwargs)
        if wrong_scale:
            # A control: what a train_step that forgot the 1/replicas factor would do.
            model.optimizer.scale_loss = lambda loss: loss * strategy.num_replicas_in_sync
    # One step per epoch, so history["loss"] is the loss of every single step.
    history = model.fit(data, epochs=STEPS, steps_per_epoch=1, verbose=0)
    return {
        "loss": history.history["loss"],
        "weights": [w.tolist() for w in model.get_weights()],
        "steps_per_execution": model.steps_per_execution,
        "iterations": int(model.optimizer.iterations.numpy()),
    }


mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
result = {
    "replicas": mirrored.num_replicas_in_sync,
    "single": run(tf.distribute.get_strategy(), steps_per_execution=1),
    "mirrored": run(mirrored),
    "mirrored_wrong_scale": run(mirrored, wrong_scale=True),
}
print("RESULT " + json.dumps(result))
"""


def test_mirrored_two_replicas_follow_the_one_device_trajectory(tmp_path):
    result = finish(run_python(MIRRORED, tmp_path, "mirrored"))
    assert result["replicas"] == 2
    single, mirrored = result["single"], result["mirrored"]
    # The compile default under several replicas: 1 step per execution (keras-team/keras#19246).
    assert mirrored["steps_per_execution"] == 1
    assert single["iterations"] == mirrored["iterations"] == 12
    # Tolerance: float32 sums taken in a different order (two half-batch gradients all-reduced
    # against one full-batch gradient) over 12 SGD steps; differences seen are ~1e-6.
    np.testing.assert_allclose(mirrored["loss"], single["loss"], rtol=1e-5, atol=1e-5)
    for a, b in zip(mirrored["weights"], single["weights"], strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)
    # The loss moved (12 steps at lr 0.2 on a model far from its optimum).
    assert single["loss"][-1] < single["loss"][0] - 0.5
    # The control: without the 1/replicas factor the gradient doubles and the trajectory leaves
    # the tolerance above, so the check can see a wrong scale.
    wrong = result["mirrored_wrong_scale"]
    assert np.max(np.abs(np.array(wrong["loss"]) - np.array(single["loss"]))) > 1e-2


REPLICA_NOISE = """
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from keras_aevb import ReparameterizedPosterior

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    layer = ReparameterizedPosterior(seed=0)


@tf.function
def draw():
    def replica_fn():
        params = {"z_mean": tf.zeros([50, 2]), "z_log_var": tf.zeros([50, 2])}
        return layer.sample(params)

    return strategy.run(replica_fn)


draws = [v.numpy().tolist() for v in strategy.experimental_local_results(draw())]
print("RESULT " + json.dumps(draws))
"""


def test_replicas_draw_independent_noise(tmp_path):
    first, second = finish(run_python(REPLICA_NOISE, tmp_path, "replica_noise"))
    first, second = np.array(first), np.array(second)
    # Independent N(0, 1) draws of 100 values each: equal draws would make the correlation 1;
    # independent ones give |r| < 0.5 with probability 1 - 1e-7.
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.5


def _free_ports(n):
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


WORKER = """
import tensorflow as tf

strategy = tf.distribute.MultiWorkerMirroredStrategy()
import keras

task = json.loads(os.environ["TF_CONFIG"])["task"]
chief = task["type"] == "chief" or (task["type"] == "worker" and task["index"] == 0)
out_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ["OUT_DIR"]
data = tf.data.Dataset.from_tensor_slices(binary_data(96)).batch(16)
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
data = data.with_options(options)
with strategy.scope():
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adagrad(0.1))
history = model.fit(data, epochs=3, verbose=0)
if chief:
    # Only the chief writes the model and the history.
    model.save(os.path.join(out_dir, "model.keras"))
    with open(os.path.join(out_dir, "history.json"), "w") as f:
        json.dump(history.history, f)
weights = model.get_weights()
print("RESULT " + json.dumps({
    "index": task["index"],
    "chief": chief,
    "replicas": strategy.num_replicas_in_sync,
    "loss": history.history["loss"],
    "checksum": [float(np.sum(w)) for w in weights],
}))
"""


@pytest.mark.slow
def test_multi_worker_mirrored_trains_on_two_processes_and_only_the_chief_writes(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    out_dirs = [tmp_path / "worker0", tmp_path / "worker1"]
    processes = []
    for index, out_dir in enumerate(out_dirs):
        out_dir.mkdir()
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(
            run_python(
                WORKER,
                tmp_path,
                f"worker{index}",
                env={"TF_CONFIG": tf_config, "OUT_DIR": str(out_dir)},
            )
        )
    try:
        results = [finish(p, timeout=300) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    chief, worker = results
    assert chief["chief"] and not worker["chief"]
    assert chief["replicas"] == worker["replicas"] == 2
    # Synchronous training: both workers end with the same weights and the same history.
    # Tolerance: the all-reduce gives both the same sums, so only float noise is allowed.
    np.testing.assert_allclose(chief["checksum"], worker["checksum"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(chief["loss"], worker["loss"], rtol=1e-6)
    assert chief["loss"][-1] < chief["loss"][0]
    # Only the chief wrote files.
    assert sorted(p.name for p in out_dirs[0].iterdir()) == ["history.json", "model.keras"]
    assert list(out_dirs[1].iterdir()) == []
    import keras

    loaded = keras.saving.load_model(out_dirs[0] / "model.keras")
    np.testing.assert_allclose(
        [float(np.sum(w)) for w in loaded.get_weights()], chief["checksum"], rtol=1e-6
    )
    with open(out_dirs[0] / "history.json") as f:
        assert json.load(f)["loss"] == chief["loss"]


# ---------------------------------------------------------------------------- the CLI, 2 workers

CLI_TINY = ["--latent-dim", "2", "--hidden-units", "16", "--verbose", "0", "--seed", "0"]
SUMMARY = re.compile(r"epoch (\d+)/(\d+), ([\d,]+) examples; bound train (\S+), test (\S+) nats")
CHOSE = re.compile(r"learning rate auto: .* chose (\S+)")


def _cli_worker(tmp_path, mnist_dir, cluster, index, run_dir, extra):
    tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=tf_config)
    argv = [sys.executable, "-m", "keras_aevb", "train", "--dataset", "mnist",
            "--data-dir", str(mnist_dir), "--output", str(run_dir),
            "--strategy", "multi_worker", *CLI_TINY, "--no-tensorboard", *extra]  # fmt: skip
    # Output to files, not pipes: a worker blocked on a full pipe would stall the cluster.
    out, err = tmp_path / f"worker{index}.out", tmp_path / f"worker{index}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=tmp_path)
    return process, out, err


def _wait_for_cluster(workers, timeout):
    """Waits for every worker; stops early when one fails (the others would wait for it)."""
    deadline = time.monotonic() + timeout
    try:
        while any(process.poll() is None for process, _, _ in workers):
            if any(process.poll() not in (None, 0) for process, _, _ in workers):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for process, _, _ in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = []
    for index, (process, out, err) in enumerate(workers):
        stderr = err.read_text()
        assert process.returncode == 0, (
            f"worker {index} exit {process.returncode} (negative: killed after {timeout} s or "
            f"when another worker failed); stderr tail:\n{stderr[-4000:]}"
        )
        results.append(out.read_text())
    return results


@pytest.mark.slow
@pytest.mark.parametrize(
    "rate_flags",
    [
        pytest.param(["--lr-search-steps", "3"], id="learning-rate-auto"),
        pytest.param(["--learning-rate", "0.02"], id="fixed-learning-rate"),
    ],
)
def test_cli_multi_worker_two_processes_train_and_only_the_chief_writes(
    tmp_path, mnist_dir, rate_flags
):
    """docs/speed.md's multi-machine command, as written, on two worker processes on localhost.

    Each worker gets its own --output, as on two machines with their own disks: worker 0 (the
    chief) writes the run; worker 1 trains in lockstep and writes nothing.
    """
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    run_dirs = [tmp_path / "machine_a" / "run", tmp_path / "machine_b" / "run"]
    # 300 synthetic training examples, M = 100: 3 global steps (50 examples per worker) an epoch.
    extra = ["--epochs", "2", *rate_flags]
    workers = [_cli_worker(tmp_path, mnist_dir, cluster, i, run_dirs[i], extra) for i in range(2)]
    # Each worker takes 1-2 minutes on 2 idle cores (the step-size search runs on both); the
    # limit leaves room for a loaded machine.
    chief_out, worker_out = _wait_for_cluster(workers, timeout=900)

    # The chief wrote the run; worker 1 wrote nothing.
    chief_dir = run_dirs[0]
    assert {"config.json", "history.csv", "model.keras", "checkpoints"} <= {
        p.name for p in chief_dir.iterdir()
    }
    assert not run_dirs[1].exists() or list(run_dirs[1].iterdir()) == []
    config = json.loads((chief_dir / "config.json").read_text())
    with open(chief_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [int(r["examples_seen"]) for r in rows] == [300, 600]

    # Synchronous training: both workers print the same final bounds (the all-reduced metric
    # of the same weights), and they are the chief's history.csv row, to its printed precision.
    chief_summary, worker_summary = SUMMARY.search(chief_out), SUMMARY.search(worker_out)
    assert chief_summary and worker_summary, (chief_out, worker_out)
    assert chief_summary.groups() == worker_summary.groups()
    assert chief_summary.group(4) == f"{float(rows[-1]['train_elbo']):.2f}"
    assert chief_summary.group(5) == f"{float(rows[-1]['test_elbo']):.2f}"

    # One learning rate for the cluster, the one recorded in the chief's config.json.
    if "--learning-rate" in rate_flags:
        assert config["learning_rate_used"] == 0.02
        assert not CHOSE.search(chief_out) and not CHOSE.search(worker_out)
    else:
        chose = {float(CHOSE.search(out).group(1)) for out in (chief_out, worker_out)}
        assert chose == {config["learning_rate_used"]}
        assert config["learning_rate_used"] in (0.01, 0.02, 0.1)
        assert set(config["learning_rate_search"]) == {"0.01", "0.02", "0.1"}
