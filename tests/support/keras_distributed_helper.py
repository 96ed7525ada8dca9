"""Runs LBEModel under tf.distribute.MirroredStrategy on two logical CPU devices.

Run by tests/keras/test_keras_distributed.py in a fresh process (logical devices must be
configured before TensorFlow initialises). Prints one JSON line with what the test checks.
"""

import json
import warnings
import math
import os
import sys

import tensorflow as tf

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import lbe_ops.keras as lk  # noqa: E402

SETTINGS = [(0.3, 0.8, 1), (0.2, 1.2, 0)]  # alpha_min, beta, ddof of the two hidden layers
BATCH = 32


def build(**options):
    keras.utils.set_random_seed(7)
    inputs = keras.Input((6,))
    h = inputs
    for alpha_min, beta, ddof in SETTINGS:
        regularizer = lk.LBERegularizer(alpha=1.5, alpha_min=alpha_min, beta=beta, ddof=ddof)
        h = keras.layers.Dense(8, activation="tanh", activity_regularizer=regularizer)(h)
    model = lk.LBEModel(inputs, keras.layers.Dense(3)(h), **options)
    model.compile(keras.optimizers.SGD(1.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def float64_loss(x, y, weights, additive, replicas):
    """Sum over replicas of the per-replica LBE loss that Keras scales by 1/replicas."""
    k1, b1, a1, k2, b2, a2, k3, b3 = weights
    total = tf.constant(0.0, tf.float64)
    for xs, ys in zip(np.split(x, replicas), np.split(y, replicas)):
        h1 = tf.tanh(xs @ k1 + b1)
        h2 = tf.tanh(h1 @ k2 + b2)
        task = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(ys, h2 @ k3 + b3))
        terms = []
        for h, alpha, (alpha_min, beta, ddof) in zip((h1, h2), (a1, a2), SETTINGS):
            n = tf.cast(tf.shape(h)[0], tf.float64)
            var = tf.reduce_sum(tf.square(h - tf.reduce_mean(h, 0)), 0) / (n - ddof)
            entropy = tf.reduce_mean(0.5 * tf.math.log1p(math.pi * math.e * var))
            terms.append(beta * tf.square(entropy - tf.maximum(tf.abs(alpha), alpha_min)))
        lbe = tf.add_n(terms) / len(terms)
        total += (task + lbe if additive else task * (1 + lbe)) / replicas
    return total


def parameters(model):
    """kernel, bias, alpha of each hidden layer, then the head's kernel and bias (float64)."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    values = []
    for layer in dense[:-1]:
        values += [layer.kernel, layer.bias, layer.activity_regularizer.alpha]
    values += [dense[-1].kernel, dense[-1].bias]
    return [np.asarray(keras.ops.convert_to_numpy(v), np.float64) for v in values]


def float64_step(model, x, y, additive, replicas):
    variables = [tf.Variable(w) for w in parameters(model)]
    with tf.GradientTape() as tape:
        loss = float64_loss(tf.constant(x, tf.float64), y, variables, additive, replicas)
    return [(v - g).numpy() for v, g in zip(variables, tape.gradient(loss, variables))]


def max_diff(model, expected):
    return max(float(np.abs(w - e).max()) for w, e in zip(parameters(model), expected))


def main():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((BATCH, 6)) * 2 + 0.5).astype(np.float32)
    y = rng.integers(0, 3, BATCH)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync}

    single = build()
    out["single_eval"] = single.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)
    features = keras.Model(single.inputs, [layer.output for layer in single.layers[1:3]])
    acts = [a.numpy().astype(np.float64) for a in features(x)]
    halves = []
    for act, (_, _, ddof) in zip(acts, SETTINGS):
        halves.append([])
        for part in np.split(act, 2):
            var = ((part - part.mean(0)) ** 2).sum(0) / (len(part) - ddof)
            halves[-1].append(float(0.5 * np.log1p(math.pi * math.e * var).mean()))
    out["half_entropies"] = halves

    for additive in (False, True):
        tag = "additive" if additive else "multiplicative"
        with strategy.scope():
            cross = build(cross_replica=True, additive=additive)
            local = build(cross_replica=False, additive=additive)
        out[f"{tag}_cross_eval"] = cross.evaluate(x, y, batch_size=BATCH, verbose=0,
                                                  return_dict=True)
        out[f"{tag}_local_eval"] = local.evaluate(x, y, batch_size=BATCH, verbose=0,
                                                  return_dict=True)
        expected_global = float64_step(cross, x, y, additive, replicas=1)
        expected_local = float64_step(local, x, y, additive, replicas=2)
        alpha_before = [float(r.alpha.numpy()) for r in cross.lbe_regularizers]
        history = cross.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
        local.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
        out[f"{tag}_cross_step_error"] = max_diff(cross, expected_global)
        out[f"{tag}_local_step_error"] = max_diff(local, expected_local)
        out[f"{tag}_local_vs_global"] = max_diff(local, expected_global)
        out[f"{tag}_fit_keys"] = sorted(history.history)
        out[f"{tag}_alpha_change"] = [
            abs(float(r.alpha.numpy()) - a) for r, a in zip(cross.lbe_regularizers, alpha_before)]
        alphas = cross.lbe_alphas
        out[f"{tag}_alpha_is_mirrored"] = "Mirrored" in type(
            getattr(alphas, "value", alphas)).__name__
    # Uneven last batches: 65 samples leave a global batch of one (one replica gets nothing),
    # 66 leave one sample per replica.
    for samples in (65, 66):
        for cross_replica in (False, True):
            with strategy.scope():
                model = build(cross_replica=cross_replica)
            xs = np.concatenate([x, x, x])[:samples]
            ys = np.concatenate([y, y, y])[:samples]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                history = model.fit(xs, ys, batch_size=64, epochs=2, verbose=0, shuffle=False)
                logs = model.evaluate(xs, ys, batch_size=64, verbose=0, return_dict=True)
            out[f"uneven_{samples}_{cross_replica}"] = {
                "finite": bool(all(np.isfinite(history.history["loss"]))
                               and all(np.isfinite(list(logs.values())))
                               and all(np.all(np.isfinite(w)) for w in model.get_weights())),
                "warned": sum("too few for a batch variance" in str(w.message) for w in caught),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
