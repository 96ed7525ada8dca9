"""lbe-ops: Layerwise Batch-Entropy regularization (Peer et al., TMLR 2022) for TensorFlow.

    import lbe_ops
    h = lbe_ops.batch_entropy(activations)          # scalar, differentiable
    hs = lbe_ops.batch_entropies([a1, a2, a3])      # one entry per tensor
    lbe_ops.backend_info()                          # {'backend': 'op' | 'tf', ...}

The compiled op (CPU, and GPU where built with CUDA) is used where it can be; elsewhere (no
library, another TensorFlow version, inside XLA) pure TensorFlow (backend "tf", the module
lbe_ops.reference) gives the same numbers. LBE_OPS_BACKEND=auto|op|tf chooses.
Keras integration: lbe_ops.keras (LBERegularizer, LBEModel, wrap).
"""

from lbe_ops import reference
from lbe_ops._loader import LibraryUnavailableError, backend_info, use_backend
from lbe_ops.ops import batch_entropies, batch_entropy, batch_entropy_moments

__version__ = "0.1.0"

__all__ = [
    "batch_entropy",
    "batch_entropies",
    "batch_entropy_moments",
    "backend_info",
    "use_backend",
    "reference",
    "LibraryUnavailableError",
    "__version__",
]


def __getattr__(name):
    # lbe_ops.keras imports Keras; load it only when asked for.
    if name == "keras":
        import importlib
        return importlib.import_module("lbe_ops.keras")
    raise AttributeError(f"module 'lbe_ops' has no attribute {name!r}")
