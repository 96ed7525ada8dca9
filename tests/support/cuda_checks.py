"""Correctness checks of the CUDA kernels of lbe_ops._core against the float64 reference
(oracle64): shared by tests/ops/test_gpu.py (pytest, on a GPU) and benchmarks/gpu_check.py (a
GPU machine without TensorFlow). Needs numpy, and PyTorch for the device (ml_dtypes for the host
emulation); never TensorFlow.

A check runs one grouped forward and backward twice: outputs are filled with NaN first, so an
element the kernels never wrote fails it, and the two runs must give the same bits. Devices:

    TorchDevice     torch CUDA tensors, seen by the kernels through __cuda_array_interface__
    EmulatedDevice  numpy arrays, the CUDA kernels' code run by the host emulation
                    (_core._emulate_cuda_*): the same checks on a machine without a GPU
"""

import json
import traceback

import numpy as np

import oracle64

ALL_DTYPES = ["float32", "bfloat16", "float16", "float64"]
# Tall [65536, 64] and wide [32, 1000000] included; the last two are the largest timed shapes.
CHECK_SHAPES = [(2, 1), (3, 7), (128, 1000), (4097, 33), (5, 100003), (300, 64), (1000, 257),
                (64, 1024), (8192, 4), (3001, 3), (65536, 64), (32, 1000000), (4096, 4096),
                (8192, 8192)]
# Small shapes: for compute-sanitizer, under which every launch is much slower.
SMOKE_SHAPES = [(3, 7), (300, 64), (5, 1003), (4097, 33), (32, 5000)]
# The host emulation checks every access and is slow: tiny shapes.
EMULATION_SHAPES = [(2, 1), (3, 7), (128, 100), (300, 64), (65, 33), (5, 1003)]
# Groups: descriptors inline (3 tensors), and as a table in the workspace (30).
GROUP_COUNTS = (3, 30)


def single_cases(shapes, dtypes):
    """(shape, dtype, ddof, offset) of each single-tensor check: ddof alternates over the shapes,
    and every other float32/float64 shape is offset by 1e4 scales (a large mean)."""
    for dtype in dtypes:
        for j, shape in enumerate(shapes):
            offset = 1e4 if dtype in ("float32", "float64") and j % 2 == 0 and shape[0] > 2 else 0.0
            ddof = j % 2 if shape[0] > 2 else 1 - (j % 2)
            if shape[0] <= ddof:
                ddof = 0
            yield shape, dtype, ddof, offset


def group_shapes(rng, count):
    """Random shapes of a group of `count` tensors, the first a tall [4096, 64]."""
    shapes = [(int(rng.integers(2, 600)), int(rng.integers(1, 300))) for _ in range(count)]
    shapes[0] = (4096, 64)
    return shapes


def failure_summary(record):
    """The fields of a check's record that say why it failed."""
    return {k: record.get(k) for k in ("case", "shape", "dtype", "ddof", "error", "forward_err",
                                       "backward_err", "all_written", "deterministic")}


# ---- devices -----------------------------------------------------------------------------------

class TorchDevice:
    """Device arrays are torch CUDA tensors; the kernels see them through __cuda_array_interface__
    dicts built once per array (torch's own property is slow, and has no bfloat16)."""

    name = "cuda"

    def __init__(self, core):
        import torch
        self.torch = torch
        self.core = core
        if not torch.cuda.is_available():
            raise RuntimeError("PyTorch sees no CUDA device")
        self.dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(0)
        self.l2_bytes = int(getattr(props, "L2_cache_size", 50 << 20))
        self.info = {
            "device": torch.cuda.get_device_name(0),
            "multiprocessors": props.multi_processor_count,
            "l2_bytes": self.l2_bytes,
            "memory_bytes": props.total_memory,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
        }

    def tdtype(self, dtype):
        return getattr(self.torch, dtype)

    def from_numpy(self, x64, dtype):
        return self.torch.from_numpy(np.ascontiguousarray(x64)).to(self.dev).to(self.tdtype(dtype))

    def full(self, shape, dtype, value=float("nan")):
        return self.torch.full(tuple(shape), value, dtype=self.tdtype(dtype), device=self.dev)

    def unaligned(self, shape, dtype):
        n = int(np.prod(shape))
        return self.torch.empty(n + 1, dtype=self.tdtype(dtype), device=self.dev)[1:].view(*shape)

    def to_f64(self, t):
        return t.detach().double().cpu().numpy()

    def cai(self, t):
        typestr = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "bfloat16": "<u2", "uint8": "|u1"}[
            str(t.dtype).replace("torch.", "")]
        return {"shape": tuple(t.shape), "typestr": typestr, "data": (t.data_ptr(), False), "version": 3,
                "strides": None}

    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream

    def sync(self):
        self.torch.cuda.synchronize()

    def forward(self, xs, means, variances, entropies, ddof, dtype, residuals=None, workspace=None):
        self.core.cuda_forward([self.cai(x) for x in xs], [self.cai(m) for m in means],
                               [self.cai(v) for v in variances], self.cai(entropies), ddof=ddof,
                               stream=self.stream(), workspace=workspace, dtype=dtype,
                               mean_residuals=self._optional(residuals))

    def backward(self, xs, means, variances, g, dxs, gm, gv, ddof, dtype, residuals=None,
                 workspace=None):
        opt = self._optional
        self.core.cuda_backward([self.cai(x) for x in xs], [self.cai(m) for m in means],
                                [self.cai(v) for v in variances], self.cai(g), [self.cai(d) for d in dxs],
                                grad_means=opt(gm), grad_variances=opt(gv), ddof=ddof, stream=self.stream(),
                                workspace=workspace, dtype=dtype, mean_residuals=opt(residuals))

    def _optional(self, seq):
        return None if seq is None else [None if a is None else self.cai(a) for a in seq]

    def bits_equal(self, a, b):
        u8 = self.torch.uint8
        return bool(self.torch.equal(a.contiguous().view(u8), b.contiguous().view(u8)))

    def clone(self, t):
        return t.clone()


