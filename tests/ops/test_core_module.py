"""lbe_ops._core: the framework-free kernels through the pybind11 module.

- CPU forward/backward against a float64 numpy reference (shapes, dtypes, ddof, large offsets,
  finite differences, bad input);
- the CUDA kernels' own code run on the CPU by the host emulation (_emulate_cuda_*), which checks
  every memory access and barrier: the GPU code's indexing, tiling, batch splits and merges are
  tested on machines without a GPU;
- the CUDA functions on a real device: tests/ops/test_gpu.py.
"""

import numpy as np
import pytest
import oracle64
from oracle64 import PI_E

from lbe_ops import _core

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes comes with TensorFlow
    BF16 = None

DTYPES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)] + ([BF16] if BF16 is not None else [])
DTYPE_IDS = [d.name for d in DTYPES]


# ---- float64 reference (tests/support/oracle64.py) and its error model ------------------------

def ref_forward(x, ddof):
    return oracle64.moments(x, ddof)


def ref_backward(x, ddof, g_entropy, g_mean=None, g_var=None, mean=None, var=None):
    """dx in float64; with mean and var, evaluated at those statistics (the backward's inputs).
    mean="exact": the exact mean (what a backward given the forward's mean residuals centres on)."""
    if isinstance(mean, str) and mean == "exact":
        mean = None
    return oracle64.backward(x, ddof, g_entropy, g_mean=g_mean, g_var=g_var, mean=mean, var=var)


def make_input(rng, shape, dtype, offset=0.0, scale=2.0):
    """Normal data; with offset, per-unit means of about offset x std."""
    x = rng.standard_normal(shape) * scale
    if offset:
        x = x + offset * scale * (1 + 0.5 * rng.standard_normal(shape[1:]))
    return x.astype(dtype)


def check_forward(x, ddof, entropy, mean, var, offset=0.0):
    """Shapes and dtypes of a forward result, and its values within oracle64's error model."""
    dtype = x.dtype
    assert mean.shape == x.shape[1:] and var.shape == x.shape[1:]
    stats = np.float64 if dtype == np.float64 else np.float32
    assert mean.dtype == stats and var.dtype == stats and entropy.dtype == dtype
    ok, finite, err, tol = oracle64.forward_errors(x, ddof, entropy, mean, var, dtype, offset)
    assert finite, "non-finite output (unwritten element?)"
    assert ok, f"errors {err} over tolerances {tol}"


def check_backward(x, dx, want):
    """want: ref_backward at the statistics the kernel was given."""
    assert dx.shape == x.shape and dx.dtype == x.dtype
    ok, finite, err, tol = oracle64.backward_errors(dx, want, x.dtype)
    assert finite, "non-finite gradient (unwritten element?)"
    assert ok, f"relative error {err:.3g} over the tolerance {tol:.3g}"


# ---- CPU -----------------------------------------------------------------------------------------

SHAPES = [(2, 1), (3, 5), (4097, 33), (5, 100003), (64, 4, 4), (300, 64), (129, 1000),
          (200, 3000)]  # the last: three unit blocks, each in two row segments of several chunks


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ddof", [0, 1])
def test_cpu_forward_backward_match_reference(rng, dtype, shape, ddof):
    offset = 1e4 if dtype in (np.float32, np.float64) and shape[0] > 2 else 0.0
    x = make_input(rng, shape, dtype, offset)
    (entropy,), (mean,), (var,), residuals = _core.forward([x], ddof=ddof)
    check_forward(x, ddof, entropy, mean, var, offset)
    g = rng.standard_normal()
    (dx,) = _core.backward([x], [mean], [var], np.array([g]), ddof=ddof, mean_residuals=residuals)
    check_backward(x, dx, ref_backward(x, ddof, float(np.asarray(g, dtype)), mean="exact", var=var))


