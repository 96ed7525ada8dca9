"""What the regularizers do when Keras calls them: record, stay silent, or return their term.

LBEModel's train and test steps run the forward pass in a *capture* scope: there a regularizer
only records the output it was called on (and returns a zero to Keras), and the model computes
the entropies of all recorded outputs in one op call. Inference and export run with the
regularizers *disabled*: they return a constant zero and compute nothing. Outside both (a plain
Keras model) a regularizer returns its own additive term.

The mode is per thread: MirroredStrategy runs each replica's step in its own thread.
"""

import contextlib
import threading

import tensorflow as tf

_state = threading.local()
DISABLED = "disabled"


class Capture:
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


def current_mode():
    """None (plain Keras), a Capture (inside an LBEModel step) or DISABLED."""
    return getattr(_state, "mode", None)


@contextlib.contextmanager
def _mode(value):
    previous = current_mode()
    _state.mode = value
    try:
        yield value
    finally:
        _state.mode = previous


def capturing():
    return _mode(Capture())


def regularizers_disabled():
    """Regularizers return a constant zero: no entropy is computed (inference, export)."""
    return _mode(DISABLED)
