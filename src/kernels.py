"""The ground-truth kernels a model learns: float64 (kh, kw) for gray ones, (kh, kw, 3)
for colour ones, and a bank of them as one (kh, kw, C, F) array.

Values are written in correlation orientation: `sobel_x` responds positively to
brightness that grows to the right, exactly as a Conv2D layer (and
scipy.ndimage.correlate, cv2.filter2D) applies it. `filter.operation: convolve`
flips them; see src/filtering.py.

The non-linear filters (median, max, min, abs_sobel_x, gradient_magnitude) have no
kernel at all: they are the controls a linear layer can only approximate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from src.errors import UserError

if TYPE_CHECKING:  # src.config imports this module, so only type checkers import it back
    from src.config import KernelSettings

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
PREWITT_X = np.array([[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]], dtype=np.float64)
LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
EDGE = np.array(
    [[-1, -1], [1, 1]], dtype=np.float64
)  # the course notes' 2×2 horizontal-edge kernel

SMILEY_SIZE = 32
BANK_MAX = 64  # filters in one `kernel:` list


def colour_detector(channel: int) -> np.ndarray:
    """The course notes' 3×3×3 colour detector: +1.5 on `channel` (0 red, 1 green,
    2 blue), −1.5 on the two others."""
    k = np.full((3, 3, 3), -1.5)
    k[:, :, channel] = 1.5
    return k


def smiley(size: int = SMILEY_SIZE) -> np.ndarray:
    """A face outline, two eyes and a smile, L2-normalised like the original's PNG.

    Drawn 8× larger and box-downsampled, so strokes are anti-aliased. Strokes
    are positive on a zero background: the original read its dark-on-white PNG
    as inverted grayscale.
    """
    scale = 8
    n = size * scale
    canvas = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(canvas)
    stroke = int(1.6 * scale)
    pad = int(1.5 * scale)
    draw.ellipse([pad, pad, n - pad, n - pad], outline=255, width=stroke)
    eye_w, eye_h = int(0.09 * n), int(0.14 * n)
    for cx in (int(0.35 * n), int(0.65 * n)):
        cy = int(0.37 * n)
        draw.ellipse([cx - eye_w // 2, cy - eye_h // 2, cx + eye_w // 2, cy + eye_h // 2], fill=255)
    draw.arc(
        [int(0.27 * n), int(0.30 * n), int(0.73 * n), int(0.76 * n)],
        start=20,
        end=160,
        fill=255,
        width=stroke,
    )
    small = canvas.resize((size, size), Image.Resampling.BOX)
    k = np.asarray(small, dtype=np.float64) / 255.0
    return k / l2_norm(k)


def l2_norm(k: np.ndarray) -> float:
    """‖k‖ summed in numpy's own fixed order: np.linalg.norm is a BLAS dot, whose order
    (and so the kernel's last bits, and every target's) depends on the CPU."""
    return float(np.sqrt(np.sum(k * k)))


def box(size: int) -> np.ndarray:
    return np.full((size, size), 1.0 / size**2)


def gaussian(size: int, sigma: float | None = None, covariance: Any = None) -> np.ndarray:
    """A sampled 2-D Gaussian on a size×size grid centred on the middle, summing to 1.

    With `covariance` ([[sxx, sxy], [sxy, syy]] in pixels²) it is the correlated
    Gaussian of the course notes. The density is written out for 2×2 (what
    scipy.stats.multivariate_normal computes, up to the constant that the sum divides
    away), with exp from the C library rather than numpy's CPU-dispatched one and no
    BLAS: the same values on every machine.
    """
    if covariance is None:
        sxx = syy = float(sigma) ** 2
        sxy = 0.0
    else:
        (sxx, sxy), (_, syy) = np.asarray(covariance, dtype=np.float64).tolist()
    det = sxx * syy - sxy * sxy
    offsets = np.arange(size) - (size - 1) / 2.0
    yy, xx = np.meshgrid(offsets, offsets, indexing="ij")
    # (y, x) · inverse covariance · (y, x), the inverse of [[sxx, sxy], [sxy, syy]] written out
    quadratic = (syy * yy * yy - 2.0 * sxy * yy * xx + sxx * xx * xx) / det
    k = np.array([math.exp(-0.5 * q) for q in quadratic.ravel().tolist()]).reshape(size, size)
    return k / k.sum()


def from_file(path: str | Path) -> np.ndarray:
    """Load a kernel from .npy (no pickles), .csv, or an image read as the original read
    its smiley PNG: inverted grayscale, L2-normalised."""
    path = Path(path)
    where = f"kernel: file:{path}"
    if not path.is_file():
        raise UserError(f"{where} does not exist; give a path to a .npy, .csv or image file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            k = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            k = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
        else:
            with Image.open(path) as img:
                gray = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
            k = 1.0 - gray
            norm = l2_norm(k)
            if norm > 0:
                k = k / norm
    except (ValueError, OSError) as exc:
        raise UserError(
            f"{where} could not be read ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); "
            "save it as a (k, k) or (k, k, 3) .npy, a .csv or an image"
        ) from None
    k = np.asarray(k)
    if np.iscomplexobj(k):
        raise UserError(
            f"{where} holds complex numbers; a kernel is real: save np.real(k) if that is meant"
        )
    if k.size == 0:
        raise UserError(f"{where} is empty; it must hold a 2-D array of numbers")
    if not (k.ndim == 2 or (k.ndim == 3 and k.shape[2] == 3)):
        raise UserError(
            f"{where} has shape {k.shape}; a kernel must be (kh, kw), or (kh, kw, 3) for "
            "colour images"
        )
    if not np.issubdtype(k.dtype, np.number):
        raise UserError(f"{where} holds {k.dtype}, not numbers")
    k = k.astype(np.float64)
    if not np.all(np.isfinite(k)):
        raise UserError(f"{where} holds NaN or inf values; every value must be finite")
    if not np.any(k):
        raise UserError(f"{where} is all zeros; there is nothing to learn")
    # It is trained and saved as float32, and the kernel error divides by its ‖k‖² there:
    # values around 1e-300 would become zeros, around 1e200 inf.
    with np.errstate(over="ignore", under="ignore"):
        norm2 = np.sum(k.astype(np.float32) ** 2)
    if not np.finfo(np.float32).tiny <= norm2 < np.inf:
        raise UserError(
            f"{where}: its values are out of float32's range, in which it is trained "
            f"(largest |value| {np.abs(k).max():.3g}); scale it so that ‖k‖² is between "
            "1e-37 and 1e38"
        )
    return k


BUILTIN = {
    "sobel_x": lambda s: SOBEL_X.copy(),
    "sobel_y": lambda s: SOBEL_X.T.copy(),
    "smiley": lambda s: smiley(),
    "prewitt_x": lambda s: PREWITT_X.copy(),
    "prewitt_y": lambda s: PREWITT_X.T.copy(),
    "laplacian": lambda s: LAPLACIAN.copy(),
    "box": lambda s: box(s.box.size),
    "gaussian": lambda s: gaussian(s.gaussian.size, s.gaussian.sigma, s.gaussian.covariance),
    "edge": lambda s: EDGE.copy(),
    "red": lambda s: colour_detector(0),
    "green": lambda s: colour_detector(1),
    "blue": lambda s: colour_detector(2),
}
NAMES = tuple(BUILTIN)  # the linear built-ins: each has a true kernel
COLOUR = ("red", "green", "blue")
# Filters no linear layer can be: the layer learns size×size, the best linear approximation.
NONLINEAR = ("median", "max", "min", "abs_sobel_x", "gradient_magnitude")
RANK_FILTERS = ("median", "max", "min")  # sized by kernels.<name>.size


def is_linear(name: str) -> bool:
    return name not in NONLINEAR


def label(name: str) -> str:
    """The name a filter goes by in metrics and pictures: a file: kernel's file stem."""
    return Path(name[len("file:") :]).stem if name.startswith("file:") else name


