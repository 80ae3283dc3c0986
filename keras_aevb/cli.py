"""`keras-aevb`: train, evaluate and draw the paper's models from the command line.

    keras-aevb train --dataset mnist --output runs/nz20 --latent-dim 20 --epochs 3
    keras-aevb evaluate runs/nz20/model.keras --dataset mnist --num-samples 1000
    keras-aevb sample runs/nz20/model.keras --num 100 --out samples.png
    keras-aevb reconstruct runs/nz20/model.keras --dataset mnist --out recon.png
    keras-aevb manifold runs/nz2/model.keras --grid 20 --out manifold.png
    keras-aevb plot runs/nz3 runs/nz20 --out bound.png
    keras-aevb export runs/nz20/model.keras saved_models/mnist_vae

A thin layer over importable functions (`keras_aevb.training.train`, `keras_aevb.plotting.*`),
which notebooks call directly. Bad input (missing or corrupt data, settings that cannot work, a
model that cannot draw the asked picture) ends with one line `keras-aevb: error: ...` naming
the problem and the fix on stderr, and exit status 2, without a traceback (`--traceback` shows
it, and the status is still 2). Ctrl-C ends with one line and exit status 130. `python -m
keras_aevb` runs the same program.

Fast and quiet: the arguments, the paths, the data files' presence, the model archive and the
size caps are checked before TensorFlow is imported (its import takes seconds), so `--help`
and argument errors answer at once; and TensorFlow's native start-up lines (absl, oneDNN, CUDA
stubs), written straight to file descriptor 2, are held back unless `--verbose 2` or
`--traceback` asks for them. Lines from that start-up that are not known chatter still show.

Reference: Kingma & Welling, "Auto-Encoding Variational Bayes", arXiv:1312.6114.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
import tempfile
import traceback
import zipfile
from pathlib import Path

from keras_aevb import config as config_lib  # the standard library only
from keras_aevb._io import RunWriteError  # the standard library only
from keras_aevb.config import (
    BINARIZATIONS,
    DATASETS,
)
from keras_aevb.config import parse_nonnegative_int as _nonnegative_int
from keras_aevb.config import parse_positive_int as _positive_int
from keras_aevb.version import __version__

__all__ = [
    "PROG",
    "UsageError",
    "build_parser",
    "main",
    "train_config",
]

PROG = "keras-aevb"

# The choices the parser lists come from keras_aevb.config (the standard library only), so
# that --help and argument errors need neither TensorFlow nor NumPy.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")  # plotting.IMAGE_FORMATS
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".tif", ".tiff", ".eps")
FIGURES = ("fig2", "fig3", "fig4", "fig5")  # keras_aevb.reproduce.FIGURES

# Caps on what a request can make the program allocate (DESIGN 6b). A picture of MAX_SAMPLES
# MNIST digits is 2998 x 2998 pixels; the decoder's activations for them take tens of MB.
MAX_SAMPLES = 10_000  # sample --num, reconstruct --num
MAX_GRID = 100  # manifold --grid: 100 x 100 = 10,000 decoded points
MAX_SCALE = 32  # --scale
MAX_PICTURE_SIDE = 8192  # pixels a side, after --scale: 8192 x 8192 = 64 MiB of grey bytes
MAX_PICTURE_PIXELS = MAX_PICTURE_SIDE**2
_GRID_PAD = 2  # pixels between images in the sample and reconstruction grids

INTERRUPTED = f"{PROG}: interrupted; rerun the same command to resume"


# ------------------------------------------------------------------------------ helpers


class UsageError(ValueError):
    """A user-input problem found by the CLI itself (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviations (`--lr` is not `--lr-search-steps`), whose errors are
    one line: `main` prints the message and a hint instead of the usage block."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{message}; see {self.prog} --help")


def _capped_int(cap):
    """An argparse type: an integer from 1 to `cap` (a resource cap, stated in --help)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not 1 <= value <= cap:
            raise argparse.ArgumentTypeError(
                f"must be an integer from 1 to at most {cap} (a cap on memory), got {text!r}"
            )
        return value

    return parse


def _example_count(text):
    """A count of examples written as 10000000 or 1e7."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number such as 1e7, got {text!r}") from None
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(value)


def _out_path(path, formats=IMAGE_SUFFIXES):
    """--out: its directory exists and its suffix names a format that can be written."""
    path = Path(path)
    names = ", ".join(formats)
    if not path.suffix:
        raise UsageError(f"--out {path} has no suffix to name the picture format; use {names}")
    if path.suffix.lower() not in formats:
        raise UsageError(f"--out {path}: cannot write {path.suffix!r} pictures; use {names}")
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"output directory {path.parent} does not exist; create it or pass another --out"
        )
    return path


