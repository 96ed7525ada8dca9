#!/usr/bin/env python3
"""Checks and times the CUDA kernels of lbe_ops._core on a GPU; no TensorFlow needed.

    bash benchmarks/gpu_check.sh                 # builds _core for the GPU, then runs this
    python3 benchmarks/gpu_check.py --core-dir build/gpu/out [--quick] [--json out.json]
    python3 benchmarks/gpu_check.py --core-dir build/gpu/out --smoke   # small checks only
    python3 benchmarks/gpu_check.py --dry-run    # no GPU: the same checks on the kernels' host
                                                 # emulation, tiny shapes, no timings

1. Correctness: CUDA forward and backward against a float64 reference over many shapes (tall
   [65536, 64] and wide [32, 1000000] included) and all four dtypes; outputs are filled with NaN
   first, so an element the kernels never wrote fails the check; every case runs twice and must
   give the same bits; groups of tensors (inline descriptors, a descriptor table, an unaligned
   member) too.
2. Timing (CUDA events, warm-up, median of repetitions, inputs rotated through more than 3x the L2
   so no timing is an L2 hit): forward+backward against (a) PyTorch's composition of the paper's
   formula (torch.std -> log -> mean, and its backward through autograd) and (b) a device-to-device
   copy of the same tensor. Bandwidth counts 3 x the tensor (forward reads x, backward reads x and
   writes dx); the copy counts 2 x (read + write).
3. A small sweep of the work-cutting knobs (_core._set_cuda_tuning) on the shapes that stress them.

The table is printed last; everything goes to --json as well. Exit status 1 if any check failed.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

PI_E = np.pi * np.e
ALL_DTYPES = ["float32", "bfloat16", "float16", "float64"]

CHECK_SHAPES = [(2, 1), (3, 7), (128, 1000), (4097, 33), (5, 100003), (300, 64), (1000, 257), (64, 1024),
                (8192, 4), (3001, 3), (65536, 64), (32, 1000000), (4096, 4096), (8192, 8192)]
TIME_SHAPES = [(128, 1000), (256, 4096), (1024, 1024), (2048, 2048), (4096, 4096), (8192, 8192),
               (65536, 64), (32, 1000000)]
SPEEDUP_RANGE = [(128, 1000), (256, 4096), (1024, 1024), (2048, 2048), (4096, 4096)]  # the >= 3x target
SWEEP_SHAPES = [(8192, 8192), (4096, 4096), (1024, 1024), (65536, 64), (32, 1000000), (128, 1000)]
SWEEP_VARIANTS = [
    {},
    {"forward_target_items": 512, "backward_target_items": 1024},
    {"forward_target_items": 2048, "backward_target_items": 4096},
    {"forward_min_chunks": 4, "backward_min_chunks": 4},
    {"forward_min_chunks": 1, "backward_min_chunks": 1},
    {"forward_max_splits": 64},
    {"row_segment_bytes": 1024},
]

DRY_CHECK_SHAPES = [(2, 1), (3, 7), (128, 100), (300, 64), (65, 33), (5, 1003)]


# ---- float64 reference and error model (as tests/test_core_module.py) --------------------------

def ref_forward(x64, ddof):
    mean = x64.mean(axis=0)
    var = ((x64 - mean) ** 2).sum(axis=0) / (x64.shape[0] - ddof)
    return 0.5 * np.log1p(PI_E * var).mean(), mean, var


def ref_backward(x64, ddof, g, mean, var, g_mean=None, g_var=None):
    b, u = x64.shape
    mean = np.asarray(mean, np.float64)
    var = np.asarray(var, np.float64)
    scale = g * PI_E / (u * (b - ddof) * (PI_E * var + 1))
    if g_var is not None:
        scale = scale + 2.0 * g_var / (b - ddof)
    dx = (x64 - mean) * scale
    if g_mean is not None:
        dx = dx + g_mean / b
    return dx


def output_eps(dtype):
    return {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24, "float64": 2.0 ** -53}[dtype]


def acc_eps(dtype):
    return 2.0 ** -53 if dtype == "float64" else 2.0 ** -24


def forward_errors(x64, ddof, entropy, mean, var, dtype, offset):
    h, m, v = ref_forward(x64, ddof)
    finite = bool(np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.isfinite(entropy))
    eps, k = acc_eps(dtype), 2.0 * offset
    err = {
        "mean": float(np.max(np.abs(mean - m)) / np.max(np.abs(x64))),
        "variance": float(np.max(np.abs(var - v)) / (np.max(v) + 1e-300)),
        "entropy": float(abs(entropy - h) / (abs(h) + 1e-300)),
    }
    tol = {"mean": 64 * eps, "variance": eps * (256 + 8 * k),
           "entropy": eps * (256 + 8 * k) + 2 * output_eps(dtype)}
    ok = finite and all(err[key] < tol[key] for key in err)
    return ok, finite, err, tol


def backward_errors(dx, want, dtype):
    finite = bool(np.all(np.isfinite(dx)))
    scale = float(np.max(np.abs(want))) + 1e-300
    floor = 2.0 ** -24 if dtype == "float16" else 0.0
    err = float(np.max(np.abs(dx - want)))
    tol = scale * (4 * output_eps(dtype) + 64 * acc_eps(dtype)) + floor
    return finite and err < tol, finite, err / scale, tol / scale


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

    def forward(self, xs, means, variances, entropies, ddof, dtype, workspace=None):
        self.core.cuda_forward([self.cai(x) for x in xs], [self.cai(m) for m in means],
                               [self.cai(v) for v in variances], self.cai(entropies), ddof=ddof,
                               stream=self.stream(), workspace=workspace, dtype=dtype)

    def backward(self, xs, means, variances, g, dxs, gm, gv, ddof, dtype, workspace=None):
        opt = lambda seq: None if seq is None else [None if a is None else self.cai(a) for a in seq]
        self.core.cuda_backward([self.cai(x) for x in xs], [self.cai(m) for m in means],
                                [self.cai(v) for v in variances], self.cai(g), [self.cai(d) for d in dxs],
                                grad_means=opt(gm), grad_variances=opt(gv), ddof=ddof, stream=self.stream(),
                                workspace=workspace, dtype=dtype)

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

    def forward(self, xs, means, variances, entropies, ddof, dtype, workspace=None):
        e, ms, vs, _ = self.core._emulate_cuda_forward(list(xs), ddof=ddof, block_order=2, seed=11)
        entropies[...] = e
        for dst, src in zip(means, ms):
            dst[...] = src.reshape(dst.shape)
        for dst, src in zip(variances, vs):
            dst[...] = src.reshape(dst.shape)

    def backward(self, xs, means, variances, g, dxs, gm, gv, ddof, dtype, workspace=None):
        out, _ = self.core._emulate_cuda_backward(list(xs), list(means), list(variances), g, grad_means=gm,
                                                  grad_variances=gv, ddof=ddof, block_order=1)
        for dst, src in zip(dxs, out):
            dst[...] = src

    def bits_equal(self, a, b):
        return a.tobytes() == b.tobytes()

    def clone(self, t):
        return t.copy()

    def sync(self):
        pass


# ---- correctness -------------------------------------------------------------------------------

def make_host_input(rng, shape, offset):
    x = rng.standard_normal(shape) * 2.0
    if offset:
        x += offset * 2.0 * (1 + 0.5 * rng.standard_normal(shape[1:]))
    return x


def check_group(dev, rng, shapes, dtype, ddof, offset, unaligned_index=None, label=None):
    """One grouped forward + backward, run twice; returns a record per tensor."""
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
        entropies = dev.full((n,), dtype)
        dev.forward(xs, means, variances, entropies, ddof, dtype)
        g = dev.from_numpy(rng.standard_normal(n) if not runs else runs[0]["g64"], dtype)
        g64 = dev.to_f64(g)
        gm64 = runs[0]["gm64"] if runs else [None if i % 3 == 2 else rng.standard_normal(u) for i, u in enumerate(units)]
        gv64 = runs[0]["gv64"] if runs else [None if i % 2 == 1 else rng.standard_normal(u) for i, u in enumerate(units)]
        gm = [None if a is None else dev.from_numpy(a, stats) for a in gm64]
        gv = [None if a is None else dev.from_numpy(a, stats) for a in gv64]
        dxs = [dev.full(s, dtype) for s in shapes]
        dev.backward(xs, means, variances, g, dxs, gm, gv, ddof, dtype)
        dev.sync()
        runs.append({"means": means, "variances": variances, "entropies": entropies, "dxs": dxs,
                     "g64": g64, "gm64": [None if a is None else dev.to_f64(b) for a, b in zip(gm64, gm)],
                     "gv64": [None if a is None else dev.to_f64(b) for a, b in zip(gv64, gv)]})
    first, second = runs
    deterministic = all(dev.bits_equal(a, b) for key in ("means", "variances", "dxs")
                        for a, b in zip(first[key], second[key]))
    deterministic = deterministic and dev.bits_equal(first["entropies"], second["entropies"])
    entropies = dev.to_f64(first["entropies"])
    records = []
    for i, shape in enumerate(shapes):
        mean, var = dev.to_f64(first["means"][i]), dev.to_f64(first["variances"][i])
        ok_f, finite_f, err_f, tol_f = forward_errors(x64s[i], ddof, entropies[i], mean, var, dtype, offset)
        want = ref_backward(x64s[i], ddof, float(first["g64"][i]), mean, var, first["gm64"][i], first["gv64"][i])
        dx = dev.to_f64(first["dxs"][i]).reshape(want.shape)
        ok_b, finite_b, err_b, tol_b = backward_errors(dx, want, dtype)
        records.append({
            "case": label or "single", "shape": list(shape), "dtype": dtype, "ddof": ddof, "offset": offset,
            "unaligned": i == unaligned_index, "forward_ok": ok_f, "backward_ok": ok_b,
            "all_written": finite_f and finite_b, "deterministic": deterministic,
            "forward_err": err_f, "forward_tol": tol_f, "backward_err": err_b, "backward_tol": tol_b,
            "ok": ok_f and ok_b and deterministic,
        })
    return records


def run_checks(dev, rng, shapes, dtypes, log, group_dtypes=None):
    records = []
    for dtype in dtypes:
        for j, shape in enumerate(shapes):
            offset = 1e4 if dtype in ("float32", "float64") and j % 2 == 0 and shape[0] > 2 else 0.0
            ddof = j % 2 if shape[0] > 2 else 1 - (j % 2)
            if shape[0] <= ddof:
                ddof = 0
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
        for count in (3, 30):
            shapes_g = [(int(rng.integers(2, 600)), int(rng.integers(1, 300))) for _ in range(count)]
            shapes_g[0] = (4096, 64)
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


# ---- timing ------------------------------------------------------------------------------------

class Timer:
    def __init__(self, torch):
        self.torch = torch

    def run(self, fn, n_sets, min_ms=25.0, reps=15, warmup=3):
        torch = self.torch
        for i in range(warmup):
            fn(i % n_sets)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(0)
        end.record()
        end.synchronize()
        one = max(start.elapsed_time(end), 1e-3)
        iters = int(min(2000, max(1, math.ceil(min_ms / one))))
        times, k = [], 0
        for _ in range(reps):
            start.record()
            for _ in range(iters):
                fn(k % n_sets)
                k += 1
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / iters)  # microseconds
        times.sort()
        return {"median_us": statistics.median(times), "p10_us": times[len(times) // 10],
                "p90_us": times[(9 * len(times)) // 10], "iters": iters, "reps": reps, "sets": n_sets}


def torch_composition(torch):
    """The paper's formula as its official PyTorch code writes it (unbiased torch.std)."""
    def batch_entropy(x):
        x = torch.flatten(x, start_dim=1)
        x_std = torch.std(x, dim=0)
        entropies = 0.5 * torch.log(np.pi * np.e * x_std ** 2 + 1)
        return torch.mean(entropies)
    return batch_entropy


