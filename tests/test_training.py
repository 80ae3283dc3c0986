"""Tests of keras_aevb.training: epoch planning, step-size choice, the run directory, resume."""

import csv
import json

import keras
import numpy as np
import pytest

import keras_aevb
from keras_aevb import data as data_lib
from keras_aevb import run_dir as run_dir_lib
from keras_aevb import training
from keras_aevb.training import TrainConfig


def read_rows(run_dir):
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ planning


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        # One pass per epoch by default; 10 epochs when neither length is given.
        ({}, (10, 300, None)),
        ({"epochs": 2}, (2, 300, None)),
        # --max-examples caps the examples seen: 700 // 300 = 2 whole passes (600 <= 700).
        ({"max_examples": 700}, (2, 300, None)),
        # Fewer than one pass: one epoch of 150 // 100 = 1 step over the repeated stream.
        ({"max_examples": 150}, (1, 100, 1)),
        # Shorter epochs for more points on the Fig. 2 curve.
        ({"examples_per_epoch": 250, "max_examples": 1000}, (5, 200, 2)),
        ({"examples_per_epoch": 300, "epochs": 3}, (3, 300, None)),
    ],
)
def test_plan_epochs(kwargs, expected):
    plan = run_dir_lib.plan_epochs(300, TrainConfig(output="x", batch_size=100, **kwargs))
    assert (plan["epochs"], plan["examples_per_epoch"], plan["steps_per_epoch"]) == expected
    assert plan["repeat"] == (expected[2] is not None)


# How each way of starting a run plans its epochs, and what a larger budget then gives: the
# epoch length stays the run's, only the number of epochs grows (docs/reliability.md, "Resume").
@pytest.mark.parametrize(
    "started, resumed, expected",
    [
        # --max-examples below one pass: epochs of 100 (1 step); 200 extends to 2 of them,
        # with or without --examples-per-epoch naming the same length.
        ({"max_examples": 100}, {"max_examples": 200}, (2, 100, 1)),
        ({"max_examples": 100}, {"max_examples": 300, "examples_per_epoch": 100}, (3, 100, 1)),
        ({"max_examples": 100}, {"epochs": 4}, (4, 100, 1)),
        # One pass per epoch, from --epochs, --max-examples or the default of 10.
        ({"epochs": 2}, {"epochs": 3}, (3, 300, None)),
        ({"epochs": 2}, {"max_examples": 1200}, (4, 300, None)),
        ({"max_examples": 700}, {"max_examples": 1000}, (3, 300, None)),
        ({}, {"epochs": 12}, (12, 300, None)),
        # Short epochs: --examples-per-epoch 250 is 2 steps of 100; naming 250 again is the
        # same length.
        (
            {"examples_per_epoch": 250, "max_examples": 1000},
            {"examples_per_epoch": 250, "max_examples": 2000},
            (10, 200, 2),
        ),
        ({"examples_per_epoch": 250, "max_examples": 1000}, {"max_examples": 2000}, (10, 200, 2)),
    ],
)
def test_plan_epochs_of_a_resumed_run(started, resumed, expected):
    first = run_dir_lib.plan_epochs(300, TrainConfig(output="x", batch_size=100, **started))
    previous = {
        "examples_per_epoch": first["examples_per_epoch"],
        "steps_per_epoch": first["steps_per_epoch"],
        "num_train": 300,
    }
    plan = run_dir_lib.plan_epochs(
        300, TrainConfig(output="x", batch_size=100, **resumed), previous
    )
    assert (plan["epochs"], plan["examples_per_epoch"], plan["steps_per_epoch"]) == expected
    assert plan["repeat"] == (expected[2] is not None)


def test_plan_epochs_refuses_another_epoch_length():
    previous = {"examples_per_epoch": 100, "steps_per_epoch": 1, "num_train": 300}
    config = TrainConfig(output="x", batch_size=100, examples_per_epoch=200, max_examples=400)
    with pytest.raises(ValueError, match="trains 100 examples per epoch.*gives 200"):
        run_dir_lib.plan_epochs(300, config, previous)
    # One-pass epochs over a training set of another size would count examples wrongly.
    one_pass = {"examples_per_epoch": 300, "steps_per_epoch": None, "num_train": 300}
    with pytest.raises(ValueError, match="passes over 300 examples, these data have 200"):
        run_dir_lib.plan_epochs(200, TrainConfig(output="x", epochs=3), one_pass)


