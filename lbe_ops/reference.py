"""The pure-TensorFlow composition of the batch-entropy math.

This is the fallback where the compiled op cannot be used (no library, another TensorFlow, XLA)
and the oracle the op is tested against. Everything is written from the variance, never through
a square root, so constant ("dead") units get a zero, finite gradient in eager, graph and XLA
modes. Statistics are accumulated in float32 for half, bfloat16 and float32 inputs and in float64
for double; the mean is subtracted before squaring (two passes), so large offsets stay accurate.
"""

import math

import tensorflow as tf

from lbe_ops import _validation

PI_E = math.pi * math.e


def entropy_from_variance(variance):
    """Per-unit batch entropy 0.5 * ln(pi * e * variance + 1), in the variance's dtype."""
    return 0.5 * tf.math.log1p(tf.constant(PI_E, variance.dtype) * variance)


def _flatten(x):
    """[B, d1, ...] -> [B, U] in the accumulator dtype."""
    acc = _validation.accumulator_dtype(x.dtype)
    batch = tf.shape(x)[0]
    return tf.reshape(tf.cast(x, acc), tf.stack([batch, -1]))


def _check_runtime_batch(flat, ddof, name):
    batch = tf.shape(flat)[0]
    if flat.shape[0] is None and not _in_xla_context():
        tf.debugging.assert_greater(
            batch, ddof,
            message=f"{name}: batch entropy with ddof={ddof} needs a batch of at least {ddof + 1}")
    return batch


def _in_xla_context():
    from lbe_ops import _loader  # late import: the loader imports this module
    return _loader.in_xla_context()


def moments(x, ddof=1, name="x", entropy_dtype=None):
    """Returns (entropy, mean, variance) of x viewed as [B, U].

    entropy has x's dtype (or entropy_dtype); mean and variance ([U]) are in the accumulator
    dtype.
    """
    ddof = _validation.check_ddof(ddof)
    x = _validation.check_input(x, ddof, name=name)
    flat = _flatten(x)
    batch = _check_runtime_batch(flat, ddof, name)
    acc = flat.dtype
    mean = tf.reduce_mean(flat, axis=0)
    centered = flat - mean
    denom = tf.cast(batch - ddof, acc)
    variance = tf.reduce_sum(tf.square(centered), axis=0) / denom
    unit_entropy = entropy_from_variance(variance)
    entropy = tf.reduce_mean(unit_entropy)
    return tf.cast(entropy, entropy_dtype or x.dtype), mean, variance


def batch_entropy(x, ddof=1, dtype=None):
    """Batch entropy of one activation tensor [B, d1, ...]: a differentiable scalar."""
    return moments(x, ddof, entropy_dtype=dtype)[0]


def batch_entropies(xs, ddof=1, dtype=None):
    """Batch entropy of each tensor of a list, as a vector (tensors may differ in shape).

    The vector has `dtype`, by default the tensors' common dtype (float32, or float64 if any
    is float64, when they differ); every entry is computed in its own tensor's accumulator
    dtype.
    """
    ddof = _validation.check_ddof(ddof)
    xs = _validation.check_list(xs, ddof)
    out_dtype = _validation.result_dtype(xs, dtype)
    return tf.stack([moments(x, ddof, name=f"xs[{i}]", entropy_dtype=out_dtype)[0]
                     for i, x in enumerate(xs)])
