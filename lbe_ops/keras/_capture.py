"""What the regularizers do when Keras calls them: return their term, record, or compute nothing.

Outside an LBEModel (a plain Keras model) a regularizer returns its own additive term
(Mode.TERM). LBEModel's train and test steps run the forward pass in Mode.CAPTURE: there a
regularizer only records the output it was called on (and hands Keras a zero placeholder), and
the model computes the entropies of all recorded outputs in one op call. Inference and export run
in Mode.DISABLED: the regularizers return a constant zero and compute nothing.

The mode is per thread: MirroredStrategy runs each replica's step in its own thread.
"""

import contextlib
import enum
import threading

import tensorflow as tf

from lbe_ops.keras import _compat


class Mode(enum.Enum):
    """What an LBERegularizer does when Keras calls it on its layer's output."""

    TERM = "term"          # return the layer's additive LBE term
    CAPTURE = "capture"    # record the output for the step's Capture, return a placeholder zero
    DISABLED = "disabled"  # return a constant zero


class Capture:
    """What the regularizers record during one LBEModel step: (regularizer, output) pairs, in
    call order, and the placeholder zeros they handed Keras instead of their terms."""

    def __init__(self):
        self.records = []
        self._placeholders = set()  # refs of the placeholders (graph mode)

    def record(self, regularizer, output):
        """Records `output` for `regularizer`; returns the placeholder to give Keras."""
        self.records.append((regularizer, output))
        placeholder = tf.zeros((), tf.float32)
        if not tf.executing_eagerly():
            self._placeholders.add(placeholder.ref())
        return placeholder

    def take_records(self):
        """The records so far; the next call returns only those made after this one."""
        records, self.records = self.records, []
        return records

    def is_placeholder_loss(self, loss):
        """True for an entry of `model.losses` that Keras made from one of this step's
        placeholders. Graph mode only: an eager tensor does not say what it was computed from
        (an eager step adds the zeros, which changes nothing but the time of an eager step)."""
        return bool(self._placeholders) and _compat.is_activity_loss_from(loss, self._placeholders)


class _State(threading.local):
    mode = Mode.TERM
    capture = None  # the Capture of the running step, in Mode.CAPTURE


_state = _State()


def current_mode():
    """The Mode of this thread."""
    return _state.mode


def current_capture():
    """The Capture of the step running in this thread (only in Mode.CAPTURE)."""
    if _state.mode is not Mode.CAPTURE:
        raise RuntimeError("lbe_ops.keras: no LBEModel step is capturing in this thread")
    return _state.capture


@contextlib.contextmanager
def _scope(mode, capture=None):
    previous = _state.mode, _state.capture
    _state.mode, _state.capture = mode, capture
    try:
        yield capture
    finally:
        _state.mode, _state.capture = previous


def capturing():
    """Mode.CAPTURE, with a fresh Capture (yielded) for one step."""
    return _scope(Mode.CAPTURE, Capture())


def regularizers_disabled():
    """Mode.DISABLED: regularizers return a constant zero (inference, export)."""
    return _scope(Mode.DISABLED)
