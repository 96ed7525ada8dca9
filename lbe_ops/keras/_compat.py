"""Every use of Keras internals in lbe_ops, in one place.

Keras 3 has no public API that does what the entries below do; each says what it works around
and which public API would replace it. A Keras release that changes one of them breaks here
first: scripts/check_keras_versions.sh runs the Keras tests against every supported Keras version
(docs/keras.md). TensorFlow internals are in lbe_ops/_tf_compat.py.
"""

import contextlib

import tensorflow as tf
from keras.src.backend.common import symbolic_scope as _symbolic_scope
from keras.src.models import functional as _functional
from keras.src.models import model as _model

# --------------------------------------------------------------------------------------------
# Functional models

# The class of the models keras.Model(inputs, outputs) makes. wrap() tells them from subclassed
# models by it, and LBEModel's functional flavour derives from it, as keras.Model.__new__ makes
# its own subclasses do. Public replacement: none (Keras 3 exports no Functional class).
Functional = _functional.Functional


def init_trainer(model):
    """Runs the backend trainer's __init__ (compile state, metrics) on a functional LBEModel.

    Works around: keras.Model.__init__ with functional arguments rewrites the bases of the
    model's class (inject_functional_model_class), so LBEModel calls Functional.__init__ itself
    and the trainer's __init__ that Model.__init__ would run, which is reachable only as
    keras.src.models.model.Trainer (the trainer of the running backend). Public replacement:
    none (a way to build a functional instance of a keras.Model subclass without the rewrite).
    """
    _model.Trainer.__init__(model)


def sequential_has_graph(model):
    """True if a Sequential model has built its functional graph (it knows its input).

    Works around: Keras keeps that graph in the private Sequential._functional. Public
    replacement: `model.inputs`, which raises AttributeError where there is none.
    """
    return getattr(model, "_functional", None) is not None


def producing_layer(tensor):
    """The layer whose call produced a symbolic KerasTensor (None for any other value).

    Works around: a KerasTensor records its producer only in the private `_keras_history`.
    Public replacement: none.
    """
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history[0]


def inbound_nodes(layer):
    """The calls of `layer` in functional graphs (None where Keras keeps none)."""
    return getattr(layer, "_inbound_nodes", None)


def outbound_nodes(layer):
    """The calls that consumed `layer`'s outputs in functional graphs (None where Keras keeps
    none).

    Works around (with inbound_nodes and node_operation): wrap() follows a linear layer through
    single-use normalization or dropout layers to its activation, and Keras 3 keeps the graph
    only in the private `_inbound_nodes`/`_outbound_nodes` of each operation. Public replacement:
    none in Keras 3 (Keras 2 had layer.inbound_nodes and layer.outbound_nodes).
    """
    return getattr(layer, "_outbound_nodes", None)


def node_operation(node):
    """The layer or operation called at a node of a functional graph (Node.operation)."""
    return getattr(node, "operation", None)


# --------------------------------------------------------------------------------------------
# Layers

@contextlib.contextmanager
def unlocked(layer):
    """Lets attributes be set on a built layer or model, whose Keras tracker is locked.

    Works around: Keras locks the attribute tracker of a built layer (Layer._lock_state), so
    that giving it a tracked attribute afterwards (wrap()'s activity_regularizer, an LBEModel's
    alpha vector) raises. Public replacement: none (set such attributes before the build).
    """
    tracker = getattr(layer, "_tracker", None)
    locked = bool(tracker is not None and tracker.locked)
    if locked:
        tracker.unlock()
    try:
        yield layer
    finally:
        if locked:
            tracker.lock()


def assign_sublayers(model, name, layers):
    """Sets `model.<name> = layers` (a list of layers) on a built model, which then trains and
    saves their weights.

    Works around: besides the tracker lock (see unlocked), Keras 3.12 to 3.14's
    Functional.__init__ replaces the model's list of sublayers (`_layers`) by a new list that its
    attribute tracker does not fill: a layer assigned to a functional model afterwards is tracked
    but is no sublayer, so its weights are neither trained nor saved. Such layers are added to
    `_layers` here (Keras 3.15 tracks into `_layers` itself). Public replacement: none.
    """
    with unlocked(model):
        setattr(model, name, layers)
    known = model._layers
    for layer in layers:
        if all(layer is not sublayer for sublayer in known):
            known.append(layer)


def sublayers(layer):
    """The layers directly inside a layer that is not a keras.Model.

    Works around: Keras 3 lists them only through the private
    `_flatten_layers(include_self=False, recursive=False)`. Public replacement: none for a
    plain layer (keras.Model has `layers`).
    """
    return layer._flatten_layers(include_self=False, recursive=False)


def untrack_variable(layer, variable):
    """Removes a variable from a layer's weights.

    Works around: an LBERegularizer creates its alpha as its own weight (a plain model trains
    and saves it there) and drops it when an LBEModel takes the alpha into its vector; Keras
    removes a weight only through the private Layer._untrack_variable. Public replacement: none.
    """
    layer._untrack_variable(variable)


