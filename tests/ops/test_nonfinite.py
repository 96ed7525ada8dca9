"""NaN and Inf in the input: how they propagate, the same on both backends and in the core
kernels (docs/numerics.md): a unit's mean, variance and gradient column, the entropy, the other
units' statistics and gradients; and finite inputs whose variance overflows the statistics type.
"""

import numpy as np
import pytest
import tensorflow as tf

import lbe_ops
from lbe_ops import _core
from op_checks import moments_and_grad
from oracle64 import PI_E
from oracle64 import moments as np_moments

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]
BACKENDS = ["op", "tf"]


def poisoned(dtype, case):
    """[40, 5] activations with unit 1 poisoned; units 0, 2, 3, 4 stay clean."""
    data = np.random.default_rng(5).standard_normal((40, 5)) + 2.0
    if case == "nan":
        data[3, 1] = np.nan
    elif case == "+inf":
        data[3, 1] = np.inf
    elif case == "-inf":
        data[3, 1] = -np.inf
    elif case == "+inf,-inf":
        data[3, 1], data[7, 1] = np.inf, -np.inf
    elif case == "all nan":
        data[:, 1] = np.nan
    elif case == "overflow":  # finite inputs whose variance overflows the accumulator
        big = {tf.bfloat16: 1e38, tf.float32: 1e38, tf.float64: 1e300}[dtype]
        data[:, 1] = np.where(data[:, 1] > 2.0, big, -big)
    return tf.cast(tf.constant(data), dtype)


def moments_and_entropy_grad(x, backend):
    with lbe_ops.use_backend(backend), tf.GradientTape() as tape:
        tape.watch(x)
        h, mean, var = lbe_ops.batch_entropy_moments(x)
    grad = tape.gradient(h, x)
    return [tf.cast(t, tf.float64).numpy() for t in (h, mean, var, grad)]


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float32, tf.float64], ids=lambda d: d.name)
def test_overflow_in_a_tf_function_gives_what_eager_mode_gives(dtype):
    """The pure-TF path's wide branch inside a tf.function (a Keras step): the unit whose sums
    overflow gets the same finite gradient as eagerly. (The branch gives the fast statistics a zero
    gradient, and their backward pass holds Inf: 0 * Inf must not reach the input.)"""
    x = poisoned(dtype, "overflow")

    @tf.function
    def step(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            h, mean, var = lbe_ops.reference.moments(v)
            hs = lbe_ops.reference.batch_entropies([v, v[:, 2:]])
            total = tf.cast(h, tf.float64) + tf.reduce_sum(tf.cast(hs, tf.float64))
        return h, mean, var, tape.gradient(total, v)

    with tf.GradientTape() as tape:
        tape.watch(x)
        h, mean, var = lbe_ops.reference.moments(x)
        hs = lbe_ops.reference.batch_entropies([x, x[:, 2:]])
        total = tf.cast(h, tf.float64) + tf.reduce_sum(tf.cast(hs, tf.float64))
    eager = [tf.cast(t, tf.float64).numpy() for t in (h, mean, var, tape.gradient(total, x))]
    graph = [tf.cast(t, tf.float64).numpy() for t in step(x)]
    assert np.all(np.isfinite(graph[3]))
    # Grappler rewrites some of the arithmetic in graph mode: equal to rounding.
    rtol = {tf.bfloat16: 2.0 ** -7, tf.float32: 1e-6, tf.float64: 1e-14}[dtype]
    for e, g in zip(eager, graph):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol * np.abs(e[np.isfinite(e)]).max())


def kind(values):
    """nan / +inf / -inf / finite, elementwise."""
    values = np.asarray(values, np.float64)
    return np.where(np.isnan(values), "nan",
                    np.where(np.isposinf(values), "+inf",
                             np.where(np.isneginf(values), "-inf", "finite")))


NAN_INF_CASES = [(d, c) for d in DTYPES for c in ["nan", "+inf", "-inf", "+inf,-inf", "all nan"]]
NAN_INF_CASES += [(d, "overflow") for d in (tf.bfloat16, tf.float32, tf.float64)]


