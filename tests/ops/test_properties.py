"""Property-based tests (hypothesis) against the float64 numpy reference: shapes, dtypes, ddof,
scales, offsets, dead units and upstream gradients into every output, on both backends, with
error bounds derived from the precision the computation is done in.

LBE_OPS_HYPOTHESIS_EXAMPLES sets the examples per property test (default 150).
"""

import dataclasses
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lbe_ops
from oracle64 import PI_E

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
    # The op sums chunks of 32 rows and merges them pairwise; pure TensorFlow's reduce_mean may
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
