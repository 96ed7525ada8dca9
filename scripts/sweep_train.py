#!/usr/bin/env python
"""Runs lbe-train over several seeds and tabulates the results (the table in the README, "The main job").

    python scripts/sweep_train.py                          # the defaults, seeds 0-4
    python scripts/sweep_train.py --seeds 0 1 2 -- --depth 150 --epochs 200
    python scripts/sweep_train.py --out DIR --aggregate    # re-tabulate finished runs
    python scripts/sweep_train.py --jobs 2                 # two seeds at a time, one thread each

Each seed runs `python -m lbe_ops.train ... --seed S --out OUT/seed-S` in its own process, one
after the other, or --jobs at a time (each then limited to one TensorFlow thread: wall times are
those of one core per run, which is why the README's table says how it was run). Arguments after `--` go to lbe-train unchanged. The table (Markdown) is printed
and written to OUT/summary.md, the numbers to OUT/summary.json.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import statistics
import subprocess
import sys
import time


def _parse(argv):
    if "--" in argv:
        split = argv.index("--")
        argv, passthrough = argv[:split], argv[split + 1:]
    else:
        passthrough = []
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", help="sweep folder (default: ./lbe-train-sweep-<time>)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run at the same time (default 1: one after the other, "
                             "with all cores)")
    parser.add_argument("--aggregate", action="store_true",
                        help="do not train; tabulate the seed-* folders already in --out")
    args = parser.parse_args(argv)
    if args.aggregate and not args.out:
        parser.error("--aggregate needs --out")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args, passthrough


def _load(out, seeds):
    found = []
    for seed in seeds:
        path = os.path.join(out, f"seed-{seed}", "results.json")
        if os.path.exists(path):
            with open(path) as f:
                found.append(json.load(f))
        else:
            print(f"missing: {path}", file=sys.stderr)
    return found


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def tabulate(results):
    runs = [name for name in ("lbe", "baseline") if name in results[0]["runs"]]
    header = ["seed"]
    for name in runs:
        label = "LBE" if name == "lbe" else "baseline"
        header += [f"{label} final acc", f"{label} best acc", f"{label} wall (s)"]
    header.append("load avg (start)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        row = [str(result["config"]["seed"])]
        for name in runs:
            run = result["runs"][name]
            row += [f"{run['final_test_accuracy']:.3f}", f"{run['best_test_accuracy']:.3f}",
                    f"{run['wall_time_s']:.0f}"]
        load = result["environment"].get("load_average")
        row.append("n/a" if load is None else f"{load[0]:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    summary = {}
    row = ["mean"]
    for name in runs:
        final = _stats([r["runs"][name]["final_test_accuracy"] for r in results])
        best = _stats([r["runs"][name]["best_test_accuracy"] for r in results])
        wall = _stats([r["runs"][name]["wall_time_s"] for r in results])
        summary[name] = {"final_test_accuracy": final, "best_test_accuracy": best,
                         "wall_time_s": wall}
        row += [f"{final['mean']:.3f} (min {final['min']:.3f}, max {final['max']:.3f})",
                f"{best['mean']:.3f}", f"{wall['mean']:.0f}"]
    row.append("")
    lines.append("| " + " | ".join(f"**{c}**" if c else c for c in row) + " |")
    return "\n".join(lines), summary


def _run_seeds(seeds, passthrough, out, jobs):
    env = dict(os.environ)
    # `python -m lbe_ops.train` would put the working directory first on sys.path: run from a
    # clone's root, it imported the source tree, which has no compiled op, and every seed fell
    # back to the pure-TensorFlow path. PYTHONSAFEPATH (Python 3.11) leaves it off, so the runs
    # import the installed package (PYTHONPATH still counts).
    env["PYTHONSAFEPATH"] = "1"
    if jobs > 1:  # one core per run: N runs of 1 thread, not N runs fighting over all cores
        env.setdefault("TF_NUM_INTRAOP_THREADS", "1")
        env.setdefault("TF_NUM_INTEROP_THREADS", "1")

    def run(seed):
        command = [sys.executable, "-m", "lbe_ops.train", *passthrough, "--seed", str(seed),
                   "--out", os.path.join(out, f"seed-{seed}"), "--quiet"]
        print("$", " ".join(command), flush=True)
        started = time.perf_counter()
        if jobs > 1:  # side by side: each run's output into its own log
            with open(os.path.join(out, f"seed-{seed}.log"), "w") as log:
                code = subprocess.run(command, env=env, stdout=log, stderr=log).returncode
        else:
            code = subprocess.run(command, env=env).returncode
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"seed {seed}: {status}, {time.perf_counter() - started:.0f} s", flush=True)
        return code

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        codes = list(pool.map(run, seeds))
    failed = [seed for seed, code in zip(seeds, codes) if code != 0]
    if failed:
        print(f"seeds that failed: {failed}", file=sys.stderr)


def main(argv=None):
    args, passthrough = _parse(sys.argv[1:] if argv is None else argv)
    out = args.out or f"lbe-train-sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    os.makedirs(out, exist_ok=True)
    if not args.aggregate:
        _run_seeds(args.seeds, passthrough, out, args.jobs)
    results = _load(out, args.seeds)
    if not results:
        print("no results to tabulate", file=sys.stderr)
        return 1
    table, summary = tabulate(results)
    config = dict(results[0]["config"])
    config.pop("seed", None)
    environment = results[0]["environment"]
    text = (f"{table}\n\nconfig: {json.dumps(config)}\n"
            f"machine: {environment.get('cpu_count')} CPUs, {environment.get('platform')}, "
            f"TensorFlow {environment.get('tensorflow')}, backend {config.get('backend')}\n")
    print(text)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"config": config, "seeds": [r["config"]["seed"] for r in results],
                   "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
