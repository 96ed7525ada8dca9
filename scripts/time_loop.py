"""Times one lbe-bench function in a plain loop, or the training step plain vs with LBE.

lbe-bench interleaves every variant of a case in rounds, so that load from other processes hits
them alike; this script runs one thing alone, for A/B comparisons (two builds, or two settings,
in alternating processes). It uses lbe_ops.bench's public timing API (time_loop,
time_interleaved, round_orders, calls_per_round, block, copy_function):

    python scripts/time_loop.py case group-500 --variant op --seconds 5
    python scripts/time_loop.py train --variant op --seconds 8

For an A/B of two checkouts, run the same command with each on PYTHONPATH, alternating, a few
times each. `case` prints one line "<case> <mode> <variant>: <ms> ms/call"; `train` prints the
plain and the LBE step times (interleaved rounds of the two, bench.time_interleaved with
bench.TRAIN_STEP_ROUNDS) and the overhead in percent.

`after` shows why lbe-bench times each variant in its own steady state: it runs the variants of
a case (with the copy lbe-bench uses as its floor) or of the training step in shuffled rounds
with no untimed call, and prints each variant's median time after each other one:

    python scripts/time_loop.py after large --seconds 20
    python scripts/time_loop.py after train --seconds 40
"""

import argparse
import statistics
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
    return bench.time_loop(lambda: fn(inp), seconds)


def time_train(variant, layers, seconds):
    fns = {"plain": bench.build_train_step(layers=layers, lbe="none"),
           variant: bench.build_train_step(layers=layers, lbe=variant)}
    for fn in fns.values():
        fn()  # trace outside the timing
    times = bench.time_interleaved(fns, min_time=seconds, **bench.TRAIN_STEP_ROUNDS)
    return times["plain"]["median"], times[variant]["median"]


def time_by_predecessor(fns, seconds, round_time):
    """{name: {predecessor: median seconds per call}} over shuffled rounds of one function each
    (k calls lasting about round_time), with no untimed call: what ran just before is kept."""
    k = {name: bench.calls_per_round(fn, round_time) for name, fn in fns.items()}
    samples = {name: {} for name in fns}
    orders = bench.round_orders(list(fns))
    previous, start, rounds = None, time.perf_counter(), 0
    while rounds < 2 or time.perf_counter() - start < seconds:  # two: a predecessor for each
        rounds += 1
        for name in next(orders):
            t0 = time.perf_counter()
            for _ in range(k[name]):
                out = fns[name]()
            bench.block(out)
            if previous is not None:
                samples[name].setdefault(previous, []).append((time.perf_counter() - t0) / k[name])
            previous = name
    return {name: {p: statistics.median(v) for p, v in sorted(by.items())}
            for name, by in samples.items()}


def after(what, seconds, layers=500):
    if what == "train":
        fns = {v: bench.build_train_step(layers=layers, lbe=lbe) for v, lbe in
               (("plain", "none"), ("op", "op"), ("tf", "tf"), ("fan-in", "fan-in"))}
        round_time = 0.0  # one step per round
    else:
        case = bench.all_cases()[what]
        inp = bench.make_input(case, "float32")
        fns = {v: (lambda f=bench.build_function(case, "fwdbwd", v): f(inp))
               for v in bench.VARIANTS + ("harness",)}
        fns["copy"] = bench.copy_function(case.elements * 4)
        round_time = 0.02
    for name, by in time_by_predecessor(fns, seconds, round_time).items():
        print(f"{name:8s} " + "  ".join(f"after {p}: {t * 1e3:.3f} ms" for p, t in by.items()))


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
    t.add_argument("--variant", choices=("op", "tf", "fan-in", "op-forward"), default="op",
                   help="LBE through the op, in pure TensorFlow (tf), the fan-in stand-in, or "
                        "the op's forward alone")
    t.add_argument("--layers", type=int, default=500)
    t.add_argument("--seconds", type=float, default=8.0)
    a = sub.add_parser("after", help="each variant's time after each other one")
    a.add_argument("name", help="an lbe-bench case (e.g. large), or train")
    a.add_argument("--seconds", type=float, default=20.0)
    a.add_argument("--layers", type=int, default=500, help="depth of the training step")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.what == "after":
        if args.name != "train" and args.name not in bench.all_cases():
            raise SystemExit(f"time_loop.py: unknown case {args.name!r}")
        after(args.name, args.seconds, args.layers)
    elif args.what == "case":
        seconds = time_case(args.name, args.mode, args.variant, args.dtype, args.seconds)
        print(f"{args.name} {args.mode} {args.variant}: {seconds * 1e3:.3f} ms/call")
    else:
        plain, with_lbe = time_train(args.variant, args.layers, args.seconds)
        print(f"plain {plain * 1e3:.2f} ms, {args.variant} {with_lbe * 1e3:.2f} ms, overhead "
              f"{100 * (with_lbe / plain - 1):.1f} %")


if __name__ == "__main__":
    main()
