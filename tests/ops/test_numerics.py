"""Accuracy at the edges of the number range, on the op, the pure-TF path and the core kernels.

Every check compares against a float64 reference computed on the same (rounded) input, so what
is measured is the implementation's own error, not the input's rounding:
- offsets of 1e0 .. 1e6 x the spread (the pivot shift: H, the variance and dH/dx stay at float32
  precision; the op's gradient centres on the two-term mean, so it has no common-mode error);
- constant units: variance, gradient and the mean's deviation exactly 0;
- huge magnitudes: a finite entropy and gradient wherever float32 (or float64) can hold them,
  +Inf for a variance beyond the statistics type, 0 for gradient elements below its smallest
  normal number.
docs/numerics.md states these results. +-Inf and NaN in the input: test_nonfinite.py.
"""

import numpy as np
import pytest
import tensorflow as tf

import lbe_ops
from lbe_ops import _core
from op_checks import moments_and_grad
from oracle64 import PI_E
from oracle64 import entropy_grad as np_entropy_grad
from oracle64 import moments as np_moments

BACKENDS = ["op", "tf"]
OFFSETS = [1e0, 1e2, 1e4, 1e6]
F32_EPS = 2.0 ** -24
TINY32 = float(np.finfo(np.float32).tiny)


def offset_input(rng, shape, dtype, offset):
    """Normal data of a random spread, each unit offset by about `offset` spreads."""
    spread = rng.uniform(0.5, 4.0)
    centers = offset * spread * rng.uniform(0.5, 1.5, size=shape[1:]) * rng.choice([-1, 1], shape[1:])
    return (rng.standard_normal(shape) * spread + centers).astype(dtype)


# ---- large offsets ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS, ids=lambda o: f"{o:.0e}")
@pytest.mark.parametrize("shape", [(256, 64), (1000, 300), (40, 3000)], ids=str)
def test_float32_offsets_keep_float32_accuracy(rng, backend, offset, shape):
    """H, the variance and dH/dx to ~1e-7 relative at any offset up to 1e6 x the spread."""
    x = offset_input(rng, shape, np.float32, offset)
    x64 = x.astype(np.float64)
    h_ref, mean_ref, var_ref = np_moments(x64)
    h, mean, var, grad = moments_and_grad(x, backend)
    assert abs(h - h_ref) <= 1e-6 * abs(h_ref)
    # TF sums a column's squares row after row (an error of up to sqrt(B) eps, typically)
    np.testing.assert_allclose(var, var_ref, rtol=2e-6 if backend == "op" else 1e-5)
    # a float32 sum of B values: a few eps * max |x| (TF's reductions are not pairwise)
    assert np.all(np.abs(mean - mean_ref) <= 16 * F32_EPS * np.abs(x64).max(axis=0))
    ref = np_entropy_grad(x64)
    np.testing.assert_allclose(grad, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS, ids=lambda o: f"{o:.0e}")
