"""Second- and third-order gradients.

Second order through the op path goes through the gradient ops' registered gradients: checked here
against numeric differentiation of the gradient ops themselves, against the pure-TF path's
Hessian-vector products and against central differences of the float64 first-order gradient.
(First-order values and gradients: test_values.py.)
"""

import numpy as np
import pytest
import tensorflow as tf

import lbe_ops
from lbe_ops import _loader
from op_checks import make_input
from oracle64 import entropy_grad as np_entropy_grad

BACKENDS = ["op", "tf"]


def _id(value):
    return value.name if isinstance(value, tf.dtypes.DType) else str(value)


def _f64(t):
    return tf.cast(t, tf.float64).numpy()


# ---- second-order gradients -------------------------------------------------------------------

def _ops():
    return _loader.op_module()


def _grad_op_inputs(rng, shapes, ddof, batch_small):
    """Random float64 inputs of a gradient op: xs, and flat means, variances, per-tensor
    entropy gradients, statistics gradients, mean residuals (the ops take any values there)."""
    shapes = [((ddof if batch_small else s[0]),) + s[1:] for s in shapes]
    xs = [tf.constant(rng.standard_normal(s) * 2.0 + 0.5) for s in shapes]
    units = sum(int(np.prod(s[1:])) for s in shapes)
    means = tf.constant(rng.standard_normal(units))
    variances = tf.constant(rng.uniform(0.2, 3.0, units))
    grad_entropies = tf.constant(rng.uniform(0.5, 2.0, len(shapes)))
    grad_means = tf.constant(rng.standard_normal(units))
    grad_variances = tf.constant(rng.standard_normal(units))
    residuals = tf.constant(rng.standard_normal(units) * 1e-3)
    return xs, means, variances, grad_entropies, grad_means, grad_variances, residuals


# Which of the gradient ops' optional inputs are given (the others are the empty "none" vector).
OPTIONAL_INPUTS = ("grad_mean", "grad_variance", "mean_residual")
OPTIONAL_CASES = [OPTIONAL_INPUTS, ("grad_mean",), ("grad_variance",), ("mean_residual",), ()]


def _optional_inputs(case, values):
    """The optional inputs in op order, the given value where `case` names it, else empty; the
    residual as the ops' one-element list."""
    grad_mean, grad_variance, residual = [
        value if name in case else tf.zeros([0], tf.float64)
        for name, value in zip(OPTIONAL_INPUTS, values)]
    return grad_mean, grad_variance, [residual]


def _check_numeric(fn, inputs):
    theoretical, numerical = tf.test.compute_gradient(fn, inputs, delta=1e-6)
    for t, n in zip(theoretical, numerical):
        assert np.all(np.isfinite(t))
        scale = max(np.abs(n).max(initial=0.0), 1e-12)
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-7 * scale)
    return theoretical


