"""`keras-aevb reproduce`: the runs each figure trains, staged budgets, resumption, the files.

The real figures train for hours (docs/results/README.md); here the same code runs on Frey Face
(the real file, a few hundred examples per run) and on MNIST's first images, with the paper's
models, so what is checked is the mechanism: which runs, which files, that a larger budget
extends a run exactly as one longer run, and that a rerun trains nothing.
"""

import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_aevb import data as data_lib
from keras_aevb import reproduce

HAS_FREY = data_lib.default_data_dir("frey_face") is not None
HAS_MNIST = data_lib.default_data_dir("mnist") is not None


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_each_figure_trains_the_papers_runs():
    names = [s.name for s in reproduce.figure_runs("fig2", "mnist")]
    assert names == [
        f"mnist_nz{n}_{m}" for n in (3, 5, 10, 20, 200) for m in ("aevb", "wake_sleep")
    ]
    frey = reproduce.figure_runs("fig2", "frey_face")
    assert [(s.latent_dim, s.method) for s in frey] == [
        (n, m) for n in (2, 5, 10, 20) for m in ("aevb", "wake_sleep")
    ]
    assert len(reproduce.figure_runs("fig2")) == 18
    fig3 = reproduce.figure_runs("fig3")
    assert [s.name for s in fig3] == [
        "fig3_n1000_aevb",
        "fig3_n1000_wake_sleep",
        "fig3_n1000_mcem",  # MCEM on the small training set only, as in the paper
        "fig3_n50000_aevb",
        "fig3_n50000_wake_sleep",
    ]
    assert {(s.latent_dim, s.hidden_units, s.binarization) for s in fig3} == {(3, (100,), "static")}
    assert [s.name for s in reproduce.figure_runs("fig4")] == [
        "mnist_nz2_aevb",
        "frey_face_nz2_aevb",
    ]
    # Fig. 5 reuses Fig. 2's and Fig. 4's runs: the same names, so the same directories.
    assert [s.name for s in reproduce.figure_runs("fig5")] == [
        f"mnist_nz{n}_aevb" for n in (2, 5, 10, 20)
    ]
    with pytest.raises(ValueError, match="fig5 has no frey_face panel"):
        reproduce.figure_runs("fig5", "frey_face")
    with pytest.raises(ValueError, match="unknown figure 'fig9'"):
        reproduce.figure_runs("fig9")


def test_budgets_round_up_to_whole_epochs_and_stages_are_log_spaced():
    mnist20 = reproduce.figure_runs("fig2", "mnist")[6]
    config = reproduce.train_config(mnist20, "/runs", 10**7)
    # 167 passes of 60,000: the first whole epoch count that reaches 10^7 (166 would stop short).
    assert config.max_examples == 167 * 60_000
    assert config.output == "/runs/mnist_nz20_aevb"
    assert (config.latent_dim, config.method, config.learning_rate) == (20, "aevb", "auto")
    frey = reproduce.figure_runs("fig2", "frey_face")[0]
    assert reproduce.train_config(frey, "/r", 10**7).max_examples == 10**7
    assert reproduce.train_config(frey, "/r", 700).max_examples == 700  # below one epoch
    assert reproduce.budget_stages(10**7) == [10**5, 10**6, 10**7]
    assert reproduce.budget_stages(3 * 10**6) == [10**5, 10**6, 3 * 10**6]
    for bad in ("lots", 0, -5, 1.5, float("inf")):
        with pytest.raises(ValueError, match="budget"):
            reproduce.reproduce("fig2", budget=bad)


def test_value_at_reads_the_last_row_at_a_milestone_and_nothing_before_it():
    rows = [
        {"examples_seen": 600_000.0, "test_elbo": -130.0},
        {"examples_seen": 1_020_000.0, "test_elbo": -120.0},
        {"examples_seen": 1_200_000.0, "test_elbo": -118.0},
    ]
    # 1,020,000 is within the 1 % a whole-epoch run overshoots a milestone by.
    assert reproduce.value_at(rows, 10**6, "test_elbo") == -120.0
    assert reproduce.value_at(rows, 10**7, "test_elbo") is None  # not reached