def test_float64_offsets(rng, backend, offset):
    x = offset_input(rng, (300, 50), np.float64, offset)
    h_ref, mean_ref, var_ref = np_moments(x)
    h, mean, var, grad = moments_and_grad(x, backend)
    assert abs(h - h_ref) <= 1e-13 * abs(h_ref)
    np.testing.assert_allclose(var, var_ref, rtol=1e-12)
    ref = np_entropy_grad(x)
    np.testing.assert_allclose(grad, ref, rtol=0, atol=1e-9 * np.abs(ref).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"], ids=["float16", "bfloat16"])
def test_half_offsets(rng, backend, dtype):
    """Half inputs offset by 1e3 x the spread (the most float16 holds): the float32 statistics
    of the rounded input are exact to float32 precision, the entropy to its own rounding."""
    x = tf.cast(offset_input(rng, (128, 40), np.float64, 1e3) / 64.0, dtype)
    x64 = tf.cast(x, tf.float64).numpy()
    h_ref, _, var_ref = np_moments(x64)
    h, _, var, _ = moments_and_grad(x, backend)
    np.testing.assert_allclose(var, var_ref, rtol=2e-6)
    assert abs(h - h_ref) <= (2.0 ** -8 if dtype == "bfloat16" else 2.0 ** -11) * abs(h_ref)


@pytest.mark.parametrize("kernel", ["cpu", "cuda_emulation"])
@pytest.mark.parametrize("shape", [(300, 64), (3000, 40), (64, 1100)], ids=str)
def test_core_kernels_offset_1e6(rng, kernel, shape):
    """The core kernels at 1e6 x the spread: narrow and wide blocks, split batches."""
    x = offset_input(rng, shape, np.float32, 1e6)
    x64 = x.astype(np.float64)
    h_ref, mean_ref, var_ref = np_moments(x64)
    if kernel == "cpu":
        (h,), (mean,), (var,), _ = _core.forward([x])
    else:
        h, (mean,), (var,), _, _ = _core._emulate_cuda_forward([x], block_order=2, seed=1)
        h = h[0]
    assert abs(float(h) - h_ref) <= 1e-6 * abs(h_ref)
    np.testing.assert_allclose(var, var_ref, rtol=2e-6)
    # a float32 sum of B values: a few eps * max |x| (TF's reductions are not pairwise)
    assert np.all(np.abs(mean - mean_ref) <= 16 * F32_EPS * np.abs(x64).max(axis=0))


# ---- the gradient at large offsets --------------------------------------------------------------
# The true dH/dx of a unit sums to 0 over the batch (a shift leaves the variance unchanged). A
# gradient centred on a rounded mean is off by the same amount in every row: a common-mode part,
# |sum_b dx_b| / (B max_b |dx_b|), that the per-element error can hide. Both are asserted.

# Offsets (x the spread) each dtype resolves, and the allowed error relative to the unit's
# largest |dH/dx|: the dtype's rounding of dx, or 1e-5 for float32.
GRADIENT_OFFSETS = {tf.float16: [1e0, 1e2], tf.bfloat16: [1e0, 1e1],
                    tf.float32: [1e0, 1e2, 1e3, 1e4, 1e5, 1e6], tf.float64: [1e0, 1e6, 1e12]}
GRADIENT_RTOL = {tf.float16: 2.0 ** -10, tf.bfloat16: 2.0 ** -7, tf.float32: 1e-5,
                 tf.float64: 1e-12}


def assert_unit_gradients(dx, ref, rtol):
    """Per unit: max_b |dx - ref| and |sum_b dx| within rtol of max_b |ref|."""
    scale = np.abs(ref).max(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    per_unit = np.abs(dx - ref).max(axis=0) / scale
    common_mode = np.abs(dx.sum(axis=0)) / (dx.shape[0] * scale)
    assert per_unit.max() <= rtol, f"per-unit error {per_unit.max():.2e}"
    assert common_mode.max() <= rtol, f"common-mode error {common_mode.max():.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grouped", [False, True], ids=["single", "group"])
@pytest.mark.parametrize("dtype", list(GRADIENT_OFFSETS), ids=lambda d: d.name)
def test_gradient_at_offsets(rng, backend, grouped, dtype):
    """dH/dx of Lbe>BatchEntropy and of Lbe>BatchEntropies (and the pure-TF path) against float64
    at every offset the dtype resolves, per unit and in its common-mode part."""
    shapes = [(48, 96), (33, 4, 5)]
    for offset in GRADIENT_OFFSETS[dtype]:
        xs = [tf.cast(offset_input(rng, s, np.float64, offset), dtype) for s in shapes]
        x64s = [tf.cast(x, tf.float64).numpy().reshape(x.shape[0], -1) for x in xs]
        with lbe_ops.use_backend(backend), tf.GradientTape() as tape:
            tape.watch(xs)
            if grouped:
                hs = lbe_ops.batch_entropies(xs)
                loss = tf.cast(hs[0], tf.float64) + 0.5 * tf.cast(hs[1], tf.float64)
            else:
                loss = tf.cast(lbe_ops.batch_entropy(xs[0]), tf.float64)
        grads = tape.gradient(loss, xs)
        weights = [1.0, 0.5] if grouped else [1.0]
        for grad, x64, weight in zip(grads, x64s, weights):
            dx = tf.cast(grad, tf.float64).numpy().reshape(x64.shape)
            assert_unit_gradients(dx, weight * np_entropy_grad(x64), GRADIENT_RTOL[dtype])


@pytest.mark.parametrize("kernel", ["cpu", "cuda_emulation"])
@pytest.mark.parametrize("shape", [(48, 96), (3000, 40), (64, 1100)], ids=str)
def test_core_gradient_at_offsets(rng, kernel, shape):
    """The core kernels' backward given the forward's mean residuals: narrow and wide blocks,
    split batches, upstream gradients of the mean and the variance too; without the residuals,
    the rounded mean's error is back (what the residual removes)."""
    b, u = shape
    for offset in [1e2, 1e4, 1e6]:
        x = offset_input(rng, shape, np.float32, offset)
        x64 = x.astype(np.float64)
        _, mean_ref, var_ref = np_moments(x64)
        # of the entropy term's sign: the per-unit factor s has no cancellation to lose digits to
        gv = (np.abs(rng.standard_normal(u)) / var_ref).astype(np.float32)
        slope = (PI_E / (u * (b - 1) * (PI_E * var_ref + 1))
                 + 2.0 * gv.astype(np.float64) / (b - 1))
        centred = (x64 - mean_ref) * slope
        # g_mean / B of the centred part's size, so that dx's own rounding stays at its scale
        gm = (rng.standard_normal(u) * b * np.abs(centred).max(axis=0)).astype(np.float32)
        if kernel == "cpu":
            _, means, variances, residuals = _core.forward([x])
            backward = _core.backward
        else:
            _, means, variances, residuals, _ = _core._emulate_cuda_forward([x], block_order=2,
                                                                            seed=5)
            backward = lambda *a, **k: _core._emulate_cuda_backward(*a, **k)[0]  # noqa: E731
        kwargs = dict(grad_means=[gm], grad_variances=[gv])
        (dx,) = backward([x], means, variances, [1.0], mean_residuals=residuals, **kwargs)
        assert_unit_gradients(dx - gm.astype(np.float64) / b, centred, 1e-5)
        (rounded,) = backward([x], means, variances, [1.0], **kwargs)
        if offset >= 1e4:
            assert not np.allclose(rounded, dx, rtol=0, atol=1e-5 * np.abs(centred).max())


# ---- constant units ------------------------------------------------------------------------------

CONSTANTS = [3.7, 6.1e4 + 0.5, -2.5e-3, 0.0, 12345.678]  # 6.1e4: within float16's range


def with_constant_units(rng, dtype, batch=50):
    data = rng.standard_normal((batch, 2 * len(CONSTANTS))) * 3.0 + 7.0
    data[:, ::2] = CONSTANTS
    return tf.cast(tf.constant(data), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64],
                         ids=lambda d: d.name)
