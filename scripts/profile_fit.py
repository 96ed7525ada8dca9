"""Where a fit() step goes: the kernels TensorFlow runs per step, by part of the step.

    python scripts/profile_fit.py                       # mlp-100x64: plain, op, tf
    python scripts/profile_fit.py mlp-500x32 --variants plain,op

For each variant of a lbe-bench fit model (lbe_ops.bench.fit: the same models, data and
compile settings as the fit table), one warm-up epoch, then one epoch of model.fit() under
TensorFlow's profiler (tf.profiler.experimental). The kernels it records (events named
"<node name>:<op type>" on TensorFlow's compute threads) are counted and their times summed per
step, grouped by the part of the step they belong to:

    model forward / model backward    the layers' own ops (under the model's name scope)
    LBE op forward / LBE op gradient  Lbe>BatchEntropies and Lbe>BatchEntropiesGrad
    gradient sums (AddN)              TensorFlow's sums of a tensor's gradients: one per
                                      regularized layer (its output feeds the next layer and the
                                      LBE term)
    optimizer                         the variable updates (under the optimizer's name scope)
    loss, LBE terms, metrics          everything else in the forward pass: the task loss, the
                                      penalties (and pure TensorFlow's entropies), metric updates
    their gradients                   everything else in the backward pass

Kernel times are summed over both compute threads, so a part's time can exceed the step's wall
time; what no kernel accounts for is the executor's own work. Run it on a quiet machine.
"""

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

from lbe_ops.bench import fit as fit_bench  # noqa: E402

PARTS = ("model forward", "model backward", "LBE op forward", "LBE op gradient",
         "gradient sums (AddN)", "optimizer", "loss, LBE terms, metrics", "their gradients")


def part_of(node, op_type, model_name, optimizer_name):
    scopes = node.split("/")
    if scopes and scopes[0].startswith("StatefulPartitionedCall"):
        scopes = scopes[1:]
    backward = bool(scopes) and scopes[0] == "gradient_tape"
    if backward:
        scopes = scopes[1:]
    if op_type.startswith("Lbe>"):
        return "LBE op gradient" if op_type.endswith("Grad") else "LBE op forward"
    in_model = bool(scopes) and re.fullmatch(re.escape(model_name) + r"(_\d+)?", scopes[0])
    if op_type == "AddN" and not in_model:
        return "gradient sums (AddN)"
    if in_model:
        return "model backward" if backward else "model forward"
    if scopes and re.sub(r"_\d+$", "", scopes[0]) == optimizer_name:
        return "optimizer"
    return "their gradients" if backward else "loss, LBE terms, metrics"


def kernels_per_step(run, steps):
    """{part: (ops per step, microseconds per step)} of one profiled fit() epoch, and the
    median wall time per step of that epoch."""
    directory = tempfile.mkdtemp(prefix="lbe-profile-")
    timer = fit_bench.step_timer()
    tf.profiler.experimental.start(directory)
    try:
        run.fit([timer])
    finally:
        tf.profiler.experimental.stop()
    counts, times = collections.Counter(), collections.Counter()
    optimizer_name = run.model.optimizer.name.lower()
    for path in glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True):
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            metadata = plane.event_metadata
            for line in plane.lines:
                if not line.name.startswith("tf_Compute"):
                    continue
                for event in line.events:
                    name = metadata[event.metadata_id].name
                    if ":" not in name or "::" in name:
                        continue  # executor and thread-pool regions, not kernels
                    node, op_type = name.rsplit(":", 1)
                    part = part_of(node, op_type, run.model.name, optimizer_name)
                    counts[part] += 1
                    times[part] += event.duration_ps / 1e6
    wall = statistics.median(timer.step_times())
    return {part: (counts[part] / steps, times[part] / steps) for part in PARTS}, wall


def main(argv=None):
    p = argparse.ArgumentParser(prog="profile_fit.py", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="mlp-100x64",
                   help="a lbe-bench fit model (mlp-500x32, mlp-100x64, cnn-30x16)")
    p.add_argument("--variants", default="plain,op,tf",
                   help="comma-separated: plain, op, tf (pure TensorFlow; all graph mode)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in fit_bench.GRAPH_VARIANTS]
    if bad:
        p.error(f"--variants: unknown {', '.join(bad)} (known: plain, op, tf)")
    name = args.model
    if name not in fit_bench.FIT_MODELS:
        p.error(f"model: unknown fit model {name!r}; known: {', '.join(fit_bench.FIT_MODELS)}")
    spec = fit_bench.FIT_MODELS[name]
    runs = fit_bench.build_fit_models(name, variants)
    for run in runs.values():
        run.fit()  # trace and warm up
    results = {v: kernels_per_step(run, spec.steps) for v, run in runs.items()}
    print(f"{spec.name} (batch {spec.batch}), one profiled fit() epoch of {spec.steps} steps per "
          "variant: kernels per step (count, microseconds summed over threads)")
    header = f"| part | " + " | ".join(variants) + " |"
    print(header)
    print("|" + " --- |" * (len(variants) + 1))
    for part in PARTS:
        cells = [f"{results[v][0][part][0]:.0f} ops, {results[v][0][part][1]:.0f} us"
                 for v in variants]
        print(f"| {part} | " + " | ".join(cells) + " |")
    totals = [f"{sum(c for c, _ in results[v][0].values()):.0f} ops, "
              f"{sum(t for _, t in results[v][0].values()):.0f} us" for v in variants]
    print("| all kernels | " + " | ".join(totals) + " |")
    print("| wall time per step (median) | " + " | ".join(
        f"{1e3 * results[v][1]:.2f} ms" for v in variants) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
