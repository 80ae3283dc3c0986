"""Keras's Adagrad default (accumulator 0.1) against the paper's (accumulator 0; DESIGN 9).

Same model (the paper's MNIST model, Nz = 20, N(0, 0.01) init), same data (10k MNIST training
examples, dynamic binarization), same seed, 5 epochs at M = 100 and learning rate 0.02; prints the
test bound on 10k test examples (static binarization, seed 1, L = 1) for each accumulator start.

    python benchmarks/adagrad_accumulator.py [--data-dir ../shared/data/mnist]
"""

import argparse

import keras

import keras_aevb
from keras_aevb import data


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    x_train, _ = data.load_mnist(args.data_dir or data.default_data_dir(), split="train")
    x_test, _ = data.load_mnist(args.data_dir or data.default_data_dir(), split="test")
    x_test = data.binarize(x_test, "static", seed=1)
    results = {}
    for accumulator in (0.1, 0.0):
        keras.utils.set_random_seed(0)
        model = keras_aevb.paper_model("mnist", latent_dim=20, seed=0)
        model.compile(
            optimizer=keras.optimizers.Adagrad(
                0.02,
                initial_accumulator_value=accumulator,
                epsilon=1e-8 if not accumulator else 1e-7,
            )
        )
        train = data.make_dataset(x_train[:10_000], batch_size=100, binarization="dynamic", seed=0)
        model.fit(train, epochs=args.epochs, verbose=0)
        logs = model.evaluate(x_test, batch_size=1000, verbose=0, return_dict=True)
        results[accumulator] = logs["elbo"]
        print(f"initial_accumulator_value={accumulator}: test ELBO {logs['elbo']:.1f} nats")
    print(
        f"paper's Adagrad (0.0) minus Keras default (0.1): {results[0.0] - results[0.1]:+.1f} nats"
    )


if __name__ == "__main__":
    main()
