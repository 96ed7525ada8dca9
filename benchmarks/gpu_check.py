#!/usr/bin/env python3
"""Checks and times the CUDA kernels of lbe_ops._core on a GPU; no TensorFlow needed.

    bash benchmarks/gpu_check.sh                 # builds _core for the GPU, then runs this
    python3 benchmarks/gpu_check.py --core-dir build/gpu/out [--quick] [--json out.json]
    python3 benchmarks/gpu_check.py --core-dir build/gpu/out --smoke   # small checks only
    python3 benchmarks/gpu_check.py --dry-run    # no GPU: the same checks on the kernels' host
                                                 # emulation, tiny shapes, no timings

1. Correctness (tests/support/cuda_checks.py, also run by pytest as tests/ops/test_gpu.py): CUDA
   forward and backward against the float64 reference (tests/support/oracle64.py) over many
   shapes (tall [65536, 64] and wide [32, 1000000] included) and all four dtypes; outputs are
   filled with NaN first, so an element the kernels never wrote fails the check; every case runs
   twice and must give the same bits; groups of tensors (inline descriptors, a descriptor table,
   an unaligned member) too.
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

# The correctness checks and the float64 reference live with the tests; both need numpy only.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests",
                                "support"))
from cuda_checks import (ALL_DTYPES, CHECK_SHAPES, EMULATION_SHAPES, SMOKE_SHAPES,  # noqa: E402
                         EmulatedDevice, TorchDevice, failure_summary, run_checks)

TIME_SHAPES = [(128, 1000), (256, 4096), (1024, 1024), (2048, 2048), (4096, 4096), (8192, 8192),
               (65536, 64), (32, 1000000)]
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
    residuals = [torch.empty(units, dtype=dev.tdtype(stats), device=dev.dev) for _ in range(n_sets)]
    ents = [torch.empty(1, dtype=dev.tdtype(dtype), device=dev.dev) for _ in range(n_sets)]
    g = torch.ones(1, dtype=dev.tdtype(dtype), device=dev.dev)
    c = lambda t: dev.cai(t)
    cx, cdx = [c(t) for t in xs], [c(t) for t in dxs]
    cm, cv, ce, cg = [c(t) for t in means], [c(t) for t in variances], [c(t) for t in ents], c(g)
    cr = [c(t) for t in residuals]
    fwd_bytes = core.cuda_forward_workspace_bytes([cx[0]], [cm[0]], [cv[0]], ce[0], dtype=dtype)
    bwd_bytes = core.cuda_backward_workspace_bytes([cx[0]], [cm[0]], [cv[0]], cg, [cdx[0]], dtype=dtype)
    ws_f_t = torch.empty(max(fwd_bytes, 16), dtype=torch.uint8, device=dev.dev)
    ws_b_t = torch.empty(max(bwd_bytes, 16), dtype=torch.uint8, device=dev.dev)
    ws_f, ws_b = c(ws_f_t), c(ws_b_t)
    stream = dev.stream()

    def fwd(i):
        core.cuda_forward([cx[i]], [cm[i]], [cv[i]], ce[i], stream=stream, workspace=ws_f, dtype=dtype,
                          mean_residuals=[cr[i]])

    def bwd(i):
        core.cuda_backward([cx[i]], [cm[i]], [cv[i]], cg, [cdx[i]], stream=stream, workspace=ws_b, dtype=dtype,
                           mean_residuals=[cr[i]])

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
        shapes, dtypes = EMULATION_SHAPES, ALL_DTYPES
    else:
        if not core.has_cuda():
            sys.exit("this _core was built without CUDA (LBE_OPS_CUDA=1 and nvcc are needed)")
        if core.cuda_device_count() == 0:
            sys.exit("no CUDA device visible to _core")
        dev = TorchDevice(core)
        shapes = CHECK_SHAPES if not args.quick else [s for s in CHECK_SHAPES if np.prod(s) <= 1 << 22]
        dtypes = ALL_DTYPES if not args.quick else ["float32", "bfloat16"]
        if args.smoke:  # under compute-sanitizer every launch is much slower
            shapes = SMOKE_SHAPES
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
        out.append("  FAILED: " + json.dumps(failure_summary(r)))
    if timings:
        out.append("")
        out.append(format_table(timings))
    if out_path:
        out.append(f"results: {out_path}")
        with open(os.path.splitext(out_path)[0] + ".summary.txt", "w") as f:
            f.write("\n".join(out) + "\n")
    print()
    print("\n".join(out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
