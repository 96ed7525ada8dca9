"""batch_entropy and batch_entropies: the compiled op where it can run, pure TensorFlow elsewhere.

Ops (registered by the library): Lbe>BatchEntropy / Lbe>BatchEntropyGrad for one tensor and
Lbe>BatchEntropies / Lbe>BatchEntropiesGrad for a group. Each forward op returns the entropy (in
the input dtype), the per-unit mean and variance (float32, or float64 for double inputs) and,
with the attribute num_residuals=1 that lbe_ops always sets, the mean's rounding residual (the
exact mean minus the rounded one), which the gradient op uses to compute dx in one pass over x,
centred exactly at any offset. The grouped op returns the statistics of all its tensors in one
flat vector each (tensor 0's units first). Graphs written with num_residuals=0 (the ops' first
interface) still load; their gradients are centred on the rounded mean.

A batch <= ddof has no variance, and is an error by default. With allow_small_batch=True (the
ops' attribute of that name) such a tensor is treated as a constant instead: entropy, mean and
variance 0, gradient 0; for the last batch of an epoch (1 sample) or the empty per-replica batch of
a distribution strategy (0 samples). Under XLA, where nothing can raise at run time, a dynamic
batch <= ddof without allow_small_batch gives a NaN entropy and variance (see reference.moments).

The gradient ops have registered gradients too (their partials as TensorFlow ops), so gradients
of any order work on the op path.
"""

import numpy as np
import tensorflow as tf

from lbe_ops import _loader, _validation, reference


def _stats_dtype(dtype):
    return _validation.accumulator_dtype(dtype)


def _zeros_if_none(grad, like):
    # An empty vector tells the gradient kernel "no gradient reached this output": no zeros
    # tensor of the statistics' size is built or read.
    return tf.zeros([0], like.dtype) if grad is None else grad


def _op_single(x, ddof, allow_small_batch):
    module = _loader.op_module()
    return module.lbe_batch_entropy(x, ddof=ddof, allow_small_batch=allow_small_batch,
                                    Tstats=_stats_dtype(x.dtype), num_residuals=1)


def _op_group(xs, ddof, allow_small_batch):
    module = _loader.op_module()
    return module.lbe_batch_entropies(xs, ddof=ddof, allow_small_batch=allow_small_batch,
                                      Tstats=_stats_dtype(xs[0].dtype), num_residuals=1)


def _absent(grad):
    """True for a statistics gradient passed as the empty vector ("none reached this output")."""
    return grad.shape.rank == 1 and grad.shape[0] == 0


def _fill_if_empty(grad, size):
    """A statistics gradient of unknown static length: the vector itself, or zeros of `size`
    where it is the empty "none" vector at run time."""
    return tf.cond(tf.size(grad) > 0, lambda: grad,
                   lambda: tf.zeros(tf.reshape(size, [1]), grad.dtype))


def _empty_if(grad_input, partial):
    return tf.cond(tf.size(grad_input) > 0, lambda: partial, lambda: tf.zeros([0], partial.dtype))


