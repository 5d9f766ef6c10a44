"""Seeded synthetic "natural" colour images: the dead-leaves model.

Opaque leaves (discs, ellipses and rectangles at random angles) fall on the
image one after another and hide what lies beneath. Leaf radii follow
p(r) ∝ r^-3 between R_MIN and R_MAX, the scale-invariant law that gives the
≈1/f² power spectrum and the sharp occluding edges of photographs, so a
filter learned on them behaves as it would on real scenes.

Leaves are sampled front to back, in rounds, until the canvas is covered:
exactly the view from above, with no background showing. After the first
round only the leaves that can still be seen are drawn. Pillow draws them;
edges are pixel-sharp, or anti-aliased with SUPERSAMPLE = 2 (draw at 2× and
box-reduce) at about 1.5× the time.

Image i depends only on (seed, i): any subset of images, in any order or count,
comes out identical.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from src import streams

R_MIN = 2.0  # smallest leaf radius, in output pixels
R_MAX_FRACTION = 0.4  # largest leaf radius, as a share of the image side
ASPECT_MAX = 3.0  # ellipses and rectangles are up to 3× longer than wide
DISC, ELLIPSE, RECTANGLE = 0, 1, 2
KIND_P = (0.5, 0.25, 0.25)
SHAPED_R_MIN = 4.0  # smaller leaves are all discs: under 8 px across, the pixel grid
# blurs their outline, and a disc is the cheapest shape to fill
SUPERSAMPLE = 1  # 2 anti-aliases edges, but misses ~100 images/s on one core
# Mean layers of leaves sampled per round. Small early rounds let later ones skip
# the many leaves that would be hidden. After all 12 layers a few images in a
# hundred still have an open pixel or two; a flat leaf under everything fills them.
ROUND_COVERAGE = (1.5, 2.5, 8.0)
TILE = 2 * SUPERSAMPLE  # canvas px per tile side when looking for gaps; at most 16, so
# one open pixel still pulls a tile's mean alpha below 255

# Ellipses are drawn as polygons whose vertex count grows with the long half-axis
# (canvas px), so the outline stays within ~1/3 px of the true ellipse
# while small ones, the vast majority, stay cheap to fill.
_ELLIPSE_SIDES = ((4.0, 8), (10.0, 12), (25.0, 20), (60.0, 32), (150.0, 48), (np.inf, 80))
_UNIT_ELLIPSES = [
    np.stack([np.cos(t), np.sin(t)], axis=1)
    for t in (np.linspace(0, 2 * np.pi, sides, endpoint=False) for _, sides in _ELLIPSE_SIDES)
]
_UNIT_RECTANGLE = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
# The furthest any leaf of radius r reaches from its centre, over all shapes and angles.
_REACH_MAX = max(np.sqrt(ASPECT_MAX), np.sqrt(np.pi / 4 * (ASPECT_MAX + 1 / ASPECT_MAX)))


def leaf_radii(rng: np.random.Generator, n: int, r_min: float, r_max: float) -> np.ndarray:
    """n radii drawn from p(r) ∝ r^-3 on [r_min, r_max], by inverting its CDF."""
    lo, hi = r_min**-2, r_max**-2
    # 1/sqrt, not ** -0.5: numpy's power is CPU-dispatched (its last bits differ between
    # AVX2 and AVX-512 machines); sqrt and division are exact IEEE operations everywhere
    return 1.0 / np.sqrt(lo - rng.random(n) * (lo - hi))


def mean_leaf_area(r_min: float, r_max: float) -> float:
    """E[π r²] under p(r) ∝ r^-3 on [r_min, r_max]."""
    return np.pi * 2 * math.log(r_max / r_min) / (r_min**-2 - r_max**-2)


def leaf_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n RGB colours as ints in 0-255, muted around a random brightness.

    Surfaces in a scene differ more in brightness than in hue; luma still spans 0-255.
    """
    brightness = rng.random((n, 1))
    return np.round(255 * (0.6 * brightness + 0.4 * rng.random((n, 3)))).astype(int)