def test_constant_units_have_exactly_zero_variance_and_gradient(rng, backend, dtype):
    x = with_constant_units(rng, dtype)
    x64 = tf.cast(x, tf.float64).numpy()
    _, mean, var, grad = moments_and_grad(x, backend, variance_weight=0.5)
    const = slice(0, None, 2)
    assert np.all(var[const] == 0.0)
    assert np.all(grad[:, const] == 0.0)  # dH/dx and dvar/dx are both exactly 0
    np.testing.assert_array_equal(mean[const], x64[0, const])
    assert np.all(var[1::2] > 0) and np.all(grad[:, 1::2] != 0)


@pytest.mark.parametrize("kernel", ["cpu", "cuda_emulation"])
def test_core_constant_units(rng, kernel):
    x = with_constant_units(rng, tf.float32, batch=300).numpy()
    if kernel == "cpu":
        _, (mean,), (var,), residuals = _core.forward([x])
        (dx,) = _core.backward([x], [mean], [var], [1.0], mean_residuals=residuals)
    else:
        _, (mean,), (var,), residuals, _ = _core._emulate_cuda_forward([x])
        (dx,), _ = _core._emulate_cuda_backward([x], [mean], [var], [1.0],
                                                mean_residuals=residuals)
    assert np.all(var[::2] == 0.0) and np.all(dx[:, ::2] == 0.0)
    np.testing.assert_array_equal(mean[::2], x[0, ::2])


# ---- huge magnitudes ------------------------------------------------------------------------------

def scaled_reference(x64, k):
    """H, variance and dH/dx of x64 computed on x64 * 2^-k (exact), for variances beyond float64:
    H_j = 0.5 (ln(pi*e v_s + 2^-2k) + 2k ln 2), dx = pi*e (x_s - m_s) c / (U dof (pi*e v_s + c^2))."""
    c = np.ldexp(1.0, -k)
    xs = x64 * c
    b, u = xs.shape
    _, mean_s, var_s = np_moments(xs)
    h = np.mean(0.5 * (np.log(PI_E * var_s + c * c) + 2 * k * np.log(2.0)))
    grad = PI_E * (xs - mean_s) * c / (u * (b - 1) * (PI_E * var_s + c * c))
    with np.errstate(over="ignore"):  # a variance beyond float64 is +inf, as it should come back
        variance = var_s / c / c
    return h, mean_s / c, variance, grad


