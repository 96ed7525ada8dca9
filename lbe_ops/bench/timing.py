"""Timing: interleaved rounds, a plain loop, and the memory-copy floor.

The public functions, for scripts that time something the way lbe-bench does:

    block(outputs)              wait for a function's outputs
    time_interleaved(fns, ...)  median seconds per call of several functions, in interleaved
                                rounds (the method of every lbe-bench figure)
    time_loop(fn, seconds)      seconds per call of one function in a plain loop
    round_orders(names)         the seeded order of the functions in each round
    calls_per_round(fn, t)      how many calls of fn fill t seconds
    copy_function(nbytes)       np.copyto of nbytes: the memory-floor reference
    copy_bandwidth(nbytes)      bytes per second (read + write) of np.copyto
    quartiles(values)           (p25, p75)

QUICK_ROUNDS and TRAIN_STEP_ROUNDS are keyword sets for time_interleaved: a smoke run's few short
rounds, and rounds long enough to hold several training steps.

Method: every function is warmed up first, then run in interleaved rounds, each round one
untimed call and then a loop of calls lasting at least `round_time`, in a new (seeded) order
every round; the figure is the median per-call time over the rounds. A burst of load from other
processes then hits every function alike, and no function always follows the same one.
"""

import math
import random
import statistics
import time

import numpy as np
import tensorflow as tf

# Few, short rounds: a smoke run, whose figures say only that the functions run.
QUICK_ROUNDS = {"min_rounds": 3, "round_time": 0.005}
# A training step that follows a step of another variant runs slower (the allocator's and the
# caches' state is the other variant's), and one untimed step does not undo all of it. Rounds
# long enough for several steps measure the steady state of a training loop.
TRAIN_STEP_ROUNDS = {"min_rounds": 9, "round_time": 0.15}


def block(outputs):
    """Waits for a function's outputs and returns the first (None for None). CPU execution is
    synchronous; reading a scalar output also checks that it exists."""
    if outputs is None:
        return None
    first = tf.nest.flatten(outputs)[0]
    return first.numpy() if first.shape.rank == 0 else first


def round_orders(names, seed=0):
    """Yields the order of the functions in each round: a fresh permutation per round (seeded,
    so repeatable). What ran just before a function changes its time on a shared machine (caches,
    an idle core after single-threaded work): with a fixed order one function would always run
    after the same other one; permuted, each follows each other one about equally often."""
    rng = random.Random(seed)
    while True:
        order = list(names)
        rng.shuffle(order)
        yield order


def calls_per_round(fn, round_time):
    """Warms fn up, then times one call: how many calls fill round_time (1 to 1000)."""
    block(fn())
    t0 = time.perf_counter()
    block(fn())
    dt = max(time.perf_counter() - t0, 1e-6)
    return max(1, min(1000, int(round_time / dt)))


def quartiles(values):
    """(p25, p75) of the values (both the value itself for a single one)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(sorted(values), n=4)
    return q[0], q[2]


def time_interleaved(fns, min_time=1.0, min_rounds=7, max_rounds=60, round_time=0.02):
    """Median seconds per call of each function of `fns` ({name: callable without arguments}),
    in interleaved rounds, each round in a new order (round_orders): at least `min_rounds`, and
    more until `min_time` seconds have passed (at most `max_rounds`); in each round every
    function runs once untimed, then in a timed loop lasting about `round_time` seconds.

    Returns {name: {"median": s, "min": s, "p25": s, "p75": s, "rounds": n, "calls": k}}, k the
    calls per round.
    """
    names = list(fns)
    inner = {name: calls_per_round(fns[name], round_time) for name in names}
    samples = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    orders = round_orders(names)
    while rounds < min_rounds or (time.perf_counter() - start < min_time and rounds < max_rounds):
        for name in next(orders):
            fn, k = fns[name], inner[name]
            block(fn())  # untimed: the timed calls follow a call of the same function
            t0 = time.perf_counter()
            for _ in range(k):
                out = fn()
            block(out)
            samples[name].append((time.perf_counter() - t0) / k)
        rounds += 1
    result = {}
    for name in names:
        s = samples[name]
        p25, p75 = quartiles(s)
        result[name] = {"median": statistics.median(s), "min": min(s), "p25": p25, "p75": p75,
                        "rounds": len(s), "calls": inner[name]}
    return result


def time_loop(fn, seconds, warmup=10, batch=10):
    """Seconds per call of fn (no arguments) in a plain loop: `warmup` untimed calls (the first
    traces), then batches of `batch` calls, each batch waited for, until `seconds` have passed."""
    for _ in range(warmup):
        block(fn())
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < seconds:
        for _ in range(batch):
            out = fn()
        block(out)
        calls += batch
    return (time.perf_counter() - start) / calls


def page_faults_per_call(fn, calls=5):
    """Minor page faults of this process per call of fn (None where getrusage is unavailable)."""
    try:
        import resource
    except ImportError:
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        block(fn())
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def copy_function(nbytes):
    """A function doing np.copyto of a buffer of nbytes (at least 64): the memory-floor
    reference, timed among the variants so that it sees the same load."""
    n = max(int(nbytes) // 4, 16)
    src = np.random.default_rng(1).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)

    def copy():
        np.copyto(dst, src)
        return None

    return copy


def copy_bandwidth(nbytes, min_time=0.3):
    """Bytes per second (read + write) of np.copyto for a buffer of nbytes, best of repetitions."""
    n = max(int(nbytes) // 4, 1024)
    src = np.random.default_rng(1).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = math.inf
    start = time.perf_counter()
    reps = 0
    while reps < 5 or (time.perf_counter() - start < min_time and reps < 2000):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2 * src.nbytes / best
