"""The per-step time of keras `Model.fit()` without and with LBE: what a user of lbe_ops feels.

    from lbe_ops.bench import fit
    runs = fit.build_fit_models("mlp-100x64", ("plain", "op", "tf"))
    times = fit.time_fit(runs, min_time=20)
    print(fit.format_fit_table([fit.summarize_fit("mlp-100x64", times)]))

lbe-bench runs this as its fit table (`--fit`, `--fit-time`, `--fit-xla`, `--fit-only`); see
lbe_ops/bench/cli.py. Variants of one model, each a freshly built model with the same seed and
architecture (wrap() shares layers with the model it wraps, so no two variants share one):

    plain      keras.Sequential, compiled normally (jit_compile=False)
    op         lbe_ops.keras.wrap(model) with the compiled op (backend "op")
    tf         the same wrap(), traced inside use_backend("tf"): pure TensorFlow
    plain-xla  plain, compile(jit_compile=True)
    lbe-xla    wrap(), compile(jit_compile=True): under XLA lbe_ops is pure TensorFlow

On a GPU, compile()'s default jit_compile="auto" resolves to XLA: there wrap() runs the pure-TF
composition, and the CUDA kernels run only with jit_compile=False. Which of the two is faster
decides what a GPU user should be given, so on a GPU lbe-bench times GPU_VARIANTS: plain and
wrap() with jit_compile=False (the op) and under XLA (the composition), in one run; each entry
records what "auto" resolves to (auto_jit_compile) and lbe-xla / op.

All with keras.optimizers.SGD and SparseCategoricalCrossentropy(from_logits=True), on random
data from a seeded numpy generator, a whole number of batches per epoch.

Timing: every variant is warmed up by one fit() call (it traces, and XLA compiles). Then come
interleaved rounds; in each, every variant (in a fresh seeded order, timing.round_orders) runs one
`fit(x, y, batch_size, epochs=1, verbose=0, shuffle=False)` with a callback that records
time.perf_counter() at each on_train_batch_end. A round's per-step time is the median of the
differences between consecutive batch ends: that leaves out the first step of each fit() call
(which follows another variant's fit) and fit()'s own start and end. The figure is the median over
rounds of these per-round medians (p25 and p75 kept too); rounds continue until `min_time`
seconds have passed and at least `min_rounds` are done.

The callback defines on_train_batch_end, so Keras runs the callbacks synchronously (as it does
for any such callback, e.g. a progress bar); the step it times is the data iterator's next batch,
the train function and the callback dispatch, identical for all variants.
"""

import math
import statistics
import time

import numpy as np

from lbe_ops.bench.report import fmt_ms, fmt_ratio
from lbe_ops.bench.timing import quartiles, round_orders

FIT_VARIANTS = ("plain", "op", "tf", "plain-xla", "lbe-xla")
GRAPH_VARIANTS = ("plain", "op", "tf")
XLA_VARIANTS = ("plain-xla", "lbe-xla")
GPU_VARIANTS = ("plain", "op") + XLA_VARIANTS
LEARNING_RATE = 1e-4  # small: hundreds of fit() epochs of a 500-layer ReLU stack stay finite


class FitModel:
    """One benchmarked architecture: `depth` hidden layers, then Dense(classes)."""

    def __init__(self, name, kind, depth, width, input_shape, batch, steps=40, classes=10,
                 description=""):
        self.name = name
        self.kind = kind  # "mlp": Dense(width, relu); "cnn": Conv2D(width, 3, same, relu)
        self.depth = depth
        self.width = width
        self.input_shape = tuple(input_shape)
        self.batch = batch
        self.steps = steps
        self.classes = classes
        self.description = description

    def as_dict(self):
        return {"model": self.name, "kind": self.kind, "depth": self.depth, "width": self.width,
                "input_shape": list(self.input_shape), "batch": self.batch,
                "steps_per_epoch": self.steps, "classes": self.classes,
                "description": self.description}


FIT_MODELS = {m.name: m for m in (
    FitModel("mlp-500x32", "mlp", 500, 32, (32,), 128,
             description="keras.Input((32,)), 500 x Dense(32, relu), Dense(10); batch 128"),
    FitModel("mlp-100x64", "mlp", 100, 64, (64,), 32,
             description="keras.Input((64,)), 100 x Dense(64, relu), Dense(10); batch 32"),
    FitModel("cnn-30x16", "cnn", 30, 16, (16, 16, 1), 64,
             description="keras.Input((16, 16, 1)), 30 x Conv2D(16, 3, same, relu), "
                         "GlobalAveragePooling2D, Dense(10); batch 64"),
    FitModel("mlp-10x16", "mlp", 10, 16, (16,), 16, steps=20,
             description="keras.Input((16,)), 10 x Dense(16, relu), Dense(10); batch 16 "
                         "(the smoke run's model)"),
)}
STANDARD_FIT_MODELS = ("mlp-500x32", "mlp-100x64", "cnn-30x16")
QUICK_FIT_MODEL = "mlp-10x16"


