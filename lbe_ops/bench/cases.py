"""The kernel benchmark's inputs and timed functions.

A case is one tensor, or a group of tensors for one `batch_entropies` call. For every case, dtype
and mode (`fwd`: the entropy; `fwdbwd`: the entropy and its gradient with respect to the inputs)
build_function makes one tf.function per variant:

    op       the compiled Lbe>BatchEntropies(Grad) ops (backend "op"), graph mode
    tf       pure TensorFlow (lbe_ops.reference, backend "tf"), graph mode
    xla      pure TensorFlow compiled by XLA (jit_compile=True)
    harness  everything but LBE: the tf.function call, the split of a grouped input and the sums
             of its gradients, timed alone so that the tf/op ratio can be read without it
"""

import numpy as np
import tensorflow as tf

import lbe_ops

VARIANTS = ("op", "tf", "xla")
MODES = ("fwd", "fwdbwd")
DTYPES = ("float32", "float16", "bfloat16", "float64")

# The backend each variant traces under (XLA always takes the pure-TensorFlow path).
_BACKENDS = {"op": "op", "tf": "tf", "xla": "op", "harness": "tf"}


class Case:
    """One benchmark input: a single tensor, or a group of tensors for one batch_entropies call."""

    def __init__(self, name, shapes, grouped, description=""):
        self.name = name
        self.shapes = [tuple(s) for s in shapes]
        self.grouped = grouped
        self.description = description

    @property
    def elements(self):
        return int(sum(np.prod(s) for s in self.shapes))

    def label(self):
        if not self.grouped:
            return "[" + ", ".join(str(d) for d in self.shapes[0]) + "]"
        distinct = []
        for s in self.shapes:
            if s not in distinct:
                distinct.append(s)
        if len(distinct) == 1:
            return f"{len(self.shapes)} x [" + ", ".join(str(d) for d in distinct[0]) + "]"
        return f"{len(self.shapes)} tensors, {len(distinct)} shapes"


def _mixed_cnn_shapes(batch=128):
    """Activations of a small CNN (conv stages, then dense layers): a group of mixed shapes."""
    shapes = []
    for size, channels, count in ((32, 16, 6), (16, 32, 6), (8, 64, 6)):
        shapes += [(batch, size, size, channels)] * count
    shapes += [(batch, 256)] * 3 + [(batch, 10)]
    return shapes


def all_cases():
    """Every case by name; the sets below pick from these."""
    cases = [
        Case("tiny", [(16, 32)], False, "one small layer: per-call overhead"),
        Case("small", [(128, 256)], False, "a dense layer"),
        Case("mlp", [(256, 1024)], False, "a wide dense layer"),
        Case("large", [(1024, 4096)], False, "16 MB in float32: bound by memory bandwidth"),
        Case("tall", [(65536, 64)], False, "tall: the batch is split over threads"),
        Case("wide", [(64, 65536)], False, "wide: many unit blocks, few rows"),
        Case("conv", [(64, 32, 32, 32)], False, "a rank-4 conv activation"),
        Case("group-20", [(32, 64)] * 20, True, "20 small layers"),
        Case("group-500", [(32, 64)] * 500, True, "500 small layers: a deep network"),
        Case("group-100", [(128, 256)] * 100, True, "100 dense layers"),
        Case("group-mixed", _mixed_cnn_shapes(), True, "a CNN's activations, mixed shapes"),
    ]
    return {c.name: c for c in cases}


QUICK_SET = [("tiny", ("float32",)), ("group-20", ("float32",))]
STANDARD_SET = [
    ("tiny", ("float32",)),
    ("small", ("float32",)),
    ("large", DTYPES),
    ("tall", ("float32",)),
    ("wide", ("float32",)),
    ("conv", ("float32",)),
    ("group-500", ("float32",)),
    ("group-mixed", ("float32",)),
]
FULL_SET = [(name, DTYPES) for name in all_cases()]


def make_input(case, dtype, seed=0):
    """The one tensor a case's functions take: the tensor itself, [N * B, ...] for a group of
    equal shapes (split inside), or a flat buffer for mixed shapes (split and reshaped inside)."""
    rng = np.random.default_rng(seed)
    if not case.grouped:
        shape = case.shapes[0]
    elif len(set(case.shapes)) == 1:
        shape = (len(case.shapes) * case.shapes[0][0],) + case.shapes[0][1:]
    else:
        shape = (case.elements,)
    data = rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5
    return tf.cast(tf.constant(data), tf.as_dtype(dtype))


def _unpack(case, inp):
    if not case.grouped:
        return [inp]
    if len(set(case.shapes)) == 1:
        return tf.split(inp, len(case.shapes), axis=0)
    sizes = [int(np.prod(s)) for s in case.shapes]
    return [tf.reshape(p, s) for p, s in zip(tf.split(inp, sizes), case.shapes)]


def _sum_by_shape(case, tensors):
    """A few outputs that depend on every tensor: tf.add_n over each distinct shape."""
    by_shape = {}
    for s, t in zip(case.shapes, tensors):
        by_shape.setdefault(s, []).append(t)
    return [tf.add_n(ts) if len(ts) > 1 else ts[0] for ts in by_shape.values()]


def build_function(case, mode, variant, ddof=1):
    """A callable f(inp) for one (case, mode, variant) of VARIANTS, or 'harness': everything
    but LBE (the tf.function call, the split of grouped inputs, the sums of their gradients).

    The backend is fixed at trace time (lbe_ops.use_backend), and every call runs inside the
    same backend block, so the trace never changes.
    """
    if variant not in _BACKENDS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(_BACKENDS)}")
    backend = _BACKENDS[variant]
    jit = variant == "xla"

    def body(inp):
        xs = _unpack(case, inp)
        if variant == "harness":  # everything but LBE: the call, the split and the sums
            if mode == "fwd" or not case.grouped:
                return xs[0]
            return _sum_by_shape(case, xs)
        if mode == "fwd":
            if case.grouped:
                return lbe_ops.batch_entropies(xs, ddof=ddof)
            return lbe_ops.batch_entropy(xs[0], ddof=ddof)
        with tf.GradientTape() as tape:
            tape.watch(xs)
            if case.grouped:
                h = lbe_ops.batch_entropies(xs, ddof=ddof)
            else:
                h = lbe_ops.batch_entropy(xs[0], ddof=ddof)
        grads = tape.gradient(h, xs)
        if case.grouped:
            return [h] + _sum_by_shape(case, grads)
        return h, grads[0]

    fn = tf.function(body, jit_compile=jit, autograph=False, reduce_retracing=False)

    def call(inp):
        with lbe_ops.use_backend(backend):
            return fn(inp)

    call.backend = backend
    return call
