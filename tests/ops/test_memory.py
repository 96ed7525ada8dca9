"""Memory and size: no memory growth over 10,000 calls (RSS), and inputs of more than 2**31
elements (marked slow: run with LBE_OPS_RUN_SLOW=1; about 11 GB of memory and minutes)."""

import gc
import os

import numpy as np
import pytest
import tensorflow as tf

import lbe_ops
from oracle64 import PI_E


@pytest.mark.slow  # 10000 calls
def test_no_memory_growth_over_10000_calls():
    """10,000 eager calls (forward and gradient), then 2,000 grouped calls and 2,000 calls of a
    tf.function, after a warmup: the process's resident memory may not grow by more than 16 MB.
    Leaking one input (64 KB) per call would be 640 MB; the bound catches ~1 KB per call."""
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    rng = np.random.default_rng(11)
    x = tf.constant(rng.standard_normal((64, 256)), tf.float32)
    xs = [tf.constant(rng.standard_normal((64, 100)), tf.float16),
          tf.constant(rng.standard_normal((64, 10, 3)), tf.float16)]

    def single_step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = lbe_ops.batch_entropy(x)
        return tape.gradient(h, x)

    def group_step():
        with tf.GradientTape() as tape:
            tape.watch(xs)
            hs = lbe_ops.batch_entropies(xs)
        return tape.gradient(hs, xs)

    @tf.function
    def graph_step(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            h, mean, var = lbe_ops.batch_entropy_moments(v, ddof=0)
            loss = h + tf.reduce_sum(var)
        return tape.gradient(loss, v)

    graph = graph_step.get_concrete_function(x).graph
    assert {"Lbe>BatchEntropy", "Lbe>BatchEntropyGrad"} <= {op.type for op in graph.get_operations()}
    first = [single_step(), *group_step(), graph_step(x)]
    for _ in range(500):
        single_step(), group_step(), graph_step(x)
    gc.collect()
    before = process.memory_info().rss
    for _ in range(10_000):
        last_single = single_step()
    for _ in range(2_000):
        last_group = group_step()
        last_graph = graph_step(x)
    gc.collect()
    growth = process.memory_info().rss - before
    for a, b in zip(first, [last_single, *last_group, last_graph]):  # still the same results
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert growth < 16 * 2 ** 20, f"RSS grew by {growth / 2 ** 20:.1f} MB over 14,000 calls"


# ---- more than 2**31 elements -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LBE_OPS_RUN_SLOW") != "1",
                    reason="needs ~11 GB of memory and minutes: set LBE_OPS_RUN_SLOW=1")
def test_more_than_2_31_elements():
    """A bfloat16 input of 2**31 + 366 elements (float32's exponent range keeps its gradient,
    ~1e-9, representable). Each row gets its own offset, so a wrapped 32-bit index would read or
    write the wrong rows and change the statistics; the rows past element 2**31 are checked
    one by one against a chunked float64 reference."""
    units = 999  # not a multiple of any vector width
    batch = 2 ** 31 // units + 1
    assert batch * units > 2 ** 31
    bf16 = tf.bfloat16.as_numpy_dtype
    rng = np.random.default_rng(31)
    unit_offset = rng.uniform(-2, 2, units).astype(np.float32)
    chunk = 1 << 15
    # Made in chunks and concatenated (8 GB for a moment), so that the input then exists once
    # (4 GB), and so does its gradient; numpy only ever sees chunks.
    parts = []
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        trend = (np.arange(start, stop, dtype=np.float32) / batch * 6.0)[:, None]
        block = rng.standard_normal((stop - start, units), dtype=np.float32)
        parts.append(tf.constant((block + trend + unit_offset).astype(bf16)))
    x = tf.concat(parts, axis=0)
    del parts

    with tf.GradientTape() as tape:
        tape.watch(x)
        h, mean, var = lbe_ops.batch_entropy_moments(x)
    grad = tape.gradient(h, x)
    del tape
    h_group = lbe_ops.batch_entropies([x])[0]

    def chunks(tensor):
        for start in range(0, batch, chunk):
            yield tensor[start:start + chunk].numpy().astype(np.float64)

    total = np.zeros(units)
    for values in chunks(x):
        total += values.sum(axis=0)
    mean_ref = total / batch
    m2 = np.zeros(units)
    for values in chunks(x):
        m2 += ((values - mean_ref) ** 2).sum(axis=0)
    var_ref = m2 / (batch - 1)
    h_ref = 0.5 * np.log1p(PI_E * var_ref).mean()

    np.testing.assert_allclose(float(tf.cast(h, tf.float64)), h_ref, rtol=1e-2)
    np.testing.assert_allclose(float(tf.cast(h_group, tf.float64)), h_ref, rtol=1e-2)
    np.testing.assert_allclose(mean.numpy(), mean_ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(var.numpy(), var_ref, rtol=1e-4)

    k = PI_E / (units * (batch - 1) * (PI_E * var_ref + 1))
    scale = np.abs(k).max() * 12.0
    worst = 0.0
    for values, got in zip(chunks(x), chunks(grad)):  # every row, those past element 2**31 too
        expected = k * (values - mean_ref)
        worst = max(worst, np.abs(got - expected).max() / scale)
        assert np.all(np.isfinite(got))
    assert worst < 2e-2, f"max |dx - ref| / scale = {worst:.3g}"