def _spec(model):
    if isinstance(model, FitModel):
        return model
    try:
        return FIT_MODELS[model]
    except KeyError:
        raise ValueError(f"unknown fit model {model!r}; known: {', '.join(FIT_MODELS)}") from None


def fit_variants(with_xla, gpus):
    """The variants lbe-bench times: GPU_VARIANTS where GPUs are visible (`gpus`, as
    tf.config.list_physical_devices("GPU") lists them), else FIT_VARIANTS; the XLA pair only
    with_xla."""
    variants = GPU_VARIANTS if gpus else FIT_VARIANTS
    return variants if with_xla else tuple(v for v in variants if v not in XLA_VARIANTS)


# --------------------------------------------------------------------------------------------
# Building

def fit_data(model, seed=0):
    """(x, y): `steps` batches of standard-normal inputs and uniform labels, from a seeded
    numpy generator (the same for every variant)."""
    spec = _spec(model)
    rng = np.random.default_rng(seed)
    n = spec.steps * spec.batch
    x = rng.standard_normal((n,) + spec.input_shape, dtype=np.float32)
    y = rng.integers(0, spec.classes, n).astype(np.int32)
    return x, y


def build_plain_model(model, seed=0):
    """The Sequential model without LBE, with seeded He-normal (hidden) and Glorot (head)
    weights: every call with the same seed builds the same weights."""
    import keras

    spec = _spec(model)
    layers = [keras.Input(spec.input_shape)]
    for i in range(spec.depth):
        init = keras.initializers.HeNormal(seed=seed * 100003 + i)
        if spec.kind == "mlp":
            layers.append(keras.layers.Dense(spec.width, activation="relu",
                                             kernel_initializer=init))
        else:
            layers.append(keras.layers.Conv2D(spec.width, 3, padding="same", activation="relu",
                                              kernel_initializer=init))
    if spec.kind == "cnn":
        layers.append(keras.layers.GlobalAveragePooling2D())
    layers.append(keras.layers.Dense(
        spec.classes, kernel_initializer=keras.initializers.GlorotUniform(
            seed=seed * 100003 + spec.depth)))
    return keras.Sequential(layers, name=f"{spec.name.replace('-', '_')}")


class FitRun:
    """One variant: its compiled model, the data, and the backend block its fit() calls run in."""

    def __init__(self, model_spec, variant, model, x, y, backend):
        self.spec = model_spec
        self.variant = variant
        self.model = model
        self.x = x
        self.y = y
        self.backend = backend
        self.last_loss = None
        self.auto_jit_compile = auto_jit_compile(model)

    def fit(self, callbacks=()):
        """One epoch of model.fit() (unshuffled, silent), inside this variant's backend block;
        returns the History."""
        import lbe_ops

        with lbe_ops.use_backend(self.backend):
            history = self.model.fit(self.x, self.y, batch_size=self.spec.batch, epochs=1,
                                     verbose=0, shuffle=False, callbacks=list(callbacks))
        self.last_loss = float(history.history["loss"][-1])
        return history

    def step_times(self):
        """One fit() call: the differences between consecutive batch ends, in seconds."""
        timer = step_timer()
        self.fit([timer])
        return timer.step_times()

    def lbe_op_in_graph(self):
        """Whether the traced train function contains a Lbe> op (True for 'op', False for pure
        TensorFlow); None if it cannot be told (not traced yet, or Keras internals changed)."""
        return lbe_op_in_train_function(self.model)


def build_fit_model(model, variant, seed=0):
    """A FitRun of one variant of one model: a freshly built, compiled model (never shared)."""
    import keras

    spec = _spec(model)
    if variant not in FIT_VARIANTS:
        raise ValueError(f"unknown fit variant {variant!r}; known: {', '.join(FIT_VARIANTS)}")
    net = build_plain_model(spec, seed=seed)
    if variant in ("op", "tf", "lbe-xla"):
        import lbe_ops.keras as lbe_keras

        net = lbe_keras.wrap(net)
    net.compile(optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=variant in XLA_VARIANTS)
    # The backend is fixed when fit() traces; every call runs in the same block, so a retrace
    # would take the same path. 'auto' (the default users get) for the variants without a choice:
    # under XLA it is pure TensorFlow.
    backend = {"op": "op", "tf": "tf"}.get(variant, "auto")
    x, y = fit_data(spec, seed=seed)
    return FitRun(spec, variant, net, x, y, backend)