def _gradient_op_partials(xs, means, variances, grad_entropies, grad_means, grad_variances,
                          mean_residuals, upstream, ddof, allow_small_batch):
    """Partial derivatives of the gradient ops' dx with respect to each of their inputs, as TF
    ops, given the gradients `upstream` that reach each dx (None: nothing reached it).
    mean_residuals is the ops' list of 0 or 1 residual inputs; the partials come back likewise.

    Per tensor, with c = B - ddof, D_j = pi*e*v_j + 1, r = x - mean - mean_residual, the
    gradient op computes
        dx[b, j] = r[b, j] * s_j + g_mean_j / B,  s_j = g_H * pi*e / (U c D_j) + 2 g_var_j / c,
    a function of x, mean, variance, g_H, g_mean, g_var and the residual taken as independent
    inputs (mean and variance come from the forward op, whose gradient carries their share back
    to x; the residual, a rounding error, has none). Arithmetic is in the statistics' dtype; with
    allow_small_batch, a tensor whose batch is <= ddof has dx = 0 and every partial 0.
    """
    stats = means.dtype
    units = [_units(x) for x in xs]
    static_units = all(isinstance(u, int) for u in units)
    total = sum(units) if static_units else tf.add_n(units)
    offsets = np.cumsum([0] + units).tolist() if static_units else \
        tf.unstack(tf.cumsum(tf.stack([0] + units)))
    with_mean = not _absent(grad_means)
    with_variance = not _absent(grad_variances)
    residual_input = mean_residuals[0] if mean_residuals else None
    with_residual = residual_input is not None and not _absent(residual_input)
    # dx is g_mean / B plus terms free of g_mean: only g_variance's values are needed here.
    full_variance = (_fill_if_empty(grad_variances, total) if grad_variances.shape[0] is None
                     else grad_variances)
    full_residual = (_fill_if_empty(residual_input, total)
                     if with_residual and residual_input.shape[0] is None else residual_input)
    pie = tf.constant(reference.PI_E, stats)
    d_xs, d_means, d_variances, d_entropies, d_grad_means, d_grad_variances = ([] for _ in range(6))
    for i, (x, u) in enumerate(zip(xs, units)):
        begin, size = offsets[i], u
        mean = tf.slice(means, [begin], [size])
        variance = tf.slice(variances, [begin], [size])
        residual = tf.slice(full_residual, [begin], [size]) if with_residual else 0
        if upstream[i] is None:
            zeros = tf.zeros(tf.reshape(size, [1]), stats)
            d_xs.append(tf.zeros_like(x))
            d_means.append(zeros)
            d_variances.append(zeros)
            d_entropies.append(tf.zeros([], stats))
            d_grad_means.append(zeros)
            d_grad_variances.append(zeros)
            continue
        batch = tf.shape(x)[0]
        flat_x = tf.reshape(tf.cast(x, stats), tf.stack([batch, size]))
        flat_w = tf.reshape(tf.cast(upstream[i], stats), tf.stack([batch, size]))
        dof = tf.cast(tf.maximum(batch - ddof, 1), stats)
        count = tf.cast(tf.maximum(batch, 1), stats)
        valid = tf.cast(batch > ddof, stats) if allow_small_batch else tf.constant(1, stats)
        denominator = pie * variance + 1
        entropy_factor = pie / (tf.cast(size, stats) * dof) / denominator       # [U]
        g_entropy = tf.cast(grad_entropies[i], stats)
        scale = g_entropy * entropy_factor
        if with_variance:
            g_variance = tf.slice(full_variance, [begin], [size])
            scale += 2 * g_variance / dof
        w_sum = tf.reduce_sum(flat_w, axis=0) * valid                          # [U]
        w_r = tf.reduce_sum(flat_w * ((flat_x - mean) - residual), axis=0) * valid  # [U]
        d_xs.append(tf.cast(tf.reshape(flat_w * (scale * valid), tf.shape(x)), x.dtype))
        d_means.append(-w_sum * scale)
        d_variances.append(-w_r * g_entropy * entropy_factor * pie / denominator)
        d_entropies.append(tf.reduce_sum(w_r * entropy_factor))
        d_grad_means.append(w_sum / count)
        d_grad_variances.append(w_r * 2 / dof)
    d_grad_means = tf.concat(d_grad_means, 0)
    d_grad_variances = tf.concat(d_grad_variances, 0)
    if not with_mean:
        d_grad_means = tf.zeros([0], stats)
    elif grad_means.shape[0] is None:
        d_grad_means = _empty_if(grad_means, d_grad_means)
    if not with_variance:
        d_grad_variances = tf.zeros([0], stats)
    elif grad_variances.shape[0] is None:
        d_grad_variances = _empty_if(grad_variances, d_grad_variances)
    d_means = tf.concat(d_means, 0)
    # The residual enters dx exactly as the mean does.
    if residual_input is None:
        d_residuals = []
    elif not with_residual:
        d_residuals = [tf.zeros([0], stats)]
    elif residual_input.shape[0] is None:
        d_residuals = [_empty_if(residual_input, d_means)]
    else:
        d_residuals = [d_means]
    return (d_xs, d_means, tf.concat(d_variances, 0),
            tf.cast(tf.stack(d_entropies), grad_entropies.dtype), d_grad_means, d_grad_variances,
            d_residuals)


