"""lbe-bench: times the batch-entropy op against pure TensorFlow, on this machine.

The command line is parsed in lbe_ops_cli (lbe_ops_cli.bench_main, before TensorFlow is
imported); run() does the work. Also `python -m lbe_ops.bench`.

    lbe-bench                       # a representative set of cases, the training step, fit()
    lbe-bench --quick               # tiny shapes, a few repetitions: a smoke run
    lbe-bench --full                # every shape in every dtype
    lbe-bench --cases large,group-500 --dtypes float32 --fit none --out results/
    lbe-bench --fit-only --fit mlp-100x64 --fit-time 60    # only the fit() table

Three parts, all in one invocation so that their figures come from the same machine state:

  * kernel cases (lbe_ops.bench.cases): the op against pure TensorFlow in graph mode ("tf") and
    under XLA ("xla"), and against the memory floor: the bytes the work must move (forward: read
    x once; forward+backward: read x twice, write dx once) at the machine's copy bandwidth,
    measured as np.copyto of the same number of bytes timed in the same interleaved rounds as
    the variants, so that it sees the same load. The "harness" (the tf.function call, the split
    of grouped inputs and the sums of their gradients) is timed alone, so the tf/op ratio is
    given with it (raw) and without it (net); XLA compiles the harness into its own program, so
    xla/op is raw only.
  * the training step (lbe_ops.bench.train_step): one SGD step of a deep ReLU network without
    LBE, with LBE through the op and in pure TensorFlow, and two variants that split the
    overhead into its parts.
  * the fit() table (lbe_ops.bench.fit): the steady-state time per step of keras Model.fit()
    without LBE, with lbe_ops.keras.wrap() through the op and in pure TensorFlow, and both under
    XLA. Most of its time is the first fit() of each variant (tracing, and compiling under XLA).
    On a GPU it times plain and wrap() with jit_compile=False (the op's CUDA kernels) and under
    XLA (what compile()'s default jit_compile="auto" gives there), and says which is faster.

Timing (lbe_ops.bench.timing): median per-call time over interleaved rounds, each round in a new
seeded order. Outputs (in --out, default ./lbe-bench-results): results.json (every number, the
machine, the load, the command), results.md (the tables) and results.png (speed-ups and the floor
ratio). Timings are not assertions: nothing here fails on a slow machine.
"""

import datetime
import json
import os

import tensorflow as tf

import lbe_ops
from lbe_ops import _loader
from lbe_ops._machine import load_average
from lbe_ops.bench import fit as fit_bench
from lbe_ops.bench.cases import (FULL_SET, QUICK_SET, STANDARD_SET, all_cases, build_function,
                                 make_input)
from lbe_ops.bench.machine import machine_info
from lbe_ops.bench.report import fmt_ms, fmt_ratio, format_table, table_rows, write_chart
from lbe_ops.bench.timing import (QUICK_ROUNDS, copy_bandwidth, copy_function,
                                  page_faults_per_call, time_interleaved)
from lbe_ops.bench.train_step import format_train_summary, run_train

RESULTS_VERSION = 2
def _select_cases(args):
    cases = all_cases()
    chosen = QUICK_SET if args.quick else FULL_SET if args.full else STANDARD_SET
    if args.cases:
        default_dtypes = dict(chosen)
        chosen = [(name, default_dtypes.get(name, ("float32",))) for name in args.cases]
    if args.dtypes:
        chosen = [(name, args.dtypes) for name, _ in chosen]
    return [(cases[name], dtypes) for name, dtypes in chosen]


def run_case(case, dtype, mode, variants, min_time, log, quick=False):
    """Times the variants of one (case, dtype, mode), the harness and the copy in interleaved
    rounds; returns the results.json entry (times, floor, ratios) and logs one line."""
    inp = make_input(case, dtype)
    names = list(variants) + ["harness"]
    built = {v: build_function(case, mode, v) for v in names}
    fns = {v: (lambda f=built[v]: f(inp)) for v in names}
    nbytes = case.elements * tf.as_dtype(dtype).size
    # The copy runs in the same rotation as the variants, so it sees the same load.
    fns["copy"] = copy_function(nbytes)
    times = time_interleaved(fns, min_time=min_time, **(QUICK_ROUNDS if quick else {}))
    for v in names:
        times[v]["page_faults_per_call"] = page_faults_per_call(fns[v])
    copy_time = times.pop("copy")
    bandwidth = 2 * nbytes / copy_time["median"]  # bytes read + bytes written per second
    passes = 1 if mode == "fwd" else 3
    floor = passes * nbytes / bandwidth
    ratios = {}
    op = times.get("op", {}).get("median")
    for other in ("tf", "xla"):
        if op and other in times:
            ratios[f"{other}/op"] = times[other]["median"] / op
            if "harness" in times and other == "tf":  # the harness runs in graph mode
                h = times["harness"]["median"]
                net_op, net_other = op - h, times[other]["median"] - h
                # Without the harness; undefined when noise puts a variant at or below it.
                ratios[f"{other}/op net"] = (net_other / net_op if net_op > 0 and net_other > 0
                                             else None)
    if op:
        ratios["op/floor"] = op / floor
    result = {
        "case": case.name, "label": case.label(), "description": case.description,
        "grouped": case.grouped, "tensors": len(case.shapes),
        "shapes": [list(s) for s in dict.fromkeys(case.shapes)],
        "dtype": dtype, "mode": mode, "elements": case.elements, "bytes": nbytes,
        "times": times, "copy": copy_time, "floor_s": floor, "floor_passes": passes,
        "copy_bandwidth_gbps": bandwidth / 1e9, "ratios": ratios,
    }
    log(f"  {case.name:12s} {dtype:9s} {mode:7s} " + "  ".join(
        f"{v} {fmt_ms(times[v]['median'])} ms" for v in names) +
        f"  copy {fmt_ms(copy_time['median'])} ms  " +
        "  ".join(f"{k} {fmt_ratio(v)}" for k, v in ratios.items() if v is not None))
    return result


