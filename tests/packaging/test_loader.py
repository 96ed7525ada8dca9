"""Backend choice: the environment variable, use_backend, and the pure-TensorFlow path when the
library cannot be used (missing, not loadable, built for another TensorFlow). Each case that
changes what the process loads runs in a fresh interpreter."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import lbe_ops

# What both snippets below measure and print: three single calls, one grouped call, the backend
# and every lbe_ops warning recorded in `caught`.
_MEASURE = """
x = tf.constant(np.random.default_rng(0).standard_normal((32, 6)), tf.float32)
values = [float(lbe_ops.batch_entropy(x)) for _ in range(3)]
values.append(float(lbe_ops.batch_entropies([x, x])[1]))
"""
_REPORT = """
messages = [str(w.message) for w in caught if "lbe_ops" in str(w.message)]
print(json.dumps({"info": lbe_ops.backend_info(), "values": values, "warnings": messages}))
"""

SNIPPET = textwrap.dedent("""
    import json, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import numpy as np, tensorflow as tf, lbe_ops
""") + textwrap.indent(_MEASURE, "    ") + _REPORT


def run_python(code, args=(), **env):
    """Runs `python -c code *args` with LBE_OPS_BACKEND unset unless env gives it."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env)
    full_env.pop("LBE_OPS_BACKEND", None)
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=full_env, timeout=300)
    return proc


