"""Shared test setup.

The suite tests the compiled op: unless LBE_OPS_ALLOW_FALLBACK=1 is set, it stops at once when
lbe_ops cannot load its op library (a run that silently fell back to pure TF does not count).

The tests are filed by concern (ops/, keras/, packaging/, commands/); what they share lives in
support/, which is put on the path here: tests import its modules by name (`import oracle64`).
"""

import os
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Subprocesses started by tests (`python -c ...` from the repository root) must import the
# installed lbe_ops, not the source tree in the working directory, which has no compiled op.
os.environ["PYTHONSAFEPATH"] = "1"

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))

import lbe_ops  # noqa: E402


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



@pytest.fixture
def rng(request):
    # Fresh inputs every run, but reproducible from the printed seed when a test fails.
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)
