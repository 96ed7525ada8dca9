"""A batch B <= ddof, too small for a variance.

allow_small_batch=True: entropy, mean and variance 0 and a zero gradient. For the last batch of
an epoch (1 sample) and the empty per-replica batch of a distribution strategy (0 samples).
Covered on both backends, every dtype, eager, tf.function with an unknown batch dimension and (for
the reference, which XLA uses) jit_compile=True; the tensors of a group that are not small must
come out as from a call without them. Without the flag, a small batch stays an error naming the
argument where one can be raised; under XLA, which compiles assertions away, it is NaN on purpose.
(The flag's own type check: test_bad_input.py.)
"""

import numpy as np
import pytest
import tensorflow as tf

import lbe_ops
from lbe_ops import _loader
from op_checks import ENTROPY_RTOL, GRAD_RTOL, assert_grad_close, make_input
from oracle64 import entropy as np_entropy
from oracle64 import entropy_grad as np_entropy_grad
from oracle64 import moments as np_moments

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]
BACKENDS = ["op", "tf"]
# (ddof, batch) with batch <= ddof.
SMALL = [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
UNITS = 5
XLA_UNITS = 4
# eager and graph on both backends; XLA always runs the reference, whatever the backend.
MODES = [("op", "eager"), ("op", "graph"), ("tf", "eager"), ("tf", "graph"), ("tf", "xla")]


# The two matrices below in float32 with batches 0 and 2 by default, all of them with
# `pytest -m slow` (a traced pure-TF group takes seconds per case); the other tests here cover
# every dtype and batch.
MATRIX_DTYPES = [pytest.param(d, marks=[] if d == tf.float32 else [pytest.mark.slow], id=d.name)
                 for d in DTYPES]
MATRIX_SMALL = [pytest.param(*case, marks=[] if case in ((1, 0), (2, 2)) else [pytest.mark.slow])
                for case in SMALL]


def _id(value):
    return value.name if isinstance(value, tf.dtypes.DType) else str(value)


def _stats_dtype(dtype):
    return tf.float64 if dtype == tf.float64 else tf.float32


def _compile(fn, mode, signature):
    if mode == "eager":
        return fn
    return tf.function(fn, input_signature=signature, jit_compile=(mode == "xla"))


def _as_f64(t):
    return tf.cast(t, tf.float64).numpy()


def _assert_zero_and_finite(grad, shape):
    assert grad is not None and tuple(grad.shape) == tuple(shape)
    g = _as_f64(grad)
    assert np.all(np.isfinite(g)) and np.all(g == 0.0)


@pytest.mark.parametrize("backend, mode", MODES, ids=lambda v: v)
@pytest.mark.parametrize("dtype", MATRIX_DTYPES)
@pytest.mark.parametrize("ddof, batch", MATRIX_SMALL)
def test_single_small_batch_is_zero_with_zero_gradient(rng, backend, mode, dtype, ddof, batch):
    x = tf.constant(rng.standard_normal((batch, UNITS)) * 3.0 + 1.0, dtype)
    w_mean = tf.constant(rng.standard_normal(UNITS), _stats_dtype(dtype))
    w_var = tf.constant(rng.standard_normal(UNITS), _stats_dtype(dtype))

    def step(v):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(v)
            h, mean, var = lbe_ops.batch_entropy_moments(v, ddof=ddof, allow_small_batch=True)
            loss = (tf.cast(h, mean.dtype) + tf.reduce_sum(w_mean * mean) +
                    tf.reduce_sum(w_var * var))
            h32 = lbe_ops.batch_entropy(v, ddof=ddof, dtype=tf.float32, allow_small_batch=True)
        return h, mean, var, h32, tape.gradient(loss, v), tape.gradient(h32, v)

    with lbe_ops.use_backend(backend):
        fn = _compile(step, mode, [tf.TensorSpec([None, UNITS], dtype)])
        h, mean, var, h32, grad, grad32 = fn(x)
    assert h.dtype == dtype and h.shape == () and float(_as_f64(h)) == 0.0
    assert h32.dtype == tf.float32 and float(h32) == 0.0
    for stat in (mean, var):
        assert stat.dtype == _stats_dtype(dtype) and stat.shape == (UNITS,)
        assert np.all(stat.numpy() == 0.0)
    _assert_zero_and_finite(grad, x.shape)
    _assert_zero_and_finite(grad32, x.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [0, 1])
def test_small_batch_of_higher_rank(backend, batch):
    x = tf.ones([batch, 3, 2, 4]) * 2.5
    with lbe_ops.use_backend(backend):
        with tf.GradientTape() as tape:
            tape.watch(x)
            h, mean, var = lbe_ops.batch_entropy_moments(x, allow_small_batch=True)
        grad = tape.gradient(h, x)
    assert float(h) == 0.0 and mean.shape == (24,) and np.all(mean.numpy() == 0.0)
    assert np.all(var.numpy() == 0.0)
    _assert_zero_and_finite(grad, x.shape)


# A group of normal and small tensors, small ones at both ends and next to each other, so that
# the op's packed entropies are copied back in several runs.
def _group_shapes(ddof, batch):
    return [(batch, 5), (4, 3), (batch, 2, 2), (batch, 1), (7, 2, 2), (ddof + 1, 3), (batch, 4)]


def _is_small(shape, ddof):
    return shape[0] <= ddof


def _entropies_and_grads(xs, weights, ddof, allow_small_batch, mode="eager"):
    def step(*vs):
        with tf.GradientTape() as tape:
            tape.watch(vs)
            hs = lbe_ops.batch_entropies(list(vs), ddof=ddof, allow_small_batch=allow_small_batch)
            total = tf.reduce_sum(tf.cast(hs, tf.float64) * weights)
        return hs, tape.gradient(total, vs)

    signature = [tf.TensorSpec([None, *x.shape[1:]], x.dtype) for x in xs]
    return _compile(step, mode, signature)(*xs)


@pytest.mark.parametrize("backend, mode", MODES, ids=lambda v: v)
@pytest.mark.parametrize("dtype", MATRIX_DTYPES)
@pytest.mark.parametrize("ddof, batch", MATRIX_SMALL)
def test_group_mixing_small_and_normal_tensors(rng, backend, mode, dtype, ddof, batch):
    shapes = _group_shapes(ddof, batch)
    xs, x64s = zip(*[make_input(rng, s, dtype) for s in shapes])
    weights = rng.uniform(0.5, 2.0, len(shapes))
    normal = [i for i, s in enumerate(shapes) if not _is_small(s, ddof)]

    with lbe_ops.use_backend(backend):
        hs, grads = _entropies_and_grads(xs, tf.constant(weights), ddof, True, mode)
        # The same normal tensors without the small ones, and without the flag.
        hs_plain, grads_plain = _entropies_and_grads(
            [xs[i] for i in normal], tf.constant(weights[normal]), ddof, False, mode)

    assert hs.dtype == dtype and hs.shape == (len(shapes),)
    for k, i in enumerate(normal):
        h, h_plain = float(_as_f64(hs[i])), float(_as_f64(hs_plain[k]))
        if backend == "op" and mode != "xla":
            # The core is called with exactly the normal tensors: the same numbers, bit for bit.
            assert h == h_plain
            assert np.array_equal(_as_f64(grads[i]), _as_f64(grads_plain[k]))
        else:
            np.testing.assert_allclose(h, h_plain, rtol=ENTROPY_RTOL[dtype])
            plain = _as_f64(grads_plain[k])
            np.testing.assert_allclose(_as_f64(grads[i]), plain, rtol=GRAD_RTOL[dtype],
                                       atol=GRAD_RTOL[dtype] * np.abs(plain).max())
        np.testing.assert_allclose(h, np_entropy(x64s[i], ddof), rtol=ENTROPY_RTOL[dtype],
                                   atol=1e-6 if dtype != tf.float64 else 0)
        assert_grad_close(grads[i], weights[i] * np_entropy_grad(x64s[i], ddof), GRAD_RTOL[dtype],
                          x64s[i])
    for i, s in enumerate(shapes):
        if _is_small(s, ddof):
            assert float(_as_f64(hs[i])) == 0.0
            _assert_zero_and_finite(grads[i], s)


@pytest.mark.parametrize("backend, mode", MODES, ids=lambda v: v)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("batch", [0, 1])
def test_group_of_only_small_tensors(rng, backend, mode, dtype, batch):
    """An empty per-replica batch: every layer of the model has batch 0."""
    shapes = [(batch, 5), (batch, 2, 3), (batch, 1)]
    xs = [make_input(rng, s, dtype)[0] for s in shapes]
    with lbe_ops.use_backend(backend):
        hs, grads = _entropies_and_grads(xs, tf.constant([1.0, 2.0, 3.0], tf.float64), 1, True,
                                         mode)
    assert hs.dtype == dtype and np.all(_as_f64(hs) == 0.0)
    for g, s in zip(grads, shapes):
        _assert_zero_and_finite(g, s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=_id)
def test_float32_result_for_half_inputs_with_small_tensors(rng, backend, dtype):
    """The op path computes wider results from the variance output; small tensors' is 0."""
    xs, x64s = zip(*[make_input(rng, s, dtype) for s in [(6, 4), (1, 3), (0, 2), (9, 2, 2)]])
    with lbe_ops.use_backend(backend):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            hs = lbe_ops.batch_entropies(list(xs), dtype=tf.float32, allow_small_batch=True)
            total = tf.reduce_sum(hs)
        grads = tape.gradient(total, xs)
    assert hs.dtype == tf.float32
    np.testing.assert_allclose(hs.numpy(), [np_entropy(x64s[0]), 0.0, 0.0, np_entropy(x64s[3])],
                               rtol=2e-6)
    for i in (1, 2):
        _assert_zero_and_finite(grads[i], xs[i].shape)
    for i in (0, 3):
        assert_grad_close(grads[i], np_entropy_grad(x64s[i]), GRAD_RTOL[dtype], x64s[i])


class TestRawOps:
    @property
    def ops(self):
        return _loader.op_module()

    def test_attribute_defaults_to_false_and_reaches_the_gradient_op(self):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
        def fn(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                h = lbe_ops.batch_entropy(x, allow_small_batch=True)
            return tape.gradient(h, x), self.ops.lbe_batch_entropy(x)[0]

        graph = fn.get_concrete_function().graph
        attrs = {op.type: [] for op in graph.get_operations()}
        for op in graph.get_operations():
            if op.type.startswith("Lbe>"):
                attrs[op.type].append(op.get_attr("allow_small_batch"))
        assert sorted(attrs["Lbe>BatchEntropy"]) == [False, True]
        assert attrs["Lbe>BatchEntropyGrad"] == [True]

    @pytest.mark.parametrize("dtype", DTYPES, ids=_id)
    def test_grouped_ops_with_statistics_gradients(self, rng, dtype):
        """Small tensors' slots of the flat means and variances are 0, their dx is 0 whatever
        gradients reach those slots; the other tensors' match a group without them, bit for
        bit."""
        stats = _stats_dtype(dtype)
        shapes = [(1, 3), (5, 2), (0, 4), (0, 1), (6, 3), (1, 2)]
        kept = [1, 4]
        xs = [make_input(rng, s, dtype)[0] for s in shapes]
        units = [int(np.prod(s[1:])) for s in shapes]
        offsets = np.concatenate([[0], np.cumsum(units)])
        slots = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(shapes))]
        # Nonzero weights everywhere, also on the small tensors' slots.
        w_h = rng.uniform(0.5, 2.0, len(shapes))
        w_mean = rng.standard_normal(offsets[-1])
        w_var = rng.standard_normal(offsets[-1])

        def run(members, allow):
            vs = [xs[i] for i in members]
            unit_index = np.concatenate([slots[i] for i in members])
            with tf.GradientTape() as tape:
                tape.watch(vs)
                h, mean, var, (residual,) = self.ops.lbe_batch_entropies(
                    vs, ddof=1, allow_small_batch=allow, Tstats=stats, num_residuals=1)
                loss = (tf.cast(tf.reduce_sum(h * tf.constant(w_h[list(members)], dtype)), stats) +
                        tf.reduce_sum(tf.constant(w_mean[unit_index], stats) * mean) +
                        tf.reduce_sum(tf.constant(w_var[unit_index], stats) * var))
            return h, mean.numpy(), var.numpy(), residual.numpy(), tape.gradient(loss, vs)

        h, mean, var, residual, grads = run(range(len(shapes)), True)
        h_plain, mean_plain, var_plain, residual_plain, grads_plain = run(kept, False)
        plain_offset = 0
        for k, i in enumerate(kept):
            assert _as_f64(h[i]) == _as_f64(h_plain[k])
            plain_slot = slice(plain_offset, plain_offset + units[i])
            plain_offset += units[i]
            assert np.array_equal(mean[slots[i]], mean_plain[plain_slot])
            assert np.array_equal(var[slots[i]], var_plain[plain_slot])
            assert np.array_equal(residual[slots[i]], residual_plain[plain_slot])
            assert np.array_equal(_as_f64(grads[i]), _as_f64(grads_plain[k]))
        for i, s in enumerate(shapes):
            if i in kept:
                continue
            assert _as_f64(h[i]) == 0.0
            assert np.all(mean[slots[i]] == 0.0) and np.all(var[slots[i]] == 0.0)
            assert np.all(residual[slots[i]] == 0.0)
            _assert_zero_and_finite(grads[i], s)

    def test_gradient_ops_directly(self):
        x0, x1 = tf.zeros([0, 3]), tf.ones([1, 3]) * 4.0
        stats = tf.constant([7.0, 8.0, 9.0])  # whatever the small tensors' statistics say
        dx = self.ops.lbe_batch_entropy_grad(x1, stats, stats, tf.constant(5.0), stats, stats, [stats],
                                             allow_small_batch=True)
        _assert_zero_and_finite(dx, (1, 3))
        flat = tf.concat([stats, stats], 0)
        dxs = self.ops.lbe_batch_entropies_grad([x0, x1], flat, flat, tf.constant([1.0, 2.0]),
                                                flat, flat, [flat], allow_small_batch=True)
        _assert_zero_and_finite(dxs[0], (0, 3))
        _assert_zero_and_finite(dxs[1], (1, 3))
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"xs\[0\] has a batch of 0"):
            self.ops.lbe_batch_entropies_grad([x0, x1], flat, flat, tf.constant([1.0, 2.0]),
                                              flat, flat, [flat])

    def test_zero_units_and_rank_are_still_errors(self):
        with pytest.raises(tf.errors.InvalidArgumentError, match="x has zero units"):
            self.ops.lbe_batch_entropy(tf.zeros([0, 0]), allow_small_batch=True)
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"xs\[1\] has zero units"):
            self.ops.lbe_batch_entropies([tf.ones([4, 3]), tf.zeros([1, 3, 0])],
                                         allow_small_batch=True)
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="rank"):
            self.ops.lbe_batch_entropy(tf.zeros([0]), allow_small_batch=True)