@pytest.mark.parametrize(
    "tf_config, chief",
    [
        (None, True),
        ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}, True),
        ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, False),
        (
            {
                "cluster": {"chief": ["c:0"], "worker": ["a:1"]},
                "task": {"type": "worker", "index": 0},
            },
            False,
        ),
        ({"cluster": {"chief": ["c:0"]}, "task": {"type": "chief", "index": 0}}, True),
        ({"cluster": {"ps": ["p:0"]}, "task": {"type": "ps", "index": 0}}, False),
    ],
)
def test_is_chief(monkeypatch, tf_config, chief):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert training.is_chief() is chief


def test_settings_are_checked_before_anything_loads(tmp_path):
    def check(message, **kwargs):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**{"output": str(tmp_path / "run"), **kwargs}).check()

    check("Bernoulli decoder needs binary pixels", binarization="none")
    check("Gaussian decoder on static-binarized", dataset="frey_face", binarization="static")
    check("Gaussian decoder on dynamic", decoder="gaussian")
    check("either --epochs or --max-examples", epochs=1, max_examples=10)
    check("unknown dataset", dataset="cifar10")
    check("learning rate must be", learning_rate="fast")
    check("latent_dim must be a positive integer", latent_dim=0)
    check("no run directory", output=None)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ the model


def test_build_model_initial_weights_are_distinct_and_seeded():
    keras.utils.set_random_seed(7)
    model = training.build_model("mnist", (28, 28), 2, hidden_units=(16,), seed=0)
    weights = model.get_weights()
    # Every tensor draws its own numbers (a shared seeded initializer would repeat them).
    firsts = [w.ravel()[:2].tolist() for w in weights]
    assert len({tuple(f) for f in firsts}) == len(firsts)
    # N(0, 0.01^2), the paper's init: the std of the 784 x 16 kernel within 10% of 0.01
    # (12544 draws: the sample std's relative error has std 1/sqrt(2 * 12544) = 0.6%).
    assert abs(weights[0].std() - 0.01) < 0.001
    keras.utils.set_random_seed(7)
    again = training.build_model("mnist", (28, 28), 2, hidden_units=(16,), seed=0)
    for a, b in zip(weights, again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_build_model_frey_face_defaults():
    model = training.build_model("frey_face", (28, 20), 2)
    assert isinstance(model.decoder, keras_aevb.GaussianDecoder)
    assert [layer.units for layer in model.encoder.hidden_layers] == [200]


# ------------------------------------------------------------------------------ step size


def tiny_setup(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 28, 28)) < 0.2).astype(np.float32)

    def build():
        return training.build_model("mnist", (28, 28), 2, hidden_units=(16,), seed=0)

    keras.utils.set_random_seed(0)
    weights = build().get_weights()

    def dataset():
        return data_lib.make_dataset(x, 50, "none", shuffle=True, seed=0).repeat()

    return build, weights, dataset, x


def test_select_learning_rate_rejects_divergence(capsys):
    build, weights, dataset, x = tiny_setup()
    # Adagrad's first step moves every weight by about the step size: 1e4 throws the weights
    # far out, the bound collapses (or is NaN) and the candidate must be rejected.
    best, bounds = training.select_learning_rate(
        build, weights, dataset, x, candidates=(0.02, 1e4), steps=5, batch_size=50
    )
    assert best == 0.02
    assert bounds[1e4] is None or bounds[1e4] < bounds[0.02]
    assert "chose 0.02" in capsys.readouterr().out


def _fresh_model_bounds(build, weights, dataset, x, candidates, steps, batch_size=50):
    """The search's bounds the expensive way: one new model per candidate (the reference)."""
    bounds = {}
    for rate in candidates:
        keras.utils.set_random_seed(0)
        model = build()
        model.set_weights(weights)
        model.compile(optimizer=training.make_optimizer("adagrad", rate))
        model.fit(dataset(), steps_per_epoch=steps, epochs=1, verbose=0)
        bounds[rate] = training.evaluate_bound(model, x, batch_size)
    return bounds