def test_cpu_grouped_with_optional_gradients(rng):
    xs = [make_input(rng, s, np.float32) for s in [(7, 3), (16, 2, 5), (9, 1)]]
    entropies, means, variances, residuals = _core.forward(xs)
    assert entropies.shape == (3,)
    for x, e, m, v in zip(xs, entropies, means, variances):
        check_forward(x, 1, np.asarray(e).reshape(()), m, v)
    g = rng.standard_normal(3)
    gm = [rng.standard_normal(means[0].shape).astype(np.float32), None, rng.standard_normal(1)]
    gv = None if rng.integers(2) else [None, rng.standard_normal(means[1].shape), None]
    given = [residuals[0], None, residuals[2]]  # tensor 1 without: centred on its rounded mean
    dxs = _core.backward(xs, means, variances, g, grad_means=gm, grad_variances=gv,
                         mean_residuals=given)
    for i, (x, dx) in enumerate(zip(xs, dxs)):
        want = ref_backward(x, 1, float(np.float32(g[i])), gm[i], None if gv is None else gv[i],
                            mean=means[i] if given[i] is None else "exact", var=variances[i])
        check_backward(x, dx, want)


# Narrow blocks (at most 8 vectors of units) take register-tile loops: every vector count from 0
# to 9 with and without a scalar tail, past the narrow limit, and batches around the 32-row chunk
# (one chunk, a partial last chunk, several chunks, several row segments).
NARROW_WIDTHS = [1, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40, 47, 56, 63, 64, 65, 72, 73]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch", [2, 31, 32, 33, 129, 4500])
def test_cpu_narrow_blocks_match_reference(rng, dtype, batch):
    offset = 1e3 if dtype in (np.float32, np.float64) else 0.0
    xs = [make_input(rng, (batch, u), dtype, offset) for u in NARROW_WIDTHS]
    entropies, means, variances, residuals = _core.forward(xs)
    for x, e, m, v in zip(xs, entropies, means, variances):
        check_forward(x, 1, np.asarray(e).reshape(()), m, v, offset)
    g = rng.standard_normal(len(xs))
    gm = [rng.standard_normal(x.shape[1:]) for x in xs]
    gv = [rng.standard_normal(x.shape[1:]) for x in xs]
    dxs = _core.backward(xs, means, variances, g, grad_means=gm, grad_variances=gv,
                         mean_residuals=residuals)
    for i, (x, dx) in enumerate(zip(xs, dxs)):
        stats = np.float64 if dtype == np.float64 else np.float32
        want = ref_backward(x, 1, float(np.asarray(g[i], dtype)), gm[i].astype(stats),
                            gv[i].astype(stats), mean="exact", var=variances[i])
        check_backward(x, dx, want)



@pytest.mark.parametrize("units", [1, 8, 13])
def test_cpu_entropy_epilogue_is_accurate_over_the_variance_range(rng, units):
    """0.5 * log1p(pi e v) per unit, from the kernel's own float32 variance (so that only the
    epilogue's error is seen), for variances from 1e-14 (log1p(z) ~ z) to 1e12, and 0."""
    spreads = np.concatenate([[0.0], 10.0 ** np.linspace(-7, 6, 200)])
    xs = []
    for s in spreads:
        x = rng.standard_normal((6, units)) * s
        xs.append(x.astype(np.float32))
    entropies, _, variances, _ = _core.forward(xs)
    for e, v in zip(entropies, variances):
        want = float(np.mean(0.5 * np.log1p(PI_E * np.asarray(v, np.float64))))
        # a few float ulps of each unit's term, and the rounding of the mean to float32
        assert abs(float(e) - want) <= 8 * 2.0 ** -24 * want + 1e-45, (float(e), want, v)

@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 2), (3, 1)])
def test_cpu_gradient_matches_finite_differences(rng, shape, ddof):
    x = rng.standard_normal(shape)
    units = int(np.prod(shape[1:]))
    g_h, g_m, g_v = rng.standard_normal(), rng.standard_normal(units), rng.standard_normal(units)

    def loss(z):
        h, m, v = ref_forward(z, ddof)
        return g_h * h + g_m @ m + g_v @ v

    _, (mean,), (var,), residuals = _core.forward([x], ddof=ddof)
    (dx,) = _core.backward([x], [mean], [var], [g_h], grad_means=[g_m], grad_variances=[g_v], ddof=ddof,
                           mean_residuals=residuals)
    numeric = np.zeros_like(x)
    step = 1e-6
    for idx in np.ndindex(*shape):
        up, down = x.copy(), x.copy()
        up[idx] += step
        down[idx] -= step
        numeric[idx] = (loss(up) - loss(down)) / (2 * step)
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-8)


