"""batch_entropy / batch_entropies against a float64 numpy reference, on both backends."""

import collections

import numpy as np
import pytest
import tensorflow as tf

import lbe_ops
from op_checks import ENTROPY_RTOL, GRAD_RTOL, assert_grad_close, make_input
from oracle64 import entropy as np_entropy
from oracle64 import entropy_grad as np_entropy_grad
from oracle64 import moments as np_moments

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]
BACKENDS = ["op", "tf"]
SHAPES = [(2, 1), (3, 5), (17, 3, 4), (64, 257), (4097, 33), (5, 100003), (8, 6, 6, 5),
          (33, 4, 4, 16), (1030, 513), (300, 5000)]

OFFSET_GRAD_RTOL = {tf.float16: 3e-3, tf.bfloat16: 2e-2, tf.float32: 5e-3, tf.float64: 1e-9}


def entropy_and_grad(x, ddof, fn=lbe_ops.batch_entropy):
    with tf.GradientTape() as tape:
        tape.watch(x)
        h = fn(x, ddof=ddof)
    return h, tape.gradient(h, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_value_and_gradient_match_float64_reference(rng, backend, dtype, shape):
    ddof = int(rng.integers(0, 2))
    x, x64 = make_input(rng, shape, dtype)
    with lbe_ops.use_backend(backend):
        h, grad = entropy_and_grad(x, ddof)
    assert h.dtype == dtype and h.shape == ()
    np.testing.assert_allclose(float(tf.cast(h, tf.float64)), np_entropy(x64, ddof),
                               rtol=ENTROPY_RTOL[dtype], atol=1e-6 if dtype != tf.float64 else 0)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert_grad_close(grad, np_entropy_grad(x64, ddof), GRAD_RTOL[dtype], x64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("ddof", [0, 1])
def test_large_offset_stays_accurate(rng, backend, dtype, ddof):
    x, x64 = make_input(rng, (300, 70), dtype, offset_in_stds=1e4)
    with lbe_ops.use_backend(backend):
        h, grad = entropy_and_grad(x, ddof)
    np.testing.assert_allclose(float(tf.cast(h, tf.float64)), np_entropy(x64, ddof),
                               rtol=ENTROPY_RTOL[dtype], atol=1e-6 if dtype != tf.float64 else 0)
    assert_grad_close(grad, np_entropy_grad(x64, ddof), OFFSET_GRAD_RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_moments_outputs(rng, backend):
    x, x64 = make_input(rng, (50, 3, 7), tf.float32)
    with lbe_ops.use_backend(backend):
        h, mean, var = lbe_ops.batch_entropy_moments(x, ddof=1)
    ref_h, ref_mean, ref_var = np_moments(x64, 1)
    assert mean.dtype == tf.float32 and mean.shape == (21,)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-5, atol=1e-5 * np.abs(ref_mean).max())
    np.testing.assert_allclose(var.numpy(), ref_var, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_mean_and_variance_outputs(rng, backend):
    """The gradient op also carries gradients that flow into the mean and variance outputs."""
    x, _ = make_input(rng, (20, 9), tf.float64)
    w_mean = tf.constant(rng.standard_normal(9))
    w_var = tf.constant(rng.standard_normal(9))

    def loss(v):
        h, mean, var = lbe_ops.batch_entropy_moments(v, ddof=1)
        return 3.0 * h + tf.reduce_sum(w_mean * mean) + tf.reduce_sum(w_var * var)

    with lbe_ops.use_backend(backend):
        theoretical, numerical = tf.test.compute_gradient(loss, [x])
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("shape", [(4, 3), (7, 2, 3), (3, 1)], ids=str)
def test_numerical_gradient_float64(rng, backend, ddof, shape):
    x, _ = make_input(rng, shape, tf.float64)
    with lbe_ops.use_backend(backend):
        theoretical, numerical = tf.test.compute_gradient(
            lambda v: lbe_ops.batch_entropy(v, ddof=ddof), [x])
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=2e-5, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numerical_gradient_grouped_float64(rng, backend):
    xs = [make_input(rng, s, tf.float64)[0] for s in [(5, 3), (5, 2, 2), (9, 1)]]
    weights = tf.constant([0.5, -1.0, 2.0], tf.float64)
    with lbe_ops.use_backend(backend):
        theoretical, numerical = tf.test.compute_gradient(
            lambda a, b, c: tf.reduce_sum(weights * lbe_ops.batch_entropies([a, b, c])), xs)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=2e-5, atol=1e-8)


def test_grouped_op_returns_flat_statistics(rng):
    """Lbe>BatchEntropies returns every tensor's means and variances in one vector each, tensor 0's
    units first, and its gradient carries gradients of those vectors back to each tensor."""
    ops = lbe_ops._loader.op_module()
    shapes = [(6, 3), (6, 2, 2), (9, 1), (4, 5)]
    xs, x64s = zip(*[make_input(rng, s, tf.float64) for s in shapes])
    hs, means, variances, _ = ops.lbe_batch_entropies(list(xs), ddof=1, Tstats=tf.float64,
                                                      num_residuals=1)
    assert means.shape == (3 + 4 + 1 + 5,) and variances.shape == means.shape
    refs = [np_moments(x64, 1) for x64 in x64s]
    np.testing.assert_allclose(hs.numpy(), [r[0] for r in refs], rtol=1e-12)
    np.testing.assert_allclose(means.numpy(), np.concatenate([r[1] for r in refs]), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(variances.numpy(), np.concatenate([r[2] for r in refs]),
                               rtol=1e-12)

    w_h = tf.constant(rng.standard_normal(len(shapes)))
    w_mean = tf.constant(rng.standard_normal(13))
    w_var = tf.constant(rng.standard_normal(13))

    def loss(a, b, c, d):
        h, mean, var, _ = ops.lbe_batch_entropies([a, b, c, d], ddof=1, Tstats=tf.float64,
                                                  num_residuals=1)
        return (tf.reduce_sum(w_h * h) + tf.reduce_sum(w_mean * mean) +
                tf.reduce_sum(w_var * var))

    theoretical, numerical = tf.test.compute_gradient(loss, list(xs))
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=2e-5, atol=1e-7)


def test_grouped_statistics_shape_is_the_sum_of_units():
    ops = lbe_ops._loader.op_module()

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 5], tf.float32),
                                  tf.TensorSpec([None, None], tf.float32)])
    def fn(x, y):
        _, means, _, _ = ops.lbe_batch_entropies([x, x[:, 0]], num_residuals=1)
        assert means.shape == (25,)
        _, means, _, (residuals,) = ops.lbe_batch_entropies([x, y], num_residuals=1)
        assert residuals.shape.as_list() == [None]
        assert means.shape.as_list() == [None]
        return means

    assert fn(tf.ones([3, 4, 5]), tf.ones([3, 7])).shape == (27,)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_grouped_matches_single_and_reference(rng, dtype):
    shapes = [(32, 64), (32, 5, 5, 3), (129, 1), (7, 1000), (2, 3)]
    xs, x64s = zip(*[make_input(rng, s, dtype) for s in shapes])
    with tf.GradientTape() as tape:
        tape.watch(xs)
        hs = lbe_ops.batch_entropies(list(xs))
        total = tf.reduce_sum(tf.cast(hs, tf.float32) * tf.range(1.0, 6.0))
    grads = tape.gradient(total, xs)
    assert hs.shape == (5,) and hs.dtype == dtype
    for i, (x, x64, g) in enumerate(zip(xs, x64s, grads)):
        np.testing.assert_allclose(float(tf.cast(hs[i], tf.float64)), np_entropy(x64),
                                   rtol=ENTROPY_RTOL[dtype], atol=1e-6)
        single = lbe_ops.batch_entropy(x)
        assert float(tf.cast(single, tf.float64)) == float(tf.cast(hs[i], tf.float64))
        assert_grad_close(g, (i + 1) * np_entropy_grad(x64), GRAD_RTOL[dtype], x64)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_grouped_gradients_are_independent_tensors(rng, dtype):
    """The grouped gradient op returns its dx tensors as aligned slices of one buffer. Ops that
    may write into an input's buffer (element-wise ops forward it when they can) must still see
    each tensor alone: odd sizes, so that no slice ends on an alignment boundary."""
    shapes = [(3, 5), (2, 3), (129, 1), (4, 7, 3), (5, 11)]
    xs, x64s = zip(*[make_input(rng, s, dtype) for s in shapes])

    @tf.function(autograph=False)
    def grads_then_elementwise(xs):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            hs = lbe_ops.batch_entropies(list(xs))
        grads = tape.gradient(hs, xs)
        return [tf.nn.relu(g * 4.0) - tf.nn.relu(g * -4.0) for g in grads]

    for x64, g in zip(x64s, grads_then_elementwise(xs)):
        assert g.shape == x64.shape
        assert_grad_close(g, 4.0 * np_entropy_grad(x64), GRAD_RTOL[dtype], x64)


