"""The pure-TensorFlow path of the batch-entropy math: backend "tf".

lbe_ops takes it where the compiled op cannot be used (no library, another TensorFlow, inside
XLA) or where LBE_OPS_BACKEND=tf or use_backend("tf") asks for it; the tests also compare the op
against it. Everything is written from the variance, never through
a square root, so constant ("dead") units get a zero, finite gradient in eager, graph and XLA
modes. Statistics are accumulated in float32 for half, bfloat16 and float32 inputs and in float64
for double; the mean is subtracted before squaring (two passes), so large offsets stay accurate.

With allow_small_batch, a batch B <= ddof gives entropy, mean and variance 0 with zero gradients,
computed without control flow (XLA cannot raise a run-time error) and without a 0/0 anywhere:
valid = float(B > ddof), mean = sum / max(B, 1) * valid, variance = M2 / max(B - ddof, 1) * valid.
"""

import math

import tensorflow as tf

from lbe_ops import _loader, _validation

PI_E = math.pi * math.e


def entropy_from_variance(variance):
    """Per-unit batch entropy 0.5 * ln(pi * e * variance + 1), in the variance's dtype."""
    return 0.5 * tf.math.log1p(tf.constant(PI_E, variance.dtype) * variance)


def _flatten(x):
    """[B, d1, ...] -> [B, U] in the accumulator dtype. U is spelled out: reshape cannot infer
    a -1 for an empty tensor (B = 0)."""
    acc = _validation.accumulator_dtype(x.dtype)
    shape = tf.shape(x)
    units = x.shape[1:].num_elements()
    if units is None:
        units = tf.reduce_prod(shape[1:])
    return tf.reshape(tf.cast(x, acc), tf.stack([shape[0], units]))


def _check_runtime_batch(flat, ddof, name):
    batch = tf.shape(flat)[0]
    if flat.shape[0] is None and not _in_xla_context():
        tf.debugging.assert_greater(
            batch, ddof,
            message=f"{name}: batch entropy with ddof={ddof} needs a batch of at least {ddof + 1}")
    return batch


def _in_xla_context():
    return _loader.in_xla_context()


def _moments_allowing_small_batch(flat, ddof):
    """Mean and variance of flat [B, U]; both 0 (with zero gradients) where B <= ddof.

    Every divisor is at least 1 and every 0 comes from a multiplication by valid, so no
    intermediate value or gradient is NaN for B = 0 or 1. Where B > ddof, valid = 1 and the
    results are those of the plain path: bit for bit in eager mode and under XLA (a sum divided
    by the count is what reduce_mean computes), to rounding in graph mode, where Grappler
    rewrites the two paths differently."""
    batch = tf.shape(flat)[0]
    acc = flat.dtype
    valid = tf.cast(batch > ddof, acc)
    mean = tf.reduce_sum(flat, axis=0) / tf.cast(tf.maximum(batch, 1), acc) * valid
    sum_of_squares = tf.reduce_sum(tf.square(flat - mean), axis=0)
    variance = sum_of_squares / tf.cast(tf.maximum(batch - ddof, 1), acc) * valid
    return mean, variance


def moments(x, ddof=1, name="x", entropy_dtype=None, allow_small_batch=False):
    """Returns (entropy, mean, variance) of x viewed as [B, U].

    entropy has x's dtype (or entropy_dtype); mean and variance ([U]) are in the accumulator
    dtype. A batch B <= ddof is an error (ValueError if static, else a failed assertion at run
    time), unless allow_small_batch: then all three are 0 with zero gradients.
    """
    ddof = _validation.check_ddof(ddof)
    allow_small_batch = _validation.check_allow_small_batch(allow_small_batch)
    x = _validation.check_input(x, ddof, name=name, allow_small_batch=allow_small_batch)
    flat = _flatten(x)
    acc = flat.dtype
    if allow_small_batch:
        mean, variance = _moments_allowing_small_batch(flat, ddof)
    else:
        batch = _check_runtime_batch(flat, ddof, name)
        mean = tf.reduce_mean(flat, axis=0)
        centered = flat - mean
        denom = tf.cast(batch - ddof, acc)
        variance = tf.reduce_sum(tf.square(centered), axis=0) / denom
    unit_entropy = entropy_from_variance(variance)
    entropy = tf.reduce_mean(unit_entropy)
    return tf.cast(entropy, entropy_dtype or x.dtype), mean, variance


def batch_entropy(x, ddof=1, dtype=None, allow_small_batch=False):
    """Batch entropy of one activation tensor [B, d1, ...]: a differentiable scalar (0, with a
    zero gradient, for a batch <= ddof if allow_small_batch; else that is an error)."""
    return moments(x, ddof, entropy_dtype=dtype, allow_small_batch=allow_small_batch)[0]


def batch_entropies(xs, ddof=1, dtype=None, allow_small_batch=False):
    """Batch entropy of each tensor of a list, as a vector (tensors may differ in shape).

    The vector has `dtype`, by default the tensors' common dtype (float32, or float64 if any
    is float64, when they differ); every entry is computed in its own tensor's accumulator
    dtype. With allow_small_batch, a tensor whose batch is <= ddof gets 0 (zero gradient).
    """
    ddof = _validation.check_ddof(ddof)
    allow_small_batch = _validation.check_allow_small_batch(allow_small_batch)
    xs = _validation.check_list(xs, ddof, allow_small_batch=allow_small_batch)
    out_dtype = _validation.result_dtype(xs, dtype)
    return tf.stack([moments(x, ddof, name=f"xs[{i}]", entropy_dtype=out_dtype,
                             allow_small_batch=allow_small_batch)[0]
                     for i, x in enumerate(xs)])
