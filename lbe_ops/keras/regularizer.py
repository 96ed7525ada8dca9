"""LBERegularizer: one layer's LBE term, given to Keras as the layer's activity_regularizer."""

import math
import numbers

import keras
import numpy as np
import tensorflow as tf

from lbe_ops import _validation
from lbe_ops import ops as _ops
from lbe_ops.keras import _capture, _compat, _loss

PACKAGE = "lbe_ops"

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
            import warnings
            warnings.warn(
                f"lbe_ops.keras: this Keras ({keras.__version__}) turned an activity-regularizer "
                f"value of 1 on a batch of 4 into {value}; assuming division by the batch size.",
                RuntimeWarning, stacklevel=2)
            _scaling["divides"] = True
    return _scaling["divides"]


# --------------------------------------------------------------------------------------------
# Argument checks

def check_number(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    return value


def check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


# --------------------------------------------------------------------------------------------
# Where an alpha lives

class AlphaView:
    """One layer's alpha inside its LBEModel's alpha vector.

    Reads and assigns like a scalar float32 variable (`numpy()`, `assign()`, `float()`, and
    wherever TensorFlow takes a tensor); the variable the optimizer trains is the model's
    vector (`LBEModel.lbe_alphas`), one update per step for all layers.
    """

    def __init__(self, store, index):
        self._store = store
        self._index = index

    @property
    def store(self):
        return self._store

    @property
    def index(self):
        return self._index

    dtype = tf.float32
    shape = ()
    trainable = True

    @property
    def name(self):
        return f"{self._store.layer_names[self._index]}/alpha"

    def value(self):
        return tf.convert_to_tensor(self._store.alphas)[self._index]

    def numpy(self):
        return np.float32(keras.ops.convert_to_numpy(self._store.alphas)[self._index])

    def assign(self, value):
        self._store.assign_alpha(self._index, value)
        return self

    def __float__(self):
        return float(self.numpy())

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.numpy(), dtype=dtype)

    def __repr__(self):
        return f"<AlphaView {self.name!r} value={float(self):.6g}>"


def _alpha_view_to_tensor(value, dtype=None, name=None, as_ref=False):
    del name, as_ref
    tensor = value.value()
    return tensor if dtype is None else tf.cast(tensor, dtype)


tf.register_tensor_conversion_function(AlphaView, _alpha_view_to_tensor)


# --------------------------------------------------------------------------------------------
# The regularizer

@keras.saving.register_keras_serializable(package=PACKAGE)
class LBERegularizer(keras.layers.Layer, keras.regularizers.Regularizer):
    """Layerwise batch-entropy regularizer: pass it as `activity_regularizer=` of a layer.

    The term of a layer with batch entropy H is `beta * (H - max(alpha_min, |alpha|))^2`, with
    a learnable target `alpha` (initialised to `alpha`). In an LBEModel the terms of all layers
    are averaged and combined with the task loss as in the paper, and the model holds the
    alphas (one vector, `LBEModel.lbe_alphas`; `regularizer.alpha` reads and assigns this
    layer's entry): they are not weights of the regularized layer, so a plain model's weights
    load into it. In any other Keras model the term is added to the loss like any activity
    regularizer (use `beta / number_of_layers` there to get the paper's mean), and the alpha
    is a variable of the regularized layer.

    A batch too small to have a variance (at most `ddof` samples) contributes no term.

    Args:
        alpha: initial value of the learnable entropy target.
        alpha_min: lower bound of the target (>= 0); the target is max(alpha_min, |alpha|).
        beta: strength of the term (>= 0).
        ddof: delta degrees of freedom of the batch variance (1: unbiased, as torch.std).

    One instance belongs to one layer, as its activity_regularizer.
    """

    def __init__(self, alpha=0.5, alpha_min=0.5, beta=0.5, ddof=1, **kwargs):
        alpha = check_number("alpha", alpha)
        alpha_min = check_number("alpha_min", alpha_min, minimum=0.0)
        beta = check_number("beta", beta, minimum=0.0)
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
        self._own_alpha = self.add_weight(
            name="alpha", shape=(), dtype="float32", trainable=True, autocast=False,
            initializer=keras.initializers.Constant(alpha))
        self._alpha_view = None  # set when an LBEModel holds the alpha
        self.built = True
        keras_divides_activity_regularization()  # measure now, eagerly, not inside a trace

    # -- the alpha -----------------------------------------------------------------------------

    @property
    def alpha(self):
        """The learnable target: this layer's entry of its LBEModel's alpha vector (an
        AlphaView), or, outside an LBEModel, a scalar variable of the regularized layer."""
        return self._own_alpha if self._alpha_view is None else self._alpha_view

    def _hand_alpha_to(self, store, index):
        """Called by an LBEModel that now holds this alpha in its vector."""
        if self._alpha_view is None:
            _compat.untrack_variable(self, self._own_alpha)
        self._alpha_view = AlphaView(store, index)

    def load_own_variables(self, store):
        # A file saved where this regularizer held its alpha as its own weight (a plain Keras
        # model) has the alpha here; in an LBEModel it belongs in the model's vector.
        if self._alpha_view is not None and "0" in store.keys():
            self._alpha_view.assign(np.asarray(store["0"]))
            return
        super().load_own_variables(store)

    # -- the term -----------------------------------------------------------------------------

    def target(self):
        """max(alpha_min, |alpha|) as a float32 scalar tensor."""
        return _loss.targets(tf.convert_to_tensor(self.alpha), self.alpha_min)

    def penalty(self, entropy):
        """beta * (entropy - target)^2, in float32."""
        return _loss.penalties(tf.cast(entropy, tf.float32), tf.convert_to_tensor(self.alpha),
                               self.alpha_min, self.beta)

    def __call__(self, x):
        if isinstance(x, (tf.Variable, keras.Variable)):
            raise ValueError(
                f"{self!r} was called on the weight {x.name!r}: LBERegularizer is an activity "
                "regularizer (activity_regularizer=...), not a kernel or bias regularizer.")
        if _compat.in_symbolic_scope():
            # Keras infers output shapes by tracing layers in a scratch graph (e.g. when a
            # subclassed model builds on its first call): nothing to record or compute there.
            return tf.zeros((), tf.float32)
        mode = _capture.current_mode()
        if mode is _capture.Mode.CAPTURE:
            return _capture.current_capture().record(self, x)
        if mode is _capture.Mode.DISABLED:
            return tf.zeros((), tf.float32)
        return self.call(x)

    def call(self, x):
        """The additive term for a plain Keras model, scaled against Keras's batch division;
        zero for a batch of at most ddof samples (e.g. single-sample inference)."""
        x = tf.convert_to_tensor(x)
        entropy = _ops.batch_entropy(x, ddof=self.ddof, dtype=tf.float32,
                                     allow_small_batch=True)
        batch = tf.shape(x)[0]
        term = self.penalty(entropy) * tf.cast(batch > self.ddof, tf.float32)
        if keras_divides_activity_regularization():
            term = term * tf.cast(batch, term.dtype)
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


# keras.regularizers.get("LBERegularizer"), and activity_regularizer="LBERegularizer".
_compat.register_regularizer_names(LBERegularizer, ("LBERegularizer", "lbe_regularizer"))
