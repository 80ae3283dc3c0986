"""One short MNIST run per posterior family, each under its own-name prior, on the same budget.

The paper's MNIST model (784-500-Nz-500-784, tanh, N(0, 0.01) init, weight prior 1/N) with only
the posterior family and the prior changed; the same data (the first 10k MNIST training examples,
dynamic binarization), the same seed, Adagrad (accumulator 0) at 0.02, M = 100, 5 epochs; the
test bound on the 10k test examples (static binarization at seed 1, L = 1), as in
benchmarks/adagrad_accumulator.py. The estimator is "auto": analytic KL where TFP registers it.
`--prior normal` puts every family under one prior instead, which separates the posterior's
effect from the prior's.

    python benchmarks/families_mnist.py [--families normal gamma ...] [--prior P] [--out-dir DIR]

Writes DIR/families_mnist.json, DIR/families_mnist.md (the results table) and
DIR/families_mnist.png (test bound per family, and decoder means at 8 prior draws per family,
drawn through the prior's quantile function).
"""

import argparse
import json
import math
import os
import time

import keras
import numpy as np

import keras_aevb
from keras_aevb import data
from keras_aevb.families import FAMILIES


def run_family(name, x_train, x_test, args):
    keras.utils.set_random_seed(args.seed)
    prior = args.prior or name
    model = keras_aevb.paper_model(
        "mnist", latent_dim=args.latent_dim, posterior=name, prior=prior, seed=args.seed
    )
    model.compile(optimizer=keras_aevb.paper_optimizer(args.learning_rate))
    train = data.make_dataset(
        x_train, batch_size=args.batch_size, binarization="dynamic", seed=args.seed
    )
    start = time.perf_counter()
    history = model.fit(
        train, epochs=args.epochs, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()]
    ).history
    seconds = time.perf_counter() - start
    logs = model.evaluate(x_test, batch_size=1000, verbose=0, return_dict=True)
    samples = keras.ops.convert_to_numpy(model.sample(8, seed=args.seed))
    return {
        "family": name,
        "prior": prior,
        "estimator": model.estimator,
        "epochs_run": len(history["loss"]),
        "train_elbo_last_epoch": float(history["elbo"][-1]),
        "test_elbo": float(logs["elbo"]),
        "test_reconstruction": float(logs["reconstruction_log_likelihood"]),
        "test_kl": float(logs["kl"]),
        "train_seconds": seconds,
    }, samples


def _markdown(results, args, command):
    lines = [
        f"Test bound (nats per datapoint, higher is better) after {args.epochs} epochs on the "
        f"first {args.train_examples} MNIST training examples (dynamic binarization), "
        f"Nz = {args.latent_dim}, M = {args.batch_size}, Adagrad {args.learning_rate} "
        "(accumulator 0), seed "
        f"{args.seed}; test set: {len(results) and args.test_examples} examples, static "
        "binarization (seed 1), L = 1. "
        + (
            f"Every family under the {args.prior!r} prior."
            if args.prior
            else "Each family under its own-name prior."
        ),
        "",
        f"Command: `{command}`",
        "",
        "| posterior | prior | estimator | test ELBO | reconstruction | KL | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: -r["test_elbo"] if math.isfinite(r["test_elbo"]) else 0):
        lines.append(
            f"| {r['family']} | {r['prior']} | {r['estimator']} | {r['test_elbo']:.1f} | "
            f"{r['test_reconstruction']:.1f} | {r['test_kl']:.1f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _figure(results, samples, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["family"] for r in results]
    fig = plt.figure(figsize=(12, 0.55 * len(names) + 1.5))
    grid = fig.add_gridspec(1, 2, width_ratios=[1, 1.6])
    dots = fig.add_subplot(grid[0])
    elbos = [r["test_elbo"] for r in results]
    positions = np.arange(len(names))
    for estimator, color in (("analytic_kl", "C0"), ("monte_carlo", "C1")):
        chosen = [i for i, r in enumerate(results) if r["estimator"] == estimator]
        dots.plot([elbos[i] for i in chosen], positions[chosen], "o", color=color, label=estimator)
    for i, elbo in enumerate(elbos):
        dots.annotate(f"{elbo:.1f}", (elbo, i), textcoords="offset points", xytext=(6, -3))
    dots.set_yticks(positions, names)
    dots.set_ylim(len(names) - 0.5, -0.5)
    dots.set_xlabel("test ELBO (nats per datapoint)")
    dots.legend(loc="lower left", title="KL")
    dots.grid(axis="x", alpha=0.3)
    dots.ticklabel_format(axis="x", useOffset=False, style="plain")
    dots.margins(x=0.15)
    images = fig.add_subplot(grid[1])
    rows = [np.concatenate(list(s.reshape(-1, 28, 28)), axis=1) for s in samples]
    images.imshow(np.concatenate(rows, axis=0), cmap="gray", vmin=0, vmax=1)
    images.set_yticks([28 * i + 14 for i in range(len(names))], names)
    images.set_xticks([])
    images.set_title("decoder means at z = F^-1(u), u ~ U(0,1) (prior quantile)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-examples", type=int, default=10_000)
    parser.add_argument("--test-examples", type=int, default=10_000)
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prior", default=None, help="one prior for every family (default: each its own name)"
    )
    parser.add_argument("--out-dir", default=".notes/families_mnist")
    args = parser.parse_args()
    data_dir = args.data_dir or data.default_data_dir()
    x_train, _ = data.load_mnist(data_dir, split="train")
    x_test, _ = data.load_mnist(data_dir, split="test")
    x_train = x_train[: args.train_examples]
    x_test = data.binarize(x_test[: args.test_examples], "static", seed=1)
    os.makedirs(args.out_dir, exist_ok=True)
    results, samples = [], []
    json_path = os.path.join(args.out_dir, "families_mnist.json")
    for name in args.families:
        result, images = run_family(name, x_train, x_test, args)
        results.append(result)
        samples.append(images)
        print(
            f"{name:12s} {result['estimator']:12s} test ELBO {result['test_elbo']:8.2f}  "
            f"KL {result['test_kl']:6.2f}  ({result['train_seconds']:.0f} s)",
            flush=True,
        )
        # Written after every family, so an interrupted run keeps what it measured.
        with open(json_path, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    command = "python benchmarks/families_mnist.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if v is not None and k != "data_dir"
    )
    with open(os.path.join(args.out_dir, "families_mnist.md"), "w") as f:
        f.write(_markdown(results, args, command))
    _figure(results, samples, os.path.join(args.out_dir, "families_mnist.png"))


if __name__ == "__main__":
    main()