def _model_archive(path):
    """Checks, without TensorFlow, that `path` is a `.keras` archive of a keras_aevb model.

    Returns:
        The archive's config.json as a dict.
    """
    path = Path(path)
    fix = "pass the model.keras that `keras-aevb train` wrote"
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}; {fix}")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; pass RUN_DIR/model.keras")
    if path.suffix != ".keras":
        raise UsageError(f"{path} is not a .keras file; pass RUN_DIR/model.keras")
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except zipfile.BadZipFile:
        raise UsageError(f"{path} is not a .keras archive (not a zip file); {fix}") from None
    except KeyError:
        raise UsageError(f"{path} is not a .keras archive (no config.json in it); {fix}") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise UsageError(
            f"{path} is not a .keras archive (config.json is not JSON); {fix}"
        ) from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} is not a .keras archive (config.json holds no model); {fix}")
    registered, module = str(config.get("registered_name")), str(config.get("module"))
    if not (registered.startswith("keras_aevb>") or module.startswith("keras_aevb")):
        raise UsageError(
            f"{path} holds a {config.get('class_name', 'model')} (from {module}), not a "
            f"keras_aevb model; {fix}"
        )
    return config


def _archive_event_shape(config):
    """The image shape the archived model was built for, e.g. (28, 28), or None."""
    shape = (config.get("build_config") or {}).get("input_shape")
    if isinstance(shape, list) and len(shape) >= 2 and all(isinstance(d, int) for d in shape[1:]):
        return tuple(shape[1:])
    return None


def _check_picture(rows, cols, event_shape, pad, scale, fix):
    """Refuses a picture over MAX_PICTURE_PIXELS before anything is drawn."""
    if event_shape is None or len(event_shape) < 2:
        return
    height = (rows * event_shape[0] + (rows - 1) * pad) * scale
    width = (cols * event_shape[1] + (cols - 1) * pad) * scale
    if height * width > MAX_PICTURE_PIXELS:
        raise UsageError(
            f"the picture would be {height} x {width} pixels, more than the cap of "
            f"{MAX_PICTURE_SIDE} x {MAX_PICTURE_SIDE}; {fix}"
        )


def _sample_grid_size(num, rows):
    cols = math.ceil(num / rows) if rows else math.ceil(math.sqrt(num))
    return rows or math.ceil(num / cols), cols


def _reconstruction_grid_size(num, cols):
    cols = min(cols, num)
    return 2 * math.ceil(num / cols), cols