@pytest.mark.parametrize("allow_small_batch, batch_small",
                         [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("optional", OPTIONAL_CASES, ids="+".join)
@pytest.mark.parametrize("ddof", [0, 1, 2])
def test_gradient_op_of_one_tensor_has_the_numeric_gradient(rng, ddof, optional,
                                                            allow_small_batch, batch_small):
    (x,), mean, variance, grad_entropy, *optional_values = _grad_op_inputs(
        rng, [(ddof + 5, 3, 2)], ddof, batch_small)
    given = [v for name, v in zip(OPTIONAL_INPUTS, optional_values) if name in optional]
    inputs = [x, mean, variance, grad_entropy[0]] + given

    def dx(x, mean, variance, grad_entropy, *given):
        given = iter(given)
        values = [next(given) if name in optional else None for name in OPTIONAL_INPUTS]
        return _ops().lbe_batch_entropy_grad(x, mean, variance, grad_entropy,
                                             *_optional_inputs(optional, values),
                                             ddof=ddof, allow_small_batch=allow_small_batch)

    theoretical = _check_numeric(dx, inputs)
    if batch_small:
        assert all(np.all(t == 0.0) for t in theoretical)


@pytest.mark.parametrize("allow_small_batch", [False, True])
@pytest.mark.parametrize("optional", OPTIONAL_CASES, ids="+".join)
def test_gradient_op_of_a_group_has_the_numeric_gradient(rng, optional, allow_small_batch):
    ddof = 1
    shapes = [(6, 3), (4, 2, 2), (9, 1)]
    xs, means, variances, grad_entropies, *optional_values = _grad_op_inputs(
        rng, shapes, ddof, False)
    if allow_small_batch:  # a small tensor inside the group: dx 0, all its partials 0
        xs[1] = xs[1][:1]
    given = [v for name, v in zip(OPTIONAL_INPUTS, optional_values) if name in optional]
    inputs = xs + [means, variances, grad_entropies] + given

    def dxs(*args):
        group = list(args[:len(shapes)])
        means, variances, grad_entropies = args[len(shapes):len(shapes) + 3]
        given = iter(args[len(shapes) + 3:])
        values = [next(given) if name in optional else None for name in OPTIONAL_INPUTS]
        return tf.concat([tf.reshape(d, [-1]) for d in _ops().lbe_batch_entropies_grad(
            group, means, variances, grad_entropies, *_optional_inputs(optional, values),
            ddof=ddof, allow_small_batch=allow_small_batch)], 0)

    theoretical = _check_numeric(dxs, inputs)
    if allow_small_batch:
        # Rows of the Jacobian that belong to xs[1]'s dx are 0, whatever the input.
        begin = int(np.prod(xs[0].shape))
        rows = slice(begin, begin + int(np.prod(xs[1].shape)))
        assert all(np.all(t[rows] == 0.0) for t in theoretical)


def test_gradient_op_gradient_with_statistics_gradients_of_unknown_length(rng):
    """A statistics gradient whose length is only known at run time may be the empty "none"
    vector or a full one: the second-order result is that of the static call either way."""
    (x,), mean, variance, grad_entropy, grad_mean, grad_variance, residual = _grad_op_inputs(
        rng, [(5, 4)], 1, False)
    weights = tf.constant(rng.standard_normal(x.shape))

    def partials(x, mean, variance, grad_entropy, grad_mean, grad_variance, residual):
        inputs = [x, mean, variance, grad_entropy, grad_mean, grad_variance, residual]
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            dx = _ops().lbe_batch_entropy_grad(*inputs[:6], [inputs[6]])
            total = tf.reduce_sum(dx * weights)
        return tape.gradient(total, inputs)

    dynamic = tf.function(partials, input_signature=[
        tf.TensorSpec(None, tf.float64), tf.TensorSpec([None], tf.float64),
        tf.TensorSpec([None], tf.float64), tf.TensorSpec([], tf.float64),
        tf.TensorSpec([None], tf.float64), tf.TensorSpec(None, tf.float64),
        tf.TensorSpec([None], tf.float64)])
    empty = tf.zeros([0], tf.float64)
    for g_mean, g_variance, r in [(grad_mean, grad_variance, residual),
                                  (empty, grad_variance, empty), (grad_mean, empty, residual),
                                  (empty, empty, empty)]:
        args = (x, mean, variance, grad_entropy[0], g_mean, g_variance, r)
        for got, expected in zip(dynamic(*args), partials(*args)):
            assert got.shape == expected.shape
            np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-12, atol=1e-15)


def _loss(xs, ddof, allow_small_batch, weights):
    """A loss that reaches every output: the grouped entropies, one entropy alone, and the
    mean and variance of one tensor."""
    w_group, w_mean, w_variance = weights
    hs = lbe_ops.batch_entropies(xs, ddof=ddof, allow_small_batch=allow_small_batch)
    h0 = lbe_ops.batch_entropy(xs[0], ddof=ddof, allow_small_batch=allow_small_batch)
    h1, mean, variance = lbe_ops.batch_entropy_moments(xs[1], ddof=ddof,
                                                       allow_small_batch=allow_small_batch)
    stats = mean.dtype
    return (tf.reduce_sum(tf.cast(hs, stats) * tf.cast(w_group, stats))
            + tf.cast(3.0 * h0 + h1, stats) + tf.reduce_sum(tf.cast(w_mean, stats) * mean)
            + tf.reduce_sum(tf.cast(w_variance, stats) * variance))


def _second_order(xs, vs, ddof, allow_small_batch, weights):
    """The Hessian-vector product H v and the gradient of the penalty sum |dL/dx|^2."""
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(xs)
        with tf.GradientTape() as inner:
            inner.watch(xs)
            loss = _loss(xs, ddof, allow_small_batch, weights)
        grads = inner.gradient(loss, xs)
        product = tf.add_n([tf.reduce_sum(tf.cast(g * v, tf.float64)) for g, v in zip(grads, vs)])
        penalty = tf.add_n([tf.reduce_sum(tf.cast(g, tf.float64) ** 2) for g in grads])
    return outer.gradient(product, xs), outer.gradient(penalty, xs)


# Relative to max |result|. Half precision: the first-order dx is rounded to float16 on either
# path before the second differentiation sees it.
SECOND_ORDER_RTOL = {tf.float16: 2e-2, tf.float32: 1e-4, tf.float64: 1e-10}


@pytest.mark.parametrize("mode", ["eager", "graph", "graph-unknown-shape"])
@pytest.mark.parametrize("dtype", [tf.float16, tf.float32, tf.float64], ids=_id)
@pytest.mark.parametrize("allow_small_batch", [False, True])
def test_second_order_matches_the_pure_tf_path(rng, mode, dtype, allow_small_batch):
    ddof = int(rng.integers(0, 3))
    shapes = [(ddof + 8, 4), (ddof + 5, 3, 2), (ddof + 17, 5)]
    if allow_small_batch:
        shapes.append((ddof, 3))
    xs = [make_input(rng, s, dtype)[0] for s in shapes]
    vs = [tf.constant(rng.standard_normal(s), dtype) for s in shapes]
    units = [int(np.prod(s[1:])) for s in shapes]
    weights = (tf.constant(rng.uniform(0.5, 2.0, len(shapes))),
               tf.constant(rng.standard_normal(units[1])),
               tf.constant(rng.standard_normal(units[1])))

    def run(*tensors):
        return _second_order(list(tensors[:len(shapes)]), list(tensors[len(shapes):]), ddof,
                             allow_small_batch, weights)

    if mode != "eager":
        spec = (lambda s: tf.TensorSpec(None, dtype)) if mode == "graph-unknown-shape" else \
            (lambda s: tf.TensorSpec([None, *s[1:]], dtype))
        run = tf.function(run, input_signature=[spec(s) for s in shapes] * 2)
    results = {}
    for backend in BACKENDS:
        with lbe_ops.use_backend(backend):
            results[backend] = run(*xs, *vs)
    for op_result, tf_result in zip(*results.values()):
        for got, expected, shape in zip(op_result, tf_result, shapes):
            got, expected = _f64(got), _f64(expected)
            assert got.shape == shape and np.all(np.isfinite(got))
            if shape[0] <= ddof:
                assert np.all(got == 0.0) and np.all(expected == 0.0)
                continue
            # float16 results this small are subnormal: allow a few of their spacing, 2**-24.
            floor = 4 * 2.0 ** -24 if dtype == tf.float16 else 0.0
            np.testing.assert_allclose(got, expected, rtol=0, atol=SECOND_ORDER_RTOL[dtype] *
                                       np.abs(expected).max() + floor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("shape", [(3, 2), (12, 5), (40, 3, 3)], ids=str)
def test_hessian_vector_product_matches_float64_differences(rng, backend, ddof, shape):
    """H v of the entropy against central differences of the float64 numpy gradient."""
    x, x64 = make_input(rng, shape, tf.float64)
    v = rng.standard_normal(shape)
    with lbe_ops.use_backend(backend):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                h = lbe_ops.batch_entropy(x, ddof=ddof)
            product = tf.reduce_sum(inner.gradient(h, x) * v)
        hv = outer.gradient(product, x).numpy()
    step = 1e-5 * np.abs(x64).max() / np.abs(v).max()
    expected = (np_entropy_grad(x64 + step * v, ddof) - np_entropy_grad(x64 - step * v, ddof)) \
        / (2 * step)
    np.testing.assert_allclose(hv, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_third_order_is_available_on_the_op_path(rng):
    """The second-order partials are TF ops whose gradients exist: a third derivative works and
    matches the pure-TF path."""
    x = make_input(rng, (7, 3), tf.float64)[0]
    v = tf.constant(rng.standard_normal((7, 3)))
    results = []
    for backend in BACKENDS:
        with lbe_ops.use_backend(backend):
            with tf.GradientTape() as third:
                third.watch(x)
                with tf.GradientTape() as second:
                    second.watch(x)
                    with tf.GradientTape() as first:
                        first.watch(x)
                        h = lbe_ops.batch_entropy(x)
                    g = tf.reduce_sum(first.gradient(h, x) * v)
                hv = tf.reduce_sum(second.gradient(g, x) * v)
            results.append(third.gradient(hv, x).numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=0,
                               atol=1e-10 * np.abs(results[1]).max())
