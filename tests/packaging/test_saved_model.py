"""A SavedModel that uses the op, loaded in a fresh process after `import lbe_ops`, and what
happens without the import."""

import os

import numpy as np
import pytest
import tensorflow as tf

import lbe_ops
from oracle64 import PI_E, moments as np_moments
from fresh_process import last_json_line, run_python


class EntropyModule(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, 6, 5], tf.float32)])
    def moments(self, x):
        return lbe_ops.batch_entropy_moments(x)

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 5], tf.float32)])
    def entropy_and_grad(self, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = lbe_ops.batch_entropy(x)
        return h, tape.gradient(h, x)

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 5], tf.float32),
                                  tf.TensorSpec([None, 11], tf.float32)])
    def group(self, a, b):
        return lbe_ops.batch_entropies([a, b])


def _saved_model_inputs():
    rng = np.random.default_rng(17)
    return rng.standard_normal((12, 6, 5)) * 2 + 1, rng.standard_normal((9, 11))


def _lbe_ops_in(function):
    graph = function.get_concrete_function().graph
    return sorted({op.type for op in graph.get_operations() if op.type.startswith("Lbe>")})


LOAD_AND_RUN = """
    import json, sys
    import numpy as np
    {imports}
    import tensorflow as tf
    rng = np.random.default_rng(17)
    a = tf.constant(rng.standard_normal((12, 6, 5)) * 2 + 1, tf.float32)
    b = tf.constant(rng.standard_normal((9, 11)), tf.float32)
    out = {{}}
    for path in sys.argv[1:]:
        try:
            m = tf.saved_model.load(path)
            h, mean, var = m.moments(a)
            h2, grad = m.entropy_and_grad(a)
            with tf.GradientTape() as tape:  # differentiate through the loaded function
                tape.watch(a)
                h3 = m.moments(a)[0]
            grad3 = tape.gradient(h3, a)
            out[path] = {{"h": float(h), "var": var.numpy().tolist(), "h2": float(h2),
                         "grad": grad.numpy().tolist(), "grad3": grad3.numpy().tolist(),
                         "group": m.group(a, b).numpy().tolist()}}
        except Exception as exc:
            out[path] = {{"error": type(exc).__name__ + ": " + str(exc)}}
    print(json.dumps(out))
"""


def _check_loaded(result):
    a, b = _saved_model_inputs()
    a32 = a.astype(np.float32).astype(np.float64)
    b32 = b.astype(np.float32).astype(np.float64)
    h_ref, _, var_ref = np_moments(a32, 1)
    flat = a32.reshape(12, -1)
    grad_ref = (PI_E * (flat - flat.mean(0)) / (30 * 11 * (PI_E * var_ref + 1))).reshape(a.shape)
    assert "error" not in result, result.get("error")
    for key in ("h", "h2"):
        np.testing.assert_allclose(result[key], h_ref, rtol=1e-5)
    np.testing.assert_allclose(result["var"], var_ref, rtol=1e-5)
    for key in ("grad", "grad3"):
        np.testing.assert_allclose(result[key], grad_ref, rtol=0, atol=1e-5 * np.abs(grad_ref).max())
    np.testing.assert_allclose(result["group"], [h_ref, np_moments(b32, 1)[0]], rtol=1e-5)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved_models")
    with_op = EntropyModule()
    assert _lbe_ops_in(with_op.entropy_and_grad) == ["Lbe>BatchEntropy", "Lbe>BatchEntropyGrad"]
    assert _lbe_ops_in(with_op.group) == ["Lbe>BatchEntropies"]
    tf.saved_model.save(with_op, str(root / "with_op"))
    portable = EntropyModule()
    with lbe_ops.use_backend("tf"):  # traced (at save) without the op: stock TensorFlow only
        tf.saved_model.save(portable, str(root / "portable"))
        assert _lbe_ops_in(portable.entropy_and_grad) == []
    return root / "with_op", root / "portable"


def test_saved_model_with_the_op_loads_and_runs_after_import(saved_models):
    with_op, portable = saved_models
    out = last_json_line(run_python(LOAD_AND_RUN.format(imports="import lbe_ops"),
                                    with_op, portable))
    _check_loaded(out[str(with_op)])
    _check_loaded(out[str(portable)])


@pytest.mark.slow  # a fresh Python process
def test_saved_model_with_the_op_needs_lbe_ops_imported(saved_models):
    """Without `import lbe_ops` (or with LBE_OPS_BACKEND=tf, which keeps the library unloaded) a
    SavedModel containing Lbe> ops fails to load with TensorFlow's 'Op type not registered';
    one saved under use_backend('tf') loads anywhere."""
    with_op, portable = saved_models
    for imports, env in [("", {}), ("import lbe_ops", {"LBE_OPS_BACKEND": "tf"})]:
        out = last_json_line(run_python(LOAD_AND_RUN.format(imports=imports), with_op, portable,
                                        **env))
        assert "Op type not registered 'Lbe>BatchEntrop" in out[str(with_op)]["error"]
        _check_loaded(out[str(portable)])


LOAD_V0_1 = """
    import json, sys
    import numpy as np
    import lbe_ops
    import tensorflow as tf
    x = tf.constant(np.random.default_rng(5).standard_normal((9, 5)) * 3 + 2, tf.float32)
    m = tf.saved_model.load(sys.argv[1])
    with tf.GradientTape() as tape:  # through the loaded forward op: lbe_ops' registered gradient
        tape.watch(x)
        h = m.entropy(x)
    print(json.dumps({"h": float(h), "grad": m.entropy_grad(x).numpy().tolist(),
                      "grad_through": tape.gradient(h, x).numpy().tolist(),
                      "group": m.group(x, x[:, ::-1] * 2).numpy().tolist()}))
"""


def test_saved_model_of_the_first_op_interface_loads_and_runs():
    """tests/data/saved_model_v0_1 holds the ops as lbe-ops 0.1.0 wrote them (three forward outputs,
    six gradient inputs, no num_residuals attribute): it loads, runs, and differentiates."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                        "saved_model_v0_1")
    out = last_json_line(run_python(LOAD_V0_1, path))
    x = (np.random.default_rng(5).standard_normal((9, 5)) * 3 + 2).astype(np.float32)
    x64 = x.astype(np.float64)
    h_ref, _, var_ref = np_moments(x64, 1)
    grad_ref = PI_E * (x64 - x64.mean(0)) / (5 * 8 * (PI_E * var_ref + 1))
    np.testing.assert_allclose(out["h"], h_ref, rtol=1e-5)
    for key in ("grad", "grad_through"):
        np.testing.assert_allclose(out[key], grad_ref, rtol=0, atol=1e-5 * np.abs(grad_ref).max())
    np.testing.assert_allclose(out["group"], [h_ref, np_moments(x64[:, ::-1] * 2, 1)[0]], rtol=1e-5)