def test_cpu_constant_units_have_finite_gradient():
    x = np.ones((8, 4), np.float32)
    x[:, 1] = np.arange(8)
    (e,), (m,), (v,), _ = _core.forward([x])
    assert v[0] == 0 and np.isfinite(e)
    (dx,) = _core.backward([x], [m], [v], [1.0])
    assert np.all(np.isfinite(dx)) and np.all(dx[:, 0] == 0)


def test_cpu_accepts_non_contiguous_inputs(rng):
    x = make_input(rng, (40, 30), np.float64)[:, ::2]
    (e,), (m,), (v,), _ = _core.forward([x])
    check_forward(np.ascontiguousarray(x), 1, e, m, v)


@pytest.mark.parametrize("call, error, match", [
    (lambda: _core.forward(np.zeros((4, 3), np.float32)), TypeError, "xs must be a list"),
    (lambda: _core.forward([]), ValueError, "must not be empty"),
    (lambda: _core.forward([np.zeros(5, np.float32)]), ValueError, r"xs\[0\] must have rank >= 2"),
    (lambda: _core.forward([np.zeros((1, 3), np.float32)]), ValueError, r"xs\[0\] has a batch of 1"),
    (lambda: _core.forward([np.zeros((2, 3), np.float32)], ddof=2), ValueError, "batch of 2"),
    (lambda: _core.forward([np.zeros((4, 0), np.float32)]), ValueError, "zero units"),
    (lambda: _core.forward([np.zeros((4, 3), np.int32)]), TypeError, r"xs\[0\] has dtype int32"),
    (lambda: _core.forward([np.zeros((4, 3), np.float32), np.zeros((4, 3))]), TypeError, r"xs\[1\] has dtype float64"),
    (lambda: _core.forward([np.zeros((4, 3), np.float32)], ddof=-1), ValueError, "ddof must be non-negative"),
    (lambda: _core.forward(["abc"]), TypeError, r"xs\[0\]"),
    (lambda: _core.backward([np.ones((4, 3))], [np.zeros(3)], [np.zeros(2)], [1.0]), ValueError,
     r"variances\[0\] has 2 elements; expected 3"),
    (lambda: _core.backward([np.ones((4, 3))], [np.zeros(3)], [np.zeros(3)], [1.0, 2.0]), ValueError,
     "grad_entropies has 2 elements; expected 1"),
    (lambda: _core.backward([np.ones((4, 3))], [np.zeros(3)], [np.zeros(3)], [1.0], grad_means=[None, None]),
     ValueError, "grad_means must have 1 entries"),
    (lambda: _core.backward([np.ones((4, 3))], [np.zeros(3)], [np.zeros(3)], [1.0], grad_variances=[np.zeros(4)]),
     ValueError, r"grad_variances\[0\] has 4 elements"),
    (lambda: _core.backward([np.ones((4, 3))], [np.zeros(3)], [np.zeros(3)], [1.0], mean_residuals=[np.zeros(2)]),
     ValueError, r"mean_residuals\[0\]"),
    (lambda: _core.backward([np.ones((4, 3))], [np.zeros(3)], [np.zeros(3)], ["x"]), TypeError, "grad_entropies"),
    (lambda: _core.backward([np.ones((4, 3))], np.zeros(3), [np.zeros(3)], [1.0]), TypeError, "means must be a list"),
])
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---- the CUDA kernels' code, emulated on the CPU ---------------------------------------------------