def time_shape(dev, core, shape, dtype, timer, include_torch=True, min_ms=25.0, reps=15):
    torch = dev.torch
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dev.tdtype(dtype)).element_size()
    n_sets = int(min(512, max(2, math.ceil(3 * dev.l2_bytes / nbytes))))
    stats = "float64" if dtype == "float64" else "float32"
    units = int(np.prod(shape[1:]))
    gen = torch.Generator(device=dev.dev).manual_seed(1)
    xs = [(torch.randn(shape, device=dev.dev, generator=gen) * 2 + 3).to(dev.tdtype(dtype)) for _ in range(n_sets)]
    dxs = [torch.empty_like(x) for x in xs]
    means = [torch.empty(units, dtype=dev.tdtype(stats), device=dev.dev) for _ in range(n_sets)]
    variances = [torch.empty(units, dtype=dev.tdtype(stats), device=dev.dev) for _ in range(n_sets)]
    ents = [torch.empty(1, dtype=dev.tdtype(dtype), device=dev.dev) for _ in range(n_sets)]
    g = torch.ones(1, dtype=dev.tdtype(dtype), device=dev.dev)
    c = lambda t: dev.cai(t)
    cx, cdx = [c(t) for t in xs], [c(t) for t in dxs]
    cm, cv, ce, cg = [c(t) for t in means], [c(t) for t in variances], [c(t) for t in ents], c(g)
    fwd_bytes = core.cuda_forward_workspace_bytes([cx[0]], [cm[0]], [cv[0]], ce[0], dtype=dtype)
    bwd_bytes = core.cuda_backward_workspace_bytes([cx[0]], [cm[0]], [cv[0]], cg, [cdx[0]], dtype=dtype)
    ws_f_t = torch.empty(max(fwd_bytes, 16), dtype=torch.uint8, device=dev.dev)
    ws_b_t = torch.empty(max(bwd_bytes, 16), dtype=torch.uint8, device=dev.dev)
    ws_f, ws_b = c(ws_f_t), c(ws_b_t)
    stream = dev.stream()

    def fwd(i):
        core.cuda_forward([cx[i]], [cm[i]], [cv[i]], ce[i], stream=stream, workspace=ws_f, dtype=dtype)

    def bwd(i):
        core.cuda_backward([cx[i]], [cm[i]], [cv[i]], cg, [cdx[i]], stream=stream, workspace=ws_b, dtype=dtype)

    def ours(i):
        fwd(i)
        bwd(i)

    def copy(i):
        dxs[i].copy_(xs[i])

    run = lambda fn, sets: timer.run(fn, sets, min_ms=min_ms, reps=reps)
    result = {"shape": list(shape), "dtype": dtype, "bytes": nbytes,
              "ours": run(ours, n_sets), "forward": run(fwd, n_sets),
              "backward": run(bwd, n_sets), "copy": run(copy, n_sets)}
    if include_torch:
        lbe = torch_composition(torch)
        leaves = [x.detach().requires_grad_(True) for x in xs]  # same rotation beyond L2

        def composition(i):
            h = lbe(leaves[i])
            torch.autograd.grad(h, leaves[i])

        try:
            result["torch"] = run(composition, len(leaves))
        except Exception as exc:  # e.g. out of memory for the largest shapes
            result["torch_error"] = f"{type(exc).__name__}: {exc}"
    t = result["ours"]["median_us"] * 1e-6
    result["gbps"] = 3 * nbytes / t / 1e9
    result["copy_gbps"] = 2 * nbytes / (result["copy"]["median_us"] * 1e-6) / 1e9
    result["pct_copy"] = 100.0 * result["gbps"] / result["copy_gbps"]
    if "torch" in result:
        result["speedup"] = result["torch"]["median_us"] / result["ours"]["median_us"]
    del xs, dxs, means, variances, ents
    torch.cuda.empty_cache()
    return result


