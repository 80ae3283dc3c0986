"""Runs an exported SavedModel the way a server would: plain TensorFlow, no keras_aevb, no Keras.

Used by tests/test_export.py in a fresh process (`sys.executable tests/serving_client.py ...`);
also a minimal example of a Python client of the export.

    python tests/serving_client.py SAVED_MODEL_DIR INPUTS.npz OUTPUTS.npz

INPUTS.npz holds arrays named `<signature>__<input>`; every signature named there is run once on
its inputs and each output is written to OUTPUTS.npz as `<signature>__<output>`. Arrays named
`bad__<signature>__<input>` are fed alone to that signature and must be refused: the error's
type and message are reported. The last line printed is a JSON report.

`import tensorflow` (2.21) itself imports keras when keras is installed. To show that the export
needs neither keras nor keras_aevb (nor TFP), this script hides those packages from the import
system before importing TensorFlow, as if they were not installed (`--no-hide` turns that off,
to see what TensorFlow imports on its own), and reports which of them ended up in sys.modules.
"""

import importlib.machinery
import json
import sys
import time

HIDDEN = ("keras", "keras_aevb", "tensorflow_probability", "tf_keras")


class _HidingPathFinder:
    """`PathFinder` that cannot see the HIDDEN top-level packages: they look uninstalled."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    @classmethod
    def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()


def _imported(names):
    return sorted({m.partition(".")[0] for m in sys.modules} & set(names))


def main(argv):
    hide = "--no-hide" not in argv
    args = [a for a in argv if a != "--no-hide"]
    saved_model_dir, inputs_path, outputs_path = args
    if hide:
        sys.meta_path[:] = [
            _HidingPathFinder if finder is importlib.machinery.PathFinder else finder
            for finder in sys.meta_path
        ]
    import numpy as np
    import tensorflow as tf

    report = {
        "hidden": list(HIDDEN) if hide else [],
        "after_import_tensorflow": _imported(HIDDEN),
        "keras_modules_after_import_tensorflow": sum(
            m.partition(".")[0] == "keras" for m in sys.modules
        ),
    }
    start = time.perf_counter()
    loaded = tf.saved_model.load(saved_model_dir)
    report["load_seconds"] = time.perf_counter() - start
    report["signatures"] = sorted(loaded.signatures)

    inputs = dict(np.load(inputs_path))
    outputs, errors = {}, {}
    calls = {}
    for key, value in inputs.items():
        if key.startswith("bad__"):
            continue
        signature, name = key.split("__")
        calls.setdefault(signature, {})[name] = tf.constant(value)
    for signature, feeds in calls.items():
        for name, value in loaded.signatures[signature](**feeds).items():
            outputs[f"{signature}__{name}"] = value.numpy()
    for key, value in inputs.items():
        if key.startswith("bad__"):
            _, signature, name = key.split("__")
            try:
                loaded.signatures[signature](**{name: tf.constant(value)})
                errors[key] = None
            except tf.errors.OpError as error:
                errors[key] = [type(error).__name__, error.message]
    np.savez(outputs_path, **outputs)
    report["errors"] = errors
    report["after_run"] = _imported(HIDDEN)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
