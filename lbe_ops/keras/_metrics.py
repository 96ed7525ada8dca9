"""What an LBEModel step reports: the logs' task_loss, lbe and entropy_mean, and the per-layer
entropy means that LayerEntropyLogger reads (with the count of batches too small for a variance).
"""

import contextlib

import keras
import tensorflow as tf

from lbe_ops.keras import _distribution
from lbe_ops.keras.alphas import unique_names


def make_trackers():
    """The metrics behind the logs' task_loss, lbe and entropy_mean (the model's attributes
    task_loss_tracker, lbe_tracker and entropy_tracker)."""
    return (keras.metrics.Mean(name="task_loss"), keras.metrics.Mean(name="lbe"),
            keras.metrics.Mean(name="entropy_mean"))


def record_step(model, x, step, records, training):
    """Updates the model's trackers and layer statistics (model._lbe_stats) with a StepLoss."""
    batch = _batch_size(x)
    if step.task is not None:
        model.task_loss_tracker.update_state(
            tf.cast(step.task, tf.float32) * tf.cast(_distribution.num_replicas(), tf.float32),
            sample_weight=batch)
    model.lbe_tracker.update_state(step.lbe, sample_weight=batch)
    if step.entropies is None:
        return
    # Layers whose batch had no variance have no entropy to report.
    valid = step.valid
    valid_count = tf.reduce_sum(valid)
    entropy_mean = tf.reduce_sum(step.entropies * valid) / tf.maximum(valid_count, 1.0)
    any_valid = tf.minimum(valid_count, 1.0)
    model.entropy_tracker.update_state(
        entropy_mean, sample_weight=any_valid if batch is None else batch * any_valid)
    model._lbe_stats.update(records, step.entropies * valid, valid, batch, training)


def _batch_size(x):
    for tensor in tf.nest.flatten(x):
        if tensor is not None:
            return tf.cast(tf.shape(tensor)[0], tf.float32)
    return None


class _LayerEntropyMean(keras.metrics.Metric):
    def __init__(self, size, name):
        super().__init__(name=name, dtype="float32")
        self.size = size
        self.total = self.add_variable(shape=(size,), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(size,), initializer="zeros", name="count")

    def update_state(self, totals, counts):
        self.total.assign_add(totals)
        self.count.assign_add(counts)

    def result(self):
        return tf.math.divide_no_nan(tf.convert_to_tensor(self.total),
                                     tf.convert_to_tensor(self.count))

    def reset_state(self):
        self.total.assign(tf.zeros((self.size,), tf.float32))
        self.count.assign(tf.zeros((self.size,), tf.float32))


class LayerStats:
    """Per-layer entropy means of the training and of the test steps, and the count of batches
    too small for a variance.

    A plain holder, so that Keras neither tracks these metrics (they are not in the logs) nor
    saves them.
    """

    def __init__(self):
        self.names = ()
        self.regularizer_ids = ()
        self.train = None
        self.test = None
        self.small_batches = None

    def rebuild(self, pairs, strategy):
        """(Re)creates the metrics when the (layer, regularizer) pairs changed; `strategy`: the
        model's, entered where no strategy scope is."""
        ids = tuple(id(regularizer) for _, regularizer in pairs)
        if self.train is not None and self.regularizer_ids == ids:
            return
        self.names = tuple(unique_names([layer.name for layer, _ in pairs]))
        self.regularizer_ids = ids
        if not ids:
            self.train = self.test = self.small_batches = None
            return
        with contextlib.ExitStack() as stack:
            if not tf.distribute.has_strategy():
                stack.enter_context(strategy.scope())
            self.train = _LayerEntropyMean(len(ids), name="layer_entropies")
            self.test = _LayerEntropyMean(len(ids), name="val_layer_entropies")
            if self.small_batches is None:
                self.small_batches = keras.metrics.Sum(name="lbe_small_batches")

    def update(self, records, entropies, valid, batch, training):
        """Adds one step's entropies (zero where not valid) of the recorded regularizers."""
        metric = self.train if training else self.test
        if metric is None:
            return
        index = {regularizer_id: i for i, regularizer_id in enumerate(self.regularizer_ids)}
        segments, rows = [], []
        for row, (regularizer, _) in enumerate(records):
            if id(regularizer) in index:
                segments.append(index[id(regularizer)])
                rows.append(row)
        if rows:
            size = len(self.regularizer_ids)
            weight = valid if batch is None else batch * valid
            if len(rows) < len(records):
                entropies, weight = tf.gather(entropies, rows), tf.gather(weight, rows)
            if segments == list(range(size)):
                totals, counts = entropies * weight, weight
            else:
                totals = tf.math.unsorted_segment_sum(entropies * weight, segments, size)
                counts = tf.math.unsorted_segment_sum(weight, segments, size)
            metric.update_state(totals, counts)
        if self.small_batches is not None:
            self.small_batches.update_state(1.0 - tf.reduce_min(valid))

    def means(self, validation):
        """{layer name: mean entropy} of the training (or test) steps since the last reset."""
        metric = self.test if validation else self.train
        if metric is None:
            return {}
        counts = keras.ops.convert_to_numpy(metric.count)
        values = keras.ops.convert_to_numpy(metric.result())
        return {name: float(value)
                for name, value, count in zip(self.names, values, counts) if count > 0}

    def reset(self, keep_train):
        """Resets the test statistics, and the training ones unless keep_train."""
        if self.test is not None:
            self.test.reset_state()
        if self.train is not None and not keep_train:
            self.train.reset_state()

    def small_batch_count(self):
        """Batches (or replicas' parts of one) too small for a variance so far; None before the
        first step of a model with regularizers."""
        if self.small_batches is None:
            return None
        return float(keras.ops.convert_to_numpy(self.small_batches.result()))