def peak_copy(dev, timer):
    torch = dev.torch
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev.dev).random_(0, 255)
    b = torch.empty_like(a)
    r = timer.run(lambda i: b.copy_(a), 1, min_ms=50)
    del a, b
    torch.cuda.empty_cache()
    return {"bytes": n, "gbps": 2 * n / (r["median_us"] * 1e-6) / 1e9, **r}


# ---- report ------------------------------------------------------------------------------------

def fmt_shape(shape):
    return "[" + ", ".join(str(s) for s in shape) + "]"


def format_table(timings):
    head = (f"{'shape':>16} {'dtype':>8} {'fwd+bwd us':>11} {'fwd us':>9} {'bwd us':>9} {'GB/s':>8} "
            f"{'copy GB/s':>10} {'% copy':>7} {'torch us':>10} {'speed-up':>9}")
    lines = [head, "-" * len(head)]
    for r in timings:
        if "error" in r:
            lines.append(f"{fmt_shape(r['shape']):>16} {r['dtype']:>8}  ERROR {r['error']}")
            continue
        torch_us = f"{r['torch']['median_us']:10.1f}" if "torch" in r else f"{'n/a':>10}"
        speed = f"{r['speedup']:8.2f}x" if "speedup" in r else f"{'n/a':>9}"
        lines.append(f"{fmt_shape(r['shape']):>16} {r['dtype']:>8} {r['ours']['median_us']:11.1f} "
                     f"{r['forward']['median_us']:9.1f} {r['backward']['median_us']:9.1f} {r['gbps']:8.0f} "
                     f"{r['copy_gbps']:10.0f} {r['pct_copy']:6.1f}% {torch_us} {speed}")
    return "\n".join(lines)


