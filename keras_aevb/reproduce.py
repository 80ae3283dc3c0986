"""The paper's figures at the paper's scale, one call each (Kingma & Welling, section 5).

    keras-aevb reproduce fig2 --dataset mnist --budget 1e7 --runs-dir ~/runs/aevb --out docs/results

`reproduce(figure, ...)` trains (or resumes, through `keras_aevb.training.train`) every run the
figure needs, then writes the figure and its CSVs under `out/<figure>/`. It is idempotent and
resumable: a run already at the budget is only read, a run stopped half-way resumes where its
last checkpoint left it, and a larger `budget` extends every run (the runs keep their epoch
length, so a curve trained in stages is the curve trained in one go).

The runs (one directory each under `runs_dir`, named as their CSVs):

- Fig. 2, the bound per datapoint against training examples seen, train and test, AEVB beside
  wake-sleep with the same encoder: MNIST N_z in {3, 5, 10, 20, 200} (500 hidden units,
  Bernoulli decoder, dynamic binarization), Frey Face N_z in {2, 5, 10, 20} (200 hidden units,
  Gaussian decoder). Runs `<dataset>_nz<N>_<method>`.
- Fig. 3, the marginal likelihood against training examples seen: MNIST N_z = 3, 100 hidden
  units, the first N_train in {1000, 50000} training images (one static binarization draw,
  which Monte Carlo EM's per-example chains need and the others share), AEVB, wake-sleep and
  (N_train = 1000 only, as in the paper) Monte Carlo EM. At log-spaced budgets each model is
  scored by importance sampling (`log_likelihood`, K = `FIG3_IS_SAMPLES`) on the first 1000
  training and test points and by the paper's App. D HMC estimator on the first
  `FIG3_HMC_EXAMPLES` test points. Runs `fig3_n<N>_<method>`.
- Fig. 4, the learned 2-D manifolds: AEVB, N_z = 2, MNIST and Frey Face (Fig. 2's protocol).
- Fig. 5, samples from MNIST AEVB models with N_z in {2, 5, 10, 20} (Fig. 2's runs and Fig. 4's).

Every run uses the paper's settings and nothing tuned per method: the model of App. C
(`paper_layers`), minibatch M = 100, Adagrad with its global step size chosen from
{0.01, 0.02, 0.1} by the training bound after the first steps (the paper's rule, the same for
every method), the N(0, I) weight prior (weight decay 1/N), seed 0.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from pathlib import Path

import numpy as np

from keras_aevb._io import atomic_write

__all__ = [
    "FIGURES",
    "RunSpec",
    "budget_stages",
    "chosen_runs",
    "figure_runs",
    "reproduce",
    "run_command",
    "train_config",
]

FIGURES = ("fig2", "fig3", "fig4", "fig5")
METHODS = ("aevb", "wake_sleep")
FIG2_LATENT_DIMS = {"mnist": (3, 5, 10, 20, 200), "frey_face": (2, 5, 10, 20)}
FIG3_TRAIN_SIZES = (1000, 50_000)
FIG3_MCEM_TRAIN_SIZES = (1000,)  # the paper: MCEM "can't be applied efficiently" to all of MNIST
FIG5_LATENT_DIMS = (2, 5, 10, 20)

# Training examples between two history rows (test evaluations, checkpoints). MNIST: one pass.
# Frey Face's pass is 1765 images, so a row per pass would spend more time evaluating and
# checkpointing than training; 50,000 gives 200 rows per 10^7 examples.
EXAMPLES_PER_EPOCH = {"mnist": None, "frey_face": 50_000}
FIG3_EXAMPLES_PER_EPOCH = 100_000  # divides every stage of `budget_stages`
FIG3_EVAL_EXAMPLES = 1000  # the first 1000 training and test points, as in the paper
FIG3_IS_SAMPLES = 1000
FIG3_HMC_EXAMPLES = 100
FIG3_HMC_SAMPLES = 1000
FIG3_HMC_BURNIN = 500

# The milestones of the results tables (examples seen).
MILESTONES = (10**6, 10**7, 10**8)

FIG2_COLUMNS = ("epoch", "examples_seen", "seconds", "train_elbo", "test_elbo")


def fig3_columns():
    """The columns of Fig. 3's CSVs (named by the estimators' settings)."""
    k, n = FIG3_IS_SAMPLES, FIG3_HMC_EXAMPLES
    return (
        "examples_seen",
        "seconds",
        "train_elbo",
        "test_elbo",
        f"train_is_k{k}",
        f"test_is_k{k}",
        f"test_first{n}_hmc",
        f"test_first{n}_is_k{k}",
    )


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run a figure needs: its directory name and what differs from the defaults."""

    name: str
    dataset: str
    latent_dim: int
    method: str = "aevb"
    hidden_units: tuple[int, ...] | None = None
    train_examples: int | None = None
    test_examples: int | None = None
    binarization: str | None = None
    examples_per_epoch: int | None = None


