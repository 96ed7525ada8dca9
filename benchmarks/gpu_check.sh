#!/usr/bin/env bash
# One call on a GPU machine (no TensorFlow needed): build lbe_ops._core with the CUDA kernels for
# this GPU, check them against a float64 reference, time them against PyTorch and a copy, and
# print the table last. Needs nvcc, CMake, pybind11, numpy and PyTorch (ninja if present).
#
#   bash benchmarks/gpu_check.sh              # everything, within about 9 minutes
#   bash benchmarks/gpu_check.sh --quick      # fewer shapes and dtypes, no sweep
#
# Environment: OUT (results folder; default build/gpu/results), PYTHON (default python3),
# LBE_CUDA_ARCH (CMAKE_CUDA_ARCHITECTURES, default 90), LBE_SANITIZE=0 to skip compute-sanitizer,
# LBE_TIME_BUDGET (seconds the whole script may take; default 560).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
ARCH=${LBE_CUDA_ARCH:-90}
BUILD=$ROOT/build/gpu
OUT=${OUT:-$BUILD/results}
mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  nvcc --version 2>&1 | tail -2
  cmake --version 2>&1 | head -1
  "$PY" -c "import sys, numpy, torch, pybind11; print(sys.version.split()[0], 'numpy', numpy.__version__, 'torch', torch.__version__, 'pybind11', pybind11.__version__)" 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# ---- build ------------------------------------------------------------------------------------
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
echo "building _core for sm_$ARCH ..."
if ! { cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DLBE_OPS_WITH_TF=OFF \
         -DLBE_OPS_CUDA=1 -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DLBE_OPS_OUTPUT_DIR="$BUILD/out" \
         -DPython_EXECUTABLE="$(command -v "$PY")" &&
       cmake --build "$BUILD" --parallel "$(nproc)"; } > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED (full log: $OUT/build.log)"
  exit 1
fi
# Registers, spills and shared memory of each kernel, as ptxas reported them.
"$PY" - "$OUT/build.log" <<'PTXAS' | tee "$OUT/ptxas.txt"
import re, sys
name = frame = None
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
    if m:
        kind = "Forward" if "Forward" in m.group(1) else "Backward"
        t = next((t for t in ("BFloat16", "Half", "IfE", "IdE") if t in m.group(1)), "?")
        name = kind + "<" + {"IfE": "float", "IdE": "double"}.get(t, t) + "> " + m.group(2)
    elif "stack frame" in line:
        frame = line.strip()
    elif "Used" in line and name:
        print(f"ptxas {name:24s} {line.split(':', 1)[1].strip()} | {frame}")
        name = None
PTXAS
CORE_SO=$(ls "$BUILD"/out/_core*.so | head -1)
if command -v cuobjdump >/dev/null 2>&1; then
  cuobjdump -sass "$CORE_SO" > "$OUT/core.sass" 2>/dev/null
  "$PY" - "$OUT/core.sass" <<'SASS' | tee "$OUT/sass_summary.txt"
import re, sys
name, counts = None, {}
for line in open(sys.argv[1]):
    m = re.search(r"Function : (\S+)", line)
    if m:
        name = ("Forward" if "Forward" in m.group(1) else "Backward") + "<" + next(
            (t for t in ("BFloat16", "Half", "IfE", "IdE") if t in m.group(1)), "?") + ">"
        counts[name] = {}
        continue
    for op in ("LDG.E.128", "LDG.E.64", "LDG.E.U16", "LDG.E.CONSTANT", "STG.E.128", "STG.E.64", "STG.E.U16", "LDL", "STL"):
        if name and re.search(r"\b" + re.escape(op) + r"\b", line):
            counts[name][op] = counts[name].get(op, 0) + 1
for name, c in counts.items():
    print("sass", name.replace("IfE", "float").replace("IdE", "double"), c)
SASS
fi

# ---- checks, timings, sweep ----------------------------------------------------------------------
# Leave about two minutes of the budget for the sanitizer runs below.
"$PY" benchmarks/gpu_check.py --core-dir "$BUILD/out" --json "$OUT/gpu_check.json" \
    --deadline-seconds $(( ${LBE_TIME_BUDGET:-560} - SECONDS - 120 )) "$@"
status=$?

# ---- memory and race checks on small shapes, in the time that is left ------------------------
# (the emulation covers the kernels' logic; this covers the GPU itself). The whole script should
# end within LBE_TIME_BUDGET seconds (default 560, under a 10-minute limit).
if [ "${LBE_SANITIZE:-1}" != "0" ] && command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck; do
    left=$(( ${LBE_TIME_BUDGET:-560} - SECONDS - 15 ))
    if [ "$left" -lt 40 ]; then echo "compute-sanitizer $tool: skipped (no time left)"; continue; fi
    [ "$left" -gt 150 ] && left=150
    echo "compute-sanitizer --tool $tool (small shapes, at most ${left}s) ..."
    # Without PyTorch's caching allocator every tensor is its own allocation, so memcheck sees
    # accesses past its end (inside a cached segment it could not).
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$left" compute-sanitizer --tool "$tool" --error-exitcode 3 \
        "$PY" benchmarks/gpu_check.py --core-dir "$BUILD/out" --smoke --json "$OUT/sanitizer_$tool.json" \
        > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?
    echo "  $tool: exit status $rc ($(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer_$tool.log" | tail -1);" \
         "$(grep -E "^correctness:" "$OUT/sanitizer_$tool.log" | tail -1))"
  done
fi

echo
echo "(full results in $OUT: gpu_check.json/.log, build.log, ptxas.txt, sass_summary.txt, sanitizer_*.log)"
echo "================================ summary ================================"
cat "$OUT/gpu_check.summary.txt" 2>/dev/null
exit $status
