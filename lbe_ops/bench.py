"""lbe-bench: times the batch-entropy op against the pure-TensorFlow composition, on this machine.

    lbe-bench                       # the issue's targets, a representative set, fit() (~20 min)
    lbe-bench --quick               # tiny shapes, a few repetitions: a smoke run (~30 s)
    lbe-bench --full                # every shape in every dtype (~30 min)
    lbe-bench --cases large,group-500 --dtypes float32 --fit none --out results/
    lbe-bench --fit-only --fit mlp-100x64 --fit-time 60    # only the fit() table

For every case (one tensor, or a group of tensors through one `batch_entropies` call), dtype and
mode (`fwd`: the entropy; `fwdbwd`: the entropy and its gradient with respect to the inputs), it
times three variants of the same tf.function:

    op     the compiled Lbe>BatchEntropies(Grad) ops (backend "op"), graph mode
    graph  the pure-TensorFlow composition (lbe_ops.reference, backend "tf"), graph mode
    xla    the composition compiled by XLA (jit_compile=True)

and sets them against the memory floor: the bytes the work must move (forward: read x once;
forward+backward: read x twice, write dx once) at the machine's copy bandwidth, measured as
np.copyto of the same number of bytes (read + write bytes over its time), timed in the same
interleaved rounds as the variants so that it sees the same load.

Timing: all variants of a case are traced and warmed up first, then run in interleaved rounds,
each round one untimed call and then a loop of calls lasting >= 20 ms, in a new (seeded) order
every round; the figure is the median per-call time over the rounds, so a burst of load from
other processes hits every variant alike, and no variant always follows the same one (a fixed
order had put the op right after the single-threaded copy in every round, which slowed it by a
quarter or more). Grouped inputs are cut from one input tensor inside the function (tf.split, no
copy) and their gradients summed per shape (tf.add_n) to a few outputs. Everything that is not
LBE (the tf.function call itself, about 0.3 ms on a loaded 2-core VM, the split and the sums) is
timed alone as the "harness" (graph mode) and reported, so the graph/op ratio can be read with
it (`raw`) or without it (`net`); XLA compiles the harness into its own program, so xla/op is
raw only.

The training-step case times one SGD step of a deep plain ReLU network (default 500 layers of
width 32, batch 128) without LBE, with LBE through lbe_ops.batch_entropies on every layer's
activation (the op), and with the composition; the LBE overhead is (with - without) / without. A
fourth variant ("fan-in") puts the same loss on one tf.add_n over all activations instead of
their entropies: what it adds is the cost of any loss term on every layer in TensorFlow's tape
(one gradient sum per layer), the part of the overhead that no op can remove. A fifth
("op-forward") runs the op's forward but holds the entropies constant for the gradient: the
forward op's share of the overhead. Steps are timed in rounds of several steps of one variant
after an untimed one (steady state, as in a training loop): a step that follows a step of
another variant is slower, and the variants differ in how much.

The fit() table (lbe_ops/bench_fit.py) times what users run: the steady-state time per step of
keras Model.fit() for a plain Sequential model ("plain"), lbe_ops.keras.wrap() of the same
architecture with the op ("op") and with the composition ("tf"), and both compiled by XLA
("plain-xla", "lbe-xla"; under XLA lbe_ops takes the composition itself). Models: mlp-500x32,
mlp-100x64 and cnn-30x16 (`--fit all`, the default; mlp-10x16 in --quick); `--fit-time` seconds
of rounds per model (default 20, at least 5 rounds), `--no-fit-xla` to leave out the XLA pair
(left out in --quick unless --fit-xla), `--fit none` to skip the table, and `--fit-only` to run
nothing else (no kernel cases, no training step, no chart). Most of the fit() table's time is
the first fit() of each variant (tracing; on a loaded 2-core VM 16-48 s for the 500-layer graph
variants, and 3 minutes to XLA-compile its LBE model). Each round runs one fit() epoch of
every variant, in a fresh seeded order; a round's step time is the median of the differences
between consecutive on_train_batch_end times (a fit() call's first step and its start and end
left out), the figure the median over rounds. The table gives each variant's ms per step, the
LBE overhead of op and tf over plain and of lbe-xla over plain-xla (with / without - 1) and the
op's speed-up over the composition (tf/op). The kernel cases run in the same invocation, so the
kernel ratios and the fit() figures come from the same machine state.

Outputs (in --out, default ./lbe-bench-results): results.json (every number, the machine, the
load, the command), results.md (the table) and results.png (speed-ups and the floor ratio).
Timings are not assertions: nothing here fails on a slow machine.
"""

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import lbe_ops  # noqa: E402
from lbe_ops import _loader  # noqa: E402