HUGE_F32 = [(64, 1e15), (300, 3e17), (300, 1e18), (1000, 1e18), (1000, 1e19), (64, 1e30),
            (64, 1e37)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,std", HUGE_F32, ids=lambda v: f"{v:g}")
def test_float32_huge_values(rng, backend, batch, std):
    """Finite, accurate H at any finite float32 input; the variance +Inf only where it exceeds
    float32; dx accurate down to float32's smallest normal number (smaller elements: 0)."""
    x = (rng.standard_normal((batch, 64)) * std).astype(np.float32)
    x64 = x.astype(np.float64)
    h_ref, mean_ref, var_ref = np_moments(x64)
    ref = np_entropy_grad(x64)
    h, mean, var, grad = moments_and_grad(x, backend)
    assert np.isfinite(h) and abs(h - h_ref) <= 1e-6 * abs(h_ref)
    representable = var_ref <= np.finfo(np.float32).max
    np.testing.assert_allclose(var[representable], var_ref[representable], rtol=2e-6)
    assert np.all(np.isposinf(var[~representable]))
    np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=4 * F32_EPS * np.abs(x64).max())
    assert np.all(np.isfinite(grad))
    normal = np.abs(ref) >= TINY32
    scale = np.abs(ref).max()
    np.testing.assert_allclose(grad[normal], ref[normal], rtol=0, atol=1e-5 * scale + 4 * TINY32)
    assert np.all(np.abs(grad[~normal]) <= 2 * TINY32)
    if scale >= TINY32 * 2 ** 30:  # the case the issue names: not every element may vanish
        assert np.count_nonzero(grad) > 0.9 * grad.size


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("std", [1e150, 1e200, 1e300], ids=lambda v: f"{v:g}")
def test_float64_huge_values(rng, backend, std):
    x = rng.standard_normal((200, 16)) * std
    k = int(np.frexp(np.abs(x).max())[1])
    h_ref, mean_ref, var_ref, ref = scaled_reference(x, k)
    h, mean, var, grad = moments_and_grad(x, backend)
    assert np.isfinite(h) and abs(h - h_ref) <= 1e-13 * abs(h_ref)
    np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=1e-14 * np.abs(x).max())
    representable = np.isfinite(var_ref)
    np.testing.assert_allclose(var[representable], var_ref[representable], rtol=1e-12)
    assert np.all(np.isposinf(var[~representable]))
    tiny = np.finfo(np.float64).tiny  # smaller elements are flushed to 0
    np.testing.assert_allclose(grad, ref, rtol=0, atol=1e-9 * np.abs(ref).max() + 4 * tiny)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_tf_group_with_tensors_on_the_wide_path(rng, mode):
    """Tensors that need the wide path inside a group of ordinary ones (the pure-TF path computes
    a group at once): their entries and gradients are those of the tensor alone, finite and
    accurate; the ordinary tensors' entries are those of a group without them."""
    ordinary = [(rng.standard_normal((300, 32)) * 3 + 1).astype(np.float32) for _ in range(3)]
    overflowing = (rng.standard_normal((300, 16)) * 1e19).astype(np.float32)  # sums overflow
    beyond = (rng.standard_normal((300, 8, 2)) * 1e30).astype(np.float32)  # variance > float32
    xs = [tf.constant(x) for x in (ordinary[0], overflowing, ordinary[1], beyond, ordinary[2])]
    weights = tf.constant([1.0, 2.0, 0.5, 1.5, 3.0], tf.float64)

    def entropies_and_grads(fn, vs, w):
        with tf.GradientTape() as tape:
            tape.watch(vs)
            hs = tf.cast(fn(list(vs)), tf.float64)
            total = tf.reduce_sum(hs * w)
        return hs, tape.gradient(total, vs)

    def grouped(vs):
        return lbe_ops.reference.batch_entropies(vs, same_batch=True)

    def one_at_a_time(vs):
        return tf.stack([lbe_ops.reference.batch_entropy(v) for v in vs])

    run = entropies_and_grads if mode == "eager" else tf.function(entropies_and_grads)
    hs, grads = run(grouped, xs, weights)
    hs_one, grads_one = run(one_at_a_time, xs, weights)
    hs_ordinary, _ = run(grouped, [xs[i] for i in (0, 2, 4)], tf.gather(weights, [0, 2, 4]))
    np.testing.assert_array_equal(hs.numpy(), hs_one.numpy())
    for g, g_one in zip(grads, grads_one):
        np.testing.assert_array_equal(g.numpy(), g_one.numpy())
    np.testing.assert_array_equal(hs.numpy()[[0, 2, 4]], hs_ordinary.numpy())
    for i in (1, 3):
        x64 = xs[i].numpy().astype(np.float64).reshape(300, -1)
        ref = float(weights[i]) * np_entropy_grad(x64)
        assert np.isfinite(hs[i]) and abs(float(hs[i]) - np_moments(x64)[0]) <= 1e-6 * hs[i]
        grad = grads[i].numpy().astype(np.float64).reshape(300, -1)
        assert np.all(np.isfinite(grad))
        normal = np.abs(ref) >= TINY32
        np.testing.assert_allclose(grad[normal], ref[normal], rtol=0,
                                   atol=1e-5 * np.abs(ref).max() + 4 * TINY32)


