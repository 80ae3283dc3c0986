"""What the step-size search costs next to the run it serves, measured in one process.

`keras-aevb train --learning-rate auto` (the default) trains each candidate step size for
`lr_search_steps` steps from the same initialization before the run starts. This script times,
for the paper's MNIST model (784-500-20, M = 100, dynamic binarization, Adagrad):

  search   `training.select_learning_rate` with the default candidates (0.01, 0.02, 0.1) and
           200 steps each, as `train` calls it (tracing and compiling included);
  run      a fresh model compiled and fit for 200 steps (20,000 examples): the shortest run a
           user makes, tracing and compiling included.

and prints both and their ratio, `rounds` times interleaved (medians).

    python benchmarks/lr_search_cost.py            # about 3 minutes on 2 cores
    PYTHONPATH=OLD python benchmarks/lr_search_cost.py   # the same against another checkout
"""

import argparse
import statistics
import time

import keras


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)

    import keras_aevb
    from keras_aevb import data, training

    images, _ = data.load_mnist(data.default_data_dir(), split="train")

    def build():
        return keras_aevb.paper_model("mnist", latent_dim=20, seed=0)

    keras.utils.set_random_seed(0)
    initial = build().get_weights()
    eval_x = data.binarize(images[:1000], "static", seed=0)

    def stream():
        return data.make_dataset(images, 100, "dynamic", seed=0, repeat=True)

    def search():
        training.select_learning_rate(
            build, initial, stream, eval_x, steps=args.steps, print_fn=lambda *a: None
        )

    def run():
        model = build()
        model.compile(optimizer=keras_aevb.paper_optimizer())
        model.fit(stream(), steps_per_epoch=args.steps, epochs=1, verbose=0)

    times = {"search": [], "run": []}
    for _ in range(args.rounds):
        for name, fn in (("search", search), ("run", run)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    search_s, run_s = statistics.median(times["search"]), statistics.median(times["run"])
    print(f"keras_aevb {keras_aevb.__file__}")
    print(
        f"search (3 candidates x {args.steps} steps): {search_s:.1f} s; run of "
        f"{args.steps * 100:,} examples: {run_s:.1f} s; search / run = {search_s / run_s:.2f}"
    )


if __name__ == "__main__":
    main()