RESULTS_VERSION = 1
VARIANTS = ("op", "graph", "xla")
MODES = ("fwd", "fwdbwd")
DTYPES = ("float32", "float16", "bfloat16", "float64")


# --------------------------------------------------------------------------------------------
# Cases

class Case:
    """One benchmark input: a single tensor, or a group of tensors for one batch_entropies call."""

    def __init__(self, name, shapes, grouped, description=""):
        self.name = name
        self.shapes = [tuple(s) for s in shapes]
        self.grouped = grouped
        self.description = description

    @property
    def elements(self):
        return int(sum(np.prod(s) for s in self.shapes))

    def label(self):
        if not self.grouped:
            return "[" + ", ".join(str(d) for d in self.shapes[0]) + "]"
        distinct = []
        for s in self.shapes:
            if s not in distinct:
                distinct.append(s)
        if len(distinct) == 1:
            return f"{len(self.shapes)} x [" + ", ".join(str(d) for d in distinct[0]) + "]"
        return f"{len(self.shapes)} tensors, {len(distinct)} shapes"


def _mixed_cnn_shapes(batch=128):
    """Activations of a small CNN (conv stages, then dense layers): a group of mixed shapes."""
    shapes = []
    for size, channels, count in ((32, 16, 6), (16, 32, 6), (8, 64, 6)):
        shapes += [(batch, size, size, channels)] * count
    shapes += [(batch, 256)] * 3 + [(batch, 10)]
    return shapes


def all_cases():
    """Every case by name; the sets below pick from these."""
    cases = [
        Case("tiny", [(16, 32)], False, "one small layer: per-call overhead"),
        Case("small", [(128, 256)], False, "a dense layer"),
        Case("mlp", [(256, 1024)], False, "a wide dense layer"),
        Case("large", [(1024, 4096)], False, "issue target: 16 MB in float32"),
        Case("tall", [(65536, 64)], False, "tall: the batch is split over threads"),
        Case("wide", [(64, 65536)], False, "wide: many unit blocks, few rows"),
        Case("conv", [(64, 32, 32, 32)], False, "a rank-4 conv activation"),
        Case("group-20", [(32, 64)] * 20, True, "20 small layers"),
        Case("group-500", [(32, 64)] * 500, True, "issue target: 500 small layers"),
        Case("group-100", [(128, 256)] * 100, True, "100 dense layers"),
        Case("group-mixed", _mixed_cnn_shapes(), True, "a CNN's activations, mixed shapes"),
    ]
    return {c.name: c for c in cases}


QUICK_SET = [("tiny", ("float32",)), ("group-20", ("float32",))]
STANDARD_SET = [
    ("tiny", ("float32",)),
    ("small", ("float32",)),
    ("large", DTYPES),
    ("tall", ("float32",)),
    ("wide", ("float32",)),
    ("conv", ("float32",)),
    ("group-500", ("float32",)),
    ("group-mixed", ("float32",)),
]
FULL_SET = [(name, DTYPES) for name in all_cases()]


# --------------------------------------------------------------------------------------------
# Building the timed functions

def _tf_dtype(name):
    return tf.as_dtype(name)


def make_input(case, dtype, seed=0):
    """The one tensor a case's functions take: the tensor itself, [N * B, ...] for a group of
    equal shapes (split inside), or a flat buffer for mixed shapes (split and reshaped inside)."""
    rng = np.random.default_rng(seed)
    if not case.grouped:
        shape = case.shapes[0]
    elif len(set(case.shapes)) == 1:
        shape = (len(case.shapes) * case.shapes[0][0],) + case.shapes[0][1:]
    else:
        shape = (case.elements,)
    data = rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5
    return tf.cast(tf.constant(data), _tf_dtype(dtype))