def load_model(path):
    """Loads a `.keras` file written by `keras-aevb train` (or `model.save`), uncompiled."""
    import keras

    _model_archive(path)
    path = Path(path)
    import keras_aevb.baselines  # noqa: F401 (registers the baselines' classes)

    try:
        model = keras.saving.load_model(path, compile=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise UsageError(
            f"cannot load {path} as a keras_aevb model ({type(e).__name__}: {reason}); "
            "pass a model.keras written by `keras-aevb train`"
        ) from None
    if not hasattr(model, "event_shape"):
        raise UsageError(
            f"{path} holds a {type(model).__name__}, not a keras_aevb model; "
            "pass a model.keras written by `keras-aevb train`"
        )
    return model


def _run_config(model_path):
    """The config.json next to a model file, or {} (then the flags must say everything)."""
    path = Path(model_path).parent / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (ValueError, OSError):  # JSONDecodeError, UnicodeDecodeError
            return {}
        return config if isinstance(config, dict) else {}
    return {}


def _data_settings(args, run_config):
    """Dataset, data dir, binarization and seed: the flags, else the run's config.json."""
    from keras_aevb import data as data_lib

    dataset = args.dataset or run_config.get("dataset")
    if dataset is None:
        raise UsageError("which data? pass --dataset mnist or --dataset frey_face")
    if dataset not in data_lib.DATASETS:
        raise data_lib.DataError(
            f"unknown dataset {dataset!r}; use one of {', '.join(data_lib.DATASETS)}"
        )
    data_dir = args.data_dir or (
        run_config.get("data_dir") if run_config.get("dataset") == dataset else None
    )
    binarization = args.binarization
    if binarization is None and run_config.get("dataset") == dataset:
        binarization = run_config.get("binarization")
    if binarization is None:
        binarization = data_lib.DEFAULT_BINARIZATION[dataset]
    seed = args.seed if args.seed is not None else int(run_config.get("seed", 0))
    return dataset, data_dir, binarization, seed


def _check_likelihood(model, binarization):
    likelihood = getattr(model.decoder, "likelihood", None)
    if likelihood == "bernoulli" and binarization == "none":
        raise UsageError(
            "this model has a Bernoulli decoder, which needs binary pixels, but --binarization "
            "none keeps them grey; pass --binarization dynamic, static or threshold"
        )
    if likelihood == "gaussian" and binarization != "none":
        raise UsageError(
            f"this model has a Gaussian decoder, whose density grows without limit on "
            f"{binarization}-binarized pixels; pass --binarization none"
        )


def _check_data_files(dataset, data_dir, splits):
    """Before TensorFlow starts: the files `data.load_dataset` will read are there.

    Only their presence: their contents are read (and checked) when they are loaded. With no
    --data-dir, MNIST may still come from a TFDS copy, which needs TensorFlow to look for.
    """
    from keras_aevb import data as data_lib

    if dataset == "mnist":
        if data_dir is None:
            return
        directory = Path(data_dir)
        if not directory.is_dir():
            raise data_lib.DataError(
                f"MNIST data directory not found: {directory}; {data_lib._MNIST_FIX}"
            )
        for split in splits:
            for stem in data_lib._MNIST_SPLITS[split]:
                if data_lib.find_file(directory, stem) is None:
                    raise data_lib.DataError(
                        f"MNIST IDX file not found: {directory / stem}(.gz); pass --data-dir "
                        "pointing at a directory with the four MNIST IDX files"
                    )
        return
    if data_dir is None:
        if data_lib.default_data_dir(dataset) is None:
            searched = ", ".join(str(d) for d in data_lib.candidate_dirs(dataset))
            raise data_lib.DataError(
                f"Frey Face not found: no {data_lib._FREY_FACE_FILE} in {searched}; "
                f"{data_lib._FREY_FACE_FIX}"
            )
        return
    path = Path(data_dir)
    path = path / data_lib._FREY_FACE_FILE if path.is_dir() else path
    if not path.is_file():
        raise data_lib.DataError(f"Frey Face file not found: {path}; {data_lib._FREY_FACE_FIX}")


def _check_event_shape(model, x, dataset):
    if tuple(x.shape[1:]) != tuple(model.event_shape):
        raise UsageError(
            f"the model takes images of shape {list(model.event_shape)}, but {dataset} has "
            f"{list(x.shape[1:])}; pass the --dataset the model was trained on"
        )


# ---------------------------------------------------------------------- TensorFlow start-up

# Lines TensorFlow's native code writes to fd 2 while it starts, whatever the run: absl's note
# about logs before InitializeLog, the CUDA stub's search for a GPU (on machines without one),
# the CPU-feature and oneDNN notes, and plug-in registrations. INFO lines (I + date) of the
# start-up are chatter too. Anything else (a real error, a Python warning) is shown.
_STARTUP_NOISE = re.compile(
    r"^I\d{4} \d\d:\d\d:\d\d"
    r"|absl::InitializeLog\(\)"
    r"|failed call to cuInit"
    r"|Could not find cuda drivers"
    r"|cpu_feature_guard|TensorFlow binary is optimized to use available CPU instructions"
    r"|^To enable the following instructions:"
    r"|oneDNN custom operations are on"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|TF-TRT Warning: Could not find TensorRT"
)


def _import_quietly(modules, show, then=None):
    """Imports `modules` (and calls `then()`), keeping their native start-up logs off stderr.

    TensorFlow's C++ code writes straight to file descriptor 2, past `sys.stderr`, and
    TF_CPP_MIN_LOG_LEVEL does not silence absl's or CUDA's lines. So fd 2 points at a temporary
    file meanwhile; afterwards the lines that are not known start-up chatter (`_STARTUP_NOISE`)
    are written to stderr, so that a real error is never lost. `show`: import as is.
    """
    if show:
        for name in modules:
            importlib.import_module(name)
        if then is not None:
            then()
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            for name in modules:
                importlib.import_module(name)
            if then is not None:
                then()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines = log.read().decode("utf-8", "replace").splitlines()
            kept = [line for line in lines if line.strip() and not _STARTUP_NOISE.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def _start_tensorflow(show):
    """Imports TensorFlow and the whole package (its classes registered with Keras).

    Quietly unless `show`. A missing TensorFlow or a Keras backend other than TensorFlow is a
    UsageError (one line, exit status 2) naming the fix.
    """
    if "tensorflow" in sys.modules:  # in-process callers (tests, notebooks): already started
        return
    if not show:
        # INFO lines of the run itself (e.g. "Compiled cluster using XLA!"); warnings and
        # errors still show. The CLI is a program: it may set its own environment (the
        # package never does). A value the user set wins.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

    def load():
        sys.modules["keras_aevb"]._load_everything()  # also checks the Keras backend
        # The CUDA stub's lines come here; no TensorFlow context is created (a multi-worker
        # strategy must still be created before any op).
        sys.modules["tensorflow"].config.list_physical_devices()

    try:
        _import_quietly(["tensorflow", "keras", "keras_aevb"], show, then=load)
    except ImportError as e:
        raise UsageError(" ".join(str(e).split())) from e


# ---------------------------------------------------------------- checks (no TensorFlow)
#
# Each runs before TensorFlow is imported; what it finds is kept on `args` for the command.


def check_train(args):
    args.config = train_config(args)
    _check_data_files(args.config.dataset, args.config.data_dir, ("train", "test"))


def _check_model_and_data(args, splits):
    from keras_aevb import data as data_lib

    args.model_config = _model_archive(args.model)
    args.data_settings = _data_settings(args, _run_config(args.model))
    dataset, data_dir, _, _ = args.data_settings
    if dataset == "mnist":
        splits = [s for s in splits if s in data_lib._MNIST_SPLITS]  # others: the loader says
    _check_data_files(dataset, data_dir, splits)


def check_evaluate(args):
    _check_model_and_data(args, (args.split,))


def check_sample(args):
    args.out = _out_path(args.out)
    args.model_config = _model_archive(args.model)
    if args.rows is not None and args.rows > args.num:
        raise UsageError(
            f"--rows {args.rows} is more than --num {args.num} samples; pass --rows {args.num} "
            "or fewer"
        )
    rows, cols = _sample_grid_size(args.num, args.rows)
    event_shape = _archive_event_shape(args.model_config)
    _check_picture(rows, cols, event_shape, _GRID_PAD, args.scale, "lower --num or --scale")


def check_reconstruct(args):
    args.out = _out_path(args.out)
    _check_model_and_data(args, (args.split,))
    rows, cols = _reconstruction_grid_size(args.num, args.cols)
    event_shape = _archive_event_shape(args.model_config)
    _check_picture(rows, cols, event_shape, _GRID_PAD, args.scale, "lower --num or --scale")


def check_manifold(args):
    args.out = _out_path(args.out)
    args.model_config = _model_archive(args.model)
    event_shape = _archive_event_shape(args.model_config)
    _check_picture(args.grid, args.grid, event_shape, 0, args.scale, "lower --grid or --scale")


def check_plot(args):
    args.out = _out_path(args.out, FIGURE_SUFFIXES)
    for run_dir in args.run_dirs:
        if not Path(run_dir).is_dir():
            raise FileNotFoundError(f"run directory not found: {run_dir}")


# ------------------------------------------------------------------------------ commands


def check_reproduce(args):
    from keras_aevb import reproduce

    runs = reproduce.chosen_runs(args.figure, args.dataset, args.latent_dim, args.method)
    for dataset in sorted({run.dataset for run in runs}):
        _check_data_files(dataset, args.data_dir, ("train", "test"))


def cmd_reproduce(args):
    from keras_aevb import reproduce

    reproduce.reproduce(
        args.figure,
        dataset=args.dataset,
        budget=args.budget,
        runs_dir=args.runs_dir,
        out=args.out,
        data_dir=args.data_dir,
        mcem_budget=args.mcem_budget,
        pretrained_dir=args.pretrained_dir,
        latent_dims=args.latent_dim,
        methods=args.method,
        verbose=args.verbose,
    )
    return 0


def _add_config_flags(parser):
    """One flag per `TrainConfig` field, its default and help read from the field.

    The parser's defaults are left unset (argparse.SUPPRESS) so that `train_config` can tell a
    flag given from a default: a given flag overrides the preset, a default does not."""
    groups = {}
    for field in config_lib.cli_fields():
        meta = field.metadata
        flag = meta.get("flag", "--" + field.name.replace("_", "-"))
        default = "" if meta.get("required") else f" (default: {config_lib.default_text(field)})"
        kwargs = {"dest": field.name, "default": argparse.SUPPRESS, "help": meta["help"] + default}
        for key in ("type", "choices", "metavar", "action", "required"):
            if key in meta:
                kwargs[key] = meta[key]
        group = meta.get("group")
        if group is not None and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        (parser if group is None else groups[group]).add_argument(flag, **kwargs)


def train_config(args):
    """The `TrainConfig` of a parsed `train` command: the preset, then the flags given."""
    given = {
        f.name: getattr(args, f.name) for f in config_lib.cli_fields() if hasattr(args, f.name)
    }
    if args.preset is None:
        return config_lib.TrainConfig(**given)
    return config_lib.TrainConfig.from_preset(args.preset, **given)


def cmd_train(args):
    from keras_aevb import training

    training.train(args.config)
    return 0


def _elbo(model, x, batch_size, seed):
    """Mean SGVB bound over x with the model's L, in nats per datapoint."""
    import numpy as np

    from keras_aevb import training

    if not hasattr(model, "elbo"):  # a model that only reports an `elbo` metric
        import keras

        model.compile(optimizer=keras.optimizers.SGD(0.0))
        return training.evaluate_bound(model, x, batch_size)
    total = 0.0
    for i, start in enumerate(range(0, len(x), batch_size)):
        batch = x[start : start + batch_size]
        values = model.elbo(batch, num_samples=model.num_samples, seed=seed * 100_003 + i)
        total += float(np.sum(np.asarray(values, dtype=np.float64)))
    return total / len(x)


def cmd_evaluate(args):
    """Prints one JSON line about the model on a data split.

    Fields: `elbo` (the SGVB bound with the model's L, nats per datapoint), `log_likelihood`
    (importance-sampled with K = --num-samples, or App. D's HMC estimator with --method hmc;
    null for K = 0), `num_examples`, `binarization` (the method), `evaluated_on` (for dynamic:
    which fixed draw), `split`, `dataset`, with K > 0 `method` and `num_samples`, and `latent`:
    active units, KL per latent dimension and I(x; z) (`keras_aevb.diagnostics.latent_report`).
    """
    import numpy as np

    from keras_aevb import training

    model = load_model(args.model)
    dataset, data_dir, binarization, seed = args.data_settings
    _check_likelihood(model, binarization)
    x, info = training.load_eval_split(
        dataset, data_dir, args.split, binarization, seed=seed, num_examples=args.max_examples
    )
    _check_event_shape(model, x, dataset)
    result = {
        "elbo": _elbo(model, x, args.batch_size, seed),
        "log_likelihood": None,
        "num_examples": int(len(x)),
        "binarization": binarization,
        "evaluated_on": info["evaluation_binarization"],
        "split": args.split,
        "dataset": dataset,
    }
    if args.num_samples > 0:
        from keras_aevb import marginal_likelihood

        if args.method == "importance":
            values = marginal_likelihood.log_likelihood(
                model, x, num_samples=args.num_samples, batch_size=args.batch_size, seed=seed
            )
        else:
            values = marginal_likelihood.hmc_log_likelihood(
                model, x, num_samples=args.num_samples, seed=seed
            )
        result["log_likelihood"] = float(np.mean(np.asarray(values, dtype=np.float64)))
        result["method"] = args.method
        result["num_samples"] = args.num_samples
    result["latent"] = _latent_report(model, x)
    print(json.dumps(result))
    return 0


def _latent_report(model, x):
    """Posterior-collapse diagnostics (keras_aevb.diagnostics.latent_report), or None where the
    model's posterior or prior is not a product of scalar distributions."""
    from keras_aevb import diagnostics

    try:
        return diagnostics.latent_report(model, x)
    except ValueError:
        return None


def cmd_sample(args):
    from keras_aevb import plotting

    model = load_model(args.model)
    rows, cols = _sample_grid_size(args.num, args.rows)
    fix = "lower --num or --scale"
    _check_picture(rows, cols, model.event_shape, _GRID_PAD, args.scale, fix)
    grid = plotting.sample_grid(model, args.num, seed=args.seed, rows=args.rows)
    print(plotting.save_image(args.out, grid, scale=args.scale))
    return 0


def cmd_reconstruct(args):
    from keras_aevb import plotting, training

    model = load_model(args.model)
    dataset, data_dir, binarization, seed = args.data_settings
    _check_likelihood(model, binarization)
    rows, cols = _reconstruction_grid_size(args.num, args.cols)
    _check_picture(rows, cols, model.event_shape, _GRID_PAD, args.scale, "lower --num or --scale")
    x, _ = training.load_eval_split(
        dataset, data_dir, args.split, binarization, seed=seed, num_examples=args.num
    )
    _check_event_shape(model, x, dataset)
    grid = plotting.reconstruction_grid(model, x, cols=args.cols)
    print(plotting.save_image(args.out, grid, scale=args.scale))
    return 0


def cmd_manifold(args):
    from keras_aevb import plotting

    model = load_model(args.model)
    if int(model.latent_dim) != 2:
        raise UsageError(
            f"manifold needs a model with a 2-D latent space, but {args.model} has "
            f"latent_dim={model.latent_dim}; train one with --latent-dim 2"
        )
    fix = "lower --grid or --scale"
    _check_picture(args.grid, args.grid, model.event_shape, 0, args.scale, fix)
    grid = plotting.manifold(model, args.grid)
    print(plotting.save_image(args.out, grid, scale=args.scale))
    return 0


def _pair(text):
    try:
        first, second = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two example indices I:J, got {text!r}") from None
    if first < 0 or second < 0:
        raise argparse.ArgumentTypeError(f"indices must be >= 0, got {text!r}")
    return first, second


def _int_list(text):
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be integers separated by commas, got {text!r}"
        ) from None


def _float_list(text):
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be numbers separated by commas, got {text!r}"
        ) from None


