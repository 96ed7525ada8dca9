"""The loss of an LBEModel train or test step, from the outputs its regularizers captured.

    loss = task + task * lbe        (additive=True: task + lbe)
    lbe  = mean over the captured outputs of beta * (H - max(alpha_min, |alpha|))^2

plus the model's other losses (add_loss terms, weight penalties). All entropies of a step come
from one lbe_ops.batch_entropies call (_loss); a layer whose batch is too small for a variance
gets no term.
"""

from typing import NamedTuple, Optional

import keras
import tensorflow as tf

from lbe_ops.keras import _distribution, _loss


class StepLoss(NamedTuple):
    """A step's loss and its parts, for the logs and the per-layer statistics."""

    total: tf.Tensor
    task: Optional[tf.Tensor]       # None without a task loss (additive models only)
    lbe: tf.Tensor                  # float32 scalar
    entropies: Optional[tf.Tensor]  # [records] float32; None if nothing was captured
    valid: Optional[tf.Tensor]      # [records] 1.0 where the batch had a variance, else 0.0


def lbe_of(records, alpha_vector, cross_replica):
    """(lbe, entropies, valid) of the captured (regularizer, output) records.

    alpha_vector(regularizers): the regularizers' alphas as one float32 vector. cross_replica:
    under a strategy with several replicas, the entropies of the global batch.
    """
    regularizers = [regularizer for regularizer, _ in records]
    entropies, valid = entropies_of(records, cross_replica)
    return penalty(regularizers, entropies, valid, alpha_vector), entropies, valid


def entropies_of(records, cross_replica):
    """(entropies [N], valid [N]) of the records' outputs; valid is 0 for a layer whose batch
    is too small for a variance."""
    tensors = [tensor for _, tensor in records]
    ddofs = [regularizer.ddof for regularizer, _ in records]
    replica_context = tf.distribute.get_replica_context()
    if cross_replica and replica_context is not None and replica_context.num_replicas_in_sync > 1:
        entropies, entropy_batch = _loss.cross_replica_entropies(tensors, ddofs, replica_context)
    else:
        entropies = _loss.local_entropies(tensors, ddofs)
        # The captured outputs of one step share the batch of the step.
        entropy_batch = tf.shape(tensors[0])[0]
    return entropies, _loss.valid_mask(entropy_batch, ddofs)


def penalty(regularizers, entropies, valid, alpha_vector):
    """lbe: the mean over the layers of the regularizers' penalties of their entropies, a layer
    that is not valid counting as 0."""
    penalties = _loss.penalties(
        entropies, alpha_vector(regularizers),
        [regularizer.alpha_min for regularizer in regularizers],
        [regularizer.beta for regularizer in regularizers])
    return tf.reduce_mean(penalties * valid)


def combine(task, lbe, additive):
    """task + task * lbe (the paper), or task + lbe with `additive` (there `task` may be None)."""
    if additive:
        # Keras scales the compiled loss by 1/replicas; scale lbe alike, so that the
        # gradients summed over replicas hold lbe once.
        lbe_part = lbe / tf.cast(_distribution.num_replicas(), lbe.dtype)
        return lbe_part if task is None else task + tf.cast(lbe_part, task.dtype)
    return task + task * tf.cast(lbe, task.dtype)


def step_loss(records, task, other_losses, alpha_vector, additive, cross_replica):
    """The StepLoss of one step: `task` (or None) combined with the LBE term of `records`
    (lbe 0 without records), plus the sum of `other_losses`."""
    extra = [_summed(loss) for loss in other_losses]
    entropies = valid = None
    if records:
        lbe, entropies, valid = lbe_of(records, alpha_vector, cross_replica)
    else:
        lbe = tf.zeros((), tf.float32)
    total = combine(task, lbe, additive)
    if extra:
        total = total + tf.add_n([tf.cast(loss, total.dtype) for loss in extra])
    return StepLoss(total, task, lbe, entropies, valid)


def _summed(loss):
    loss = tf.convert_to_tensor(loss)
    if not loss.dtype.is_floating:
        loss = tf.cast(loss, keras.config.floatx())
    return tf.reduce_sum(loss)
