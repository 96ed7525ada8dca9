"""Shared test setup.

The suite tests the compiled op: unless LBE_OPS_ALLOW_FALLBACK=1 is set, it stops at once when
lbe_ops cannot load its op library (a run that silently fell back to pure TF does not count).
"""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Subprocesses started by tests (`python -c ...` from the repository root) must import the
# installed lbe_ops, not the source tree in the working directory, which has no compiled op.
os.environ["PYTHONSAFEPATH"] = "1"

import lbe_ops  # noqa: E402

PI_E = np.pi * np.e


def pytest_report_header(config):
    info = lbe_ops.backend_info()
    return [f"lbe_ops {lbe_ops.__version__} from {os.path.dirname(lbe_ops.__file__)}",
            f"lbe_ops backend: {info['backend']} (reason: {info['reason']}), "
            f"built with TF {info['built_with_tf']}, cuda={info['cuda']}"]


def pytest_sessionstart(session):
    if os.environ.get("LBE_OPS_ALLOW_FALLBACK") == "1":
        return
    info = lbe_ops.backend_info()
    if info["backend"] != "op":
        pytest.exit(f"lbe_ops is not using its compiled op ({info['reason']}); install the package "
                    "(pip install .) or set LBE_OPS_ALLOW_FALLBACK=1", returncode=3)


# ---- float64 numpy reference -----------------------------------------------------------------

def np_moments(x, ddof=1):
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(axis=0)
    var = ((flat - mean) ** 2).sum(axis=0) / (flat.shape[0] - ddof)
    entropy = 0.5 * np.log1p(PI_E * var).mean()
    return entropy, mean, var


def np_entropy(x, ddof=1):
    return np_moments(x, ddof)[0]


def np_entropy_grad(x, ddof=1):
    """dH/dx in float64."""
    x64 = np.asarray(x, dtype=np.float64)
    flat = x64.reshape(x64.shape[0], -1)
    b, u = flat.shape
    _, mean, var = np_moments(flat, ddof)
    grad = PI_E * (flat - mean) / (u * (b - ddof) * (PI_E * var + 1))
    return grad.reshape(x64.shape)


@pytest.fixture
def rng(request):
    # Fresh inputs every run, but reproducible from the printed seed when a test fails.
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)
