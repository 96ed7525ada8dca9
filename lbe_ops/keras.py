"""Keras 3 integration of Layerwise Batch-Entropy regularization.

    import lbe_ops.keras as lbe_keras

    model = lbe_keras.wrap(keras_model)                      # Sequential or Functional
    model = lbe_keras.LBEModel(inputs, outputs)              # Functional
    class Net(lbe_keras.LBEModel): ...                       # subclassed
    keras.layers.Dense(64, activity_regularizer=lbe_keras.LBERegularizer())

How it fits together:

- LBERegularizer is the per-layer part: the hyperparameters (alpha_min, beta, ddof) and the
  learnable target `alpha`. It is a Keras Layer as well as a Regularizer, so the layer it is
  attached to tracks it like a sub-layer: `alpha` is in the model's trainable variables in every
  model style, and the optimizer trains it.
- LBEModel's train and test steps run the forward pass in a *capture* scope. There, a
  regularizer that Keras calls on a layer's output only records the output (and returns zero, so
  Keras's own activity-loss bookkeeping adds nothing); `compute_loss` then takes the entropies of
  all recorded outputs in one `lbe_ops.batch_entropies` call and forms the paper's loss,
  `task + task * lbe` (or `task + lbe`).
- Outside a capture scope (a plain keras.Model, or a direct `model(x)` call) the regularizer
  returns the additive term `beta * (H - max(alpha_min, |alpha|))^2`, pre-multiplied by the
  batch size on Keras versions that divide activity-regularizer values by it (3.14+; detected
  at run time), so the term that reaches the loss is the intended one on every Keras 3 version.

Saving: Keras's `.keras` weight walk skips the `activity_regularizer` attribute, so LBEModel
exposes its regularizers through the `lbe_regularizers` property, which the walk does visit:
trained alphas are saved with the weights and restored by `keras.models.load_model`. For models
that are not LBEModels, `LBERegularizer.get_config()` records the current alpha, so Sequential
and Functional models rebuilt from their config start from the trained targets too.
"""

import contextlib
import math
import numbers
import os
import threading
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.common import symbolic_scope as _symbolic_scope
from keras.src.models import model as _keras_model_module
from keras.src.models.functional import Functional
from tensorflow.core.framework import summary_pb2

import lbe_ops
from lbe_ops import _validation
from lbe_ops import ops as _ops

__all__ = [
    "LBERegularizer",
    "LBEModel",
    "LayerEntropyLogger",
    "wrap",
    "export",
    "keras_divides_activity_regularization",
]

_PACKAGE = "lbe_ops"
_HALF_DTYPES = (tf.float16, tf.bfloat16)


# --------------------------------------------------------------------------------------------
# Per-thread mode of the regularizers. MirroredStrategy runs each replica's step in its own
# thread, so a step's capture scope must be thread-local.

_state = threading.local()


class _Capture:
    """What the regularizers record during one LBEModel step: (regularizer, output) pairs."""

    def __init__(self):
        self.records = []
        self.placeholder_refs = set()  # the zeros returned to Keras in place of the terms

    def placeholder(self):
        zero = tf.zeros((), tf.float32)
        if not tf.executing_eagerly():
            self.placeholder_refs.add(zero.ref())
        return zero

    def is_placeholder_loss(self, loss):
        """True for a loss that Keras made from one of the placeholders (graph mode only).

        Keras adds `placeholder / batch_size` (3.14+) or the placeholder itself as an activity
        loss; leaving those zeros out of the total keeps them out of the step's graph.
        """
        if tf.executing_eagerly() or not self.placeholder_refs or not tf.is_tensor(loss):
            return False
        try:
            if loss.ref() in self.placeholder_refs:
                return True
            op = loss.op
            return op.type == "DivNoNan" and op.inputs[0].ref() in self.placeholder_refs
        except (AttributeError, TypeError):
            return False


_DISABLED = "disabled"