# Shapes that exercise each path of the kernels: single tiles, many tiles (the tensor's entropy
# merged by the last tile), split batches (partial moments merged by the last split), short
# batches (widened tiles), odd unit counts (scalar path, partial last tile).
EMU_SHAPES = [(2, 1), (3, 7), (300, 64), (2000, 128), (4097, 33), (1000, 257), (64, 1024),
              (5, 100003), (32, 20000), (8192, 4), (3001, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=str)
def test_emulated_cuda_kernels_match_reference(rng, dtype, shape):
    ddof = int(rng.integers(2))
    offset = 1e4 if dtype in (np.float32, np.float64) and shape[0] > 2 else 0.0
    x = make_input(rng, shape, dtype, offset)
    entropy, (mean,), (var,), residuals, info = _core._emulate_cuda_forward(
        [x], ddof=ddof, block_order=2, seed=int(rng.integers(1 << 30)))
    check_forward(x, ddof, entropy[0], mean, var, offset)
    assert info["kernel_launches"] == 1
    g, gm, gv = rng.standard_normal(), rng.standard_normal(mean.size), rng.standard_normal(mean.size)
    (dx,), _ = _core._emulate_cuda_backward([x], [mean], [var], [g], grad_means=[gm], grad_variances=[gv],
                                            ddof=ddof, block_order=2, seed=1, mean_residuals=residuals)
    check_backward(x, dx, ref_backward(x, ddof, float(np.asarray(g, dtype)), gm, gv, mean="exact", var=var))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_emulated_cuda_unaligned_inputs_take_the_scalar_path(rng, dtype):
    shape = (97, 48)
    size = int(np.prod(shape))
    x = np.empty(size + 1, dtype)[1:].reshape(shape)  # one element off the allocation's alignment
    x[...] = make_input(rng, shape, dtype)
    assert x.ctypes.data % 16 != 0
    e, (m,), (v,), _, _ = _core._emulate_cuda_forward([x])
    check_forward(x, 1, e[0], m, v)
    (dx,), _ = _core._emulate_cuda_backward([x], [m], [v], [0.5])
    check_backward(x, dx, ref_backward(x, 1, 0.5, mean=m, var=v))
    plan = _core._cuda_plan([shape], dtype.name, aligned=False)
    assert plan["forward"][0]["units_per_thread"] == 1


@pytest.mark.parametrize("count", [3, 30])  # 30 > the 24 descriptors passed as kernel parameters
def test_emulated_cuda_groups(rng, count):
    shapes = [(int(rng.integers(2, 300)), *rng.integers(1, 40, size=int(rng.integers(1, 3)))) for _ in range(count)]
    xs = [make_input(rng, s, np.float32, offset=100.0) for s in shapes]
    entropies, means, variances, residuals, info = _core._emulate_cuda_forward(xs, block_order=1)
    cpu = _core.forward(xs)
    for x, e, m, v in zip(xs, entropies, means, variances):
        check_forward(x, 1, np.asarray(e).reshape(()), m, v, offset=100.0)
    np.testing.assert_allclose(entropies, cpu[0], rtol=1e-4)
    for x, m, r, m_cpu, r_cpu in zip(xs, means, residuals, cpu[1], cpu[3]):
        # the two-term means agree to float32 precision of the spread (the rounded parts may not)
        two_term = np.float64(m) + r
        np.testing.assert_allclose(two_term, np.float64(m_cpu) + r_cpu, rtol=0,
                                   atol=1e-5 * np.std(x, axis=0).max() + 1e-30)
        np.testing.assert_allclose(two_term.ravel(), ref_forward(x, 1)[1], rtol=0,
                                   atol=1e-5 * np.std(x, axis=0).max() + 1e-30)
    g = rng.standard_normal(count)
    dxs, _ = _core._emulate_cuda_backward(xs, means, variances, g, block_order=2, seed=5,
                                          mean_residuals=residuals)
    for i, (x, dx) in enumerate(zip(xs, dxs)):
        check_backward(x, dx, ref_backward(x, 1, float(np.float32(g[i])), mean="exact", var=variances[i]))
    if count > 24:
        assert info["workspace_bytes"] > 0  # the descriptor table lives in the workspace


def test_emulated_cuda_results_do_not_depend_on_block_order(rng):
    # Split batches and many tiles: the last block to finish merges, whichever it is.
    xs = [make_input(rng, (3000, 40), np.float32, offset=1e3), make_input(rng, (16, 3000), np.float32)]
    runs = [_core._emulate_cuda_forward(xs, block_order=order, seed=seed) for order, seed in [(0, 0), (1, 0), (2, 7)]]
    for other in runs[1:]:
        for a, b in zip(runs[0][:4], other[:4]):
            for u, w in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                assert np.array_equal(u, w)


def test_emulated_cuda_tall_input_full_size(rng):
    """[65536, 64]: one tile, the batch split into many items merged in a second stage."""
    shape = (65536, 64)
    plan = _core._cuda_plan([shape], "float32")
    assert plan["forward"][0]["splits"] > 64
    x = make_input(rng, shape, np.float32, offset=1e4)
    e, (m,), (v,), _, info = _core._emulate_cuda_forward([x], block_order=2, seed=3)
    assert info["num_items"] == plan["forward_items"]
    check_forward(x, 1, e[0], m, v, offset=1e4)


@pytest.mark.parametrize("variant", [
    {"forward_target_items": 512, "backward_target_items": 1024},
    {"forward_target_items": 4096, "backward_target_items": 8192, "forward_min_chunks": 1, "backward_min_chunks": 1},
    {"forward_min_chunks": 4, "backward_min_chunks": 4},
    {"forward_max_splits": 3},
    {"row_segment_bytes": 1024},
    {"row_segment_bytes": 4096},  # tiles wider than a block's threads: never split
    {"row_segment_bytes": 16},
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_emulated_cuda_kernels_under_tuning_variants(rng, variant):
    before = _core._cuda_tuning()
    try:
        _core._set_cuda_tuning(**variant)
        for shape, dtype in [((3000, 40), np.float32), ((600, 130), np.float16), ((40, 3000), np.float64),
                             ((2500, 7), np.float32)]:
            x = make_input(rng, shape, dtype, offset=100.0 if dtype != np.float16 else 0.0)
            e, (m,), (v,), residuals, _ = _core._emulate_cuda_forward([x], block_order=2, seed=2)
            check_forward(x, 1, e[0], m, v, offset=100.0 if dtype != np.float16 else 0.0)
            (dx,), _ = _core._emulate_cuda_backward([x], [m], [v], [0.3], block_order=1,
                                                    mean_residuals=residuals)
            check_backward(x, dx, ref_backward(x, 1, float(np.asarray(0.3, dtype)), mean="exact", var=v))
    finally:
        _core._set_cuda_tuning(**before)


def test_cuda_plan_tall_and_wide():
    tall = _core._cuda_plan([(65536, 64)], "float32")
    wide = _core._cuda_plan([(32, 1000000)], "float32")
    assert tall["forward_items"] >= 128 and tall["backward_items"] >= 128
    assert wide["forward_items"] >= 1000 and wide["backward_items"] >= 1000
    big = _core._cuda_plan([(8192, 8192)], "float32")["forward"][0]
    assert big["units_per_thread"] == 4 and big["splits"] > 1
    huge = _core._cuda_plan([(3, 2 ** 31 + 8)], "float16")  # 64-bit sizes
    assert huge["forward"][0]["tiles"] * huge["forward"][0]["tile_units"] >= 2 ** 31 + 8


def test_cuda_tuning_knobs_round_trip():
    before = _core._cuda_tuning()
    try:
        after = _core._set_cuda_tuning(forward_target_items=64)
        assert after["forward_target_items"] == 64
        with pytest.raises(ValueError):
            _core._set_cuda_tuning(forward_min_chunks=0)
        with pytest.raises(TypeError):
            _core._set_cuda_tuning(no_such_knob=1)
    finally:
        _core._set_cuda_tuning(**before)
    assert _core._cuda_tuning() == _core._default_cuda_tuning


# ---- the CUDA binding without a device: parsing and validation of __cuda_array_interface__ ---------

needs_cuda_build = pytest.mark.skipif(not _core.has_cuda(), reason="_core built without CUDA")


def fake(shape, typestr, address, readonly=False, strides=None):
    """An interface dict with a made-up device address (workspace queries never dereference it)."""
    return {"shape": tuple(shape), "typestr": typestr, "data": (address, readonly), "version": 3, "strides": strides}


def fake_forward_args(shape=(16, 10), typestr="<f4", stats="<f4"):
    units = int(np.prod(shape[1:]))
    return ([fake(shape, typestr, 1 << 40)], [fake((units,), stats, 2 << 40)], [fake((units,), stats, 3 << 40)],
            fake((1,), typestr, 4 << 40))


@needs_cuda_build
def test_cuda_binding_reads_interface_dicts_and_objects():
    xs, means, variances, entropies = fake_forward_args()

    class DeviceArray:
        def __init__(self, d):
            self.__cuda_array_interface__ = d

    assert _core.cuda_forward_workspace_bytes(xs, means, variances, entropies) >= 0
    assert _core.cuda_forward_workspace_bytes([DeviceArray(xs[0])], [DeviceArray(means[0])],
                                              [DeviceArray(variances[0])], DeviceArray(entropies)) >= 0
    # bfloat16: 2-byte elements named by dtype=
    xs16, m16, v16, e16 = fake_forward_args(typestr="<u2")
    assert _core.cuda_forward_workspace_bytes(xs16, m16, v16, e16, dtype="bfloat16") >= 0
    group = [fake((8, 3), "<f4", (i + 1) << 36) for i in range(30)]
    stats = [fake((3,), "<f4", (i + 64) << 36) for i in range(30)]
    assert _core.cuda_forward_workspace_bytes(group, stats, stats, fake((30,), "<f4", 1 << 44)) > 0  # table
    dxs = [fake((8, 3), "<f4", (i + 128) << 36) for i in range(30)]
    assert _core.cuda_backward_workspace_bytes(group, stats, stats, fake((30,), "<f4", 1 << 44), dxs) > 0


@needs_cuda_build
@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.__setitem__(0, [np.zeros((16, 10), np.float32)]), TypeError, r"xs\[0\] must be a device array"),
    (lambda a: a[0][0].__setitem__("strides", (4, 64)), ValueError, "C-contiguous"),
    (lambda a: a[0][0].__setitem__("typestr", ">f4"), TypeError, "little-endian"),
    (lambda a: a[0][0].__setitem__("typestr", "<i4"), TypeError, "expected float16, float32 or float64"),
    (lambda a: a[0][0].__setitem__("typestr", "<u2"), TypeError, "bfloat16"),
    (lambda a: a[0][0].__setitem__("shape", (1, 10)), ValueError, r"xs\[0\] has a batch of 1"),
    (lambda a: a[0][0].__setitem__("shape", (16,)), ValueError, "rank >= 2"),
    (lambda a: a[0][0].__setitem__("data", (0, False)), ValueError, "null data pointer"),
    (lambda a: a[0][0].pop("data"), TypeError, "lacks shape, typestr or data"),
    (lambda a: a[1][0].__setitem__("typestr", "<f8"), TypeError, r"means\[0\] must hold float32"),
    (lambda a: a[2][0].__setitem__("shape", (9,)), ValueError, r"variances\[0\] has 9 elements; expected 10"),
    (lambda a: a[2][0].__setitem__("data", (3 << 40, True)), ValueError, r"variances\[0\] is read-only"),
    (lambda a: a[3].__setitem__("shape", (2,)), ValueError, "entropies has 2 elements; expected 1"),
    (lambda a: a[1].append(a[1][0]), ValueError, "means must have 1 entries"),
])
def test_cuda_binding_rejects_bad_device_arrays(change, error, match):
    args = [list(a) if isinstance(a, list) else a for a in fake_forward_args()]
    args = [[dict(d) for d in a] if isinstance(a, list) else dict(a) for a in args]
    change(args)
    with pytest.raises(error, match=match):
        _core.cuda_forward_workspace_bytes(*args)


@needs_cuda_build
def test_cuda_binding_errors_name_the_interface_failure():
    class RequiresGrad:
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")

    xs, means, variances, entropies = fake_forward_args()
    with pytest.raises(TypeError, match="requires grad"):
        _core.cuda_forward_workspace_bytes([RequiresGrad()], means, variances, entropies)
    with pytest.raises(ValueError, match="dtype must be"):
        _core.cuda_forward_workspace_bytes(xs, means, variances, entropies, dtype="int8")


@needs_cuda_build
@pytest.mark.skipif(_core.has_cuda() and _core.cuda_device_count() > 0, reason="a device is present")
def test_cuda_launch_without_a_device_raises():
    xs, means, variances, entropies = fake_forward_args()
    with pytest.raises(RuntimeError, match="cuda_forward"):
        _core.cuda_forward(xs, means, variances, entropies)
    with pytest.raises(RuntimeError, match="cuda_backward"):
        _core.cuda_backward(xs, means, variances, entropies, [fake((16, 10), "<f4", 9 << 40)])
