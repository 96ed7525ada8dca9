"""The pure-TensorFlow path of the batch-entropy math: backend "tf".

lbe_ops takes it where the compiled op cannot be used (no library, another TensorFlow, inside
XLA) or where LBE_OPS_BACKEND=tf or use_backend("tf") asks for it; the tests also compare the op
against it. Everything is written from the variance, never through
a square root, so constant ("dead") units get a zero, finite gradient in eager, graph and XLA
modes. Statistics are accumulated in float32 for half, bfloat16 and float32 inputs and in float64
for double. Each unit is first shifted by its value in row 0 (the pivot), then the mean is
subtracted before squaring (two passes): an offset far above the spread costs no accuracy, and a
constant unit has a variance and a gradient of exactly 0.

Statistics that are not finite (a sum of squares beyond the accumulator's range, or Inf or NaN in
the input) or so large that the gradient would underflow are recomputed in a branch taken only
then: in float64, on each unit's values scaled by a power of two 2^-k close to 1 / max |x|, so
that the entropy of finite input stays finite (0.5 * ln(pi*e * var + 1) of a variance beyond the
statistics' range is computed from var * 2^-2k) and its gradient accurate. A variance beyond the
statistics' range comes back as +Inf. The compiled op's wide path (csrc/core/batch_entropy_wide.h)
does the same. Under XLA (jit_compile) there is no such branch: there a sum of squares beyond the
accumulator's range gives an Inf variance and entropy.

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


def _pivot(flat):
    """Row 0 of flat [B, U] (0 where it is not finite, and for an empty batch), as a constant."""
    first = tf.reduce_sum(flat[:1], axis=0)
    return tf.stop_gradient(tf.where(tf.math.is_finite(first), first, tf.zeros_like(first)))


def _check_runtime_batch(flat, ddof, name):
    batch = tf.shape(flat)[0]
    if flat.shape[0] is None and not _in_xla_context():
        tf.debugging.assert_greater(
            batch, ddof,
            message=f"{name}: batch entropy with ddof={ddof} needs a batch of at least {ddof + 1}")


def _degrees_of_freedom(flat, batch, ddof):
    """B - ddof in flat's dtype. Under XLA, where a dynamic batch <= ddof cannot raise (XLA
    compiles assertions away), it is NaN instead: variance, entropy and their gradients are then
    NaN for every such batch, where B - ddof would give 0, inf or NaN depending on B."""
    dof = tf.cast(batch - ddof, flat.dtype)
    if flat.shape[0] is None and _in_xla_context():
        dof = tf.where(batch > ddof, dof, tf.constant(float("nan"), flat.dtype))
    return dof


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
    pivot = _pivot(flat)
    shifted = flat - pivot
    shifted_mean = tf.reduce_sum(shifted, axis=0) / tf.cast(tf.maximum(batch, 1), acc)
    sum_of_squares = tf.reduce_sum(tf.square(shifted - shifted_mean), axis=0)
    mean = (pivot + shifted_mean) * valid
    variance = sum_of_squares / tf.cast(tf.maximum(batch - ddof, 1), acc) * valid
    return mean, variance


def _moments_of_full_batch(flat, ddof):
    """Mean and variance of flat [B, U], B > ddof."""
    pivot = _pivot(flat)
    shifted = flat - pivot
    shifted_mean = tf.reduce_mean(shifted, axis=0)
    denom = _degrees_of_freedom(flat, tf.shape(flat)[0], ddof)
    variance = tf.reduce_sum(tf.square(shifted - shifted_mean), axis=0) / denom
    return pivot + shifted_mean, variance


# The wide branch is taken when max(variance) * U exceeds this (float32, float64 statistics):
# beyond it the entropy's gradient 0.5 * pi*e / (U * (pi*e * variance + 1)) nears the smallest
# normal number.
_WIDE_VARIANCE_TIMES_UNITS = {tf.float32: 2.0 ** 100, tf.float64: 2.0 ** 1000}


def _scale_exponents(values):
    """Per unit of values [B, U] (float64): k >= 0 with max |x| * 2^-k in [0.5, 1) (0 where max |x|
    is below 1 or not finite; at most 1022, so that 2^-k is a normal number), and 2^-k."""
    max_abs = tf.reduce_max(tf.abs(tf.stop_gradient(values)), axis=0)  # k is piecewise constant
    scaled = tf.logical_and(tf.math.is_finite(max_abs), max_abs >= 1.0)
    exponent_bits = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(tf.bitcast(tf.where(scaled, max_abs, 1.0), tf.int64), 52), 0x7ff)
    k = tf.where(scaled, tf.minimum(exponent_bits - 1022, 1022), tf.zeros_like(exponent_bits))
    c = tf.bitcast(tf.bitwise.left_shift(1023 - k, 52), tf.float64)
    return k, c


def _wide_statistics(flat, ddof, moments_fn):
    """(mean, variance, entropy) of flat [B, U] in float64, each unit scaled by 2^-k."""
    values = tf.cast(flat, tf.float64)
    k, c = _scale_exponents(values)
    scaled_mean, scaled_variance = moments_fn(values * c, ddof)
    mean = scaled_mean / c
    variance = scaled_variance / c / c
    # 0.5 * ln(pi*e * var + 1) = 0.5 * (ln(pi*e * var_s + 2^-2k) + 2k ln 2); the where()s keep
    # the unused branch free of log(0) (and its gradient free of NaN).
    zero_scaled = tf.logical_and(k > 0, scaled_variance == 0.0)
    safe_variance = tf.where(zero_scaled, tf.ones_like(scaled_variance), scaled_variance)
    log_form = 0.5 * (tf.math.log(PI_E * safe_variance + c * c)
                      + tf.cast(2 * k, tf.float64) * math.log(2.0))
    unit_entropy = tf.where(k == 0, entropy_from_variance(scaled_variance),
                            tf.where(zero_scaled, tf.zeros_like(log_form), log_form))
    return mean, variance, tf.reduce_mean(unit_entropy)


def _statistics(flat, ddof, allow_small_batch):
    """(mean, variance, entropy) of flat [B, U], in flat's dtype; see the module docstring."""
    moments_fn = _moments_allowing_small_batch if allow_small_batch else _moments_of_full_batch
    acc = flat.dtype
    mean, variance = moments_fn(flat, ddof)
    fast = (mean, variance, tf.reduce_mean(entropy_from_variance(variance)))
    if _in_xla_context():
        # XLA cannot differentiate this cond when the batch is dynamic (the gradient's
        # placeholders for the branch's [B, U] intermediates get a batch of 0): no wide branch.
        return fast
    units = tf.cast(tf.shape(flat)[1], acc)
    fits = tf.logical_and(tf.reduce_all(tf.math.is_finite(variance)),
                          tf.reduce_max(variance) * units <= _WIDE_VARIANCE_TIMES_UNITS[acc])

    def wide():
        return tuple(tf.cast(t, acc) for t in _wide_statistics(flat, ddof, moments_fn))

    return tf.cond(fits, lambda: fast, wide)


def moments(x, ddof=1, name="x", entropy_dtype=None, allow_small_batch=False):
    """Returns (entropy, mean, variance) of x viewed as [B, U].

    entropy has x's dtype (or entropy_dtype); mean and variance ([U]) are in the accumulator
    dtype. A batch B <= ddof is an error (ValueError if static, else a failed assertion at run
    time), unless allow_small_batch: then all three are 0 with zero gradients. Under XLA, which
    cannot raise at run time, a dynamic batch <= ddof gives a NaN entropy and variance (the mean
    is the batch mean: NaN for B = 0).
    """
    ddof = _validation.check_ddof(ddof)
    allow_small_batch = _validation.check_allow_small_batch(allow_small_batch)
    x = _validation.check_input(x, ddof, name=name, allow_small_batch=allow_small_batch)
    flat = _flatten(x)
    if not allow_small_batch:
        _check_runtime_batch(flat, ddof, name)
    mean, variance, entropy = _statistics(flat, ddof, allow_small_batch)
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
