"""pytest-benchmark suite for the CPU op: the op against pure TensorFlow, graph mode and XLA.

    pytest benchmarks/test_bench_cpu.py                                  # timings (minutes)
    pytest benchmarks/test_bench_cpu.py --benchmark-group-by=group       # one table per case
    pytest benchmarks/test_bench_cpu.py --benchmark-json=out.json        # machine-readable
    LBE_BENCH_QUICK=1 pytest benchmarks/test_bench_cpu.py --benchmark-disable -q   # smoke (CI)

The cases, inputs and timed functions are lbe-bench's (lbe_ops/bench/), so both tools time the
same thing; lbe-bench adds the interleaved rounds, the copy-bandwidth floor, the training step
and the report. Each benchmark group is one (case, dtype, mode) with the variants op, tf and
xla side by side. test_fit times one keras fit() epoch of mlp-100x64 (lbe_ops/bench/fit.py)
without LBE and through wrap() with the op: one benchmark round is a whole fit() call (40 steps,
plus fit()'s start and end), and extra_info holds that call's median step time; lbe-bench's fit
table gives the steady-state step times. LBE_BENCH_QUICK=1 keeps to tiny shapes, a 10-layer
training step and the fit() of a 10-layer model; with
--benchmark-disable every function runs once, which is the smoke run
tests/commands/test_bench_smoke.py does. Nothing here asserts a timing: the only checks are that
every variant runs and returns a finite entropy.
"""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import lbe_ops  # noqa: E402
from lbe_ops import bench  # noqa: E402

QUICK = os.environ.get("LBE_BENCH_QUICK", "") not in ("", "0")

if QUICK:
    _CASES = [("tiny", "float32"), ("group-20", "float32")]
    _TRAIN_LAYERS = 10
    _FIT_MODEL = "mlp-10x16"
else:
    _CASES = [(name, dtype) for name, dtypes in bench.STANDARD_SET for dtype in dtypes]
    _TRAIN_LAYERS = 500
    _FIT_MODEL = "mlp-100x64"

pytestmark = pytest.mark.benchmark


@pytest.fixture(scope="module", autouse=True)
def _require_op():
    info = lbe_ops.backend_info()
    if info["backend"] != "op":
        pytest.skip(f"the compiled op is not available ({info['reason']})")


def _finite_entropy(outputs):
    import tensorflow as tf
    first = tf.nest.flatten(outputs)[0]
    values = tf.cast(first, tf.float64).numpy()
    return bool(np.all(np.isfinite(values)))


@pytest.mark.parametrize("variant", bench.VARIANTS)
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("case_name,dtype", _CASES, ids=[f"{c}-{d}" for c, d in _CASES])
def test_batch_entropy(benchmark, case_name, dtype, mode, variant):
    case = bench.all_cases()[case_name]
    inp = bench.make_input(case, dtype)
    fn = bench.build_function(case, mode, variant)
    bench.block(fn(inp))  # trace (and compile, for XLA) outside the timing
    benchmark.group = f"{case_name} {case.label()} {dtype} {mode}"
    benchmark.extra_info.update({"case": case_name, "shape": case.label(), "dtype": dtype,
                                 "mode": mode, "variant": variant, "elements": case.elements})
    outputs = benchmark(lambda: fn(inp))
    assert _finite_entropy(outputs)


@pytest.mark.parametrize("lbe", ["none", "op", "tf", "fan-in", "op-forward"])
def test_train_step(benchmark, lbe):
    step = bench.build_train_step(layers=_TRAIN_LAYERS, lbe=lbe)
    step()  # trace outside the timing
    benchmark.group = f"train step, {_TRAIN_LAYERS} layers of width 32, batch 128"
    benchmark.extra_info.update({"layers": _TRAIN_LAYERS, "lbe": lbe})
    loss = benchmark(step)
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("variant", ["plain", "op"])
def test_fit(benchmark, variant):
    import statistics

    from lbe_ops.bench import fit as bench_fit

    run = bench_fit.build_fit_model(_FIT_MODEL, variant)
    run.fit()  # traces outside the timing
    spec = run.spec
    benchmark.group = f"fit() epoch, {spec.description}, {spec.steps} steps"
    step_times = []

    def one_epoch():
        step_times.append(statistics.median(run.step_times()))
        return run.last_loss

    loss = benchmark.pedantic(one_epoch, rounds=1 if QUICK else 7, iterations=1)
    benchmark.extra_info.update({
        "model": spec.name, "variant": variant, "steps_per_epoch": spec.steps,
        "batch": spec.batch, "step_ms_median": 1e3 * statistics.median(step_times),
        "lbe_op_in_graph": run.lbe_op_in_graph()})
    assert np.isfinite(loss)
    assert run.lbe_op_in_graph() in (variant == "op", None)
