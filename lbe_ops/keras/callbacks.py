"""LayerEntropyLogger: each epoch's per-layer batch entropies, into History and TensorBoard."""

import os

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from lbe_ops.keras.model import LBEModel


def _tensorboard_summaries():
    """tf.summary.scalar/histogram come with the tensorboard package (pip install
    "lbe-ops[tensorboard]"); tensorflow-cpu does not install it."""
    try:
        import tensorboard  # noqa: F401
        return callable(getattr(tf.summary, "scalar", None)) and callable(
            getattr(tf.summary, "histogram", None))
    except ImportError:
        return False


class LayerEntropyLogger(keras.callbacks.Callback):
    """Records each epoch's mean batch entropy of every regularized layer of an LBEModel.

    The values go into the History that fit() returns, as `entropy/<layer>` (and
    `val_entropy/<layer>` when validation ran that epoch), and into `self.history`. They are
    kept out of the epoch logs, so the progress bar stays short. With `log_dir`, each epoch also
    writes, under log_dir/train and log_dir/validation (the directories
    keras.callbacks.TensorBoard uses), one TensorBoard scalar per layer (`lbe/entropy/<layer>`)
    and a histogram over the layers (`lbe/layer_entropies`). With the tensorboard package
    installed these are TensorFlow's own summaries; without it, the same records are written
    with TensorFlow's core summary writer.
    """

    def __init__(self, log_dir=None, prefix="entropy/"):
        super().__init__()
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.prefix = prefix
        self.history = {}
        self._pending = {}
        self._writers = {}

    def on_train_begin(self, logs=None):
        if not isinstance(self.model, LBEModel):
            raise TypeError(
                "LayerEntropyLogger needs an LBEModel (lbe_ops.keras.LBEModel or wrap()), got "
                f"{type(self.model).__name__}")
        self._pending = {}

    def on_epoch_begin(self, epoch, logs=None):
        self._flush_to_history()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        entries = {}
        train = self.model.layer_entropies()
        entries.update({f"{self.prefix}{name}": value for name, value in train.items()})
        validation = {}
        if any(key.startswith("val_") for key in logs):
            validation = self.model.layer_entropies(validation=True)
            entries.update({f"val_{self.prefix}{name}": value
                            for name, value in validation.items()})
        for key, value in entries.items():
            self.history.setdefault(key, []).append(value)
        self._pending = entries
        if self.log_dir is not None:
            self._write_summaries("train", train, epoch)
            self._write_summaries("validation", validation, epoch)

    def on_train_end(self, logs=None):
        self._flush_to_history()
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def _flush_to_history(self):
        # History writes its epoch entry after this callback's on_epoch_end and sets
        # model.history then; the entries are added at the next epoch (or at the end).
        history = getattr(self.model, "history", None)
        if self._pending and isinstance(history, keras.callbacks.History):
            for key, value in self._pending.items():
                history.history.setdefault(key, []).append(value)
        self._pending = {}

    def _write_summaries(self, split, values, epoch):
        if not values:
            return
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(
                os.path.join(self.log_dir, split))
        with self._writers[split].as_default(step=epoch):
            if _tensorboard_summaries():
                for name, value in values.items():
                    tf.summary.scalar(f"lbe/entropy/{name}", value)
                tf.summary.histogram("lbe/layer_entropies", list(values.values()))
            else:
                for name, value in values.items():
                    tf.summary.write(f"lbe/entropy/{name}", tf.constant(value, tf.float32),
                                     metadata=_SCALAR_METADATA)
                summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
                    tag="lbe/layer_entropies", histo=_histogram_proto(list(values.values())))])
                tf.summary.experimental.write_raw_pb(summary.SerializeToString())
        self._writers[split].flush()


# What tensorboard's own scalar summary writes as metadata: the scalars plugin reads the tensor.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR)


def _histogram_proto(values):
    # A classic HistogramProto, which TensorBoard reads without the tensorboard package's ops.
    values = np.asarray(values, np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1e-6
    counts, edges = np.histogram(values, bins=min(30, max(1, values.size)), range=(low, high))
    return summary_pb2.HistogramProto(
        min=float(values.min()), max=float(values.max()), num=float(values.size),
        sum=float(values.sum()), sum_squares=float(np.square(values).sum()),
        bucket_limit=[float(edge) for edge in edges[1:]], bucket=[float(c) for c in counts])