def run_snippet(**env):
    proc = run_python(SNIPPET, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def expected_value():
    import tensorflow as tf
    x = tf.constant(np.random.default_rng(0).standard_normal((32, 6)), tf.float32)
    return float(lbe_ops.reference.batch_entropy(x))


def test_backend_info_reports_the_op():
    info = lbe_ops.backend_info()
    assert info["backend"] == "op"
    assert info["reason"] is None
    assert Path(info["library"]).exists()
    import tensorflow as tf
    assert info["built_with_tf"] == tf.__version__
    assert isinstance(info["cuda"], bool)


def test_default_uses_the_op_without_warnings():
    out = run_snippet()
    assert out["info"]["backend"] == "op"
    assert out["warnings"] == []
    np.testing.assert_allclose(out["values"], expected_value(), rtol=1e-5)


@pytest.mark.slow  # a fresh Python process per case
def test_env_var_forces_pure_tf_silently():
    out = run_snippet(LBE_OPS_BACKEND="tf")
    assert out["info"]["backend"] == "tf"
    assert "LBE_OPS_BACKEND=tf" in out["info"]["reason"]
    assert out["warnings"] == []
    np.testing.assert_allclose(out["values"], expected_value(), rtol=1e-6)


@pytest.mark.slow  # a fresh Python process per case
def test_invalid_env_var_is_a_clear_error():
    proc = run_python("import lbe_ops, numpy as np; lbe_ops.batch_entropy(np.ones((3, 2), 'f4'))",
                      LBE_OPS_BACKEND="fast")
    assert proc.returncode != 0
    assert "LBE_OPS_BACKEND must be one of auto, op, tf, got 'fast'" in proc.stderr


@pytest.fixture
def broken_library(tmp_path):
    """A library file that exists, claims the right TensorFlow, but is not a shared object."""
    import tensorflow as tf
    lib = tmp_path / "_lbe_ops.so"
    lib.write_bytes(b"this is not an ELF file")
    (tmp_path / "_build_info.json").write_text(json.dumps({"built_with_tf": tf.__version__}))
    return lib


@pytest.fixture
def foreign_library(tmp_path):
    """The real library, but labelled as built for another TensorFlow."""
    real = Path(lbe_ops.backend_info()["library"])
    lib = tmp_path / "_lbe_ops.so"
    shutil.copy(real, lib)
    (tmp_path / "_build_info.json").write_text(json.dumps({"built_with_tf": "2.19.0"}))
    return lib


@pytest.fixture
def undefined_symbol_library(tmp_path):
    """A shared object that references a symbol this TensorFlow lacks (what loading a library
    built for another TensorFlow gives, were the version check bypassed)."""
    import tensorflow as tf
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C compiler")
    source = tmp_path / "probe.c"
    source.write_text(textwrap.dedent("""
        extern void _ZN10tensorflow22LbeOpsNoSuchSymbolHereEv(void);
        __attribute__((constructor)) static void register_ops(void) {
            _ZN10tensorflow22LbeOpsNoSuchSymbolHereEv();
        }
    """))
    lib = tmp_path / "_lbe_ops.so"
    subprocess.run([compiler, "-x", "c", "-shared", "-fPIC", "-o", str(lib), str(source)],
                   check=True, capture_output=True)
    (tmp_path / "_build_info.json").write_text(json.dumps({"built_with_tf": tf.__version__}))
    return lib


@pytest.mark.slow  # a fresh Python process per case
def test_unloadable_library_falls_back_with_one_warning(broken_library):
    out = run_snippet(LBE_OPS_LIBRARY=str(broken_library))
    assert out["info"]["backend"] == "tf"
    assert "loading" in out["info"]["reason"] and "failed" in out["info"]["reason"]
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "pure-TensorFlow" in out["warnings"][0]
    np.testing.assert_allclose(out["values"], expected_value(), rtol=1e-6)


@pytest.mark.slow  # a fresh Python process per case
def test_library_with_an_undefined_symbol_falls_back(undefined_symbol_library):
    """Reported and skipped: one warning and the pure-TensorFlow path, never a crash."""
    out = run_snippet(LBE_OPS_LIBRARY=str(undefined_symbol_library))
    assert out["info"]["backend"] == "tf"
    assert "undefined symbol" in out["info"]["reason"], out["info"]["reason"]
    assert len(out["warnings"]) == 1 and "pure-TensorFlow" in out["warnings"][0]
    np.testing.assert_allclose(out["values"], expected_value(), rtol=1e-6)


@pytest.mark.slow  # a fresh Python process per case
def test_library_for_another_tensorflow_is_not_loaded(foreign_library):
    out = run_snippet(LBE_OPS_LIBRARY=str(foreign_library))
    assert out["info"]["backend"] == "tf"
    assert "built for TensorFlow 2.19.0" in out["info"]["reason"]
    assert len(out["warnings"]) == 1
    np.testing.assert_allclose(out["values"], expected_value(), rtol=1e-6)


def test_missing_library_falls_back(tmp_path):
    out = run_snippet(LBE_OPS_LIBRARY=str(tmp_path / "nope.so"))
    assert out["info"]["backend"] == "tf"
    assert "not found" in out["info"]["reason"]
    assert len(out["warnings"]) == 1


@pytest.mark.slow  # a fresh Python process per case
def test_forcing_the_op_with_a_broken_library_is_an_error(broken_library):
    proc = run_python("import lbe_ops, numpy as np; lbe_ops.batch_entropy(np.ones((3, 2), 'f4'))",
                      LBE_OPS_BACKEND="op", LBE_OPS_LIBRARY=str(broken_library))
    assert proc.returncode != 0
    assert "LibraryUnavailableError" in proc.stderr
    assert "LBE_OPS_BACKEND=op" in proc.stderr


def test_use_backend_scope():
    import tensorflow as tf
    x = tf.random.normal([16, 5])
    with lbe_ops.use_backend("tf"):
        assert lbe_ops.backend_info()["backend"] == "tf"

        @tf.function
        def traced(v):
            return lbe_ops.batch_entropy(v)

        graph = traced.get_concrete_function(x).graph
        assert not any(op.type.startswith("Lbe>") for op in graph.get_operations())
    assert lbe_ops.backend_info()["backend"] == "op"
    with pytest.raises(ValueError, match="backend must be one of"):
        with lbe_ops.use_backend("gpu"):
            pass


@pytest.mark.slow  # a fresh Python process per case
def test_results_do_not_depend_on_the_number_of_threads():
    code = textwrap.dedent("""
        import sys, numpy as np, tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
        import lbe_ops
        x = tf.constant(np.random.default_rng(7).standard_normal((5000, 300)) + 3.0, tf.float32)
        with tf.GradientTape() as t:
            t.watch(x)
            h = lbe_ops.batch_entropy(x)
        g = t.gradient(h, x)
        sys.stdout.write(np.float32(h.numpy()).tobytes().hex() + " " + str(hash(g.numpy().tobytes())))
    """)
    outputs = set()
    for threads in ("1", "2", "3"):
        proc = subprocess.run([sys.executable, "-c", code, threads], capture_output=True,
                              text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                                                  PYTHONHASHSEED="0"), timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.add(proc.stdout.strip().splitlines()[-1])
    assert len(outputs) == 1, outputs


# ---- CUDA: built with it, and whether its kernels can run here ---------------------------------

BUILT_13 = {"cuda": True, "cuda_version": "13.0.88", "cuda_architectures": "80-real 90"}


@pytest.mark.parametrize("build, capabilities, driver, problem", [
    # No CUDA in the library, or no GPU: nothing to run on a GPU, nothing in the way.
    ({"cuda": False}, [(9, 0)], 12040, None),
    (BUILT_13, [], None, None),
    # The driver's CUDA major version is older than the library's.
    (BUILT_13, [(9, 0)], 12040, r"driver supports CUDA 12\.4, but the op library was built with "
                                r"CUDA 13\.0\.88, which needs a driver for CUDA 13\.0 or newer"),
    (BUILT_13, [(8, 0)], 12090, r"driver supports CUDA 12\.9"),
    # Machine code for sm_80 runs on 8.x, sm_90 (with PTX) on 9.0, PTX on later GPUs.
    (BUILT_13, [(8, 0), (8, 6), (8, 9), (9, 0)], 13000, None),
    (BUILT_13, [(10, 0), (12, 0)], 13010, None),
    # No code at all for an older GPU.
    (BUILT_13, [(9, 0), (7, 5)], 13000, r"GPU 1 has compute capability 7\.5, and the op library "
                                        r"has no code for it \(built for CUDA architectures "
                                        r"80-real 90\)"),
    # Minor version compatibility: machine code runs on an older driver of the same major; PTX
    # needs a driver at least as new as the CUDA that wrote it.
    ({"cuda": True, "cuda_version": "13.2.51", "cuda_architectures": "80-real 90"}, [(9, 0)],
     13000, None),
    ({"cuda": True, "cuda_version": "13.2.51", "cuda_architectures": "80-real 90"}, [(10, 0)],
     13000, r"compute capability 10\.0, for which the op library has only PTX, which the driver "
            r"\(CUDA 13\.0\) cannot compile: it was written by CUDA 13\.2\.51"),
    # Arch-specific machine code runs on its own capability only; a PTX-only build.
    ({"cuda": True, "cuda_version": "12.5.82", "cuda_architectures": "90a-real"}, [(10, 0)],
     12050, r"no code for it"),
    ({"cuda": True, "cuda_version": "12.5.82", "cuda_architectures": "90a-real"}, [(9, 0)],
     12050, None),
    ({"cuda": True, "cuda_version": "12.5.82", "cuda_architectures": "70-virtual"}, [(8, 6)],
     12050, None),
    # What cannot be checked is not held against the library.
    ({"cuda": True, "cuda_version": "12.5.82", "cuda_architectures": "native"}, [(7, 0)], 12050,
     None),
    (BUILT_13, [None], 13000, None),
    (BUILT_13, [(7, 5)], None, r"no code for it"),
])
def test_gpu_kernel_problem(build, capabilities, driver, problem):
    from lbe_ops import _loader
    found = _loader.gpu_kernel_problem(build, capabilities, driver)
    if problem is None:
        assert found is None
    else:
        assert found is not None and re.search(problem, found), found


def test_backend_info_separates_built_with_cuda_from_cuda_here():
    import tensorflow as tf
    info = lbe_ops.backend_info()
    build = json.loads(Path(info["library"]).with_name("_build_info.json").read_text())
    assert info["built_with_cuda"] is bool(build.get("cuda"))
    assert info["cuda_version"] == (build.get("cuda_version") or None)
    gpus = tf.config.list_physical_devices("GPU")
    assert info["gpus"] == len(gpus)
    assert isinstance(info["cuda"], bool)
    assert info["cuda"] is (info["cuda_reason"] is None)
    if not gpus:
        assert info["cuda"] is False
        assert info["cuda_reason"] == "no GPU is visible to TensorFlow"
        assert info["cuda_driver_version"] is None
    elif not info["built_with_cuda"]:
        assert info["cuda"] is False and "built without CUDA" in info["cuda_reason"]


# Loads the library with the GPU facts given on the command line instead of the machine's:
# TensorFlow imports with LBE_OPS_BACKEND=tf (nothing loaded), then the backend asked for is set.
GPU_SNIPPET = textwrap.dedent("""
    import json, os, sys, warnings
    warnings.simplefilter("always")
    import numpy as np, tensorflow as tf, lbe_ops
    from lbe_ops import _loader
    capabilities, driver = json.loads(sys.argv[1])
    _loader._gpu_facts = lambda: ([tuple(c) for c in capabilities], driver)
    os.environ["LBE_OPS_BACKEND"] = sys.argv[2]
    with warnings.catch_warnings(record=True) as caught:
""") + textwrap.indent(_MEASURE, "    ") + _REPORT


def run_with_gpu_facts(capabilities, driver, backend="auto"):
    return run_python(GPU_SNIPPET, [json.dumps([capabilities, driver]), backend],
                      LBE_OPS_BACKEND="tf")


@pytest.fixture
def cuda_build():
    info = lbe_ops.backend_info()
    if not info["built_with_cuda"]:
        pytest.skip("the op library was built without CUDA")
    major, minor = (int(p) for p in info["cuda_version"].split(".")[:2])
    return major, minor


def test_a_driver_too_old_for_the_library_falls_back_to_pure_tf_with_one_warning(cuda_build):
    major, _ = cuda_build
    proc = run_with_gpu_facts([[9, 0]], (major - 1) * 1000 + 80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    info = out["info"]
    assert info["backend"] == "tf" and info["requested"] == "auto"
    assert info["reason"].startswith("its GPU kernels cannot run here: the NVIDIA driver "
                                     f"supports CUDA {major - 1}.8")
    assert info["cuda"] is False and info["cuda_reason"] in info["reason"]
    assert info["built_with_cuda"] is True and info["gpus"] == 1
    assert info["cuda_driver_version"] == f"{major - 1}.8"
    assert len(out["warnings"]) == 1 and "pure-TensorFlow" in out["warnings"][0]
    assert info["cuda_reason"] in out["warnings"][0]
    np.testing.assert_allclose(out["values"], expected_value(), rtol=1e-6)


@pytest.mark.slow  # a fresh Python process per case
def test_forcing_the_op_with_a_driver_too_old_is_an_error(cuda_build):
    major, _ = cuda_build
    proc = run_with_gpu_facts([[9, 0]], (major - 1) * 1000 + 80, backend="op")
    assert proc.returncode != 0
    assert "LibraryUnavailableError: LBE_OPS_BACKEND=op, but the compiled op cannot be used: " \
           "its GPU kernels cannot run here: the NVIDIA driver supports" in proc.stderr


@pytest.mark.slow  # a fresh Python process per case
def test_a_driver_for_the_library_keeps_the_op(cuda_build):
    major, minor = cuda_build
    proc = run_with_gpu_facts([[9, 0]], major * 1000 + minor * 10)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    info = out["info"]
    assert info["backend"] == "op" and info["reason"] is None and out["warnings"] == []
    assert info["cuda"] is True and info["cuda_reason"] is None
    assert info["cuda_driver_version"] == f"{major}.{minor}"
    np.testing.assert_allclose(out["values"], expected_value(), rtol=1e-5)
