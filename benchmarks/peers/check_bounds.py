"""Do the peers train the same model as keras_aevb? The test bound after the same budget.

Trains keras_aevb (`paper_model` + `paper_optimizer`, `make_dataset` with dynamic
binarization) and each installed peer for the same epochs over the same MNIST training images
from their own N(0, 0.01^2) initializations, then prints each one's bound on the same statically
binarized test images (one eps draw per example). Different seeds and random-number
generators: the bounds agree within seed noise, not exactly.

    python benchmarks/peers/check_bounds.py               # about 2 minutes on 2 cores
    python benchmarks/peers/check_bounds.py --examples 60000 --epochs 5
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--test-examples", type=int, default=2_000)
    parser.add_argument("--seeds", default="0,1", help="seeds per system (the noise between them)")
    args = parser.parse_args(argv)

    from train_throughput import peer_classes

    import keras_aevb
    from keras_aevb import data

    images, _ = data.load_mnist(data.default_data_dir(), split="train")
    images = images[: args.examples]
    test, _ = data.load_mnist(data.default_data_dir(), split="test")
    x_test = data.binarize(test[: args.test_examples], "static", seed=0)

    def keras_bound(seed):
        model = keras_aevb.paper_model(
            "mnist", latent_dim=20, seed=seed, weight_decay=1 / len(images)
        )
        model.compile(optimizer=keras_aevb.paper_optimizer())
        model.fit(
            data.make_dataset(images, 100, "dynamic", seed=seed), epochs=args.epochs, verbose=0
        )
        return float(model.evaluate(x_test, batch_size=100, verbose=0, return_dict=True)["elbo"])

    def peer_bound(cls, seed):
        trainer = cls(images, seed=seed)
        for _ in range(args.epochs):
            trainer.train_epoch()
        return trainer.bound(x_test)

    systems = {"keras_aevb": keras_bound}
    for name, cls in peer_classes().items():
        systems[name] = lambda seed, cls=cls: peer_bound(cls, seed)
    print(
        f"{args.epochs} epochs over {len(images)} MNIST images (M = 100, step size 0.02); "
        f"bound on {len(x_test)} test images, per seed:"
    )
    for name, fn in systems.items():
        bounds = [fn(int(seed)) for seed in args.seeds.split(",")]
        print(f"  {name:16s} " + "  ".join(f"{b:8.2f}" for b in bounds))


if __name__ == "__main__":
    main()
