"""Keras 3 integration of Layerwise Batch-Entropy regularization.

    import lbe_ops.keras as lbe_keras

    model = lbe_keras.wrap(keras_model)                      # Sequential or Functional
    model = lbe_keras.LBEModel(inputs, outputs)              # Functional
    class Net(lbe_keras.LBEModel): ...                       # subclassed
    keras.layers.Dense(64, activity_regularizer=lbe_keras.LBERegularizer())

How it fits together (one module per concern):

- regularizer: LBERegularizer, the per-layer part: the hyperparameters (alpha_min, beta, ddof)
  and the learnable target alpha. Keras calls it on its layer's output.
- _capture: what the regularizers do when Keras calls them (a Mode): inside an LBEModel step
  they only record the outputs (and hand Keras placeholder zeros, which the step leaves out of
  its loss); at inference they compute nothing.
- _loss: the entropies of all recorded outputs from one lbe_ops.batch_entropies call, and the
  penalties as vectors; batches too small for a variance are masked out.
- alphas: the model's alpha vector (one variable for all layers: one optimizer update, one
  read per step) and the discovery of regularized layers.
- model: LBEModel, which joins the parts below.
- _flavours: LBEModel built functionally (a class of its own) or subclassed.
- _steps: a step's loss, the paper's `task + task * lbe` (or `task + lbe`) plus other losses.
- _metrics: the logs' task_loss, lbe and entropy_mean, and the per-layer entropy statistics.
- _distribution: what LBEModel does under tf.distribute that Keras does not (multi-worker).
- _export: export without LBE terms (LBEModel.export and export()).
- wrap: an LBEModel over an existing Sequential or Functional model.
- callbacks: LayerEntropyLogger (History and TensorBoard).
- _compat: every use of Keras internals, each with what it works around and the public API
  that would replace it (TensorFlow internals: lbe_ops._tf_compat).

Outside an LBEModel (a plain keras.Model) the regularizer returns the additive term
`beta * (H - max(alpha_min, |alpha|))^2`, pre-multiplied by the batch size on Keras versions that
divide activity-regularizer values by it (3.14+; detected at run time).

Saving: the alpha vector is a weight of the LBEModel (saved and restored by .keras and
.weights.h5); a checkpoint of the plain model loads into a wrapped one and leaves the alphas at
their initial values. LBERegularizer.get_config() records the current alpha, so Sequential and
Functional models rebuilt from their config start from the trained targets too.
"""

from lbe_ops.keras.callbacks import LayerEntropyLogger
from lbe_ops.keras._export import export
from lbe_ops.keras.model import LBEModel
from lbe_ops.keras.regularizer import (AlphaView, LBERegularizer,
                                       keras_divides_activity_regularization)
from lbe_ops.keras.wrap import wrap

__all__ = [
    "LBERegularizer",
    "LBEModel",
    "LayerEntropyLogger",
    "AlphaView",
    "wrap",
    "export",
    "keras_divides_activity_regularization",
]