@pytest.mark.skipif(not HAS_FREY, reason="needs ../shared/data/frey_face")
def test_fig2_extends_its_runs_as_one_longer_run_and_a_rerun_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "FIG2_LATENT_DIMS", {"frey_face": (2,), "mnist": ()})
    monkeypatch.setattr(reproduce, "METHODS", ("aevb", "wake_sleep"))
    monkeypatch.setattr(reproduce, "EXAMPLES_PER_EPOCH", {"frey_face": 300, "mnist": None})
    kwargs = dict(runs_dir=tmp_path / "runs", out=tmp_path / "out", verbose=0, print_fn=lambda m: 0)
    reproduce.reproduce("fig2", dataset="frey_face", budget=600, **kwargs)
    out = tmp_path / "out" / "fig2"
    first = {m: _rows(out / f"frey_face_nz2_{m}.csv") for m in ("aevb", "wake_sleep")}
    assert [r["examples_seen"] for r in first["aevb"]] == ["300", "600"]
    assert (out / "frey_face.png").stat().st_size > 10_000

    reproduce.reproduce("fig2", dataset="frey_face", budget=1200, **kwargs)
    extended = _rows(out / "frey_face_nz2_aevb.csv")
    assert [r["examples_seen"] for r in extended] == ["300", "600", "900", "1200"]
    assert extended[:2] == first["aevb"]  # the stored rows are kept as they were

    # The same command in one go: the staged run ends with the same weights (the data stream,
    # the noise and the optimizer state resume exactly).
    reproduce.reproduce(
        "fig2", dataset="frey_face", budget=1200, **dict(kwargs, runs_dir=tmp_path / "one")
    )
    one = _rows(tmp_path / "out" / "fig2" / "frey_face_nz2_aevb.csv")
    for a, b in zip(extended, one, strict=True):
        # The bounds of a resumed run equal the uninterrupted run's to float32 summation noise.
        np.testing.assert_allclose(float(a["test_elbo"]), float(b["test_elbo"]), rtol=1e-5)

    messages = []
    written = reproduce.reproduce(
        "fig2", dataset="frey_face", budget=1200, **dict(kwargs, print_fn=messages.append)
    )
    _assert_each_file_written_is_returned_and_announced(written, messages)
    assert len(_rows(out / "frey_face_nz2_aevb.csv")) == 4
    # A finished run is read, not trained (and no step-size search runs again).
    assert sum("no epochs run" in m for m in messages) == 2, messages
    assert not any("learning rate auto" in m for m in messages)
    summary = _rows(out / "frey_face_summary.csv")
    assert [(r["latent_dim"], r["method"]) for r in summary] == [("2", "aevb"), ("2", "wake_sleep")]
    assert summary[0]["examples_seen"] == "1200"


def _assert_each_file_written_is_returned_and_announced(written, messages):
    """`reproduce` returns the paths it wrote as strings and prints a line for each, whatever
    the figure (a caller and a user of the CLI learn the same list)."""
    assert written and all(isinstance(p, str) and Path(p).is_file() for p in written), written
    prefix = "keras-aevb: wrote "
    announced = [m.removeprefix(prefix) for m in messages if m.startswith(prefix)]
    assert announced == written


@pytest.mark.skipif(not HAS_MNIST, reason="needs ../shared/data/mnist")
def test_fig3_scores_each_stage_once(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "FIG3_TRAIN_SIZES", (1000,))
    monkeypatch.setattr(reproduce, "FIG3_EXAMPLES_PER_EPOCH", 500)
    monkeypatch.setattr(reproduce, "FIG3_IS_SAMPLES", 20)
    monkeypatch.setattr(reproduce, "FIG3_HMC_EXAMPLES", 3)
    monkeypatch.setattr(reproduce, "FIG3_HMC_SAMPLES", 20)
    monkeypatch.setattr(reproduce, "FIG3_HMC_BURNIN", 20)
    monkeypatch.setattr(reproduce, "FIG3_EVAL_EXAMPLES", 50)
    monkeypatch.setattr(reproduce, "budget_stages", lambda budget: [500, budget])
    messages = []
    kwargs = dict(runs_dir=tmp_path / "runs", out=tmp_path / "out", verbose=0)
    written = reproduce.reproduce("fig3", budget=1000, print_fn=messages.append, **kwargs)
    _assert_each_file_written_is_returned_and_announced(written, messages)
    out = tmp_path / "out" / "fig3"
    aevb = _rows(out / "fig3_n1000_aevb.csv")
    assert [r["examples_seen"] for r in aevb] == ["500", "1000"]
    mcem = _rows(out / "fig3_n1000_mcem.csv")
    assert [r["examples_seen"] for r in mcem] == ["1000"]  # whole passes only: stage 500 is one
    for row in aevb + mcem:
        for column in reproduce.fig3_columns()[4:]:
            value = float(row[column])
            # A log-likelihood of binary 784-pixel images: negative, and above uniform pixels.
            assert -784 * np.log(2) < value < 0, (column, value)
    assert (out / "mnist.png").stat().st_size > 10_000
    scored = len([m for m in messages if " at " in m and "examples:" in m])
    reproduce.reproduce("fig3", budget=1000, print_fn=messages.append, **kwargs)
    assert len([m for m in messages if " at " in m and "examples:" in m]) == scored


