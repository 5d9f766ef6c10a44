"""Make the targets: grayscale images filtered with the true kernel, as a Conv2D would.

A Conv2D layer computes cross-correlation. So everything here is a correlation
with the *Conv2D kernel*: the true kernel itself for `correlate`, the true kernel
flipped in both axes for `convolve` (mathematical convolution, as
scipy.signal.convolve2d and the course notes define it). That flipped array is
exactly what a trained model should end up holding.

'valid' keeps only the pixels where the kernel fits inside the image; 'same'
zero-pads first, split exactly as TensorFlow/Keras split it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import ndimage, signal

from src.config import OPERATIONS, PADDINGS
from src.padding import same_padding

METHODS = ("auto", "direct", "fft")

# Above this many kernel taps FFT beats direct correlation. Measured on 64×256×256
# float64 blocks: direct 59 ms vs FFT 92 ms at 5×5, even at 7×7, FFT 4× faster at 15×15
# and 25× faster for the 32×32 smiley. At a tie direct wins: it has no FFT round-off.
DIRECT_MAX_TAPS = 49

CHUNK = 64  # images per block: memory stays flat however many images there are


def conv2d_kernel(kernel: np.ndarray, operation: str) -> np.ndarray:
    """The kernel a Conv2D (a cross-correlation) must hold to reproduce `operation`."""
    kernel = np.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be 2-D, got shape {kernel.shape}")
    if operation == "correlate":
        return kernel.copy()
    if operation == "convolve":
        return kernel[::-1, ::-1].copy()
    raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")


def output_shape(
    height: int, width: int, kernel_shape: tuple[int, int], padding: str
) -> tuple[int, int]:
    """(H', W') of one target: the image's own for 'same', H-kh+1 × W-kw+1 for 'valid'."""
    if padding == "same":
        return height, width
    if padding == "valid":
        kh, kw = kernel_shape
        return height - kh + 1, width - kw + 1
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def correlate(
    images: np.ndarray, conv_kernel: np.ndarray, padding: str, method: str = "auto"
) -> np.ndarray:
    """Cross-correlate each (H, W) image of an (N, H, W) batch with `conv_kernel`.

    Returns float32 targets of shape (N, H', W'), computed in float64. `method`
    'auto' picks direct correlation for kernels up to DIRECT_MAX_TAPS taps and
    FFT above; 'direct' and 'fft' force one (they agree to ~1e-12).
    """
    images = np.asarray(images)
    k = np.asarray(conv_kernel, dtype=np.float64)
    if images.ndim != 3:
        raise ValueError(f"images must be an (N, H, W) batch, got shape {images.shape}")
    if k.ndim != 2:
        raise ValueError(f"kernel must be 2-D, got shape {k.shape}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    kh, kw = k.shape
    out_h, out_w = output_shape(images.shape[1], images.shape[2], k.shape, padding)
    if padding == "valid" and (out_h < 1 or out_w < 1):
        raise ValueError(
            f"a {kh}×{kw} kernel does not fit in {images.shape[1]}×"
            f"{images.shape[2]} images with 'valid' padding"
        )

    x = images.astype(np.float64)
    if padding == "same":
        x = np.pad(x, ((0, 0), *same_padding(kh, kw)))
    if method == "auto":
        method = "direct" if kh * kw <= DIRECT_MAX_TAPS else "fft"
    if method == "direct":
        full = ndimage.correlate(x, k[None], mode="constant")
        # ndimage centres the kernel at k//2; the 'valid' block starts there
        out = full[:, kh // 2 : kh // 2 + out_h, kw // 2 : kw // 2 + out_w]
    else:
        # correlation is convolution with the flipped kernel
        out = signal.fftconvolve(x, k[None, ::-1, ::-1], mode="valid", axes=(1, 2))
    return out.astype(np.float32)


def predict(images: np.ndarray, conv_kernel: np.ndarray, bias: float, padding: str) -> np.ndarray:
    """What the trained layer outputs for an (N, H, W) batch: the correlation with its
    kernel plus its bias, float32. Computed here, not by Keras, so that a stage that
    only draws the model's prediction needs no TensorFlow."""
    return correlate(images, conv_kernel, padding) + np.float32(bias)


def add_noise(targets: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """targets + N(0, std²) per pixel, as float32.

    Against the original's "inverse crime": without noise the data fit the
    model perfectly, which real measurements never do.
    """
    targets = np.asarray(targets)
    if std < 0:
        raise ValueError(f"noise std must be at least 0, got {std}")
    if std == 0:
        return targets.astype(np.float32)
    noise = rng.standard_normal(targets.shape)
    return (targets.astype(np.float64) + std * noise).astype(np.float32)


def make_targets(
    images,
    conv_kernel: np.ndarray,
    padding: str,
    *,
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
    chunk: int = CHUNK,
    method: str = "auto",
) -> Iterator[np.ndarray]:
    """Yield the (H', W') noisy target of each (H, W) image in `images`, in order,
    computed `chunk` images at a time.

    `images` is an (N, H, W) array or a src.stack.Stack, read a chunk of rows at a
    time; only one chunk is in memory at once. The result does not depend on
    `chunk`: noise is drawn in image order from one generator.
    """
    if noise_std > 0 and rng is None:
        raise ValueError("noise_std > 0 needs a seeded rng")
    for start in range(0, len(images), chunk):
        block = correlate(images[start : start + chunk], conv_kernel, padding, method=method)
        if noise_std > 0:
            block = add_noise(block, noise_std, rng)
        yield from block
