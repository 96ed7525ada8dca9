"""batch_entropy and batch_entropies: the compiled op where it can run, pure TensorFlow elsewhere.

Ops (registered by the library): Lbe>BatchEntropy / Lbe>BatchEntropyGrad for one tensor and
Lbe>BatchEntropies / Lbe>BatchEntropiesGrad for a group. Each forward op returns the entropy (in
the input dtype) and the per-unit mean and variance (float32, or float64 for double inputs),
which the gradient op uses to compute dx in one pass over x. The grouped op returns the
statistics of all its tensors in one flat vector each (tensor 0's units first).

A batch <= ddof has no variance, and is an error by default. With allow_small_batch=True (the
ops' attribute of that name) such a tensor is treated as a constant instead: entropy, mean and
variance 0, gradient 0; for the last batch of an epoch (1 sample) or the empty per-replica batch of
a distribution strategy (0 samples).
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
                                    Tstats=_stats_dtype(x.dtype))


def _op_group(xs, ddof, allow_small_batch):
    module = _loader.op_module()
    return module.lbe_batch_entropies(xs, ddof=ddof, allow_small_batch=allow_small_batch,
                                      Tstats=_stats_dtype(xs[0].dtype))


def _register_gradients():
    @tf.RegisterGradient("Lbe>BatchEntropy")
    def _batch_entropy_grad(op, grad_entropy, grad_mean, grad_variance):
        x = op.inputs[0]
        _, mean, variance = op.outputs
        return _loader.op_module().lbe_batch_entropy_grad(
            x, mean, variance, grad_entropy,
            _zeros_if_none(grad_mean, mean), _zeros_if_none(grad_variance, variance),
            ddof=op.get_attr("ddof"), allow_small_batch=op.get_attr("allow_small_batch"))

    @tf.RegisterGradient("Lbe>BatchEntropies")
    def _batch_entropies_grad(op, grad_entropies, grad_means, grad_variances):
        _, means, variances = op.outputs
        return _loader.op_module().lbe_batch_entropies_grad(
            list(op.inputs), means, variances, grad_entropies,
            _zeros_if_none(grad_means, means), _zeros_if_none(grad_variances, variances),
            ddof=op.get_attr("ddof"), allow_small_batch=op.get_attr("allow_small_batch"))


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
        entropy, mean, variance = _op_single(x, ddof, allow_small_batch)
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
    batch is static, else an InvalidArgumentError at run time. With allow_small_batch=True such
    a batch gives H = 0 with a zero gradient instead (for a last batch of 1 sample, or an empty
    per-replica batch under a distribution strategy).
    """
    ddof = _validation.check_ddof(ddof)
    allow_small_batch = _validation.check_allow_small_batch(allow_small_batch)
    x = _validation.check_input(x, ddof, allow_small_batch=allow_small_batch)
    dtype = _validation.result_dtype([x], dtype)
    if not _loader.use_op():
        return reference.moments(x, ddof, entropy_dtype=dtype,
                                 allow_small_batch=allow_small_batch)[0]
    entropy, _, variance = _op_single(x, ddof, allow_small_batch)
    if _wider_than(dtype, x.dtype):
        return _entropies_from_variances(variance, [_units(x)], dtype)[0]
    return tf.cast(entropy, dtype)


def batch_entropies(xs, ddof=1, dtype=None, allow_small_batch=False):
    """Batch entropies of a list of tensors (shapes may differ), as a vector [len(xs)].

    With the op backend, all tensors of one dtype go through one Lbe>BatchEntropies op (one
    thread-pool dispatch, one kernel launch on GPU). The vector has `dtype`, by default the
    tensors' common dtype (float32, or float64 if any is float64, when they differ); ask for
    tf.float32 with half-precision activations to keep the entropies unrounded.

    A tensor whose batch is <= ddof is an error, unless allow_small_batch=True: then its entry
    is 0 with a zero gradient, and the other tensors' entries are computed as usual.
    """
    ddof = _validation.check_ddof(ddof)
    allow_small_batch = _validation.check_allow_small_batch(allow_small_batch)
    xs = _validation.check_list(xs, ddof, allow_small_batch=allow_small_batch)
    out_dtype = _validation.result_dtype(xs, dtype)
    if not _loader.use_op():
        return tf.stack([reference.moments(x, ddof, name=f"xs[{i}]", entropy_dtype=out_dtype,
                                           allow_small_batch=allow_small_batch)[0]
                         for i, x in enumerate(xs)])
    groups = {}
    for i, x in enumerate(xs):
        groups.setdefault(x.dtype, []).append(i)
    parts = [None] * len(xs)
    for input_dtype, indices in groups.items():
        members = [xs[i] for i in indices]
        entropies, _, variances = _op_group(members, ddof, allow_small_batch)
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

