"""Tests of keras_aevb.plotting: grids, PNGs, the Fig. 4 manifold grid and the Fig. 2 plot."""

import csv
import json
import os

import keras
import matplotlib.image
import numpy as np
import pytest
import scipy.stats

import keras_aevb
from keras_aevb import plotting
from keras_aevb.training import build_model


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def tiny_model(latent_dim=2, prior="standard_normal"):
    return build_model("mnist", (28, 28), latent_dim, hidden_units=(8,), prior=prior, seed=0)


def test_image_grid_places_each_image_and_pads():
    images = np.stack([np.full((3, 2), (k + 1) / 10, np.float32) for k in range(5)])
    grid = plotting.image_grid(images, cols=3, pad=1, pad_value=1.0)
    # 2 rows x 3 cols of 3x2 images with 1-pixel gaps: (2*3 + 1) x (3*2 + 2).
    assert grid.shape == (7, 8)
    for k in range(5):
        r, c = divmod(k, 3)
        np.testing.assert_array_equal(
            grid[r * 4 : r * 4 + 3, c * 3 : c * 3 + 2], np.full((3, 2), (k + 1) / 10, np.float32)
        )
    assert np.all(grid[3, :] == 1.0)  # the gap between the rows
    assert np.all(grid[4:7, 6:8] == 1.0)  # the empty sixth cell


def test_image_grid_default_is_near_square_and_flat_images():
    grid = plotting.image_grid(np.zeros((10, 784)), image_shape=(28, 28), pad=2)
    # ceil(sqrt(10)) = 4 columns, ceil(10 / 4) = 3 rows.
    assert grid.shape == (3 * 28 + 2 * 2, 4 * 28 + 3 * 2)


def test_image_grid_clips_and_refuses_bad_input():
    assert plotting.image_grid(np.full((1, 2, 2), 3.0)).max() == 1.0
    with pytest.raises(ValueError, match="holds 4 images, not 5"):
        plotting.image_grid(np.zeros((5, 2, 2)), rows=2, cols=2)
    with pytest.raises(ValueError, match="no images"):
        plotting.image_grid(np.zeros((0, 2, 2)))
    with pytest.raises(ValueError, match="image_shape"):
        plotting.image_grid(np.zeros((3, 4)))


def test_save_png_round_trip_and_scale(tmp_path):
    image = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    path = plotting.save_png(tmp_path / "x.png", image, scale=2)
    decoded = matplotlib.image.imread(path)
    assert decoded.shape == (6, 8)  # one grey channel
    # 8 bits: round(255 * value) / 255 is within half a grey level of the value.
    np.testing.assert_allclose(decoded[::2, ::2], image, atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(decoded[::2, ::2], decoded[1::2, 1::2])  # pixel repetition
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~current_umask()
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plotting.save_png(tmp_path / "missing" / "x.png", image)


def test_manifold_points_are_the_inverse_cdf_of_a_midpoint_grid():
    model = tiny_model()
    z = plotting.manifold_points(model, grid=4)
    u = (np.arange(4) + 0.5) / 4
    expected = scipy.stats.norm.ppf(u)
    # Row-major over the picture: columns increase z_1, rows go down from high z_2.
    # float32 quantile against SciPy's float64: 1e-5 absolute.
    np.testing.assert_allclose(z[:4, 0], expected, atol=1e-5)
    np.testing.assert_allclose(z[::4, 1], expected[::-1], atol=1e-5)
    assert z.shape == (16, 2)


def test_manifold_points_follow_the_prior():
    model = tiny_model(prior="logistic")
    z = plotting.manifold_points(model, grid=2)
    # Standard logistic quantile log(u / (1 - u)) at u = 0.25, 0.75.
    np.testing.assert_allclose(z[:2, 0], [np.log(1 / 3), np.log(3)], atol=1e-5)


def test_manifold_image_size_and_refusal():
    grid = plotting.manifold(tiny_model(), grid=3)
    assert grid.shape == (84, 84)  # no padding: the manifold reads as one picture
    with pytest.raises(ValueError, match="latent_dim=3"):
        plotting.manifold(tiny_model(latent_dim=3), grid=3)


def test_sample_and_reconstruction_grids():
    model = tiny_model()
    assert plotting.sample_grid(model, num=6, seed=0).shape == (2 * 28 + 2, 3 * 28 + 4)
    x = (np.random.default_rng(0).random((5, 28, 28)) > 0.5).astype(np.float32)
    grid = plotting.reconstruction_grid(model, x, cols=3)
    # Two blocks (3 + 2 examples), each a row of data above a row of reconstructions.
    assert grid.shape == (4 * 28 + 3 * 2, 3 * 28 + 2 * 2)
    np.testing.assert_array_equal(grid[:28, :28], x[0])
    np.testing.assert_allclose(grid[30:58, :28], np.asarray(model.reconstruct(x[:1]))[0], atol=1e-6)


def write_run(run_dir, latent_dim, rows):
    run_dir.mkdir()
    with open(run_dir / "history.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(plotting.HISTORY_COLUMNS)
        writer.writerows(rows)
    (run_dir / "config.json").write_text(
        json.dumps({"latent_dim": latent_dim, "dataset": "mnist", "binarization": "dynamic"})
    )
    return run_dir


def test_plot_bound_writes_png(tmp_path):
    a = write_run(tmp_path / "a", 3, [[1, 100, 1.0, -200, -201], [2, 200, 2.0, -150, -152]])
    b = write_run(tmp_path / "b", 20, [[1, 100, 1.0, -190, -195]])
    out = plotting.plot_bound([b, a], tmp_path / "bound.png")
    assert matplotlib.image.imread(out).shape[:2] == (420, 600)  # 6 x 4.2 inches at 100 dpi
    history = plotting.read_history(a)
    np.testing.assert_array_equal(history["examples_seen"], [100, 200])
    np.testing.assert_array_equal(history["test_elbo"], [-201, -152])


def test_plot_bound_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        plotting.plot_bound([tmp_path / "nope"], tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no history.csv"):
        plotting.plot_bound([tmp_path / "empty"], tmp_path / "x.png")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "history.csv").write_text("epoch,loss\n1,2\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        plotting.read_history(tmp_path / "bad")


def test_importing_plotting_does_not_select_a_backend():
    # The Agg backend is chosen inside the drawing functions, not at import of keras_aevb.
    assert keras_aevb is not None and keras is not None
    assert "matplotlib.pyplot" not in plotting.__dict__
