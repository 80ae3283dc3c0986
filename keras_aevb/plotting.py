"""Pictures of a trained model: image grids, the 2-D manifold (Fig. 4), the bound curves (Fig. 2).

Every function returns or writes plain images, so a notebook can show them and the CLI can save
them. Matplotlib is imported inside the functions, only when a picture is drawn, and draws on a
bare `Figure` (no pyplot, no backend switch): importing this module (or keras_aevb) never
touches a display, and a notebook's inline plots keep working.

Example:
>>> grid = image_grid(model.sample(100, seed=0), rows=10, cols=10)  # doctest: +SKIP
>>> save_image("samples.png", grid)  # doctest: +SKIP

Reference: Kingma & Welling, "Auto-Encoding Variational Bayes", arXiv:1312.6114, Fig. 2, 4, 5.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from keras_aevb._io import atomic_write
from keras_aevb.run_dir import HISTORY_COLUMNS, read_history  # noqa: F401 (re-exported)

__all__ = [
    "examples_label",
    "new_figure",
    "embedding_plot",
    "image_grid",
    "labelled_grid",
    "manifold",
    "manifold_points",
    "plot_bound",
    "read_history",
    "reconstruction_grid",
    "sample_grid",
    "save_image",
    "save_png",
]


# The file's suffix names the format written, and only these are written (a picture named
# x.jpg holds JPEG bytes). Grey image grids go through Pillow (`save_image`), figures through
# Matplotlib (`plot_bound`).
IMAGE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
FIGURE_FORMATS = {
    ".png": "png",
    ".pdf": "pdf",
    ".svg": "svg",
    ".jpg": "jpg",
    ".jpeg": "jpeg",
    ".tif": "tif",
    ".tiff": "tiff",
    ".eps": "eps",
}


def _format(path, formats):
    """The format named by `path`'s suffix, or a ValueError naming the ones that work."""
    suffix = Path(path).suffix.lower()
    if suffix not in formats:
        raise ValueError(
            f"cannot write {str(path)!r}: the suffix names the format; use one of "
            f"{', '.join(formats)}"
        )
    return formats[suffix]


def new_figure(**kwargs):
    """A Matplotlib `Figure` drawn off screen, without pyplot's global backend.

    A `Figure` made directly renders to PNG through Agg by itself, so drawing here never calls
    `matplotlib.use` (which would turn off inline plots in a notebook that calls this).
    """
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def image_grid(images, rows=None, cols=None, pad=2, pad_value=1.0, image_shape=None):
    """Tiles images into one grey picture, row by row.

    Args:
        images: array-like `[n, height, width]` (or `[n, height, width, 1]`, or `[n, d]` with
            `image_shape`), values in [0, 1] (decoder means, binary or grey data).
        rows, cols: grid size; by default the smallest near-square grid holding n images.
            Cells past the n-th are left at `pad_value`.
        pad: pixels between neighbouring images (none at the outer border).
        pad_value: grey value of the padding (1.0 = white).
        image_shape: `(height, width)` for flat images.

    Returns:
        float32 `[rows * height + (rows - 1) * pad, cols * width + (cols - 1) * pad]`, clipped
        to [0, 1].

    Raises:
        ValueError: no images, a grid too small for them, or images that are not 2-D.
    """
    images = np.asarray(images, dtype=np.float32)
    if image_shape is not None:
        images = images.reshape(len(images), *image_shape)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(
            f"image_grid needs images of shape [n, height, width], got {list(images.shape)}; "
            "pass image_shape=(height, width) for flat images."
        )
    n, height, width = images.shape
    if n == 0:
        raise ValueError("image_grid got no images.")
    if rows is None and cols is None:
        cols = math.ceil(math.sqrt(n))
    if rows is None:
        rows = math.ceil(n / cols)
    if cols is None:
        cols = math.ceil(n / rows)
    if rows * cols < n:
        raise ValueError(f"A {rows}x{cols} grid holds {rows * cols} images, not {n}.")
    grid = np.full(
        (rows * height + (rows - 1) * pad, cols * width + (cols - 1) * pad),
        pad_value,
        dtype=np.float32,
    )
    for k in range(n):
        r, c = divmod(k, cols)
        top, left = r * (height + pad), c * (width + pad)
        grid[top : top + height, left : left + width] = images[k]
    return np.clip(grid, 0.0, 1.0)


