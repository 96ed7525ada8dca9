"""LBEModel: a keras.Model whose train and test steps use the LBE loss of the paper."""

import contextlib
import functools
import inspect
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras.src.models import model as _keras_model_module
from keras.src.models.functional import Functional

import lbe_ops
from lbe_ops.keras import _capture, _loss
from lbe_ops.keras.alphas import AlphaStore, regularized_layers, unlocked
from lbe_ops.keras.regularizer import PACKAGE, check_flag


def _num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _in_multi_worker_mode(strategy):
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


def _reducible_across_workers(logs):
    """The step's logs in a form Keras can average over the workers' replicas.

    Under MultiWorkerMirroredStrategy with more than one worker, Keras averages each value a
    step returns with strategy.reduce("MEAN", value, axis=0), which fails on the scalars that
    metrics return. A scalar as a vector of one element has the same mean over the replicas.
    """
    if not _in_multi_worker_mode(tf.distribute.get_strategy()):
        return logs
    return tf.nest.map_structure(
        lambda value: tf.reshape(value, [1]) if value.shape.rank == 0 else value, logs)


# --------------------------------------------------------------------------------------------
# Per-layer entropy statistics (for LayerEntropyLogger) and the count of batches too small for
# a variance; not part of the logs, not saved.

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


class _StepStats:
    """Plain holder, so that Keras tracks neither the metrics (not in logs) nor saves them."""

    def __init__(self):
        self.names = ()
        self.regularizer_ids = ()
        self.train = None
        self.test = None
        self.small_batches = None


def _unique_names(names):
    counts, unique = {}, []
    for name in names:
        if name in counts:
            counts[name] += 1
            unique.append(f"{name}_{counts[name]}")
        else:
            counts[name] = 0
            unique.append(name)
    return unique


# --------------------------------------------------------------------------------------------
# The functional flavour

def _is_functional_call(args, kwargs):
    return (len(args) == 2 or (len(args) == 1 and "outputs" in kwargs)
            or ("inputs" in kwargs and "outputs" in kwargs))


_functional_variants = {}
_OPTION_DEFAULTS = {"additive": False, "cross_replica": False}


def _functional_variant(cls):
    """The Functional flavour of an LBEModel class, made once per class.

    Keras's own route (Model.__init__ -> inject_functional_model_class) rewrites __bases__ of
    the class and of all its bases, so after one functional use of LBEModel every subclassed
    LBEModel would inherit Functional's methods. A separate class leaves LBEModel untouched.
    """
    variant = _functional_variants.get(cls)
    if variant is not None:
        return variant

    def get_config(self):
        config = super(variant, self).get_config()
        if "layers" in config:  # a functional config: revived through cls(inputs, outputs, ...)
            for option, default in _OPTION_DEFAULTS.items():
                value = getattr(self, option)
                if cls is LBEModel or value != default:
                    config[option] = value
        return config

    variant = type(cls.__name__, (cls, Functional), {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "get_config": get_config,
    })
    # Serialize under the registered name of cls; deserialization goes through cls, whose
    # __new__ comes back here. (The registry entry for that name keeps pointing at cls.)
    registered = keras.saving.get_registered_name(cls)
    if registered != cls.__name__:
        package, _, name = registered.partition(">")
        keras.saving.register_keras_serializable(package=package, name=name)(variant)
        keras.saving.register_keras_serializable(package=package, name=name)(cls)
    _functional_variants[cls] = variant
    return variant


def _collect_alphas_after_init(init):
    """Wraps a subclass's __init__: once the outermost __init__ has created the layers, the model
    takes their alphas into its vector."""

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        depth = self.__dict__.get("_lbe_init_depth", 0)
        self.__dict__["_lbe_init_depth"] = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            self.__dict__["_lbe_init_depth"] = depth
        if depth == 0:
            self._lbe_collect_alphas()

    # Keras reads the constructor's arguments (for the automatic get_config) with
    # inspect.getfullargspec, which does not follow __wrapped__ but honours __signature__.
    wrapped.__signature__ = inspect.signature(init)
    return wrapped


# --------------------------------------------------------------------------------------------
# The model

