"""Smoke test of the benchmarks: lbe-bench in its quickest mode, the pytest-benchmark suite with
timing disabled, scripts/time_loop.py and the core-only benchmarks/core_bench.cc. Benchmarks are
not tests: nothing here looks at a timing, only that the tools run and write well-formed output."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "test_bench_cpu.py"


def _env():
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["MPLBACKEND"] = "Agg"
    return env


def test_round_orders_permute_and_vary_the_predecessor():
    """Each round runs every function once; over many rounds every function follows every other
    one (a fixed order had always put the op right after the copy)."""
    from itertools import islice

    from lbe_ops.bench import round_orders

    names = ["op", "tf", "xla", "harness", "copy"]
    orders = list(islice(round_orders(names), 200))
    assert all(sorted(o) == sorted(names) for o in orders)
    followed = {(a, b) for o in orders for a, b in zip(o, o[1:])}
    assert followed == {(a, b) for a in names for b in names if a != b}
    assert orders == list(islice(round_orders(names), 200))  # seeded: repeatable


def test_train_summary_signs_its_overheads():
    """A negative overhead (noise, or a faster variant) prints as -8.1 %, not +-8.1 %."""
    from lbe_ops.bench.train_step import format_train_summary

    times = {v: {"median": m} for v, m in (("plain", 0.010), ("op", 0.00919), ("tf", 0.020),
                                           ("fan-in", 0.011), ("op-forward", 0.0105))}
    train = {"layers": 500, "width": 32, "batch": 128, "times": times,
             "overhead_op_percent": -8.1, "overhead_tf_percent": 100.0,
             "overhead_fan_in_percent": 10.0, "overhead_op_forward_percent": 5.0}
    text = format_train_summary(train)
    assert "(-8.1 %)" in text and "(+100.0 %)" in text and "+-" not in text
    assert "pure TensorFlow 20.00 ms" in text


def test_fit_table():
    from lbe_ops.bench import fit as bench_fit

    times = {v: {"median": m} for v, m in (("plain", 0.010), ("op", 0.0125), ("tf", 0.020))}
    entry = bench_fit.summarize_fit("mlp-100x64", times)
    assert entry["overhead_op_percent"] == pytest.approx(25.0)
    assert entry["overhead_tf_percent"] == pytest.approx(100.0)
    assert entry["tf_over_op"] == pytest.approx(1.6)
    assert entry["overhead_lbe_xla_percent"] is None
    table = bench_fit.format_fit_table([entry]).splitlines()
    assert table[0] == ("| model | plain ms | op ms | tf ms | tf/op | plain-xla ms | "
                        "lbe-xla ms |")
    assert table[2] == "| mlp-100x64 (batch 32) | 10.00 | 12.50 (+25 %) | 20.00 (+100 %) | " \
                       "1.60x | - | - |"


def test_fit_variants_on_a_gpu_time_the_op_against_xla():
    """Where a GPU is visible (here: injected), the fit table is plain and wrap() with
    jit_compile=False and under XLA, also in --quick; on CPU it stays as it was."""
    import tensorflow as tf

    from lbe_ops.bench import fit as bench_fit
    from lbe_ops.bench.cli import fit_variants
    from lbe_ops_cli import parse_bench_args

    gpus = [tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")]
    for argv, on_cpu, on_gpu in [
            ([], bench_fit.FIT_VARIANTS, bench_fit.GPU_VARIANTS),
            (["--quick"], bench_fit.GRAPH_VARIANTS, bench_fit.GPU_VARIANTS),
            (["--no-fit-xla"], bench_fit.GRAPH_VARIANTS, ("plain", "op")),
            (["--quick", "--fit-xla"], bench_fit.FIT_VARIANTS, bench_fit.GPU_VARIANTS)]:
        args = parse_bench_args(argv)
        assert fit_variants(args, []) == on_cpu
        assert fit_variants(args, gpus) == on_gpu
    assert bench_fit.GPU_VARIANTS == ("plain", "op", "plain-xla", "lbe-xla")


def test_fit_jit_summary_says_which_way_is_faster():
    from lbe_ops.bench import fit as bench_fit

    times = {v: {"median": m} for v, m in (("plain", 0.010), ("op", 0.0125),
                                           ("plain-xla", 0.008), ("lbe-xla", 0.010))}
    entry = bench_fit.summarize_fit("mlp-100x64", times)
    entry["auto_jit_compile"] = {v: True for v in times}
    assert entry["lbe_xla_over_op"] == pytest.approx(0.8) and entry["tf_over_op"] is None
    assert bench_fit.format_jit_summary([entry]) == (
        'mlp-100x64: jit_compile="auto" resolves to XLA here; wrap() per step with '
        "jit_compile=False (the op) 12.50 ms, under XLA (the composition) 10.00 ms: XLA 1.25x "
        "faster")
    del times["lbe-xla"]
    assert bench_fit.format_jit_summary([bench_fit.summarize_fit("mlp-100x64", times)]) == ""


def _check_fit_section(fit, variants):
    """The fit section of results.json: finite times for every variant, the overheads as
    defined, the op in the op variant's train function and in no other."""
    import math

    assert fit["variants"] == list(variants) and fit["models"]
    for entry in fit["models"]:
        times = entry["times"]
        assert set(times) == set(variants)
        for t in times.values():
            assert all(math.isfinite(t[k]) and t[k] > 0 for k in ("median", "p25", "p75"))
            assert t["p25"] <= t["median"] <= t["p75"] and t["rounds"] >= 3
            assert t["steps_per_fit"] == entry["steps_per_epoch"] >= 2
        plain, op, tf_ = (times[v]["median"] for v in ("plain", "op", "tf"))
        assert entry["overhead_op_percent"] == pytest.approx(100 * (op / plain - 1))
        assert entry["overhead_tf_percent"] == pytest.approx(100 * (tf_ / plain - 1))
        assert entry["tf_over_op"] == pytest.approx(tf_ / op)
        if "lbe-xla" in variants:
            assert entry["overhead_lbe_xla_percent"] == pytest.approx(
                100 * (times["lbe-xla"]["median"] / times["plain-xla"]["median"] - 1))
        else:
            assert entry["overhead_lbe_xla_percent"] is None
        # None would mean Keras' trainer changed so that the graph cannot be read any more.
        assert entry["lbe_op_in_graph"] == {v: v == "op" for v in variants}
        assert entry["auto_jit_compile"] == {v: False for v in variants}  # a CPU-only machine
        assert all(math.isfinite(loss) for loss in entry["last_loss"].values())


