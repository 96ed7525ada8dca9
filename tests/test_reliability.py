"""Reliability: tests that try to break the op rather than show that it works.

- property-based tests (hypothesis) over shapes, dtypes, ddof, scales, offsets, dead units and
  upstream gradients into every output, against the float64 numpy reference, with error bounds
  derived from the precision the computation is done in (both backends);
- NaN and Inf in the input: how they propagate, the same on both backends (docs/numerics.md);
- no memory growth over 10,000 calls (RSS), many threads against one, a first load raced by
  many threads, a library with an undefined symbol (what a TensorFlow mismatch would give);
- a SavedModel that uses the op, loaded in a fresh process after `import lbe_ops`, and what
  happens without the import;
- inputs of more than 2**31 elements (marked slow: run with LBE_OPS_RUN_SLOW=1; ~11 GB, ~2.5 min).

LBE_OPS_HYPOTHESIS_EXAMPLES sets the examples per property test (default 150).
"""

import concurrent.futures
import dataclasses
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lbe_ops
from conftest import PI_E, np_moments

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]
EXAMPLES = int(os.environ.get("LBE_OPS_HYPOTHESIS_EXAMPLES", "150"))
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.too_slow,
                                                    HealthCheck.data_too_large])

# Unit roundoff of each dtype; and the smallest spacing of float16 (its subnormals), below which
# a float16 result cannot be more precise.
UNIT_ROUNDOFF = {tf.float16: 2.0 ** -11, tf.bfloat16: 2.0 ** -8, tf.float32: 2.0 ** -24,
                 tf.float64: 2.0 ** -53}
SUBNORMAL_SPACING = {tf.float16: 2.0 ** -24, tf.bfloat16: 0.0, tf.float32: 0.0, tf.float64: 0.0}


def accumulator(dtype):
    return tf.float64 if dtype == tf.float64 else tf.float32