# ---- the default stays an error --------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ddof, batch", SMALL)
def test_default_static_small_batch_is_an_error(backend, ddof, batch):
    x = np.ones((batch, UNITS), np.float32)
    expected = (f"has a batch of {batch}, but batch entropy with ddof={ddof} needs a batch of "
                f"at least {ddof + 1}")
    with lbe_ops.use_backend(backend):
        with pytest.raises(ValueError, match="x " + expected):
            lbe_ops.batch_entropy(x, ddof=ddof)
        with pytest.raises(ValueError, match="x " + expected):
            lbe_ops.batch_entropy_moments(x, ddof=ddof)
        with pytest.raises(ValueError, match=r"xs\[1\] " + expected):
            lbe_ops.batch_entropies([np.ones((4, UNITS), np.float32), x], ddof=ddof)
        with pytest.raises(ValueError, match=r"xs\[0\] " + expected):
            lbe_ops.reference.batch_entropies([x], ddof=ddof)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("ddof, batch", SMALL)
def test_default_dynamic_small_batch_is_an_error(backend, dtype, ddof, batch):
    signature = [tf.TensorSpec([None, UNITS], dtype)] * 2

    @tf.function(input_signature=signature)
    def single(x, _):
        return lbe_ops.batch_entropy(x, ddof=ddof)

    @tf.function(input_signature=signature)
    def group(x, y):
        return lbe_ops.batch_entropies([x, y], ddof=ddof)

    small, normal = tf.ones([batch, UNITS], dtype), tf.ones([ddof + 1, UNITS], dtype)
    needs = f"needs a batch of at least {ddof + 1}"
    with lbe_ops.use_backend(backend):
        # The op says "x has a batch of 1, but ... needs ...", the reference "x: batch ... needs".
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"\bx\b.*" + needs):
            single(small, normal)
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"xs\[1\].*" + needs):
            group(normal, small)
        assert np.isfinite(float(_as_f64(single(normal, normal))))