@pytest.mark.slow  # runs a benchmark command end to end
def test_lbe_bench_quick_writes_json_table_and_chart(tmp_path):
    out = tmp_path / "bench"
    # -m runs bench_main(), as the lbe-bench console script does; from tmp_path, so the lbe_ops
    # imported is the one under test (installed, or on PYTHONPATH), not a source tree.
    proc = subprocess.run(
        [sys.executable, "-m", "lbe_ops.bench", "--quick", "--out", str(out)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "op ms" in proc.stdout and "tf ms" in proc.stdout
    assert "target" not in proc.stdout and "+-" not in proc.stdout

    doc = json.loads((out / "results.json").read_text())
    assert doc["version"] == 2 and doc["command"].startswith("lbe-bench --quick")
    assert doc["machine"]["logical_cpus"] >= 1 and doc["machine"]["tensorflow"]
    assert doc["copy_bandwidth_256mib_gbps"] > 0
    assert doc["results"], "no benchmark results"
    seen = set()
    for r in doc["results"]:
        seen.add((r["case"], r["mode"]))
        assert r["floor_s"] > 0 and r["bytes"] > 0
        for variant in ("op", "tf", "xla", "harness"):
            t = r["times"][variant]
            assert t["median"] > 0 and t["min"] <= t["median"] and t["rounds"] >= 1
        assert r["copy"]["median"] > 0 and r["copy_bandwidth_gbps"] > 0
        assert set(r["ratios"]) >= {"tf/op", "xla/op", "op/floor"}
    assert {("tiny", "fwd"), ("tiny", "fwdbwd"), ("group-20", "fwdbwd")} <= seen
    train = doc["train_step"]
    assert train["layers"] == 10 and set(train["times"]) == {"plain", "op", "tf", "fan-in",
                                                          "op-forward"}
    assert train["overhead_fan_in_percent"] == pytest.approx(
        100 * (train["times"]["fan-in"]["median"] / train["times"]["plain"]["median"] - 1))
    assert train["overhead_op_forward_percent"] == pytest.approx(
        100 * (train["times"]["op-forward"]["median"] / train["times"]["plain"]["median"] - 1))
    assert train["overhead_tf_percent"] == pytest.approx(
        100 * (train["times"]["tf"]["median"] / train["times"]["plain"]["median"] - 1))
    assert "targets" not in doc
    fit = doc["fit"]  # --quick: the tiny model, without the XLA pair
    assert [m["model"] for m in fit["models"]] == ["mlp-10x16"]
    _check_fit_section(fit, ("plain", "op", "tf"))
    assert "| mlp-10x16 (batch 16) |" in proc.stdout

    table = (out / "results.md").read_text()
    assert table.startswith("| case |") and "group-20" in table
    assert "| model | plain ms | op ms | tf ms | tf/op |" in table
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


@pytest.mark.slow  # runs a benchmark command end to end
def test_lbe_bench_fit_only_with_xla(tmp_path):
    """--fit-only: the fit table alone (no kernel cases, training step or chart), here
    with the XLA pair, whose first fit() compiles."""
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "lbe_ops.bench", "--quick", "--fit-only", "--fit-xla",
         "--out", str(out)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "target:" not in proc.stdout and "NOT met" not in proc.stdout
    doc = json.loads((out / "results.json").read_text())
    assert doc["results"] == [] and doc["train_step"] is None
    _check_fit_section(doc["fit"], ("plain", "op", "tf", "plain-xla", "lbe-xla"))
    table = (out / "results.md").read_text()
    assert table.startswith("| model | plain ms |") and "| mlp-10x16 (batch 16) |" in table
    assert not (out / "results.png").exists()


@pytest.mark.slow  # runs a benchmark command end to end
@pytest.mark.skipif(not SUITE.exists(), reason="benchmarks/ is not part of this checkout")
def test_benchmark_suite_smoke(tmp_path):
    env = _env()
    env["LBE_BENCH_QUICK"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(SUITE), "--benchmark-disable", "-q",
         "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


TIME_LOOP = REPO / "scripts" / "time_loop.py"


@pytest.mark.slow  # runs a benchmark command end to end
@pytest.mark.skipif(not TIME_LOOP.exists(), reason="scripts/ is not part of this checkout")
def test_time_loop_script_prints_its_timings(tmp_path):
    """scripts/time_loop.py (plain-loop timings and A/B comparisons): one case in a plain loop, and the training step plain against LBE through the op."""
    case = subprocess.run(
        [sys.executable, str(TIME_LOOP), "case", "group-20", "--seconds", "0.2"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert case.returncode == 0, case.stdout[-3000:] + case.stderr[-3000:]
    assert re.fullmatch(r"group-20 fwdbwd op: \d+\.\d{3} ms/call\n", case.stdout)
    train = subprocess.run(
        [sys.executable, str(TIME_LOOP), "train", "--layers", "3", "--seconds", "0.2"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert re.fullmatch(r"plain \d+\.\d\d ms, op \d+\.\d\d ms, overhead -?\d+\.\d %\n",
                        train.stdout)
    for what, variants in (("tiny", ("op", "tf", "xla", "harness", "copy")),
                           ("train", ("plain", "op", "tf", "fan-in"))):
        proc = subprocess.run(
            [sys.executable, str(TIME_LOOP), "after", what, "--seconds", "0.5", "--layers", "3"],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        lines = proc.stdout.splitlines()
        assert [line.split()[0] for line in lines] == list(variants), proc.stdout
        assert all(re.search(r"after \S+: \d+\.\d{3} ms", line) for line in lines), proc.stdout
    unknown = subprocess.run(
        [sys.executable, str(TIME_LOOP), "case", "no-such-case"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert unknown.returncode != 0 and "unknown case 'no-such-case'" in unknown.stderr


@pytest.mark.slow  # runs a benchmark command end to end
@pytest.mark.skipif(not shutil.which("cmake"), reason="needs cmake")
def test_core_bench_builds_and_runs(tmp_path):
    """benchmarks/core_bench.cc (the CPU core alone, for kernel A/Bs) through its CMake target."""
    build = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(build), "-DLBE_OPS_WITH_TF=OFF",
         "-DLBE_OPS_WITH_PYBIND=OFF", "-DLBE_OPS_CUDA=0", f"-DLBE_OPS_OUTPUT_DIR={tmp_path}"],
        capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compile_ = subprocess.run(["cmake", "--build", str(build), "--target", "lbe_core_bench", "-j2"],
                              capture_output=True, text=True, timeout=600)
    assert compile_.returncode == 0, compile_.stdout[-3000:] + compile_.stderr[-3000:]
    bench = build / "lbe_core_bench"
    # A narrow group with a scalar tail, two copies, two threads.
    proc = subprocess.run([str(bench), "5", "40", "33", "2", "0.05", "2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^isa (avx2|generic), 2 thread\(s\), 5 x \[40, 33\] float32", proc.stdout, re.M)
    for name in ("forward", "backward"):
        match = re.search(rf"^{name} +([0-9.]+) ms per call \(min ([0-9.]+)\)", proc.stdout, re.M)
        assert match and 0 <= float(match.group(2)) <= float(match.group(1)), proc.stdout
    bad = subprocess.run([str(bench), "5", "1", "33"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "B >= 2" in bad.stderr