def test_grouped_mixed_dtypes(rng):
    xs = [make_input(rng, (16, 4), tf.float32)[0], make_input(rng, (16, 4), tf.float64)[0],
          make_input(rng, (8, 3), tf.float16)[0]]
    hs = lbe_ops.batch_entropies(xs)
    assert hs.dtype == tf.float64
    ref = lbe_ops.reference.batch_entropies(xs)
    np.testing.assert_allclose(hs.numpy(), ref.numpy(), rtol=2e-3)


# ---- the pure-TF path's groups: tensors of one batch computed side by side ------------------

# Units (per tensor) that are multiples of 8 or not, ranks 2 to 4, all three accumulator cases.
GROUP_SHAPES = [((32,), tf.float32), ((4, 4, 2), tf.float32), ((5,), tf.float32),
                ((64,), tf.float32), ((3, 3), tf.float16), ((7,), tf.float64), ((32,), tf.float64),
                ((2, 2, 8), tf.bfloat16), ((32,), tf.float32)]


def _group_and_one_at_a_time(xs, weights, mode, same_batch):
    """(entropies, gradients) of reference.batch_entropies(xs) and of one batch_entropy call per
    tensor, in float64 numpy, for the loss sum(weights * H)."""
    def grouped(*vs):
        with tf.GradientTape() as tape:
            tape.watch(vs)
            hs = lbe_ops.reference.batch_entropies(list(vs), dtype=tf.float64,
                                                   same_batch=same_batch)
            total = tf.reduce_sum(hs * weights)
        return hs, tape.gradient(total, vs)

    def one_at_a_time(*vs):
        with tf.GradientTape() as tape:
            tape.watch(vs)
            hs = tf.stack([lbe_ops.reference.batch_entropy(v, dtype=tf.float64) for v in vs])
            total = tf.reduce_sum(hs * weights)
        return hs, tape.gradient(total, vs)

    signature = [tf.TensorSpec([None, *x.shape[1:]], x.dtype) for x in xs]
    results = []
    for fn in (grouped, one_at_a_time):
        if mode != "eager":
            fn = tf.function(fn, input_signature=signature, jit_compile=mode == "xla")
        hs, grads = fn(*xs)
        results.append((hs.numpy(), [tf.cast(g, tf.float64).numpy() for g in grads]))
    return results


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("batch", [2, pytest.param(37, marks=pytest.mark.slow),
                                   pytest.param(300, marks=pytest.mark.slow)])