def shape(name: str, settings: KernelSettings) -> tuple[int, int]:
    """(kh, kw) of make(name, settings), or of the layer that learns a non-linear filter,
    without building a box or Gaussian."""
    if name in RANK_FILTERS:
        side = getattr(settings, name).size
        return side, side
    if name in NONLINEAR:
        return 3, 3
    side = {"box": settings.box.size, "gaussian": settings.gaussian.size}.get(name)
    return (side, side) if side else make(name, settings).shape[:2]


def channels(name: str, settings: KernelSettings) -> int:
    """The input channels a kernel takes: 3 for a colour kernel, 1 for a gray one."""
    if name in COLOUR:
        return 3
    if name.startswith("file:"):
        k = make(name, settings)
        return k.shape[2] if k.ndim == 3 else 1
    return 1


def make(name: str, settings: KernelSettings | None = None) -> np.ndarray:
    """The kernel called `name` (a built-in, or file:<path>), as float64.

    `settings` are the validated `kernels:` of params.yaml; None means their defaults.
    """
    if settings is None:
        from src.config import KernelSettings  # here, not at the top: config imports us

        settings = KernelSettings()
    if name.startswith("file:"):
        return from_file(name[len("file:") :])
    if name in NONLINEAR:
        raise ValueError(f"{name} is a non-linear filter: it has no kernel")
    if name not in BUILTIN:
        raise UserError(
            f"kernel: unknown kernel {name!r}; choose from {', '.join(NAMES)}, or file:<path>"
        )
    return BUILTIN[name](settings)


def bank(names: tuple[str, ...], settings: KernelSettings | None = None) -> np.ndarray:
    """The (K, K', C, F) float64 bank of the linear kernels `names`, in correlation
    orientation: each one centred in the largest size and zero-padded, the odd row or
    column of a size mismatch at the bottom or right. A gray kernel has C = 1."""
    made = [make(name, settings) for name in names]
    made = [k[:, :, None] if k.ndim == 2 else k for k in made]
    if len({k.shape[2] for k in made}) > 1:
        raise ValueError("a bank's kernels must all take the same channels")
    kh = max(k.shape[0] for k in made)
    kw = max(k.shape[1] for k in made)
    out = np.zeros((kh, kw, made[0].shape[2], len(made)))
    for f, k in enumerate(made):
        top, left = (kh - k.shape[0]) // 2, (kw - k.shape[1]) // 2
        out[top : top + k.shape[0], left : left + k.shape[1], :, f] = k
    return out


def errors(learned: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """(kernel_mse, kernel_rel_error): the mean squared difference and ‖w−k‖²/‖k‖².
    Measured against the true kernel, never used to steer training."""
    learned = np.asarray(learned, dtype=np.float64).reshape(np.shape(true))
    diff = np.sum((learned - true) ** 2)
    return float(diff / true.size), float(diff / np.sum(np.asarray(true, np.float64) ** 2))