def save_image(path, image, scale=1):
    """Writes a grey image in [0, 1] as an 8-bit greyscale picture of exactly its size, atomically.

    The format is the one the suffix names (`IMAGE_FORMATS`: PNG, JPEG, TIFF or BMP); another
    suffix is a ValueError. The file appears complete or not at all (written to a temporary
    file, then renamed), so a failed call leaves an earlier picture at `path` intact.

    Args:
        path: the output file.
        image: `[height, width]` grey values in [0, 1] (clipped), stored as round(255 * value).
        scale: integer upscaling by pixel repetition (nearest neighbour).

    Returns:
        The path written, as a string.
    """
    from PIL import Image  # Pillow: a dependency of matplotlib (uint8 [h, w] -> mode "L")

    path = Path(path)
    image_format = _format(path, IMAGE_FORMATS)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"save_image needs a 2-D grey image, got shape {list(image.shape)}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist; create it first")
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    if scale > 1:  # on the bytes: a quarter of the memory of upscaling the float image
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    options = {"quality": 95} if image_format == "JPEG" else {}
    atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format=image_format, **options))
    return str(path)


def save_png(path, image, scale=1):
    """`save_image` under its first name: the suffix names the format (PNG for `.png`)."""
    return save_image(path, image, scale=scale)


# ------------------------------------------------------------------------------ model pictures


def sample_grid(model, num=100, seed=0, rows=None, cols=None):
    """Decoder means at `num` draws z ~ p(z) (paper Fig. 5), tiled into one image."""
    images = np.asarray(model.sample(int(num), seed=seed))
    return image_grid(images, rows=rows, cols=cols)


def reconstruction_grid(model, x, cols=10):
    """Data and their reconstructions (decoder mean at the posterior mean), interleaved by rows.

    Row 2k holds up to `cols` examples, row 2k + 1 their reconstructions right below them.
    """
    x = np.asarray(x, dtype=np.float32)
    x = x.reshape(len(x), *model.event_shape)
    reconstructions = np.asarray(model.reconstruct(x))
    cols = min(int(cols), len(x))
    tiles = []
    for start in range(0, len(x), cols):
        block = [x[start : start + cols], reconstructions[start : start + cols]]
        for part in block:
            fill = np.ones((cols - len(part), *model.event_shape), np.float32)
            tiles.append(np.concatenate([part, fill]))
    return image_grid(np.concatenate(tiles), cols=cols)


def manifold_points(model, grid=20):
    """The latent points of Fig. 4: a grid on the unit square through the prior's inverse CDF.

    The grid holds the midpoints u_i = (i + 0.5) / grid of `grid` equal cells per axis (so
    neither 0 nor 1, where the inverse CDF of a Gaussian is infinite), mapped by the prior's
    per-dimension quantile function z = F^{-1}(u). Rows run from high z_2 (top) to low z_2, as in
    a plot with the z_2 axis pointing up; columns from low to high z_1.

    Returns:
        float32 `[grid * grid, 2]`, row-major over the picture.

    Raises:
        ValueError: the model's latent space is not 2-D, or the prior has no quantile function.
    """
    from keras_aevb.prior import prior_quantile

    latent_dim = int(model.latent_dim)
    if latent_dim != 2:
        raise ValueError(
            f"the manifold picture needs a 2-D latent space, but this model has latent_dim="
            f"{latent_dim}; train one with --latent-dim 2"
        )
    grid = int(grid)
    if grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid}.")
    u = (np.arange(grid, dtype=np.float32) + 0.5) / grid
    u1, u2 = np.meshgrid(u, u[::-1])  # u2 decreasing down the rows: z_2 axis points up
    points = np.stack([u1.ravel(), u2.ravel()], axis=-1)
    return np.asarray(prior_quantile(model.prior_distribution, points), dtype=np.float32)


def manifold(model, grid=20):
    """The learned 2-D data manifold (paper Fig. 4): decoder means on a `grid` x `grid` grid.

    Returns:
        The image grid (see `image_grid`, with padding 0 so the manifold reads as one picture).
    """
    z = manifold_points(model, grid)
    images = np.asarray(model.decode(z))
    return image_grid(images, rows=int(grid), cols=int(grid), pad=0)