def _paper_run(dataset, latent_dim, method="aevb"):
    return RunSpec(
        name=f"{dataset}_nz{latent_dim}_{method}",
        dataset=dataset,
        latent_dim=latent_dim,
        method=method,
        examples_per_epoch=EXAMPLES_PER_EPOCH[dataset],
    )


def _fig3_run(num_train, method):
    return RunSpec(
        name=f"fig3_n{num_train}_{method}",
        dataset="mnist",
        latent_dim=3,
        method=method,
        hidden_units=(100,),
        train_examples=num_train,
        test_examples=FIG3_EVAL_EXAMPLES,
        binarization="static",
        # Monte Carlo EM trains in whole passes over its array (one chain per example).
        examples_per_epoch=None if method == "mcem" else FIG3_EXAMPLES_PER_EPOCH,
    )


def _datasets(figure, dataset):
    known = {"fig2": ("mnist", "frey_face"), "fig3": ("mnist",), "fig4": ("mnist", "frey_face")}
    known["fig5"] = ("mnist",)
    if dataset is None:
        return known[figure]
    if dataset not in known[figure]:
        raise ValueError(
            f"{figure} has no {dataset} panel; its data sets are {', '.join(known[figure])}"
        )
    return (dataset,)


def figure_runs(figure, dataset=None):
    """The `RunSpec`s that `figure` needs (for one data set, or all of the figure's)."""
    if figure not in FIGURES:
        raise ValueError(f"unknown figure {figure!r}; choose one of {', '.join(FIGURES)}")
    runs = []
    for name in _datasets(figure, dataset):
        if figure == "fig2":
            runs += [_paper_run(name, nz, m) for nz in FIG2_LATENT_DIMS[name] for m in METHODS]
        elif figure == "fig3":
            for n in FIG3_TRAIN_SIZES:
                methods = METHODS + (("mcem",) if n in FIG3_MCEM_TRAIN_SIZES else ())
                runs += [_fig3_run(n, m) for m in methods]
        elif figure == "fig4":
            runs.append(_paper_run(name, 2))
        else:
            runs += [_paper_run(name, nz) for nz in FIG5_LATENT_DIMS]
    return runs


def chosen_runs(figure, dataset=None, latent_dims=None, methods=None):
    """`figure_runs`, only those with N_z in `latent_dims` and method in `methods` (None: all);
    a value the figure does not have is a ValueError naming the ones it has."""
    specs = figure_runs(figure, dataset)
    for field, wanted, name, plural in (
        ("latent_dim", latent_dims and {int(n) for n in latent_dims}, "N_z = {}", "N_z"),
        ("method", methods and set(methods), "{}", "methods"),
    ):
        if not wanted:
            continue
        have = sorted({getattr(s, field) for s in specs})
        unknown = sorted(wanted - set(have))
        if unknown:
            raise ValueError(
                f"{figure} has no {name.format(', '.join(map(str, unknown)))} run; its {plural} "
                f"are {', '.join(map(str, have))}"
            )
        specs = [s for s in specs if getattr(s, field) in wanted]
    return specs