def test_tf_group_equals_one_tensor_at_a_time(rng, mode, batch):
    """A group mixing shapes and dtypes gives each tensor's own entropy and gradient: bit for bit
    in eager and graph mode, to rounding under XLA (which compiles each function as a whole)."""
    xs = [make_input(rng, (batch, *units), dtype)[0] for units, dtype in GROUP_SHAPES]
    weights = tf.constant(rng.uniform(0.5, 2.0, len(xs)))
    # In eager mode the static batch groups them; in graph mode (dynamic batch) same_batch does.
    (hs, grads), (hs_one, grads_one) = _group_and_one_at_a_time(xs, weights, mode,
                                                                 same_batch=mode != "eager")
    for i, (units, dtype) in enumerate(GROUP_SHAPES):
        if mode != "xla":
            assert hs[i] == hs_one[i]
            np.testing.assert_array_equal(grads[i], grads_one[i])
            continue
        rtol = 1e-12 if dtype == tf.float64 else 1e-6
        np.testing.assert_allclose(hs[i], hs_one[i], rtol=rtol)
        # Half-precision gradients: a float32 difference may round to the neighbouring value.
        grad_rtol = {tf.float16: 2.0 ** -10, tf.bfloat16: 2.0 ** -7}.get(dtype, 10 * rtol)
        np.testing.assert_allclose(grads[i], grads_one[i], rtol=0,
                                   atol=grad_rtol * np.abs(grads_one[i]).max())


def test_tf_group_graph_has_a_fixed_number_of_ops():
    """However many tensors: no op per tensor but its reshape (and the constant of its shape)."""
    def op_types(count):
        @tf.function(input_signature=[tf.TensorSpec([None, 4, 8], tf.float32)] * count)
        def step(*xs):
            with tf.GradientTape() as tape:
                tape.watch(xs)
                hs = lbe_ops.reference.batch_entropies(list(xs), same_batch=True)
            return tape.gradient(tf.reduce_sum(hs), xs)

        ops = step.get_concrete_function().graph.get_operations()
        return collections.Counter(op.type for op in ops
                                   if op.type not in ("Placeholder", "Identity", "Reshape", "Const"))

    assert op_types(40) == op_types(80)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_and_reference_agree_in_graph_mode(rng, backend):
    x, x64 = make_input(rng, (128, 48), tf.float32)

    @tf.function
    def step(v):
        return entropy_and_grad(v, 1)

    with lbe_ops.use_backend(backend):
        h, grad = step(x)
    np.testing.assert_allclose(float(h), np_entropy(x64), rtol=2e-5)
    assert_grad_close(grad, np_entropy_grad(x64), 2e-5, x64)


