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
it). `python -m keras_aevb` runs the same program.

Reference: Kingma & Welling, "Auto-Encoding Variational Bayes", arXiv:1312.6114.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from pathlib import Path

import numpy as np

from keras_aevb import data as data_lib
from keras_aevb import plotting, training

PROG = "keras-aevb"


# ------------------------------------------------------------------------------ helpers


class UsageError(ValueError):
    """A user-input problem found by the CLI itself (exit status 2)."""


def _learning_rate(text):
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'auto' or a positive number, got {text!r}"
        ) from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text!r}")
    return value


def _hidden_units(text):
    try:
        units = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a size or comma-separated sizes (e.g. 500 or 500,500), got {text!r}"
        ) from None
    if not units or min(units) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return units


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _nonnegative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _out_path(path):
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"output directory {path.parent} does not exist; create it or pass another --out"
        )
    return path


def load_model(path):
    """Loads a `.keras` file written by `keras-aevb train` (or `model.save`), uncompiled."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"model file not found: {path}; pass the model.keras that `keras-aevb train` wrote"
        )
    if path.suffix != ".keras":
        raise UsageError(f"{path} is not a .keras file; pass RUN_DIR/model.keras")
    try:  # registers the baselines' classes, if that module is installed
        import keras_aevb.baselines  # noqa: F401
    except ImportError:
        pass
    try:
        return keras.saving.load_model(path, compile=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise UsageError(
            f"cannot load {path} as a keras_aevb model ({type(e).__name__}: {reason}); "
            "pass a model.keras written by `keras-aevb train`"
        ) from None


def _run_config(model_path):
    """The config.json next to a model file, or {} (then the flags must say everything)."""
    path = Path(model_path).parent / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def _data_settings(args, run_config, model):
    """Dataset, data dir, binarization and seed: the flags, else the run's config.json."""
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
    return dataset, data_dir, binarization, seed


def _check_event_shape(model, x, dataset):
    if tuple(x.shape[1:]) != tuple(model.event_shape):
        raise UsageError(
            f"the model takes images of shape {list(model.event_shape)}, but {dataset} has "
            f"{list(x.shape[1:])}; pass the --dataset the model was trained on"
        )


# ------------------------------------------------------------------------------ commands


def cmd_train(args):
    config = training.TrainConfig(
        dataset=args.dataset,
        output=args.output,
        data_dir=args.data_dir,
        latent_dim=args.latent_dim,
        hidden_units=args.hidden_units,
        decoder=args.decoder,
        posterior=args.posterior,
        prior=args.prior,
        estimator=args.estimator,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        epochs=args.epochs,
        max_examples=args.max_examples,
        examples_per_epoch=args.examples_per_epoch,
        train_examples=args.train_examples,
        test_examples=args.test_examples,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        lr_search_steps=args.lr_search_steps,
        weight_decay=args.weight_decay,
        binarization=args.binarization,
        seed=args.seed,
        method=args.method,
        strategy=args.strategy,
        verbose=args.verbose,
        tensorboard=not args.no_tensorboard,
    )
    training.train(config)
    return 0


