"""The README's Python snippets run, in order, as a reader pastes them (on the real MNIST files).

The quickstart trains for 5 epochs of 60,000 images; here `fit` stops after a few steps
(`steps_per_epoch` is added to its calls), which changes how long it trains, not what runs.
"""

import pathlib
import re

import pytest

from keras_aevb import data as data_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(section):
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {section}")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


@pytest.mark.slow
def test_the_quickstart_snippets_run_in_order(tmp_path, monkeypatch):
    if data_lib.default_data_dir("mnist") is None:
        pytest.skip("needs ../shared/data/mnist")
    monkeypatch.chdir(ROOT)  # the snippets read ../shared/data/mnist from the checkout
    blocks = _python_blocks("Python quickstart")
    assert blocks
    namespace = {}
    for block in blocks:
        code = block.replace("epochs=5", "epochs=1, steps_per_epoch=3")
        code = code.replace('model.save("model.keras")', f'model.save("{tmp_path}/model.keras")')
        code = code.replace('load_model("model.keras")', f'load_model("{tmp_path}/model.keras")')
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["model"].built