def _unpack(case, inp):
    if not case.grouped:
        return [inp]
    if len(set(case.shapes)) == 1:
        return tf.split(inp, len(case.shapes), axis=0)
    sizes = [int(np.prod(s)) for s in case.shapes]
    return [tf.reshape(p, s) for p, s in zip(tf.split(inp, sizes), case.shapes)]


def _sum_by_shape(case, tensors):
    """A few outputs that depend on every tensor: tf.add_n over each distinct shape."""
    by_shape = {}
    for s, t in zip(case.shapes, tensors):
        by_shape.setdefault(s, []).append(t)
    return [tf.add_n(ts) if len(ts) > 1 else ts[0] for ts in by_shape.values()]


def build_function(case, mode, variant, ddof=1):
    """A callable f(inp) for one (case, mode, variant); variant 'harness' does everything but LBE
    (the tf.function call, the split of grouped inputs, the sums of their gradients).

    The backend is fixed at trace time (lbe_ops.use_backend), and every call runs inside the
    same backend block, so the trace never changes.
    """
    if variant not in VARIANTS + ("harness",):
        raise ValueError(f"unknown variant {variant!r}")
    backend = {"op": "op", "graph": "tf", "xla": "op", "harness": "tf"}[variant]
    jit = variant == "xla"

    def body(inp):
        xs = _unpack(case, inp)
        if variant == "harness":  # everything but LBE: the call, the split and the sums
            if mode == "fwd" or not case.grouped:
                return xs[0]
            return _sum_by_shape(case, xs)
        if mode == "fwd":
            if case.grouped:
                return lbe_ops.batch_entropies(xs, ddof=ddof)
            return lbe_ops.batch_entropy(xs[0], ddof=ddof)
        with tf.GradientTape() as tape:
            tape.watch(xs)
            if case.grouped:
                h = lbe_ops.batch_entropies(xs, ddof=ddof)
            else:
                h = lbe_ops.batch_entropy(xs[0], ddof=ddof)
        grads = tape.gradient(h, xs)
        if case.grouped:
            return [h] + _sum_by_shape(case, grads)
        return h, grads[0]

    fn = tf.function(body, jit_compile=jit, autograph=False, reduce_retracing=False)

    def call(inp):
        with lbe_ops.use_backend(backend):
            return fn(inp)

    call.backend = backend
    return call


def _block(outputs):
    """Waits for the outputs (CPU execution is synchronous; this also checks they exist)."""
    if outputs is None:
        return None
    first = tf.nest.flatten(outputs)[0]
    return first.numpy() if first.shape.rank == 0 else first


# --------------------------------------------------------------------------------------------
# Timing

def round_orders(names, seed=0):
    """The order of the functions in each round: a fresh permutation per round (seeded, so
    repeatable). What ran just before a function changes its time on a VM (caches, the idle
    second vCPU after single-threaded work): every variant ran slower right after np.copyto than
    after any other, the op by 15-35 % (benchmarks/RESULTS.md). A fixed order put the op after
    the copy in every round; permuted, each function follows each other one about equally
    often."""
    rng = random.Random(seed)
    while True:
        order = list(names)
        rng.shuffle(order)
        yield order


def calls_per_round(fn, round_time):
    """Warms fn up, then times one call: how many calls fill round_time (1 to 1000)."""
    _block(fn())
    t0 = time.perf_counter()
    _block(fn())
    dt = max(time.perf_counter() - t0, 1e-6)
    return max(1, min(1000, int(round_time / dt)))


def time_interleaved(fns, min_time=1.0, min_rounds=7, max_rounds=60, round_time=0.02):
    """Median seconds per call of each function, measured in interleaved rounds, each round in
    a new order (round_orders).

    Returns {name: {"median": s, "min": s, "p25": s, "p75": s, "rounds": n, "calls": k}}.
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
            _block(fn())  # untimed: the timed calls follow a call of the same function
            t0 = time.perf_counter()
            for _ in range(k):
                out = fn()
            _block(out)
            samples[name].append((time.perf_counter() - t0) / k)
        rounds += 1
    result = {}
    for name in names:
        s = samples[name]
        p25, p75 = quartiles(s)
        result[name] = {"median": statistics.median(s), "min": min(s), "p25": p25, "p75": p75,
                        "rounds": len(s), "calls": inner[name]}
    return result


def quartiles(values):
    """(p25, p75) of the values (both the value itself for a single one)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(sorted(values), n=4)
    return q[0], q[2]


