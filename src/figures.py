"""The experiment's pictures, from arrays: the kernel converging, learned vs true, one
validation image through the model, and the training curves.

Every function takes arrays and returns a matplotlib Figure (or, for the animation,
the frames as uint8 arrays); writing files is the caller's job, except write_gif.
Figures are built with matplotlib.figure.Figure, never pyplot: no global state,
no GUI backend, nothing left open. They render with Agg.

Kernels are drawn in the diverging RdBu_r colormap on a range symmetric about
zero, so a weight of 0 is white, positive weights red and negative ones blue.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

KERNEL_CMAP = "RdBu_r"  # diverging: negative weights blue, zero white, positive red
IMAGE_CMAP = "gray"
MAX_FRAMES = 60  # more kernel snapshots than this are subsampled, first and last kept
MAX_LABELLED = 5  # kernels up to 5×5 get their values written in the cells
MIN_FONTSIZE = 6.5  # ... if the values fit at this size (pt) or larger
DPI = 120  # for the PNGs
FRAME_SIZE = (5.6, 3.2)  # inches at FRAME_DPI: 560×320 px GIF frames
FRAME_DPI = 100
GIF_CMAP_COLOURS = 48  # GIF palette: this many colours of the kernel colormap ...
GIF_GRAYS = 16  # ... and this many grays, black to white, for text and axes
GIF_SECONDS = 6.0  # the whole animation, before the last frame's hold
LAST_FRAME_MS = 2000
CHANNELS = ("R", "G", "B")  # the slices of a colour kernel, in data/gray's RGB order
LABEL_PIXELS = 14  # kernel_image: the label row above each tile
BAR_PIXELS = 12  # ... the width of each tile's colour bar
GAP = 6  # ... pixels between slices and tiles


# --- shared pieces ----------------------------------------------------------------


def symmetric_limit(*arrays: np.ndarray) -> float:
    """max |value| over the arrays (NaN ignored), or 1 if that is 0 or not finite."""
    values = [np.nanmax(np.abs(a)) for a in map(np.asarray, arrays) if a.size]
    m = float(max(values)) if values else 0.0
    return m if np.isfinite(m) and m > 0 else 1.0


def symmetric_range(*arrays: np.ndarray) -> tuple[float, float]:
    """(-m, m) with m = symmetric_limit(*arrays): zero sits in the middle of the colormap."""
    m = symmetric_limit(*arrays)
    return -m, m


def kernel_picture(
    kernel: np.ndarray, value_range: tuple[float, float], min_pixels: int = 128
) -> np.ndarray:
    """One 2-D kernel slice as a uint8 H×W×3 picture, each weight a square block of pixels.

    Colours come from a fixed value_range, the same every epoch, so the pictures
    of successive epochs are comparable; weights outside it are clipped.
    """
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim > 2 and all(s == 1 for s in k.shape[2:]):  # Conv2D weights: (h, w, 1, 1)
        k = k.reshape(k.shape[:2])
    if k.ndim != 2:
        raise ValueError(f"kernel must be 2-D, got shape {np.shape(kernel)}")
    low, high = map(float, value_range)
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range}")
    scaled = np.clip((k - low) / (high - low), 0.0, 1.0)
    rgb = np.round(colormaps[KERNEL_CMAP](scaled)[..., :3] * 255).astype(np.uint8)
    block = -(-min_pixels // max(k.shape))  # ceil: the longer side gets at least min_pixels
    return rgb.repeat(block, axis=0).repeat(block, axis=1)


def as_bank(kernel: np.ndarray) -> np.ndarray:
    """A kernel as the spec's (kh, kw, C, F) float64; a 2-D one is (kh, kw, 1, 1)."""
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim == 2:
        return k[:, :, None, None]
    if k.ndim != 4:
        raise ValueError(f"a kernel must be (kh, kw, C, F) or 2-D, got shape {k.shape}")
    return k


