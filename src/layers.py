"""The model: one convolution layer (C input channels, F filters, a bias each), as Conv2D or
as FFTConv2D, the same map by FFTs, and the activation after it (filter.activation).

A 32×32 Conv2D costs about 0.6 s per 256×256 image on a 2-core CPU; FFTConv2D
computes the same correlation with the same weights, outputs and gradients,
about 14× faster per training step at 32×32. Loading a saved model needs only
this module: it registers FFTConv2D with Keras.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from src.padding import same_padding

DIRECT_MAX_TAPS = 121  # auto: direct Conv2D up to 11×11, FFT above (BENCHMARKS.md, section 5)
ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh")


def fft_correlate(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """'valid' cross-correlation of (B, H, W, C) images with a (kh, kw, C, F) kernel, via
    FFTs: (B, H−kh+1, W−kw+1, F), the channels summed as Conv2D sums them.

    Circular correlation equals the linear one on the valid region, which never
    wraps around, so no padding beyond the image is needed.
    """
    height, width = tf.shape(x)[1], tf.shape(x)[2]
    kh, kw = kernel.shape[0], kernel.shape[1]
    images = tf.signal.rfft2d(tf.transpose(x, [0, 3, 1, 2]))  # (B, C, H, W/2+1)
    padded = tf.pad(
        tf.transpose(kernel, [2, 3, 0, 1]), [[0, 0], [0, 0], [0, height - kh], [0, width - kw]]
    )
    spectrum = tf.einsum("bchw,cfhw->bfhw", images, tf.math.conj(tf.signal.rfft2d(padded)))
    full = tf.signal.irfft2d(spectrum, fft_length=tf.stack([height, width]))
    return tf.transpose(full[:, :, : height - kh + 1, : width - kw + 1], [0, 2, 3, 1])


@keras.saving.register_keras_serializable(package="learn_linear_filter")
class FFTConv2D(keras.layers.Layer):
    """Conv2D(filters, kernel_size, padding, use_bias) computed with FFTs.

    Holds its weights exactly as Conv2D does (kernel (kh, kw, C, F), bias (F,)),
    so the two are interchangeable with set_weights.
    """

    def __init__(
        self,
        kernel_size: tuple[int, int],
        padding: str = "valid",
        use_bias: bool = True,
        filters: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.kernel_size = tuple(kernel_size)
        self.padding = padding
        self.use_bias = use_bias
        self.filters = int(filters)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.kernel_size, channels, self.filters),
            initializer="glorot_uniform",
        )
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def call(self, inputs):
        x = inputs
        if self.padding == "same":
            (top, bottom), (left, right) = same_padding(*self.kernel_size)
            x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        y = fft_correlate(x, self.kernel)
        return y + self.bias if self.use_bias else y

    def compute_output_shape(self, input_shape):
        batch, height, width = input_shape[0], input_shape[1], input_shape[2]
        if self.padding == "valid" and height is not None:
            height = height - self.kernel_size[0] + 1
        if self.padding == "valid" and width is not None:
            width = width - self.kernel_size[1] + 1
        return (batch, height, width, self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "kernel_size": self.kernel_size,
            "padding": self.padding,
            "use_bias": self.use_bias,
            "filters": self.filters,
        }


def choose_conv(kernel_shape: tuple[int, int], conv: str) -> str:
    if conv != "auto":
        return conv
    return "direct" if kernel_shape[0] * kernel_shape[1] <= DIRECT_MAX_TAPS else "fft"


def build_model(
    kernel_shape: tuple[int, int],
    conv: str,
    padding: str,
    use_bias: bool = True,
    channels: int = 1,
    filters: int = 1,
    activation: str = "linear",
) -> keras.Model:
    """One conv layer of `filters` filters of the kernel's size on `channels` input
    channels, with a bias each, and the activation after it (layer "activation")."""
    if choose_conv(kernel_shape, conv) == "direct":
        layer = keras.layers.Conv2D(
            filters, kernel_shape, padding=padding, use_bias=use_bias, name="conv"
        )
    else:
        layer = FFTConv2D(
            kernel_shape, padding=padding, use_bias=use_bias, filters=filters, name="conv"
        )
    stack = [keras.Input((None, None, channels)), layer]
    if activation != "linear":
        stack.append(keras.layers.Activation(activation, name="activation"))
    return keras.Sequential(stack, name="linear_filter" if activation == "linear" else "filter")


def activation_of(model: keras.Model) -> str:
    """The model's activation after the conv: linear, relu, sigmoid or tanh."""
    try:
        return str(model.get_layer("activation").get_config()["activation"])
    except ValueError:
        return "linear"


def learned_kernel(model: keras.Model) -> np.ndarray:
    """The conv's kernel, float64 (kh, kw, C, F)."""
    return np.asarray(model.get_layer("conv").get_weights()[0], dtype=np.float64)


def learned_bias(model: keras.Model) -> np.ndarray:
    """The conv's biases, float64 (F,); zeros for a layer without them."""
    weights = model.get_layer("conv").get_weights()
    if len(weights) > 1:
        return np.asarray(weights[1], dtype=np.float64)
    return np.zeros(weights[0].shape[-1])


def load_model(path: str | Path) -> keras.Model:
    """A model saved by the train stage (FFTConv2D is registered by importing this module)."""
    return keras.saving.load_model(path)
