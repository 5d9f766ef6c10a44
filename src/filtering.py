"""Make the targets: the images filtered with the true kernel bank, as a Conv2D would.

A Conv2D layer computes cross-correlation. So everything here is a correlation
with the *Conv2D kernel*: the true kernel itself for `correlate`, the true kernel
flipped in both spatial axes for `convolve` (mathematical convolution, as
scipy.signal.convolve2d and the course notes define it). That flipped array is
exactly what a trained model should end up holding.

Images are (N, H, W, C), a kernel bank is (kh, kw, C, F), targets are (N, H', W', F):
target[..., f] = activation(Σ_c correlate(image[..., c], K[..., c, f])). 'valid' keeps
only the pixels where the kernel fits inside the image; 'same' zero-pads first, split
exactly as TensorFlow/Keras split it.

The same params give the same bytes on every machine: small kernels are summed tap by
tap, elementwise, in one fixed order (no BLAS, whose summation order depends on the
CPU), and large ones go through pocketfft (scipy.fft), which is compiled for one
instruction set, without run-time CPU dispatch or threads, so its order is fixed too.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import fft

from src import kernels
from src.config import ACTIVATIONS, OPERATIONS, PADDINGS, filter_image_bytes
from src.images import area_downsample
from src.padding import same_padding

METHODS = ("auto", "direct", "fft")

# Above this many non-zero taps (over a filter's channels) FFT beats the tap-by-tap sum.
# Measured on 64×256×256 float64 blocks, one core: ... (see DIRECT_MAX_TAPS in the report)
DIRECT_MAX_TAPS = 49

# What one block of images may hold in float64 working arrays: the images, their targets
# and the FFT's buffers. At 256² that is 64 images a block; at 4096², one.
BLOCK_BYTES = 256 * 2**20
CHUNK_MAX = 64
CHUNK = CHUNK_MAX  # the most images a block holds (benchmarks/ block their images by it)
BAND_VALUES = 32768  # float64 values of a tap-by-tap sum's rows: 256 KB, within L2 cache


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0, out=x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # 1 / (1 + e^-x), without warnings for large |x|: e^-x is inf (the result 0) or 0 (1)
    with np.errstate(over="ignore", under="ignore"):
        np.negative(x, out=x)
        np.exp(x, out=x)
    x += 1.0
    return np.reciprocal(x, out=x)


def _tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x, out=x)


ACTIVATION = {"linear": lambda x: x, "relu": _relu, "sigmoid": _sigmoid, "tanh": _tanh}
assert tuple(ACTIVATION) == ACTIVATIONS


def activate(x: np.ndarray, activation: str) -> np.ndarray:
    """The activation after the conv, applied in place to a float64 array."""
    if activation not in ACTIVATION:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return ACTIVATION[activation](x)


def as_bank(kernel: np.ndarray) -> np.ndarray:
    """A (kh, kw) or (kh, kw, C) kernel as a (kh, kw, C, 1) bank; a bank passes through."""
    kernel = np.asarray(kernel)
    if kernel.ndim == 2:
        return kernel[:, :, None, None]
    if kernel.ndim == 3:
        return kernel[..., None]
    if kernel.ndim == 4:
        return kernel
    raise ValueError(f"a kernel is (kh, kw), (kh, kw, C) or (kh, kw, C, F), got {kernel.shape}")


def conv2d_kernel(kernel: np.ndarray, operation: str) -> np.ndarray:
    """The kernel a Conv2D (a cross-correlation) must hold to reproduce `operation`:
    a (kh, kw, …) kernel or bank, flipped in its two spatial axes for convolve."""
    kernel = np.asarray(kernel)
    if kernel.ndim < 2:
        raise ValueError(f"kernel must be at least 2-D, got shape {kernel.shape}")
    if operation == "correlate":
        return kernel.copy()
    if operation == "convolve":
        return kernel[::-1, ::-1].copy()
    raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")


def output_shape(
    height: int, width: int, kernel_shape: tuple[int, ...], padding: str
) -> tuple[int, int]:
    """(H', W') of one target: the image's own for 'same', H-kh+1 × W-kw+1 for 'valid'."""
    if padding == "same":
        return height, width
    if padding == "valid":
        kh, kw = kernel_shape[:2]
        return height - kh + 1, width - kw + 1
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def chunk_size(height: int, width: int, channels: int, filters: int) -> int:
    """How many images one block holds within BLOCK_BYTES (at least 1, at most CHUNK_MAX)."""
    per_image = filter_image_bytes(max(height, width), channels, filters)
    return int(np.clip(BLOCK_BYTES // per_image, 1, CHUNK_MAX))


def _direct(x: np.ndarray, k: np.ndarray, out: np.ndarray) -> None:
    """out[n] = Σ over the non-zero taps (a, b, c) of k[a, b, c] · x[c, n, a:a+H', b:b+W'],
    added elementwise in tap order: (C, N, H, W) float64 and (kh, kw, C) in, into the
    (N, H', W') `out`. A band of rows at a time, so that the sums stay in the CPU's
    cache: 2.3× faster than whole blocks of 64 images at 256², 5× at 4096²."""
    out_h, out_w = out.shape[1:]
    rows = max(1, BAND_VALUES // out_w)
    total, term = np.empty((rows, out_w)), np.empty((rows, out_w))
    taps = list(zip(*np.nonzero(k)))
    for n in range(x.shape[1]):
        for top in range(0, out_h, rows):
            bottom = min(out_h, top + rows)
            band, scratch = total[: bottom - top], term[: bottom - top]
            band.fill(0.0)
            for a, b, c in taps:
                window, weight = x[c, n, top + a : bottom + a, b : b + out_w], k[a, b, c]
                if weight == 1.0:  # x·1 is x exactly: one pass instead of two, same bits
                    band += window
                elif weight == -1.0:
                    band -= window
                else:
                    np.multiply(window, weight, out=scratch)
                    band += scratch
            out[n, top:bottom] = band


def _spectra(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return fft.rfft2(x, s=shape, axes=(-2, -1), workers=1)


def correlate_bank(
    images: np.ndarray, conv_kernel: np.ndarray, padding: str, method: str = "auto"
) -> np.ndarray:
    """Cross-correlate an (N, H, W, C) batch with a (kh, kw, C, F) bank: (N, H', W', F)
    float64, Σ over the channels. `method` 'auto' sums tap by tap for filters of up to
    DIRECT_MAX_TAPS non-zero taps and uses the FFT above; 'direct' and 'fft' force one
    (they agree to ~1e-12)."""
    images = np.asarray(images)
    k = np.asarray(conv_kernel, dtype=np.float64)
    if images.ndim != 4 or k.ndim != 4 or images.shape[3] != k.shape[2]:
        raise ValueError(
            f"images (N, H, W, C) and a bank (kh, kw, C, F), got {images.shape} and {k.shape}"
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    kh, kw, _, filters = k.shape
    n, height, width, _ = images.shape
    out_h, out_w = output_shape(height, width, k.shape, padding)
    if padding == "valid" and (out_h < 1 or out_w < 1):
        raise ValueError(
            f"a {kh}×{kw} kernel does not fit in {height}×{width} images with 'valid' padding"
        )
    # (C, N, H, W): each channel's plane contiguous for the taps' slices and the FFT
    x = np.moveaxis(images, 3, 0).astype(np.float64)
    if padding == "same":
        x = np.pad(x, ((0, 0), (0, 0), *same_padding(kh, kw)))
    out = np.empty((n, out_h, out_w, filters))
    spectra = None
    for f in range(filters):
        taps = np.count_nonzero(k[..., f])
        use = method if method != "auto" else ("direct" if taps <= DIRECT_MAX_TAPS else "fft")
        if use == "direct":
            _direct(x, k[..., f], out[..., f])
            continue
        # correlation is convolution with the flipped kernel; 'valid' part of the full one
        shape = tuple(fft.next_fast_len(s, real=True) for s in x.shape[2:])
        if spectra is None:
            spectra = _spectra(x, shape)
        product = np.zeros(spectra.shape[1:], dtype=spectra.dtype)
        for c in range(x.shape[0]):
            product += spectra[c] * _spectra(k[::-1, ::-1, c, f], shape)
        full = fft.irfft2(product, s=shape, axes=(-2, -1), workers=1)
        out[..., f] = full[:, kh - 1 : kh - 1 + out_h, kw - 1 : kw - 1 + out_w]
    return out


def correlate(
    images: np.ndarray, conv_kernel: np.ndarray, padding: str, method: str = "auto"
) -> np.ndarray:
    """float32 targets of an (N, H, W) batch and a (kh, kw) kernel, (N, H', W'); or of
    an (N, H, W, C) batch and a (kh, kw, C, F) bank, (N, H', W', F). Computed in float64."""
    images = np.asarray(images)
    k = np.asarray(conv_kernel)
    if images.ndim == 3 and k.ndim == 2:
        return correlate_bank(images[..., None], as_bank(k), padding, method)[..., 0].astype(
            np.float32
        )
    if images.ndim != 4 or k.ndim != 4:
        raise ValueError(
            f"images (N, H, W) with a (kh, kw) kernel, or (N, H, W, C) with a (kh, kw, C, F) "
            f"bank; got {images.shape} and {k.shape}"
        )
    return correlate_bank(images, k, padding, method).astype(np.float32)


def predict(
    images: np.ndarray,
    conv_kernel: np.ndarray,
    bias,
    padding: str,
    activation: str = "linear",
) -> np.ndarray:
    """What the trained layer outputs: activation(correlation with its kernel + bias),
    float32, for (N, H, W) and a (kh, kw) kernel, or (N, H, W, C) and a (kh, kw, C, F)
    bank with F biases. Computed here, not by Keras, so that a stage that only draws the
    model's prediction needs no TensorFlow."""
    images = np.asarray(images)
    k = np.asarray(conv_kernel)
    gray = images.ndim == 3 and k.ndim == 2
    x = images[..., None] if gray else images
    y = correlate_bank(x, as_bank(k), padding)
    y += np.asarray(bias, dtype=np.float64).reshape(-1)
    y = activate(y, activation).astype(np.float32)
    return y[..., 0] if gray else y


# --- the filters no linear layer is: each maps (N, H, W, 1) to 'same' (N, H, W, 1) -------


def _rank(kind: str, size: int) -> callable:
    from scipy import ndimage  # here: only these filters need it, and it costs 0.1 s to import

    function = {
        "median": ndimage.median_filter,
        "max": ndimage.maximum_filter,
        "min": ndimage.minimum_filter,
    }[kind]
    # zeros outside the image, as a Conv2D with 'same' padding sees it; centred (odd size)
    return lambda x: function(x, size=(1, size, size, 1), mode="constant", cval=0.0)


def _centred(k: np.ndarray):
    def apply(x: np.ndarray) -> np.ndarray:
        return correlate_bank(x, as_bank(k), "same")

    return apply


def _gradient_magnitude(x: np.ndarray) -> np.ndarray:
    sx = correlate_bank(x, as_bank(kernels.SOBEL_X), "same")
    sy = correlate_bank(x, as_bank(kernels.SOBEL_X.T.copy()), "same")
    sx *= sx
    sy *= sy
    sx += sy
    return np.sqrt(sx, out=sx)


def nonlinear(name: str, settings) -> callable:
    """The non-linear filter `name` as a function of a float64 (N, H, W, 1) batch, giving
    its 'same' (N, H, W, 1) output: centred windows, zeros outside the image."""
    if name in kernels.RANK_FILTERS:
        return _rank(name, getattr(settings, name).size)
    if name == "abs_sobel_x":
        sobel = _centred(kernels.SOBEL_X)
        return lambda x: np.abs(sobel(x))
    if name == "gradient_magnitude":
        return _gradient_magnitude
    raise ValueError(f"{name} is not a non-linear filter")


# --- the targets of a stack ---------------------------------------------------------------


class Filter:
    """What makes a target: a linear bank (its Conv2D kernel) or a non-linear filter, with
    the padding, the activation and the rescale factor.

    `shape` is the (kh, kw) of the layer that learns it: the bank's, or size×size.
    """

    def __init__(
        self,
        padding: str,
        *,
        conv_kernel: np.ndarray | None = None,
        nonlinear_filter=None,
        shape: tuple[int, int] | None = None,
        activation: str = "linear",
        rescale: int = 1,
    ):
        if (conv_kernel is None) == (nonlinear_filter is None):
            raise ValueError("a Filter has a conv_kernel or a nonlinear_filter, not both")
        if activation not in ACTIVATION:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.padding, self.activation, self.rescale = padding, activation, rescale
        self.conv_kernel = None if conv_kernel is None else as_bank(conv_kernel)
        self.nonlinear_filter = nonlinear_filter
        self.shape = tuple(self.conv_kernel.shape[:2]) if shape is None else tuple(shape)
        self.filters = 1 if conv_kernel is None else self.conv_kernel.shape[3]
        if rescale > 1 and (self.shape[0] % 2 == 0 or self.shape[1] % 2 == 0):
            raise ValueError("rescale needs an odd-sized kernel")

    def target_shape(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') of the target of one (coarse) height × width input."""
        return output_shape(height, width, self.shape, self.padding)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of a block of (N, rH, rW, C) images, as float64: the inputs
        area-downsampled by `rescale` (as they are with rescale 1), the targets made at
        the images' own resolution and then downsampled the same way."""
        x = np.asarray(images)
        if self.rescale == 1 and self.nonlinear_filter is None:
            y = correlate_bank(x, self.conv_kernel, self.padding)
            return x, activate(y, self.activation)
        # 'same' at the fine resolution: each coarse pixel's target is the mean over its
        # block, centred where a Conv2D's window over the coarse image is centred (odd kh)
        x = x.astype(np.float64)
        if self.nonlinear_filter is not None:
            fine = self.nonlinear_filter(x)
        else:
            fine = correlate_bank(x, self.conv_kernel, "same")
        fine = activate(fine, self.activation)
        inputs = area_downsample(x, self.rescale)
        targets = area_downsample(fine, self.rescale)
        if self.padding == "valid":
            top, left = (self.shape[0] - 1) // 2, (self.shape[1] - 1) // 2
            out_h, out_w = self.target_shape(*inputs.shape[1:3])
            targets = targets[:, top : top + out_h, left : left + out_w]
        return inputs, targets


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
    noise *= std
    noise += targets
    return noise.astype(np.float32)


def make_targets(
    images,
    conv_kernel: np.ndarray,
    padding: str,
    *,
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
    chunk: int | None = None,
    method: str = "auto",
) -> Iterator[np.ndarray]:
    """Yield the (H', W') noisy target of each (H, W) image of an (N, H, W) array or
    stack, in order, `chunk` images at a time: the gray, linear, one-filter case of
    `make_pairs`, kept for callers that need nothing more."""
    if noise_std > 0 and rng is None:
        raise ValueError("noise_std > 0 needs a seeded rng")
    n, height, width = images.shape[:3]
    chunk = chunk or chunk_size(height, width, 1, 1)
    k = as_bank(conv_kernel)
    for start in range(0, n, chunk):
        block = np.asarray(images[start : start + chunk])
        block = block[..., None] if block.ndim == 3 else block
        targets = correlate_bank(block, k, padding, method=method)[..., 0]
        yield from (
            add_noise(targets, noise_std, rng) if noise_std > 0 else targets.astype(np.float32)
        )


def make_pairs(
    images,
    target_filter: Filter,
    *,
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
    chunk: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (input, target) float32 pairs, (H, W, C) and (H', W', F), one per image of an
    (N, rH, rW, C) array or stack, in order, a block of `chunk` images at a time (by
    default as many as BLOCK_BYTES holds: memory stays flat however large the images or
    how many). The result does not depend on `chunk`: noise is drawn in image order from
    one generator, after the activation."""
    if noise_std > 0 and rng is None:
        raise ValueError("noise_std > 0 needs a seeded rng")
    n, height, width, channels = images.shape
    chunk = chunk or chunk_size(height, width, channels, target_filter.filters)
    for start in range(0, n, chunk):
        inputs, targets = target_filter(images[start : start + chunk])
        targets = add_noise(targets, noise_std, rng)
        inputs = np.asarray(inputs, dtype=np.float32)
        yield from zip(inputs, targets)