def build_fit_models(model, variants=FIT_VARIANTS, seed=0):
    """{variant: FitRun} for one model, each variant its own freshly built model."""
    return {v: build_fit_model(model, v, seed=seed) for v in variants}


def auto_jit_compile(model):
    """What compile(jit_compile="auto") makes of `model` on this machine: True for XLA (Keras:
    an accelerator is visible, no distribution strategy, every layer supports_jit); None if
    Keras' internals changed (lbe_ops.keras._compat.resolve_auto_jit_compile)."""
    from lbe_ops.keras import _compat
    return _compat.resolve_auto_jit_compile(model)


def lbe_op_in_train_function(model):
    """True if the model's traced train function runs a Lbe> op, False if not, None if unknown.

    Reads Keras 3's TensorFlow trainer from outside (lbe_ops.keras._compat.train_tf_functions),
    so it answers None rather than fail if that changes."""
    try:
        from lbe_ops import _tf_compat
        from lbe_ops.keras import _compat

        concrete = [cf for f in _compat.train_tf_functions(model)
                    for cf in _tf_compat.concrete_functions(f)]
        if not concrete:
            return None
        for cf in concrete:
            graph_def = cf.graph.as_graph_def()
            nodes = list(graph_def.node)
            for fn in graph_def.library.function:
                nodes += list(fn.node_def)
            if any(node.op.startswith("Lbe>") for node in nodes):
                return True
        return False
    except Exception:  # noqa: BLE001 - a diagnostic: unknown, not an error
        return None


# --------------------------------------------------------------------------------------------
# Timing

_STEP_TIMER_CLASS = None


def step_timer():
    """A new Keras callback recording time.perf_counter() at each on_train_batch_end; its
    step_times() are the differences between consecutive batch ends. (The class is made on first
    use, so that this module loads without Keras.)"""
    global _STEP_TIMER_CLASS
    if _STEP_TIMER_CLASS is None:
        import keras

        class StepTimer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.batch_ends = []

            def on_train_batch_end(self, batch, logs=None):
                self.batch_ends.append(time.perf_counter())

            def step_times(self):
                return [b - a for a, b in zip(self.batch_ends, self.batch_ends[1:])]

        _STEP_TIMER_CLASS = StepTimer
    return _STEP_TIMER_CLASS()


def time_fit(runs, min_time=20.0, min_rounds=5, max_rounds=500, seed=0, log=None):
    """Steady-state seconds per fit() step of each FitRun, in interleaved rounds.

    Each run is warmed up by one fit() call first. Returns {variant: {"median", "p25", "p75",
    "min", "max", "rounds", "steps_per_fit", "per_round", "warmup_s"}}: the statistics over
    rounds of the per-round medians of the step-to-step times.
    """
    names = list(runs)
    warmup = {}
    for name in names:
        t0 = time.perf_counter()
        runs[name].fit()  # traces (and compiles, under XLA)
        warmup[name] = time.perf_counter() - t0
        if log:
            log(f"    {name}: first fit() call (tracing) {warmup[name]:.1f} s")
    samples = {name: [] for name in names}
    steps = {}
    orders = round_orders(names, seed=seed)
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < min_time
                                  and rounds < max_rounds):
        for name in next(orders):
            diffs = runs[name].step_times()
            if not diffs:
                raise ValueError(f"{name}: a fit() call of one step has no step-to-step time; "
                                 "the benchmark needs at least 2 steps per epoch")
            steps[name] = len(diffs) + 1
            samples[name].append(statistics.median(diffs))
        rounds += 1
    result = {}
    for name in names:
        s = samples[name]
        p25, p75 = quartiles(s)
        result[name] = {"median": statistics.median(s), "p25": p25, "p75": p75, "min": min(s),
                        "max": max(s), "rounds": len(s), "steps_per_fit": steps[name],
                        "per_round": s, "warmup_s": warmup[name]}
    return result


# --------------------------------------------------------------------------------------------
# Results

def _overhead_percent(times, variant, base):
    ratio = _ratio(times, variant, base)
    return None if ratio is None else 100.0 * (ratio - 1.0)


