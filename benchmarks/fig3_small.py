"""A small-budget reproduction of the paper's Fig. 3, and the IS log-likelihood of its MNIST model.

Fig. 3 of Kingma & Welling compares AEVB with wake-sleep and Monte Carlo EM by the marginal
likelihood of a model with Nz = 3 latent variables and 100 hidden units, trained on N = 1000
MNIST examples, estimated on the first 1000 training and test points. Here all three train the
same encoder/decoder (`keras_aevb.AEVB`, `WakeSleep`, `MonteCarloEM`) with the paper's
initialisation (N(0, 0.01)), Adagrad (accumulator 0), minibatch M = 100 and weight decay 1/N, on
the same statically binarized data (MCEM needs a fixed training array), for a budget of epochs
far below the paper's (its x-axis runs to 1e8 training samples evaluated).

The curve is `keras_aevb.log_likelihood` (importance sampling with each model's recognition
model) at log-spaced checkpoints; at the end, a larger K, and the paper's App. D HMC estimator
(`keras_aevb.hmc_log_likelihood`, no recognition model needed) on a subset as a cross-check.

    python benchmarks/fig3_small.py fig3 --epochs 200 --out docs/figures/fig3_small.png \
        --json fig3_small.json
    python benchmarks/fig3_small.py mnist20 --epochs 10 --final-k 5000 --json mnist20.json
    python benchmarks/fig3_small.py fig3 --replot fig3_small.json --out fig3_small.png

Prints one JSON line per measurement; nothing here is imported by the package.
"""

import argparse
import json
import time

import numpy as np

import keras_aevb
from keras_aevb import data
from keras_aevb.baselines import MonteCarloEM, WakeSleep
from keras_aevb.marginal_likelihood import hmc_log_likelihood, log_likelihood

METHODS = {"aevb": keras_aevb.AEVB, "wake_sleep": WakeSleep, "mcem": MonteCarloEM}
LABELS = {"aevb": "AEVB", "wake_sleep": "Wake-sleep", "mcem": "MCEM"}


def log(record):
    print(json.dumps(record), flush=True)


def fig3_data(data_dir, num_train=1000, num_eval=1000, seed=0):
    """The first N training images (trained on and evaluated) and the first test images,
    statically binarized (one Bernoulli draw per pixel, `seed`)."""
    train, _ = data.load_mnist(data_dir, "train")
    test, _ = data.load_mnist(data_dir, "test")
    x_train = data.binarize(train[:num_train], "static", seed=seed)
    x_test = data.binarize(test[:num_eval], "static", seed=seed + 1)
    return x_train, x_test


def build(method, latent_dim=3, hidden=100, num_train=1000, seed=0):
    """The Fig. 3 model (784 -> hidden tanh -> Nz -> hidden tanh -> 784 Bernoulli), paper init."""
    init = keras_aevb.paper_initializer(seed)
    encoder = keras_aevb.MLPEncoder(
        latent_dim, (hidden,), kernel_initializer=init, bias_initializer=init, name="encoder"
    )
    decoder = keras_aevb.BernoulliDecoder(
        (28, 28), (hidden,), kernel_initializer=init, bias_initializer=init, name="decoder"
    )
    model = METHODS[method](encoder, decoder, seed=seed, weight_decay=1.0 / num_train)
    return model


def run_fig3(args):
    x_train, x_test = fig3_data(args.data_dir, args.num_train, seed=args.seed)
    checkpoints = sorted({e for e in (1, 3, 10, 30, 100, 300, 1000) if e < args.epochs})
    checkpoints.append(args.epochs)
    results = {}
    for method in args.methods:
        model = build(method, args.latent_dim, args.hidden, args.num_train, args.seed)
        model.compile(optimizer=keras_aevb.paper_optimizer(args.learning_rate))
        curve, done, train_seconds = [], 0, 0.0
        for epoch in checkpoints:
            start = time.perf_counter()
            history = model.fit(
                x_train,
                batch_size=100,
                epochs=epoch,
                initial_epoch=done,
                verbose=0,
                shuffle=True,
            ).history
            train_seconds += time.perf_counter() - start
            done = epoch
            point = {
                "method": method,
                "epoch": epoch,
                "samples_evaluated": epoch * len(x_train),
                "train_seconds": round(train_seconds, 1),
                "train_elbo_last_epoch": float(history["elbo"][-1]),
            }
            for split, x in (("train", x_train[: args.num_eval]), ("test", x_test)):
                values = log_likelihood(model, x, num_samples=args.curve_k, seed=epoch)
                point[f"{split}_log_likelihood"] = float(values.mean())
            log(point)
            curve.append(point)
        final = {"method": method, "epochs": args.epochs, "train_seconds": round(train_seconds, 1)}
        for split, x in (("train", x_train[: args.num_eval]), ("test", x_test)):
            start = time.perf_counter()
            final[f"{split}_is_k{args.final_k}"] = float(
                log_likelihood(model, x, num_samples=args.final_k, seed=1).mean()
            )
            final[f"{split}_elbo_l100"] = float(
                np.mean(
                    np.concatenate(
                        [
                            model.elbo(x[i : i + 100], num_samples=100, seed=i).numpy()
                            for i in range(0, len(x), 100)
                        ]
                    )
                )
            )
            final[f"{split}_eval_seconds"] = round(time.perf_counter() - start, 1)
        subset = x_test[: args.hmc_examples]
        start = time.perf_counter()
        hmc = hmc_log_likelihood(
            model, subset, num_samples=args.hmc_samples, num_burnin_steps=args.hmc_burnin, seed=0
        )
        final[f"test_first{len(subset)}_hmc"] = float(hmc.mean())
        final[f"test_first{len(subset)}_is_k{args.final_k}"] = float(
            log_likelihood(model, subset, num_samples=args.final_k, seed=1).mean()
        )
        final["hmc_seconds"] = round(time.perf_counter() - start, 1)
        log(final)
        results[method] = {"curve": curve, "final": final}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    if args.out:
        plot_fig3(results, vars(args))