@keras.saving.register_keras_serializable(package=PACKAGE)
class LBEModel(keras.Model):
    """A keras.Model trained with the LBE loss of Peer et al. (TMLR 2022).

    loss = task_loss + task_loss * lbe        (additive=True: task_loss + lbe)
    lbe  = mean over regularized layer outputs of beta * (H - max(alpha_min, |alpha|))^2

    task_loss is the compiled loss (override `compute_task_loss` for another); losses added
    with add_loss and weight regularizers are added on top, as usual. Every layer whose
    `activity_regularizer` is an LBERegularizer takes part (in nested models too); all entropies
    of a step come from one `lbe_ops.batch_entropies` call. The model holds the alphas of its
    regularizers in one vector, `lbe_alphas` (`regularizer.alpha` is a view of one entry).

    Build it functionally, `LBEModel(inputs, outputs, additive=False, cross_replica=False)`, or
    subclass it like keras.Model. `cross_replica=True` uses, under a tf.distribute strategy, the
    entropy of the global batch instead of each replica's (across all workers under
    MultiWorkerMirroredStrategy; docs/distributed.md).

    A batch of at most ddof samples (a last partial batch of one sample, an empty replica)
    contributes no LBE term; the task loss still trains on it, and fit/evaluate warn once.

    fit/evaluate logs gain `task_loss`, `lbe` and `entropy_mean`; `layer_entropies()` gives
    the per-layer means that LayerEntropyLogger records.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _collect_alphas_after_init(cls.__dict__["__init__"])

    def __new__(cls, *args, **kwargs):
        if _is_functional_call(args, kwargs) and not issubclass(cls, Functional):
            variant = _functional_variant(cls)
            return super(LBEModel, variant).__new__(variant, *args, **kwargs)
        # keras.Model.__new__ drops the constructor arguments before Layer.__new__ records
        # them for the automatic get_config(); pass them on, so that a subclassed LBEModel's
        # config keeps its arguments (additive=True included).
        return super(keras.Model, cls).__new__(cls, *args, **kwargs)

    def __init__(self, *args, additive=False, cross_replica=False, **kwargs):
        additive = check_flag("additive", additive)
        cross_replica = check_flag("cross_replica", cross_replica)
        functional = _is_functional_call(args, kwargs)
        if functional:
            # What keras.Model.__init__ does for functional arguments, minus its rewrite of
            # this class's bases (see _functional_variant).
            _keras_model_module.Trainer.__init__(self)
            Functional.__init__(self, *args, **kwargs)
        else:
            super().__init__(*args, **kwargs)
        self._lbe_additive = additive
        self._lbe_cross_replica = cross_replica
        self._lbe_in_evaluate = False
        self._lbe_warned_empty = False
        self._lbe_warned_small = False
        self._lbe_stats = _StepStats()
        self._lbe_stores = []
        self.task_loss_tracker = keras.metrics.Mean(name="task_loss")
        self.lbe_tracker = keras.metrics.Mean(name="lbe")
        self.entropy_tracker = keras.metrics.Mean(name="entropy_mean")
        if functional:
            self._lbe_collect_alphas()

    # -- options and structure ---------------------------------------------------------------

    @property
    def additive(self):
        """True: loss = task + lbe; False (the paper): loss = task + task * lbe."""
        return self._lbe_additive

    @property
    def cross_replica(self):
        """True: entropies of the global batch under a tf.distribute strategy."""
        return self._lbe_cross_replica

    @property
    def lbe_regularizers(self):
        """The model's LBERegularizers in layer order."""
        return [regularizer for _, regularizer in regularized_layers(self)]

    @property
    def lbe_alphas(self):
        """The variable holding the alphas of this model's regularized layers, in layer order
        (None if it has none). Layers shared with an LBEModel made earlier (say, by wrapping the
        same model twice) keep their alphas in that model's vector, which this model trains too.
        """
        own = [store for store in self._lbe_stores if store.owner_id == id(self)]
        return own[0].alphas if own else None

    def _lbe_collect_alphas(self):
        """Moves the alphas of the model's regularizers into one vector held by the model."""
        pairs = regularized_layers(self)
        stores = []
        for _, regularizer in pairs:
            view = regularizer._alpha_view
            if view is not None and all(view.store is not s for s in stores):
                stores.append(view.store)
        new = [(layer, regularizer) for layer, regularizer in pairs
               if regularizer._alpha_view is None]
        if new:
            values = [float(np.asarray(regularizer.alpha)) for _, regularizer in new]
            names = _unique_names([layer.name for layer, _ in new])
            with contextlib.ExitStack() as stack:
                stack.enter_context(tf.init_scope())
                if not tf.distribute.has_strategy():
                    stack.enter_context(self.distribute_strategy.scope())
                store = AlphaStore(values, names, owner_id=id(self))
            for index, (_, regularizer) in enumerate(new):
                regularizer._hand_alpha_to(store, index)
            stores.insert(0, store)
        with unlocked(self):
            self._lbe_stores = stores

    def _lbe_alpha_vector(self, regularizers):
        """The alphas of the recorded regularizers as one float32 vector: one read of the
        model's variable (and a gather if the records are a subset or reordered)."""
        stores = list(self._lbe_stores)
        views = [regularizer._alpha_view for regularizer in regularizers]
        offsets, total = {}, 0
        for store in stores:
            offsets[id(store)] = total
            total += store.size
        if all(v is not None and id(v.store) in offsets for v in views):
            reads = [tf.convert_to_tensor(store.alphas) for store in stores]
            alphas = reads[0] if len(reads) == 1 else tf.concat(reads, 0)
            indices = [offsets[id(v.store)] + v.index for v in views]
            if indices != list(range(total)):
                alphas = tf.gather(alphas, indices)
            return alphas
        # Regularizers the model does not hold (e.g. layers created after construction).
        return tf.stack([tf.convert_to_tensor(regularizer.alpha) for regularizer in regularizers])

    # -- the steps ----------------------------------------------------------------------------

    def train_step(self, data):
        with _capture.capturing():
            logs = super().train_step(data)
        return _reducible_across_workers(logs)

    def test_step(self, data):
        with _capture.capturing():
            logs = super().test_step(data)
        return _reducible_across_workers(logs)

    def predict_step(self, data):
        with _capture.regularizers_disabled():
            return super().predict_step(data)

    def compute_task_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The task loss that LBE multiplies: the compiled loss (None if there is none)."""
        del x, training
        compile_loss = getattr(self, "_compile_loss", None)
        if compile_loss is None:
            return None
        return compile_loss(y, y_pred, sample_weight)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        capture = _capture.current_mode()
        if not isinstance(capture, _capture.Capture):
            # Not inside an LBE step: the regularizers added their additive terms themselves.
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        records, capture.records = capture.records, []

        task = self.compute_task_loss(x, y, y_pred, sample_weight, training)
        extra = [self._lbe_sum_extra_loss(loss) for loss in self.losses
                 if not capture.is_placeholder_loss(loss)]

        entropies = valid = None
        if records:
            entropies, valid = self._lbe_entropies(records)
            lbe = self._lbe_penalty([regularizer for regularizer, _ in records], entropies, valid)
        else:
            if not self._lbe_warned_empty:
                self._lbe_warned_empty = True
                warnings.warn(
                    f"LBEModel {self.name!r}: no layer has an LBERegularizer as "
                    "activity_regularizer; training with the task loss alone.",
                    RuntimeWarning, stacklevel=2)
            lbe = tf.zeros((), tf.float32)

        if self._lbe_additive:
            # Keras scales the compiled loss by 1/replicas; scale lbe alike, so that the
            # gradients summed over replicas hold lbe once.
            lbe_part = lbe / tf.cast(_num_replicas(), lbe.dtype)
            total = lbe_part if task is None else task + tf.cast(lbe_part, task.dtype)
        else:
            if task is None:
                raise ValueError(
                    f"LBEModel {self.name!r}: the LBE loss task_loss * (1 + lbe) needs a task "
                    "loss; pass `loss=` to compile(), override compute_task_loss(), or build "
                    "the model with additive=True.")
            total = task + task * tf.cast(lbe, task.dtype)
        if extra:
            total = total + tf.add_n([tf.cast(loss, total.dtype) for loss in extra])

        self._lbe_update_trackers(x, task, lbe, records, entropies, valid, training)
        return total

    def _lbe_entropies(self, records):
        """(entropies [N], valid [N]) of one step's recorded (regularizer, output) pairs; valid
        is 0 for a layer whose batch has no variance."""
        tensors = [tensor for _, tensor in records]
        ddofs = [regularizer.ddof for regularizer, _ in records]
        replica_context = tf.distribute.get_replica_context()
        if (self._lbe_cross_replica and replica_context is not None
                and replica_context.num_replicas_in_sync > 1):
            entropies, entropy_batch = _loss.cross_replica_entropies(
                tensors, ddofs, replica_context)
        else:
            entropies = _loss.local_entropies(tensors, ddofs)
            # The captured outputs of one step share the batch of the step.
            entropy_batch = tf.shape(tensors[0])[0]
        return entropies, _loss.valid_mask(entropy_batch, ddofs)

    def _lbe_penalty(self, regularizers, entropies, valid):
        """lbe: the mean over the layers of the regularizers' penalties of their entropies, a
        layer that is not valid counting as 0."""
        penalties = _loss.penalties(
            entropies, self._lbe_alpha_vector(regularizers),
            [regularizer.alpha_min for regularizer in regularizers],
            [regularizer.beta for regularizer in regularizers])
        return tf.reduce_mean(penalties * valid)

    def _lbe_update_trackers(self, x, task, lbe, records, entropies, valid, training):
        batch = self._lbe_batch_size(x)
        if task is not None:
            self.task_loss_tracker.update_state(
                tf.cast(task, tf.float32) * tf.cast(_num_replicas(), tf.float32),
                sample_weight=batch)
        self.lbe_tracker.update_state(lbe, sample_weight=batch)
        if entropies is None:
            return
        # Layers whose batch had no variance have no entropy to report.
        valid_count = tf.reduce_sum(valid)
        entropy_mean = tf.reduce_sum(entropies * valid) / tf.maximum(valid_count, 1.0)
        any_valid = tf.minimum(valid_count, 1.0)
        self.entropy_tracker.update_state(
            entropy_mean, sample_weight=any_valid if batch is None else batch * any_valid)
        self._lbe_update_layer_stats(records, entropies * valid, valid, batch, training)
        if self._lbe_stats.small_batches is not None:
            self._lbe_stats.small_batches.update_state(1.0 - tf.reduce_min(valid))

    @staticmethod
    def _lbe_sum_extra_loss(loss):
        loss = tf.convert_to_tensor(loss)
        if not loss.dtype.is_floating:
            loss = tf.cast(loss, keras.config.floatx())
        return tf.reduce_sum(loss)

    @staticmethod
    def _lbe_batch_size(x):
        for tensor in tf.nest.flatten(x):
            if tensor is not None:
                return tf.cast(tf.shape(tensor)[0], tf.float32)
        return None

    # -- per-layer entropies ---------------------------------------------------------------

    def _lbe_build_step_stats(self):
        """(Re)creates the per-layer statistics when the set of regularized layers changed."""
        pairs = regularized_layers(self)
        ids = tuple(id(regularizer) for _, regularizer in pairs)
        stats = self._lbe_stats
        if stats.train is not None and stats.regularizer_ids == ids:
            return
        stats.names = tuple(_unique_names([layer.name for layer, _ in pairs]))
        stats.regularizer_ids = ids
        if not ids:
            stats.train = stats.test = stats.small_batches = None
            return
        with contextlib.ExitStack() as stack:
            if not tf.distribute.has_strategy():
                stack.enter_context(self.distribute_strategy.scope())
            stats.train = _LayerEntropyMean(len(ids), name="layer_entropies")
            stats.test = _LayerEntropyMean(len(ids), name="val_layer_entropies")
            if stats.small_batches is None:
                stats.small_batches = keras.metrics.Sum(name="lbe_small_batches")

    def _lbe_update_layer_stats(self, records, entropies, valid, batch, training):
        stats = self._lbe_stats
        metric = stats.train if training else stats.test
        if metric is None:
            return
        index = {regularizer_id: i for i, regularizer_id in enumerate(stats.regularizer_ids)}
        segments, rows = [], []
        for row, (regularizer, _) in enumerate(records):
            if id(regularizer) in index:
                segments.append(index[id(regularizer)])
                rows.append(row)
        if not rows:
            return
        size = len(stats.regularizer_ids)
        weight = valid if batch is None else batch * valid
        if len(rows) < len(records):
            entropies, weight = tf.gather(entropies, rows), tf.gather(weight, rows)
        if segments == list(range(size)):
            totals, counts = entropies * weight, weight
        else:
            totals = tf.math.unsorted_segment_sum(entropies * weight, segments, size)
            counts = tf.math.unsorted_segment_sum(weight, segments, size)
        metric.update_state(totals, counts)

    def layer_entropies(self, validation=False):
        """{layer name: mean batch entropy} over the steps since the last reset.

        Training steps (reset at each epoch of fit) or, with validation=True, test steps
        (reset at each evaluate, including fit's validation). Empty before the first step.
        """
        stats = self._lbe_stats
        metric = stats.test if validation else stats.train
        if metric is None:
            return {}
        counts = keras.ops.convert_to_numpy(metric.count)
        values = keras.ops.convert_to_numpy(metric.result())
        return {name: float(value)
                for name, value, count in zip(stats.names, values, counts) if count > 0}

    def make_train_function(self, force=False):
        self._lbe_check_steps_per_execution()
        self._lbe_build_step_stats()
        return super().make_train_function(force=force)

    def make_test_function(self, force=False):
        self._lbe_check_steps_per_execution()
        self._lbe_build_step_stats()
        return super().make_test_function(force=force)

    def _lbe_check_steps_per_execution(self):
        steps = getattr(self, "steps_per_execution", 1) or 1
        if steps > 1 and _in_multi_worker_mode(self.distribute_strategy):
            raise ValueError(
                f"LBEModel {self.name!r}: steps_per_execution={steps} does not run under "
                "MultiWorkerMirroredStrategy with several workers (Keras' loop over several "
                "steps fails there for any model, with 'You must feed a value for placeholder "
                "tensor'); compile with steps_per_execution=1.")

    def _lbe_warn_small_batches(self):
        counter = self._lbe_stats.small_batches
        if counter is None or self._lbe_warned_small:
            return
        skipped = float(keras.ops.convert_to_numpy(counter.result()))
        if skipped > 0:
            self._lbe_warned_small = True
            ddofs = sorted({regularizer.ddof for regularizer in self.lbe_regularizers})
            warnings.warn(
                f"LBEModel {self.name!r}: {skipped:.0f} batch(es) (or replicas' parts of a "
                f"batch) had at most {max(ddofs)} sample(s), too few for a batch variance with "
                f"ddof={'/'.join(map(str, ddofs))}; the layers concerned contributed no LBE term "
                "for them (the task loss still trained on them). Shown once per model.",
                RuntimeWarning, stacklevel=3)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Builds the model's state from the shapes of one batch, one worker at a time.

        Keras (TensorFlow backend) peeks at the first batch of a distributed iterator and
        averages it over the replicas with strategy.reduce, only to learn its shapes and dtypes.
        Under MultiWorkerMirroredStrategy with several workers that reduce is a collective that
        fails outside a tf.function (`Attempt to convert a value (PerReplica...)`), so fit()
        and evaluate() never start. This worker's first local replica has the same per-replica
        shapes and dtypes, and reading it needs no collective. Other strategies keep Keras'
        way.
        """
        strategy = getattr(self, "_distribute_strategy", None)
        if iterator is not None and data_batch is None and _in_multi_worker_mode(strategy):
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda value: (strategy.experimental_local_results(value)[0]
                                   if isinstance(value, tf.distribute.DistributedValues)
                                   else value),
                    next(batches))
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def fit(self, *args, **kwargs):
        try:
            return super().fit(*args, **kwargs)
        finally:
            self._lbe_warn_small_batches()

    def evaluate(self, *args, **kwargs):
        previous = self._lbe_in_evaluate
        self._lbe_in_evaluate = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._lbe_in_evaluate = previous
            if not previous:
                self._lbe_warn_small_batches()

    def train_on_batch(self, *args, **kwargs):
        try:
            return super().train_on_batch(*args, **kwargs)
        finally:
            self._lbe_warn_small_batches()

    def test_on_batch(self, *args, **kwargs):
        try:
            return super().test_on_batch(*args, **kwargs)
        finally:
            self._lbe_warn_small_batches()

    def reset_metrics(self):
        super().reset_metrics()
        stats = getattr(self, "_lbe_stats", None)
        if stats is None:
            return
        if stats.test is not None:
            stats.test.reset_state()
        # fit's validation runs evaluate() between the training steps and on_epoch_end:
        # the training statistics of the epoch must survive it.
        if stats.train is not None and not self._lbe_in_evaluate:
            stats.train.reset_state()

    # -- export ---------------------------------------------------------------------------

    def export(self, filepath, *args, **kwargs):
        """keras.Model.export, with the LBE terms left out of the serving graph.

        The served function does not compute batch entropies at all, so the artifact has no
        Lbe ops and does not need lbe_ops to run.
        """
        with _capture.regularizers_disabled(), lbe_ops.use_backend("tf"):
            return super().export(filepath, *args, **kwargs)


def export(model, filepath, *args, **kwargs):
    """Exports any Keras model (e.g. a plain one with LBERegularizers) without LBE terms.

    Same arguments as keras.Model.export; the serving graph computes no batch entropies, so it
    has no Lbe ops and runs without lbe_ops.
    """
    with _capture.regularizers_disabled(), lbe_ops.use_backend("tf"):
        return keras.Model.export(model, filepath, *args, **kwargs)