def run_command(spec, budget, pretrained_dir=None):
    """The `keras-aevb reproduce` command that trains exactly the run `spec` to `budget`
    (what a shipped model records: run as written, it retrains that model and no other)."""
    figure = "fig4" if spec.latent_dim == 2 else "fig2"
    parts = ["keras-aevb reproduce", figure, "--dataset", spec.dataset]
    if figure == "fig2":
        parts += ["--latent-dim", str(spec.latent_dim), "--method", spec.method]
    parts += ["--budget", _budget_text(budget)]
    if pretrained_dir is not None:
        parts += ["--pretrained-dir", str(pretrained_dir)]
    return " ".join(parts)


def _budget_text(budget):
    """`budget` as the CLI reads it, exactly: 100000000 -> "1e8", 300000 -> "3e5"."""
    budget = int(budget)
    exponent = 0
    while budget % 10 ** (exponent + 1) == 0:
        exponent += 1
    return f"{budget // 10**exponent}e{exponent}" if exponent >= 2 else str(budget)


def budget_stages(budget):
    """Fig. 3's scoring points: 10^5, 10^6, ... below `budget`, and `budget` itself.

    One per decade of the log axis: each scoring (importance sampling on 2000 points, HMC on
    100) costs about as much as training 10^6 examples of this small model.
    """
    return [*(10**k for k in range(5, 10) if 10**k < budget), int(budget)]


def train_config(spec, runs_dir, budget, data_dir=None, verbose=2):
    """The `TrainConfig` of one run trained to at least `budget` examples.

    The budget is rounded up to whole epochs, so every run reaches it (a run's epoch count is
    `max_examples // examples_per_epoch`).
    """
    from keras_aevb import training

    if spec.examples_per_epoch is not None:
        per_epoch = spec.examples_per_epoch
    elif spec.train_examples is not None:
        per_epoch = spec.train_examples
    else:
        from keras_aevb.paper import PAPER_DATASETS

        per_epoch = PAPER_DATASETS[spec.dataset]["N"]
    if budget < per_epoch and spec.method != "mcem":
        max_examples = int(budget)  # the run's epochs shrink to the budget (`run_dir.plan_epochs`)
    else:  # Monte Carlo EM trains in whole passes over its array: at least one
        max_examples = math.ceil(budget / per_epoch) * per_epoch
    return training.TrainConfig(
        dataset=spec.dataset,
        output=str(Path(runs_dir) / spec.name),
        data_dir=data_dir,
        latent_dim=spec.latent_dim,
        hidden_units=spec.hidden_units,
        max_examples=max_examples,
        examples_per_epoch=spec.examples_per_epoch,
        train_examples=spec.train_examples,
        test_examples=spec.test_examples,
        binarization=spec.binarization,
        method=spec.method,
        verbose=verbose,
        tensorboard=False,
        seed=0,
    )