def run_python(code, *args, timeout=600, **env):
    """Runs code in a fresh interpreter (nothing loaded yet) and returns the CompletedProcess."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    full_env.pop("LBE_OPS_BACKEND", None)
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def last_json_line(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- property-based tests against the float64 reference ---------------------------------------

@dataclasses.dataclass
class Case:
    dtype: tf.DType
    ddof: int
    shape: tuple
    scale: float
    offset_in_stds: float
    dead_units: bool
    relu: bool
    seed: int

    def make(self):
        """The activations in self.dtype, and the same values in float64 (what the reference
        sees: the rounding to self.dtype is part of the input, not an error of the op)."""
        rng = np.random.default_rng(self.seed)
        scale = self.scale
        if self.dtype == tf.float16:  # keep |x| inside float16's range (65504)
            scale = min(scale, 6e4 / (2.0 * (abs(self.offset_in_stds) + 8.0)))
        unit_scales = rng.uniform(0.2, 2.0, size=(1,) + self.shape[1:])
        data = rng.standard_normal(self.shape) * scale * unit_scales
        if self.relu:
            data = np.maximum(data, 0.0)
        data += self.offset_in_stds * scale
        if self.dead_units:
            flat = data.reshape(self.shape[0], -1)
            dead = rng.random(flat.shape[1]) < 0.3
            flat[:, dead] = flat[0, dead]
        x = tf.cast(tf.constant(data, tf.float64), self.dtype)
        return x, tf.cast(x, tf.float64).numpy()


@st.composite
def cases(draw, max_elements=150_000):
    dtype = draw(st.sampled_from(DTYPES))
    ddof = draw(st.integers(0, 2))
    batch = draw(st.one_of(st.integers(ddof + 1, ddof + 3), st.integers(ddof + 1, 300)))
    trailing = draw(st.one_of(
        st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
        st.integers(1, 5000).map(lambda u: (u,))))
    units = int(np.prod(trailing))
    batch = max(ddof + 1, min(batch, max_elements // units))
    return Case(dtype=dtype, ddof=ddof, shape=(batch,) + trailing,
                scale=10.0 ** draw(st.floats(-3, 3)),
                offset_in_stds=draw(st.sampled_from([0.0, 0.0, 1.0, -30.0, 1e3, 1e4, -1e4])),
                dead_units=draw(st.booleans()), relu=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 32 - 1)))


class Bounds:
    """Error bounds of a correct implementation that accumulates in `acc` and rounds its results
    to `out`. Beyond rounding, the error that cannot be avoided is the rounding of the mean,
    about c * u * max|x| per unit (c grows with the summation; large offsets make it visible);
    it enters the variance (through the merges of partial results, also to first order) and the
    gradient, through (x - mean)."""

    def __init__(self, x64, ddof, acc, out, mean_terms):
        flat = x64.reshape(x64.shape[0], -1)
        self.batch, self.units = flat.shape
        self.ddof = ddof
        u = UNIT_ROUNDOFF[acc]
        self.u_acc, self.u_out, self.sub = u, UNIT_ROUNDOFF[out], SUBNORMAL_SPACING[out]
        # The reference sums with math.fsum (exactly rounded): its own error is a few float64
        # roundings, not the batch-long sums of numpy along axis 0.
        self.mean = np.array([math.fsum(column) for column in flat.T]) / self.batch
        self.centered = flat - self.mean
        self.var = np.array([math.fsum(column) for column in (self.centered ** 2).T]) \
            / (self.batch - ddof)
        ref_terms = 4 * UNIT_ROUNDOFF[tf.float64]
        self.dmean = (mean_terms * u + ref_terms) * np.abs(flat).max(axis=0) + u * np.abs(self.mean)
        self.dvar = (mean_terms * u * self.var + 2.0 * self.dmean * np.sqrt(self.var)
                     + 2.0 * self.dmean ** 2)
        self.denom = PI_E * self.var + 1.0
        self.entropy = 0.5 * np.log1p(PI_E * self.var).mean()

    def check_entropy(self, h):
        bound = (0.5 * PI_E * self.dvar / self.denom).mean() \
            + (self.u_out + 8 * self.u_acc) * abs(self.entropy) + self.sub
        err = abs(float(h) - self.entropy)
        assert err <= bound, f"|H - ref| = {err:.3g} > {bound:.3g} (ref {self.entropy:.6g})"

    def check_moments(self, mean, var):
        err_mean = np.abs(mean - self.mean)
        assert np.all(err_mean <= self.dmean), f"mean: worst {np.max(err_mean - self.dmean):.3g}"
        err_var = np.abs(var - self.var)
        assert np.all(err_var <= self.dvar), f"variance: worst {np.max(err_var - self.dvar):.3g}"

    def entropy_grad(self, upstream=1.0):
        k = upstream * PI_E / (self.units * (self.batch - self.ddof))
        grad = k * self.centered / self.denom
        # the mean's error moves (x - mean); the variance's error moves 1/denom
        bound = abs(k) / self.denom * (self.dmean + np.abs(self.centered) * (
            8 * self.u_acc + PI_E * self.dvar / self.denom))
        return grad, bound

    def stats_grad(self, w_mean, w_var):
        grad = w_mean / self.batch + 2.0 * w_var * self.centered / (self.batch - self.ddof)
        bound = (np.abs(w_mean) / self.batch * 4 * self.u_acc
                 + 2.0 * np.abs(w_var) / (self.batch - self.ddof)
                 * (self.dmean + 4 * self.u_acc * np.abs(self.centered)))
        return grad, bound

    def check_grad(self, grad, ref, bound, extra_rounding=0.0):
        grad = np.asarray(grad, np.float64).reshape(ref.shape)
        bound = bound + (self.u_out + extra_rounding) * np.abs(ref) + self.sub
        excess = np.abs(grad - ref) - bound
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        assert np.all(np.isfinite(grad))
        assert excess[worst] <= 0, (f"dx{worst} = {grad[worst]:.6g}, reference {ref[worst]:.6g}, "
                                    f"allowed error {bound[worst]:.3g}")


def mean_terms(backend, batch):
    # The op sums chunks of 32 rows and merges them pairwise; the composition's reduce_mean may
    # sum a column sequentially: error bounds of c * u * max|x| with these c.
    return 4.0 + min(batch, 32) if backend == "op" else 4.0 + batch


@pytest.mark.parametrize("backend", ["op", "tf"])
@PROPERTY_SETTINGS
@given(case=cases(), with_stat_grads=st.booleans(), upstream=st.sampled_from([1.0, -3.5]))
def test_property_matches_float64_reference(backend, case, with_stat_grads, upstream):
    x, x64 = case.make()
    acc = accumulator(case.dtype)
    units = x64.reshape(x64.shape[0], -1).shape[1]
    rng = np.random.default_rng(case.seed + 1)
    w_mean = rng.standard_normal(units) if with_stat_grads else np.zeros(units)
    w_var = rng.standard_normal(units) if with_stat_grads else np.zeros(units)
    with lbe_ops.use_backend(backend), tf.GradientTape() as tape:
        tape.watch(x)
        h, mean, var = lbe_ops.batch_entropy_moments(x, ddof=case.ddof)
        loss = tf.cast(h, acc) * upstream
        if with_stat_grads:
            loss += tf.reduce_sum(tf.constant(w_mean, acc) * mean)
            loss += tf.reduce_sum(tf.constant(w_var, acc) * var)
    grad = tape.gradient(loss, x)
    assert h.dtype == case.dtype and h.shape == ()
    assert mean.dtype == acc and var.dtype == acc and mean.shape == (units,)
    assert grad.dtype == case.dtype and grad.shape == x.shape

    bounds = Bounds(x64, case.ddof, acc, case.dtype, mean_terms(backend, case.shape[0]))
    bounds.check_entropy(tf.cast(h, tf.float64))
    bounds.check_moments(mean.numpy().astype(np.float64), var.numpy().astype(np.float64))
    ref, bound = bounds.entropy_grad(upstream)
    stats_ref, stats_bound = bounds.stats_grad(w_mean, w_var)
    bounds.check_grad(tf.cast(grad, tf.float64).numpy().reshape(ref.shape), ref + stats_ref,
                      bound + stats_bound)


@st.composite
def groups(draw):
    n = draw(st.integers(1, 5))
    ddof = draw(st.integers(0, 1))
    shared = draw(st.booleans())
    members = []
    for _ in range(n):
        case = draw(cases(max_elements=40_000))
        batch = max(case.shape[0], ddof + 1)
        members.append(dataclasses.replace(case, ddof=ddof, shape=(batch,) + case.shape[1:]))
    if shared:
        members = [dataclasses.replace(c, dtype=members[0].dtype) for c in members]
    weights = draw(st.lists(st.sampled_from([1.0, -0.5, 2.0, 0.0]), min_size=n, max_size=n))
    return members, weights


@pytest.mark.parametrize("backend", ["op", "tf"])
@PROPERTY_SETTINGS
@given(group=groups())
def test_property_grouped_matches_float64_reference(backend, group):
    members, weights = group
    made = [c.make() for c in members]
    xs = [x for x, _ in made]
    dtypes = {c.dtype for c in members}
    out = members[0].dtype if len(dtypes) == 1 else (
        tf.float64 if tf.float64 in dtypes else tf.float32)
    with lbe_ops.use_backend(backend), tf.GradientTape() as tape:
        tape.watch(xs)
        hs = lbe_ops.batch_entropies(xs, ddof=members[0].ddof)
        loss = tf.reduce_sum(tf.constant(weights, out) * hs)
    grads = tape.gradient(loss, xs)
    assert hs.dtype == out and hs.shape == (len(xs),)
    for case, (x, x64), h, g, w in zip(members, made, tf.cast(hs, tf.float64).numpy(), grads,
                                       weights):
        acc = accumulator(case.dtype)
        bounds = Bounds(x64, case.ddof, acc, case.dtype, mean_terms(backend, x64.shape[0]))
        bounds.check_entropy(h)
        ref, bound = bounds.entropy_grad(w)
        assert g.dtype == case.dtype
        # the upstream weight reaches each dtype's group rounded to that dtype
        bounds.check_grad(tf.cast(g, tf.float64).numpy().reshape(ref.shape), ref, bound,
                          extra_rounding=UNIT_ROUNDOFF[case.dtype])


# ---- NaN and Inf ------------------------------------------------------------------------------

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


def moments_and_grad(x, backend):
    with lbe_ops.use_backend(backend), tf.GradientTape() as tape:
        tape.watch(x)
        h, mean, var = lbe_ops.batch_entropy_moments(x)
    grad = tape.gradient(h, x)
    return [tf.cast(t, tf.float64).numpy() for t in (h, mean, var, grad)]


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
    wide path); the other units' gradients stay finite and correct. The op and the pure-TF
    fallback agree on all of it (the mean: see below)."""
    x = poisoned(dtype, case)
    h_op, mean_op, var_op, g_op = moments_and_grad(x, "op")
    h_tf, mean_tf, var_tf, g_tf = moments_and_grad(x, "tf")

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
def test_nan_mean_output(dtype):
    """The mean output of a unit holding a NaN is NaN on both backends."""
    x = poisoned(dtype, "nan")
    assert np.isnan(moments_and_grad(x, "op")[1][1]) and np.isnan(moments_and_grad(x, "tf")[1][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("case", ["+inf", "-inf", "+inf,-inf", "overflow"])
def test_inf_mean_output_matches_the_fallback(dtype, case):
    """+-Inf in a unit: its mean is +-Inf (NaN with both signs) on both backends; an overflowing
    sum of finite values: a finite mean."""
    if case == "overflow" and dtype == tf.float16:
        pytest.skip("float16 inputs cannot overflow their float32 statistics")
    x = poisoned(dtype, case)
    mean_op, mean_tf = moments_and_grad(x, "op")[1], moments_and_grad(x, "tf")[1]
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


# ---- memory -----------------------------------------------------------------------------------

def test_no_memory_growth_over_10000_calls():
    """10,000 eager calls (forward and gradient), then 2,000 grouped calls and 2,000 calls of a
    tf.function, after a warmup: the process's resident memory may not grow by more than 16 MB.
    Leaking one input (64 KB) per call would be 640 MB; the bound catches ~1 KB per call."""
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    rng = np.random.default_rng(11)
    x = tf.constant(rng.standard_normal((64, 256)), tf.float32)
    xs = [tf.constant(rng.standard_normal((64, 100)), tf.float16),
          tf.constant(rng.standard_normal((64, 10, 3)), tf.float16)]

    def single_step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = lbe_ops.batch_entropy(x)
        return tape.gradient(h, x)

    def group_step():
        with tf.GradientTape() as tape:
            tape.watch(xs)
            hs = lbe_ops.batch_entropies(xs)
        return tape.gradient(hs, xs)

    @tf.function
    def graph_step(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            h, mean, var = lbe_ops.batch_entropy_moments(v, ddof=0)
            loss = h + tf.reduce_sum(var)
        return tape.gradient(loss, v)

    graph = graph_step.get_concrete_function(x).graph
    assert {"Lbe>BatchEntropy", "Lbe>BatchEntropyGrad"} <= {op.type for op in graph.get_operations()}
    first = [single_step(), *group_step(), graph_step(x)]
    for _ in range(500):
        single_step(), group_step(), graph_step(x)
    gc.collect()
    before = process.memory_info().rss
    for _ in range(10_000):
        last_single = single_step()
    for _ in range(2_000):
        last_group = group_step()
        last_graph = graph_step(x)
    gc.collect()
    growth = process.memory_info().rss - before
    for a, b in zip(first, [last_single, *last_group, last_graph]):  # still the same results
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert growth < 16 * 2 ** 20, f"RSS grew by {growth / 2 ** 20:.1f} MB over 14,000 calls"


# ---- threads ----------------------------------------------------------------------------------

def _thread_inputs():
    rng = np.random.default_rng(3)
    shapes = [(64, 33), (7, 3, 5), (300, 17), (2, 1), (129, 64), (40, 2, 2, 8)]
    inputs = []
    for i in range(24):
        dtype = DTYPES[i % 4]
        data = rng.standard_normal(shapes[i % len(shapes)]) * (i + 1) + 10.0 * i
        inputs.append((tf.cast(tf.constant(data), dtype), i % 2))
    return inputs


def _entropy_grad_and_group(x, ddof):
    with tf.GradientTape() as tape:
        tape.watch(x)
        h = lbe_ops.batch_entropy(x, ddof=ddof)
        hs = lbe_ops.batch_entropies([x, x[:, :1]], ddof=ddof)
        loss = h + hs[1]
    grad = tape.gradient(loss, x)
    return (tf.cast(h, tf.float64).numpy().tobytes() + tf.cast(hs, tf.float64).numpy().tobytes()
            + tf.cast(grad, tf.float64).numpy().tobytes())


def test_many_threads_get_the_results_of_one():
    """16 threads calling the op at once (eager and one shared tf.function) give bitwise the
    results of one thread calling it alone."""
    inputs = _thread_inputs()
    expected = [_entropy_grad_and_group(x, d) for x, d in inputs]

    @tf.function(reduce_retracing=True)
    def shared(v):
        return lbe_ops.batch_entropy(v, ddof=1)

    shared_expected = [shared(x).numpy().tobytes() for x, _ in inputs]
    start = threading.Barrier(16)

    def work(worker):
        start.wait()
        out = []
        for k in range(len(inputs)):
            i = (k + worker) % len(inputs)  # every thread walks the inputs in another order
            x, ddof = inputs[i]
            out.append((i, _entropy_grad_and_group(x, ddof), shared(x).numpy().tobytes()))
        return out

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(work, range(16)))
    for per_thread in results:
        for i, got, got_shared in per_thread:
            assert got == expected[i], f"input {i} differs when computed concurrently"
            assert got_shared == shared_expected[i]


def test_use_backend_is_per_thread():
    """Threads tracing with use_backend('tf') and with the op at the same time each get their own
    choice."""
    x = tf.random.normal([8, 4])
    start = threading.Barrier(8)

    def trace(worker):
        backend = "tf" if worker % 2 else "op"

        @tf.function
        def f(v):
            return lbe_ops.batch_entropy(v)

        start.wait()
        with lbe_ops.use_backend(backend):
            ops = {op.type for op in f.get_concrete_function(x).graph.get_operations()}
        return backend, any(t.startswith("Lbe>") for t in ops)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for backend, uses_op in pool.map(trace, range(8)):
            assert uses_op == (backend == "op")


def test_first_load_raced_by_many_threads():
    """In a fresh process whose import did not load the library (LBE_OPS_BACKEND=tf then), 16
    threads ask for the op at the same moment: one load, no warning, equal results."""
    out = last_json_line(run_python("""
        import json, threading, warnings
        import numpy as np, tensorflow as tf
        loads = []
        real_load = tf.load_op_library
        def counting_load(path):
            loads.append(path)
            return real_load(path)
        tf.load_op_library = counting_load
        import lbe_ops
        assert loads == []
        x = tf.constant(np.random.default_rng(0).standard_normal((50, 7)), tf.float32)
        start = threading.Barrier(16)
        results, backends = [None] * 16, [None] * 16
        def work(i):
            start.wait()
            with lbe_ops.use_backend("auto"):
                results[i] = float(lbe_ops.batch_entropy(x))
                backends[i] = lbe_ops.backend_info()["backend"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
            [t.start() for t in threads]
            [t.join() for t in threads]
        print(json.dumps({"loads": len(loads), "results": results, "backends": backends,
                          "warnings": [str(w.message) for w in caught if "lbe_ops" in str(w.message)]}))
    """, LBE_OPS_BACKEND="tf"))
    assert out["loads"] == 1
    assert out["warnings"] == []
    assert set(out["backends"]) == {"op"}
    assert len(set(out["results"])) == 1


def test_library_with_an_undefined_symbol_falls_back(tmp_path):
    """An op library that references a symbol this TensorFlow lacks (what loading a library built
    for another TensorFlow gives, were the version check bypassed) is reported and skipped: one
    warning and the pure-TF path, never a crash."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C compiler")
    source = tmp_path / "probe.c"
    source.write_text(textwrap.dedent("""
        extern void _ZN10tensorflow22LbeOpsNoSuchSymbolHereEv(void);
        __attribute__((constructor)) static void register_ops(void) {
            _ZN10tensorflow22LbeOpsNoSuchSymbolHereEv();
        }
    """))
    library = tmp_path / "_lbe_ops.so"
    subprocess.run([compiler, "-x", "c", "-shared", "-fPIC", "-o", str(library), str(source)],
                   check=True, capture_output=True)
    (tmp_path / "_build_info.json").write_text(json.dumps({"built_with_tf": tf.__version__}))
    out = last_json_line(run_python("""
        import json, warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import numpy as np, tensorflow as tf, lbe_ops
            x = tf.constant(np.arange(12.0).reshape(4, 3) ** 2, tf.float32)
            values = [float(lbe_ops.batch_entropy(x)) for _ in range(3)]
        print(json.dumps({"info": lbe_ops.backend_info(), "values": values,
                          "warnings": [str(w.message) for w in caught if "lbe_ops" in str(w.message)]}))
    """, LBE_OPS_LIBRARY=str(library)))
    assert out["info"]["backend"] == "tf"
    assert "undefined symbol" in out["info"]["reason"], out["info"]["reason"]
    assert len(out["warnings"]) == 1 and "pure-TensorFlow" in out["warnings"][0]
    x = (np.arange(12.0).reshape(4, 3) ** 2)
    np.testing.assert_allclose(out["values"], np_moments(x, 1)[0], rtol=1e-6)


# ---- SavedModel -------------------------------------------------------------------------------

class EntropyModule(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, 6, 5], tf.float32)])
    def moments(self, x):
        return lbe_ops.batch_entropy_moments(x)

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 5], tf.float32)])
    def entropy_and_grad(self, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = lbe_ops.batch_entropy(x)
        return h, tape.gradient(h, x)

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 5], tf.float32),
                                  tf.TensorSpec([None, 11], tf.float32)])
    def group(self, a, b):
        return lbe_ops.batch_entropies([a, b])


def _saved_model_inputs():
    rng = np.random.default_rng(17)
    return rng.standard_normal((12, 6, 5)) * 2 + 1, rng.standard_normal((9, 11))


def _lbe_ops_in(function):
    graph = function.get_concrete_function().graph
    return sorted({op.type for op in graph.get_operations() if op.type.startswith("Lbe>")})


LOAD_AND_RUN = """
    import json, sys
    import numpy as np
    {imports}
    import tensorflow as tf
    rng = np.random.default_rng(17)
    a = tf.constant(rng.standard_normal((12, 6, 5)) * 2 + 1, tf.float32)
    b = tf.constant(rng.standard_normal((9, 11)), tf.float32)
    out = {{}}
    for path in sys.argv[1:]:
        try:
            m = tf.saved_model.load(path)
            h, mean, var = m.moments(a)
            h2, grad = m.entropy_and_grad(a)
            with tf.GradientTape() as tape:  # differentiate through the loaded function
                tape.watch(a)
                h3 = m.moments(a)[0]
            grad3 = tape.gradient(h3, a)
            out[path] = {{"h": float(h), "var": var.numpy().tolist(), "h2": float(h2),
                         "grad": grad.numpy().tolist(), "grad3": grad3.numpy().tolist(),
                         "group": m.group(a, b).numpy().tolist()}}
        except Exception as exc:
            out[path] = {{"error": type(exc).__name__ + ": " + str(exc)}}
    print(json.dumps(out))
"""


def _check_loaded(result):
    a, b = _saved_model_inputs()
    a32 = a.astype(np.float32).astype(np.float64)
    b32 = b.astype(np.float32).astype(np.float64)
    h_ref, _, var_ref = np_moments(a32, 1)
    flat = a32.reshape(12, -1)
    grad_ref = (PI_E * (flat - flat.mean(0)) / (30 * 11 * (PI_E * var_ref + 1))).reshape(a.shape)
    assert "error" not in result, result.get("error")
    for key in ("h", "h2"):
        np.testing.assert_allclose(result[key], h_ref, rtol=1e-5)
    np.testing.assert_allclose(result["var"], var_ref, rtol=1e-5)
    for key in ("grad", "grad3"):
        np.testing.assert_allclose(result[key], grad_ref, rtol=0, atol=1e-5 * np.abs(grad_ref).max())
    np.testing.assert_allclose(result["group"], [h_ref, np_moments(b32, 1)[0]], rtol=1e-5)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved_models")
    with_op = EntropyModule()
    assert _lbe_ops_in(with_op.entropy_and_grad) == ["Lbe>BatchEntropy", "Lbe>BatchEntropyGrad"]
    assert _lbe_ops_in(with_op.group) == ["Lbe>BatchEntropies"]
    tf.saved_model.save(with_op, str(root / "with_op"))
    portable = EntropyModule()
    with lbe_ops.use_backend("tf"):  # traced (at save) without the op: stock TensorFlow only
        tf.saved_model.save(portable, str(root / "portable"))
        assert _lbe_ops_in(portable.entropy_and_grad) == []
    return root / "with_op", root / "portable"


def test_saved_model_with_the_op_loads_and_runs_after_import(saved_models):
    with_op, portable = saved_models
    out = last_json_line(run_python(LOAD_AND_RUN.format(imports="import lbe_ops"),
                                    with_op, portable))
    _check_loaded(out[str(with_op)])
    _check_loaded(out[str(portable)])


def test_saved_model_with_the_op_needs_lbe_ops_imported(saved_models):
    """Without `import lbe_ops` (or with LBE_OPS_BACKEND=tf, which keeps the library unloaded) a
    SavedModel containing Lbe> ops fails to load with TensorFlow's 'Op type not registered';
    one saved under use_backend('tf') loads anywhere."""
    with_op, portable = saved_models
    for imports, env in [("", {}), ("import lbe_ops", {"LBE_OPS_BACKEND": "tf"})]:
        out = last_json_line(run_python(LOAD_AND_RUN.format(imports=imports), with_op, portable,
                                        **env))
        assert "Op type not registered 'Lbe>BatchEntrop" in out[str(with_op)]["error"]
        _check_loaded(out[str(portable)])


# ---- more than 2**31 elements -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LBE_OPS_RUN_SLOW") != "1",
                    reason="needs ~11 GB of memory and minutes: set LBE_OPS_RUN_SLOW=1")
def test_more_than_2_31_elements():
    """A bfloat16 input of 2**31 + 366 elements (float32's exponent range keeps its gradient,
    ~1e-9, representable). Each row gets its own offset, so a wrapped 32-bit index would read or
    write the wrong rows and change the statistics; the rows past element 2**31 are checked
    one by one against a chunked float64 reference."""
    units = 999  # not a multiple of any vector width
    batch = 2 ** 31 // units + 1
    assert batch * units > 2 ** 31
    bf16 = tf.bfloat16.as_numpy_dtype
    rng = np.random.default_rng(31)
    unit_offset = rng.uniform(-2, 2, units).astype(np.float32)
    chunk = 1 << 15
    # Made in chunks and concatenated (8 GB for a moment), so that the input then exists once
    # (4 GB), and so does its gradient; numpy only ever sees chunks.
    parts = []
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        trend = (np.arange(start, stop, dtype=np.float32) / batch * 6.0)[:, None]
        block = rng.standard_normal((stop - start, units), dtype=np.float32)
        parts.append(tf.constant((block + trend + unit_offset).astype(bf16)))
    x = tf.concat(parts, axis=0)
    del parts

    with tf.GradientTape() as tape:
        tape.watch(x)
        h, mean, var = lbe_ops.batch_entropy_moments(x)
    grad = tape.gradient(h, x)
    del tape
    h_group = lbe_ops.batch_entropies([x])[0]

    def chunks(tensor):
        for start in range(0, batch, chunk):
            yield tensor[start:start + chunk].numpy().astype(np.float64)

    total = np.zeros(units)
    for values in chunks(x):
        total += values.sum(axis=0)
    mean_ref = total / batch
    m2 = np.zeros(units)
    for values in chunks(x):
        m2 += ((values - mean_ref) ** 2).sum(axis=0)
    var_ref = m2 / (batch - 1)
    h_ref = 0.5 * np.log1p(PI_E * var_ref).mean()

    np.testing.assert_allclose(float(tf.cast(h, tf.float64)), h_ref, rtol=1e-2)
    np.testing.assert_allclose(float(tf.cast(h_group, tf.float64)), h_ref, rtol=1e-2)
    np.testing.assert_allclose(mean.numpy(), mean_ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(var.numpy(), var_ref, rtol=1e-4)

    k = PI_E / (units * (batch - 1) * (PI_E * var_ref + 1))
    scale = np.abs(k).max() * 12.0
    worst = 0.0
    for values, got in zip(chunks(x), chunks(grad)):  # every row, those past element 2**31 too
        expected = k * (values - mean_ref)
        worst = max(worst, np.abs(got - expected).max() / scale)
        assert np.all(np.isfinite(got))
    assert worst < 2e-2, f"max |dx - ref| / scale = {worst:.3g}"
