"""What the op tests share: random inputs in every dtype (with their float64 values for the
reference), the tolerances a result is held to against the float64 reference (oracle64), and
one call's entropy, statistics and gradient in float64."""

import numpy as np
import tensorflow as tf

import lbe_ops
from oracle64 import moments as np_moments

# Relative tolerances of the entropy, and of dx measured against max |dx|. Half and bfloat16
# results are rounded to their own precision; float32 loses about eps * offset / std in the mean.
ENTROPY_RTOL = {tf.float16: 2e-3, tf.bfloat16: 1e-2, tf.float32: 2e-5, tf.float64: 1e-12}
GRAD_RTOL = {tf.float16: 3e-3, tf.bfloat16: 2e-2, tf.float32: 2e-5, tf.float64: 1e-11}


def make_input(rng, shape, dtype, offset_in_stds=0.0):
    """Random activations in dtype, and the same values in float64 (what the reference sees)."""
    scale = rng.uniform(0.1, 10.0)
    if dtype == tf.float16 and offset_in_stds:
        scale = min(scale, 60000.0 / (2.0 * (offset_in_stds + 8.0)))  # stay inside float16's range
    data = rng.standard_normal(shape) * scale + offset_in_stds * scale
    # A few ReLU-like zeros and a spread of per-unit scales, as real activations have.
    data *= rng.uniform(0.2, 2.0, size=(1,) + tuple(shape[1:]))
    x = tf.cast(tf.constant(data, tf.float64), dtype)
    return x, tf.cast(x, tf.float64).numpy()


def assert_grad_close(grad, ref, rtol, x64=None):
    """dx against the float64 reference, relative to max |ref|.

    With x64 (the input, in float64) the tolerance also covers what the data's own conditioning
    costs: both backends form (x - mean_j) from a mean rounded to the statistics type (float32,
    or float64 for double inputs), an absolute error of a few eps * |mean_j|. Where a unit's
    spread is tiny against its mean (two samples of a batch of 2 that happen to lie close
    together, say), that error, times the unit's slope dx/(x - mean), is larger than rtol alone
    allows, on either backend and in any implementation that keeps the mean in float32.
    """
    # float16 gradients of wide layers are subnormal: allow its smallest spacing, 2**-24.
    atol = 2.0 ** -24 if grad.dtype == tf.float16 else 0.0
    stats_eps = 2.0 ** -52 if grad.dtype == tf.float64 else 2.0 ** -23
    grad = tf.cast(grad, tf.float64).numpy()
    scale = max(np.abs(ref).max(), 1e-30)
    allowed = np.full(ref.shape, rtol * scale + atol)
    if x64 is not None:
        flat_x = x64.reshape(x64.shape[0], -1)
        mean = np_moments(flat_x)[1]
        spread = np.abs(flat_x - mean).max(axis=0)
        slope = np.abs(ref.reshape(flat_x.shape)).max(axis=0) / np.maximum(spread, 1e-300)
        allowed = allowed + (8 * stats_eps * np.abs(mean) * slope).reshape((1,) + x64.shape[1:])
    err = np.abs(grad - ref)
    assert np.all(np.isfinite(grad))
    worst = np.unravel_index(np.argmax(err - allowed), err.shape)
    assert np.all(err <= allowed), (
        f"max |dx - ref| / max |ref| = {err.max() / scale:.3g} > {rtol:.3g} (worst at {worst}: "
        f"|dx - ref| = {err[worst]:.3g}, allowed {allowed[worst]:.3g})")


def moments_and_grad(x, backend, variance_weight=0.0):
    """(H, mean, var, dH/dx [+ variance_weight * d sum(var)/dx]) in float64 numpy."""
    x = tf.convert_to_tensor(x)
    with lbe_ops.use_backend(backend), tf.GradientTape() as tape:
        tape.watch(x)
        h, mean, var = lbe_ops.batch_entropy_moments(x)
        loss = tf.cast(h, tf.float64) + variance_weight * tf.reduce_sum(tf.cast(var, tf.float64))
    grad = tape.gradient(loss, x)
    return [tf.cast(t, tf.float64).numpy() for t in (h, mean, var, grad)]
