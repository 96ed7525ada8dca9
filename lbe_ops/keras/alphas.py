"""Where an LBEModel keeps its alphas: one float32 vector, one entry per regularized layer.

One variable instead of one per layer: the optimizer updates all alphas with one op per step,
the loss reads them with one op, and the regularized layers carry only their own weights (a
plain model's checkpoint loads into a wrapped one, and `summary()` shows each layer's own
parameters).
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf

from lbe_ops.keras import _compat
from lbe_ops.keras.regularizer import LBERegularizer

# Weight arguments that must never hold an LBERegularizer (it regularizes activations).
_WEIGHT_REGULARIZER_ATTRIBUTES = (
    "kernel_regularizer", "bias_regularizer", "depthwise_regularizer", "pointwise_regularizer",
    "recurrent_regularizer", "embeddings_regularizer", "beta_regularizer", "gamma_regularizer")


class AlphaStore(keras.layers.Layer):
    """The alpha vector of one LBEModel (a Keras layer, so it is tracked, trained and saved)."""

    def __init__(self, initial_values, layer_names, owner_id=None, **kwargs):
        kwargs.setdefault("name", "lbe_alphas")
        super().__init__(dtype="float32", **kwargs)
        self.owner_id = owner_id  # id() of the LBEModel that made it
        initial_values = np.asarray(initial_values, np.float32)
        self.layer_names = tuple(layer_names)
        self.alphas = self.add_weight(
            name="alphas", shape=initial_values.shape, dtype="float32", trainable=True,
            autocast=False, initializer=keras.initializers.Constant(initial_values))
        self.built = True

    @property
    def size(self):
        return len(self.layer_names)

    def assign_alpha(self, index, value):
        value = tf.reshape(tf.cast(tf.convert_to_tensor(value), tf.float32), [1])
        self.alphas.assign(tf.tensor_scatter_nd_update(
            tf.convert_to_tensor(self.alphas), [[index]], value))

    def load_own_variables(self, store):
        # A checkpoint of the plain model (no alphas) keeps the initial values.
        if not list(store.keys()):
            return
        value = np.asarray(store["0"])
        if value.shape != (self.size,):
            raise ValueError(
                f"The checkpoint holds {value.size} LBE alphas, but this model regularizes "
                f"{self.size} layers ({', '.join(self.layer_names)}).")
        self.alphas.assign(value)

    def compute_output_spec(self, *args, **kwargs):  # never called as a layer
        raise TypeError("AlphaStore is not callable")


def walk_layers(model):
    """Every layer inside `model`, nested models followed inwards, in the order of each model's
    `layers` (the graph order for Sequential and Functional models); each layer once."""
    found, seen = [], set()

    def visit(parent):
        if isinstance(parent, keras.Model):
            children = parent.layers
        else:
            children = _compat.sublayers(parent)
        for child in children:
            if id(child) in seen or isinstance(child, (LBERegularizer, AlphaStore)):
                continue
            seen.add(id(child))
            found.append(child)
            visit(child)

    visit(model)
    return found


def regularized_layers(model):
    """[(layer, regularizer)] for every layer of `model` (nested models too) whose
    activity_regularizer is an LBERegularizer. Raises on misuse: one regularizer on two layers,
    or an LBERegularizer given as a weight regularizer."""
    found, owners = [], {}
    for layer in walk_layers(model):
        for attribute in _WEIGHT_REGULARIZER_ATTRIBUTES:
            if isinstance(getattr(layer, attribute, None), LBERegularizer):
                raise ValueError(
                    f"Layer {layer.name!r} has an LBERegularizer as its {attribute}: it "
                    "regularizes a layer's output, give it as activity_regularizer=.")
        regularizer = getattr(layer, "activity_regularizer", None)
        if not isinstance(regularizer, LBERegularizer):
            continue
        owner = owners.get(id(regularizer))
        if owner is not None and owner is not layer:
            raise ValueError(
                f"The LBERegularizer {regularizer.name!r} is the activity_regularizer of both "
                f"{owner.name!r} and {layer.name!r}; each layer needs its own (it holds that "
                "layer's alpha).")
        if owner is None:
            owners[id(regularizer)] = layer
            found.append((layer, regularizer))
    return found


def unique_names(names):
    """The names, the second and later of each made unique by a suffix (_1, _2, ...)."""
    counts, unique = {}, []
    for name in names:
        if name in counts:
            counts[name] += 1
            unique.append(f"{name}_{counts[name]}")
        else:
            counts[name] = 0
            unique.append(name)
    return unique


def gather_alphas(model):
    """The alpha vectors (AlphaStores) of `model`'s regularizers, its own first.

    Regularizers whose alpha no model holds yet hand it to a new vector, owned by `model`;
    those of layers shared with an LBEModel made earlier stay in that model's vector.
    """
    pairs = regularized_layers(model)
    stores = []
    for _, regularizer in pairs:
        view = regularizer._alpha_view
        if view is not None and all(view.store is not s for s in stores):
            stores.append(view.store)
    new = [(layer, regularizer) for layer, regularizer in pairs
           if regularizer._alpha_view is None]
    if new:
        values = [float(np.asarray(regularizer.alpha)) for _, regularizer in new]
        names = unique_names([layer.name for layer, _ in new])
        with contextlib.ExitStack() as stack:
            stack.enter_context(tf.init_scope())
            if not tf.distribute.has_strategy():
                stack.enter_context(model.distribute_strategy.scope())
            store = AlphaStore(values, names, owner_id=id(model))
        for index, (_, regularizer) in enumerate(new):
            regularizer._hand_alpha_to(store, index)
        stores.insert(0, store)
    return stores


def alpha_vector(stores, regularizers):
    """The alphas of `regularizers` as one float32 vector: one read of each store's variable
    (and a gather if the regularizers are a subset of the stores' or in another order)."""
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
    # Regularizers the stores do not hold (e.g. of layers created after the model).
    return tf.stack([tf.convert_to_tensor(regularizer.alpha) for regularizer in regularizers])
