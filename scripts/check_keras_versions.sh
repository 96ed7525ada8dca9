#!/usr/bin/env bash
# Runs the Keras tests against every supported Keras version over TensorFlow 2.21, one version at
# a time, each in a virtual environment of its own (docs/keras.md).
#
#   scripts/check_keras_versions.sh                  # Keras 3.12, 3.13, 3.14 and 3.15
#   scripts/check_keras_versions.sh 3.13 3.14        # some of them
#
# Each environment installs only `keras==X.Y.*` (the newest release of X.Y, and whatever it needs
# that the base lacks); TensorFlow, the test tools and lbe_ops come from the Python that runs this
# script ($PYTHON, default python3), which must be able to run the test suite: installed as the
# README says (pip install ".[cpu,test]"), or with the op built in this tree, which is then the
# lbe_ops tested. The environments are kept in $KERAS_VENVS (default .keras-venvs/ here) and
# reused. The tests: tests/keras/test_keras.py, test_keras_edges.py and test_keras_distributed.py;
# KERAS_MULTIWORKER=1 adds test_keras_multiworker.py (two worker processes per test, slow).
# Arguments for pytest: KERAS_PYTEST_ARGS (e.g. "-x -k wrap").
#
# Prints one line per version (PASS or FAIL, the Keras release, seconds to set up and to test) and
# exits non-zero if a version failed; each version's pytest output is in $KERAS_VENVS/<X.Y>.log.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
venvs="${KERAS_VENVS:-$repo/.keras-venvs}"
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.12 3.13 3.14 3.15)
tests=(tests/keras/test_keras.py tests/keras/test_keras_edges.py
       tests/keras/test_keras_distributed.py)
[ "${KERAS_MULTIWORKER:-0}" = 1 ] && tests+=(tests/keras/test_keras_multiworker.py)

mkdir -p "$venvs"
# With the op built in this tree, test that; otherwise the lbe_ops installed in the base Python.
if [ -e "$repo/lbe_ops/_lbe_ops.so" ]; then
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi
# pytest runs outside the tree, so that an installed lbe_ops is not shadowed by the source tree.
workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
# Lines for a .pth file that add the base's site-packages to a venv, with their own .pth files
# (an editable install is one): after the venv's own, so that its Keras comes first.
base_sites="$("$python" -c '
import site
for path in site.getsitepackages():
    print(f"import site; site.addsitedir({path!r})")')"

summary=()
failed=0
for version in "${versions[@]}"; do
  venv="$venvs/keras-$version"
  log="$venvs/$version.log"
  started=$SECONDS
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$base_sites" > "$site/lbe_ops_base.pth"
  fi
  if ! "$venv/bin/python" -m pip install --quiet "keras==$version.*" > "$log" 2>&1; then
    summary+=("FAIL  keras $version: pip could not install it (see $log)")
    failed=1
    continue
  fi
  release="$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("keras"))')"
  setup=$((SECONDS - started))
  started=$SECONDS
  status=PASS
  # -o addopts=: the listed files whole, their slow tests too (the default run deselects them).
  (cd "$workdir" && "$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$repo" \
      -o addopts= ${KERAS_PYTEST_ARGS:-} "${tests[@]/#/$repo/}") >> "$log" 2>&1 || status=FAIL
  [ $status = PASS ] || failed=1
  result="$(awk 'NF {last = $0} END {print last}' "$log" | sed 's/^=* *//; s/ *=*$//')"
  summary+=("$status  keras $release: $result (setup $setup s, tests $((SECONDS - started)) s)")
  echo "${summary[-1]}"
done

echo
echo "tests: ${tests[*]}"
printf '%s\n' "${summary[@]}"
exit $failed