def _examples(args, count):
    """The first `count` examples of the chosen split (as `reconstruct` reads them)."""
    from keras_aevb import training

    dataset, data_dir, binarization, seed = args.data_settings
    x, _ = training.load_eval_split(
        dataset, data_dir, args.split, binarization, seed=seed, num_examples=count
    )
    if len(x) < count:
        raise UsageError(
            f"the {args.split} split has {len(x)} examples; pass indices below {len(x)}"
        )
    return x


def check_reconstruct_like(args):
    args.out = _out_path(args.out, FIGURE_SUFFIXES)
    _check_model_and_data(args, (args.split,))


def cmd_interpolate(args):
    import numpy as np

    from keras_aevb import plotting

    model = load_model(args.model)
    x = _examples(args, 1 + max(max(pair) for pair in args.pairs))
    x_a = np.stack([x[i] for i, _ in args.pairs])
    x_b = np.stack([x[j] for _, j in args.pairs])
    method = "linear" if args.linear else "spherical"
    images = np.asarray(model.interpolate(x_a, x_b, steps=args.steps, method=method))
    t = np.linspace(0.0, 1.0, args.steps)
    print(
        plotting.labelled_grid(
            images,
            args.out,
            row_labels=[f"{i} -> {j}" for i, j in args.pairs],
            col_labels=[f"t={v:.2f}" for v in t],
            title=f"{method} interpolation between the posterior means ({args.split} examples)",
        )
    )
    return 0