def reproduce(
    figure,
    dataset=None,
    budget=10**7,
    runs_dir="runs",
    out="docs/results",
    data_dir=None,
    mcem_budget=None,
    pretrained_dir=None,
    latent_dims=None,
    methods=None,
    verbose=2,
    print_fn=print,
):
    """Trains (or resumes) every run of `figure` to `budget` examples and draws the figure.

    Args:
        figure: "fig2", "fig3", "fig4" or "fig5".
        dataset: one of the figure's data sets; None: all of them.
        budget: training examples per run (rounded up to whole epochs); a larger budget than a
            run's extends it.
        runs_dir: where the run directories live (kept between calls: the runs resume there).
        out: the results directory; the figure's files go to `out/<figure>/`.
        data_dir: where the data files are; None: `keras_aevb.data.default_data_dir`.
        mcem_budget: Fig. 3's budget for Monte Carlo EM (its steps cost far more than AEVB's);
            None: `budget`.
        latent_dims: train only the runs with these N_z (a figure in stages); the figure
            still draws every panel whose runs have CSVs under `out`.
        methods: train only the runs of these methods ("aevb", "wake_sleep", "mcem").
        pretrained_dir: if given, the runs that ship as pretrained models
            (`keras_aevb.pretrained_models.SHIPPED_RUNS`) are saved there (weights only).
        verbose: Keras's fit verbosity for the runs.
        print_fn: where progress lines go.

    Returns:
        The paths written, in order.
    """
    if figure not in FIGURES:
        raise ValueError(f"unknown figure {figure!r}; choose one of {', '.join(FIGURES)}")
    budget = _check_budget(budget, "budget")
    mcem_budget = budget if mcem_budget is None else _check_budget(mcem_budget, "mcem_budget")
    out_dir = Path(out) / figure
    chosen = chosen_runs(figure, dataset, latent_dims, methods)
    if figure == "fig3":
        written = []
        for spec in chosen:
            run_budget = mcem_budget if spec.method == "mcem" else budget
            written += _fig3_run_and_score(
                spec, runs_dir, run_budget, data_dir, out_dir, verbose, print_fn
            )
        written.append(_plot_fig3(figure_runs(figure, dataset), out_dir))
    else:
        written, models = [], {}
        for spec in chosen:
            result = _train(spec, runs_dir, budget, data_dir, verbose, print_fn)
            models[spec.name] = result.model
            written.append(_copy_history(Path(result.run_dir), out_dir / f"{spec.name}.csv"))
            if pretrained_dir is not None:
                written += _ship(spec, result, pretrained_dir, data_dir, budget)
        written += _draw(figure, dataset, chosen, models, out_dir)
    for path in written:
        print_fn(f"keras-aevb: wrote {path}")
    return [str(p) for p in written]


def _draw(figure, dataset, chosen, models, out_dir):
    """Fig. 2's panels and summaries (from every run's CSV under `out_dir`), or Fig. 4's
    manifolds and Fig. 5's samples of the trained `models` (by run name); the paths."""
    from keras_aevb import plotting

    if figure == "fig2":
        specs = figure_runs(figure, dataset)
        written = []
        for name in _datasets(figure, dataset):
            panel_specs = [s for s in specs if s.dataset == name]
            written.append(_plot_fig2(panel_specs, out_dir, name))
            written.append(_write_fig2_summary(panel_specs, out_dir, name))
        return written
    written = []
    for spec in chosen:
        model = models[spec.name]
        if figure == "fig4":
            grid, stem = plotting.manifold(model, grid=20), spec.dataset
        else:
            grid = plotting.sample_grid(model, 100, seed=0, rows=10)
            stem = f"{spec.dataset}_nz{spec.latent_dim}"
        written.append(plotting.save_image(out_dir / f"{stem}.png", grid, scale=2))
    return written


def _ship(spec, result, directory, data_dir, budget):
    from keras_aevb.pretrained_models import SHIPPED_RUNS, save_pretrained

    if spec.name not in SHIPPED_RUNS:
        return []
    command = run_command(spec, budget, directory)
    return save_pretrained(result.run_dir, SHIPPED_RUNS[spec.name], directory, data_dir, command)


def _check_budget(value, name):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a number of examples such as 1e7, got {value!r}"
        ) from None
    if not math.isfinite(number) or number < 1 or number != int(number):
        raise ValueError(f"{name} must be a positive whole number of examples, got {value!r}")
    return int(number)


def _train(spec, runs_dir, budget, data_dir, verbose, print_fn):
    from keras_aevb import training

    config = train_config(spec, runs_dir, budget, data_dir, verbose)
    print_fn(f"keras-aevb: {spec.name}: training to {config.max_examples:,} examples")
    return training.train(config, print_fn=print_fn)


