"""Decode user images to float arrays, convert colour to grayscale, fit to a square.

read_image turns any JPEG, PNG, TIFF, BMP, WebP or GIF Pillow can open into
float32 in [0, 1]: HxW for grayscale modes, HxWx3 for colour ones, with the EXIF
orientation applied, so a portrait photo is upright. A file that cannot be decoded raises
BadImage with a one-line reason, which the grayscale stage counts and skips.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from src.errors import UserError

# A GIF, animated or not, is read as its first frame, as any multi-frame file is.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")

# ITU-R BT.601 luma, the weights of Pillow's convert("L") and of OpenCV.
LUMA_WEIGHTS = (np.float32(0.299), np.float32(0.587), np.float32(0.114))

# Pillow has no one error type for a broken file: each decoder raises its own.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


class BadImage(UserError):
    """A file that is not a readable image; the message says why."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _pixels(img: Image.Image) -> np.ndarray:
    """float32 in [0, 1], HxW or HxWx3, from a decoded image of any mode."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img, dtype=np.float32) / 65535.0
    if mode == "I":
        # 32-bit integer images come from 16-bit files on older Pillows; read them as 16-bit.
        return np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if mode == "F":
        values = np.array(img, dtype=np.float32)  # a copy: the buffer Pillow lends is read-only
        if not np.all(np.isfinite(values)):
            raise ValueError("holds NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            # Float data has no agreed range: stretch it to [0, 1] rather than clip it away.
            values = (values - low) / (high - low) if high > low else np.zeros_like(values)
        return values
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        # Transparent pixels are shown on white, as a browser or viewer shows them.
        base = "RGB" if img.mode.startswith("RGB") else "L"
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        canvas.alpha_composite(img.convert("RGBA"))
        img = canvas.convert(base)
    if img.mode == "1":
        img = img.convert("L")
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    return np.asarray(img, dtype=np.float32) / 255.0


MIN_SIDE = 32  # the smiley, the largest built-in kernel


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to float32 in [0, 1]: HxW (grayscale) or HxWx3 (colour).

    EXIF orientation is applied. Alpha is composited onto white. 16-bit images
    are divided by 65535. A multi-frame file gives its first frame. Raises
    BadImage for an empty, truncated or non-image file and for a decompression
    bomb (more than Image.MAX_IMAGE_PIXELS pixels).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage(f"{path.name}: empty file (0 bytes)")
        with warnings.catch_warnings():
            # Past MAX_IMAGE_PIXELS Pillow only warns; a bomb must be refused, not decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                try:
                    ImageOps.exif_transpose(img, in_place=True)
                except _DECODE_ERRORS:
                    pass  # a broken EXIF block should not cost a readable photo: keep it as stored
                return _pixels(img)
    except Image.UnidentifiedImageError:
        raise BadImage(f"{path.name}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(
            f"{path.name}: refused as a decompression bomb ({_first_line(exc)})"
        ) from None
    except _DECODE_ERRORS as exc:
        raise BadImage(f"{path.name}: cannot be read ({_first_line(exc)})") from None


def luma(image: np.ndarray) -> np.ndarray:
    """Grayscale HxW float32 of an HxWx3 colour image (BT.601); HxW passes through."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        return image
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected HxW or HxWx3, got shape {image.shape}")
    # Elementwise, in a fixed order: a matmul (`image @ weights`) goes through BLAS, whose
    # summation order, and so its last bits, differ by CPU; the stage's bytes must not.
    r, g, b = LUMA_WEIGHTS
    gray = image[..., 0] * r
    gray += image[..., 1] * g
    gray += image[..., 2] * b
    return np.clip(gray, 0.0, 1.0)


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Each factor×factor block of an (…, H, W, C) array replaced by its mean, in float64.

    The block's pixels are added in one fixed order, elementwise (no reduction whose
    order numpy or the CPU chooses), and factor² is a power of two, so the mean is exact
    division: the same bytes on every machine.
    """
    if factor == 1:
        return np.asarray(image, dtype=np.float64)
    height, width = image.shape[-3], image.shape[-2]
    if height % factor or width % factor:
        raise ValueError(f"{height}×{width} is not a whole number of {factor}×{factor} blocks")
    total = np.zeros((*image.shape[:-3], height // factor, width // factor, image.shape[-1]))
    for dy in range(factor):
        for dx in range(factor):
            total += image[..., dy::factor, dx::factor, :]
    total *= 1.0 / factor**2
    return total


def centre_crop(image: np.ndarray) -> np.ndarray:
    """The largest centred square of an HxW or HxWx3 image."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top : top + side, left : left + side]


def fit(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then resize to size×size: float32, HxW or HxWx3 in, same out.

    Resizing is Lanczos on float ("F" mode) planes, antialiased when shrinking;
    its slight ringing at edges is clipped back into [0, 1]. An image that is
    already size×size is returned unresampled.
    """
    square = centre_crop(np.asarray(image, dtype=np.float32))
    if square.shape[0] == size:
        return np.ascontiguousarray(square)
    if square.ndim == 2:
        plane = Image.fromarray(square, mode="F").resize((size, size), Image.Resampling.LANCZOS)
        return np.clip(np.asarray(plane, dtype=np.float32), 0.0, 1.0)
    return np.stack([fit(square[..., c], size) for c in range(square.shape[2])], axis=2)


def read_fitted(path: str | Path, size: int, channels: int = 1) -> np.ndarray:
    """The (size, size, channels) float32 image of a file, as the grayscale stage stores
    it: its luma for 1 channel, its RGB for 3 (a grayscale file gives three equal planes).

    Images under MIN_SIDE pixels on a side are BadImage: smaller than the largest
    built-in kernel, resizing them up would invent the detail a kernel learns from.
    """
    image = read_image(path)
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise BadImage(
            f"{Path(path).name} is {width}×{height} px, smaller than {MIN_SIDE} px "
            "(the 32×32 smiley kernel) on a side; use larger photos"
        )
    if channels == 1:
        return fit(luma(image), size)[..., None]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return fit(image, size)


def read_gray_fitted(path: str | Path, size: int) -> np.ndarray:
    """The size×size float32 grayscale of an image file (read_fitted's one channel)."""
    return read_fitted(path, size, 1)[..., 0]


def read_rgb_fitted(path: str | Path, size: int) -> np.ndarray:
    """The size×size×3 float32 colour image at the same crop as read_gray_fitted,
    for showing the original next to its grayscale; a grayscale file gives three equal planes."""
    image = read_image(path)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return fit(image, size)