def page_faults_per_call(fn, calls=5):
    """Minor page faults of this process per call of fn (0 where getrusage is unavailable)."""
    try:
        import resource
    except ImportError:
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        _block(fn())
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


_QUICK_TIMING = {"min_rounds": 3, "round_time": 0.005}
# Training steps take 10-30 ms, so 20 ms rounds would time one step each. A step right after a
# step of another variant runs slower (the allocator's and the caches' state is the other
# variant's), and one untimed step does not undo all of it: with one timed step per round the
# op's overhead read +12-15 % and the composition's +50 %, with seven +22 % and +113 % (steady
# state, as in a training loop; benchmarks/RESULTS.md). Rounds of about 0.15 s.
_TRAIN_TIMING = {"min_rounds": 9, "round_time": 0.15}


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


# --------------------------------------------------------------------------------------------
# The training step

def build_train_step(layers=500, width=32, batch=128, classes=10, lbe="none", seed=0, jit=False):
    """One SGD step of a plain ReLU network; lbe is 'none', 'op' (lbe_ops, compiled op), 'graph',
    'fan-in' or 'op-forward'.

    The LBE loss is the paper's: task + task * mean_l beta * (H_l - max(alpha_min, |alpha_l|))^2,
    with one learnable alpha per layer, every layer's entropy from one batch_entropies call.
    'fan-in' puts the same loss on a stand-in for the entropies, one tf.add_n over all
    activations: every activation read once by one op, and a gradient that costs nothing
    itself. What it adds to the step is what any loss term on every layer costs in TensorFlow's
    tape: each activation's gradient becomes a sum of two (one AddN per layer).
    'op-forward' computes the entropies with the op but holds them constant for the gradient
    (tf.stop_gradient): the loss value of 'op', without the gradient op and without the per-layer
    gradient sums, so that op - op-forward is what the gradient op and its fan-in add.
    """
    rng = np.random.default_rng(seed)
    weights = [tf.Variable((rng.standard_normal((width, width)) * math.sqrt(2.0 / width))
                           .astype(np.float32)) for _ in range(layers)]
    biases = [tf.Variable(np.zeros(width, np.float32)) for _ in range(layers)]
    head = tf.Variable((rng.standard_normal((width, classes)) * math.sqrt(1.0 / width))
                       .astype(np.float32))
    alpha = tf.Variable(np.full(layers, 0.5, np.float32))
    variables = weights + biases + [head] + ([alpha] if lbe != "none" else [])
    x = tf.constant(rng.standard_normal((batch, width)).astype(np.float32))
    y = tf.constant(rng.integers(0, classes, batch).astype(np.int32))
    beta, alpha_min, lr = 0.5, 0.5, 1e-4

    def step(x, y):
        with tf.GradientTape() as tape:
            a = x
            activations = []
            for w, b in zip(weights, biases):
                a = tf.nn.relu(tf.matmul(a, w) + b)
                activations.append(a)
            logits = tf.matmul(a, head)
            task = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            if lbe == "none":
                loss = task
            else:
                if lbe == "fan-in":
                    h = tf.reduce_mean(tf.add_n(activations)) + tf.zeros([layers])
                elif lbe == "op-forward":
                    h = tf.stop_gradient(lbe_ops.batch_entropies(activations))
                else:
                    h = lbe_ops.batch_entropies(activations)
                target = tf.maximum(alpha_min, tf.abs(alpha))
                loss = task + task * tf.reduce_mean(beta * tf.square(h - target))
        grads = tape.gradient(loss, variables)
        for v, g in zip(variables, grads):
            v.assign_sub(lr * g)
        return loss

    fn = tf.function(step, jit_compile=jit, autograph=False)
    backend = "tf" if lbe == "graph" else "op"

    def call():
        with lbe_ops.use_backend(backend):
            return fn(x, y)

    return call


# --------------------------------------------------------------------------------------------
# The machine

