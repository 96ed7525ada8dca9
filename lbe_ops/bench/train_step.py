"""The training-step benchmark: one SGD step of a deep plain ReLU network, without and with LBE.

Variants (the `lbe` argument of build_train_step; default 500 layers of width 32, batch 128):

    plain       no LBE
    op          LBE through lbe_ops.batch_entropies on every layer's activation (the op)
    tf          the same, pure TensorFlow (backend "tf")
    fan-in      the same loss on one tf.add_n over all activations instead of their entropies:
                what it adds is the cost of any loss term on every layer in TensorFlow's tape
                (one gradient sum per layer), the part of the overhead that no op can remove
    op-forward  the op's forward, with the entropies held constant for the gradient: the
                forward op's share of the overhead
    plain-xla, lbe-xla (optional)  plain and LBE compiled by XLA (LBE is pure TensorFlow there)

The LBE overhead is (with - without) / without. Steps are timed in rounds of several steps of one
variant after an untimed one (timing.TRAIN_STEP_ROUNDS: the steady state of a training loop).
"""

import math

import numpy as np
import tensorflow as tf

import lbe_ops
from lbe_ops.bench.report import fmt_ms
from lbe_ops.bench.timing import QUICK_ROUNDS, TRAIN_STEP_ROUNDS, time_interleaved

LBE_MODES = ("none", "op", "tf", "fan-in", "op-forward")


def build_train_step(layers=500, width=32, batch=128, classes=10, lbe="none", seed=0, jit=False):
    """A function running one SGD step of a plain ReLU network and returning its loss; lbe is
    'none', 'op' (the compiled op), 'tf' (pure TensorFlow), 'fan-in' or 'op-forward'.

    The LBE loss is the paper's, computed by LBEModel's code: task + task * mean_l beta * (H_l -
    max(alpha_min, |alpha_l|))^2, with one learnable alpha per layer, every layer's entropy from
    one batch_entropies call.
    'fan-in' puts the same loss on a stand-in for the entropies, one tf.add_n over all
    activations: every activation read once by one op, and a gradient that costs nothing
    itself. What it adds to the step is what any loss term on every layer costs in TensorFlow's
    tape: each activation's gradient becomes a sum of two (one AddN per layer).
    'op-forward' computes the entropies with the op but holds them constant for the gradient
    (tf.stop_gradient): the loss value of 'op', without the gradient op and without the per-layer
    gradient sums, so that op - op-forward is what the gradient op and its fan-in add.
    """
    if lbe not in LBE_MODES:
        raise ValueError(f"unknown lbe {lbe!r}; known: {', '.join(LBE_MODES)}")
    from lbe_ops.keras import _loss, _steps  # LBEModel's loss, which imports Keras
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
                lbe_mean = tf.reduce_mean(_loss.penalties(h, alpha, alpha_min, beta))
                loss = _steps.combine(task, lbe_mean, additive=False)
        grads = tape.gradient(loss, variables)
        for v, g in zip(variables, grads):
            v.assign_sub(lr * g)
        return loss

    fn = tf.function(step, jit_compile=jit, autograph=False)
    backend = "tf" if lbe == "tf" else "op"

    def call():
        with lbe_ops.use_backend(backend):
            return fn(x, y)

    return call


def run_train(layers, width, batch, min_time, with_xla, log, quick=False):
    """Builds and times every variant of the training step; returns the results.json entry
    (times and each variant's overhead over plain, in percent) and logs its summary."""
    variants = {"plain": dict(lbe="none"), "op": dict(lbe="op"), "tf": dict(lbe="tf"),
                "fan-in": dict(lbe="fan-in"), "op-forward": dict(lbe="op-forward")}
    if with_xla:
        variants.update({"plain-xla": dict(lbe="none", jit=True),
                         "lbe-xla": dict(lbe="tf", jit=True)})
    fns = {name: build_train_step(layers=layers, width=width, batch=batch, **kw)
           for name, kw in variants.items()}
    log(f"  training step: {layers} layers of width {width}, batch {batch}: tracing ...")
    times = time_interleaved(fns, min_time=min_time,
                             **(QUICK_ROUNDS if quick else TRAIN_STEP_ROUNDS))

    def overhead(variant, plain="plain"):
        return 100 * (times[variant]["median"] / times[plain]["median"] - 1)

    out = {
        "layers": layers, "width": width, "batch": batch, "times": times,
        "overhead_op_percent": overhead("op"),
        "overhead_tf_percent": overhead("tf"),
        "overhead_fan_in_percent": overhead("fan-in"),
        "overhead_op_forward_percent": overhead("op-forward"),
    }
    if with_xla:
        out["overhead_lbe_xla_percent"] = overhead("lbe-xla", plain="plain-xla")
    log(f"  {format_train_summary(out)}")
    return out


def format_train_summary(train):
    """One paragraph on the training step: each variant's time and its overhead over plain."""
    times = train["times"]

    def part(variant, key):
        return f"{fmt_ms(times[variant]['median'])} ms ({train[key]:+.1f} %)"

    text = (f"Training step ({train['layers']} layers of width {train['width']}, batch "
            f"{train['batch']}, SGD): without LBE {fmt_ms(times['plain']['median'])} ms; with "
            f"LBE through the op {part('op', 'overhead_op_percent')}; with LBE in pure "
            f"TensorFlow {part('tf', 'overhead_tf_percent')}; a loss term on every layer "
            f"without LBE (fan-in: one add_n over all activations) "
            f"{part('fan-in', 'overhead_fan_in_percent')}; the op's forward alone (entropies "
            f"held constant for the gradient) {part('op-forward', 'overhead_op_forward_percent')}")
    if "overhead_lbe_xla_percent" in train:
        text += (f"; under XLA, without LBE {fmt_ms(times['plain-xla']['median'])} ms, with "
                 f"LBE {part('lbe-xla', 'overhead_lbe_xla_percent')}")
    return text + "."