def _elbo(model, x, batch_size, seed):
    """Mean SGVB bound over x with the model's L, in nats per datapoint."""
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
    which fixed draw), `split`, `dataset`, and with K > 0 `method` and `num_samples`.
    """
    model = load_model(args.model)
    run_config = _run_config(args.model)
    dataset, data_dir, binarization, seed = _data_settings(args, run_config, model)
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
        try:
            from keras_aevb import marginal_likelihood
        except ImportError as e:
            raise UsageError(
                f"--num-samples needs keras_aevb.marginal_likelihood, which is not available "
                f"({e}); pass --num-samples 0 for the bound alone"
            ) from None
        if args.method == "importance":
            values = marginal_likelihood.log_likelihood(
                model, x, num_samples=args.num_samples, batch_size=args.batch_size, seed=seed
            )
        else:
            function = marginal_likelihood.hmc_log_likelihood
            kwargs = {"seed": seed}
            if "num_samples" in inspect.signature(function).parameters:
                kwargs["num_samples"] = args.num_samples
            values = function(model, x, **kwargs)
        result["log_likelihood"] = float(np.mean(np.asarray(values, dtype=np.float64)))
        result["method"] = args.method
        result["num_samples"] = args.num_samples
    print(json.dumps(result))
    return 0


def cmd_sample(args):
    out = _out_path(args.out)
    model = load_model(args.model)
    grid = plotting.sample_grid(model, args.num, seed=args.seed, rows=args.rows)
    print(plotting.save_png(out, grid, scale=args.scale))
    return 0


def cmd_reconstruct(args):
    out = _out_path(args.out)
    model = load_model(args.model)
    run_config = _run_config(args.model)
    dataset, data_dir, binarization, seed = _data_settings(args, run_config, model)
    x, _ = training.load_eval_split(
        dataset, data_dir, args.split, binarization, seed=seed, num_examples=args.num
    )
    _check_event_shape(model, x, dataset)
    grid = plotting.reconstruction_grid(model, x, cols=args.cols)
    print(plotting.save_png(out, grid, scale=args.scale))
    return 0


def cmd_manifold(args):
    out = _out_path(args.out)
    model = load_model(args.model)
    if int(model.latent_dim) != 2:
        raise UsageError(
            f"manifold needs a model with a 2-D latent space, but {args.model} has "
            f"latent_dim={model.latent_dim}; train one with --latent-dim 2"
        )
    print(plotting.save_png(out, plotting.manifold(model, args.grid), scale=args.scale))
    return 0


def cmd_plot(args):
    out = _out_path(args.out)
    print(plotting.plot_bound(args.run_dirs, out, title=args.title))
    return 0


def _next_version(base):
    try:
        from keras_aevb.export import next_version
    except ImportError:
        versions = [int(p.name) for p in base.glob("*") if p.is_dir() and p.name.isdigit()]
        return max(versions, default=0) + 1
    return next_version(base)


def cmd_export(args):
    model = load_model(args.model)
    try:
        from keras_aevb.export import export_saved_model
    except ImportError as e:
        raise UsageError(f"export needs keras_aevb.export, which is not available ({e})") from None
    base = Path(args.path)
    if base.exists() and not base.is_dir():
        raise UsageError(f"{base} is a file; pass a directory such as saved_models/NAME")
    version = args.version if args.version is not None else _next_version(base)
    target = base / str(version)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(
            f"{target} exists and is not empty; exported versions are never overwritten: "
            f"pass --version {_next_version(base)} or leave --version out"
        )
    print(export_saved_model(model, target))
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
        choices=data_lib.BINARIZATIONS,
        help="default: the run's, else dynamic (MNIST) / none (Frey Face); 'dynamic' is "
        "evaluated on one fixed Bernoulli draw seeded by --seed",
    )
    parser.add_argument("--split", default="test", help="train or test (default test)")
    parser.add_argument("--seed", type=int, help="seed (default: the run's, else 0)")


def build_parser():
    """The argparse parser of `keras-aevb` (one subparser per command)."""
    from keras_aevb.families import FAMILIES
    from keras_aevb.prior import PRIORS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Auto-Encoding Variational Bayes (Kingma & Welling, arXiv:1312.6114) on "
        "Keras 3: train, evaluate and draw the paper's models.",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the traceback of errors (for debugging)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---- train
    p = commands.add_parser(
        "train",
        help="train a model into a run directory (resumes if it holds a checkpoint)",
        description="Trains with the paper's protocol by default (section 5): Adagrad with "
        "its step size chosen from {0.01, 0.02, 0.1} by the bound after the first steps, "
        "M=100, L=1, weight decay 1/N (the N(0, I) weight prior). Writes model.keras, "
        "config.json, history.csv, checkpoints/ and logs/ (TensorBoard) into --output; "
        "rerunning the same command on that directory resumes after the last finished epoch.",
    )
    p.add_argument("--dataset", required=True, choices=data_lib.DATASETS)
    p.add_argument("--data-dir", help="directory with the data files (see `evaluate -h`)")
    p.add_argument("--output", required=True, metavar="RUN_DIR", help="the run directory")
    p.add_argument("--latent-dim", type=_positive_int, default=20, help="N_z (default 20)")
    p.add_argument(
        "--hidden-units",
        type=_hidden_units,
        help="hidden layer size(s), e.g. 500 or 500,500 (default: 500 MNIST, 200 Frey Face)",
    )
    p.add_argument(
        "--decoder",
        choices=training.DECODERS,
        default="auto",
        help="auto: Bernoulli for MNIST, Gaussian for Frey Face",
    )
    p.add_argument("--posterior", choices=list(FAMILIES), default="normal")
    p.add_argument("--prior", choices=list(PRIORS), default="standard_normal")
    p.add_argument(
        "--estimator",
        choices=("auto", "analytic_kl", "monte_carlo"),
        default="auto",
        help="SGVB estimator B (analytic_kl, eq. 7) or A (monte_carlo, eq. 6); auto: B where "
        "the KL has a closed form (the paper's choice)",
    )
    p.add_argument("--num-samples", type=_positive_int, default=1, help="L (default 1)")
    p.add_argument("--batch-size", type=_positive_int, default=100, help="M (default 100)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_int, help="passes over the data (default 10)")
    length.add_argument(
        "--max-examples",
        type=_positive_int,
        help="stop after this many training examples (the x axis of the paper's Fig. 2)",
    )
    p.add_argument(
        "--examples-per-epoch",
        type=_positive_int,
        help="examples between test evaluations (default: one pass over the training set)",
    )
    p.add_argument(
        "--train-examples", type=_positive_int, help="use only the first N training examples"
    )
    p.add_argument("--test-examples", type=_positive_int, help="use only the first N test examples")
    p.add_argument("--optimizer", choices=training.OPTIMIZERS, default="adagrad")
    p.add_argument(
        "--learning-rate",
        type=_learning_rate,
        default="auto",
        help="a number, or auto (default): the best bound after --lr-search-steps steps among "
        "0.01, 0.02, 0.1 (Adagrad) or 3e-4, 1e-3, 3e-3 (Adam)",
    )
    p.add_argument(
        "--lr-search-steps",
        type=_positive_int,
        default=200,
        help="steps per candidate of --learning-rate auto (default 200)",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        help="precision of the N(0, I) weight prior per datapoint (default 1/N)",
    )
    p.add_argument(
        "--binarization",
        choices=data_lib.BINARIZATIONS,
        help="default: dynamic for MNIST, none for Frey Face",
    )
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--method", choices=training.METHODS, default="aevb")
    p.add_argument("--strategy", choices=training.STRATEGIES, default="default")
    p.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="0 silent, 1 progress bar (default), 2 one line per epoch",
    )
    p.add_argument("--no-tensorboard", action="store_true", help="do not write logs/")
    p.set_defaults(func=cmd_train)

    # ---- evaluate
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
    p.set_defaults(func=cmd_evaluate)

    # ---- sample
    p = commands.add_parser("sample", help="draw samples from the model (paper Fig. 5)")
    p.add_argument("model", help="RUN_DIR/model.keras")
    p.add_argument("--num", type=_positive_int, default=100, help="number of samples")
    p.add_argument("--rows", type=_positive_int, help="grid rows (default: near square)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=_positive_int, default=1, help="pixel upscaling")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.set_defaults(func=cmd_sample)

    # ---- reconstruct
    p = commands.add_parser("reconstruct", help="draw data and their reconstructions")
    p.add_argument("model", help="RUN_DIR/model.keras")
    _add_data_flags(p)
    p.add_argument("--num", type=_positive_int, default=20, help="number of examples")
    p.add_argument("--cols", type=_positive_int, default=10, help="examples per row")
    p.add_argument("--scale", type=_positive_int, default=1, help="pixel upscaling")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.set_defaults(func=cmd_reconstruct)

    # ---- manifold
    p = commands.add_parser(
        "manifold", help="draw the learned 2-D manifold (paper Fig. 4); needs latent_dim 2"
    )
    p.add_argument("model", help="RUN_DIR/model.keras")
    p.add_argument("--grid", type=_positive_int, default=20, help="points per axis")
    p.add_argument("--scale", type=_positive_int, default=1, help="pixel upscaling")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.set_defaults(func=cmd_manifold)

    # ---- plot
    p = commands.add_parser(
        "plot", help="draw the bound against examples seen, train and test (paper Fig. 2)"
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--title")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.set_defaults(func=cmd_plot)

    # ---- export
    p = commands.add_parser("export", help="export a TF Serving SavedModel")
    p.add_argument("model", help="RUN_DIR/model.keras")
    p.add_argument("path", help="saved_models/NAME: the version directory goes under it")
    p.add_argument(
        "--version", type=_positive_int, help="version number (default: the next free one)"
    )
    p.set_defaults(func=cmd_export)
    return parser


def _one_line(error):
    text = " ".join(str(error).split())
    if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text or type(error).__name__


def main(argv=None) -> int:
    """Runs `keras-aevb` with `argv` (default: sys.argv[1:]); returns the exit status.

    0 on success, 2 on bad input (usage errors, missing or corrupt data, settings or models
    that cannot do what was asked), with one line on stderr and no traceback.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message printed)
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        # DataError and UsageError are ValueErrors.
        if args.traceback:
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
