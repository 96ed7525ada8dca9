"""CI smoke test of the packaging: scripts/build_wheel.sh builds the wheel (`pip wheel .`),
repairs it into a manylinux wheel (auditwheel), installs it into a fresh virtual environment
beside tensorflow-cpu 2.21, and runs a smoke check there from the installed files.

It takes minutes (a full build with pip's build isolation, then a fresh venv): it runs by
default, in CI too; deselect it with `-m "not wheel"` or LBE_OPS_SKIP_WHEEL=1. It needs no network
beyond the package registries pip is configured with (PyPI or local indexes).
"""

import os
import platform
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_wheel.sh"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.wheel,
    pytest.mark.skipif(os.environ.get("LBE_OPS_SKIP_WHEEL") == "1", reason="LBE_OPS_SKIP_WHEEL=1"),
    pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                       reason="the manylinux wheel is built for Linux x86_64"),
    pytest.mark.skipif(not SCRIPT.exists(), reason="not run from a source checkout"),
]


def test_wheel_builds_repairs_installs_and_runs(tmp_path):
    out_dir = tmp_path / "wheelhouse"
    log_path = tmp_path / "build_wheel.log"
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path))
    for name in ("PYTHONPATH", "LBE_OPS_LIBRARY", "LBE_OPS_BACKEND", "LBE_WHEEL_KEEP"):
        env.pop(name, None)
    with open(log_path, "w") as log:
        proc = subprocess.run(["bash", str(SCRIPT), str(out_dir)], stdout=log,
                              stderr=subprocess.STDOUT, env=env, timeout=3600)
    output = log_path.read_text()
    assert proc.returncode == 0, f"build_wheel.sh failed ({proc.returncode}):\n{output[-8000:]}"
    assert "smoke check: OK" in output

    wheel_line = re.search(r"^wheel: (.+\.whl)$", output, re.M)
    assert wheel_line, output[-3000:]
    wheel = Path(wheel_line.group(1))
    assert wheel.parent == out_dir and wheel.exists()
    tag = re.fullmatch(r"lbe_ops-[^-]+-(cp\d+)-(cp\d+)-(manylinux_\d+_\d+_x86_64)\.whl", wheel.name)
    assert tag, f"not a manylinux wheel: {wheel.name}"
    assert tag.group(1) == f"cp{sys.version_info.major}{sys.version_info.minor}"

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    metadata = metadata.decode()
    assert "lbe_ops/_lbe_ops.so" in names and "lbe_ops/_build_info.json" in names
    assert not any("libtensorflow" in n for n in names)  # TensorFlow's own library stays out
    assert re.search(r'^Requires-Dist: tensorflow-cpu==2\.21\.\*; extra == "cpu"$', metadata, re.M)
    assert re.search(r"^Built for TensorFlow 2\.21 \(compiled against tensorflow", metadata, re.M)
    # what the smoke check printed: the installed copy, outside this checkout, uses the op
    installed = re.search(r'"lbe_ops": "([^"]+)"', output).group(1)
    assert "site-packages" in installed and not installed.startswith(str(ROOT))
    assert '"backend": "op"' in output