def cmd_traverse(args):
    import numpy as np

    from keras_aevb import plotting

    model = load_model(args.model)
    dims = args.dims if args.dims is not None else list(range(min(int(model.latent_dim), 10)))
    bad = [d for d in dims if not 0 <= d < int(model.latent_dim)]
    if bad:
        raise UsageError(
            f"--dims {bad} outside the model's latent dimensions 0..{int(model.latent_dim) - 1}"
        )
    x = _examples(args, args.index + 1)[args.index]
    values = np.asarray(args.values, np.float32)
    images = np.stack([np.asarray(model.traverse(x, d, values)) for d in dims])
    print(
        plotting.labelled_grid(
            images,
            args.out,
            row_labels=[f"z_{d}" for d in dims],
            col_labels=[f"{v:g}" for v in values],
            title=f"{args.split} example {args.index}: one latent dimension at a time",
        )
    )
    return 0


def check_embed(args):
    suffix = Path(args.out).suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise UsageError(f"--out {args.out}: use a .npy or .csv file for the embeddings")
    if args.plot is not None:
        args.plot = _out_path(args.plot, FIGURE_SUFFIXES)
    _check_model_and_data(args, (args.split,))


def cmd_embed(args):
    import numpy as np

    from keras_aevb import _io, plotting, training
    from keras_aevb import data as data_lib

    model = load_model(args.model)
    dataset, data_dir, binarization, seed = args.data_settings
    x, _ = training.load_eval_split(
        dataset, data_dir, args.split, binarization, seed=seed, num_examples=args.max_examples
    )
    _check_event_shape(model, x, dataset)
    z = np.concatenate([np.asarray(model.embed(x[i : i + 1000])) for i in range(0, len(x), 1000)])
    out = Path(args.out)
    if out.suffix.lower() == ".npy":
        _io.atomic_write(out, lambda f: np.save(f, z))
    else:
        header = ",".join(f"z_{j}" for j in range(z.shape[1]))
        _io.atomic_write(out, lambda f: np.savetxt(f, z, delimiter=",", header=header, comments=""))
    print(out)
    if args.plot is not None:
        labels = None
        if dataset == "mnist":
            directory = data_dir or data_lib.default_data_dir("mnist")
            labels = data_lib.load_mnist(directory, args.split)[1][: len(z)]
        if z.shape[1] < 2:
            raise UsageError("--plot needs a latent space of at least 2 dimensions")
        print(plotting.embedding_plot(z, args.plot, labels, title=f"{dataset} {args.split}"))
    return 0


