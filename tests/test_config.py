"""`TrainConfig` is the one source of a run's settings: the CLI's flags, defaults and help are
built from it, and presets are named sets of its fields (issue 16; the IWAE preset of issue 17)."""

import dataclasses
import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_aevb import cli, optimizers, training
from keras_aevb.config import PRESETS, TrainConfig, cli_fields, default_text


def _train_args(argv):
    parser = cli.build_parser()
    args = parser.parse_args(["train", *argv])
    return cli.train_config(args)


def test_the_train_command_defaults_are_trainconfig_defaults(tmp_path):
    # Only the flags a user must give are given: every other setting is TrainConfig's default.
    config = _train_args(["--output", str(tmp_path / "run")])
    assert config == TrainConfig(output=str(tmp_path / "run"))


def test_every_cli_setting_has_a_flag_whose_help_states_the_trainconfig_default(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    names = {field.name for field in cli_fields()}
    # Every field is a flag except the ones a Python caller sets (a list of step sizes).
    assert names == {f.name for f in dataclasses.fields(TrainConfig)} - {"lr_candidates", "preset"}
    for field in cli_fields():
        flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
        assert flag in text, flag
        if not field.metadata.get("required"):  # a required flag has no default to state
            assert f"(default: {default_text(field)})" in text, field.name


def test_flags_given_on_the_command_line_override_the_defaults(tmp_path):
    config = _train_args(
        ["--output", "r", "--latent-dim", "3", "--hidden-units", "100,50", "--no-tensorboard"]
    )
    assert (config.latent_dim, config.hidden_units, config.tensorboard) == (3, (100, 50), False)


def test_the_iwae_preset_is_burda_et_al_protocol():
    # Burda, Grosse & Salakhutdinov (2015), section 5 and their released code (yburda/iwae:
    # experiments.py, datasets.py, optimizers.py): 784-200-200-50 tanh, dynamic binarization,
    # batch 20, the first 59,600 training images (the last 400 are their validation set),
    # Adam with beta_1 = 0.99 and epsilon = 1e-4, 3^i passes at 1e-3 * 10^(-i/7), i = 0..7.
    config = _train_args(["--preset", "iwae", "--output", "r"])
    expected = TrainConfig(
        output="r",
        preset="iwae",
        dataset="mnist",
        latent_dim=50,
        hidden_units=(200, 200),
        estimator="iwae",
        num_samples=5,
        batch_size=20,
        epochs=3280,
        train_examples=59_600,
        optimizer="iwae_adam",
        weight_decay=0.0,
        binarization="dynamic",
    )
    assert config == expected
    assert TrainConfig.from_preset("iwae", output="r") == expected


def test_flags_override_the_preset_and_the_default_preset_is_the_paper():
    config = _train_args(
        ["--preset", "iwae", "--output", "r", "--num-samples", "1", "--epochs", "4"]
    )
    assert (config.num_samples, config.epochs, config.batch_size) == (1, 4, 20)
    assert PRESETS["paper"] == {}
    assert TrainConfig.from_preset("paper", output="r") == TrainConfig(output="r", preset="paper")
    with pytest.raises(ValueError, match="unknown preset 'vae'; use one of paper, iwae"):
        TrainConfig.from_preset("vae")


def test_the_iwae_learning_rate_schedule_steps_at_each_stage_boundary():
    # 3^i passes at the rate 1e-4 * round(10^(1 - i/7), 1) (the authors' rounding), i = 0..7,
    # then the last rate: exact float32 values, no tolerance.
    spp = 10  # steps per pass
    schedule = optimizers.IWAELearningRate(steps_per_pass=spp)
    rates = [1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4]
    start = 0
    for i, rate in enumerate(rates):
        end = start + 3**i * spp
        got = [float(schedule(step)) for step in (start, end - 1)]
        np.testing.assert_array_equal(got, np.float32([rate, rate]), err_msg=f"stage {i}")
        start = end
    assert start == 3280 * spp
    assert float(schedule(10**9)) == np.float32(1e-4)
    again = optimizers.IWAELearningRate.from_config(schedule.get_config())
    assert float(again(5 * spp)) == np.float32(5.2e-4)


def test_the_iwae_optimizer_is_adam_with_burda_settings():
    optimizer = training.make_optimizer("iwae_adam", 2e-3, steps_per_pass=7)
    assert isinstance(optimizer, keras.optimizers.Adam)
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon) == (0.99, 0.999, 1e-4)
    # --learning-rate scales the whole schedule; auto is Burda et al.'s 1e-3, with no search.
    assert float(optimizer.learning_rate) == np.float32(2e-3)
    assert training.LEARNING_RATE_CANDIDATES["iwae_adam"] == (1e-3,)
    with pytest.raises(ValueError, match="steps_per_pass"):
        training.make_optimizer("iwae_adam", 1e-3)


def test_a_preset_run_trains_resumes_and_saves_its_schedule(tmp_path, mnist_dir):
    # The user's path: the CLI in a subprocess, then the model loaded in a fresh process with
    # its optimizer (the schedule deserializes), then the same command resumes and extends.
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "keras_aevb", "train", "--preset", "iwae", "--data-dir",
        str(mnist_dir), "--output", str(run), "--train-examples", "200", "--test-examples",
        "100", "--num-samples", "2", "--verbose", "0", "--no-tensorboard",
    ]  # fmt: skip
    subprocess.run([*command, "--epochs", "1"], check=True, timeout=600)
    config = json.loads((run / "config.json").read_text())
    assert (config["optimizer"], config["preset"], config["learning_rate_used"]) == (
        "iwae_adam",
        "iwae",
        1e-3,
    )
    assert config["learning_rate_search"] is None  # one candidate: nothing to search
    subprocess.run([*command, "--epochs", "2"], check=True, timeout=600)
    rows = (run / "history.csv").read_text().splitlines()
    assert len(rows) == 3  # header + 2 epochs, the second from the resumed run
    script = (
        "import keras, keras_aevb, sys\n"
        f"m = keras.saving.load_model({str(run / 'model.keras')!r})\n"
        "s = m.optimizer.learning_rate\n"
        "assert m.optimizer.iterations.numpy() == 20, m.optimizer.iterations.numpy()\n"
        "print(type(m.optimizer._learning_rate).__name__, float(s))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=300
    ).stdout.split()
    # 200 examples / batch 20 = 10 steps per pass: after 2 passes the second stage's rate.
    assert out[0] == "IWAELearningRate" and float(out[1]) == pytest.approx(7.2e-4, rel=1e-6)
