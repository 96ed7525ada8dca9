"""Threads: many threads calling the op get the results of one, use_backend is per thread, and
a first load raced by many threads loads the library once."""

import concurrent.futures
import threading

import numpy as np
import pytest
import tensorflow as tf

import lbe_ops
from fresh_process import last_json_line, run_python

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]


def _thread_inputs():
    rng = np.random.default_rng(3)
    shapes = [(64, 33), (7, 3, 5), (300, 17), (2, 1), (129, 64), (40, 2, 2, 8)]
    inputs = []
    for i in range(24):
        dtype = DTYPES[i % 4]
        data = rng.standard_normal(shapes[i % len(shapes)]) * (i + 1) + 10.0 * i
        inputs.append((tf.cast(tf.constant(data), dtype), i % 2))
    return inputs


def _entropy_grad_and_group(x, ddof):
    with tf.GradientTape() as tape:
        tape.watch(x)
        h = lbe_ops.batch_entropy(x, ddof=ddof)
        hs = lbe_ops.batch_entropies([x, x[:, :1]], ddof=ddof)
        loss = h + hs[1]
    grad = tape.gradient(loss, x)
    return (tf.cast(h, tf.float64).numpy().tobytes() + tf.cast(hs, tf.float64).numpy().tobytes()
            + tf.cast(grad, tf.float64).numpy().tobytes())


def test_many_threads_get_the_results_of_one():
    """16 threads calling the op at once (eager and one shared tf.function) give bitwise the
    results of one thread calling it alone."""
    inputs = _thread_inputs()
    expected = [_entropy_grad_and_group(x, d) for x, d in inputs]

    @tf.function(reduce_retracing=True)
    def shared(v):
        return lbe_ops.batch_entropy(v, ddof=1)

    shared_expected = [shared(x).numpy().tobytes() for x, _ in inputs]
    start = threading.Barrier(16)

    def work(worker):
        start.wait()
        out = []
        for k in range(len(inputs)):
            i = (k + worker) % len(inputs)  # every thread walks the inputs in another order
            x, ddof = inputs[i]
            out.append((i, _entropy_grad_and_group(x, ddof), shared(x).numpy().tobytes()))
        return out

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(work, range(16)))
    for per_thread in results:
        for i, got, got_shared in per_thread:
            assert got == expected[i], f"input {i} differs when computed concurrently"
            assert got_shared == shared_expected[i]


def test_use_backend_is_per_thread():
    """Threads tracing with use_backend('tf') and with the op at the same time each get their own
    choice."""
    x = tf.random.normal([8, 4])
    start = threading.Barrier(8)

    def trace(worker):
        backend = "tf" if worker % 2 else "op"

        @tf.function
        def f(v):
            return lbe_ops.batch_entropy(v)

        start.wait()
        with lbe_ops.use_backend(backend):
            ops = {op.type for op in f.get_concrete_function(x).graph.get_operations()}
        return backend, any(t.startswith("Lbe>") for t in ops)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for backend, uses_op in pool.map(trace, range(8)):
            assert uses_op == (backend == "op")


@pytest.mark.slow  # a fresh Python process
def test_first_load_raced_by_many_threads():
    """In a fresh process whose import did not load the library (LBE_OPS_BACKEND=tf then), 16
    threads ask for the op at the same moment: one load, no warning, equal results."""
    out = last_json_line(run_python("""
        import json, threading, warnings
        import numpy as np, tensorflow as tf
        loads = []
        real_load = tf.load_op_library
        def counting_load(path):
            loads.append(path)
            return real_load(path)
        tf.load_op_library = counting_load
        import lbe_ops
        assert loads == []
        x = tf.constant(np.random.default_rng(0).standard_normal((50, 7)), tf.float32)
        start = threading.Barrier(16)
        results, backends = [None] * 16, [None] * 16
        def work(i):
            start.wait()
            with lbe_ops.use_backend("auto"):
                results[i] = float(lbe_ops.batch_entropy(x))
                backends[i] = lbe_ops.backend_info()["backend"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
            [t.start() for t in threads]
            [t.join() for t in threads]
        print(json.dumps({"loads": len(loads), "results": results, "backends": backends,
                          "warnings": [str(w.message) for w in caught if "lbe_ops" in str(w.message)]}))
    """, LBE_OPS_BACKEND="tf"))
    assert out["loads"] == 1
    assert out["warnings"] == []
    assert set(out["backends"]) == {"op"}
    assert len(set(out["results"])) == 1