def test_the_step_size_search_trains_one_model_for_every_candidate():
    # Each new model traces and compiles its train and test functions anew: with one model
    # per candidate that cost was most of a short run (issue 15: 75 s of search for 12 s of
    # training). One model is built, and restored to the same state before each candidate.
    build, weights, dataset, x = tiny_setup()
    builds = []

    def counting_build():
        builds.append(1)
        return build()

    candidates = (0.01, 0.02, 0.1)
    _, bounds = training.select_learning_rate(
        counting_build, weights, dataset, x, candidates=candidates, steps=5, batch_size=50,
        print_fn=lambda *a: None,
    )  # fmt: skip
    assert len(builds) == 1
    # Every candidate's bound is the one a model of its own reaches (same weights, data,
    # noise and order). Tolerance: the same ops on the same inputs; 1e-6 only allows
    # float32 reassociation between separately compiled copies of the step.
    reference = _fresh_model_bounds(build, weights, dataset, x, candidates, steps=5)
    for rate in candidates:
        np.testing.assert_allclose(bounds[rate], reference[rate], rtol=1e-6)


def test_select_learning_rate_all_diverged():
    build, weights, dataset, x = tiny_setup()
    with pytest.raises(ValueError, match="every learning rate diverged"):
        training.select_learning_rate(
            build, weights, dataset, x, candidates=(1e4,), steps=5, batch_size=50
        )


# ------------------------------------------------------------------------------ train()


def tiny_config(run_dir, mnist_dir, **kwargs):
    settings = dict(
        dataset="mnist",
        output=str(run_dir),
        data_dir=str(mnist_dir),
        latent_dim=2,
        hidden_units=(16,),
        epochs=2,
        learning_rate=0.05,
        verbose=0,
        tensorboard=False,
    )
    settings.update(kwargs)
    return TrainConfig(**settings)


def test_train_function_returns_history_matching_the_files(tmp_path, mnist_dir, capsys):
    result = training.train(tiny_config(tmp_path / "run", mnist_dir, examples_per_epoch=100))
    run_dir = tmp_path / "run"
    rows = read_rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [int(r["examples_seen"]) for r in rows] == [100, 200]
    for row, recorded in zip(rows, result.history, strict=True):
        # history.csv stores 6 decimals.
        assert float(row["test_elbo"]) == pytest.approx(recorded["test_elbo"], abs=1e-5)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["weight_decay"] == pytest.approx(1 / 300)  # the paper's 1/N
    assert config["binarization"] == "dynamic"
    assert config["test_binarization"].startswith("dynamic (evaluated on one fixed")
    assert config["learning_rate_used"] == 0.05
    assert config["estimator"] == "analytic_kl"
    assert (config["epochs"], config["examples_per_epoch"], config["steps_per_epoch"]) == (
        2,
        100,
        1,
    )
    assert result.examples_per_second > 0
    assert not (run_dir / "logs").exists()  # tensorboard=False
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "examples/s" in out

    # The test bound in history.csv is the model's bound on the fixed test draw: recompute it
    # from the saved model. Both are L=1 Monte Carlo estimates over 100 examples with different
    # noise; their difference has a std of about 0.5 nats here, so 3 nats is 6 std.
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    x_test, _ = training.load_eval_split("mnist", mnist_dir, "test", "dynamic", seed=0)
    model.compile(optimizer="sgd")
    bound = training.evaluate_bound(model, x_test)
    assert bound == pytest.approx(float(rows[-1]["test_elbo"]), abs=3.0)


def test_resume_truncates_uncommitted_rows(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    training.train(tiny_config(run_dir, mnist_dir, epochs=2))
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 2
    # A run killed after writing a history row for epoch 3 but before committing its checkpoint:
    # history.csv has a row the checkpoint does not know.
    with open(run_dir / "history.csv", "a") as f:
        f.write("3,900,99.0,-1.0,-1.0\n")
    result = training.train(tiny_config(run_dir, mnist_dir, epochs=4))
    assert result.resumed_from_epoch == 2
    rows = read_rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[2]["test_elbo"]) != -1.0
    assert [int(r["examples_seen"]) for r in rows] == [300, 600, 900, 1200]
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds)  # cumulative across the two invocations
    # Exactly one weights file: the latest epoch's.
    assert [p.name for p in (run_dir / "checkpoints").glob("*.weights.h5")] == [
        "epoch-000004.weights.h5"
    ]