def machine_info():
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "lbe_ops": lbe_ops.__version__,
        "logical_cpus": os.cpu_count(),
        "cpu_model": None,
        "cpu_isa": None,
        "memory_gb": None,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default",
    }
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines()
                      if ln.startswith("flags")), [])
        info["cpu_flags_avx2_fma_f16c"] = all(f in flags for f in ("avx2", "fma", "f16c"))
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        from lbe_ops import _core  # the pybind11 module, when built: the ISA the kernels use
        info["cpu_isa"] = _core.isa()
    except Exception:  # not built, or built without the CPU core
        forced = os.environ.get("LBE_OPS_CPU_ISA")
        info["cpu_isa"] = forced or ("avx2 (inferred from the CPU flags)"
                                     if info.get("cpu_flags_avx2_fma_f16c") else "generic")
    try:
        caches = {}
        base = "/sys/devices/system/cpu/cpu0/cache"
        for entry in sorted(os.listdir(base)):
            path = os.path.join(base, entry)
            with open(os.path.join(path, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(path, "size")) as f:
                size = f.read().strip()
            if kind != "Instruction":
                caches[f"L{level}"] = size
        info["caches_per_core_or_shared"] = caches
    except OSError:
        pass
    info["backend_info"] = {k: v for k, v in lbe_ops.backend_info().items() if k != "xla"}
    return info


def load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Reporting

def _fmt_ms(seconds):
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _fmt_ratio(value):
    return "-" if value is None else f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def table_rows(results):
    header = ["case", "shape", "dtype", "mode", "op ms", "graph ms", "xla ms", "harness ms",
              "graph/op", "xla/op", "floor ms", "op/floor"]
    rows = []
    for r in results:
        t, q = r["times"], r["ratios"]

        def ratio(key):
            text = _fmt_ratio(q.get(key))
            if q.get(key + " net") is not None:
                text += f" ({_fmt_ratio(q[key + ' net'])} net)"
            return text

        rows.append([
            r["case"], r["label"], r["dtype"], r["mode"],
            _fmt_ms(t.get("op", {}).get("median")),
            _fmt_ms(t.get("graph", {}).get("median")),
            _fmt_ms(t.get("xla", {}).get("median")),
            _fmt_ms(t.get("harness", {}).get("median")),
            ratio("graph/op"), ratio("xla/op"),
            _fmt_ms(r["floor_s"]), _fmt_ratio(q.get("op/floor")),
        ])
    return header, rows


def format_table(header, rows, markdown=False):
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def evaluate_targets(results, train):
    """The issue's targets, as measured in this run (None where the case was not run)."""
    def find(case, mode="fwdbwd", dtype="float32"):
        return next((r for r in results if r["case"] == case and r["mode"] == mode
                     and r["dtype"] == dtype), None)

    targets = []
    large = find("large")
    group = find("group-500")

    def add(name, value, goal, better):
        met = None if value is None else (value >= goal if better == "higher" else value <= goal)
        targets.append({"target": name, "value": value, "goal": goal, "better": better, "met": met})

    add("[1024, 4096] float32 fwd+bwd: graph composition / op >= 5",
        large and large["ratios"].get("graph/op"), 5.0, "higher")
    add("[1024, 4096] float32 fwd+bwd: XLA composition / op >= 2",
        large and large["ratios"].get("xla/op"), 2.0, "higher")
    add("[1024, 4096] float32 fwd+bwd: op / memory floor <= 2",
        large and large["ratios"].get("op/floor"), 2.0, "lower")
    add("500 x [32, 64] float32 fwd+bwd: graph composition / op >= 10 (net of the harness)",
        group and group["ratios"].get("graph/op net"), 10.0, "higher")
    add("500 x [32, 64] float32 fwd+bwd: graph composition / op >= 10 (raw)",
        group and group["ratios"].get("graph/op"), 10.0, "higher")
    add(f"{train['layers'] if train else 500}-layer width-"
        f"{train['width'] if train else 32} training step: LBE overhead (op) <= 10 %",
        train and train["overhead_op_percent"], 10.0, "lower")
    return targets


def write_chart(results, train, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["mode"] == "fwdbwd"] or list(results)
    labels = [f"{r['case']}\n{r['dtype']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(rows) + 4), 4.8),
                             gridspec_kw={"width_ratios": [3, 1.2]})
    ax = axes[0]
    xs = np.arange(len(rows))
    width = 0.38
    for k, (key, name) in enumerate((("graph/op", "vs graph composition"),
                                     ("xla/op", "vs XLA composition"))):
        vals = [r["ratios"].get(key) or 0 for r in rows]
        ax.bar(xs + (k - 0.5) * width, vals, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("speed-up of the op (x, log scale)")
    ax.set_title(f"lbe-bench: {rows[0]['mode'] if rows else ''} speed-up of the op")
    ax.legend(fontsize=8)

    ax = axes[1]
    floor_rows = [r for r in rows if r["ratios"].get("op/floor") is not None]
    ax.bar(range(len(floor_rows)), [r["ratios"]["op/floor"] for r in floor_rows], color="gray")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(floor_rows)))
    ax.set_xticklabels([f"{r['case']}\n{r['dtype']}" for r in floor_rows], fontsize=7)
    ax.set_ylabel("op time / memory floor")
    title = "op vs copy-bandwidth floor"
    if train:
        title += f"\ntrain step LBE overhead: op {train['overhead_op_percent']:.1f} %, " \
                 f"composition {train['overhead_graph_percent']:.0f} %, " \
                 f"fan-in {train['overhead_fan_in_percent']:.1f} %"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line

