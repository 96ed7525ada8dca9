"""Running test code in a fresh Python interpreter (nothing loaded yet)."""

import json
import os
import subprocess
import sys
import textwrap


def run_python(code, *args, timeout=600, **env):
    """Runs code in a fresh interpreter (nothing loaded yet) and returns the CompletedProcess."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    full_env.pop("LBE_OPS_BACKEND", None)
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def last_json_line(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