def fit_variants(args, gpus):
    """The variants of the fit table (lbe_ops.bench.fit.fit_variants); the XLA pair unless
    --no-fit-xla, and outside --quick, or in it too where GPUs are visible (`gpus`): there
    compile()'s default is XLA, which the table is to compare with the op."""
    with_xla = args.fit_xla if args.fit_xla is not None else bool(gpus) or not args.quick
    return fit_bench.fit_variants(with_xla, gpus)


def run_fit(models, fit_time, min_rounds, variants, log):
    """The fit() table's entries, one per model (lbe_ops.bench.fit)."""
    entries = [fit_bench.run_fit_model(m, variants, min_time=fit_time, min_rounds=min_rounds,
                                       log=log) for m in models]
    return {"method": fit_bench.FIT_METHOD, "fit_time_s": fit_time, "min_rounds": min_rounds,
            "variants": list(variants), "learning_rate": fit_bench.LEARNING_RATE,
            "models": entries}


def run(args, command):
    """lbe-bench from the arguments lbe_ops_cli parsed; `command` is recorded in results.json."""
    if args.allocator == "bfc":
        # Read when TensorFlow creates its CPU allocator, at the first op it runs.
        os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    tf.get_logger().setLevel("ERROR")  # building many tf.functions is the point, not a mistake
    modes, variants = args.modes, args.variants
    min_time = args.min_time if args.min_time is not None else (0.1 if args.quick else 2.0)
    train_layers = args.train_layers if args.train_layers is not None else (
        10 if args.quick else 500)
    if args.fit is not None:
        fit_models = args.fit
    else:
        fit_models = ([fit_bench.QUICK_FIT_MODEL] if args.quick
                      else list(fit_bench.STANDARD_FIT_MODELS))
    fit_time = args.fit_time if args.fit_time is not None else (0.1 if args.quick else 20.0)
    if args.fit_only:
        cases, train_layers = [], 0
    else:
        cases = _select_cases(args)

    def log(msg):
        print(msg, flush=True)

    info = lbe_ops.backend_info()
    if info["backend"] != "op" or _loader.op_module() is None:
        raise SystemExit(f"lbe-bench: the compiled op is not available ({info['reason']}); "
                         "nothing to compare")
    os.makedirs(args.out, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average()
    machine = machine_info()
    log(f"lbe-bench on {machine['cpu_model']} ({machine['logical_cpus']} logical CPUs, ISA "
        f"{machine['cpu_isa']}), TensorFlow {tf.__version__}, load average {load_before}, "
        f"allocator {args.allocator}")
    big_bw = None
    if cases:
        big_bw = copy_bandwidth(256 * 2**20, min_time=0.1 if args.quick else 0.5)
        log(f"copy bandwidth (np.copyto, 256 MiB, read + write): {big_bw / 1e9:.1f} GB/s")
    results = []
    for case, dtypes in cases:
        for dtype in dtypes:
            for mode in modes:
                results.append(run_case(case, dtype, mode, variants, min_time, log,
                                        quick=args.quick))
    train = None
    if train_layers > 0:
        train_time = args.train_time if args.train_time is not None else (
            0.1 if args.quick else 15.0)
        train = run_train(train_layers, args.train_width, args.train_batch, train_time,
                          args.train_xla, log, quick=args.quick)
    fit = None
    if fit_models:
        fit = run_fit(fit_models, fit_time, 3 if args.quick else 5,
                      fit_variants(args, machine["gpus"]), log)
    load_after = load_average()
    header, rows = table_rows(results)
    doc = {
        "version": RESULTS_VERSION,
        "command": command,
        "started_utc": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started)
                         .total_seconds(), 1),
        "load_average_before": load_before, "load_average_after": load_after,
        "machine": machine,
        "copy_bandwidth_256mib_gbps": big_bw / 1e9 if big_bw else None,
        "allocator": "bfc" if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() in
                     ("1", "true") else "default",
        "method": "median per-call time over interleaved rounds of >= 20 ms; floor = passes x "
                  "bytes / copy bandwidth, the bandwidth (read + write) of np.copyto of the same "
                  "bytes timed in the same rounds (median)",
        "results": results, "train_step": train, "fit": fit,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    md = []
    if results:
        md.append(format_table(header, rows, markdown=True))
    if train:
        md.append(format_train_summary(train))
    if fit:
        jit_summary = fit_bench.format_jit_summary(fit["models"])
        md.append(fit_bench.format_fit_table(fit["models"]) + "\n\n"
                  + (jit_summary + "\n\n" if jit_summary else "") + fit_bench.FIT_METHOD)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n\n".join(md) + "\n")
    if results and not args.no_chart:
        write_chart(results, train, os.path.join(args.out, "results.png"))

    print()
    if results:
        print(format_table(header, rows))
        print()
    if train:
        print(format_train_summary(train))
        print()
    if fit:
        print(md[-1])
        print()
    if args.quick:
        print("--quick is a smoke run: its rounds are too few and too short for its timings "
              "to be compared.")
    print(f"load average before {load_before}, after {load_after}; results in {args.out}/")
    return 0
