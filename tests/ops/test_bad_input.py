"""Bad input gets a clear error naming the problem, on both backends and from the raw ops: values
the op cannot take (rank, zero units, dtype), options of the wrong kind (ddof, same_batch,
allow_small_batch) and arguments of the wrong kind (a list where a tensor belongs, ragged and
sparse tensors). A batch too small for ddof: test_small_batch.py.
"""

import numpy as np
import pytest
import tensorflow as tf

import lbe_ops
from lbe_ops import _loader
from oracle64 import entropy as np_entropy

BACKENDS = ["op", "tf"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value, error, match", [
    (np.ones((5,), np.float32), ValueError, "rank >= 2"),
    (np.float32(3.0), ValueError, "rank >= 2"),
    (np.ones((4, 0), np.float32), ValueError, "zero units"),
    (np.ones((4, 3, 0), np.float32), ValueError, "zero units"),
    (np.ones((4, 3), np.int32), TypeError, "int32"),
    (np.ones((4, 3), np.complex64), TypeError, "complex64"),
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


def test_batch_entropies_needs_a_list():
    with pytest.raises(ValueError, match="at least one"):
        lbe_ops.batch_entropies([])
    with pytest.raises(TypeError, match="list or tuple"):
        lbe_ops.batch_entropies(tf.ones([4, 3]))


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


def test_same_batch_checks():
    x, y = tf.ones([4, 3]), tf.ones([7, 3])
    for backend in BACKENDS:
        with lbe_ops.use_backend(backend):
            with pytest.raises(TypeError, match="same_batch must be True or False"):
                lbe_ops.batch_entropies([x, x], same_batch=1)
            with pytest.raises(ValueError, match=r"same_batch=True, but the batch sizes of xs "
                                                 r"differ: xs\[0\] 4, xs\[1\] 7"):
                lbe_ops.batch_entropies([x, y], same_batch=True)
    with pytest.raises(ValueError, match="same_batch=True"):
        lbe_ops.reference.batch_entropies([x, y], same_batch=True)

    def promised(a, b):
        return lbe_ops.batch_entropies([a, b], same_batch=True)

    signature = [tf.TensorSpec([None, 3], tf.float32)] * 2
    y = tf.constant(np.random.default_rng(0).standard_normal((7, 3)), tf.float32)
    with lbe_ops.use_backend("op"):  # the op takes any batches
        np.testing.assert_allclose(tf.function(promised, input_signature=signature)(y[:4], y),
                                   lbe_ops.batch_entropies([y[:4], y]), rtol=1e-6)
    with lbe_ops.use_backend("tf"), pytest.raises(tf.errors.InvalidArgumentError):
        tf.function(promised, input_signature=signature)(y[:4], y)


def test_allow_small_batch_must_be_a_bool():
    x = np.ones((4, 3), np.float32)
    for bad in (1, "yes", None, tf.constant(True)):
        with pytest.raises(TypeError, match="allow_small_batch"):
            lbe_ops.batch_entropy(x, allow_small_batch=bad)
        with pytest.raises(TypeError, match="allow_small_batch"):
            lbe_ops.reference.batch_entropies([x], allow_small_batch=bad)
    assert float(lbe_ops.batch_entropy(x, allow_small_batch=np.bool_(True))) == 0.0


# ---- argument kinds ---------------------------------------------------------------------------

def _ragged():
    return tf.RaggedTensor.from_row_lengths(tf.range(10, dtype=tf.float32), [4, 1, 5])


def _sparse():
    return tf.sparse.from_dense(tf.eye(300))


def _single_callers():
    return {"batch_entropy": lbe_ops.batch_entropy,
            "batch_entropy_moments": lbe_ops.batch_entropy_moments,
            "reference.batch_entropy": lbe_ops.reference.batch_entropy}


def _group_callers():
    return {"batch_entropies": lbe_ops.batch_entropies,
            "reference.batch_entropies": lbe_ops.reference.batch_entropies}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["list of tensors", "tuple of arrays", "list of variables",
                                  "nested list of tensors"])
def test_a_list_of_tensors_points_at_batch_entropies(rng, backend, kind):
    a = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal((4, 3)).astype(np.float32)
    value = {"list of tensors": [tf.constant(a), tf.constant(b)],
             "tuple of arrays": (a, b),
             "list of variables": [tf.Variable(a), tf.Variable(b)],
             "nested list of tensors": [[tf.constant(a[0])], [tf.constant(b[0])]]}[kind]
    with lbe_ops.use_backend(backend):
        for fn in _single_callers().values():
            with pytest.raises(TypeError, match=r"^x is a (list|tuple) of tensors or arrays.*"
                                                r"lbe_ops\.batch_entropies"):
                fn(value)
        for fn in _group_callers().values():
            with pytest.raises(TypeError, match=r"^xs\[1\] is a (list|tuple) of tensors"):
                fn([a, value])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_lists_of_numbers_are_still_an_array(rng, backend):
    data = rng.standard_normal((6, 3))
    with lbe_ops.use_backend(backend):
        h = lbe_ops.batch_entropy(data.tolist())
        hs = lbe_ops.batch_entropies([data.tolist(), data.astype(np.float32)])
    assert h.dtype == tf.float32 and hs.dtype == tf.float32  # as tf.constant(list) gives
    np.testing.assert_allclose(float(h), np_entropy(data.astype(np.float32)), rtol=2e-5)
    np.testing.assert_allclose(hs.numpy(), [float(h)] * 2, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make, kind, advice", [
    (_ragged, "tf.RaggedTensor", r"\.to_tensor\(\)"),
    (_sparse, "tf.SparseTensor", r"tf\.sparse\.to_dense\("),
], ids=["ragged", "sparse"])
def test_ragged_and_sparse_inputs_get_an_error_naming_the_argument(backend, make, kind, advice):
    value = make()
    accepted = r"a dense float tensor \[batch, units\.\.\.\]"
    with lbe_ops.use_backend(backend):
        for fn in _single_callers().values():
            with pytest.raises(TypeError, match=rf"^x is a {kind}") as info:
                fn(value)
            assert len(str(info.value)) < 400  # names the tensor, does not print it
        for fn in _group_callers().values():
            with pytest.raises(TypeError, match=rf"^xs\[1\] is a {kind}.*{accepted}.*{advice}"):
                fn([tf.ones([4, 3]), value])
            with pytest.raises(TypeError, match=rf"^xs must be a list or tuple of tensors, got "
                                                rf"{kind.split('.')[1]}$"):
                fn(value)


def test_batch_entropies_of_one_tensor_points_at_batch_entropy():
    with pytest.raises(TypeError, match=r"got EagerTensor; for the entropy of one tensor use "
                                        r"lbe_ops\.batch_entropy\(x\)"):
        lbe_ops.batch_entropies(tf.ones([4, 3]))




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
