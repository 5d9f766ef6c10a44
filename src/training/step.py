"""One optimizer step, sized by the batch itself: the model whose train_step this is.

Linear layers (and large kernels with an activation): the direction is K-FAC's,
d = −H⁻¹g, the gradient times the inverse input-patch covariance (src/training/
curvature.py), the same for every filter of a bank since they share their inputs.
Its length is the exact line search on this batch, filter by filter:

    α_f = −g_f·d_f / d_fᵀ H_b d_f,    d_fᵀ H_b d_f = 2·Σ (s · (d_f ⋆ x))² / M,

H_b the batch's Gauss–Newton curvature and s the activation's slope at each pixel (1 for a
linear layer). One steep batch then shortens its own step only, not every other one; a
step of learning_rate × α_f is taken.

Small layers with an activation (at most GAUSS_NEWTON_MAX_WEIGHTS weights a filter, the
bias included): the exact Gauss–Newton step of the batch, each pixel's patch weighted by
the activation's slope (ReLU keeps the active pixels only), with the best of a few step
lengths on the batch's loss. Under tf.distribute the sums are all-reduced, so every
device takes the same step.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from src.layers import FFTConv2D, fft_correlate

GAUSS_NEWTON_MAX_WEIGHTS = 128  # taps × channels + 1 up to this: the exact Gauss–Newton step
STEP_LENGTHS = (1.0, 0.5, 0.25, 0.1, 0.03, 0.0)  # tried on the batch's loss (Gauss–Newton)
DAMPING = 1e-9  # Gauss–Newton: the matrix's trace/n times this is added to its diagonal


def _sum(value: tf.Tensor) -> tf.Tensor:
    """The sum over the devices (the value itself without tf.distribute)."""
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, value)


def _slope(activation: str, z: tf.Tensor) -> tf.Tensor:
    if activation == "relu":
        return tf.cast(z > 0, z.dtype)
    if activation == "sigmoid":
        y = tf.sigmoid(z)
        return y * (1.0 - y)
    if activation == "tanh":
        return 1.0 - tf.square(tf.tanh(z))
    return tf.ones_like(z)


def _activate(activation: str, z: tf.Tensor) -> tf.Tensor:
    return keras.activations.get(activation)(z)


class Learner(keras.Sequential):
    """The training model: conv (and activation) with train_step taking the step above.
    `inverse` (taps·C, taps·C): K-FAC's inverse, or None for the optimizer's plain
    gradient step (Adam, or SGD with train.precondition none). The optimizer applies the
    step as its gradient, so it must be SGD with learning rate 1 and no momentum when
    `inverse` is given (see optimizer())."""

    def __init__(self, layers, inverse=None, activation="linear", learning_rate=1.0, **kwargs):
        super().__init__(layers, **kwargs)
        self.activation_name = activation
        self.step_scale = float(learning_rate)
        self.inverse = None if inverse is None else tf.constant(inverse, tf.float32)
        self.crop_loss = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.crop_loss]

    def _conv(self, x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        if isinstance(self.get_layer("conv"), FFTConv2D):
            return fft_correlate(x, kernel)
        return tf.nn.conv2d(x, kernel, strides=1, padding="VALID")

    def train_step(self, data):
        x, t = data
        if self.inverse is None:
            return self._plain(x, t)
        conv = self.get_layer("conv")
        weights = conv.kernel.shape
        n = int(np.prod(weights[:3]))
        if self.activation_name != "linear" and n + 1 <= GAUSS_NEWTON_MAX_WEIGHTS:
            update, bias_update, loss = self._gauss_newton(x, t, conv)
        else:
            update, bias_update, loss = self._line_search(x, t, conv)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        grads = [-update / replicas]  # the optimizer sums the devices' and subtracts it
        variables = [conv.kernel]
        if conv.use_bias:
            grads.append(-bias_update / replicas)
            variables.append(conv.bias)
        self.optimizer.apply(grads, variables)
        self.crop_loss.update_state(loss)
        return {"loss": self.crop_loss.result()}

    def _plain(self, x, t):
        """The optimizer's own step on the gradient of the mean squared error."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x, training=True) - t))
            scaled = loss / replicas  # the optimizer sums the devices' gradients
        variables = self.trainable_weights
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        self.crop_loss.update_state(loss)
        return {"loss": self.crop_loss.result()}

    def _line_search(self, x, t, conv):
        """The K-FAC direction and each filter's exact step length on the batch."""
        count = _sum(tf.cast(tf.size(t), tf.float32))
        variables = [conv.kernel] + ([conv.bias] if conv.use_bias else [])
        with tf.GradientTape() as tape:
            z = self.get_layer("conv")(x)
            y = _activate(self.activation_name, z)
            loss_sum = tf.reduce_sum(tf.square(y - t))
        grads = tape.gradient(loss_sum, variables)
        g = _sum(tf.reshape(grads[0], [-1, conv.kernel.shape[-1]])) / count
        direction = -tf.linalg.matmul(self.inverse, g)  # (n, F)
        d = tf.reshape(direction, conv.kernel.shape)
        along = self._conv(x, d)
        numerator = tf.reduce_sum(g * direction, axis=0)  # (F,)
        slope = _slope(self.activation_name, z)
        db = None
        if conv.use_bias:  # with an activation: the bias's own Gauss–Newton step joins d
            gb = _sum(grads[1]) / count
            bias_curvature = 2.0 * _sum(tf.reduce_sum(tf.square(slope), [0, 1, 2])) / count
            db = -gb / tf.maximum(bias_curvature, 1e-30)
            along = along + db
            numerator = numerator + gb * db
        curvature = 2.0 * _sum(tf.reduce_sum(tf.square(slope * along), [0, 1, 2])) / count
        alpha = -numerator / tf.maximum(curvature, 1e-30) * self.step_scale  # (F,)
        update = d * alpha
        bias_update = db * alpha if db is not None else None
        return update, bias_update, _sum(loss_sum) / count

    def _gauss_newton(self, x, t, conv):
        """The batch's exact Gauss–Newton step for every filter, and the best length."""
        kh, kw, c, f = conv.kernel.shape
        patches = tf.image.extract_patches(
            x, sizes=[1, kh, kw, 1], strides=[1, 1, 1, 1], rates=[1, 1, 1, 1], padding="VALID"
        )
        p = tf.reshape(tf.cast(patches, tf.float64), [-1, kh * kw * c])
        p = tf.concat([p, tf.ones_like(p[:, :1])], axis=1)  # the bias's column
        target = tf.reshape(tf.cast(t, tf.float64), [-1, f])
        weights = tf.concat(
            [
                tf.reshape(tf.cast(conv.kernel, tf.float64), [-1, f]),
                tf.cast(conv.bias, tf.float64)[None],
            ],
            axis=0,
        )  # (n + 1, F)
        z = p @ weights
        residual = _activate(self.activation_name, z) - target
        slope = _slope(self.activation_name, z)
        count = _sum(tf.cast(tf.size(target), tf.float64))
        steps = []
        for i in range(f):  # a bank's filters have their own slopes
            j = p * slope[:, i : i + 1]
            matrix = _sum(tf.matmul(j, j, transpose_a=True))
            gradient = _sum(tf.linalg.matvec(j, residual[:, i], transpose_a=True))
            size = tf.shape(matrix)[0]
            damping = DAMPING * tf.linalg.trace(matrix) / tf.cast(size, tf.float64) + 1e-300
            matrix = matrix + damping * tf.eye(size, dtype=tf.float64)
            steps.append(-tf.linalg.solve(matrix, gradient[:, None])[:, 0])
        step = tf.stack(steps, axis=1)  # (n + 1, F)
        losses = tf.stack(
            [
                _sum(
                    tf.reduce_sum(
                        tf.square(
                            _activate(self.activation_name, p @ (weights + eta * step)) - target
                        ),
                        axis=0,
                    )
                )
                for eta in STEP_LENGTHS
            ]
        )  # (lengths, F)
        best = tf.gather(tf.constant(STEP_LENGTHS, tf.float64), tf.argmin(losses, axis=0))
        step = step * best
        update = tf.cast(tf.reshape(step[:-1], conv.kernel.shape), tf.float32)
        bias_update = tf.cast(step[-1], tf.float32)
        loss = tf.reduce_sum(losses[-1]) / count  # before the step, as Keras reports it
        return update, bias_update, tf.cast(loss, tf.float32)