def labelled_grid(images, out, row_labels, col_labels, title=None, pad=2):
    """Writes a grid of images `[rows, cols, height, width]` with a label per row and column
    (e.g. latent dimension by value for a traversal, pair by t for an interpolation).

    The grid is `image_grid`'s; Matplotlib puts the labels beside it. The suffix of `out` names
    the format (`FIGURE_FORMATS`). Returns the path written.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"labelled_grid needs [rows, cols, height, width], got {images.shape}")
    rows, cols, height, width = images.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(
            f"{rows} x {cols} images need {rows} row labels and {cols} column labels, got "
            f"{len(row_labels)} and {len(col_labels)}"
        )
    figure_format = _format(out, FIGURE_FORMATS)
    grid = image_grid(images.reshape(rows * cols, height, width), rows=rows, cols=cols, pad=pad)
    cell = 0.5  # inches per image
    fig = new_figure(
        figsize=(1.2 + cols * cell, 0.6 + rows * cell + (0.3 if title else 0)), dpi=100
    )
    ax = fig.subplots()
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([c * (width + pad) + (width - 1) / 2 for c in range(cols)])
    ax.set_xticklabels([str(label) for label in col_labels], fontsize="x-small", rotation=45)
    ax.set_yticks([r * (height + pad) + (height - 1) / 2 for r in range(rows)])
    ax.set_yticklabels([str(label) for label in row_labels], fontsize="x-small")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return _save_figure(fig, ax, out, figure_format, title)


def _save_figure(fig, ax, out, figure_format, title=None):
    """Titles, lays out and writes a figure atomically; returns the path."""
    if title:
        ax.set_title(title, fontsize="small")
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda f: fig.savefig(f, format=figure_format))
    return str(out)


def embedding_plot(z, out, labels=None, title=None):
    """A scatter plot of the first two latent coordinates, coloured by `labels` if given."""
    z = np.asarray(z, np.float32)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"embedding_plot needs [n, >= 2] embeddings, got {list(z.shape)}")
    figure_format = _format(out, FIGURE_FORMATS)
    fig = new_figure(figsize=(5.0, 4.4), dpi=100)
    ax = fig.subplots()
    if labels is None:
        ax.scatter(z[:, 0], z[:, 1], s=2, alpha=0.5)
    else:
        labels = np.asarray(labels)
        for value in np.unique(labels):
            keep = labels == value
            ax.scatter(z[keep, 0], z[keep, 1], s=2, alpha=0.6, label=str(value))
        ax.legend(markerscale=4, fontsize="x-small", ncol=2)
    ax.set_xlabel("$z_1$ (posterior mean)")
    ax.set_ylabel("$z_2$ (posterior mean)")
    return _save_figure(fig, ax, out, figure_format, title)


# ------------------------------------------------------------------------------ Fig. 2


def _run_label(run_dir, config, all_configs):
    """A legend label: what distinguishes this run (N_z first, as in the paper's panels)."""
    if not config:
        return Path(run_dir).name
    parts = [f"Nz={config.get('latent_dim', '?')}"]
    for key, fmt in (
        ("dataset", "{}"),
        ("method", "{}"),
        ("estimator", "{}"),
        ("num_samples", "L={}"),
        ("learning_rate", "lr={}"),
        ("binarization", "{}"),
    ):
        values = {json.dumps(c.get(key), sort_keys=True) for c in all_configs}
        if len(values) > 1 and key in config:
            parts.append(fmt.format(config[key]))
    return ", ".join(parts)


def examples_label(value, _position=None):
    """2e5, 1e6, ...: short labels for a log axis of example counts."""
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def plot_bound(run_dirs, out, title=None):
    """Draws Fig. 2: the lower bound against the number of training examples seen (log x).

    One colour per run; solid lines are the test bound, dashed lines the training bound (as in
    the paper). Legends come from each run's config.json (N_z and whatever else differs).

    Args:
        run_dirs: directories written by `keras-aevb train` (each with history.csv).
        out: the file to write; its suffix names the format (`FIGURE_FORMATS`: PNG, PDF, SVG,
            JPEG, TIFF or EPS).
        title: optional title; default: the data set(s) and binarization(s).

    Returns:
        The path written.
    """
    from matplotlib import rcParams, ticker

    figure_format = _format(out, FIGURE_FORMATS)
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("plot_bound needs at least one run directory.")
    histories, configs = [], []
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory not found: {run_dir}")
        histories.append(read_history(run_dir))
        config_path = run_dir / "config.json"
        configs.append(json.loads(config_path.read_text()) if config_path.is_file() else {})
    order = np.argsort([c.get("latent_dim", 0) for c in configs], kind="stable")
    fig = new_figure(figsize=(6.0, 4.2), dpi=100)
    ax = fig.subplots()
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for k, i in enumerate(order):
        history, label = histories[i], _run_label(run_dirs[i], configs[i], configs)
        color = colors[k % len(colors)]
        x = history["examples_seen"]
        ax.plot(x, history["test_elbo"], "-", color=color, marker=".", label=f"{label} test")
        ax.plot(x, history["train_elbo"], "--", color=color, label=f"{label} train")
    ax.set_xscale("log")
    # Labelled ticks at 1, 2 and 5 times powers of ten; Matplotlib's labelled minor ticks
    # at every multiple overlap over ranges of one or two decades.
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(examples_label))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("# training examples evaluated")
    ax.set_ylabel("lower bound L (nats per datapoint)")
    if title is None:
        names = sorted({str(c.get("dataset", "?")) for c in configs})
        binarizations = sorted({str(c.get("binarization", "?")) for c in configs})
        title = f"{', '.join(names)} ({', '.join(binarizations)} binarization)"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda f: fig.savefig(f, format=figure_format))
    return str(out)