def _non_negative_seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def _fit_models(text):
    # bench_fit imports this module (round_orders), and Keras loads only when fit() runs.
    from lbe_ops import bench_fit
    try:
        return bench_fit.parse_fit_models(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="lbe-bench",
        description="Time the lbe_ops batch-entropy op against the pure-TensorFlow composition "
                    "(graph mode and XLA) and the machine's copy bandwidth.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="tiny shapes, few repetitions, a 10-layer training step (smoke run)")
    size.add_argument("--full", action="store_true", help="every case in every dtype")
    p.add_argument("--cases", help="comma-separated case names (or prefixes) to run; "
                   f"known: {', '.join(all_cases())}")
    p.add_argument("--dtypes", help=f"comma-separated dtypes ({', '.join(DTYPES)}); "
                   "overrides each case's dtype list")
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma-separated: fwd, fwdbwd")
    p.add_argument("--variants", default="op,graph,xla", help="comma-separated: op, graph, xla")
    p.add_argument("--min-time", type=_non_negative_seconds, default=None,
                   help="seconds of interleaved rounds per case and mode (default 2, quick 0.1)")
    p.add_argument("--train-layers", type=int, default=None,
                   help="depth of the training-step network (default 500, quick 10; 0: skip)")
    p.add_argument("--train-time", type=_non_negative_seconds, default=None,
                   help="seconds of interleaved rounds for the training step (default 15, quick "
                        "0.1): its variants differ by a few percent, about as much as the noise "
                        "of a few rounds on a shared VM")
    p.add_argument("--train-width", type=int, default=32)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--train-xla", action="store_true",
                   help="also time the training step compiled by XLA (slow to compile)")
    p.add_argument("--fit", type=_fit_models, default=None, metavar="MODELS",
                   help="comma-separated fit() models, 'all' or 'none' (default all, quick "
                        "mlp-10x16); known: mlp-500x32, mlp-100x64, cnn-30x16, mlp-10x16")
    p.add_argument("--fit-time", type=_non_negative_seconds, default=None,
                   help="seconds of interleaved fit() rounds per model (default 20, quick 0.1; "
                        "at least 5 rounds, quick 3)")
    p.add_argument("--fit-xla", action=argparse.BooleanOptionalAction, default=None,
                   help="also time plain and LBE fit() compiled by XLA (default on, off in "
                        "--quick; compiling the 500-layer LBE model takes minutes)")
    p.add_argument("--fit-only", action="store_true",
                   help="run only the fit() table: no kernel cases, no training step, no chart")
    p.add_argument("--allocator", choices=("default", "bfc"), default="default",
                   help="TensorFlow's CPU allocator: 'default' (what users get) or 'bfc' "
                        "(TF_CPU_ALLOCATOR_USE_BFC=true: keeps freed memory, so large outputs "
                        "do not page-fault on every call); must be chosen before TF runs an op")
    p.add_argument("--out", default="lbe-bench-results", help="output folder (JSON, table, PNG)")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    return p.parse_args(argv)


