"""Export without LBE terms: the serving graph computes no batch entropies, so the artifact has no
Lbe ops and runs without lbe_ops."""

import contextlib

import keras

import lbe_ops
from lbe_ops.keras import _capture


@contextlib.contextmanager
def without_lbe_terms():
    """Regularizers disabled, and the pure-TensorFlow backend for anything else traced."""
    with _capture.regularizers_disabled(), lbe_ops.use_backend("tf"):
        yield


def export(model, filepath, *args, **kwargs):
    """Exports any Keras model (e.g. a plain one with LBERegularizers) without LBE terms.

    Same arguments as keras.Model.export; the serving graph computes no batch entropies, so it
    has no Lbe ops and runs without lbe_ops.
    """
    with without_lbe_terms():
        return keras.Model.export(model, filepath, *args, **kwargs)
