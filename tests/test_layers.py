"""src/layers.py: FFTConv2D is Conv2D by FFTs, a saved model loads with this module alone,
and filtering.predict computes what the layer does."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from src import filtering, layers  # noqa: E402

RNG = np.random.default_rng(7)
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape", [(3, 3), (4, 4), (5, 2)])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_fft_layer_matches_conv2d_outputs_and_gradients(shape, padding):
    x = tf.constant(RNG.normal(size=(2, 20, 17, 1)), tf.float32)
    direct = layers.build_model(shape, "direct", padding)
    fft = layers.build_model(shape, "fft", padding)
    fft.get_layer("conv").set_weights(direct.get_layer("conv").get_weights())
    target = tf.constant(RNG.normal(size=direct(x).shape), tf.float32)

    def grads(model):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - target))
        return model(x).numpy(), [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]

    (out_d, grad_d), (out_f, grad_f) = grads(direct), grads(fft)
    assert out_d.shape == out_f.shape
    np.testing.assert_allclose(out_f, out_d, atol=2e-5)
    for gf, gd in zip(grad_f, grad_d):
        np.testing.assert_allclose(gf, gd, rtol=1e-4, atol=2e-5)


def test_auto_conv_is_direct_for_small_kernels_and_fft_for_large():
    assert layers.choose_conv((3, 3), "auto") == "direct"
    assert layers.choose_conv((32, 32), "auto") == "fft"
    assert layers.choose_conv((32, 32), "direct") == "direct"


@pytest.mark.parametrize("conv", ["direct", "fft"])
def test_a_saved_model_loads_with_only_the_layers_module(tmp_path, conv):
    model = layers.build_model((4, 3), conv, "same")
    path = tmp_path / "model.keras"
    model.save(path)
    x = RNG.normal(size=(1, 12, 10, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    # a fresh process that imports nothing of ours but src.layers
    code = (
        "import sys, numpy as np; from src import layers; "
        f"m = layers.load_model({str(path)!r}); "
        f"np.save({str(tmp_path / 'y.npy')!r}, m(np.load({str(tmp_path / 'x.npy')!r})));"
        "print(sorted(n for n in sys.modules if n.startswith('src.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "src.training" not in result.stdout
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model(x).numpy(), atol=1e-6)


@pytest.mark.parametrize("conv", ["direct", "fft"])
@pytest.mark.parametrize("shape", [(3, 3), (4, 4), (5, 2)])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_the_filter_code_predicts_what_the_layer_outputs(conv, shape, padding):
    """filtering.predict, which visualize draws without TensorFlow, is the model itself:
    the same kernel (Conv2D orientation) and bias give the same output, in either padding."""
    kernel, bias = RNG.normal(size=shape), 0.37
    model = layers.build_model(shape, conv, padding)
    model.get_layer("conv").set_weights([kernel[:, :, None, None], np.array([bias])])
    images = RNG.normal(size=(2, 19, 16)).astype(np.float32)
    expected = model(images[..., None]).numpy()[..., 0]
    predicted = filtering.predict(images, kernel, bias, padding)
    assert predicted.shape == expected.shape and predicted.dtype == np.float32
    np.testing.assert_allclose(predicted, expected, atol=1e-5)