def cmd_plot(args):
    from keras_aevb import plotting

    print(plotting.plot_bound(args.run_dirs, args.out, title=args.title))
    return 0


def cmd_export(args):
    """Exports RUN_DIR/model.keras as a new version under the model's base directory.

    The path is the base directory, as for `keras_aevb.export_saved_model`: the version
    (`--version`, default the next free one) goes under it.
    """
    from keras_aevb.export import check_base_dir, export_saved_model

    check_base_dir(args.path, args.version, args.force)  # before the model is loaded
    model = load_model(args.model)
    print(export_saved_model(model, args.path, args.version, force=args.force))
    return 0


# ------------------------------------------------------------------------------ parser


def _add_data_flags(parser, dataset_required=False):
    parser.add_argument(
        "--dataset",
        required=dataset_required,
        help="mnist or frey_face (default: the run's, from config.json next to the model)",
    )
    parser.add_argument(
        "--data-dir",
        help="directory with the data files (default: $KERAS_AEVB_DATA_DIR, ./data/<dataset>, "
        "or shared/data/<dataset> above the working directory)",
    )
    parser.add_argument(
        "--binarization",
        choices=BINARIZATIONS,
        help="default: the run's, else dynamic (MNIST) / none (Frey Face); 'dynamic' is "
        "evaluated on one fixed Bernoulli draw seeded by --seed",
    )
    parser.add_argument("--split", default="test", help="train or test (default test)")
    parser.add_argument("--seed", type=int, help="seed (default: the run's, else 0)")


