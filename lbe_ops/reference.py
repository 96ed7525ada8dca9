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

Tensors that share their batch size (batch_entropies: the same static size, or same_batch=True,
as for the layer outputs of one Keras step) are computed together, side by side as one matrix
[B, U_0 + U_1 + ...]: a fixed number of ops for any number of tensors, and one wide-path decision
(one tf.cond) for all of them. Where one of them needs the wide path, the branch recomputes only
that tensor's units and only its entries change. The sums are those of one tensor at a time
(bit for bit where each tensor's U is a multiple of the SIMD width TensorFlow's column sums use,
8 float32 or 4 float64 values on AVX2; otherwise the order of a column's additions may differ).

With allow_small_batch, a batch B <= ddof gives entropy, mean and variance 0 with zero gradients,
computed without control flow (XLA cannot raise a run-time error) and without a 0/0 anywhere:
valid = float(B > ddof), mean = sum / max(B, 1) * valid, variance = M2 / max(B - ddof, 1) * valid.
"""

import itertools
import math

import numpy as np
import tensorflow as tf

from lbe_ops import _loader, _validation

PI_E = math.pi * math.e


def entropy_from_variance(variance):
    """Per-unit batch entropy 0.5 * ln(pi * e * variance + 1), in the variance's dtype."""
    return 0.5 * tf.math.log1p(tf.constant(PI_E, variance.dtype) * variance)


def _units(x):
    """x's number of units U (the product of its trailing dimensions) as a Python int, or None
    where it is not known statically."""
    return x.shape[1:].num_elements() if x.shape.rank is not None else None


def _flatten(x):
    """[B, d1, ...] -> [B, U] in the accumulator dtype. U is always spelled out: reshape cannot
    infer a -1 for U from an empty tensor (B = 0)."""
    units = _units(x)
    if units is None:
        shape = tf.shape(x)
        x = tf.reshape(x, tf.stack([shape[0], tf.reduce_prod(shape[1:])]))
    elif x.shape.rank != 2:
        x = tf.reshape(x, [-1, units])
    return tf.cast(x, _validation.accumulator_dtype(x.dtype))


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


# A tensor takes the wide path when max(variance) * U exceeds this (float32, float64 statistics),
# or a variance is not finite: beyond it the entropy's gradient 0.5 * pi*e / (U * (pi*e * variance
# + 1)) nears the smallest normal number.
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


def _wide_unit_statistics(columns, ddof, moments_fn):
    """Per-unit (mean, variance, entropy term) of columns [B, n] in float64, each unit scaled by
    2^-k."""
    values = tf.cast(columns, tf.float64)
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
    return mean, variance, unit_entropy


def _runs(units):
    """[(U, count)]: the lengths of the runs of equal consecutive entries of units."""
    return [(size, len(list(run))) for size, run in itertools.groupby(units)]


def _per_tensor(unit_values, units, reduce):
    """reduce(values, axis) of each tensor's entries of unit_values [S] (tensor 0's units[0]
    entries first), as a vector [N]. Consecutive tensors of equal U are reduced as the rows of
    one [count, U] matrix: the same sums, in the same order, as one reduction per tensor."""
    if len(units) == 1:
        return tf.reshape(reduce(unit_values, axis=None), [1])
    runs = _runs(units)
    parts, begin = [], 0
    for size, count in runs:
        block = unit_values if len(runs) == 1 else tf.slice(unit_values, [begin], [size * count])
        parts.append(reduce(tf.reshape(block, [count, size]), axis=1))
        begin += size * count
    return parts[0] if len(parts) == 1 else tf.concat(parts, 0)


def _per_unit(units, per_tensor_values, dtype):
    """A constant vector [S] holding per_tensor_values[i] at each of tensor i's units."""
    return tf.constant(np.repeat(per_tensor_values, units), dtype)


class _WideColumnsGradientGate:
    """An identity on the fast statistics' input whose gradient drops the units of the tensors
    that took the wide path, when any did.

    The fast statistics of such a tensor may not be finite (a sum beyond the accumulator's
    range); the wide branch passes them a zero gradient, which their backward pass would turn
    into NaN (0 * Inf). Which tensors took it is known only after the statistics are computed:
    `decide` records it before any gradient is taken.
    """

    def __init__(self):
        self._all_fit = None
        self._unit_fits = None

    def decide(self, all_fit, unit_fits):
        """all_fit: a scalar bool; unit_fits: a callable returning a bool vector [S], true for the
        units of the tensors whose fast statistics are used."""
        self._all_fit = all_fit
        self._unit_fits = unit_fits

    def __call__(self, flat):
        @tf.custom_gradient
        def gate(values):
            def gradient(upstream):
                return tf.cond(self._all_fit, lambda: upstream,
                               lambda: tf.where(self._unit_fits(), upstream,
                                                tf.zeros_like(upstream)))
            return tf.identity(values), gradient

        return gate(flat)


def _group_statistics(flats, units, ddof, allow_small_batch):
    """(mean [S], variance [S], entropies [N]) of flats: N tensors [B, U_i] of one accumulator
    dtype that share their batch B, units[i] = U_i (Python ints; a dynamic U only for N = 1).
    The statistics are computed once for all units of the group (its tensors side by side), in
    the accumulator dtype; see the module docstring.

    One decision for the group: when every tensor's fast statistics fit, they are the result;
    otherwise a branch recomputes the units of the tensors that do not fit on the wide path, and
    only those tensors' entries change.
    """
    acc = flats[0].dtype
    flat = flats[0] if len(flats) == 1 else tf.concat(flats, axis=1)
    moments_fn = _moments_allowing_small_batch if allow_small_batch else _moments_of_full_batch
    if _in_xla_context():
        # XLA cannot differentiate the wide branch's cond when the batch is dynamic (the
        # gradient's placeholders for its [B, U] intermediates get a batch of 0): no wide branch.
        mean, variance = moments_fn(flat, ddof)
        return mean, variance, _per_tensor(entropy_from_variance(variance), units, tf.reduce_mean)
    gate = _WideColumnsGradientGate()
    mean, variance = moments_fn(gate(flat), ddof)
    entropies = _per_tensor(entropy_from_variance(variance), units, tf.reduce_mean)
    if len(units) == 1:
        unit_units = tf.cast(tf.shape(flat)[1], acc)
    else:
        unit_units = _per_unit(units, units, acc)
    # False for a variance that is not finite (Inf * U, NaN) as for one too large.
    unit_small_enough = variance * unit_units <= _WIDE_VARIANCE_TIMES_UNITS[acc]
    tensor_fits = _per_tensor(unit_small_enough, units, tf.reduce_all)
    all_fit = tf.reduce_all(tensor_fits)

    def unit_fits():
        if len(units) == 1:
            return tf.fill(tf.shape(variance), tensor_fits[0])
        return tf.gather(tensor_fits, _per_unit(units, range(len(units)), tf.int32))

    gate.decide(all_fit, unit_fits)

    def with_wide_tensors():
        wide_units = tf.where(tf.logical_not(unit_fits()))  # [n, 1]
        wide_mean, wide_variance, wide_unit_entropy = _wide_unit_statistics(
            tf.gather(flat, wide_units[:, 0], axis=1), ddof, moments_fn)
        unit_entropy = tf.scatter_nd(wide_units, wide_unit_entropy,
                                     tf.shape(variance, out_type=tf.int64))
        wide_entropies = tf.cast(_per_tensor(unit_entropy, units, tf.reduce_mean), acc)
        return (tf.tensor_scatter_nd_update(mean, wide_units, tf.cast(wide_mean, acc)),
                tf.tensor_scatter_nd_update(variance, wide_units, tf.cast(wide_variance, acc)),
                tf.where(tensor_fits, entropies, wide_entropies))

    return tf.cond(all_fit, lambda: (mean, variance, entropies), with_wide_tensors)


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
    mean, variance, entropies = _group_statistics([flat], [_units(x)], ddof, allow_small_batch)
    return tf.cast(entropies[0], entropy_dtype or x.dtype), mean, variance


def batch_entropy(x, ddof=1, dtype=None, allow_small_batch=False):
    """Batch entropy of one activation tensor [B, d1, ...]: a differentiable scalar (0, with a
    zero gradient, for a batch <= ddof if allow_small_batch; else that is an error)."""
    return moments(x, ddof, entropy_dtype=dtype, allow_small_batch=allow_small_batch)[0]


def _group_order(units):
    """Sort key of a tensor within its group: tensors of equal U next to each other (they are
    reduced together), those whose U is a multiple of 16, then of 8, first: their columns then
    start at such multiples, and TensorFlow's column sums, which work on SIMD packets of up to 16
    values, add them exactly as for the tensor alone."""
    return units % 16 != 0, units % 8 != 0, units


def _groups(xs, same_batch):
    """The tensors of xs computed together, as lists of indices: one accumulator dtype, one batch
    (the same static size, or any where same_batch promises it), static U; each list in
    _group_order. Others are alone."""
    groups = {}
    for i, x in enumerate(xs):
        batch = "shared" if same_batch else x.shape[0] if x.shape.rank is not None else None
        if _units(x) is None or batch is None:
            key = ("alone", i)
        else:
            key = (_validation.accumulator_dtype(x.dtype), batch)
        groups.setdefault(key, []).append(i)
    return [sorted(indices, key=lambda i: _group_order(_units(xs[i]))) for indices in
            groups.values()]


def entropies_of_checked(xs, ddof, dtype, allow_small_batch, same_batch, name="xs"):
    """batch_entropies of tensors that passed its argument checks: the vector [len(xs)] in
    `dtype`, each entry computed in its own tensor's accumulator dtype."""
    parts, order = [], []
    for indices in _groups(xs, same_batch):
        flats = [_flatten(xs[i]) for i in indices]
        if not allow_small_batch:
            _check_runtime_batch(flats[0], ddof, f"{name}[{indices[0]}]")
        parts.append(tf.cast(_group_statistics(
            flats, [_units(xs[i]) for i in indices], ddof, allow_small_batch)[2], dtype))
        order += indices
    values = parts[0] if len(parts) == 1 else tf.concat(parts, 0)
    if order == list(range(len(xs))):
        return values
    return tf.gather(values, np.argsort(order))


def batch_entropies(xs, ddof=1, dtype=None, allow_small_batch=False, same_batch=False):
    """Batch entropy of each tensor of a list, as a vector (tensors may differ in shape).

    The vector has `dtype`, by default the tensors' common dtype (float32, or float64 if any
    is float64, when they differ); every entry is computed in its own tensor's accumulator
    dtype. With allow_small_batch, a tensor whose batch is <= ddof gets 0 (zero gradient).
    Tensors of one accumulator dtype and one batch size are computed together, in a few ops for
    all of them: those of the same static batch size, or all of them with same_batch=True, a
    promise that they have the same batch size at run time (as the layer outputs of one model
    step do).
    """
    ddof = _validation.check_ddof(ddof)
    allow_small_batch = _validation.check_allow_small_batch(allow_small_batch)
    same_batch = _validation.check_same_batch(same_batch)
    xs = _validation.check_list(xs, ddof, allow_small_batch=allow_small_batch,
                                same_batch=same_batch)
    return entropies_of_checked(xs, ddof, _validation.result_dtype(xs, dtype), allow_small_batch,
                                same_batch)