def _register_gradients():
    # The forward ops' outputs after the first three are their 0 or 1 mean residuals (see the
    # module docstring), handed on to the gradient op. A residual is a rounding error: no
    # gradient flows through it; the mean output carries the mean's.
    @tf.RegisterGradient("Lbe>BatchEntropy")
    def _batch_entropy_grad(op, grad_entropy, grad_mean, grad_variance, *_unused_grad_residual):
        x = op.inputs[0]
        _, mean, variance, *residual = op.outputs
        return _loader.op_module().lbe_batch_entropy_grad(
            x, mean, variance, grad_entropy,
            _zeros_if_none(grad_mean, mean), _zeros_if_none(grad_variance, variance), residual,
            ddof=op.get_attr("ddof"), allow_small_batch=op.get_attr("allow_small_batch"))

    @tf.RegisterGradient("Lbe>BatchEntropies")
    def _batch_entropies_grad(op, grad_entropies, grad_means, grad_variances,
                              *_unused_grad_residuals):
        _, means, variances, *residuals = op.outputs
        return _loader.op_module().lbe_batch_entropies_grad(
            list(op.inputs), means, variances, grad_entropies,
            _zeros_if_none(grad_means, means), _zeros_if_none(grad_variances, variances),
            residuals,
            ddof=op.get_attr("ddof"), allow_small_batch=op.get_attr("allow_small_batch"))

    # Second order (a gradient penalty, a Hessian-vector product): the gradient ops' own gradients.
    @tf.RegisterGradient("Lbe>BatchEntropyGrad")
    def _batch_entropy_grad_grad(op, grad_dx):
        x, mean, variance, grad_entropy, grad_mean, grad_variance, *residual = op.inputs
        d_xs, d_mean, d_variance, d_entropy, d_grad_mean, d_grad_variance, d_residual = (
            _gradient_op_partials(
                [x], mean, variance, tf.reshape(grad_entropy, [1]), grad_mean, grad_variance,
                residual, [grad_dx], op.get_attr("ddof"), op.get_attr("allow_small_batch")))
        return (d_xs[0], d_mean, d_variance, tf.reshape(d_entropy, []), d_grad_mean,
                d_grad_variance, *d_residual)

    @tf.RegisterGradient("Lbe>BatchEntropiesGrad")
    def _batch_entropies_grad_grad(op, *grad_dxs):
        count = op.get_attr("N")
        inputs = list(op.inputs)
        xs, stats, residual = inputs[:count], inputs[count:count + 5], inputs[count + 5:]
        d_xs, *partials, d_residual = _gradient_op_partials(
            xs, *stats, residual, list(grad_dxs), op.get_attr("ddof"),
            op.get_attr("allow_small_batch"))
        return (*d_xs, *partials, *d_residual)


_register_gradients()


def batch_entropy_moments(x, ddof=1, allow_small_batch=False):
    """Returns (entropy, mean, variance) of x viewed as [B, U]; differentiable in all three.

    A batch B <= ddof raises an error, unless allow_small_batch: then all three are 0 and the
    gradient is 0 (x is treated as a constant).
    """
    ddof = _validation.check_ddof(ddof)
    allow_small_batch = _validation.check_allow_small_batch(allow_small_batch)
    x = _validation.check_input(x, ddof, allow_small_batch=allow_small_batch)
    if _loader.use_op():
        entropy, mean, variance, _ = _op_single(x, ddof, allow_small_batch)
        return entropy, mean, variance
    return reference.moments(x, ddof, allow_small_batch=allow_small_batch)


_HALF_DTYPES = (tf.float16, tf.bfloat16)


def _wider_than(dtype, input_dtype):
    """True when the result dtype keeps more precision than the op's half-precision output."""
    return input_dtype in _HALF_DTYPES and dtype not in _HALF_DTYPES


def _entropies_from_variances(variances, units, dtype):
    """Entropies from the ops' flat float32 variances (tensor i's `units[i]` values one after
    another), for results wider than a half input: the vector is never rounded to 8 or 11 bits.
    Gradients flow through the variance output."""
    unit_entropy = reference.entropy_from_variance(variances)
    if all(isinstance(u, int) for u in units):
        segment_ids = tf.constant(np.repeat(np.arange(len(units), dtype=np.int32), units))
    else:
        segment_ids = tf.repeat(tf.range(len(units)), tf.stack(units))
    return tf.cast(tf.math.segment_mean(unit_entropy, segment_ids), dtype)