def _add_picture_flags(parser, what):
    parser.add_argument(
        "--scale",
        type=_capped_int(MAX_SCALE),
        default=1,
        help=f"pixel upscaling, 1 to {MAX_SCALE} (default 1)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help=f"the picture to write ({', '.join(IMAGE_SUFFIXES)}: the suffix names "
        f"the format); {what} at most {MAX_PICTURE_SIDE} x {MAX_PICTURE_SIDE} pixels after "
        "--scale",
    )


def build_parser():
    """The argparse parser of `keras-aevb` (one subparser per command)."""
    parser = _Parser(
        prog=PROG,
        description="Auto-Encoding Variational Bayes (Kingma & Welling, arXiv:1312.6114) on "
        "Keras 3: train, evaluate and draw the paper's models.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the traceback of errors (exit status still 2) and TensorFlow's start-up logs",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_command(commands)
    _add_evaluate_command(commands)
    _add_sample_command(commands)
    _add_reconstruct_command(commands)
    _add_manifold_command(commands)
    _add_reproduce_command(commands)
    _add_latent_tools_commands(commands)
    _add_plot_command(commands)
    _add_export_command(commands)
    return parser


def _add_train_command(commands):
    """`train`: every flag a `TrainConfig` field, plus --preset."""
    p = commands.add_parser(
        "train",
        help="train a model into a run directory (resumes if it holds a checkpoint)",
        description="Trains with the paper's protocol by default (section 5): Adagrad with "
        "its step size chosen from {0.01, 0.02, 0.1} by the bound after the first steps, "
        "M=100, L=1, weight decay 1/N (the N(0, I) weight prior). Writes model.keras, "
        "config.json, history.csv, checkpoints/ and logs/ (TensorBoard) into --output; "
        "rerunning the same command on that directory resumes after the last finished epoch. "
        "Every flag is a field of keras_aevb.config.TrainConfig.",
    )
    p.add_argument(
        "--preset",
        choices=tuple(config_lib.PRESETS),
        help="a named set of defaults that the other flags override: paper (Kingma & Welling, "
        "section 5: the defaults below) or iwae (Burda et al.'s protocol: 784-200-200-50, "
        "batch 20, k = 5, iwae_adam, 3,280 passes; pass --epochs for a shortened schedule) "
        "(default: none, the defaults below)",
    )
    _add_config_flags(p)
    p.set_defaults(func=cmd_train, check=check_train)


def _add_evaluate_command(commands):
    """`evaluate`: the bound and the log-likelihood estimate, one JSON line."""
    p = commands.add_parser(
        "evaluate",
        help="print the bound and log-likelihood of a model on a data split as one JSON line",
    )
    p.add_argument("model", help="RUN_DIR/model.keras")
    _add_data_flags(p)
    p.add_argument(
        "--num-samples",
        type=_nonnegative_int,
        default=0,
        help="K for the log-likelihood estimate; 0 (default): the bound only",
    )
    p.add_argument("--method", choices=("importance", "hmc"), default="importance")
    p.add_argument("--max-examples", type=_positive_int, help="use the first N examples")
    p.add_argument("--batch-size", type=_positive_int, default=100)
    p.set_defaults(func=cmd_evaluate, check=check_evaluate)


def _add_sample_command(commands):
    """`sample`: a grid of samples (Fig. 5)."""
    p = commands.add_parser("sample", help="draw samples from the model (paper Fig. 5)")
    p.add_argument("model", help="RUN_DIR/model.keras")
    p.add_argument(
        "--num",
        type=_capped_int(MAX_SAMPLES),
        default=100,
        help=f"number of samples, 1 to {MAX_SAMPLES} (default 100)",
    )
    p.add_argument("--rows", type=_positive_int, help="grid rows (default: near square)")
    p.add_argument("--seed", type=int, default=0)
    _add_picture_flags(p, "a grid of")
    p.set_defaults(func=cmd_sample, check=check_sample)


def _add_reconstruct_command(commands):
    """`reconstruct`: data beside their reconstructions."""
    p = commands.add_parser("reconstruct", help="draw data and their reconstructions")
    p.add_argument("model", help="RUN_DIR/model.keras")
    _add_data_flags(p)
    p.add_argument(
        "--num",
        type=_capped_int(MAX_SAMPLES),
        default=20,
        help=f"number of examples, 1 to {MAX_SAMPLES} (default 20)",
    )
    p.add_argument("--cols", type=_positive_int, default=10, help="examples per row")
    _add_picture_flags(p, "a grid of")
    p.set_defaults(func=cmd_reconstruct, check=check_reconstruct)


def _add_manifold_command(commands):
    """`manifold`: the learned 2-D manifold (Fig. 4)."""
    p = commands.add_parser(
        "manifold", help="draw the learned 2-D manifold (paper Fig. 4); needs latent_dim 2"
    )
    p.add_argument("model", help="RUN_DIR/model.keras")
    p.add_argument(
        "--grid",
        type=_capped_int(MAX_GRID),
        default=20,
        help=f"points per axis, 1 to {MAX_GRID} (default 20)",
    )
    _add_picture_flags(p, "a manifold of")
    p.set_defaults(func=cmd_manifold, check=check_manifold)


def _add_reproduce_command(commands):
    """`reproduce`: every run of one of the paper's figures, then the figure."""
    p = commands.add_parser(
        "reproduce",
        help="train (or resume) every run of one of the paper's figures, then draw it",
        description="Trains or resumes, through `train`, every run FIGURE needs (fig2: the "
        "bound of AEVB and wake-sleep for each N_z; fig3: the marginal likelihood of AEVB, "
        "wake-sleep and Monte Carlo EM; fig4: the 2-D manifolds; fig5: samples), then writes "
        "the figure and its CSVs under OUT/FIGURE/. Rerunning is cheap (finished runs are only "
        "read); a larger --budget extends the runs. Keep --runs-dir outside a git checkout.",
    )
    p.add_argument("figure", choices=FIGURES)
    p.add_argument(
        "--latent-dim",
        type=_positive_int,
        action="append",
        help="train only the runs with this N_z (repeat for more; default all): a figure in stages",
    )
    p.add_argument(
        "--method",
        action="append",
        help="train only the runs of this method: aevb, wake_sleep or mcem (fig3) (repeat for "
        "more; default all)",
    )
    p.add_argument("--dataset", choices=DATASETS, help="one data set (default: all the figure's)")
    p.add_argument(
        "--budget",
        type=_example_count,
        default=10**7,
        help="training examples per run, e.g. 1e7 (default), rounded up to whole epochs",
    )
    p.add_argument(
        "--mcem-budget",
        type=_example_count,
        help="fig3: training examples for Monte Carlo EM (default: --budget)",
    )
    p.add_argument(
        "--runs-dir", default="runs", help="where the run directories live (default runs)"
    )
    p.add_argument("--out", default="results", help="results directory (default results)")
    p.add_argument(
        "--pretrained-dir",
        help="also save the runs shipped as pretrained models there (weights only), e.g. "
        "saved_models/pretrained",
    )
    p.add_argument("--data-dir", help="directory with the data files (see `train -h`)")
    p.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), default=2, help="fit's verbosity (default 2)"
    )
    p.set_defaults(func=cmd_reproduce, check=check_reproduce)


