"""wrap(): an LBEModel over the layers of an existing Sequential or Functional model.

Which outputs are regularized by default: the output of every Dense and convolution layer
(nested Sequential and Functional models included) after its activation, except the layers that
produce the model's outputs. Where a layer's own activation is linear and its output goes, through
a chain of single-use normalization or dropout layers, into an activation layer (Dense ->
BatchNormalization -> ReLU, Dense(activation=None) -> Activation("relu")), the regularizer sits
on that activation layer: the paper regularizes the activations. `layers=` chooses exactly the
layers whose outputs are regularized. A model in which nothing would be regularized (say, a stack
of LSTMs) is an error that names the model's layers: its LBEModel would train with lbe = 0.
"""

import collections
import contextlib

import keras
import tensorflow as tf

from lbe_ops.keras import _compat
from lbe_ops.keras.alphas import regularized_layers, walk_layers
from lbe_ops.keras.model import LBEModel
from lbe_ops.keras.regularizer import LBERegularizer


def _layer_types(names):
    return tuple(getattr(keras.layers, name) for name in names if hasattr(keras.layers, name))


_DEFAULT_TYPES = _layer_types((
    "Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
    "Conv3DTranspose", "SeparableConv1D", "SeparableConv2D", "DepthwiseConv1D",
    "DepthwiseConv2D"))
# Layers between a linear layer and its activation that leave "the activation" in place.
_PASS_THROUGH_TYPES = _layer_types((
    "BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization",
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
    "GaussianDropout", "AlphaDropout"))
_ACTIVATION_TYPES = _layer_types(("Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax"))


def _is_linear(layer):
    activation = getattr(layer, "activation", None)
    return activation is None or getattr(activation, "__name__", "") == "linear"


def _single_consumer(layer):
    """The one layer that consumes `layer`'s output, if it is used exactly once and so is that
    consumer; else None."""
    inbound = _compat.inbound_nodes(layer)
    outbound = _compat.outbound_nodes(layer)
    if inbound is None or outbound is None or len(inbound) != 1 or len(outbound) != 1:
        return None
    consumer = _compat.node_operation(outbound[0])
    if not isinstance(consumer, keras.layers.Layer) or isinstance(consumer, keras.Model):
        return None
    if len(_compat.inbound_nodes(consumer) or ()) != 1:
        return None
    return consumer


def _activation_of(layer):
    """The layer whose output is `layer`'s activation (see the module docstring)."""
    if not _is_linear(layer):
        return layer
    current = layer
    while True:
        consumer = _single_consumer(current)
        if consumer is None:
            return layer
        if isinstance(consumer, _ACTIVATION_TYPES):
            # Activation("linear") is no activation; ReLU, ELU, ... have no `activation`.
            if not (isinstance(consumer, keras.layers.Activation) and _is_linear(consumer)):
                return consumer
            return layer
        if not isinstance(consumer, _PASS_THROUGH_TYPES):
            return layer
        current = consumer


def _output_layers(model):
    """Every layer (nested models followed inwards) that produces one of `model`'s outputs."""
    found, pending = set(), list(tf.nest.flatten(model.outputs))
    while pending:
        layer = _compat.producing_layer(pending.pop())
        if layer is None or id(layer) in found:
            continue
        found.add(id(layer))
        if (isinstance(layer, (keras.Sequential, _compat.Functional))
                and getattr(layer, "outputs", None)):
            pending.extend(tf.nest.flatten(layer.outputs))
    return found


def _model_graph(model):
    """(inputs, outputs) of a Sequential or Functional model."""
    if isinstance(model, keras.Sequential):
        if not model.built or not _compat.sequential_has_graph(model):
            raise ValueError(
                f"wrap(model): the Sequential model {model.name!r} has no defined input yet; "
                "start it with keras.Input(shape) or call model.build(input_shape) first.")
        return model.inputs, model.outputs
    if isinstance(model, _compat.Functional):
        return model.inputs, model.outputs
    raise TypeError(
        "wrap(model): model must be a Sequential or Functional keras model, got "
        f"{type(model).__name__}. For a subclassed model, derive it from LBEModel instead of "
        "keras.Model and give its layers LBERegularizers.")


def _all_layers(model):
    return walk_layers(model)


