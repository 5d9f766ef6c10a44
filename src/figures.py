"""The experiment's pictures, from arrays: the kernel converging, learned vs true vs
the closed-form least-squares kernel, one validation image through the model, and the
training curves.

Every kernel is the spec's (kh, kw, C, F): a colour kernel's three channel slices are
shown side by side on one colour range (R, G, B), a bank's filters one per row (or
tile), each named. Every function takes arrays and returns a matplotlib Figure (the
animation: its frames as uint8 arrays; kernel_image: a Pillow image); writing files is
the caller's job, except write_gif. Figures are built with matplotlib.figure.Figure,
never pyplot: no global state, no GUI backend, nothing left open. They render with Agg.

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
MAX_SAMPLE_FILTERS = 4  # the sample figure shows a bank's first filters, one row each
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


def kernel_ranges(*kernels: np.ndarray | None) -> list[tuple[float, float]] | None:
    """One fixed (−m, m) per filter for kernel_image, m = max |weight| of that filter over
    the given kernels (the true one, else the closed-form one); None if every kernel is
    None, and then each picture takes its own range."""
    if all(k is None for k in kernels):
        return None
    return [(-m, m) for m in filter_limits(*kernels)]


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


def step_label(step: int, epoch: int, rel_error: float | None = None) -> str:
    """The learned panel's title in a frame: where in training the snapshot is, and its
    kernel_rel_error when there is a true kernel (a blank second line when not, so
    the layout is the same)."""
    when = "initial weights" if step == 0 else f"epoch {epoch}"
    error = " " if rel_error is None else f"kernel_rel_error {rel_error:.1e}"
    return f"learned, step {step} ({when})\n{error}"


def _panel_inches(rows: int, columns: int, single: float) -> float:
    """The side of one kernel panel: `single` for one gray kernel, smaller for more."""
    if rows == 1 and columns <= 2:
        return single
    return float(np.clip(6.0 / max(rows, columns), 0.55, 1.4))


def _bank_axes(axes: np.ndarray, names: list[str], channels: int, shape) -> None:
    """Label a rows = filters × columns = channel-slices grid: ticks and row/column for
    one gray kernel; otherwise the channel under the bottom row and the filter's name
    on the left, no ticks."""
    if axes.shape == (1, 1) or (len(names) == 1 and channels == 1):
        for ax in axes.ravel():
            _kernel_axes(ax, shape)
        for ax in axes.ravel()[1:]:
            ax.set_ylabel("")
        return
    for (f, c), ax in np.ndenumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if f == axes.shape[0] - 1 and channels > 1:
            ax.set_xlabel(slice_label([""], 0, c % channels, channels))
        if c == 0 and len(names) > 1:
            ax.set_ylabel(names[f])


def convergence_frames(
    kernels: np.ndarray,
    steps: Mapping[str, Sequence[float]],
    reference: np.ndarray | None,
    names: Sequence[str] | None = None,
    reference_title: str = "true kernel",
    max_frames: int = MAX_FRAMES,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Frames of the learned kernel (left) converging to the reference (right).

    kernels is (n, kh, kw, C, F), the snapshots the trainer took at log-spaced
    optimizer steps; steps the matching table (metrics/steps.csv) with each one's
    step, epoch and, when there is a true kernel, kernel_rel_error, which label the
    frames. reference is the true kernel, or for a filter with none the closed-form
    one (reference_title says which), or None. Each filter is a row, its channel
    slices side by side, with its own colour range, ±max|reference| (the last
    snapshot's without one), the same in every frame so that colours compare
    (weights beyond it are clipped, which the colour bar's pointed ends show).

    The figure is drawn once; each frame then redraws only the learned panels and
    their title over the saved background. Returns the frames as uint8 (H, W, 3)
    arrays, all the same size, and the step of each.
    """
    kernels = np.asarray(kernels, dtype=np.float64)
    if kernels.ndim == 3:  # (n, kh, kw): one gray kernel
        kernels = kernels[..., None, None]
    ref = None if reference is None else as_bank(reference)
    if kernels.ndim != 5 or (ref is not None and kernels.shape[1:] != ref.shape):
        want = "(snapshots, kh, kw, C, F)" if ref is None else f"(snapshots, *{ref.shape})"
        raise ValueError(f"kernels must be {want}, got {kernels.shape}")
    step, epoch = (np.asarray(steps[key]) for key in ("step", "epoch"))
    rel_errors = np.asarray(steps["kernel_rel_error"]) if "kernel_rel_error" in steps else None
    if not len(step) == len(epoch) == len(kernels):
        raise ValueError(f"{len(step)} rows of steps for {len(kernels)} kernel snapshots")
    _, kh, kw, channels, filters = kernels.shape
    names = filter_names(names, filters)
    picked = frame_indices(len(kernels), max_frames)
    limits = filter_limits(kernels[-1] if ref is None else ref)
    norms = [Normalize(-m, m) for m in limits]
    fmts = [value_format(m) for m in limits]
    groups = 1 if ref is None else 2
    panel = _panel_inches(filters, groups * channels, 2.2)
    if filters == 1 and channels == 1:
        size = FRAME_SIZE if ref is not None else (FRAME_SIZE[0] * 0.6, FRAME_SIZE[1])
    else:
        size = (groups * channels * panel + 1.4, filters * panel + 0.9)

    def label(i: int) -> str:
        return step_label(
            int(step[i]), int(epoch[i]), None if rel_errors is None else rel_errors[i]
        )

    fig = Figure(figsize=size, dpi=FRAME_DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(filters, groups * channels, squeeze=False, sharex=True, sharey=True)
    style = dict(cmap=KERNEL_CMAP, interpolation="nearest")
    learned_images, texts = [], []
    cells = max(kh, kw)
    fontsize = min(_cell_fontsize(panel * 0.75, cells, fmts[0]), 12)
    write = cells <= MAX_LABELLED and fontsize >= MIN_FONTSIZE
    for f in range(filters):
        for c in range(channels):
            ax = axes[f, c]
            first = kernels[picked[0], :, :, c, f]
            learned_images.append(ax.imshow(first, norm=norms[f], **style))
            if write:
                texts.append(_write_values(ax, first, norms[f], fmts[f], fontsize))
            if ref is not None:
                ax_ref = axes[f, channels + c]
                ax_ref.imshow(ref[:, :, c, f], norm=norms[f], **style)
                if write:
                    _write_values(ax_ref, ref[:, :, c, f], norms[f], fmts[f], fontsize)
        bar_label = "weight" if filters == 1 else names[f]
        fig.colorbar(
            learned_images[-1], ax=list(axes[f]), extend="both", shrink=0.9, label=bar_label
        )
    # the step goes in the learned panels' title, not a suptitle: then only the left
    # half of the frame changes, and the GIF stores only that. The layout is fitted
    # to the widest title, so none is clipped.
    title = axes[0, channels // 2].set_title(max((label(i) for i in picked), key=len), fontsize=10)
    if ref is not None:
        axes[0, channels + channels // 2].set_title(f"{reference_title}\n ", fontsize=10)
    _bank_axes(axes, names, channels, (kh, kw))
    canvas.draw()
    fig.set_layout_engine("none")  # freeze the layout: the axes must not move between frames

    moving = [*learned_images, *(t for cell in texts for t in cell), title]
    for artist in moving:
        artist.set_animated(True)  # left out of canvas.draw(): the background
    canvas.draw()
    background = canvas.copy_from_bbox(fig.bbox)
    frames = []
    for index in picked:
        canvas.restore_region(background)
        for slot, image in enumerate(learned_images):
            f, c = divmod(slot, channels)
            kernel = kernels[index, :, :, c, f]
            image.set_data(kernel)
            if write:
                for text, value in zip(texts[slot], kernel.ravel()):
                    text.set_text(_label(value, fmts[f]))
                    text.set_color(_text_colour(colormaps[KERNEL_CMAP](norms[f](value))))
        title.set_text(label(index))
        for artist in moving:
            fig.draw_artist(artist)
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


# --- 2. learned vs true and the closed form ----------------------------------------


def comparison(
    learned_kernel: np.ndarray,
    true_kernel: np.ndarray | None = None,
    lstsq_kernel: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    rel_error: float | None = None,
    lstsq_rel_error: float | None = None,
    biases: Sequence[float] | None = None,
    filter_errors: Mapping[str, float] | None = None,
) -> Figure:
    """True | learned | closed-form least squares, then their differences from the truth.

    Kernels are (kh, kw, C, F); each filter's channel slice is a row. The kernels of a
    row share a range symmetric about zero, so they compare cell by cell. The
    differences are often orders of magnitude smaller (3e-8 against ±0.08), which
    on that range would be blank: they get their own symmetric range and colour bar.
    With no true kernel (a non-linear filter) the learned kernel is set beside the
    closed-form one, and the difference is learned − closed form. Kernels up to 5×5
    have their values written in. filter_errors (a bank's kernel_rel_error/<name>, by
    name) label each filter's first row.
    """
    learned = as_bank(learned_kernel)
    true = None if true_kernel is None else as_bank(true_kernel)
    lstsq = None if lstsq_kernel is None else as_bank(lstsq_kernel)
    for other, what in ((true, "true"), (lstsq, "closed-form")):
        if other is not None and other.shape != learned.shape:
            raise ValueError(f"{what} kernel {other.shape} and learned {learned.shape} differ")
    kh, kw, channels, filters = learned.shape
    names = filter_names(names, filters)
    shown = [("true kernel", true), ("learned kernel", learned)]
    shown.append(("closed-form\nleast squares", lstsq))
    shown = [(title, k) for title, k in shown if k is not None]
    if true is not None:
        diffs = [("learned − true", learned - true)]
        if lstsq is not None:
            diffs.append(("closed form − true", lstsq - true))
    elif lstsq is not None:
        diffs = [("learned − closed form", learned - lstsq)]
    else:
        diffs = []
    limits = filter_limits(*(k for _, k in shown))
    diff_limits = filter_limits(*(d for _, d in diffs)) if diffs else None
    rows, columns = channels * filters, len(shown) + len(diffs)
    panel = 3.0 if rows == 1 else float(np.clip(9.0 / rows, 1.7, 2.4))
    fig = Figure(figsize=(columns * panel + 2.6, rows * panel + 1.5), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    write = max(kh, kw) <= MAX_LABELLED
    for row in range(rows):
        f, c = divmod(row, channels)
        panels = [(t, k[:, :, c, f], limits[f]) for t, k in shown]
        panels += [(t, d[:, :, c, f], diff_limits[f]) for t, d in diffs]
        images = []
        for col, (title, kernel, m) in enumerate(panels):
            ax = axes[row, col]
            norm = Normalize(-m, m)
            images.append(ax.imshow(kernel, cmap=KERNEL_CMAP, norm=norm, interpolation="nearest"))
            if col >= len(shown):
                largest = float(np.max(np.abs(kernel)))
                head = f"{title}\n(own scale)\n" if row == 0 else ""
                ax.set_title(f"{head}max |Δ| {largest:.1e}", fontsize=9)
            elif row == 0:
                ax.set_title(title)
            if write:
                fmt = value_format(m)
                size = np.clip(_cell_fontsize(panel * 0.75, max(kh, kw), fmt), MIN_FONTSIZE, 12)
                _write_values(ax, kernel, norm, fmt, size)
            if rows == 1:
                _kernel_axes(ax, (kh, kw))
            else:
                ax.set_xticks([])
                ax.set_yticks([])
        if rows > 1:
            label = slice_label(names, f, c, channels)
            error = (filter_errors or {}).get(names[f]) if filters > 1 and c == 0 else None
            if error is not None:
                label += f"\nkernel_rel_error {error:.1e}"
            axes[row, 0].set_ylabel(label)
        fig.colorbar(images[0], ax=list(axes[row, : len(shown)]), shrink=0.8, label="weight")
        if diffs:
            fig.colorbar(
                images[-1], ax=list(axes[row, len(shown) :]), shrink=0.8, label="difference"
            )
    heading = f"{kh}×{kw} kernel"
    if channels > 1:
        heading += f", {channels} channels"
    if filters > 1:
        heading += f", a bank of {filters}"
    if rel_error is not None:
        heading += f"\nkernel_rel_error ‖w − k‖² / ‖k‖² = {rel_error:.2e}"
    if lstsq_rel_error is not None:
        heading += f", closed form {lstsq_rel_error:.2e}"
    if biases is not None and len(biases) <= 4:
        heading += ", learned bias " + ", ".join(f"{b:.1e}" for b in biases)
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
    image: np.ndarray,
    target: np.ndarray,
    prediction: np.ndarray,
    original: np.ndarray | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    title: str | None = None,
    names: Sequence[str] | None = None,
) -> Figure:
    """[original |] input | target | prediction | residual (target − prediction).

    image is (H, W) or (H, W, 1) grayscale, or (H, W, 3) RGB; target and prediction
    (H', W') or (H', W', F): a bank's filters are rows (the first MAX_SAMPLE_FILTERS),
    the input on the first. All panels are drawn in the input's pixel coordinates:
    `offset` (row, column) is where target pixel (0, 0)'s window is centred in the
    input, so a 'valid' target sits inside the input's frame, lined up with it.
    Target and prediction share a grey scale; the residual has its own, symmetric
    about zero.
    """
    picture = np.asarray(image, dtype=np.float64)
    if picture.ndim == 3 and picture.shape[2] == 1:
        picture = picture[..., 0]
    target = np.asarray(target, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    if target.ndim == 2:
        target, prediction = target[..., None], prediction[..., None]
    if picture.ndim not in (2, 3) or target.ndim != 3 or prediction.shape != target.shape:
        raise ValueError(
            f"need an (H, W[, C]) input and equal (H', W'[, F]) target and prediction, got "
            f"{picture.shape}, {target.shape}, {prediction.shape}"
        )
    filters = target.shape[2]
    names = filter_names(names, filters)
    rows = min(filters, MAX_SAMPLE_FILTERS)
    size = picture.shape[:2]
    top, left = offset
    input_extent = (-0.5, size[1] - 0.5, size[0] - 0.5, -0.5)
    target_extent = (
        left - 0.5,
        left + target.shape[1] - 0.5,
        top + target.shape[0] - 0.5,
        top - 0.5,
    )

    columns = 4 + (original is not None)
    fig = Figure(figsize=(3.1 * columns + 0.6, 3.4 * rows + 0.5), layout="constrained")
    grid = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    first = 0
    if original is not None:
        grid[0, 0].imshow(np.asarray(original), extent=input_extent, interpolation="nearest")
        grid[0, 0].set_title("original")
        first = 1
    ax_input = grid[0, first]
    if picture.ndim == 3:  # colour: shown as it is, no colour bar
        ax_input.imshow(np.clip(picture, 0, 1), extent=input_extent, interpolation="nearest")
        ax_input.set_title("input: RGB")
    else:
        shown = ax_input.imshow(
            picture, cmap=IMAGE_CMAP, extent=input_extent, interpolation="nearest"
        )
        ax_input.set_title("input: grayscale")
        fig.colorbar(shown, ax=ax_input, shrink=0.8, label="intensity")
    for ax in grid[1:, : first + 1].ravel():
        ax.set_axis_off()

    for row in range(rows):
        ax_target, ax_prediction, ax_residual = grid[row, first + 1 :]
        t, p = target[..., row], prediction[..., row]
        low, high = target_range(t)
        for ax, array, name in (
            (ax_target, t, "target: filtered" if filters == 1 else f"target: {names[row]}"),
            (ax_prediction, p, "model prediction"),
        ):
            shown = ax.imshow(
                array,
                cmap=IMAGE_CMAP,
                vmin=low,
                vmax=high,
                extent=target_extent,
                interpolation="nearest",
            )
            ax.set_title(name)
        fig.colorbar(
            shown,
            ax=[ax_target, ax_prediction],
            shrink=0.8,
            extend="both",
            label="filter response (shared)",
        )
        residual = t - p
        limit = symmetric_limit(residual)
        shown = ax_residual.imshow(
            residual,
            cmap=KERNEL_CMAP,
            vmin=-limit,
            vmax=limit,
            extent=target_extent,
            interpolation="nearest",
        )
        rms = float(np.sqrt(np.mean(residual**2)))
        target_rms = float(np.sqrt(np.mean(t**2)))
        share = f" ({rms / target_rms:.1%} of target)" if target_rms > 0 else ""
        ax_residual.set_title(f"residual: target − prediction\nRMS {rms:.2e}{share}")
        fig.colorbar(shown, ax=ax_residual, shrink=0.8, label="residual")

    for ax in grid.ravel():
        ax.set_facecolor("#f0f0f0")  # what a 'valid' target does not cover
    for ax in grid[-1]:
        ax.set_xlabel("column (input pixels)")
    for ax in [grid[0, 0], *grid[1:, first + 1]]:  # the first panel of each row
        ax.set_ylabel("row (input pixels)")
    grid[0, 0].set_xlim(input_extent[:2])  # shared by all panels
    grid[0, 0].set_ylim(input_extent[2:])
    heading = title or ""
    if filters > rows:
        heading += f" (the first {rows} of {filters} filters)"
    if heading:
        fig.suptitle(heading.strip())
    return fig


# --- 4. training curves -----------------------------------------------------------

# the per-epoch panels: (title, y label, history columns drawn, the closed form's key
# in train.json); a panel is drawn when its first column is in the history
PANELS = (
    (
        "kernel_rel_error ‖w − k‖² / ‖k‖²",
        "kernel_rel_error",
        ("kernel_rel_error",),
        "lstsq_kernel_rel_error",
    ),
    (
        "kernel_mse: mean (w − k)² over the weights",
        "kernel_mse",
        ("kernel_mse",),
        "lstsq_kernel_mse",
    ),
    (
        "loss and val_loss: MSE of whole images",
        "mean squared error",
        ("loss", "val_loss"),
        "lstsq_val_loss",
    ),
    (
        "explained_variance R² of the validation images",
        "1 − R²",
        ("explained_variance",),
        "lstsq_explained_variance",
    ),
    ("crop_loss: the training batches' loss", "crop_loss", ("crop_loss",), None),
    (
        "newton_step: the stopping rule's measure",
        "newton_step",
        ("newton_step", "standard_error"),
        None,
    ),
)
UNEXPLAINED = {"explained_variance", "lstsq_explained_variance"}  # drawn as 1 − R², on log axes
REFERENCE_STYLE = dict(color="0.25", linestyle="--", linewidth=1.2)


def _column(table: Mapping[str, Sequence[float]], key: str) -> np.ndarray:
    values = np.asarray(table[key], dtype=np.float64)
    return 1.0 - values if key in UNEXPLAINED else values


def _log_lines(ax, x: np.ndarray, lines: Mapping[str, np.ndarray], what: str) -> bool:
    """Each line against x on a log y axis, only where positive; a note if none is."""
    ax.grid(True, which="both", alpha=0.3)
    drawn = False
    for label, values in lines.items():
        shown = np.isfinite(values) & (values > 0)
        if shown.any():
            ax.plot(x[shown], values[shown], marker="o", markersize=3, label=label)
            drawn = True
    if drawn:
        ax.set_yscale("log")
    else:
        ax.text(
            0.5,
            0.5,
            f"no positive {what} values",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="0.4",
        )
    return drawn


def _reference_line(ax, value, label: str) -> None:
    """The closed-form least-squares value as a dashed horizontal line, if it is > 0."""
    if value is not None and np.isfinite(value) and value > 0:
        ax.axhline(value, label=label, **REFERENCE_STYLE)
        ax.set_yscale("log")


def _per_filter(table: Mapping[str, Sequence[float]], key: str) -> list[str]:
    return [k for k in table if k.startswith(f"{key}/")]


def curves(
    history: Mapping[str, Sequence[float]],
    steps: Mapping[str, Sequence[float]],
    final: Mapping[str, float] | None = None,
) -> Figure:
    """kernel_rel_error at every kernel snapshot against the optimizer step (top), and
    the per-epoch metrics against the epoch, one log-scale panel each.

    Only what the history holds is drawn: a filter with no true kernel has no kernel
    columns, so no kernel panels. A bank's kernel_rel_error/<name> columns are lines
    beside the overall one. `final` is metrics/train.json: its closed-form numbers
    (lstsq_val_loss, lstsq_kernel_rel_error, ...) are dashed reference lines. R² is
    drawn as 1 − R², which a log axis can show near 1. The step axis is symlog,
    linear up to step 1, so the initial weights at step 0 show beside the
    log-spaced snapshots.
    """
    final = final or {}
    epochs = np.asarray(history["epoch"], dtype=np.float64)
    step = np.asarray(steps["step"], dtype=np.float64)
    panels = [p for p in PANELS if p[2][0] in history]
    by_step = "kernel_rel_error" in steps
    rows = [["steps", "steps"]] if by_step else []
    keys = [p[1] for p in panels] + ([""] if len(panels) % 2 else [])
    rows += [keys[i : i + 2] for i in range(0, len(keys), 2)]
    fig = Figure(figsize=(9.5, 3.0 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplot_mosaic(rows, empty_sentinel="")
    closed_form = "closed-form least squares"
    if by_step:
        ax = axes["steps"]
        keys = ["kernel_rel_error", *_per_filter(steps, "kernel_rel_error")]
        _log_lines(ax, step, {k: _column(steps, k) for k in keys}, "kernel_rel_error")
        _reference_line(ax, final.get("lstsq_kernel_rel_error"), closed_form)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
        ax.set_xlabel("optimizer step (0, then log scale)")
        ax.set_ylabel("kernel_rel_error")
        ax.set_title("kernel_rel_error at each kernel snapshot")
    for title, ylabel, columns, reference in panels:
        ax = axes[ylabel]
        keys = [c for c in columns if c in history]
        if columns[0] == "kernel_rel_error":
            keys += _per_filter(history, "kernel_rel_error")
        lines = {(f"1 − {k}" if k in UNEXPLAINED else k): _column(history, k) for k in keys}
        _log_lines(ax, epochs, lines, ylabel)
        if reference is not None:
            value = final.get(reference)
            value = None if value is None else float(_column({reference: [value]}, reference)[0])
            _reference_line(ax, value, closed_form)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, len(epochs) + 0.5)  # whole epochs, even when there is one
        if len(epochs) <= 10:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.values():
        if len(ax.get_legend_handles_labels()[1]) > 1:
            ax.legend(fontsize=8)
    plural = "" if len(epochs) == 1 else "s"
    heading = f"training history: {len(epochs)} epoch{plural}, {int(step[-1])} optimizer steps"
    if final.get("stop_reason"):
        heading += f", stopped: {final['stop_reason']}"
    fig.suptitle(heading)
    return fig


# --- 5. every built-in kernel, for the README ---------------------------------------


def kernel_gallery(kernels: Mapping[str, np.ndarray | str], columns: int = 6) -> Figure:
    """Each kernel on its own symmetric colour scale, with its name, size and values
    (up to 3×3), so a reader sees what every `kernel:` choice looks like.

    A kernel is (k, k), or (k, k, 3) for colour, whose three channel slices sit side
    by side on one scale, labelled R, G, B. A string instead of an array is a filter
    with no kernel (median, ...): a panel that says so.
    """
    cells = []  # per kernel: its panels (title, 2-D slice or a note, colour limit)
    for name, kernel in kernels.items():
        if isinstance(kernel, str):
            cells.append([(name, kernel, None)])
            continue
        k = np.asarray(kernel, dtype=np.float64)
        k = k.reshape(k.shape[:2] + (-1,))  # (k, k), (k, k, C) or (k, k, C, 1)
        limit = symmetric_limit(k)
        size = f"{k.shape[0]}×{k.shape[1]}"
        if k.shape[2] == 1:
            cells.append([(f"{name} ({size})", k[:, :, 0], limit)])
        else:
            cells.append(
                [
                    (f"{name} {slice_label([name], 0, c, k.shape[2])} ({size})", k[:, :, c], limit)
                    for c in range(k.shape[2])
                ]
            )
    placed, row = [], []  # a colour kernel's slices stay on one row
    for group in cells:
        if len(row) + len(group) > columns:
            placed.append(row)
            row = []
        row += group
    placed.append(row)
    fig = Figure(figsize=(2.4 * columns, 2.6 * len(placed)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(placed), columns, squeeze=False))
    for r, row in enumerate(placed):
        for ax, (title, k, limit) in zip(axes[r], row):
            if isinstance(k, str):
                ax.text(0.5, 0.5, k, ha="center", va="center", fontsize=9, color="0.3")
                ax.set_title(title, fontsize=10)
                ax.set_axis_off()
                continue
            norm = Normalize(-limit, limit)
            image = ax.imshow(k, cmap=KERNEL_CMAP, norm=norm, interpolation="nearest")
            ax.set_title(title, fontsize=10)
            _kernel_axes(ax, k.shape)
            if max(k.shape) <= 3:
                _write_values(ax, k, norm, value_format(limit), 9)
            fig.colorbar(image, ax=ax, shrink=0.8)
        for ax in axes[r, len(row) :]:
            ax.set_axis_off()
    return fig