# ---- without allow_small_batch under XLA: NaN, as no error can be raised there ---------------

def _moments_and_group(ddof):
    def step(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            h, mean, variance = lbe_ops.batch_entropy_moments(x, ddof=ddof)
        hs = lbe_ops.batch_entropies([y, x], ddof=ddof)
        return h, mean, variance, tape.gradient(h, x), hs
    return step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [tf.float16, tf.float32, tf.float64], ids=_id)
@pytest.mark.parametrize("ddof, batch", SMALL)
def test_dynamic_small_batch_raises_outside_xla_and_is_nan_inside(rng, backend, dtype, ddof,
                                                                   batch):
    """One function, two compilations: graph mode raises, XLA gives NaN entropy and variance
    (and gradient) for every batch <= ddof, and the mean of the batch; a batch large enough for
    a variance, fed to the same compiled function, matches the float64 reference."""
    signature = [tf.TensorSpec([None, XLA_UNITS], dtype)] * 2
    step = _moments_and_group(ddof)
    graph_fn = tf.function(step, input_signature=signature)
    xla_fn = tf.function(step, input_signature=signature, jit_compile=True)
    x, x64 = make_input(rng, (batch, XLA_UNITS), dtype)
    y, y64 = make_input(rng, (ddof + 3, XLA_UNITS), dtype)

    with lbe_ops.use_backend(backend):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=f"needs a batch of at least {ddof + 1}"):
            graph_fn(x, y)
        h, mean, variance, grad, hs = xla_fn(x, y)
    assert h.dtype == dtype and np.isnan(_as_f64(h))
    assert variance.shape == (XLA_UNITS,) and np.all(np.isnan(variance.numpy()))
    if batch:
        np.testing.assert_allclose(mean.numpy(), x64.mean(axis=0), rtol=1e-6, atol=1e-6)
        assert grad.shape == x.shape and np.all(np.isnan(_as_f64(grad)))
    else:
        assert np.all(np.isnan(mean.numpy()))
    assert hs.dtype == dtype and np.isnan(_as_f64(hs[1]))
    np.testing.assert_allclose(_as_f64(hs[0]), np_entropy(y64, ddof), rtol=ENTROPY_RTOL[dtype])

    x, x64 = make_input(rng, (ddof + 2, XLA_UNITS), dtype)
    with lbe_ops.use_backend(backend):
        h, mean, variance, grad, hs = xla_fn(x, y)
    ref_h, ref_mean, ref_variance = np_moments(x64, ddof)
    np.testing.assert_allclose(_as_f64(h), ref_h, rtol=ENTROPY_RTOL[dtype])
    np.testing.assert_allclose(variance.numpy(), ref_variance, rtol=1e-5)
    np.testing.assert_allclose(_as_f64(hs), [np_entropy(y64, ddof), ref_h],
                               rtol=ENTROPY_RTOL[dtype])
    assert_grad_close(grad, np_entropy_grad(x64, ddof), GRAD_RTOL[dtype], x64)