def _copy_history(run_dir, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = (run_dir / "history.csv").read_bytes()
    atomic_write(path, lambda f: f.write(payload))
    return path


def _read_rows(path):
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _figure_rows(out_dir, spec):
    """The rows of a run's CSV under the figure's directory; [] if it has none yet."""
    path = out_dir / f"{spec.name}.csv"
    return _read_rows(path) if path.is_file() else []


def _write_csv(path, columns, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    payload = text.getvalue().encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(payload))
    return path


# ------------------------------------------------------------------------------ Fig. 2


def value_at(rows, examples, column):
    """`column` of the first row with at least `examples` examples seen (the bound "after
    10^6 samples": with whole epochs, up to one epoch later); None if the run stopped before."""
    after = [r for r in rows if r["examples_seen"] >= examples]
    return after[0][column] if after else None


def _write_fig2_summary(specs, out_dir, dataset):
    """`<dataset>_summary.csv`: per N_z and method, the bounds at 10^6, 10^7, 10^8 examples."""
    columns = ["latent_dim", "method", "examples_seen", "seconds", "train_elbo", "test_elbo"]
    columns += [f"test_elbo_at_{m:.0e}".replace("+0", "") for m in MILESTONES]
    rows = []
    for spec in specs:
        history = _figure_rows(out_dir, spec)
        if not history:
            continue
        last = history[-1]
        row = {"latent_dim": spec.latent_dim, "method": spec.method}
        row.update({k: last[k] for k in ("examples_seen", "seconds", "train_elbo", "test_elbo")})
        row["examples_seen"] = int(row["examples_seen"])
        for m, column in zip(MILESTONES, columns[6:], strict=True):
            value = value_at(history, m, "test_elbo")
            row[column] = "" if value is None else f"{value:.2f}"
        rows.append(row)
    return _write_csv(out_dir / f"{dataset}_summary.csv", columns, rows)


_LABELS = {"aevb": "AEVB", "wake_sleep": "Wake-Sleep", "mcem": "MCEM"}
_COLORS = {"aevb": "tab:red", "wake_sleep": "tab:green", "mcem": "tab:blue"}


def _plot_fig2(specs, out_dir, dataset):
    """One panel per N_z, as in the paper: AEVB and wake-sleep, train (dashed) and test."""
    from matplotlib import ticker

    from keras_aevb.plotting import examples_label, new_figure

    latent_dims = sorted({s.latent_dim for s in specs})
    fig = new_figure(figsize=(3.2 * len(latent_dims), 3.4), dpi=100)
    axes = fig.subplots(1, len(latent_dims), squeeze=False, sharex=True)[0]
    for ax, nz in zip(axes, latent_dims, strict=True):
        for spec in (s for s in specs if s.latent_dim == nz):
            rows = _figure_rows(out_dir, spec)
            if not rows:
                continue
            x = [r["examples_seen"] for r in rows]
            color, label = _COLORS[spec.method], _LABELS[spec.method]
            ax.plot(x, [r["train_elbo"] for r in rows], "--", color=color, label=f"{label} train")
            ax.plot(x, [r["test_elbo"] for r in rows], "-", color=color, label=f"{label} test")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(examples_label))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        if not ax.lines:
            ax.text(0.5, 0.5, "not run yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{'MNIST' if dataset == 'mnist' else 'Frey Face'}, $N_z$ = {nz}")
        ax.set_xlabel("# training samples evaluated")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("lower bound L per datapoint (nats)")
    drawn = [ax for ax in axes if ax.lines]
    if drawn:
        drawn[0].legend(fontsize="small")
    fig.tight_layout()
    path = out_dir / f"{dataset}.png"
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


# ------------------------------------------------------------------------------ Fig. 3


