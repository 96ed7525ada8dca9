#!/usr/bin/env python
"""Runs lbe-train over seeds and backends and tabulates the results (docs/training.md).

    python scripts/sweep_train.py                             # the defaults: seeds 0-9 x op, tf
    python scripts/sweep_train.py --seeds 0 1 2 -- --depth 150 --epochs 200
    python scripts/sweep_train.py --backends op --jobs 2      # two runs at a time, one thread each
    python scripts/sweep_train.py --out DIR --aggregate       # re-tabulate finished runs

Each (seed, backend) runs lbe-train (its console-script function, lbe_ops_cli.train_main, in
this Python) with `... --backend B --seed S --out OUT/<B>-seed-S` in its own process. The
baseline (beta = 0) does not depend on the backend (its LBE term is zero), so it is trained once
per seed, in the first backend's run. Runs go one after the other, or --jobs at a time (each then
limited to one TensorFlow thread: wall times are those of one core per run). Arguments after `--`
go to lbe-train unchanged. The table (Markdown) is printed and written to OUT/summary.md, the
numbers to OUT/summary.json.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

BACKENDS = ("op", "tf")
# What the lbe-train console script runs, for `python -c` with lbe-train's arguments.
LBE_TRAIN = "import sys, lbe_ops_cli; sys.exit(lbe_ops_cli.train_main())"


def _parse(argv):
    if "--" in argv:
        split = argv.index("--")
        argv, passthrough = argv[:split], argv[split + 1:]
    else:
        passthrough = []
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--out", help="sweep folder (default: ./lbe-train-sweep-<time>)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at the same time (default 1: one after the other, with all "
                             "cores)")
    parser.add_argument("--aggregate", action="store_true",
                        help="do not train; tabulate the runs already in --out")
    args = parser.parse_args(argv)
    if args.aggregate and not args.out:
        parser.error("--aggregate needs --out")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args, passthrough


def _run_dir(out, backend, seed):
    return os.path.join(out, f"{backend}-seed-{seed}")


def _load(out, seeds, backends):
    """{(backend, seed): results} for the runs that finished."""
    found = {}
    for backend in backends:
        for seed in seeds:
            path = os.path.join(_run_dir(out, backend, seed), "results.json")
            if os.path.exists(path):
                with open(path) as f:
                    found[backend, seed] = json.load(f)
            else:
                print(f"missing: {path}", file=sys.stderr)
    return found


def _cell(run):
    return f"{run['final_test_accuracy']:.3f} ({run['reported_epoch']})"


def tabulate(found, seeds, backends):
    header = ["seed"]
    header += [f"{b}: LBE test acc (epoch)" for b in backends]
    header += [f"{b}: LBE last epoch" for b in backends]
    header += ["baseline", "LBE wall (s)", "baseline wall (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lbe, baseline, walls, baseline_walls = [], [], [], []
    for seed in seeds:
        runs = {b: found.get((b, seed)) for b in backends}
        if not any(runs.values()):
            continue
        row = [str(seed)]
        row += [_cell(r["runs"]["lbe"]) if r else "-" for r in runs.values()]
        row += [f"{r['runs']['lbe']['last_epoch_test_accuracy']:.3f}" if r else "-"
                for r in runs.values()]
        base = next((r["runs"]["baseline"] for r in runs.values()
                     if r and "baseline" in r["runs"]), None)
        row.append("-" if base is None else f"{base['final_test_accuracy']:.3f}")
        seed_walls = [r["runs"]["lbe"]["wall_time_s"] for r in runs.values() if r]
        row.append(" / ".join(f"{w:.0f}" for w in seed_walls))
        row.append("-" if base is None else f"{base['wall_time_s']:.0f}")
        lines.append("| " + " | ".join(row) + " |")
        lbe += [r["runs"]["lbe"]["final_test_accuracy"] for r in runs.values() if r]
        walls += seed_walls
        if base is not None:
            baseline.append(base["final_test_accuracy"])
            baseline_walls.append(base["wall_time_s"])
    summary = {
        "lbe_runs": len(lbe),
        "lbe_min": min(lbe, default=None), "lbe_median": statistics.median(lbe) if lbe else None,
        "lbe_max": max(lbe, default=None),
        "baseline_runs": len(baseline), "baseline_max": max(baseline, default=None),
        "lbe_wall_median_s": statistics.median(walls) if walls else None,
        "baseline_wall_median_s": statistics.median(baseline_walls) if baseline_walls else None,
    }
    if lbe:
        lines.append("")
        lines.append(f"LBE over {len(lbe)} runs: min {summary['lbe_min']:.3f}, median "
                     f"{summary['lbe_median']:.3f}, max {summary['lbe_max']:.3f}"
                     + (f"; baseline over {len(baseline)} seeds: max "
                        f"{summary['baseline_max']:.3f}" if baseline else ""))
    return "\n".join(lines), summary


def _run_all(jobs_list, passthrough, out, jobs):
    env = dict(os.environ)
    # `python -c` would put the working directory first on sys.path: run from a clone's root,
    # it would import the source tree, which has no compiled op. PYTHONSAFEPATH (Python 3.11)
    # leaves it off, so the runs import the installed package.
    env["PYTHONSAFEPATH"] = "1"
    if jobs > 1:  # one core per run: N runs of 1 thread, not N runs fighting over all cores
        env.setdefault("TF_NUM_INTRAOP_THREADS", "1")
        env.setdefault("TF_NUM_INTEROP_THREADS", "1")

    def run(job):
        backend, seed, with_baseline = job
        folder = _run_dir(out, backend, seed)
        command = [sys.executable, "-c", LBE_TRAIN, *passthrough, "--backend", backend,
                   "--seed", str(seed), "--out", folder, "--quiet", "--overwrite"]
        if not with_baseline:
            command.append("--no-baseline")
        print("$", shlex.join(command), flush=True)
        started = time.perf_counter()
        with open(folder + ".log", "w") as log:
            code = subprocess.run(command, env=env, stdout=log, stderr=log).returncode
        status = "ok" if code == 0 else f"FAILED (exit {code}, see {folder}.log)"
        print(f"{backend} seed {seed}: {status}, {time.perf_counter() - started:.0f} s",
              flush=True)
        return code

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        codes = list(pool.map(run, jobs_list))
    failed = [job[:2] for job, code in zip(jobs_list, codes) if code != 0]
    if failed:
        print(f"runs that failed: {failed}", file=sys.stderr)


def main(argv=None):
    args, passthrough = _parse(sys.argv[1:] if argv is None else argv)
    out = args.out or f"lbe-train-sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    os.makedirs(out, exist_ok=True)
    if not args.aggregate:
        jobs_list = [(backend, seed, i == 0) for seed in args.seeds
                     for i, backend in enumerate(args.backends)]
        _run_all(jobs_list, passthrough, out, args.jobs)
    found = _load(out, args.seeds, args.backends)
    if not found:
        print("no results to tabulate", file=sys.stderr)
        return 1
    table, summary = tabulate(found, args.seeds, args.backends)
    first = next(iter(found.values()))
    config = dict(first["config"])
    for key in ("seed", "backend", "backend_requested", "baseline"):
        config.pop(key, None)
    environment = first["environment"]
    text = (f"{table}\n\nconfig: {json.dumps(config)}\n"
            f"machine: {environment.get('cpu') or 'CPU'} x {environment.get('cpu_count')}, "
            f"{environment.get('platform')}, TensorFlow {environment.get('tensorflow')}"
            + ("" if args.aggregate else "; one run at a time" if args.jobs == 1
               else f"; {args.jobs} runs at a time, one thread each") + "\n")
    print(text)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"config": config, "seeds": args.seeds, "backends": args.backends,
                   "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