def summarize_fit(model, times, runs=None):
    """One model's fit-table entry: the times, the LBE overheads (with / plain - 1, in %) and
    the op's speed-up over pure TensorFlow (tf / op); with `runs`, whether each traced train
    function holds a Lbe> op and each variant's last training loss."""
    spec = _spec(model)
    out = dict(spec.as_dict())
    out["times"] = times
    out["overhead_op_percent"] = _overhead_percent(times, "op", "plain")
    out["overhead_tf_percent"] = _overhead_percent(times, "tf", "plain")
    out["overhead_lbe_xla_percent"] = _overhead_percent(times, "lbe-xla", "plain-xla")
    out["tf_over_op"] = _ratio(times, "tf", "op")
    out["lbe_xla_over_op"] = _ratio(times, "lbe-xla", "op")
    if runs is not None:
        out["lbe_op_in_graph"] = {name: run.lbe_op_in_graph() for name, run in runs.items()}
        out["last_loss"] = {name: run.last_loss for name, run in runs.items()}
        out["auto_jit_compile"] = {name: run.auto_jit_compile for name, run in runs.items()}
    return out


def _ratio(times, variant, base):
    if variant in times and base in times:
        return times[variant]["median"] / times[base]["median"]
    return None


def run_fit_model(model, variants=FIT_VARIANTS, min_time=20.0, min_rounds=5, seed=0, log=None):
    """Builds, warms up and times every variant of one model; returns summarize_fit's entry."""
    spec = _spec(model)
    if log:
        log(f"  fit(): {spec.description}, {spec.steps} steps per epoch, variants "
            f"{', '.join(variants)}")
    runs = build_fit_models(spec, variants, seed=seed)
    times = time_fit(runs, min_time=min_time, min_rounds=min_rounds, seed=seed, log=log)
    entry = summarize_fit(spec, times, runs)
    bad = [v for v, loss in entry["last_loss"].items() if loss is None or not math.isfinite(loss)]
    if bad and log:
        log(f"    warning: the training loss of {', '.join(bad)} is not finite; their step "
            "times may not be representative")
    if log:
        log("    " + "  ".join(f"{v} {fmt_ms(times[v]['median'])} ms" for v in variants))
    return entry


FIT_TABLE_HEADER = ["model", "plain ms", "op ms", "tf ms", "tf/op", "plain-xla ms", "lbe-xla ms"]


def _with_overhead(times, variant, overhead):
    if variant not in times:
        return "-"
    text = fmt_ms(times[variant]["median"])
    return text if overhead is None else f"{text} ({overhead:+.0f} %)"


def format_fit_table(entries):
    """The fit table in markdown: ms per fit() step (median over rounds), each LBE variant's
    overhead over its plain counterpart, and the op's speed-up over pure TensorFlow."""
    lines = ["| " + " | ".join(FIT_TABLE_HEADER) + " |",
             "|" + "|".join(" --- " for _ in FIT_TABLE_HEADER) + "|"]
    for e in entries:
        t = e["times"]
        row = [
            f"{e['model']} (batch {e['batch']})",
            _with_overhead(t, "plain", None),
            _with_overhead(t, "op", e["overhead_op_percent"]),
            _with_overhead(t, "tf", e["overhead_tf_percent"]),
            fmt_ratio(e["tf_over_op"]),
            _with_overhead(t, "plain-xla", None),
            _with_overhead(t, "lbe-xla", e["overhead_lbe_xla_percent"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_jit_summary(entries):
    """One line per entry timed both ways: what compile()'s default jit_compile="auto" resolves
    to, and wrap()'s step with jit_compile=False (the op) against under XLA (the composition)."""
    lines = []
    for e in entries:
        ratio = e.get("lbe_xla_over_op")
        if ratio is None:
            continue
        auto = (e.get("auto_jit_compile") or {}).get("op")
        resolved = {True: "XLA", False: "jit_compile=False"}.get(auto, "unknown")
        faster = (f"XLA {1 / ratio:.2f}x faster" if ratio < 1 else
                  f"jit_compile=False {ratio:.2f}x faster")
        t = e["times"]
        lines.append(
            f"{e['model']}: jit_compile=\"auto\" resolves to {resolved} here; wrap() per step "
            f"with jit_compile=False (the op) {fmt_ms(t['op']['median'])} ms, under XLA (the "
            f"composition) {fmt_ms(t['lbe-xla']['median'])} ms: {faster}")
    return "\n".join(lines)


FIT_METHOD = ("ms per model.fit() step: one warm-up fit() per variant, then interleaved rounds "
              "(a fresh seeded order per round), each one fit() of one epoch per variant; a "
              "round's step time is the median of the differences between consecutive "
              "on_train_batch_end times (fit()'s first step and its start and end left out); "
              "the figure is the median over rounds. Overheads: with LBE / without - 1 (op and "
              "tf over plain, lbe-xla over plain-xla).")