def _in_symbolic_trace():
    return _symbolic_scope.in_symbolic_scope()


def _current_mode():
    return getattr(_state, "mode", None)


@contextlib.contextmanager
def _mode(value):
    previous = _current_mode()
    _state.mode = value
    try:
        yield value
    finally:
        _state.mode = previous


def _capturing():
    return _mode(_Capture())


def _regularizers_disabled():
    """Regularizers return a constant zero: no entropy is computed (inference, export)."""
    return _mode(_DISABLED)


# --------------------------------------------------------------------------------------------
# Keras's scaling of activity-regularizer values.

_scaling = {}


def keras_divides_activity_regularization():
    """True if this Keras divides activity-regularizer values by the batch size (3.14+).

    Measured once, by running a probe layer whose activity regularizer returns 1.
    """
    if "divides" not in _scaling:
        with tf.init_scope():
            probe = keras.layers.Identity(
                activity_regularizer=lambda x: tf.ones((), tf.float32),
                name="lbe_ops_activity_scaling_probe")
            probe(np.zeros((4, 1), np.float32))
            value = float(np.asarray(probe.losses[0]))
        if math.isclose(value, 1.0, rel_tol=1e-6):
            _scaling["divides"] = False
        elif math.isclose(value, 0.25, rel_tol=1e-6):
            _scaling["divides"] = True
        else:
            warnings.warn(
                f"lbe_ops.keras: this Keras ({keras.__version__}) turned an activity-regularizer "
                f"value of 1 on a batch of 4 into {value}; assuming division by the batch size.",
                RuntimeWarning, stacklevel=2)
            _scaling["divides"] = True
    return _scaling["divides"]


# --------------------------------------------------------------------------------------------
# Argument checks