def plot_fig3(results, args):
    """Train and test marginal likelihood against training samples evaluated (the paper's
    axes), and test against training seconds (what the budget buys on this machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    colours = {"aevb": "tab:red", "wake_sleep": "tab:green", "mcem": "tab:blue"}
    panels = (
        ("train", "samples_evaluated", "# training samples evaluated"),
        ("test", "samples_evaluated", "# training samples evaluated"),
        ("test", "train_seconds", "training time, s (incl. tracing; 2 shared CPU cores)"),
    )
    for ax, (split, x_key, x_label) in zip(axes, panels, strict=True):
        for method, result in results.items():
            curve = result["curve"]
            ax.plot(
                [p[x_key] for p in curve],
                [p[f"{split}_log_likelihood"] for p in curve],
                "o-",
                color=colours[method],
                label=LABELS[method],
            )
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_title(f"{split} (first {args['num_eval']} points)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"log p(x) (IS, K={args['curve_k']}), nats")
    axes[0].legend()
    fig.suptitle(
        f"MNIST, N_z={args['latent_dim']}, {args['hidden']} hidden units, "
        f"N={args['num_train']}, static binarization, Adagrad {args['learning_rate']:g}"
    )
    fig.tight_layout()
    fig.savefig(args["out"], dpi=110)


def run_mnist20(args):
    """The paper's MNIST model (Nz = 20, 500 hidden) trained briefly on all 60k images with
    dynamic binarization; its bound and IS log-likelihood on the first test images."""

    train, _ = data.load_mnist(args.data_dir, "train")
    test, _ = data.load_mnist(args.data_dir, "test")
    x_test = data.binarize(test[: args.num_eval], "static", seed=args.seed + 1)
    model = keras_aevb.paper_model("mnist", latent_dim=20, seed=args.seed)
    model.compile(optimizer=keras_aevb.paper_optimizer(args.learning_rate))
    dataset = data.make_dataset(train, 100, "dynamic", shuffle=True, seed=args.seed)
    start = time.perf_counter()
    history = model.fit(dataset, epochs=args.epochs, verbose=0).history
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    elbo = np.concatenate(
        [
            model.elbo(x_test[i : i + 100], num_samples=100, seed=i).numpy()
            for i in range(0, len(x_test), 100)
        ]
    )
    is_values = log_likelihood(model, x_test, num_samples=args.final_k, seed=1)
    record = {
        "model": "paper_model('mnist', latent_dim=20)",
        "epochs": args.epochs,
        "train_examples": len(train),
        "train_seconds": round(seconds, 1),
        "train_elbo_last_epoch": float(history["elbo"][-1]),
        "test_examples": len(x_test),
        "test_elbo_l100": float(elbo.mean()),
        f"test_is_k{args.final_k}": float(is_values.mean()),
        "gap_nats": float(is_values.mean() - elbo.mean()),
        "eval_seconds": round(time.perf_counter() - start, 1),
    }
    log(record)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "result": record}, f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("fig3", "mnist20"))
    parser.add_argument("--data-dir", default="/work/shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--latent-dim", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-eval", type=int, default=1000)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--curve-k", type=int, default=200, help="IS samples for the curve")
    parser.add_argument("--final-k", type=int, default=1000, help="IS samples at the end")
    parser.add_argument("--hmc-examples", type=int, default=100)
    parser.add_argument("--hmc-samples", type=int, default=200)
    parser.add_argument("--hmc-burnin", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="PNG for the fig3 part")
    parser.add_argument("--json", help="write all measurements here")
    parser.add_argument("--replot", help="fig3: redraw --out from this --json file, no training")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        plot_fig3(saved["results"], dict(saved["args"], out=args.out))
    elif args.part == "fig3":
        run_fig3(args)
    else:
        run_mnist20(args)


if __name__ == "__main__":
    main()