def _select_cases(args):
    cases = all_cases()
    chosen = QUICK_SET if args.quick else FULL_SET if args.full else STANDARD_SET
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
        names = [n for n in cases if any(n == w or n.startswith(w) for w in wanted)]
        unknown = [w for w in wanted if not any(n == w or n.startswith(w) for n in cases)]
        if unknown:
            raise SystemExit(f"lbe-bench: unknown case(s): {', '.join(unknown)}; "
                             f"known: {', '.join(cases)}")
        default_dtypes = dict(chosen)
        chosen = [(n, default_dtypes.get(n, ("float32",))) for n in names]
    if args.dtypes:
        dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            raise SystemExit(f"lbe-bench: unknown dtype(s): {', '.join(bad)}")
        chosen = [(n, dtypes) for n, _ in chosen]
    return [(cases[n], dts) for n, dts in chosen]


def _split_list(text, allowed, what):
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"lbe-bench: bad {what}: {text!r} (allowed: {', '.join(allowed)})")
    return items


def _copy_function(nbytes):
    """np.copyto of a buffer of nbytes: the memory-floor reference, timed among the variants."""
    n = max(int(nbytes) // 4, 16)
    src = np.random.default_rng(1).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)

    def copy():
        np.copyto(dst, src)
        return None

    return copy


def run_case(case, dtype, mode, variants, min_time, log, quick=False):
    inp = make_input(case, dtype)
    names = list(variants) + ["harness"]
    built = {v: build_function(case, mode, v) for v in names}
    fns = {v: (lambda f=built[v]: f(inp)) for v in names}
    nbytes = case.elements * tf.as_dtype(dtype).size
    # The copy runs in the same rotation as the variants, so it sees the same load.
    fns["copy"] = _copy_function(nbytes)
    times = time_interleaved(fns, min_time=min_time, **(_QUICK_TIMING if quick else {}))
    for v in names:
        times[v]["page_faults_per_call"] = page_faults_per_call(fns[v])
    copy_time = times.pop("copy")
    bandwidth = 2 * nbytes / copy_time["median"]  # bytes read + bytes written per second
    passes = 1 if mode == "fwd" else 3
    floor = passes * nbytes / bandwidth
    ratios = {}
    op = times.get("op", {}).get("median")
    for other in ("graph", "xla"):
        if op and other in times:
            ratios[f"{other}/op"] = times[other]["median"] / op
            if "harness" in times and other == "graph":  # the harness runs in graph mode
                h = times["harness"]["median"]
                net_op, net_other = op - h, times[other]["median"] - h
                ratios[f"{other}/op net"] = net_other / net_op if net_op > 0 else None
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
        f"{v} {_fmt_ms(times[v]['median'])} ms" for v in names) +
        f"  copy {_fmt_ms(copy_time['median'])} ms  " +
        "  ".join(f"{k} {_fmt_ratio(v)}" for k, v in ratios.items() if v is not None))
    return result


def run_train(layers, width, batch, min_time, with_xla, log, quick=False):
    variants = {"plain": dict(lbe="none"), "op": dict(lbe="op"), "graph": dict(lbe="graph"),
                "fan-in": dict(lbe="fan-in"), "op-forward": dict(lbe="op-forward")}
    if with_xla:
        variants.update({"plain_xla": dict(lbe="none", jit=True),
                         "xla": dict(lbe="graph", jit=True)})
    fns = {}
    for name, kw in variants.items():
        fns[name] = build_train_step(layers=layers, width=width, batch=batch, **kw)
    log(f"  training step: {layers} layers of width {width}, batch {batch}: tracing ...")
    times = time_interleaved(fns, min_time=min_time,
                             **(_QUICK_TIMING if quick else _TRAIN_TIMING))

    def overhead(variant, plain="plain"):
        return 100 * (times[variant]["median"] / times[plain]["median"] - 1)

    out = {
        "layers": layers, "width": width, "batch": batch, "times": times,
        "overhead_op_percent": overhead("op"),
        "overhead_graph_percent": overhead("graph"),
        "overhead_fan_in_percent": overhead("fan-in"),
        "overhead_op_forward_percent": overhead("op-forward"),
    }
    if with_xla:
        out["overhead_xla_percent"] = overhead("xla", plain="plain_xla")
    log(f"  {format_train_summary(out)}")
    return out