def _add_latent_tools_commands(commands):
    """`interpolate`, `traverse`, `embed`: the latent tools."""
    p = commands.add_parser(
        "interpolate", help="decode the latent path between pairs of examples (labelled grid)"
    )
    p.add_argument("model", help="RUN_DIR/model.keras")
    _add_data_flags(p)
    p.add_argument(
        "--pairs",
        type=_pair,
        nargs="+",
        default=[(0, 1)],
        metavar="I:J",
        help="pairs of example indices of the split, one row each (default 0:1)",
    )
    p.add_argument(
        "--steps", type=_capped_int(100), default=10, help="points per path (default 10)"
    )
    p.add_argument("--linear", action="store_true", help="straight lines (default: spherical)")
    p.add_argument("--out", required=True, help="the picture (.png, .pdf, .svg, ...)")
    p.set_defaults(func=cmd_interpolate, check=check_reconstruct_like)

    p = commands.add_parser(
        "traverse", help="vary one latent dimension at a time around an example (labelled grid)"
    )
    p.add_argument("model", help="RUN_DIR/model.keras")
    _add_data_flags(p)
    p.add_argument("--index", type=_nonnegative_int, default=0, help="example index (default 0)")
    p.add_argument(
        "--dims", type=_int_list, help="latent dimensions, e.g. 0,1,2 (default: the first 10)"
    )
    p.add_argument(
        "--values",
        type=_float_list,
        default=[-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0],
        help="values of the dimension, e.g. --values=-3,-1.5,0,1.5,3 (write '=' before a "
        "list that starts with a minus sign; default -3..3 in steps of 1)",
    )
    p.add_argument("--out", required=True, help="the picture (.png, .pdf, .svg, ...)")
    p.set_defaults(func=cmd_traverse, check=check_reconstruct_like)

    p = commands.add_parser(
        "embed", help="write the posterior means E[z|x] of a split (and optionally plot them)"
    )
    p.add_argument("model", help="RUN_DIR/model.keras")
    _add_data_flags(p)
    p.add_argument("--max-examples", type=_positive_int, help="use the first N examples")
    p.add_argument("--out", required=True, help="the embeddings: FILE.npy or FILE.csv")
    p.add_argument("--plot", help="also draw z_1 against z_2, coloured by MNIST label (.png, ...)")
    p.set_defaults(func=cmd_embed, check=check_embed)


def _add_plot_command(commands):
    """`plot`: the bound against examples seen (Fig. 2)."""
    p = commands.add_parser(
        "plot", help="draw the bound against examples seen, train and test (paper Fig. 2)"
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--title")
    p.add_argument(
        "--out",
        required=True,
        help=f"the figure to write ({', '.join(FIGURE_SUFFIXES)}: the suffix names the format)",
    )
    p.set_defaults(func=cmd_plot, check=check_plot, tensorflow=False)


def _add_export_command(commands):
    """`export`: a TF Serving SavedModel version."""
    p = commands.add_parser(
        "export",
        help="export a TF Serving SavedModel as a new version under saved_models/NAME",
        description="Writes the model as a SavedModel to BASE_DIR/VERSION, TF Serving's "
        "layout; prints that path. BASE_DIR is the model's base directory (TF Serving's "
        "--model_base_path), not a version directory: the same path that "
        "keras_aevb.export_saved_model takes. The version appears whole or not at all (written "
        "beside it and renamed), and an existing version is never overwritten.",
    )
    p.add_argument("model", help="RUN_DIR/model.keras")
    p.add_argument(
        "path",
        metavar="BASE_DIR",
        help="the model's base directory, e.g. saved_models/mnist_vae; the version directory "
        "goes under it",
    )
    p.add_argument(
        "--version", type=_positive_int, help="version number (default: the next free one)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="export even into a BASE_DIR that looks like a version directory (an all-digit "
        "name, or one holding saved_model.pb) or whose newest version has other signatures",
    )
    p.set_defaults(func=cmd_export)


def _one_line(error):
    text = " ".join(str(error).split())
    if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text or type(error).__name__


def _parse(parser, argv):
    """Parses argv; an argument error raises UsageError (one line, with the command's hint)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise UsageError(
            f"unrecognized arguments: {' '.join(extra)}; see {PROG} {args.command} --help"
        )
    return args


# What a user can get wrong (exit 2, one line): DataError and UsageError are ValueErrors.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def main(argv=None) -> int:
    """Runs `keras-aevb` with `argv` (default: sys.argv[1:]); returns the exit status.

    0 on success; 2 on bad input (usage errors, missing or corrupt data, settings or models
    that cannot do what was asked), with one line on stderr and no traceback (`--traceback`
    prints it first); 130 on Ctrl-C, with one line.
    """
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except SystemExit as e:  # --help or --version (0)
        return int(e.code or 0)
    except UsageError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    show_logs = args.traceback or getattr(args, "verbose", 1) >= 2
    try:
        if getattr(args, "check", None) is not None:
            args.check(args)  # before TensorFlow: a bad argument or path answers at once
        if getattr(args, "tensorflow", True):
            _start_tensorflow(show_logs)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.traceback:
            traceback.print_exc()
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except RunWriteError as e:  # a full disk: not bad input; the run resumes once fixed
        if args.traceback:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        if args.traceback:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