@pytest.mark.parametrize("kernel", ["cpu", "cuda_emulation"])
@pytest.mark.parametrize("std", [3e17, 1e19, 1e37], ids=lambda v: f"{v:g}")
def test_core_huge_values(rng, kernel, std):
    """The core kernels' wide paths (forward: the entropy; backward: huge or overflowed variances),
    with upstream gradients into the variance and the mean as well."""
    x = (rng.standard_normal((400, 24)) * std).astype(np.float32)
    x64 = x.astype(np.float64)
    h_ref, mean_ref, var_ref = np_moments(x64)
    if kernel == "cpu":
        (h,), (mean,), (var,), residuals = _core.forward([x])
    else:
        h, (mean,), (var,), residuals, _ = _core._emulate_cuda_forward([x])
        h = h[0]
    assert abs(float(h) - h_ref) <= 1e-6 * abs(h_ref)
    gm = rng.standard_normal(24).astype(np.float32)
    with np.errstate(over="ignore"):  # 0 where var_ref is huge
        gv = (rng.standard_normal(24) / var_ref).astype(np.float32)
    if kernel == "cpu":
        (dx,) = _core.backward([x], [mean], [var], [1.0], grad_means=[gm], grad_variances=[gv],
                               mean_residuals=residuals)
    else:
        (dx,), _ = _core._emulate_cuda_backward([x], [mean], [var], [1.0], grad_means=[gm],
                                                grad_variances=[gv], mean_residuals=residuals)
    b, u = x64.shape
    ref = ((x64 - mean_ref) * (PI_E / (u * (b - 1) * (PI_E * var_ref + 1))
                               + 2.0 * gv.astype(np.float64) / (b - 1))
           + gm.astype(np.float64) / b)
    scale = np.abs(ref).max()
    assert np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx, ref, rtol=0, atol=1e-5 * scale + 4 * TINY32)


def test_tf_path_under_xla(rng):
    """The pure-TF path's pivot under jit_compile (where the op is not used): large offsets and
    values up to where float32 sums of squares stay finite; beyond that, under XLA (no wide
    branch), the variance and the entropy are +Inf."""
    cases = [(rng.standard_normal((300, 32)) * 1e15).astype(np.float32),
             offset_input(rng, (300, 32), np.float32, 1e6)]

    @tf.function(jit_compile=True)
    def entropy_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = lbe_ops.batch_entropy(x)
        return h, tape.gradient(h, x)

    for x in cases:
        h, grad = entropy_and_grad(tf.constant(x))
        x64 = x.astype(np.float64)
        h_ref = np_moments(x64)[0]
        ref = np_entropy_grad(x64)
        assert abs(float(h) - h_ref) <= 1e-6 * abs(h_ref)
        np.testing.assert_allclose(grad.numpy(), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    h, _ = entropy_and_grad(tf.constant((rng.standard_normal((300, 32)) * 1e19).astype(np.float32)))
    assert np.isposinf(float(h))