def format_train_summary(train):
    """One sentence on the training step: each variant's time and its overhead over plain."""
    times = train["times"]
    return (f"Training step ({train['layers']} layers of width {train['width']}, batch "
            f"{train['batch']}, SGD): without LBE {_fmt_ms(times['plain']['median'])} ms; with "
            f"LBE through the op {_fmt_ms(times['op']['median'])} ms "
            f"(+{train['overhead_op_percent']:.1f} %); with the composition "
            f"{_fmt_ms(times['graph']['median'])} ms (+{train['overhead_graph_percent']:.1f} %); "
            f"a loss term on every layer without LBE (fan-in: one add_n over all activations) "
            f"{_fmt_ms(times['fan-in']['median'])} ms (+{train['overhead_fan_in_percent']:.1f} %); "
            f"the op's forward alone (entropies held constant for the gradient) "
            f"{_fmt_ms(times['op-forward']['median'])} ms "
            f"(+{train['overhead_op_forward_percent']:.1f} %).")


def run_fit(models, fit_time, min_rounds, with_xla, log):
    """The fit() table's entries, one per model (lbe_ops.bench_fit)."""
    from lbe_ops import bench_fit
    variants = bench_fit.FIT_VARIANTS if with_xla else bench_fit.GRAPH_VARIANTS
    entries = [bench_fit.run_fit_model(m, variants, min_time=fit_time, min_rounds=min_rounds,
                                       log=log) for m in models]
    return {"method": bench_fit.FIT_METHOD, "fit_time_s": fit_time, "min_rounds": min_rounds,
            "variants": list(variants), "learning_rate": bench_fit.LEARNING_RATE,
            "models": entries}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.allocator == "bfc":
        # Read when TensorFlow creates its CPU allocator, at the first op it runs.
        os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    tf.get_logger().setLevel("ERROR")  # building many tf.functions is the point, not a mistake
    modes = _split_list(args.modes, MODES, "--modes")
    variants = _split_list(args.variants, VARIANTS, "--variants")
    if "op" not in variants:
        raise SystemExit("lbe-bench: --variants must include op (everything is compared to it)")
    min_time = args.min_time if args.min_time is not None else (0.1 if args.quick else 2.0)
    train_layers = args.train_layers if args.train_layers is not None else (
        10 if args.quick else 500)
    if args.fit is not None:
        fit_models = args.fit
    else:
        from lbe_ops import bench_fit
        fit_models = ([bench_fit.QUICK_FIT_MODEL] if args.quick
                      else list(bench_fit.STANDARD_FIT_MODELS))
    fit_time = args.fit_time if args.fit_time is not None else (0.1 if args.quick else 20.0)
    fit_xla = args.fit_xla if args.fit_xla is not None else not args.quick
    if args.fit_only:
        if args.cases or args.full:
            raise SystemExit("lbe-bench: --fit-only runs no kernel cases; drop --cases/--full")
        if not fit_models:
            raise SystemExit("lbe-bench: --fit-only with --fit none leaves nothing to run")
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
        fit = run_fit(fit_models, fit_time, 3 if args.quick else 5, fit_xla, log)
    load_after = load_average()
    targets = evaluate_targets(results, train) if not args.fit_only else []
    header, rows = table_rows(results)
    doc = {
        "version": RESULTS_VERSION,
        "command": "lbe-bench " + " ".join(sys.argv[1:] if argv is None else argv),
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
        "results": results, "train_step": train, "targets": targets, "fit": fit,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    md = []
    if results:
        md.append(format_table(header, rows, markdown=True))
    if train:
        md.append(format_train_summary(train))
    if fit:
        from lbe_ops import bench_fit
        md.append(bench_fit.format_fit_table(fit["models"]) + "\n\n" + bench_fit.FIT_METHOD)
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
    for t in targets:
        if t["value"] is None:
            status = "not run"
        else:
            status = ("met" if t["met"] else "NOT met") + f" ({t['value']:.2f})"
        print(f"target: {t['target']}: {status}")
    if targets:
        print()
    print(f"load average before {load_before}, after {load_after}; results in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