def _check_number(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    return value


def _check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


# --------------------------------------------------------------------------------------------
# The regularizer

# Entropies are asked for in float32 (dtype=tf.float32): for half-precision activations the op
# then derives them from its float32 statistics instead of rounding H to 3 (float16) or 2
# (bfloat16) significant digits, with no extra pass over the activations.


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LBERegularizer(keras.layers.Layer, keras.regularizers.Regularizer):
    """Layerwise batch-entropy regularizer: pass it as `activity_regularizer=` of a layer.

    The term of a layer with batch entropy H is `beta * (H - max(alpha_min, |alpha|))^2`;
    `alpha` (initialised to `alpha`) is a trainable Keras variable, trained with the model.
    In an LBEModel the terms of all layers are averaged and combined with the task loss as in
    the paper; in any other Keras model the term is added to the loss like any activity
    regularizer (use `beta / number_of_layers` there to get the paper's mean).

    Args:
        alpha: initial value of the learnable entropy target.
        alpha_min: lower bound of the target (>= 0); the target is max(alpha_min, |alpha|).
        beta: strength of the term (>= 0).
        ddof: delta degrees of freedom of the batch variance (1: unbiased, as torch.std).

    One instance belongs to one layer: it holds that layer's alpha.
    """

    def __init__(self, alpha=0.5, alpha_min=0.5, beta=0.5, ddof=1, **kwargs):
        alpha = _check_number("alpha", alpha)
        alpha_min = _check_number("alpha_min", alpha_min, minimum=0.0)
        beta = _check_number("beta", beta, minimum=0.0)
        try:
            ddof = _validation.check_ddof(ddof)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        kwargs.pop("dtype", None)  # alpha is always float32, whatever the policy
        super().__init__(dtype="float32", **kwargs)
        self.alpha_min = alpha_min
        self.beta = beta
        self.ddof = ddof
        self._initial_alpha = alpha
        # autocast=False: read inside a float16 layer's call, alpha stays float32.
        self.alpha = self.add_weight(
            name="alpha", shape=(), dtype="float32", trainable=True, autocast=False,
            initializer=keras.initializers.Constant(alpha))
        self.built = True
        keras_divides_activity_regularization()  # measure now, eagerly, not inside a trace

    def target(self):
        """max(alpha_min, |alpha|) as a float32 scalar tensor."""
        alpha = tf.convert_to_tensor(self.alpha)
        # alpha first: on a tie the gradient goes to alpha, so alpha = alpha_min still trains.
        return tf.maximum(tf.abs(alpha), tf.constant(self.alpha_min, alpha.dtype))

    def penalty(self, entropy):
        """beta * (entropy - target)^2, in float32."""
        entropy = tf.cast(entropy, tf.float32)
        return self.beta * tf.square(entropy - self.target())

    def __call__(self, x):
        if _in_symbolic_trace():
            # Keras infers output shapes by tracing layers in a scratch graph (e.g. when a
            # subclassed model builds on its first call): nothing to record or compute there.
            return tf.zeros((), tf.float32)
        mode = _current_mode()
        if isinstance(mode, _Capture):
            mode.records.append((self, x))
            return mode.placeholder()
        if mode == _DISABLED:
            return tf.zeros((), tf.float32)
        return self.call(x)

    def call(self, x):
        """The additive term for a plain Keras model, scaled against Keras's batch division."""
        x = tf.convert_to_tensor(x)
        term = self.penalty(_ops.batch_entropy(x, ddof=self.ddof, dtype=tf.float32))
        if keras_divides_activity_regularization():
            term = term * tf.cast(tf.shape(x)[0], term.dtype)
        return term

    def get_config(self):
        # alpha is recorded at its current value: a model rebuilt from its config (Sequential,
        # Functional) starts from the trained target even where the weights do not carry it.
        try:
            alpha = float(keras.ops.convert_to_numpy(self.alpha))
        except Exception:  # not eager: fall back to the initial value
            alpha = self._initial_alpha
        return {
            "alpha": alpha,
            "alpha_min": self.alpha_min,
            "beta": self.beta,
            "ddof": self.ddof,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (f"LBERegularizer(name={self.name!r}, alpha_min={self.alpha_min}, "
                f"beta={self.beta}, ddof={self.ddof})")


# --------------------------------------------------------------------------------------------
# Entropies of captured outputs

def _entropies_local(tensors, ddofs):
    """One batch_entropies call per distinct ddof (one call in the usual case)."""
    groups = {}
    for i, ddof in enumerate(ddofs):
        groups.setdefault(ddof, []).append(i)
    parts = [None] * len(tensors)
    for ddof, indices in groups.items():
        values = tf.cast(
            _ops.batch_entropies([tensors[i] for i in indices], ddof=ddof, dtype=tf.float32),
            tf.float32)
        if len(groups) == 1:
            return values
        for k, i in enumerate(indices):
            parts[i] = values[k]
    return tf.stack(parts)


def _entropies_cross_replica(tensors, ddofs, replica_context):
    """Entropies of the global batch: per-unit statistics merged over the replicas.

    Each replica computes its local mean and sum of squared deviations (one pass, by the op where
    it runs); two all-reduces give the global mean and the global sum of squared deviations
    about it (Chan et al.'s merge, no cancellation for large offsets). all_reduce is
    differentiable: the gradient of an all-sum is an all-sum.
    """
    sum_op = tf.distribute.ReduceOp.SUM
    local = []
    for x in tensors:
        x = tf.convert_to_tensor(x)
        _, mean, variance = _ops.batch_entropy_moments(x, ddof=0)  # float32 stats for half x
        count = tf.cast(tf.shape(x)[0], mean.dtype)
        local.append((count, mean, variance * count))
    totals = replica_context.all_reduce(
        sum_op, [[count, count * mean] for count, mean, _ in local])
    global_means = [(total_count, total_sum / total_count) for total_count, total_sum in totals]
    deviations = replica_context.all_reduce(
        sum_op, [m2 + count * tf.square(mean - global_mean)
                 for (count, mean, m2), (_, global_mean) in zip(local, global_means)])
    entropies = []
    for (total_count, _), m2, ddof in zip(global_means, deviations, ddofs):
        variance = m2 / (total_count - tf.cast(ddof, m2.dtype))
        unit_entropy = 0.5 * tf.math.log1p(tf.constant(math.pi * math.e, m2.dtype) * variance)
        entropies.append(tf.cast(tf.reduce_mean(unit_entropy), tf.float32))
    return tf.stack(entropies)


def _penalties(regularizers, entropies):
    """beta_l * (H_l - max(alpha_min_l, |alpha_l|))^2 as one vector (a few ops, not a few per
    layer: deep models have hundreds of layers)."""
    alphas = tf.stack([tf.convert_to_tensor(regularizer.alpha) for regularizer in regularizers])
    alpha_mins = tf.constant([regularizer.alpha_min for regularizer in regularizers], tf.float32)
    betas = tf.constant([regularizer.beta for regularizer in regularizers], tf.float32)
    # alphas first: on a tie the gradient goes to alpha (see LBERegularizer.target).
    targets = tf.maximum(tf.abs(alphas), alpha_mins)
    return betas * tf.square(entropies - targets)


def _num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


# --------------------------------------------------------------------------------------------
# Per-layer entropy statistics (for LayerEntropyLogger); not part of the logs, not saved.

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


class _LayerStats:
    """Plain holder, so that Keras tracks neither the metrics (not in logs) nor saves them."""

    def __init__(self):
        self.names = ()
        self.regularizer_ids = ()
        self.train = None
        self.test = None


def _regularized_layers(model):
    """[(layer, regularizer)] for every layer of `model` (recursively) with an LBERegularizer."""
    found, seen = [], set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        regularizer = getattr(layer, "activity_regularizer", None)
        if isinstance(regularizer, LBERegularizer) and id(regularizer) not in seen:
            seen.add(id(regularizer))
            found.append((layer, regularizer))
    return found


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
# The model

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


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LBEModel(keras.Model):
    """A keras.Model trained with the LBE loss of Peer et al. (TMLR 2022).

    loss = task_loss + task_loss * lbe        (additive=True: task_loss + lbe)
    lbe  = mean over regularized layer outputs of beta * (H - max(alpha_min, |alpha|))^2

    task_loss is the compiled loss (override `compute_task_loss` for another); losses added
    with add_loss and weight regularizers are added on top, as usual. Every layer whose
    `activity_regularizer` is an LBERegularizer takes part; all entropies of a step come from
    one `lbe_ops.batch_entropies` call.

    Build it functionally, `LBEModel(inputs, outputs, additive=False, cross_replica=False)`, or
    subclass it like keras.Model. `cross_replica=True` uses, under a tf.distribute strategy, the
    entropy of the global batch instead of each replica's.

    fit/evaluate logs gain `task_loss`, `lbe` and `entropy_mean`; `layer_entropies()` gives
    the per-layer means that LayerEntropyLogger records.
    """

    def __new__(cls, *args, **kwargs):
        if _is_functional_call(args, kwargs) and not issubclass(cls, Functional):
            variant = _functional_variant(cls)
            return super(LBEModel, variant).__new__(variant, *args, **kwargs)
        # keras.Model.__new__ drops the constructor arguments before Layer.__new__ records
        # them for the automatic get_config(); pass them on, so that a subclassed LBEModel's
        # config keeps its arguments (additive=True included).
        return super(keras.Model, cls).__new__(cls, *args, **kwargs)

    def __init__(self, *args, additive=False, cross_replica=False, **kwargs):
        additive = _check_flag("additive", additive)
        cross_replica = _check_flag("cross_replica", cross_replica)
        if _is_functional_call(args, kwargs):
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
        self._lbe_layer_stats = _LayerStats()
        self.task_loss_tracker = keras.metrics.Mean(name="task_loss")
        self.lbe_tracker = keras.metrics.Mean(name="lbe")
        self.entropy_tracker = keras.metrics.Mean(name="entropy_mean")

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
        """The model's LBERegularizers in layer order. Saved with the weights (.keras)."""
        return [regularizer for _, regularizer in _regularized_layers(self)]

    # -- the steps ----------------------------------------------------------------------------

    def train_step(self, data):
        with _capturing():
            return super().train_step(data)

    def test_step(self, data):
        with _capturing():
            return super().test_step(data)

    def predict_step(self, data):
        with _regularizers_disabled():
            return super().predict_step(data)

    def compute_task_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The task loss that LBE multiplies: the compiled loss (None if there is none)."""
        del x, training
        compile_loss = getattr(self, "_compile_loss", None)
        if compile_loss is None:
            return None
        return compile_loss(y, y_pred, sample_weight)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        capture = _current_mode()
        if not isinstance(capture, _Capture):
            # Not inside an LBE step: the regularizers added their additive terms themselves.
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        records, capture.records = capture.records, []

        task = self.compute_task_loss(x, y, y_pred, sample_weight, training)
        extra = [self._lbe_sum_extra_loss(loss) for loss in self.losses
                 if not capture.is_placeholder_loss(loss)]

        if records:
            regularizers = [regularizer for regularizer, _ in records]
            tensors = [tensor for _, tensor in records]
            ddofs = [regularizer.ddof for regularizer in regularizers]
            replica_context = tf.distribute.get_replica_context()
            if (self._lbe_cross_replica and replica_context is not None
                    and replica_context.num_replicas_in_sync > 1):
                entropies = _entropies_cross_replica(tensors, ddofs, replica_context)
            else:
                entropies = _entropies_local(tensors, ddofs)
            lbe = tf.reduce_mean(_penalties(regularizers, entropies))
            entropy_mean = tf.reduce_mean(entropies)
        else:
            if not self._lbe_warned_empty:
                self._lbe_warned_empty = True
                warnings.warn(
                    f"LBEModel {self.name!r}: no layer has an LBERegularizer as "
                    "activity_regularizer; training with the task loss alone.",
                    RuntimeWarning, stacklevel=2)
            lbe = tf.zeros((), tf.float32)
            entropy_mean = None

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

        batch = self._lbe_batch_size(x)
        if task is not None:
            self.task_loss_tracker.update_state(
                tf.cast(task, tf.float32) * tf.cast(_num_replicas(), tf.float32),
                sample_weight=batch)
        self.lbe_tracker.update_state(lbe, sample_weight=batch)
        if entropy_mean is not None:
            self.entropy_tracker.update_state(entropy_mean, sample_weight=batch)
            self._lbe_update_layer_stats(records, entropies, batch, training)
        return total

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

    def _lbe_build_layer_stats(self):
        """(Re)creates the per-layer statistics when the set of regularized layers changed."""
        pairs = _regularized_layers(self)
        ids = tuple(id(regularizer) for _, regularizer in pairs)
        stats = self._lbe_layer_stats
        if stats.train is not None and stats.regularizer_ids == ids:
            return
        stats.names = tuple(_unique_names([layer.name for layer, _ in pairs]))
        stats.regularizer_ids = ids
        if not ids:
            stats.train = stats.test = None
            return
        with contextlib.ExitStack() as stack:
            if not tf.distribute.has_strategy():
                stack.enter_context(self.distribute_strategy.scope())
            stats.train = _LayerEntropyMean(len(ids), name="layer_entropies")
            stats.test = _LayerEntropyMean(len(ids), name="val_layer_entropies")

    def _lbe_update_layer_stats(self, records, entropies, batch, training):
        stats = self._lbe_layer_stats
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
        weight = tf.ones((), tf.float32) if batch is None else batch
        values = tf.gather(entropies, rows) if len(rows) < len(records) else entropies
        totals = tf.math.unsorted_segment_sum(values * weight, segments, size)
        counts = np.bincount(segments, minlength=size).astype(np.float32)
        metric.update_state(totals, tf.constant(counts) * weight)

    def layer_entropies(self, validation=False):
        """{layer name: mean batch entropy} over the steps since the last reset.

        Training steps (reset at each epoch of fit) or, with validation=True, test steps
        (reset at each evaluate, including fit's validation). Empty before the first step.
        """
        stats = self._lbe_layer_stats
        metric = stats.test if validation else stats.train
        if metric is None:
            return {}
        counts = keras.ops.convert_to_numpy(metric.count)
        values = keras.ops.convert_to_numpy(metric.result())
        return {name: float(value)
                for name, value, count in zip(stats.names, values, counts) if count > 0}

    def make_train_function(self, force=False):
        self._lbe_build_layer_stats()
        return super().make_train_function(force=force)

    def make_test_function(self, force=False):
        self._lbe_build_layer_stats()
        return super().make_test_function(force=force)

    def evaluate(self, *args, **kwargs):
        previous = self._lbe_in_evaluate
        self._lbe_in_evaluate = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._lbe_in_evaluate = previous

    def reset_metrics(self):
        super().reset_metrics()
        stats = getattr(self, "_lbe_layer_stats", None)
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
        with _regularizers_disabled(), lbe_ops.use_backend("tf"):
            return super().export(filepath, *args, **kwargs)


def export(model, filepath, *args, **kwargs):
    """Exports any Keras model (e.g. a plain one with LBERegularizers) without LBE terms.

    Same arguments as keras.Model.export; the serving graph computes no batch entropies, so it
    has no Lbe ops and runs without lbe_ops.
    """
    with _regularizers_disabled(), lbe_ops.use_backend("tf"):
        return keras.Model.export(model, filepath, *args, **kwargs)


# --------------------------------------------------------------------------------------------
# wrap()

def _default_layer_types():
    names = ("Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
             "Conv3DTranspose", "SeparableConv1D", "SeparableConv2D", "DepthwiseConv1D",
             "DepthwiseConv2D")
    return tuple(getattr(keras.layers, name) for name in names if hasattr(keras.layers, name))


def _attach(layer, regularizer):
    """Sets layer.activity_regularizer on a possibly built (state-locked) layer."""
    tracker = getattr(layer, "_tracker", None)
    locked = bool(tracker is not None and tracker.locked)
    if locked:
        tracker.unlock()
    try:
        layer.activity_regularizer = regularizer
    finally:
        if locked:
            tracker.lock()


def _model_graph(model):
    """(inputs, outputs) of a Sequential or Functional model."""
    if isinstance(model, keras.Sequential):
        if not model.built or getattr(model, "_functional", None) is None:
            raise ValueError(
                f"wrap(model): the Sequential model {model.name!r} has no defined input yet; "
                "start it with keras.Input(shape) or call model.build(input_shape) first.")
        return model.inputs, model.outputs
    if isinstance(model, Functional):
        return model.inputs, model.outputs
    raise TypeError(
        "wrap(model): model must be a Sequential or Functional keras model, got "
        f"{type(model).__name__}. For a subclassed model, derive it from LBEModel instead of "
        "keras.Model and give its layers LBERegularizers.")


def wrap(model, layers=None, *, additive=False, cross_replica=False, name=None,
         **regularizer_kwargs):
    """An LBEModel over the layers of a Sequential or Functional model.

    Args:
        model: a built Sequential or Functional keras model.
        layers: the layers to regularize, as layer objects or names; by default every Dense
            and convolution layer of the model except those producing the model's outputs.
        additive, cross_replica: options of LBEModel.
        name: name of the new model (default: the model's name).
        **regularizer_kwargs: arguments of each new LBERegularizer (alpha, alpha_min, beta,
            ddof).

    Layers are shared with `model`: each selected layer gets its own LBERegularizer as
    activity_regularizer (layers that already have an LBERegularizer keep it), so `model`
    itself now carries the additive LBE terms too. Compile the returned model.
    """
    inputs, outputs = _model_graph(model)
    LBERegularizer(**regularizer_kwargs)  # checks the arguments before anything is changed
    model_layers = list(model.layers)
    if layers is None:
        output_layers = {id(tensor._keras_history[0]) for tensor in tf.nest.flatten(outputs)}
        types = _default_layer_types()
        selected = [layer for layer in model_layers
                    if isinstance(layer, types) and id(layer) not in output_layers]
    else:
        if isinstance(layers, (str, keras.layers.Layer)):
            layers = [layers]
        known = {id(layer) for layer in model._flatten_layers(include_self=False)}
        selected = []
        for item in layers:
            if isinstance(item, str):
                try:
                    layer = model.get_layer(item)
                except ValueError:
                    raise ValueError(
                        f"wrap(layers=...): model {model.name!r} has no layer named {item!r}"
                    ) from None
            elif isinstance(item, keras.layers.Layer):
                if id(item) not in known:
                    raise ValueError(
                        f"wrap(layers=...): layer {item.name!r} is not part of model "
                        f"{model.name!r}")
                layer = item
            else:
                raise TypeError(
                    f"wrap(layers=...) takes layers or layer names, got {item!r}")
            selected.append(layer)
    for layer in selected:
        existing = getattr(layer, "activity_regularizer", None)
        if existing is not None and not isinstance(existing, LBERegularizer):
            raise ValueError(
                f"wrap(): layer {layer.name!r} already has the activity_regularizer "
                f"{existing!r}; leave it out via layers=, or remove that regularizer first.")
    with contextlib.ExitStack() as stack:
        strategy = model.distribute_strategy
        if not tf.distribute.has_strategy() and strategy is not tf.distribute.get_strategy():
            stack.enter_context(strategy.scope())
        for layer in selected:
            if not isinstance(layer.activity_regularizer, LBERegularizer):
                _attach(layer, LBERegularizer(name=f"{layer.name}_lbe", **regularizer_kwargs))
        # A single input or output stays a tensor (as in the Sequential model), not a list.
        if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
            inputs = inputs[0]
        if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
            outputs = outputs[0]
        return LBEModel(inputs=inputs, outputs=outputs, name=name or model.name,
                        additive=additive, cross_replica=cross_replica)


# --------------------------------------------------------------------------------------------
# Callback

class LayerEntropyLogger(keras.callbacks.Callback):
    """Records each epoch's mean batch entropy of every regularized layer of an LBEModel.

    The values go into the History that fit() returns, as `entropy/<layer>` (and
    `val_entropy/<layer>` when validation ran that epoch), and into `self.history`. They are
    kept out of the epoch logs, so the progress bar stays short. With `log_dir`, each epoch also
    writes TensorBoard histograms of the per-layer entropies (`lbe/layer_entropies` under
    log_dir/train and log_dir/validation, the directories keras.callbacks.TensorBoard uses).
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
            self._write_histogram("train", train, epoch)
            self._write_histogram("validation", validation, epoch)

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

    def _write_histogram(self, split, values, epoch):
        if not values:
            return
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(
                os.path.join(self.log_dir, split))
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag="lbe/layer_entropies", histo=_histogram_proto(list(values.values())))])
        with self._writers[split].as_default():
            tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=epoch)
        self._writers[split].flush()


def _histogram_proto(values):
    # Written as a classic HistogramProto, which TensorBoard reads, because tf.summary.histogram
    # needs the tensorboard package, which tensorflow-cpu does not install.
    values = np.asarray(values, np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1e-6
    counts, edges = np.histogram(values, bins=min(30, max(1, values.size)), range=(low, high))
    return summary_pb2.HistogramProto(
        min=float(values.min()), max=float(values.max()), num=float(values.size),
        sum=float(values.sum()), sum_squares=float(np.square(values).sum()),
        bucket_limit=[float(edge) for edge in edges[1:]], bucket=[float(c) for c in counts])
