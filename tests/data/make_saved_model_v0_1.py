"""Writes tests/data/saved_model_v0_1: a SavedModel holding the Lbe> ops as lbe-ops 0.1.0 wrote
them (three forward outputs, six gradient inputs), for tests/packaging/test_saved_model.py.

Run with lbe-ops 0.1.0 (commit a447151) importable, from the repository root:

    python tests/data/make_saved_model_v0_1.py
"""

import os

import tensorflow as tf

import lbe_ops

SPEC = tf.TensorSpec([None, 5], tf.float32)


class Module(tf.Module):
    @tf.function(input_signature=[SPEC])
    def entropy(self, x):
        return lbe_ops.batch_entropy(x)

    @tf.function(input_signature=[SPEC])
    def entropy_grad(self, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = lbe_ops.batch_entropy(x)
        return tape.gradient(h, x)

    @tf.function(input_signature=[SPEC, SPEC])
    def group(self, a, b):
        return lbe_ops.batch_entropies([a, b])


if __name__ == "__main__":
    tf.saved_model.save(Module(), os.path.join(os.path.dirname(__file__), "saved_model_v0_1"))
