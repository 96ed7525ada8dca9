"""Bad input gets a clear error naming the problem, on both backends and from the raw ops."""

import numpy as np
import pytest
import tensorflow as tf

import lbe_ops
from lbe_ops import _loader

BACKENDS = ["op", "tf"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value, error, match", [
    (np.ones((1, 4), np.float32), ValueError, "batch of 1"),
    (np.ones((5,), np.float32), ValueError, "rank >= 2"),
    (np.float32(3.0), ValueError, "rank >= 2"),
    (np.ones((4, 0), np.float32), ValueError, "zero units"),
    (np.ones((4, 3, 0), np.float32), ValueError, "zero units"),
    (np.ones((4, 3), np.int32), TypeError, "int32"),
    (np.ones((4, 3), np.complex64), TypeError, "complex64"),
    (np.ones((0, 3), np.float32), ValueError, "batch of 0"),
])
def test_static_bad_input(backend, value, error, match):
    with lbe_ops.use_backend(backend):
        with pytest.raises(error, match=match):
            lbe_ops.batch_entropy(value)
        with pytest.raises(error, match=match):
            lbe_ops.batch_entropies([np.ones((4, 3), np.float32), value])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ddof", [-1, 1.5, True, "1"])
def test_bad_ddof(backend, ddof):
    with lbe_ops.use_backend(backend), pytest.raises(ValueError, match="ddof"):
        lbe_ops.batch_entropy(np.ones((4, 3), np.float32), ddof=ddof)


def test_ddof_needs_a_larger_batch():
    with pytest.raises(ValueError, match="ddof=2 needs a batch of at least 3"):
        lbe_ops.batch_entropy(np.ones((2, 3), np.float32), ddof=2)


def test_batch_entropies_needs_a_list():
    with pytest.raises(ValueError, match="at least one"):
        lbe_ops.batch_entropies([])
    with pytest.raises(TypeError, match="list or tuple"):
        lbe_ops.batch_entropies(tf.ones([4, 3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_batch_of_one_is_an_op_error(backend):
    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def fn(x):
        return lbe_ops.batch_entropy(x)

    with lbe_ops.use_backend(backend):
        with pytest.raises(tf.errors.InvalidArgumentError, match="batch"):
            fn(tf.ones([1, 3]))
        assert np.isfinite(float(fn(tf.ones([2, 3]))))


def test_dynamic_rank_and_units_are_op_errors():
    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)])
    def fn(x):
        return lbe_ops.batch_entropy(x)

    with pytest.raises(tf.errors.InvalidArgumentError, match="rank >= 2"):
        fn(tf.ones([7]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="zero units"):
        fn(tf.ones([7, 0, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch of 1"):
        fn(tf.ones([1, 5, 3]))


class TestRawOps:
    """The raw ops validate on their own: no input may crash the process."""

    @property
    def ops(self):
        return _loader.op_module()

    def test_forward(self):
        with pytest.raises(tf.errors.InvalidArgumentError, match="x has a batch of 1"):
            self.ops.lbe_batch_entropy(tf.ones([1, 4]))
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="rank"):
            self.ops.lbe_batch_entropy(tf.ones([4]))
        # Eager finds no kernel for the pair; graph mode's shape function explains the rule.
        with pytest.raises((tf.errors.InvalidArgumentError, tf.errors.NotFoundError, ValueError),
                           match="Tstats"):
            self.ops.lbe_batch_entropy(tf.ones([4, 3], tf.float64), Tstats=tf.float32)
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"xs\[1\] has zero units"):
            self.ops.lbe_batch_entropies([tf.ones([4, 3]), tf.ones([4, 0])])
        with pytest.raises((TypeError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError)):
            self.ops.lbe_batch_entropy(tf.ones([4, 3], tf.int32))

    def test_gradient_shapes(self):
        x = tf.ones([4, 3])
        stats = tf.ones([3])
        bad = tf.ones([2])
        g = tf.constant(1.0)
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
            self.ops.lbe_batch_entropy_grad(x, bad, stats, g, stats, stats, [stats])
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
            self.ops.lbe_batch_entropy_grad(x, stats, stats, tf.ones([2]), stats, stats, [stats])
        flat = tf.ones([6])  # the statistics of [x, x], one after another
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):  # grad_entropies: [2]
            self.ops.lbe_batch_entropies_grad([x, x], flat, flat, tf.ones([3]), flat, flat, [flat])
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):  # means: [6]
            self.ops.lbe_batch_entropies_grad([x, x], stats, flat, tf.ones([2]), flat, flat, [flat])
        dx = self.ops.lbe_batch_entropies_grad([x, x], flat, flat, tf.ones([2]), tf.zeros([0]),
                                               flat, [tf.zeros([0])])
        assert [d.shape for d in dx] == [x.shape, x.shape]

    def test_grouped_gradient_shapes_at_run_time(self):
        @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)] * 4)
        def fn(x, y, means, grad_means):
            return self.ops.lbe_batch_entropies_grad([x, y], means, means, tf.ones([2]),
                                                     grad_means, tf.zeros([0]), [grad_means])

        x, flat = tf.ones([4, 3]), tf.ones([6])
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"means must have shape \[6\]"):
            fn(x, x, tf.ones([3]), flat)
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"grad_means must have shape \[6\] \(or \[0\] for none"):
            fn(x, x, flat, tf.ones([5]))
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"xs\[1\] has a batch of 1"):
            fn(x, tf.ones([1, 3]), flat, flat)
        assert len(fn(x, tf.ones([2, 3]), flat, flat)) == 2

    def test_mean_residual_shape(self):
        x, stats = tf.ones([4, 3]), tf.ones([3])
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"mean_residual must have shape \[3\] \(or \[0\] for none\)"):
            self.ops.lbe_batch_entropy_grad(x, stats, stats, tf.constant(1.0), stats, stats,
                                            [tf.ones([2])])
        flat = tf.ones([6])
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"mean_residuals must have shape \[6\]"):
            self.ops.lbe_batch_entropies_grad([x, x], flat, flat, tf.ones([2]), flat, flat, [stats])

    def test_gradient_shapes_at_run_time(self):
        @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)] * 2)
        def fn(x, mean):
            return self.ops.lbe_batch_entropy_grad(x, mean, mean, tf.constant(1.0), mean, mean, [mean])

        with pytest.raises(tf.errors.InvalidArgumentError, match=r"mean must have shape \[3\]"):
            fn(tf.ones([4, 3]), tf.ones([5]))