def sample_leaves(
    rng: np.random.Generator, n: int, size: int, open_tiles: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Up to n leaves, front first, in output pixels: kind, centre (x, y), half-axes
    (long first), reach (half-side of a bounding box), angle and colour.

    Centres are uniform over the canvas grown by R_MAX, so a leaf that pokes in
    from outside is as likely as one inside; leaves that miss the canvas, or that
    reach no tile in `open_tiles` (and so lie wholly behind what is drawn), are dropped.
    """
    r_max = R_MAX_FRACTION * size
    r = leaf_radii(rng, n, R_MIN, r_max)
    centre = rng.uniform(-r_max, size + r_max, (n, 2))
    # Only leaves that could reach the canvas at any shape and angle get drawn the rest
    # of their features. Nothing after this depends on what the canvas holds, so which
    # leaves are later skipped as hidden never shifts the random stream, nor the image.
    near = np.flatnonzero(
        np.all(np.abs(centre - size / 2) < size / 2 + _REACH_MAX * r[:, None], axis=1)
    )
    r, centre, m = r[near], centre[near], len(near)
    kind = np.searchsorted(np.cumsum(KIND_P)[:-1], rng.random(m), side="right")
    kind[r < SHAPED_R_MIN] = DISC
    # long/short axis up to ASPECT_MAX; the C library's exp, not numpy's CPU-dispatched one
    stretch = np.array([math.exp(u) for u in rng.uniform(0, math.log(ASPECT_MAX) / 2, m).tolist()])
    stretch[kind == DISC] = 1.0
    angle = rng.uniform(0, np.pi, m)
    colour = leaf_colours(rng, m)
    half = np.stack([r * stretch, r / stretch], axis=1)
    half[kind == RECTANGLE] *= np.sqrt(np.pi) / 2  # every leaf has the area of the disc of radius r
    # Half-side of the box that holds the leaf at any angle: a rectangle's corner reaches furthest.
    reach = np.where(kind == RECTANGLE, np.hypot(half[:, 0], half[:, 1]), half[:, 0])
    keep = np.flatnonzero(np.all(np.abs(centre - size / 2) < size / 2 + reach[:, None], axis=1))
    if open_tiles is not None:
        keep = keep[_reaches(centre[keep], reach[keep], open_tiles)]
    return {
        "kind": kind[keep],
        "centre": centre[keep],
        "half": half[keep],
        "reach": reach[keep],
        "angle": angle[keep],
        "colour": colour[keep],
    }


def _reaches(centre: np.ndarray, reach: np.ndarray, open_tiles: np.ndarray) -> np.ndarray:
    """Whether each bounding box overlaps a True tile, by a summed-area table."""
    tiles = open_tiles.shape[0]
    table = np.zeros((tiles + 1, tiles + 1), dtype=np.int32)
    table[1:, 1:] = open_tiles.cumsum(0).cumsum(1)
    # In canvas pixels, grown by one: Pillow fills the pixel at the far edge too.
    low = (centre - reach[:, None]) * SUPERSAMPLE - 1
    high = (centre + reach[:, None]) * SUPERSAMPLE + 1
    lo = np.clip(np.floor(low / TILE), 0, tiles).astype(int)
    hi = np.clip(np.floor(high / TILE) + 1, 0, tiles).astype(int)
    (x0, y0), (x1, y1) = lo.T, hi.T
    return (table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]) > 0


def outlines(leaves: dict[str, np.ndarray], scale: float) -> list[list[float]]:
    """Per leaf, Pillow coordinates at `scale`: a bounding box for a disc, a flat
    vertex list [x0, y0, x1, y1, …] for an ellipse or a rotated rectangle."""
    kind, centre, half = leaves["kind"], leaves["centre"] * scale, leaves["half"] * scale
    coords: list = [None] * len(kind)
    discs = np.flatnonzero(kind == DISC)
    boxes = np.concatenate([centre[discs] - half[discs], centre[discs] + half[discs]], axis=1)
    for i, box in zip(discs.tolist(), boxes.tolist()):
        coords[i] = box
    long_axis = half[:, 0]
    ellipse_class = np.searchsorted(
        [largest for largest, _ in _ELLIPSE_SIDES], long_axis, side="right"
    )
    groups = [(ellipse_class == c) & (kind == ELLIPSE) for c in range(len(_ELLIPSE_SIDES))]
    for mask, unit in zip(groups + [kind == RECTANGLE], _UNIT_ELLIPSES + [_UNIT_RECTANGLE]):
        idx = np.flatnonzero(mask)
        if not len(idx):
            continue
        local = unit[None] * half[idx, None, :]
        cos, sin = np.cos(leaves["angle"][idx])[:, None], np.sin(leaves["angle"][idx])[:, None]
        x = local[..., 0] * cos - local[..., 1] * sin + centre[idx, 0, None]
        y = local[..., 0] * sin + local[..., 1] * cos + centre[idx, 1, None]
        flat = np.stack([x, y], axis=2).reshape(len(idx), 2 * len(unit))
        for i, xy in zip(idx.tolist(), flat.tolist()):
            coords[i] = xy
    return coords


def draw_leaves(leaves: dict[str, np.ndarray], side: int, scale: float) -> Image.Image:
    """The leaves on a transparent side×side RGBA layer, back first so the front-most
    ends on top. Pixels are replaced, not blended: alpha is exactly 0 or 255."""
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    rgba = np.concatenate([leaves["colour"], np.full((len(leaves["colour"]), 1), 255)], axis=1)
    fills = list(map(tuple, rgba[::-1].tolist()))
    for kind, xy, fill in zip(leaves["kind"][::-1].tolist(), outlines(leaves, scale)[::-1], fills):
        if kind == DISC:
            draw.ellipse(xy, fill=fill)
        else:
            draw.polygon(xy, fill=fill)
    return layer


def render(index: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """Dead-leaves image number `index` of `seed`, as uint8 size×size×3."""
    rng = np.random.default_rng([seed, streams.LEAVES, index])
    side = size * SUPERSAMPLE
    # Leaves sampled over the grown canvas per mean layer over each pixel.
    r_max = R_MAX_FRACTION * size
    per_layer = (size + 2 * r_max) ** 2 / mean_leaf_area(R_MIN, r_max)
    canvas, open_tiles = None, None
    for coverage in ROUND_COVERAGE:
        leaves = sample_leaves(rng, int(coverage * per_layer), size, open_tiles)
        layer = draw_leaves(leaves, side, SUPERSAMPLE)
        if canvas is not None:
            layer.paste(canvas, (0, 0), canvas)  # what is drawn so far lies in front
        canvas = layer
        # A tile's mean alpha is below 255 if any one of its pixels is still open.
        open_tiles = np.asarray(canvas.getchannel("A").reduce(TILE)) < 255
        if not open_tiles.any():
            break
    else:
        floor = Image.new("RGBA", (side, side), (*leaf_colours(rng, 1)[0].tolist(), 255))
        floor.paste(canvas, (0, 0), canvas)
        canvas = floor
    return np.asarray(canvas.convert("RGB").reduce(SUPERSAMPLE))
