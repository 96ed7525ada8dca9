"""The LBE loss of one step: entropies of the captured outputs and the per-layer penalties.

    lbe_l = beta_l * (H_l - max(alpha_min_l, |alpha_l|))^2

computed as vectors over the layers (a fixed number of ops per step, however many layers).
A layer whose batch is too small to have a variance (at most ddof samples) gets no term: the
entropies are asked for with allow_small_batch=True (no error, finite zero gradients) and the
penalties are multiplied by a 0/1 mask.
"""

import tensorflow as tf

from lbe_ops import ops as _ops
from lbe_ops import reference as _reference


def targets(alphas, alpha_mins):
    """max(alpha_min, |alpha|), elementwise. alphas first: on a tie the gradient goes to alpha,
    so alpha = alpha_min still trains."""
    alphas = tf.convert_to_tensor(alphas, tf.float32)
    return tf.maximum(tf.abs(alphas), tf.constant(alpha_mins, tf.float32))


def penalties(entropies, alphas, alpha_mins, betas):
    """beta * (H - max(alpha_min, |alpha|))^2, elementwise (scalars or vectors), float32."""
    entropies = tf.cast(entropies, tf.float32)
    return tf.constant(betas, tf.float32) * tf.square(entropies - targets(alphas, alpha_mins))


def valid_mask(batch, ddofs):
    """1.0 where a batch of `batch` samples has a variance with ddof, else 0.0 (a vector)."""
    return tf.cast(tf.cast(batch, tf.int64) > tf.constant(ddofs, tf.int64), tf.float32)


def local_entropies(tensors, ddofs):
    """Entropies [N] (float32) of the tensors, the outputs of one step (so of one batch size),
    one batch_entropies call per distinct ddof."""
    groups = {}
    for i, ddof in enumerate(ddofs):
        groups.setdefault(ddof, []).append(i)
    parts = [None] * len(tensors)
    for ddof, indices in groups.items():
        values = tf.cast(
            _ops.batch_entropies([tensors[i] for i in indices], ddof=ddof, dtype=tf.float32,
                                 allow_small_batch=True, same_batch=True),
            tf.float32)
        if len(groups) == 1:
            return values
        for k, i in enumerate(indices):
            parts[i] = values[k]
    return tf.stack(parts)


def cross_replica_entropies(tensors, ddofs, replica_context):
    """Entropies of the global batch, and its size: per-unit statistics merged over replicas.

    Each replica computes its local mean and sum of squared deviations (one pass, by the op
    where it runs; a replica may hold an empty part of the last batch); two all-reduces give the
    global mean and the global sum of squared deviations about it (Chan et al.'s merge, no
    cancellation for large offsets). all_reduce is differentiable: the gradient of an all-sum is
    an all-sum.
    """
    sum_op = tf.distribute.ReduceOp.SUM
    local = []
    for x in tensors:
        x = tf.convert_to_tensor(x)
        _, mean, variance = _ops.batch_entropy_moments(x, ddof=0, allow_small_batch=True)
        count = tf.cast(tf.shape(x)[0], mean.dtype)
        local.append((count, mean, variance * count))
    totals = replica_context.all_reduce(
        sum_op, [[count, count * mean] for count, mean, _ in local])
    global_means = [(total_count, total_sum / tf.maximum(total_count, 1))
                    for total_count, total_sum in totals]
    deviations = replica_context.all_reduce(
        sum_op, [m2 + count * tf.square(mean - global_mean)
                 for (count, mean, m2), (_, global_mean) in zip(local, global_means)])
    entropies = []
    for (total_count, _), m2, ddof in zip(global_means, deviations, ddofs):
        denominator = tf.maximum(total_count - tf.cast(ddof, m2.dtype), 1)
        entropy = tf.reduce_mean(_reference.entropy_from_variance(m2 / denominator))
        entropies.append(tf.cast(entropy, tf.float32))
    return tf.stack(entropies), global_means[0][0]