def filter_names(names: Sequence[str] | None, filters: int) -> list[str]:
    """FilterInfo.names, or "filter 0", "filter 1", ... when they are missing or miscounted."""
    names = list(names or ())
    return names if len(names) == filters else [f"filter {f}" for f in range(filters)]


def slice_label(names: Sequence[str], f: int, c: int, channels: int) -> str:
    """What one (kh, kw) slice of a bank is: its filter's name (in a bank) and its
    channel (R, G or B in colour); "" for the one slice of a gray single kernel."""
    parts = [names[f]] if len(names) > 1 else []
    if channels == len(CHANNELS):
        parts.append(CHANNELS[c])
    elif channels > 1:
        parts.append(f"channel {c}")
    return " ".join(parts)


def filter_limits(*kernels: np.ndarray | None) -> np.ndarray:
    """(F,) colour limits: each filter's max |weight| over the given (kh, kw, C, F)
    kernels (None skipped), all of its channels together; 1 where that is 0."""
    banks = [as_bank(k) for k in kernels if k is not None]
    if not banks:
        raise ValueError("no kernel to take colour limits from")
    return np.array(
        [symmetric_limit(*(b[..., f] for b in banks)) for f in range(banks[0].shape[3])]
    )


def _filter_ranges(kernel: np.ndarray, value_range) -> list[tuple[float, float]]:
    """One (low, high) per filter from kernel_image's value_range argument."""
    filters = kernel.shape[3]
    if value_range is None:
        return [(-m, m) for m in filter_limits(kernel)]
    ranges = np.asarray(value_range, dtype=np.float64)
    if ranges.shape == (2,):
        return [tuple(ranges)] * filters
    if ranges.shape == (filters, 2):
        return [tuple(r) for r in ranges]
    raise ValueError(f"value_range must be (low, high) or one per filter, got {ranges.shape}")


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _colour_bar(height: int, value_range: tuple[float, float], font) -> Image.Image:
    """A vertical colour bar, high at the top, with its ends and middle written beside it."""
    low, high = value_range
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(BAR_PIXELS, axis=1)
    bar = np.round(colormaps[KERNEL_CMAP](ramp)[..., :3] * 255).astype(np.uint8)
    fmt = value_format(max(abs(low), abs(high)))
    labels = [_label(v, fmt) for v in (high, (low + high) / 2, low)]
    width = BAR_PIXELS + 4 + max(int(font.getlength(t)) for t in labels) + 2
    out = Image.new("RGB", (width, height), "white")
    out.paste(Image.fromarray(bar), (0, 0))
    draw = ImageDraw.Draw(out)
    for text, y, anchor in zip(labels, (0, height // 2, height), ("lt", "lm", "lb")):
        draw.text((BAR_PIXELS + 4, y), text, fill="black", font=font, anchor=anchor)
    return out


def kernel_image(
    kernel: np.ndarray,
    names: Sequence[str] | None = None,
    value_range=None,
    min_pixels: int = 96,
) -> Image.Image:
    """A (kh, kw, C, F) kernel as one Pillow picture, for MLflow's per-epoch images.

    Each filter is a tile: its C channel slices side by side (labelled R, G, B in
    colour) on one colour range, with a colour bar; the tiles of a bank, each
    labelled with its name from `names`, are laid out in a near-square grid.
    value_range is one (low, high) for every filter, one per filter, or None for
    each filter's own ±max|weight|; keep it fixed across epochs so that the
    pictures compare. Pillow only: cheap enough to call every epoch.
    """
    k = as_bank(kernel)
    kh, kw, channels, filters = k.shape
    names = filter_names(names, filters)
    ranges = _filter_ranges(k, value_range)
    font = _font(LABEL_PIXELS - 3)
    tiles = []
    for f in range(filters):
        slices = [kernel_picture(k[:, :, c, f], ranges[f], min_pixels) for c in range(channels)]
        h, w = slices[0].shape[:2]
        bar = _colour_bar(h, ranges[f], font)
        tile = Image.new("RGB", (channels * (w + GAP) + bar.width, h + LABEL_PIXELS), "white")
        draw = ImageDraw.Draw(tile)
        for c, picture in enumerate(slices):
            tile.paste(Image.fromarray(picture), (c * (w + GAP), LABEL_PIXELS))
            label = slice_label(names, f, c, channels) if channels > 1 else names[f]
            if filters > 1 or channels > 1:
                draw.text((c * (w + GAP), LABEL_PIXELS - 2), label, "black", font, anchor="lb")
        tile.paste(bar, (channels * (w + GAP), LABEL_PIXELS))
        tiles.append(tile)
    columns = max(1, round(math.sqrt(filters / channels)))
    rows = math.ceil(filters / columns)
    tw, th = tiles[0].size
    out = Image.new("RGB", (columns * (tw + GAP) - GAP, rows * (th + GAP) - GAP), "white")
    for f, tile in enumerate(tiles):
        out.paste(tile, ((f % columns) * (tw + GAP), (f // columns) * (th + GAP)))
    return out


def value_format(limit: float) -> str:
    """A format with three significant digits at the scale of `limit`: 2 → '{:.2f}';
    below 0.01, where that needs more than four decimals, two digits in e-notation,
    which stays as narrow as the cells ('-3.2e-04', not '-0.000321')."""
    decimals = 2 - math.floor(math.log10(limit))
    return f"{{:.{max(decimals, 0)}f}}" if decimals <= 4 else "{:.1e}"


def _label(value: float, fmt: str) -> str:
    text = fmt.format(value)
    return "0" if float(text) == 0 else text  # no "-0.00"


def _cell_fontsize(panel_inches: float, cells: int, fmt: str) -> float:
    """The largest font (pt) whose widest label fills ~85 % of a cell; digits are ~0.6 em."""
    chars = len(fmt.format(-0.0))
    return panel_inches * 72 / cells * 0.85 / (0.6 * chars)


def _write_values(ax, kernel: np.ndarray, norm: Normalize, fmt: str, fontsize: float) -> list:
    """Each weight as text in its cell, black on light colours and white on dark ones."""
    cmap = colormaps[KERNEL_CMAP]
    texts = []
    for (row, col), value in np.ndenumerate(kernel):
        texts.append(
            ax.text(
                col,
                row,
                _label(value, fmt),
                ha="center",
                va="center",
                fontsize=fontsize,
                color=_text_colour(cmap(norm(value))),
            )
        )
    return texts


def _text_colour(rgba) -> str:
    luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
    return "black" if luminance > 0.5 else "white"


def _kernel_axes(ax, shape: tuple[int, int]) -> None:
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=min(max(shape), 6), integer=True))


def _as_kernel(kernel: np.ndarray) -> np.ndarray:
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim == 4 and k.shape[2:] == (1, 1):  # Conv2D weights (kh, kw, 1, 1)
        k = k[:, :, 0, 0]
    if k.ndim != 2:
        raise ValueError(f"a kernel must be 2-D, got shape {np.shape(kernel)}")
    return k


# --- 1. the kernel converging, step by step -----------------------------------------


def frame_indices(n_snapshots: int, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """0-based indices of the kernel snapshots to animate: all of them, or max_frames
    spread evenly with the first and last always kept."""
    if n_snapshots < 1:
        raise ValueError("there are no kernel snapshots to animate")
    if max_frames < 2:
        raise ValueError(f"max_frames must be at least 2, got {max_frames}")
    if n_snapshots <= max_frames:
        return np.arange(n_snapshots)
    return np.unique(np.round(np.linspace(0, n_snapshots - 1, max_frames)).astype(int))


def step_label(step: int, epoch: int, rel_error: float) -> str:
    """The learned panel's title in a frame: where in training the snapshot is."""
    when = "initial weights" if step == 0 else f"epoch {epoch}"
    return f"learned, step {step} ({when})\nkernel_rel_error {rel_error:.1e}"


def convergence_frames(
    kernels: np.ndarray,
    steps: Mapping[str, Sequence[float]],
    true_kernel: np.ndarray,
    max_frames: int = MAX_FRAMES,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Frames of the learned kernel (left) converging to the true one (right).

    kernels is (n, kh, kw), the snapshots the trainer took at log-spaced optimizer
    steps; steps the matching table (metrics/steps.csv) with each one's step, epoch
    and kernel_rel_error, which label the frames. Every frame uses the same colour
    range, ±max|true kernel|, so colours are comparable between frames (weights
    beyond it are clipped, which the colour bar's pointed ends show). Returns the
    frames as uint8 (H, W, 3) arrays, all the same size, and the step of each.
    """
    kernels = np.asarray(kernels, dtype=np.float64)
    true = _as_kernel(true_kernel)
    if kernels.ndim != 3 or kernels.shape[1:] != true.shape:
        raise ValueError(
            f"kernels must be (snapshots, {true.shape[0]}, {true.shape[1]}), got {kernels.shape}"
        )
    step, epoch, rel_errors = (
        np.asarray(steps[key]) for key in ("step", "epoch", "kernel_rel_error")
    )
    if not len(step) == len(epoch) == len(rel_errors) == len(kernels):
        raise ValueError(f"{len(step)} rows of steps for {len(kernels)} kernel snapshots")
    picked = frame_indices(len(kernels), max_frames)
    limit = symmetric_limit(true)
    norm = Normalize(-limit, limit)
    fmt = value_format(limit)

    fig = Figure(figsize=FRAME_SIZE, dpi=FRAME_DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax_learned, ax_true = fig.subplots(1, 2, sharey=True)
    style = dict(cmap=KERNEL_CMAP, norm=norm, interpolation="nearest")
    learned_image = ax_learned.imshow(kernels[picked[0]], **style)
    ax_true.imshow(true, **style)
    # the step goes in the learned panel's title, not a suptitle: then only the left
    # half of the frame changes, and the GIF stores only that. The layout is fitted
    # to the widest title, so none is clipped.
    widest = max((step_label(int(step[i]), int(epoch[i]), rel_errors[i]) for i in picked), key=len)
    title = ax_learned.set_title(widest, fontsize=10)
    ax_true.set_title("true kernel\n ", fontsize=10)
    for ax in (ax_learned, ax_true):
        _kernel_axes(ax, true.shape)
    ax_true.set_ylabel("")
    fig.colorbar(learned_image, ax=[ax_learned, ax_true], extend="both", shrink=0.9, label="weight")
    texts = []
    size = min(_cell_fontsize(FRAME_SIZE[0] * 0.33, max(true.shape), fmt), 12)
    if max(true.shape) <= MAX_LABELLED and size >= MIN_FONTSIZE:
        texts = _write_values(ax_learned, kernels[picked[0]], norm, fmt, size)
        _write_values(ax_true, true, norm, fmt, size)
    canvas.draw()
    fig.set_layout_engine("none")  # freeze the layout: the axes must not move between frames

    frames = []
    for index in picked:
        kernel = kernels[index]
        learned_image.set_data(kernel)
        for text, value in zip(texts, kernel.ravel()):
            text.set_text(_label(value, fmt))
            text.set_color(_text_colour(colormaps[KERNEL_CMAP](norm(value))))
        title.set_text(step_label(int(step[index]), int(epoch[index]), rel_errors[index]))
        canvas.draw()
        frames.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    return frames, step[picked].astype(int)


def gif_palette(cmap_colours: int = GIF_CMAP_COLOURS, grays: int = GIF_GRAYS) -> Image.Image:
    """A palette image of the kernel colormap's colours plus grays for text and axes.

    Fixed, not fitted to the frames: a fitted palette spends its colours on what
    is common, so a kernel with few negative weights came out with a grey, not
    blue, lower colour bar.
    """
    colours = np.array(colormaps[KERNEL_CMAP](np.linspace(0, 1, cmap_colours)))[:, :3]
    levels = np.linspace(0, 1, grays)[:, None].repeat(3, axis=1)
    rgb = np.round(np.vstack([colours, levels]) * 255).astype(np.uint8)
    palette = Image.new("P", (1, 1))
    palette.putpalette(rgb.ravel().tolist())
    return palette


def write_gif(
    frames: Sequence[np.ndarray],
    path: str | Path,
    seconds: float = GIF_SECONDS,
    last_frame_ms: int = LAST_FRAME_MS,
) -> None:
    """Write RGB frames as a looping GIF, the last frame held longer.

    Every frame is mapped, without dithering, onto the same gif_palette(): colours
    stay steady between frames and Pillow stores only what changed.
    """
    if not frames:
        raise ValueError("no frames to write")
    palette = gif_palette()
    indexed = [
        Image.fromarray(np.asarray(f, dtype=np.uint8)).quantize(
            palette=palette, dither=Image.Dither.NONE
        )
        for f in frames
    ]
    step_ms = int(np.clip(seconds * 1000 / len(frames), 80, 500))
    durations = [step_ms] * (len(frames) - 1) + [max(last_frame_ms, step_ms)]
    indexed[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=indexed[1:],
        duration=durations,
        loop=0,
        optimize=True,
    )


# --- 2. learned vs true -----------------------------------------------------------


def comparison(
    true_kernel: np.ndarray,
    learned_kernel: np.ndarray,
    rel_error: float | None = None,
    bias: float | None = None,
) -> Figure:
    """True | learned on one colour scale, and their difference (learned − true) on its own.

    True and learned share a range symmetric about zero, so they compare cell by
    cell. The difference is often orders of magnitude smaller (3e-8 against ±0.08),
    which on that range would be blank: it gets its own symmetric range,
    ±max|difference|, and its own colour bar. Kernels up to 5×5 have their values
    written in.
    """
    true = _as_kernel(true_kernel)
    learned = _as_kernel(learned_kernel)
    if true.shape != learned.shape:
        raise ValueError(f"true kernel {true.shape} and learned kernel {learned.shape} differ")
    difference = learned - true
    limit = symmetric_limit(true, learned)
    diff_limit = symmetric_limit(difference)
    panel = 3.0

    fig = Figure(figsize=(3 * panel + 2.4, panel + 1.0), layout="constrained")
    axes = fig.subplots(1, 3)
    largest = float(np.max(np.abs(difference)))
    panels = (
        ("true kernel", true, limit, "weight"),
        ("learned kernel", learned, limit, "weight (same scale as true)"),
        (
            f"learned − true (own scale)\nmax |difference| {largest:.1e}",
            difference,
            diff_limit,
            "learned − true",
        ),
    )
    for ax, (title, kernel, m, bar_label) in zip(axes, panels):
        norm = Normalize(-m, m)
        image = ax.imshow(kernel, cmap=KERNEL_CMAP, norm=norm, interpolation="nearest")
        ax.set_title(title)
        _kernel_axes(ax, true.shape)
        fig.colorbar(image, ax=ax, shrink=0.8, label=bar_label)
        if max(true.shape) <= MAX_LABELLED:
            fmt = value_format(m)
            size = np.clip(_cell_fontsize(panel * 0.75, max(true.shape), fmt), MIN_FONTSIZE, 12)
            _write_values(ax, kernel, norm, fmt, size)
    heading = f"{true.shape[0]}×{true.shape[1]} kernel"
    if rel_error is not None:
        heading += f": kernel_rel_error ‖w − k‖² / ‖k‖² = {rel_error:.2e}"
    if bias is not None:
        heading += f", learned bias {bias:.1e}"
    fig.suptitle(heading)
    return fig


# --- 3. one validation image through the model ------------------------------------


def target_range(target: np.ndarray) -> tuple[float, float]:
    """Display range of a target: symmetric about 0 if it has both signs (zero is mid
    grey), else its own span; 0.5 % tails clipped so a few pixels don't wash it out."""
    t = np.asarray(target, dtype=np.float64)
    low, high = np.percentile(t, [0.5, 99.5])
    if low < 0 < high:
        m = max(-low, high)
        return -m, m
    return (float(low), float(high)) if high > low else (float(low) - 1, float(low) + 1)


def sample_strip(
    grayscale: np.ndarray,
    target: np.ndarray,
    prediction: np.ndarray,
    original: np.ndarray | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    title: str | None = None,
) -> Figure:
    """[original |] grayscale input | target | prediction | residual (target − prediction).

    All panels are drawn in the input's pixel coordinates: `offset` (row, column)
    is where target pixel (0, 0)'s window is centred in the input, so a 'valid'
    target sits inside the input's frame, lined up with it. Target and prediction
    share a grey scale; the residual has its own, symmetric about zero.
    """
    gray = np.asarray(grayscale, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    if gray.ndim != 2 or target.ndim != 2 or prediction.shape != target.shape:
        raise ValueError(
            f"need a 2-D grayscale and equal 2-D target and prediction, got "
            f"{gray.shape}, {target.shape}, {prediction.shape}"
        )
    residual = target - prediction
    size = gray.shape
    top, left = offset
    input_extent = (-0.5, size[1] - 0.5, size[0] - 0.5, -0.5)
    target_extent = (
        left - 0.5,
        left + target.shape[1] - 0.5,
        top + target.shape[0] - 0.5,
        top - 0.5,
    )

    panels = 4 + (original is not None)
    fig = Figure(figsize=(3.1 * panels + 0.6, 3.9), layout="constrained")
    axes = list(fig.subplots(1, panels, sharex=True, sharey=True))
    if original is not None:
        ax = axes.pop(0)
        ax.imshow(np.asarray(original), extent=input_extent, interpolation="nearest")
        ax.set_title("original")
    ax_gray, ax_target, ax_prediction, ax_residual = axes
    image = ax_gray.imshow(gray, cmap=IMAGE_CMAP, extent=input_extent, interpolation="nearest")
    ax_gray.set_title("input: grayscale")
    fig.colorbar(image, ax=ax_gray, shrink=0.8, label="intensity")

    low, high = target_range(target)
    for ax, array, name in (
        (ax_target, target, "target: filtered"),
        (ax_prediction, prediction, "model prediction"),
    ):
        image = ax.imshow(
            array,
            cmap=IMAGE_CMAP,
            vmin=low,
            vmax=high,
            extent=target_extent,
            interpolation="nearest",
        )
        ax.set_title(name)
    fig.colorbar(
        image,
        ax=[ax_target, ax_prediction],
        shrink=0.8,
        extend="both",
        label="filter response (shared)",
    )

    limit = symmetric_limit(residual)
    image = ax_residual.imshow(
        residual,
        cmap=KERNEL_CMAP,
        vmin=-limit,
        vmax=limit,
        extent=target_extent,
        interpolation="nearest",
    )
    rms = float(np.sqrt(np.mean(residual**2)))
    target_rms = float(np.sqrt(np.mean(target**2)))
    share = f" ({rms / target_rms:.1%} of target)" if target_rms > 0 else ""
    ax_residual.set_title(f"residual: target − prediction\nRMS {rms:.2e}{share}")
    fig.colorbar(image, ax=ax_residual, shrink=0.8, label="residual")

    image_axes = fig.axes[:panels]  # the colour bars come after
    for ax in image_axes:
        ax.set_xlabel("column (input pixels)")
        ax.set_facecolor("#f0f0f0")  # what a 'valid' target does not cover
    image_axes[0].set_ylabel("row (input pixels)")
    image_axes[0].set_xlim(input_extent[:2])  # shared by all panels
    image_axes[0].set_ylim(input_extent[2:])
    if title:
        fig.suptitle(title)
    return fig


# --- 4. training curves -----------------------------------------------------------

# the per-epoch panels: (history column, title)
CURVES = (
    ("kernel_rel_error", "kernel_rel_error\n‖w − k‖² / ‖k‖²"),
    ("kernel_mse", "kernel_mse\nmean (w − k)² over the weights"),
    ("loss", "loss: training MSE\n(whitened, scaled data)"),
    ("val_loss", "val_loss: validation MSE\n(held-out whole images)"),
)


def _log_curve(ax, x: np.ndarray, values: np.ndarray, key: str) -> None:
    """values against x on a log y axis, only where positive; or a note if none is."""
    shown = np.isfinite(values) & (values > 0)
    ax.set_ylabel(key)
    ax.grid(True, which="both", alpha=0.3)
    if shown.any():
        ax.plot(x[shown], values[shown], marker="o", markersize=3)
        ax.set_yscale("log")
    else:
        ax.text(
            0.5,
            0.5,
            f"no positive {key} values",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="0.4",
        )


def curves(history: Mapping[str, Sequence[float]], steps: Mapping[str, Sequence[float]]) -> Figure:
    """kernel_rel_error at every kernel snapshot against the optimizer step (top), and
    the four per-epoch metrics against the epoch, one log-scale panel each.

    The step axis is symlog, linear up to step 1, so the initial weights at step 0
    show beside the log-spaced snapshots. loss and val_loss are in different units
    (training sees whitened, rescaled crops), so every metric gets its own axes.
    """
    epochs = np.asarray(history["epoch"], dtype=np.float64)
    step = np.asarray(steps["step"], dtype=np.float64)
    fig = Figure(figsize=(9.0, 9.0), layout="constrained")
    axes = fig.subplot_mosaic(
        [["steps", "steps"], [CURVES[0][0], CURVES[1][0]], [CURVES[2][0], CURVES[3][0]]],
        height_ratios=[1.2, 1, 1],
    )
    ax = axes["steps"]
    rel_errors = np.asarray(steps["kernel_rel_error"], dtype=np.float64)
    _log_curve(ax, step, rel_errors, "kernel_rel_error")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_xlabel("optimizer step (0, then log scale)")
    ax.set_title("kernel_rel_error at each kernel snapshot")
    for key, label in CURVES:
        ax = axes[key]
        _log_curve(ax, epochs, np.asarray(history[key], dtype=np.float64), key)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, len(epochs) + 0.5)  # whole epochs, even when there is one
        if len(epochs) <= 10:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    plural = "" if len(epochs) == 1 else "s"
    fig.suptitle(f"training history: {len(epochs)} epoch{plural}, {int(step[-1])} optimizer steps")
    return fig


# --- 5. every built-in kernel, for the README ---------------------------------------


def kernel_gallery(kernels: Mapping[str, np.ndarray], columns: int = 5) -> Figure:
    """Each kernel on its own symmetric colour scale, with its name, size and values
    (up to 3×3), so a reader sees what every `kernel:` choice looks like."""
    rows = math.ceil(len(kernels) / columns)
    fig = Figure(figsize=(2.6 * columns, 2.7 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax, (name, kernel) in zip(axes, kernels.items()):
        k = _as_kernel(kernel)
        limit = symmetric_limit(k)
        norm = Normalize(-limit, limit)
        image = ax.imshow(k, cmap=KERNEL_CMAP, norm=norm, interpolation="nearest")
        ax.set_title(f"{name} ({k.shape[0]}×{k.shape[1]})", fontsize=10)
        _kernel_axes(ax, k.shape)
        if max(k.shape) <= 3:
            _write_values(ax, k, norm, value_format(limit), 9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    for ax in axes[len(kernels) :]:
        ax.set_axis_off()
    return fig