class EmulatedDevice:
    """--dry-run: numpy arrays, the CUDA kernels' code run by the host emulation."""

    name = "emulation"

    def __init__(self, core):
        import ml_dtypes
        self.core = core
        self.np_dtypes = {"float16": np.float16, "float32": np.float32, "float64": np.float64,
                          "bfloat16": ml_dtypes.bfloat16}
        self.l2_bytes = 1 << 20
        self.info = {"device": "host emulation (dry run)"}

    def from_numpy(self, x64, dtype):
        return np.ascontiguousarray(x64).astype(self.np_dtypes[dtype])

    def full(self, shape, dtype, value=float("nan")):
        return np.full(shape, value, self.np_dtypes[dtype])

    def unaligned(self, shape, dtype):
        n = int(np.prod(shape))
        return np.empty(n + 1, self.np_dtypes[dtype])[1:].reshape(shape)

    def to_f64(self, t):
        return np.asarray(t, np.float64)

    def forward(self, xs, means, variances, entropies, ddof, dtype, residuals=None, workspace=None):
        e, ms, vs, rs, _ = self.core._emulate_cuda_forward(list(xs), ddof=ddof, block_order=2, seed=11)
        entropies[...] = e
        for outs, values in [(means, ms), (variances, vs), (residuals or [], rs)]:
            for dst, src in zip(outs, values):
                dst[...] = src.reshape(dst.shape)

    def backward(self, xs, means, variances, g, dxs, gm, gv, ddof, dtype, residuals=None,
                 workspace=None):
        out, _ = self.core._emulate_cuda_backward(list(xs), list(means), list(variances), g, grad_means=gm,
                                                  grad_variances=gv, ddof=ddof, block_order=1,
                                                  mean_residuals=residuals)
        for dst, src in zip(dxs, out):
            dst[...] = src

    def bits_equal(self, a, b):
        return a.tobytes() == b.tobytes()

    def clone(self, t):
        return t.copy()

    def sync(self):
        pass


# ---- checks -------------------------------------------------------------------------------

def make_host_input(rng, shape, offset):
    x = rng.standard_normal(shape) * 2.0
    if offset:
        x += offset * 2.0 * (1 + 0.5 * rng.standard_normal(shape[1:]))
    return x