def _fig3_run_and_score(spec, runs_dir, budget, data_dir, out_dir, verbose, print_fn):
    """Trains `spec` through Fig. 3's stages, scoring the model at each (skipping scored ones).

    The scores live in the run directory (`fig3_scores.csv`, written after each stage), so a
    stopped reproduction resumes at the first stage not yet scored.
    """
    scores_path = Path(runs_dir) / spec.name / "fig3_scores.csv"
    rows = _read_rows(scores_path) if scores_path.is_file() else []
    for stage in budget_stages(budget):
        target = train_config(spec, runs_dir, stage, data_dir).max_examples
        if any(int(r["examples_seen"]) == target for r in rows):
            continue
        result = _train(spec, runs_dir, stage, data_dir, verbose, print_fn)
        rows.append(_fig3_scores(result, data_dir, print_fn))
        _write_csv(scores_path, fig3_columns(), rows)
    return [_write_csv(out_dir / f"{spec.name}.csv", fig3_columns(), rows)]


def _fig3_scores(result, data_dir, print_fn):
    """Importance-sampled and HMC (App. D) log p(x) of the model a run has reached."""
    from keras_aevb import data as data_lib
    from keras_aevb.marginal_likelihood import hmc_log_likelihood, log_likelihood

    config = result.config
    train_x, _ = data_lib.load_dataset("mnist", data_dir, "train", "static", seed=config["seed"])
    test_x, _ = data_lib.load_dataset("mnist", data_dir, "test", "static", seed=config["seed"])
    train_x = np.asarray(train_x[:FIG3_EVAL_EXAMPLES], np.float32)
    test_x = np.asarray(test_x[:FIG3_EVAL_EXAMPLES], np.float32)
    model, last = result.model, result.history[-1]
    start = time.perf_counter()
    k = FIG3_IS_SAMPLES
    row = {
        "examples_seen": int(last["examples_seen"]),
        "seconds": last["seconds"],
        "train_elbo": last["train_elbo"],
        "test_elbo": last["test_elbo"],
        f"train_is_k{k}": float(np.mean(log_likelihood(model, train_x, k, seed=1))),
        f"test_is_k{k}": float(np.mean(log_likelihood(model, test_x, k, seed=1))),
    }
    subset = test_x[:FIG3_HMC_EXAMPLES]
    row[f"test_first{len(subset)}_hmc"] = float(
        np.mean(
            hmc_log_likelihood(
                model,
                subset,
                num_samples=FIG3_HMC_SAMPLES,
                num_burnin_steps=FIG3_HMC_BURNIN,
                seed=2,
            )
        )
    )
    row[f"test_first{len(subset)}_is_k{k}"] = float(
        np.mean(log_likelihood(model, subset, k, seed=1))
    )
    print_fn(
        f"keras-aevb: {Path(result.run_dir).name} at {row['examples_seen']:,} examples: "
        + json.dumps({c: round(row[c], 2) for c in fig3_columns()[4:]})
        + f" ({time.perf_counter() - start:.0f} s)"
    )
    return row


def _plot_fig3(specs, out_dir):
    """Fig. 3: log p(x) on train and test against examples seen, one pair of panels per N."""
    from matplotlib import ticker

    from keras_aevb.plotting import examples_label, new_figure

    sizes = sorted({s.train_examples for s in specs})
    fig = new_figure(figsize=(6.4 * len(sizes), 3.6), dpi=100)
    axes = fig.subplots(1, 2 * len(sizes), squeeze=False)[0]
    k = FIG3_IS_SAMPLES
    for i, n in enumerate(sizes):
        for j, split in enumerate(("train", "test")):
            ax = axes[2 * i + j]
            for spec in (s for s in specs if s.train_examples == n):
                rows = _figure_rows(out_dir, spec)
                if not rows:
                    continue
                x = [r["examples_seen"] for r in rows]
                ax.plot(
                    x,
                    [r[f"{split}_is_k{k}"] for r in rows],
                    "o-",
                    color=_COLORS[spec.method],
                    label=_LABELS[spec.method],
                )
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(examples_label))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_title(f"$N_{{train}}$ = {n:,}, {split} (first {FIG3_EVAL_EXAMPLES})")
            ax.set_xlabel("# training samples evaluated")
            ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"marginal log-likelihood (IS, K={k}), nats")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    path = out_dir / "mnist.png"
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path