def target_lines(timings):
    lines = []
    big = [r for r in timings if r.get("shape") == [8192, 8192] and r.get("dtype") == "float32" and "pct_copy" in r]
    if big:
        p = big[0]["pct_copy"]
        lines.append(f"target: [8192, 8192] float32 fwd+bwd at >= 80% of copy bandwidth: {p:.1f}% "
                     + ("PASS" if p >= 80 else "MISS"))
    rng = [r for r in timings if tuple(r.get("shape", ())) in SPEEDUP_RANGE and "speedup" in r]
    if rng:
        worst = min(rng, key=lambda r: r["speedup"])
        lines.append(f"target: >= 3x PyTorch from [128, 1000] to [4096, 4096] (all dtypes timed): worst "
                     f"{worst['speedup']:.2f}x at {fmt_shape(worst['shape'])} {worst['dtype']} "
                     + ("PASS" if worst["speedup"] >= 3 else "MISS"))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--core-dir", help="directory holding the built _core module (default: lbe_ops)")
    parser.add_argument("--json", help="write all results here (default: $OUT/gpu_check.json if OUT is set)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and dtypes")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: checks on the host emulation, no timing")
    parser.add_argument("--smoke", action="store_true",
                        help="small shapes, checks only (for running under compute-sanitizer)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tuning sweep")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--deadline-seconds", type=float, default=None,
                        help="time this run may take: timings and the sweep are cut short to fit")
    args = parser.parse_args(argv)

    if args.core_dir:
        sys.path.insert(0, os.path.abspath(args.core_dir))
        import _core as core
    else:
        from lbe_ops import _core as core
    started = time.time()
    deadline = started + args.deadline_seconds if args.deadline_seconds else float("inf")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "seed": seed,
              "host": platform.node(), "python": platform.python_version(), "numpy": np.__version__,
              "core_file": getattr(core, "__file__", None), "has_cuda": core.has_cuda(),
              "tuning": core._cuda_tuning()}
    if args.dry_run:
        dev = EmulatedDevice(core)
        shapes, dtypes = DRY_CHECK_SHAPES, ALL_DTYPES
    else:
        if not core.has_cuda():
            sys.exit("this _core was built without CUDA (LBE_OPS_CUDA=1 and nvcc are needed)")
        if core.cuda_device_count() == 0:
            sys.exit("no CUDA device visible to _core")
        dev = TorchDevice(core)
        shapes = CHECK_SHAPES if not args.quick else [s for s in CHECK_SHAPES if np.prod(s) <= 1 << 22]
        dtypes = ALL_DTYPES if not args.quick else ["float32", "bfloat16"]
        if args.smoke:  # under compute-sanitizer every launch is much slower
            shapes = [(3, 7), (300, 64), (5, 1003), (4097, 33), (32, 5000)]
            dtypes = ["float32", "float16", "float64"]
    report.update(dev.info)
    log(f"lbe_ops._core CUDA check on {dev.info['device']} ({report['date']}, seed {seed})")

    t0 = time.time()
    checks = run_checks(dev, rng, shapes, dtypes, log, group_dtypes=["float32"] if args.smoke else None)
    report["checks"] = checks
    failed = [r for r in checks if not r["ok"]]
    log(f"checks: {len(checks) - len(failed)} of {len(checks)} passed in {time.time() - t0:.0f}s")

    timings, sweep = [], []
    if not args.dry_run and not args.smoke:
        timer = Timer(dev.torch)
        try:
            report["peak_copy"] = peak_copy(dev, timer)
            log(f"device-to-device copy, 1 GiB: {report['peak_copy']['gbps']:.0f} GB/s (read + write)")
        except Exception as exc:
            log(f"peak copy failed: {exc}")
        time_dtypes = ALL_DTYPES if not args.quick else ["float32"]
        for shape in TIME_SHAPES:
            for dtype in time_dtypes:
                if dtype == "float64" and shape not in [(1024, 1024), (8192, 8192)]:
                    continue  # float64: two sizes are enough
                if time.time() > deadline - 20:
                    log(f"time {fmt_shape(shape)} {dtype}: skipped (deadline)")
                    timings.append({"shape": list(shape), "dtype": dtype, "error": "skipped: deadline"})
                    continue
                try:
                    r = time_shape(dev, core, shape, dtype, timer)
                except Exception as exc:
                    r = {"shape": list(shape), "dtype": dtype, "error": f"{type(exc).__name__}: {exc}"}
                    log(traceback.format_exc())
                timings.append(r)
                if "error" not in r:
                    log(f"time {fmt_shape(shape):>16} {dtype:>8}: {r['ours']['median_us']:.1f} us "
                        f"({r['pct_copy']:.0f}% of copy)" + (f", {r['speedup']:.1f}x torch" if "speedup" in r else ""))
        report["timings"] = timings
        if not args.no_sweep and not args.quick:
            default = core._cuda_tuning()
            for variant in SWEEP_VARIANTS:
                core._set_cuda_tuning(**{**default, **variant})
                for shape in SWEEP_SHAPES:
                    if time.time() > deadline - 5:
                        sweep.append({"variant": variant, "shape": list(shape), "error": "skipped: deadline"})
                        continue
                    try:
                        r = time_shape(dev, core, shape, "float32", timer, include_torch=False, min_ms=10.0, reps=7)
                        sweep.append({"variant": variant, "shape": list(shape), "us": r["ours"]["median_us"],
                                      "fwd_us": r["forward"]["median_us"], "bwd_us": r["backward"]["median_us"],
                                      "pct_copy": r["pct_copy"]})
                    except Exception as exc:
                        sweep.append({"variant": variant, "shape": list(shape), "error": str(exc)})
            core._set_cuda_tuning(**default)
            report["sweep"] = sweep

    out_path = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        with open(os.path.splitext(out_path)[0] + ".log", "w") as f:
            f.write("\n".join(log_lines) + "\n")

    # ---- the summary, last (also saved, for gpu_check.sh to print again at its very end) ------
    out = []
    if sweep:
        out.append("tuning sweep (float32, fwd+bwd us; first row = defaults):")
        for variant in SWEEP_VARIANTS:
            cells = []
            for shape in SWEEP_SHAPES:
                hit = [r for r in sweep if r["variant"] == variant and tuple(r["shape"]) == shape]
                cells.append(f"{fmt_shape(shape)} {hit[0]['us']:.1f}" if hit and "us" in hit[0] else f"{fmt_shape(shape)} err")
            out.append(f"  {json.dumps(variant) if variant else 'defaults'}")
            out.append("      " + " | ".join(cells))
        out.append("")
    out.append(f"device: {dev.info['device']}   date: {report['date']}   seed: {seed}")
    out.append(f"command: {report['command']}")
    if "peak_copy" in report:
        out.append(f"copy bandwidth (1 GiB, read + write): {report['peak_copy']['gbps']:.0f} GB/s")
    out.append(f"correctness: {len(checks) - len(failed)}/{len(checks)} cases passed "
               f"(float64 reference, NaN-poisoned outputs, two runs bit-identical)")
    for r in failed[:10]:
        out.append("  FAILED: " + json.dumps({k: r.get(k) for k in ("case", "shape", "dtype", "ddof", "error",
                                                                     "forward_err", "backward_err",
                                                                     "all_written", "deterministic")}))
    if timings:
        out.append("")
        out.append(format_table(timings))
        out += target_lines(timings)
    if out_path:
        out.append(f"results: {out_path}")
        with open(os.path.splitext(out_path)[0] + ".summary.txt", "w") as f:
            f.write("\n".join(out) + "\n")
    print()
    print("\n".join(out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
