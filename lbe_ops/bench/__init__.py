"""Benchmarks of lbe_ops: a library of timing tools, and the lbe-bench command (cli.run).

    cases       kernel benchmark inputs and timed functions (op, pure TensorFlow, XLA)
    timing      interleaved rounds, a plain loop, the memory-copy floor (the public timing API)
    train_step  one SGD step of a deep ReLU network without and with LBE
    fit         the per-step time of keras Model.fit() without and with LBE
    machine     what machine a benchmark ran on
    report      number formats, the kernel table, the chart
    cli         lbe-bench's run, from the command line lbe_ops_cli parsed (also
                `python -m lbe_ops.bench`)

The timing API, for scripts that time things the way lbe-bench does:

    from lbe_ops import bench
    fns = {"op": lambda: f_op(x), "tf": lambda: f_tf(x)}
    times = bench.time_interleaved(fns, min_time=2.0)     # {name: {"median": s, ...}}
    per_call = bench.time_loop(lambda: f_op(x), seconds=5)

Importing this package imports TensorFlow; Keras is imported only when a fit() model or a
training step is built (the step computes the LBE loss with lbe_ops.keras's code).
"""

import os

# TensorFlow's C++ start-up messages are noise in a benchmark's output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lbe_ops.bench.cases import (DTYPES, MODES, VARIANTS, Case, all_cases,  # noqa: E402
                                 build_function, make_input)
from lbe_ops.bench.timing import (QUICK_ROUNDS, TRAIN_STEP_ROUNDS, block,  # noqa: E402
                                  calls_per_round, copy_bandwidth, copy_function, quartiles,
                                  round_orders, time_interleaved, time_loop)
from lbe_ops.bench.train_step import build_train_step  # noqa: E402

__all__ = [
    "Case", "DTYPES", "MODES", "QUICK_ROUNDS", "TRAIN_STEP_ROUNDS", "VARIANTS", "all_cases",
    "block", "build_function", "build_train_step", "calls_per_round", "copy_bandwidth",
    "copy_function", "make_input", "quartiles", "round_orders",
    "time_interleaved", "time_loop",
]