def test_the_command_line_refuses_a_bad_figure_request_in_one_line(tmp_path):
    for argv, message in (
        (["reproduce", "fig5", "--dataset", "frey_face"], "fig5 has no frey_face panel"),
        (["reproduce", "fig2", "--budget", "lots"], "--budget: must be a number such as 1e7"),
        (["reproduce", "fig2", "--budget", "0"], "--budget: must be a positive whole number"),
        (["reproduce", "fig7"], "invalid choice: 'fig7'"),
        (["reproduce", "fig2", "--latent-dim", "7"], "fig2 has no N_z = 7 run; its N_z are 2, 3,"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "keras_aevb", *argv],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
        assert done.returncode == 2, (argv, done.stderr)
        assert message in done.stderr, (argv, done.stderr)
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.skipif(not HAS_FREY, reason="needs ../shared/data/frey_face")
def test_a_pretrained_model_records_the_bound_it_loads_with(tmp_path, monkeypatch):
    from keras_aevb import pretrained_models

    monkeypatch.setattr(reproduce, "EXAMPLES_PER_EPOCH", {"frey_face": 300, "mnist": None})
    reproduce.reproduce(
        "fig4",
        dataset="frey_face",
        budget=300,
        runs_dir=tmp_path / "runs",
        out=tmp_path / "out",
        pretrained_dir=tmp_path / "pretrained",
        verbose=0,
        print_fn=lambda m: 0,
    )
    assert (tmp_path / "out" / "fig4" / "frey_face.png").is_file()
    info = json.loads((tmp_path / "pretrained" / "frey_face_nz2.json").read_text())
    assert info["examples_seen"] == 300 and info["dataset"] == "frey_face"
    import keras

    model = keras.saving.load_model(tmp_path / "pretrained" / "frey_face_nz2.keras", compile=False)
    assert getattr(model, "optimizer", None) is None  # weights only
    assert all(w.dtype == "float32" for w in model.weights if w.trainable)
    again = pretrained_models.pretrained_test_bound(model, info)
    # The same draws from the same seed: the recorded value, to float32 summation order.
    np.testing.assert_allclose(again, info["test_bound"]["value"], rtol=1e-5)


def test_a_shipped_models_recorded_command_trains_exactly_its_run(monkeypatch):
    """The command in a pretrained model's JSON, run as written, retrains that model and no
    other run (the MNIST N_z = 20 model's 10^8 budget must not reach the figure's other nine)."""
    from keras_aevb import cli, pretrained_models

    recorded = {}

    def save_pretrained(run_dir, name, directory, data_dir, command):
        recorded[name] = command
        return []

    monkeypatch.setattr(pretrained_models, "save_pretrained", save_pretrained)
    shipped = [s for f in ("fig2", "fig4") for s in reproduce.figure_runs(f)]
    shipped = {s.name: s for s in shipped if s.name in pretrained_models.SHIPPED_RUNS}
    assert len(shipped) == len(pretrained_models.SHIPPED_RUNS)

    class Result:
        run_dir = "unused"

    for spec in shipped.values():
        reproduce._ship(spec, Result(), "saved_models/pretrained", None, 10**8)
    # And the commands the shipped JSON files hold (saved_models/pretrained).
    shipped_dir = pretrained_models.pretrained_dir()
    parser = cli.build_parser()
    for run_name in shipped:
        name = pretrained_models.SHIPPED_RUNS[run_name]
        committed = json.loads((shipped_dir / f"{name}.json").read_text())["command"]
        for command in (recorded[name], committed):
            _check_command_trains_only(parser, command, run_name)


def _check_command_trains_only(parser, command, run_name):
    argv = shlex.split(command)
    assert argv[0] == "keras-aevb", command
    args = parser.parse_args(argv[1:])
    assert args.pretrained_dir == "saved_models/pretrained", command
    chosen = reproduce.chosen_runs(args.figure, args.dataset, args.latent_dim, args.method)
    assert [s.name for s in chosen] == [run_name], command


def test_method_chooses_the_runs_of_a_figure_like_latent_dim(tmp_path):
    names = [s.name for s in reproduce.chosen_runs("fig2", "mnist", [20], ["wake_sleep"])]
    assert names == ["mnist_nz20_wake_sleep"]
    names = [s.name for s in reproduce.chosen_runs("fig3", None, None, ["mcem"])]
    assert names == ["fig3_n1000_mcem"]
    with pytest.raises(ValueError, match="fig4 has no mcem run; its methods are aevb"):
        reproduce.chosen_runs("fig4", None, None, ["mcem"])
    done = subprocess.run(
        [sys.executable, "-m", "keras_aevb", "reproduce", "fig2", "--method", "mcem"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "fig2 has no mcem run; its methods are aevb, wake_sleep" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