def check_group(dev, rng, shapes, dtype, ddof, offset, unaligned_index=None, label=None):
    """One grouped forward + backward, run twice; returns a record per tensor. The backward gets
    the forward's mean residuals and is held to the gradient at the exact mean."""
    stats = "float64" if dtype == "float64" else "float32"
    xs, x64s = [], []
    for i, shape in enumerate(shapes):
        host = make_host_input(rng, shape, offset)
        x = dev.from_numpy(host, dtype)
        if i == unaligned_index:
            u = dev.unaligned(shape, dtype)
            u[...] = x
            x = u
        xs.append(x)
        x64s.append(dev.to_f64(x).reshape(shape[0], -1))  # the values the kernel sees, exactly
    units = [int(np.prod(s[1:])) for s in shapes]
    n = len(shapes)
    runs = []
    for _ in range(2):
        means = [dev.full((u,), stats) for u in units]
        variances = [dev.full((u,), stats) for u in units]
        residuals = [dev.full((u,), stats) for u in units]
        entropies = dev.full((n,), dtype)
        dev.forward(xs, means, variances, entropies, ddof, dtype, residuals=residuals)
        g = dev.from_numpy(rng.standard_normal(n) if not runs else runs[0]["g64"], dtype)
        g64 = dev.to_f64(g)
        gm64 = runs[0]["gm64"] if runs else [None if i % 3 == 2 else rng.standard_normal(u) for i, u in enumerate(units)]
        gv64 = runs[0]["gv64"] if runs else [None if i % 2 == 1 else rng.standard_normal(u) for i, u in enumerate(units)]
        gm = [None if a is None else dev.from_numpy(a, stats) for a in gm64]
        gv = [None if a is None else dev.from_numpy(a, stats) for a in gv64]
        dxs = [dev.full(s, dtype) for s in shapes]
        dev.backward(xs, means, variances, g, dxs, gm, gv, ddof, dtype, residuals=residuals)
        dev.sync()
        runs.append({"means": means, "variances": variances, "residuals": residuals,
                     "entropies": entropies, "dxs": dxs,
                     "g64": g64, "gm64": [None if a is None else dev.to_f64(b) for a, b in zip(gm64, gm)],
                     "gv64": [None if a is None else dev.to_f64(b) for a, b in zip(gv64, gv)]})
    first, second = runs
    deterministic = all(dev.bits_equal(a, b) for key in ("means", "variances", "residuals", "dxs")
                        for a, b in zip(first[key], second[key]))
    deterministic = deterministic and dev.bits_equal(first["entropies"], second["entropies"])
    entropies = dev.to_f64(first["entropies"])
    records = []
    for i, shape in enumerate(shapes):
        mean, var = dev.to_f64(first["means"][i]), dev.to_f64(first["variances"][i])
        ok_f, finite_f, err_f, tol_f = oracle64.forward_errors(x64s[i], ddof, entropies[i], mean, var,
                                                                  dtype, offset)
        want = oracle64.backward(x64s[i], ddof, float(first["g64"][i]), g_mean=first["gm64"][i],
                                    g_var=first["gv64"][i], var=var)  # at the exact mean
        dx = dev.to_f64(first["dxs"][i]).reshape(want.shape)
        ok_b, finite_b, err_b, tol_b = oracle64.backward_errors(dx, want, dtype)
        records.append({
            "case": label or "single", "shape": list(shape), "dtype": dtype, "ddof": ddof, "offset": offset,
            "unaligned": i == unaligned_index, "forward_ok": ok_f, "backward_ok": ok_b,
            "all_written": finite_f and finite_b, "deterministic": deterministic,
            "forward_err": err_f, "forward_tol": tol_f, "backward_err": err_b, "backward_tol": tol_b,
            "ok": ok_f and ok_b and deterministic,
        })
    return records


def run_checks(dev, rng, shapes, dtypes, log, group_dtypes=None):
    """Every single-tensor check of single_cases(shapes, dtypes), then the groups (in
    group_dtypes, default dtypes), each with an unaligned member; logs a line per check and
    returns the records (a failure or an exception is recorded, never raised)."""
    records = []
    for shape, dtype, ddof, offset in single_cases(shapes, dtypes):
        try:
            records += check_group(dev, rng, [shape], dtype, ddof, offset)
        except Exception as exc:  # keep going: report every case
            records.append({"case": "single", "shape": list(shape), "dtype": dtype, "ok": False,
                            "error": f"{type(exc).__name__}: {exc}"})
            log(traceback.format_exc())
        r = records[-1]
        log(f"check {str(tuple(shape)):>16} {dtype:>8} ddof={ddof} offset={offset:g}: "
            + ("ok" if r["ok"] else "FAILED " + json.dumps({k: r.get(k) for k in
               ("error", "forward_err", "backward_err", "all_written", "deterministic")})))
    # Groups: descriptors inline (3 tensors), as a table in the workspace (30), one unaligned member.
    for dtype in (dtypes if group_dtypes is None else group_dtypes):
        for count in GROUP_COUNTS:
            shapes_g = group_shapes(rng, count)
            label = f"group of {count}"
            try:
                recs = check_group(dev, rng, shapes_g, dtype, 1, 0.0, unaligned_index=1, label=label)
            except Exception as exc:
                recs = [{"case": label, "dtype": dtype, "ok": False, "error": f"{type(exc).__name__}: {exc}"}]
                log(traceback.format_exc())
            records += recs
            bad = [r for r in recs if not r["ok"]]
            log(f"check {label:>16} {dtype:>8}: " + ("ok" if not bad else f"FAILED {len(bad)} tensors: {bad[:2]}"))
    return records
