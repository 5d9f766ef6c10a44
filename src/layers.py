"""The model: one linear convolution layer, as Conv2D or as FFTConv2D, the same map by FFTs.

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


def fft_correlate(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """'valid' cross-correlation of (B, H, W) images with a (kh, kw) kernel, via FFTs.

    Circular correlation equals the linear one on the valid region, which never
    wraps around, so no padding beyond the image is needed.
    """
    height, width = tf.shape(x)[1], tf.shape(x)[2]
    kh, kw = kernel.shape
    padded = tf.pad(kernel, [[0, height - kh], [0, width - kw]])
    spectrum = tf.signal.rfft2d(x) * tf.math.conj(tf.signal.rfft2d(padded))
    full = tf.signal.irfft2d(spectrum, fft_length=tf.stack([height, width]))
    return full[:, : height - kh + 1, : width - kw + 1]


@keras.saving.register_keras_serializable(package="learn_linear_filter")
class FFTConv2D(keras.layers.Layer):
    """Conv2D(1 filter, kernel_size, padding, use_bias) computed with FFTs.

    Holds its weights exactly as Conv2D does (kernel (kh, kw, 1, 1), bias (1,)),
    so the two are interchangeable with set_weights.
    """

    def __init__(
        self, kernel_size: tuple[int, int], padding: str = "valid", use_bias: bool = True, **kwargs
    ):
        super().__init__(**kwargs)
        self.kernel_size = tuple(kernel_size)
        self.padding = padding
        self.use_bias = use_bias

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel", shape=(*self.kernel_size, 1, 1), initializer="glorot_uniform"
        )
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(1,), initializer="zeros")

    def call(self, inputs):
        x = inputs[..., 0]
        if self.padding == "same":
            (top, bottom), (left, right) = same_padding(*self.kernel_size)
            x = tf.pad(x, [[0, 0], [top, bottom], [left, right]])
        y = fft_correlate(x, self.kernel[:, :, 0, 0])[..., None]
        return y + self.bias if self.use_bias else y

    def get_config(self):
        return {
            **super().get_config(),
            "kernel_size": self.kernel_size,
            "padding": self.padding,
            "use_bias": self.use_bias,
        }


def choose_conv(kernel_shape: tuple[int, int], conv: str) -> str:
    if conv != "auto":
        return conv
    return "direct" if kernel_shape[0] * kernel_shape[1] <= DIRECT_MAX_TAPS else "fft"


def build_model(
    kernel_shape: tuple[int, int], conv: str, padding: str, use_bias: bool = True
) -> keras.Model:
    """One linear conv layer: one filter of the kernel's size, with a bias."""
    if choose_conv(kernel_shape, conv) == "direct":
        layer = keras.layers.Conv2D(
            1, kernel_shape, padding=padding, use_bias=use_bias, name="conv"
        )
    else:
        layer = FFTConv2D(kernel_shape, padding=padding, use_bias=use_bias, name="conv")
    return keras.Sequential([keras.Input((None, None, 1)), layer], name="linear_filter")


def learned_kernel(model: keras.Model) -> np.ndarray:
    return np.asarray(model.get_layer("conv").get_weights()[0][:, :, 0, 0], dtype=np.float64)


def load_model(path: str | Path) -> keras.Model:
    """A model saved by the train stage (FFTConv2D is registered by importing this module)."""
    return keras.saving.load_model(path)