def test_graph_uses_the_op_and_xla_uses_the_composition(rng):
    x, x64 = make_input(rng, (32, 10), tf.float32)

    def step(v):
        return entropy_and_grad(v, 1)

    graph_fn = tf.function(step)
    xla_fn = tf.function(step, jit_compile=True)
    op_types = {op.type for op in graph_fn.get_concrete_function(x).graph.get_operations()}
    assert {"Lbe>BatchEntropy", "Lbe>BatchEntropyGrad"} <= op_types
    xla_types = {op.type for op in xla_fn.get_concrete_function(x).graph.get_operations()}
    assert not any(t.startswith("Lbe>") for t in xla_types)
    h_graph, g_graph = graph_fn(x)
    h_xla, g_xla = xla_fn(x)
    np.testing.assert_allclose(float(h_xla), float(h_graph), rtol=1e-5)
    np.testing.assert_allclose(g_xla.numpy(), g_graph.numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.float64], ids=lambda d: d.name)
def test_dead_units_have_zero_finite_gradient(rng, mode, dtype):
    live = rng.standard_normal((16, 5))
    data = np.concatenate([live, np.zeros((16, 3)), np.full((16, 2), 7.5)], axis=1)
    x = tf.constant(data, dtype)
    fn = {"eager": lambda v: entropy_and_grad(v, 1),
          "graph": tf.function(lambda v: entropy_and_grad(v, 1)),
          "xla": tf.function(lambda v: entropy_and_grad(v, 1), jit_compile=True)}[mode]
    h, grad = fn(x)
    grad = tf.cast(grad, tf.float64).numpy()
    assert np.isfinite(float(tf.cast(h, tf.float64)))
    assert np.all(np.isfinite(grad))
    assert np.all(grad[:, 5:] == 0.0)
    assert np.abs(grad[:, :5]).max() > 0


def test_all_dead_layer(rng):
    x = tf.zeros([8, 4, 4])
    h, grad = entropy_and_grad(x, 1)
    assert float(h) == 0.0 and np.all(grad.numpy() == 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_bitwise_repeatable(rng, dtype):
    x, _ = make_input(rng, (3000, 700), dtype)
    runs = [entropy_and_grad(x, 1) for _ in range(4)]
    first_h, first_g = runs[0]
    for h, g in runs[1:]:
        assert tf.bitcast(h, tf.uint16 if dtype.size == 2 else
                          (tf.uint32 if dtype.size == 4 else tf.uint64)).numpy() == \
            tf.bitcast(first_h, tf.uint16 if dtype.size == 2 else
                       (tf.uint32 if dtype.size == 4 else tf.uint64)).numpy()
        assert np.array_equal(tf.cast(g, tf.float64).numpy(), tf.cast(first_g, tf.float64).numpy())


def test_static_shapes_are_inferred():
    @tf.function(input_signature=[tf.TensorSpec([None, 4, 5], tf.float32)])
    def fn(x):
        h, mean, var = lbe_ops.batch_entropy_moments(x)
        assert h.shape == () and mean.shape == (20,) and var.shape == (20,)
        hs = lbe_ops.batch_entropies([x, x[:, 0]])
        assert hs.shape == (2,)
        return h

    fn(tf.ones([3, 4, 5]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=lambda d: d.name)
def test_float32_result_for_half_inputs_is_not_rounded(rng, backend, dtype):
    xs, x64s = zip(*[make_input(rng, s, dtype) for s in [(64, 300), (16, 7), (9, 2, 3)]])
    weights = tf.constant([1.0, -2.0, 0.5])
    with lbe_ops.use_backend(backend):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            hs = lbe_ops.batch_entropies(list(xs), dtype=tf.float32)
            total = tf.reduce_sum(weights * hs)
        grads = tape.gradient(total, xs)
        single = lbe_ops.batch_entropy(xs[0], dtype="float32")
    assert hs.dtype == tf.float32 and single.dtype == tf.float32
    for i, x64 in enumerate(x64s):
        # float32 accuracy, far better than the input dtype's own rounding of H.
        np.testing.assert_allclose(float(hs[i]), np_entropy(x64), rtol=2e-6)
        assert_grad_close(grads[i], float(weights[i]) * np_entropy_grad(x64), GRAD_RTOL[dtype],
                          x64)
    assert float(single) == float(hs[0])

    @tf.function(input_signature=[tf.TensorSpec([None, None], dtype)] * 3)
    def unknown_units(a, b, c):  # units known only at run time
        return lbe_ops.batch_entropies([a, b, c], dtype=tf.float32)

    flat = [tf.reshape(x, [x.shape[0], -1]) for x in xs]
    with lbe_ops.use_backend(backend):
        np.testing.assert_array_equal(unknown_units(*flat).numpy(), hs.numpy())
    with pytest.raises(TypeError, match="dtype"):
        lbe_ops.batch_entropies(list(xs), dtype=tf.int32)
