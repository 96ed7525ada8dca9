"""Argument checks shared by the op path and the pure-TensorFlow path.

Whatever can be decided from static shapes and dtypes is raised here, early, as ValueError or
TypeError. What is only known at run time (a dynamic batch size) is checked by the op kernel
(InvalidArgumentError) or by an assertion in the reference path.
"""

import numbers

import numpy as np
import tensorflow as tf

SUPPORTED_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def accumulator_dtype(dtype):
    """float64 for double inputs, float32 for everything narrower."""
    return tf.float64 if dtype == tf.float64 else tf.float32


def result_dtype(xs, dtype=None):
    """The dtype of batch_entropies' vector: dtype if given, else the tensors' common dtype
    (float32, or float64 if any tensor is float64, when they differ)."""
    if dtype is not None:
        dtype = tf.as_dtype(dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype.name}")
        return dtype
    dtypes = {x.dtype for x in xs}
    if len(dtypes) == 1:
        return xs[0].dtype
    return tf.float64 if tf.float64 in dtypes else tf.float32


def check_ddof(ddof):
    if isinstance(ddof, bool) or not isinstance(ddof, numbers.Integral) or ddof < 0:
        raise ValueError(f"ddof must be a non-negative integer, got {ddof!r}")
    return int(ddof)


def _check_bool(name, value):
    # A truthy tensor or string would silently pick a mode; only a real bool does.
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_allow_small_batch(allow_small_batch):
    return _check_bool("allow_small_batch", allow_small_batch)


def check_same_batch(same_batch):
    return _check_bool("same_batch", same_batch)


ACCEPTED = ("a dense float tensor [batch, units...] (tf.Tensor, tf.Variable, NumPy array or "
            "nested list of numbers)")


def _holds_arrays(value):
    """True if a (nested) list or tuple holds tensors or arrays rather than plain numbers."""
    if isinstance(value, (list, tuple)):
        return any(_holds_arrays(item) for item in value)
    return not isinstance(value, (numbers.Number, str, bytes)) and hasattr(value, "shape")


def _check_kind(x, name):
    """Rejects what tf.convert_to_tensor would turn into a wrong value or a generic error."""
    if isinstance(x, tf.RaggedTensor):
        raise TypeError(
            f"{name} is a tf.RaggedTensor; batch entropy needs {ACCEPTED}. Rows of different "
            f"lengths have no per-unit batch statistics: pad them with {name}.to_tensor() only "
            "if the padding belongs in the statistics")
    if isinstance(x, tf.SparseTensor):
        raise TypeError(
            f"{name} is a tf.SparseTensor (dense shape {x.shape}); batch entropy "
            f"needs {ACCEPTED}: convert it with tf.sparse.to_dense({name})")
    if isinstance(x, (list, tuple)) and _holds_arrays(x):
        raise TypeError(
            f"{name} is a {type(x).__name__} of tensors or arrays ({len(x)} items), which would be "
            f"stacked into one tensor; batch entropy takes {ACCEPTED}. For one entropy per tensor "
            "use lbe_ops.batch_entropies(xs); to treat them as one batch, tf.concat them first")


def check_input(x, ddof, name="x", allow_small_batch=False):
    """Converts x to a tensor and checks what is statically known about it. A static batch
    <= ddof is an error unless allow_small_batch."""
    _check_kind(x, name)
    x = tf.convert_to_tensor(x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype.name}")
    rank = x.shape.rank
    if rank is not None and rank < 2:
        raise ValueError(
            f"{name} must have rank >= 2 ([batch, units...]), got shape {x.shape}")
    if rank is not None:
        batch = x.shape[0]
        if batch is not None and batch <= ddof and not allow_small_batch:
            raise ValueError(
                f"{name} has a batch of {batch}, but batch entropy with ddof={ddof} needs a "
                f"batch of at least {ddof + 1}")
        units = x.shape[1:].num_elements()
        if units == 0:
            raise ValueError(f"{name} has zero units (shape {x.shape})")
    return x


def check_list(xs, ddof, name="xs", allow_small_batch=False, same_batch=False):
    if not isinstance(xs, (list, tuple)):
        hint = "" if isinstance(xs, (tf.RaggedTensor, tf.SparseTensor)) else \
            "; for the entropy of one tensor use lbe_ops.batch_entropy(x)"
        raise TypeError(
            f"{name} must be a list or tuple of tensors, got {type(xs).__name__}{hint}")
    xs = list(xs)
    if not xs:
        raise ValueError(f"{name} must hold at least one tensor")
    xs = [check_input(x, ddof, name=f"{name}[{i}]", allow_small_batch=allow_small_batch)
          for i, x in enumerate(xs)]
    if same_batch:
        static = {i: x.shape[0] for i, x in enumerate(xs)
                  if x.shape.rank is not None and x.shape[0] is not None}
        if len(set(static.values())) > 1:
            sizes = ", ".join(f"{name}[{i}] {batch}" for i, batch in static.items())
            raise ValueError(f"same_batch=True, but the batch sizes of {name} differ: {sizes}")
    return xs
