"""What LBEModel does under tf.distribute that Keras does not do for it.

Keras 3's fit() and evaluate() fail under MultiWorkerMirroredStrategy with more than one worker
for any model (keras-team/keras#20585); LBEModel works around the two failures below, and says
what it cannot work around (several steps per execution). docs/distributed.md has the rest.
"""

import tensorflow as tf

from lbe_ops import _tf_compat
from lbe_ops.keras import _compat


def num_replicas():
    """The replicas of the current strategy (1 outside any)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def reducible_across_workers(logs):
    """The step's logs in a form Keras can average over the workers' replicas.

    Under MultiWorkerMirroredStrategy with more than one worker, Keras averages each value a
    step returns with strategy.reduce("MEAN", value, axis=0), which fails on the scalars that
    metrics return. A scalar as a vector of one element has the same mean over the replicas.
    """
    if not _tf_compat.in_multi_worker_mode(tf.distribute.get_strategy()):
        return logs
    return tf.nest.map_structure(
        lambda value: tf.reshape(value, [1]) if value.shape.rank == 0 else value, logs)


def build_batch(model, iterator, data_batch):
    """The batch Keras builds the model's state from (_compat.builds_from): its shapes, one
    worker at a time.

    Keras (TensorFlow backend) peeks at the first batch of a distributed iterator and averages it
    over the replicas with strategy.reduce, only to learn its shapes and dtypes. Under
    MultiWorkerMirroredStrategy with several workers that reduce is a collective that fails
    outside a tf.function (`Attempt to convert a value (PerReplica...)`), so fit() and evaluate()
    never start. This worker's first local replica has the same per-replica shapes and dtypes,
    and reading it needs no collective. Other strategies keep Keras' way.
    """
    strategy = _compat.own_strategy(model)
    if (iterator is not None and data_batch is None
            and _tf_compat.in_multi_worker_mode(strategy)):
        for _, _, batches in iterator:
            data_batch = tf.nest.map_structure(
                lambda value: (strategy.experimental_local_results(value)[0]
                               if isinstance(value, tf.distribute.DistributedValues)
                               else value),
                next(batches))
            break
        iterator = None
    return iterator, data_batch


def check_steps_per_execution(model):
    """Raises where Keras' loop over several steps per execution cannot run."""
    steps = getattr(model, "steps_per_execution", 1) or 1
    if steps > 1 and _tf_compat.in_multi_worker_mode(model.distribute_strategy):
        raise ValueError(
            f"LBEModel {model.name!r}: steps_per_execution={steps} does not run under "
            "MultiWorkerMirroredStrategy with several workers (Keras' loop over several "
            "steps fails there for any model, with 'You must feed a value for placeholder "
            "tensor'); compile with steps_per_execution=1.")
