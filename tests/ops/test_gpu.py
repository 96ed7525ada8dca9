"""The CUDA kernels of lbe_ops._core on a GPU; skipped without one.

- the correctness checks of benchmarks/gpu_check.py (tests/support/cuda_checks.py): forward and
  backward against the float64 reference over many shapes (tall and wide included) and all four
  dtypes, NaN-poisoned outputs, two runs bit-identical, groups with an unaligned member. On a
  device they need PyTorch (the arrays the kernels see); the same checks also run on the CUDA kernels'
  host emulation, on any machine, so that the checks themselves are exercised everywhere;
- the binding's errors for host arrays and bad shapes on a device (CuPy or PyTorch).
"""

import numpy as np
import pytest
import oracle64
from cuda_checks import (ALL_DTYPES, CHECK_SHAPES, EMULATION_SHAPES, GROUP_COUNTS,
                         EmulatedDevice, TorchDevice, check_group, failure_summary, group_shapes,
                         single_cases)

from lbe_ops import _core


def _torch_device_reason():
    """None if TorchDevice can run here, else why not."""
    if not _core.has_cuda():
        return "_core was built without CUDA"
    if _core.cuda_device_count() == 0:
        return "no CUDA device"
    try:
        import torch
    except ImportError:
        return "the device checks need PyTorch"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    return None


TORCH_REASON = _torch_device_reason()
_DEVICES = {}


def _device(kind):
    if kind not in _DEVICES:
        _DEVICES[kind] = EmulatedDevice(_core) if kind == "emulation" else TorchDevice(_core)
    return _DEVICES[kind]


def _params(kind, cases):
    marks = [pytest.mark.skipif(TORCH_REASON is not None, reason=TORCH_REASON or "")] \
        if kind == "cuda" else []
    return [pytest.param(kind, *case, marks=marks, id=f"{kind}-{'-'.join(map(str, case))}")
            for case in cases]


SINGLE = (_params("emulation", single_cases(EMULATION_SHAPES, ALL_DTYPES))
          + _params("cuda", single_cases(CHECK_SHAPES, ALL_DTYPES)))
GROUPS = (_params("emulation", [(d, n) for d in ALL_DTYPES for n in GROUP_COUNTS])
          + _params("cuda", [(d, n) for d in ALL_DTYPES for n in GROUP_COUNTS]))


def _assert_ok(records):
    bad = [failure_summary(r) for r in records if not r["ok"]]
    assert not bad, bad


@pytest.mark.parametrize("kind,shape,dtype,ddof,offset", SINGLE)
def test_kernels_match_the_float64_reference(rng, kind, shape, dtype, ddof, offset):
    _assert_ok(check_group(_device(kind), rng, [shape], dtype, ddof, offset))


@pytest.mark.parametrize("kind,dtype,count", GROUPS)
def test_groups_with_an_unaligned_member(rng, kind, dtype, count):
    _assert_ok(check_group(_device(kind), rng, group_shapes(rng, count), dtype, 1, 0.0,
                           unaligned_index=1, label=f"group of {count}"))


# ---- the binding on a device, with CuPy or PyTorch arrays ------------------------------------------------------------------------------

def _device_library():
    if not _core.has_cuda() or _core.cuda_device_count() == 0:
        return None
    try:
        import cupy
        return "cupy", cupy
    except ImportError:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            return "torch", torch
    except ImportError:
        pass
    return None


DEVICE = _device_library()
needs_device = pytest.mark.skipif(DEVICE is None, reason="needs _core with CUDA, a CUDA device, and CuPy or PyTorch")


def _to_device(a):
    kind, lib = DEVICE
    if kind == "cupy":
        return lib.asarray(a)
    return lib.from_numpy(np.ascontiguousarray(a)).cuda()


def _empty_device(shape, dtype, fill=np.nan):
    return _to_device(np.full(shape, fill, dtype))


def _to_host(a):
    kind, _ = DEVICE
    return a.get() if kind == "cupy" else a.cpu().numpy()


def _sync():
    kind, lib = DEVICE
    (lib.cuda.runtime.deviceSynchronize() if kind == "cupy" else lib.cuda.synchronize())


@needs_device
@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)],
                         ids=["float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(2, 1), (4097, 33), (5, 100003), (65536, 64), (129, 1000)], ids=str)
def test_cuda_kernels_on_device(rng, dtype, shape):
    """The binding's defaults (the default stream, the dtype read from the arrays)."""
    offset = 1e4 if dtype != np.float16 else 0.0
    x = (rng.standard_normal(shape) * 2.0 + offset * 2.0).astype(dtype)
    stats = np.float64 if dtype == np.float64 else np.float32
    units = int(np.prod(shape[1:]))
    dx_dev, mean_dev, var_dev = _to_device(x), _empty_device(units, stats), _empty_device(units, stats)
    res_dev = _empty_device(units, stats)
    ent_dev = _empty_device(1, dtype)
    _core.cuda_forward([dx_dev], [mean_dev], [var_dev], ent_dev, mean_residuals=[res_dev])
    _sync()
    mean, var, ent = _to_host(mean_dev), _to_host(var_dev), _to_host(ent_dev)
    assert mean.dtype == stats and var.dtype == stats and ent.dtype == dtype
    ok, finite, err, tol = oracle64.forward_errors(x, 1, ent[0], mean, var, dtype, offset)
    assert ok, (finite, err, tol)
    out = _empty_device(shape, dtype)
    g = _to_device(np.array([0.75], dtype))
    _core.cuda_backward([dx_dev], [mean_dev], [var_dev], g, [out], mean_residuals=[res_dev])
    _sync()
    want = oracle64.backward(x, 1, 0.75, var=var)  # at the exact mean
    ok, finite, err, tol = oracle64.backward_errors(_to_host(out), want, dtype)
    assert ok, (finite, err, tol)


@needs_device
def test_cuda_rejects_host_arrays_and_bad_shapes():
    with pytest.raises(TypeError, match="__cuda_array_interface__"):
        _core.cuda_forward([np.zeros((4, 3), np.float32)], [None], [None], None)
    x = _to_device(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"means\[0\] has 2 elements"):
        _core.cuda_forward([x], [_empty_device(2, np.float32)], [_empty_device(3, np.float32)],
                           _empty_device(1, np.float32))