def _units(x):
    """x's number of units (a Python int where the shape is static, else a scalar tensor)."""
    static = x.shape[1:].num_elements()
    if static is not None:
        return int(static)
    return tf.cast(tf.reduce_prod(tf.shape(x)[1:]), tf.int32)


def batch_entropy(x, ddof=1, dtype=None, allow_small_batch=False):
    """The batch entropy of one activation tensor [B, d1, ...]: a differentiable scalar.

    H = mean_j 0.5 * ln(pi * e * var_j + 1) over the units j (the flattened trailing
    dimensions), with var_j the variance over the batch with `ddof` delta degrees of freedom.
    The result has x's dtype, or `dtype` (e.g. tf.float32 for float16 activations: computed
    from the float32 statistics, not rounded to half precision first).

    A batch B <= ddof (1 sample with ddof=1, or none) has no variance: a ValueError where the
    batch is static, else an InvalidArgumentError at run time, or NaN inside XLA (which cannot
    raise). With allow_small_batch=True such a batch gives H = 0 with a zero gradient instead
    (for a last batch of 1 sample, or an empty per-replica batch under a distribution strategy).

    x must be one dense tensor; a list of tensors is a TypeError (use batch_entropies).
    """
    ddof = _validation.check_ddof(ddof)
    allow_small_batch = _validation.check_allow_small_batch(allow_small_batch)
    x = _validation.check_input(x, ddof, allow_small_batch=allow_small_batch)
    dtype = _validation.result_dtype([x], dtype)
    if not _loader.use_op():
        return reference.batch_entropy(x, ddof, dtype, allow_small_batch)
    entropy, _, variance, _ = _op_single(x, ddof, allow_small_batch)
    if _wider_than(dtype, x.dtype):
        return _entropies_from_variances(variance, [_units(x)], dtype)[0]
    return tf.cast(entropy, dtype)


def batch_entropies(xs, ddof=1, dtype=None, allow_small_batch=False, same_batch=False):
    """Batch entropies of a list of tensors (shapes may differ), as a vector [len(xs)].

    With the op backend, all tensors of one dtype go through one Lbe>BatchEntropies op (one
    thread-pool dispatch, one kernel launch on GPU). The vector has `dtype`, by default the
    tensors' common dtype (float32, or float64 if any is float64, when they differ); ask for
    tf.float32 with half-precision activations to keep the entropies unrounded.

    A tensor whose batch is <= ddof is an error, unless allow_small_batch=True: then its entry
    is 0 with a zero gradient, and the other tensors' entries are computed as usual.

    same_batch=True promises that all tensors have the same batch size at run time, as the layer
    outputs of one model step do; the pure-TensorFlow path (lbe_ops.reference) then computes them
    together, in a few ops for the whole list, where it otherwise does so only for tensors of the
    same static batch size. A run-time batch that breaks the promise is an error there.
    """
    ddof = _validation.check_ddof(ddof)
    allow_small_batch = _validation.check_allow_small_batch(allow_small_batch)
    same_batch = _validation.check_same_batch(same_batch)
    xs = _validation.check_list(xs, ddof, allow_small_batch=allow_small_batch,
                                same_batch=same_batch)
    out_dtype = _validation.result_dtype(xs, dtype)
    if not _loader.use_op():
        return reference.entropies_of_checked(xs, ddof, out_dtype, allow_small_batch,
                                               same_batch)
    groups = {}
    for i, x in enumerate(xs):
        groups.setdefault(x.dtype, []).append(i)
    parts = [None] * len(xs)
    for input_dtype, indices in groups.items():
        members = [xs[i] for i in indices]
        entropies, _, variances, _ = _op_group(members, ddof, allow_small_batch)
        if _wider_than(out_dtype, input_dtype):
            entropies = _entropies_from_variances(variances, [_units(x) for x in members],
                                                  out_dtype)
        else:
            entropies = tf.cast(entropies, out_dtype)
        if len(groups) == 1:
            return entropies
        for k, i in enumerate(indices):
            parts[i] = entropies[k]
    return tf.stack(parts)