def default_layers(model):
    """The layers whose outputs wrap() regularizes by default (see the module docstring)."""
    outputs = _output_layers(model)
    selected, seen = [], set()
    for layer in _all_layers(model):
        if not isinstance(layer, _DEFAULT_TYPES) or id(layer) in outputs:
            continue
        point = _activation_of(layer)
        if id(point) in outputs or id(point) in seen:
            continue
        seen.add(id(point))
        selected.append(point)
    return selected


def _chosen_layers(model, layers):
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    every = _all_layers(model)
    by_name = {}
    for layer in every:
        by_name.setdefault(layer.name, layer)
    known = {id(layer) for layer in every}
    selected = []
    for item in layers:
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(
                    f"wrap(layers=...): model {model.name!r} has no layer named {item!r}")
            layer = by_name[item]
        elif isinstance(item, keras.layers.Layer):
            if id(item) not in known:
                raise ValueError(
                    f"wrap(layers=...): layer {item.name!r} is not part of model {model.name!r}")
            layer = item
        else:
            raise TypeError(f"wrap(layers=...) takes layers or layer names, got {item!r}")
        selected.append(layer)
    return selected


def _nothing_to_regularize(model, layers):
    """The error of a wrap() that would regularize no layer: what the model has, what to do."""
    if layers is not None:
        return ValueError(
            f"wrap(model, layers=...): layers= chooses no layer, and model {model.name!r} has "
            "no LBERegularizer either: its LBEModel would train with the task loss alone.")

    def model_layers(parent):  # the layers of the model and its nested models, not their parts
        for layer in parent.layers:
            yield layer
            if isinstance(layer, keras.Model):
                yield from model_layers(layer)

    found = collections.Counter(type(layer).__name__ for layer in model_layers(model)
                                if not isinstance(layer, keras.layers.InputLayer))
    outputs = _output_layers(model)
    candidates = [layer.name for layer in model.layers
                  if not isinstance(layer, keras.layers.InputLayer) and id(layer) not in outputs]
    example = f", e.g. wrap(model, layers={candidates[:3]!r})" if candidates else ""
    return ValueError(
        f"wrap(model): model {model.name!r} has no layer that wrap() regularizes by default "
        "(the activations of Dense and convolution layers that do not produce the model's "
        f"outputs); its layers: {', '.join(f'{n} {t}' for t, n in found.items()) or 'none'}. "
        f"Choose the layers whose outputs to regularize with layers={example}.")


def _attach(layer, regularizer):
    """Sets layer.activity_regularizer on a possibly built (state-locked) layer."""
    with _compat.unlocked(layer):
        layer.activity_regularizer = regularizer


def wrap(model, layers=None, *, additive=False, cross_replica=False, name=None,
         **regularizer_kwargs):
    """An LBEModel over the layers of a Sequential or Functional model.

    Args:
        model: a built Sequential or Functional keras model.
        layers: the layers whose outputs to regularize, as layer objects or names (nested
            models' layers too); by default the activation of every Dense and convolution
            layer except those producing the model's outputs (see lbe_ops.keras.wrap's module
            docstring for the rule).
        additive, cross_replica: options of LBEModel.
        name: name of the new model (default: the model's name + "_lbe").
        **regularizer_kwargs: arguments of each new LBERegularizer (alpha, alpha_min, beta,
            ddof).

    Layers are shared with `model`: each selected layer gets its own LBERegularizer as
    activity_regularizer (layers that already have an LBERegularizer keep it), and the new
    model holds their alphas. `model` itself now adds the terms additively when called (none
    for a batch of one). Compile the returned model.

    Raises ValueError where nothing would be regularized: no layer chosen (by default or by
    `layers=`) and no LBERegularizer in the model already.
    """
    inputs, outputs = _model_graph(model)
    LBERegularizer(**regularizer_kwargs)  # checks the arguments before anything is changed
    selected = default_layers(model) if layers is None else _chosen_layers(model, layers)
    if not selected and not regularized_layers(model):
        raise _nothing_to_regularize(model, layers)
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
        return LBEModel(inputs=inputs, outputs=outputs, name=name or f"{model.name}_lbe",
                        additive=additive, cross_replica=cross_replica)
