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
as for the layer outputs of one Keras step) are computed together: those of equal U stacked into
one [count, B, U] tensor, a fixed number of ops for any number of them, and one wide-path
decision (one tf.cond) for all. Where one of them needs the wide path, the branch recomputes only
that tensor and only its entries change. Each tensor's sums are those it gets alone, bit for bit.

The gradient of the fast statistics is written out (a custom gradient, one pass over the group),
as the op's gradient kernel computes it: dx = (x - mean) * variance_slope * (g_variance + g_H *
dH/dvariance) + g_mean / B, with (x - mean) the deviations of the shifted values of the forward
pass. TensorFlow's own gradient of the forward ops takes several passes more (it also sends each
unit the sum of its deviations' gradients through the mean: zero but for rounding); it is what
differentiates the wide path, and under XLA, which fuses it. The written-out gradient is itself
differentiable (second order).
"""

import collections
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


def _pivot(values):
    """Row 0 of values [..., B, U] as [..., 1, U] (0 where it is not finite, and for an empty
    batch), as a constant."""
    first = tf.reduce_sum(values[..., :1, :], axis=-2, keepdims=True)
    return tf.stop_gradient(tf.where(tf.math.is_finite(first), first, tf.zeros_like(first)))


def _check_runtime_batch(flat, ddof, name):
    batch = tf.shape(flat)[0]
    if flat.shape[0] is None and not _in_xla_context():
        tf.debugging.assert_greater(
            batch, ddof,
            message=f"{name}: batch entropy with ddof={ddof} needs a batch of at least {ddof + 1}")


def _degrees_of_freedom(values, batch, ddof):
    """B - ddof in values' dtype. Under XLA, where a dynamic batch <= ddof cannot raise (XLA
    compiles assertions away), it is NaN instead: variance, entropy and their gradients are then
    NaN for every such batch, where B - ddof would give 0, inf or NaN depending on B."""
    dof = tf.cast(batch - ddof, values.dtype)
    if values.shape[-2] is None and _in_xla_context():
        dof = tf.where(batch > ddof, dof, tf.constant(float("nan"), values.dtype))
    return dof


def _in_xla_context():
    return _loader.in_xla_context()


class _Moments(collections.namedtuple(
        "_Moments", "mean variance deviations mean_slope variance_slope")):
    """Of values [..., B, U]: mean and variance [..., U]; deviations [..., B, U] (each value minus
    its unit's mean, from the shifted values); the scalars d mean / d x and variance_slope, with
    d variance / d x = deviations * variance_slope (the mean's own path adds nothing: the
    deviations sum to 0)."""


def _moments_allowing_small_batch(values, ddof):
    """_Moments of values [..., B, U]; mean and variance 0 (with zero gradients) where B <= ddof.

    Every divisor is at least 1 and every 0 comes from a multiplication by valid, so no
    intermediate value or gradient is NaN for B = 0 or 1. Where B > ddof, valid = 1 and the
    results are those of the plain path: bit for bit in eager mode and under XLA (a sum divided
    by the count is what reduce_mean computes), to rounding in graph mode, where Grappler
    rewrites the two paths differently."""
    batch = tf.shape(values)[-2]
    acc = values.dtype
    valid = tf.cast(batch > ddof, acc)
    count = tf.cast(tf.maximum(batch, 1), acc)
    dof = tf.cast(tf.maximum(batch - ddof, 1), acc)
    pivot = _pivot(values)
    shifted = values - pivot
    shifted_mean = tf.reduce_sum(shifted, axis=-2, keepdims=True) / count
    deviations = shifted - shifted_mean
    sum_of_squares = tf.reduce_sum(tf.square(deviations), axis=-2)
    mean = tf.squeeze(pivot + shifted_mean, -2) * valid
    return _Moments(mean, sum_of_squares / dof * valid, deviations, valid / count, 2 * valid / dof)


def _moments_of_full_batch(values, ddof):
    """_Moments of values [..., B, U], B > ddof."""
    batch = tf.shape(values)[-2]
    pivot = _pivot(values)
    shifted = values - pivot
    shifted_mean = tf.reduce_mean(shifted, axis=-2, keepdims=True)
    deviations = shifted - shifted_mean
    dof = _degrees_of_freedom(values, batch, ddof)
    return _Moments(tf.squeeze(pivot + shifted_mean, -2),
                    tf.reduce_sum(tf.square(deviations), axis=-2) / dof, deviations,
                    1 / tf.cast(batch, values.dtype), 2 / dof)


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


def _wide_statistics(run, rows, ddof, moments_fn):
    """(mean [n, U], variance [n, U], entropy [n]) in float64 of the tensors `rows` [n] of a run
    [count, B, U], each unit scaled by 2^-k."""
    chosen = tf.gather(run, rows)
    shape = tf.shape(chosen)
    # [B, n * U]: every unit a column, as _scale_exponents takes them.
    columns = tf.reshape(tf.transpose(tf.cast(chosen, tf.float64), [1, 0, 2]),
                         tf.stack([shape[1], shape[0] * shape[2]]))
    k, c = _scale_exponents(columns)
    scaled = moments_fn(columns * c, ddof)
    mean = scaled.mean / c
    variance = scaled.variance / c / c
    # 0.5 * ln(pi*e * var + 1) = 0.5 * (ln(pi*e * var_s + 2^-2k) + 2k ln 2); the where()s keep
    # the unused branch free of log(0) (and its gradient free of NaN).
    zero_scaled = tf.logical_and(k > 0, scaled.variance == 0.0)
    safe_variance = tf.where(zero_scaled, tf.ones_like(scaled.variance), scaled.variance)
    log_form = 0.5 * (tf.math.log(PI_E * safe_variance + c * c)
                      + tf.cast(2 * k, tf.float64) * math.log(2.0))
    unit_entropy = tf.where(k == 0, entropy_from_variance(scaled.variance),
                            tf.where(zero_scaled, tf.zeros_like(log_form), log_form))
    per_tensor = shape[::2]  # [n, U]
    return (tf.reshape(mean, per_tensor), tf.reshape(variance, per_tensor),
            tf.reduce_mean(tf.reshape(unit_entropy, per_tensor), axis=1))


def _runs(flats, units):
    """The tensors flats [B, U_i] stacked by runs of equal consecutive U: [count, B, U] each."""
    runs, begin = [], 0
    for _, run in itertools.groupby(units):
        count = len(list(run))
        members = flats[begin:begin + count]
        runs.append(tf.expand_dims(members[0], 0) if count == 1 else tf.stack(members))
        begin += count
    return runs


def _split_by_run(values, runs, per_unit=True):
    """values [S] (per_unit) or [N] as one piece per run, [count, U] or [count]; None stays None.
    """
    if values is None:
        return [None] * len(runs)
    if len(runs) == 1:
        return [tf.reshape(values, [runs[0].shape[0], -1]) if per_unit else values]
    sizes = [run.shape[0] * (run.shape[-1] if per_unit else 1) for run in runs]
    pieces = tf.split(values, sizes)
    return [tf.reshape(piece, [run.shape[0], -1]) if per_unit else piece
            for piece, run in zip(pieces, runs)]


def _fast_gradient(moments, g_entropies, g_mean, g_variance):
    """d/d run of g_entropies . H [+ g_mean . mean + g_variance . variance] (None: no such term)
    from the fast statistics of a run [count, B, U], as the op's gradient kernel computes it:

        dx = deviations * variance_slope * (g_variance + dH/dvariance) + g_mean * mean_slope,
        dH_i/dvariance_j = 0.5 pi e / (U (pi e variance_j + 1))   for unit j of tensor i.
    """
    acc = moments.variance.dtype
    units = tf.cast(tf.shape(moments.variance)[-1], acc)
    g_unit_variance = (g_entropies[:, None] / units) * (0.5 * PI_E) / (
        PI_E * moments.variance + 1)
    if g_variance is not None:
        g_unit_variance += g_variance
    dx = moments.deviations * (g_unit_variance * moments.variance_slope)[:, None, :]
    if g_mean is not None:
        dx += (g_mean * moments.mean_slope)[:, None, :]
    return dx


def _group_statistics(flats, units, ddof, allow_small_batch, with_moments=True):
    """(mean [S], variance [S], entropies [N]) of flats, or the entropies alone without
    with_moments: N tensors [B, U_i] of one accumulator dtype that share their batch B, units[i]
    = U_i (Python ints; a dynamic U only for N = 1). The tensors of each run of equal U are
    stacked, [count, B, U], and their statistics computed together, in the accumulator dtype;
    see the module docstring.

    One decision for the group: when every tensor's fast statistics fit, they are the result and
    the gradient is _fast_gradient's (one pass over the group); otherwise a branch recomputes the
    tensors that do not fit on the wide path, only their entries change, and their gradient is
    TensorFlow's of that computation. Under XLA: the fast statistics of one tensor at a time,
    TensorFlow's gradient, no wide path.
    """
    moments_fn = _moments_allowing_small_batch if allow_small_batch else _moments_of_full_batch

    def chosen(means, variances, entropies):
        entropies = tf.concat(entropies, 0) if len(entropies) > 1 else entropies[0]
        if not with_moments:
            return entropies
        flat_means, flat_variances = ([tf.reshape(t, [-1]) for t in ts]
                                      for ts in (means, variances))
        return (tf.concat(flat_means, 0) if len(flat_means) > 1 else flat_means[0],
                tf.concat(flat_variances, 0) if len(flat_variances) > 1 else flat_variances[0],
                entropies)

    if _in_xla_context():
        # One tensor at a time, differentiated by TensorFlow: XLA fuses each tensor's statistics
        # and their gradient with the ops around them, where a stack would be a copy of its own.
        # XLA cannot differentiate the wide branch's cond when the batch is dynamic (the
        # gradient's placeholders for its [B, U] intermediates get a batch of 0): no wide branch.
        fast = [moments_fn(flat, ddof) for flat in flats]
        return chosen([m.mean for m in fast], [m.variance for m in fast],
                      [tf.reshape(tf.reduce_mean(entropy_from_variance(m.variance)), [1])
                       for m in fast])

    @tf.custom_gradient
    def statistics(*runs):
        acc = runs[0].dtype
        fast = [moments_fn(run, ddof) for run in runs]
        entropies = [tf.reduce_mean(entropy_from_variance(m.variance), -1) for m in fast]
        fast_outputs = chosen([m.mean for m in fast], [m.variance for m in fast], entropies)
        fits = [tf.reduce_all(
            m.variance * tf.cast(tf.shape(run)[-1], acc) <= _WIDE_VARIANCE_TIMES_UNITS[acc], -1)
            for m, run in zip(fast, runs)]  # false for an Inf or NaN variance too
        all_fit = tf.reduce_all(tf.concat(fits, 0)) if len(fits) > 1 else tf.reduce_all(fits[0])

        def wide_rows(run_fits):
            return tf.where(tf.logical_not(run_fits))[:, 0]

        def with_wide_tensors():
            merged = ([], [], [])
            for run, m, run_entropies, run_fits in zip(runs, fast, entropies, fits):
                rows = wide_rows(run_fits)
                wide = _wide_statistics(run, rows, ddof, moments_fn)
                for values, fast_values, wide_values in zip(
                        merged, (m.mean, m.variance, run_entropies), wide):
                    values.append(tf.tensor_scatter_nd_update(fast_values, rows[:, None],
                                                              tf.cast(wide_values, acc)))
            return chosen(*merged)

        outputs = tf.cond(all_fit, lambda: fast_outputs, with_wide_tensors)

        def gradient(*upstream):
            upstream = [None if g is None else tf.convert_to_tensor(g) for g in upstream]
            g_mean, g_variance, g_entropies = upstream if with_moments else [None, None] + upstream
            grads_per_run = list(zip(_split_by_run(g_entropies, runs, per_unit=False),
                                     _split_by_run(g_mean, runs), _split_by_run(g_variance, runs)))

            def fast_gradients():
                return [_fast_gradient(m, *grads) for m, grads in zip(fast, grads_per_run)]

            def with_wide_tensors_gradients():
                dxs = []
                for run, m, run_fits, grads in zip(runs, fast, fits, grads_per_run):
                    rows = wide_rows(run_fits)
                    with tf.GradientTape() as tape:
                        tape.watch(run)
                        wide = _wide_statistics(run, rows, ddof, moments_fn)
                    given = [(output, tf.cast(tf.gather(grad, rows), tf.float64))
                             for output, grad in zip((wide[2],) + wide[:2], grads)
                             if grad is not None]
                    wide_dx = tape.gradient([output for output, _ in given], run,
                                            output_gradients=[grad for _, grad in given])
                    # The wide tensors' part of the fast gradient is left out: their fast
                    # statistics are not used, and 0 * Inf in it would be NaN.
                    dxs.append(tf.where(run_fits[:, None, None], _fast_gradient(m, *grads),
                                        tf.zeros_like(run)) + tf.convert_to_tensor(wide_dx))
                return dxs

            return tf.cond(all_fit, fast_gradients, with_wide_tensors_gradients)

        return outputs, gradient

    return statistics(*_runs(flats, units))


def _one_tensor(x, ddof, name, allow_small_batch, with_moments):
    """x as a checked tensor, and _group_statistics of it alone."""
    ddof = _validation.check_ddof(ddof)
    allow_small_batch = _validation.check_allow_small_batch(allow_small_batch)
    x = _validation.check_input(x, ddof, name=name, allow_small_batch=allow_small_batch)
    flat = _flatten(x)
    if not allow_small_batch:
        _check_runtime_batch(flat, ddof, name)
    return x, _group_statistics([flat], [_units(x)], ddof, allow_small_batch, with_moments)


def moments(x, ddof=1, name="x", entropy_dtype=None, allow_small_batch=False):
    """Returns (entropy, mean, variance) of x viewed as [B, U].

    entropy has x's dtype (or entropy_dtype); mean and variance ([U]) are in the accumulator
    dtype. A batch B <= ddof is an error (ValueError if static, else a failed assertion at run
    time), unless allow_small_batch: then all three are 0 with zero gradients. Under XLA, which
    cannot raise at run time, a dynamic batch <= ddof gives a NaN entropy and variance (the mean
    is the batch mean: NaN for B = 0).
    """
    x, (mean, variance, entropies) = _one_tensor(x, ddof, name, allow_small_batch, True)
    return tf.cast(entropies[0], entropy_dtype or x.dtype), mean, variance


def batch_entropy(x, ddof=1, dtype=None, allow_small_batch=False):
    """Batch entropy of one activation tensor [B, d1, ...]: a differentiable scalar in x's dtype
    or `dtype` (0, with a zero gradient, for a batch <= ddof if allow_small_batch; else that is
    an error)."""
    x, entropies = _one_tensor(x, ddof, "x", allow_small_batch, False)
    return tf.cast(entropies[0], dtype or x.dtype)


def _groups(xs, same_batch):
    """The tensors of xs computed together, as lists of indices: one accumulator dtype, one batch
    (the same static size, or any where same_batch promises it), static U; each list sorted by U
    (stable), so that tensors of equal U are stacked together. Others are alone."""
    groups = {}
    for i, x in enumerate(xs):
        batch = "shared" if same_batch else x.shape[0] if x.shape.rank is not None else None
        if _units(x) is None or batch is None:
            key = ("alone", i)
        else:
            key = (_validation.accumulator_dtype(x.dtype), batch)
        groups.setdefault(key, []).append(i)
    return [sorted(indices, key=lambda i: _units(xs[i])) for indices in groups.values()]


def entropies_of_checked(xs, ddof, dtype, allow_small_batch, same_batch, name="xs"):
    """batch_entropies of tensors that passed its argument checks: the vector [len(xs)] in
    `dtype`, each entry computed in its own tensor's accumulator dtype."""
    parts, order = [], []
    for indices in _groups(xs, same_batch):
        flats = [_flatten(xs[i]) for i in indices]
        if not allow_small_batch:
            _check_runtime_batch(flats[0], ddof, f"{name}[{indices[0]}]")
        parts.append(tf.cast(_group_statistics(flats, [_units(xs[i]) for i in indices], ddof,
                                               allow_small_batch, with_moments=False), dtype))
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