@pytest.mark.parametrize("dtype,case", NAN_INF_CASES, ids=lambda v: getattr(v, "name", v))
def test_nan_and_inf_propagate_the_same_on_both_backends(dtype, case):
    """What docs/numerics.md states: a NaN or +-Inf in a unit makes that unit's variance, the
    entropy and that unit's whole gradient column NaN; finite values whose variance overflows the
    statistics type give a +Inf variance but a finite entropy and a finite gradient column (the
    wide path); the other units' gradients stay finite and correct. The op and the
    pure-TensorFlow path agree on all of it (the mean: see below)."""
    x = poisoned(dtype, case)
    h_op, mean_op, var_op, g_op = moments_and_entropy_grad(x, "op")
    h_tf, mean_tf, var_tf, g_tf = moments_and_entropy_grad(x, "tf")

    assert kind(h_op) == kind(h_tf)
    np.testing.assert_array_equal(kind(var_op), kind(var_tf))
    np.testing.assert_array_equal(kind(g_op), kind(g_tf))
    if case == "overflow":
        assert kind(h_op) == "finite" and kind(var_op)[1] == "+inf"
        assert np.all(np.isfinite(g_op[:, 1]))
        # the true gradient, about 1 / (U (B - 1) std): 5e-41 for float32 statistics (below the
        # smallest normal float32, so 0 comes back), 5e-303 for float64
        if dtype == tf.float64:
            assert np.all(g_op[:, 1] != 0)
        else:
            assert np.all(np.abs(g_op[:, 1]) < np.finfo(np.float32).tiny)
        np.testing.assert_allclose(h_op, h_tf, rtol=1e-6)
        np.testing.assert_allclose(g_op[:, 1], g_tf[:, 1], rtol=0,
                                   atol=1e-5 * np.abs(g_tf[:, 1]).max())
    else:
        assert kind(h_op) == "nan" and kind(var_op)[1] == "nan"
        assert np.all(np.isnan(g_op[:, 1]))
    clean = [0, 2, 3, 4]
    assert np.all(np.isfinite(g_op[:, clean]))
    clean_ref = tf.cast(tf.gather(x, clean, axis=1), tf.float64).numpy()
    _, _, var_ref = np_moments(clean_ref, 1)
    expected = PI_E * (clean_ref - clean_ref.mean(0)) / (5 * 39 * (PI_E * var_ref + 1))
    scale = np.abs(expected).max()
    tol = {tf.float16: 3e-3, tf.bfloat16: 2e-2, tf.float32: 1e-5, tf.float64: 1e-12}[dtype]
    np.testing.assert_allclose(g_op[:, clean], expected, rtol=0, atol=tol * scale)
    np.testing.assert_allclose(g_tf[:, clean], expected, rtol=0, atol=tol * scale)
    np.testing.assert_allclose(var_op[clean], var_ref, rtol=max(tol, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("case", ["+inf", "-inf", "+inf,-inf", "overflow"])
def test_inf_mean_output_matches_the_fallback(dtype, case):
    """+-Inf in a unit: its mean is +-Inf (NaN with both signs) on both backends; an overflowing
    sum of finite values: a finite mean."""
    if case == "overflow" and dtype == tf.float16:
        pytest.skip("float16 inputs cannot overflow their float32 statistics")
    x = poisoned(dtype, case)
    mean_op = moments_and_entropy_grad(x, "op")[1]
    mean_tf = moments_and_entropy_grad(x, "tf")[1]
    np.testing.assert_array_equal(kind(mean_op), kind(mean_tf))
    expected = {"+inf": "+inf", "-inf": "-inf", "+inf,-inf": "nan", "overflow": "finite"}[case]
    assert kind(mean_op)[1] == expected
    if case == "overflow":
        np.testing.assert_allclose(mean_op[1], mean_tf[1], rtol=1e-6)


@pytest.mark.parametrize("backend", ["op", "tf"])
def test_nan_in_one_tensor_of_a_group_stays_in_its_entry(backend):
    clean = [tf.constant(np.random.default_rng(i).standard_normal((16, 4 + i)), tf.float32)
             for i in range(3)]
    bad = tf.tensor_scatter_nd_update(clean[1], [[2, 2]], [np.nan])
    with lbe_ops.use_backend(backend), tf.GradientTape() as tape:
        xs = [clean[0], bad, clean[2]]
        tape.watch(xs)
        hs = lbe_ops.batch_entropies(xs)
    grads = tape.gradient(hs, xs)
    expected = lbe_ops.batch_entropies(clean).numpy()
    assert np.isnan(hs[1].numpy())
    np.testing.assert_allclose(hs.numpy()[[0, 2]], expected[[0, 2]], rtol=1e-6)
    assert np.all(np.isfinite(grads[0].numpy())) and np.all(np.isfinite(grads[2].numpy()))
    assert np.all(np.isnan(grads[1].numpy()[:, 2]))
    assert np.all(np.isfinite(np.delete(grads[1].numpy(), 2, axis=1)))


# ---- the poisoned unit's mean and variance, the clean units' statistics, the core kernels -----

def poisoned_rows(dtype, values, batch=40):
    """[batch, 4] activations with unit 1's rows 0 and 5 replaced by `values` (row 0 is the pivot).
    A batch of 10 is one chunk of the CPU kernels, 40 several."""
    data = np.random.default_rng(3).standard_normal((batch, 4)) + 2.0
    data[0, 1], data[5, 1] = values
    return tf.cast(tf.constant(data), dtype)


INF_CASES = {  # (row 0, row 5) of unit 1 -> the unit's mean
    "+inf in row 5": ((1.0, np.inf), np.inf),
    "-inf in row 5": ((1.0, -np.inf), -np.inf),
    "+inf in row 0 (the pivot)": ((np.inf, 1.0), np.inf),
    "-inf in both": ((-np.inf, -np.inf), -np.inf),
    "+inf and -inf": ((np.inf, -np.inf), np.nan),
    "nan": ((1.0, np.nan), np.nan),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64],
                         ids=lambda d: d.name)
@pytest.mark.parametrize("case", list(INF_CASES))
@pytest.mark.parametrize("batch", [10, 40])
def test_inf_and_nan_input(backend, dtype, case, batch):
    values, expected_mean = INF_CASES[case]
    x = poisoned_rows(dtype, values, batch)
    h, mean, var, grad = moments_and_grad(x, backend)
    np.testing.assert_array_equal(mean[1], expected_mean)  # equal_nan: NaN matches NaN
    assert np.isnan(var[1]) and np.isnan(h) and np.all(np.isnan(grad[:, 1]))
    clean = [0, 2, 3]
    x64 = tf.cast(x, tf.float64).numpy()[:, clean]
    _, mean_ref, var_ref = np_moments(x64)
    rtol = {tf.float16: 1e-6, tf.bfloat16: 1e-6, tf.float32: 1e-6, tf.float64: 1e-13}[dtype]
    np.testing.assert_allclose(mean[clean], mean_ref, rtol=rtol)
    np.testing.assert_allclose(var[clean], var_ref, rtol=rtol)
    assert np.all(np.isfinite(grad[:, clean]))


@pytest.mark.parametrize("kernel", ["cpu", "cuda_emulation"])
@pytest.mark.parametrize("batch", [10, 40])
def test_core_inf_mean(kernel, batch):
    x = np.stack([poisoned_rows(tf.float32, INF_CASES[c][0], batch).numpy()[:, 1]
                  for c in INF_CASES], axis=1)
    if kernel == "cpu":
        _, (mean,), (var,), _ = _core.forward([x])
    else:
        _, (mean,), (var,), _, _ = _core._emulate_cuda_forward([x])
    np.testing.assert_array_equal(mean, [INF_CASES[c][1] for c in INF_CASES])
    assert np.all(np.isnan(var))