def in_symbolic_scope():
    """True while Keras infers output shapes by tracing layers in a scratch graph.

    Works around: a regularizer called there (e.g. when a subclassed model builds on its first
    call) must neither record nor compute; Keras tells it only through
    keras.src.backend.common.symbolic_scope. Public replacement: none.
    """
    return _symbolic_scope.in_symbolic_scope()


def register_regularizer_names(regularizer_class, names):
    """Lets keras.regularizers.get(name) (and activity_regularizer=name) find the class.

    Works around: keras.regularizers.get looks a bare name up in Keras's table of regularizers,
    keras.src.regularizers.ALL_OBJECTS_DICT, which has no public way to add to it. Public
    replacement: keras.saving.register_keras_serializable, which covers the registered name
    ("lbe_ops>LBERegularizer") only. Does nothing if the table is not there.
    """
    try:
        from keras.src import regularizers as keras_regularizers
        table = keras_regularizers.ALL_OBJECTS_DICT
    except (ImportError, AttributeError):
        return
    for name in names:
        table.setdefault(name, regularizer_class)


# --------------------------------------------------------------------------------------------
# Training

def is_activity_loss_from(loss, placeholder_refs):
    """True if `loss`, an entry of model.losses, is the activity loss Keras made from a value an
    activity regularizer returned: one of `placeholder_refs` (refs of graph tensors) itself or,
    on Keras 3.14+, its quotient by the batch size.

    Works around: Layer.__call__ adds what the regularizer returns to the layer's losses, as it
    is up to Keras 3.13 and as `ops.divide_no_nan(value, batch_size)` from 3.14 on, a new tensor;
    model.losses then mixes these with add_loss terms and weight penalties and says of none
    where it came from. LBEModel's regularizers return placeholder zeros that the step leaves out
    of its loss (and so out of its graph: one division per regularized layer otherwise); the
    quotient is recognised by its input, the placeholder, whatever op Keras used (one op on it).
    Public replacement: none (a way for an activity regularizer to add no loss, or losses that
    name their source).
    """
    try:
        return (loss.ref() in placeholder_refs
                or any(value.ref() in placeholder_refs for value in loss.op.inputs))
    except (AttributeError, TypeError):  # not a graph tensor (eager, KerasTensor, a number)
        return False


def compiled_loss(model):
    """The loss given to compile(), as Keras computes it (None before compile or without one).

    Works around: LBEModel multiplies the compiled loss alone by (1 + lbe); Keras'
    Trainer.compute_loss adds the model's other losses to it, and the compiled part alone is the
    private Trainer._compile_loss. Public replacement: none (a compute_loss without self.losses).
    """
    return getattr(model, "_compile_loss", None)


def own_strategy(model):
    """The tf.distribute strategy the model was created under, or None.

    Works around: the public model.distribute_strategy falls back to the strategy of the current
    scope where the model has none; this is the private Trainer._distribute_strategy without
    that fallback. Public replacement: model.distribute_strategy, where the fallback makes no
    difference.
    """
    return getattr(model, "_distribute_strategy", None)


def builds_from(choose_batch):
    """Class decorator: before fit() and evaluate(), Keras builds the model's state from the
    (iterator, data_batch) pair that `choose_batch(model, iterator, data_batch)` returns.

    Works around: Keras' TensorFlow trainer builds the model from one batch of the data in the
    private `_maybe_symbolic_build(iterator, data_batch)`, which the decorated class overrides this
    way (LBEModel passes a batch of its own under MultiWorkerMirroredStrategy). Public
    replacement: none.
    """
    def decorate(model_class):
        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            iterator, data_batch = choose_batch(self, iterator, data_batch)
            return super(model_class, self)._maybe_symbolic_build(iterator=iterator,
                                                                 data_batch=data_batch)

        model_class._maybe_symbolic_build = _maybe_symbolic_build
        return model_class

    return decorate


def train_tf_functions(model):
    """The tf.functions behind model.train_function (empty before the first fit() or
    train_on_batch()).

    Works around: Keras 3's TensorFlow trainer wraps its tf.function in plain Python functions,
    which hold it only in their closures (fit() one level down, train_on_batch() two). Public
    replacement: none.
    """
    return _closure_tf_functions(model.train_function, depth=2)


def _closure_tf_functions(function, depth):
    found = []
    for cell in getattr(function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not filled yet
            continue
        if isinstance(value, tf.types.experimental.PolymorphicFunction):
            found.append(value)
        elif depth > 0 and callable(value):
            found += _closure_tf_functions(value, depth - 1)
    return found


def resolve_auto_jit_compile(model):
    """What compile(jit_compile="auto") resolves to for `model` (True: XLA), or None where
    Keras' internals changed.

    Works around: Keras decides "auto" in the private Trainer._resolve_auto_jit_compile. Public
    replacement: none (model.jit_compile only after compile(), and not what "auto" would give).
    """
    try:
        return bool(model._resolve_auto_jit_compile())
    except Exception:  # noqa: BLE001 - a diagnostic: unknown, not an error
        return None
