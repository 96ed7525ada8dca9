"""Times one lbe-bench function in a plain loop, or the training step plain vs with LBE.

lbe-bench interleaves every variant of a case in rounds, so that load from other processes hits
them alike; this script runs one thing alone, for the A/B comparisons that benchmarks/RESULTS.md
reports (two builds, or two settings, in alternating processes):

    python scripts/time_loop.py case group-500 --variant op --seconds 5
    python scripts/time_loop.py train --variant op --seconds 8

For an A/B of two checkouts, run the same command with each on PYTHONPATH, alternating, a few
times each. `case` prints one line "<case> <mode> <variant>: <ms> ms/call"; `train` prints the
plain and the LBE step times (interleaved rounds of the two, lbe_ops.bench.time_interleaved) and
the overhead in percent.
"""

import argparse
import sys
import time

from lbe_ops import bench


def time_case(name, mode, variant, dtype, seconds):
    cases = bench.all_cases()
    if name not in cases:
        raise SystemExit(f"time_loop.py: unknown case {name!r}; one of {', '.join(cases)}")
    case = cases[name]
    inp = bench.make_input(case, dtype)
    fn = bench.build_function(case, mode, variant)
    for _ in range(10):  # trace, then warm up
        bench._block(fn(inp))
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            out = fn(inp)
        bench._block(out)
        calls += 10
    return (time.perf_counter() - start) / calls


def time_train(variant, layers, seconds):
    fns = {"plain": bench.build_train_step(layers=layers, lbe="none"),
           variant: bench.build_train_step(layers=layers, lbe=variant)}
    for fn in fns.values():
        fn()  # trace outside the timing
    times = bench.time_interleaved(fns, min_time=seconds)
    return times["plain"]["median"], times[variant]["median"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("case", help="one case and variant in a plain loop")
    c.add_argument("name", help="an lbe-bench case, e.g. group-500")
    c.add_argument("--mode", choices=bench.MODES, default="fwdbwd")
    c.add_argument("--variant", choices=bench.VARIANTS + ("harness",), default="op")
    c.add_argument("--dtype", default="float32")
    c.add_argument("--seconds", type=float, default=5.0)
    t = sub.add_parser("train", help="the training step, plain against one LBE variant")
    t.add_argument("--variant", choices=("op", "graph", "fan-in", "op-forward"), default="op")
    t.add_argument("--layers", type=int, default=500)
    t.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.what == "case":
        seconds = time_case(args.name, args.mode, args.variant, args.dtype, args.seconds)
        print(f"{args.name} {args.mode} {args.variant}: {seconds * 1e3:.3f} ms/call")
    else:
        plain, with_lbe = time_train(args.variant, args.layers, args.seconds)
        print(f"plain {plain * 1e3:.2f} ms, {args.variant} {with_lbe * 1e3:.2f} ms, overhead "
              f"{100 * (with_lbe / plain - 1):.1f} %")


if __name__ == "__main__":
    main()