def test_resume_restores_weights_and_optimizer(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    first = training.train(tiny_config(run_dir, mnist_dir, epochs=1))
    accumulators = [v.numpy() for v in first.model.optimizer.variables if "accumulator" in v.path]
    assert accumulators and all(np.any(a > 0) for a in accumulators)
    weights = first.model.get_weights()
    # Resuming with epochs=1: nothing left to train, so the model is the checkpoint itself.
    again = training.train(tiny_config(run_dir, mnist_dir, epochs=1))
    for a, b in zip(weights, again.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    restored = [v.numpy() for v in again.model.optimizer.variables if "accumulator" in v.path]
    for a, b in zip(accumulators, restored, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [int(r["epoch"]) for r in read_rows(run_dir)] == [1]


def test_max_examples_run_is_extended_by_a_larger_budget(tmp_path, mnist_dir, capsys):
    """Issue 14: a run started with --max-examples below one pass could not be extended
    (refused for its epoch length, and again for --examples-per-epoch)."""
    run_dir = tmp_path / "run"
    training.train(tiny_config(run_dir, mnist_dir, epochs=None, max_examples=100))
    result = training.train(tiny_config(run_dir, mnist_dir, epochs=None, max_examples=200))
    assert result.resumed_from_epoch == 1
    config = dict(epochs=None, max_examples=300, examples_per_epoch=100)
    result = training.train(tiny_config(run_dir, mnist_dir, **config))
    assert result.resumed_from_epoch == 2
    rows = read_rows(run_dir)
    assert [(int(r["epoch"]), int(r["examples_seen"])) for r in rows] == [
        (1, 100),
        (2, 200),
        (3, 300),
    ]
    assert "epoch 3/3" in capsys.readouterr().out


def _h5_datasets(path):
    import h5py

    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, item: found.__setitem__(name, item[()]) if hasattr(item, "dtype") else None
        )
    return found


def test_weights_are_written_in_memory_and_load_with_the_public_api(tmp_path):
    """Checkpoints go through keras's in-memory HDF5 writer (HDF5 never writes to the run
    directory: a full disk crashed it at exit); the file is what `save_weights` writes."""
    keras.utils.set_random_seed(3)
    model = training.build_model("mnist", (28, 28), 2, hidden_units=(4,), seed=0)
    model.compile(optimizer=training.make_optimizer("adagrad", 0.1))
    model.optimizer.build(model.trainable_variables)
    run_dir_lib.save_weights(model, tmp_path / "a.weights.h5")
    model.save_weights(tmp_path / "b.weights.h5")
    # The same datasets with the same values (the bytes differ: HDF5 lays out a file in memory
    # and on disk differently).
    a, b = _h5_datasets(tmp_path / "a.weights.h5"), _h5_datasets(tmp_path / "b.weights.h5")
    assert sorted(a) == sorted(b) and len(a) > 4
    for key in b:
        np.testing.assert_array_equal(a[key], b[key])
    keras.utils.set_random_seed(4)
    other = training.build_model("mnist", (28, 28), 2, hidden_units=(4,), seed=0)
    other.compile(optimizer=training.make_optimizer("adagrad", 0.1))
    other.optimizer.build(other.trainable_variables)
    other.load_weights(tmp_path / "a.weights.h5")
    for a, b in zip(model.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    run_dir_lib.save_model(model, tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.weights.h5", "b.weights.h5", "m.keras"]


def test_recorder_refuses_a_nan_epoch(tmp_path):
    model = training.build_model("mnist", (28, 28), 2, hidden_units=(4,))
    recorder = training.RunRecorder(tmp_path, rows=[], examples_per_epoch=100)
    recorder.set_model(model)
    recorder.on_train_begin()
    recorder.on_epoch_begin(0)
    recorder.on_epoch_end(0, {"elbo": float("nan"), "val_elbo": -100.0})
    # No row, no checkpoint, training told to stop; train() then raises "training diverged".
    assert recorder.diverged_at == 1 and model.stop_training
    assert recorder.rows == [] and not list(tmp_path.iterdir())
    recorder.on_epoch_begin(0)
    recorder.on_epoch_end(0, {"elbo": -120.0, "val_elbo": -121.0})
    assert [r["epoch"] for r in recorder.rows] == [1]
    assert (tmp_path / "checkpoints" / "state.json").is_file()
    assert read_rows(tmp_path)[0]["train_elbo"] == "-120.000000"
