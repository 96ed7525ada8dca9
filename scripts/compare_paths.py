#!/usr/bin/env python
"""Two lbe-train LBE runs in lockstep, their weights compared after every step (issue 26, item 3).

    python scripts/compare_paths.py --seed 0 --out cmp-op-tf-0            # op against pure TF
    python scripts/compare_paths.py --seed 0 --paths op op --perturb 1e-7 --out cmp-op-op-0
    python scripts/compare_paths.py --seed 0 --paths tf tf --epochs 2     # determinism check

Builds lbe-train's LBE run twice, as lbe-train does for the same options (its parser, data split,
initial weights, wrap(), compile() and learning-rate schedule: lbe_ops.train.compiled_model):
model A is traced and run inside `lbe_ops.use_backend(paths[0])`, model B inside
`use_backend(paths[1])`, both from the same initial weights (B's multiplied by (1 + EPS * N(0, 1))
with --perturb EPS). Both take the same batches, those of lbe-train's fit() for --seed, one
`train_on_batch` step each in turn, so that model A's run is lbe-train's run on path A, step for
step (without --perturb, B's is lbe-train's on path B). After every step it compares every weight
tensor (each regularized layer's kernel and bias, the head's, the alpha vector) of A and B:

    weight_rel   |w_A - w_B| / |w_A|                           (Frobenius norms)
    update_rel   max|u_A - u_B| / max|u_A|, u = the step's change of the tensor

For kernels, biases and the alphas apart it records the first step where their weights differ at
all, and the first where weight_rel passes 1e-6, 1e-4 and --part (default 1e-2), which tensors,
and stops when a kernel passes --part (the runs have parted) unless --full is given, and after
--stop-after epochs in any case. The biases start at zero, and Adam's first steps are +-lr
whatever the size of the gradient: where it is a rounding error (a vanishing gradient), two runs'
biases part within a few steps while their kernels still agree. Whether path "op" really ran the op
is checked (backend_info() and the Lbe> ops in the traced step); a run whose op side did not is
an error. Writes, into --out:

    comparison.json     settings, per step the largest differences (and where), the milestones,
                        per-tensor differences at every epoch end and milestone, the test
                        accuracies of A and B after every epoch
    comparison.png      largest differences per step; kernels' weight_rel, layer x epoch
"""

import copy
import math
import os
import sys
import time

# One BLAS thread, set before numpy loads OpenBLAS: the measurements' small products and
# eigenvalue problems ran 10 times slower on OpenBLAS's threads, which contend with TensorFlow's.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

# The sibling script, also where PYTHONSAFEPATH leaves the script's folder off sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diagnose_train import (  # noqa: E402
    add_perturbation_options, edges, finite, finite_list, layer_variables, parse, perturbed,
    prepare, write_json)

COMPARISON_VERSION = 1
OUTPUT_FILES = ("comparison.json", "comparison.png")
MILESTONES = (1e-6, 1e-4)
KINDS = ("kernel", "bias", "alphas")

DEFINITIONS = {
    "weight_rel": "|w_A - w_B| / |w_A| (Frobenius norms) after the step; 0 where both are 0",
    "update_rel": "max|u_A - u_B| / max|u_A|, u the change of the tensor in the step; 0 where "
                  "both are 0",
    "steps_per_decade": "per kind of tensor, steps over which its largest weight_rel grew "
                        "tenfold, from the first step above 1e-6 to the first above --part (a "
                        "log-linear rate: a constant one is the signature of chaotic growth of "
                        "a small difference)",
}


def _comparison_options(parser):
    parser.description = __doc__.split("\n")[0]
    group = parser.add_argument_group("comparison")
    group.add_argument("--paths", nargs=2, choices=("op", "tf"), default=["op", "tf"],
                       metavar=("A", "B"),
                       help="the backends of model A and model B (in place of --backend; "
                            "--no-baseline does nothing here)")
    group.add_argument("--part", type=float, default=1e-2, metavar="THRESHOLD",
                       help="the runs have parted when a kernel's weight_rel passes THRESHOLD")
    group.add_argument("--full", action="store_true",
                       help="go on to the last epoch after parting")
    group.add_argument("--stop-after", type=int, metavar="EPOCHS",
                       help="compare at most this many epochs (the learning-rate schedule still "
                            "spans --epochs)")
    add_perturbation_options(parser, "model B's")


def weight_rel(a, b):
    norm = float(np.linalg.norm(a))
    difference = float(np.linalg.norm(a - b))
    return difference / norm if norm > 0 else (0.0 if difference == 0 else math.inf)


def update_rel(update_a, update_b):
    largest = float(np.max(np.abs(update_a))) if update_a.size else 0.0
    difference = float(np.max(np.abs(update_a - update_b))) if update_a.size else 0.0
    return difference / largest if largest > 0 else (0.0 if difference == 0 else math.inf)


class Side:
    """One of the two models: its backend, its compiled model and the tensors compared."""

    def __init__(self, parser, args, path, data, validation, weights):
        import lbe_ops
        from lbe_ops import train

        self.path = path
        self.args = copy.copy(args)
        self.args.backend = path
        with lbe_ops.use_backend(path):
            self.info = train.checked_backend(parser, self.args)
            self.model, self.train_ds, _, self.test_ds = train.compiled_model(
                "lbe", self.args, data, validation, weights)
        head = self.model.get_layer("logits")
        self.tensors = [(f"{name}/{kind}", variable)
                        for name, kernel, bias in layer_variables(self.model)
                        for kind, variable in (("kernel", kernel), ("bias", bias))]
        self.tensors += [("logits/kernel", head.kernel), ("logits/bias", head.bias),
                         ("alphas", self.model.lbe_alphas)]
        self.op_in_graph = None
        self.losses = []
        self.step_seconds = []

    def weights(self):
        return [variable.numpy() for _, variable in self.tensors]

    def step(self, x, y):
        import lbe_ops

        started = time.perf_counter()
        with lbe_ops.use_backend(self.path):  # (train_on_batch resets the metrics first)
            logs = self.model.train_on_batch(x, y, return_dict=True)
        self.step_seconds.append(time.perf_counter() - started)
        self.losses.append(finite(logs["loss"], 8))

    def test_accuracy(self):
        import lbe_ops

        with lbe_ops.use_backend(self.path):
            return finite(self.model.evaluate(self.test_ds, verbose=0,
                                              return_dict=True)["accuracy"])

    def check_graph(self):
        """Whether the traced step runs a Lbe> op, against what the path promises."""
        from lbe_ops.bench.fit import lbe_op_in_train_function

        self.op_in_graph = lbe_op_in_train_function(self.model)
        expected = self.path == "op"
        if self.op_in_graph is None:
            print(f"warning: cannot tell whether the '{self.path}' model's step runs the op",
                  flush=True)
        elif self.op_in_graph != expected:
            raise SystemExit(f"the '{self.path}' model's traced step "
                             f"{'does not run' if expected else 'runs'} the Lbe> op")

    def describe(self):
        # The first steps trace (the last, partial batch of an epoch traces once more).
        steady = self.step_seconds[2:]
        return {"path": self.path, "backend": self.info["backend"],
                "backend_reason": self.info["reason"], "library": self.info["library"],
                "lbe_op_in_graph": self.op_in_graph,
                "first_step_s": round(self.step_seconds[0], 2) if self.step_seconds else None,
                "median_step_s": round(float(np.median(steady)), 4) if steady else None}


def fit_batches(dataset, epoch):
    """An iterator over the batches that fit() gives `epoch` (1-based) of a seeded, reshuffled
    dataset. Keras's epoch iterator makes a new iterator at the end of each epoch, which the
    next epoch replaces with another, so epoch k gets the dataset's (2k - 1)-th shuffle."""
    if epoch > 1:
        iter(dataset)
    return iter(dataset)


def kind_of(name):
    """'kernel', 'bias' or 'alphas' for a tensor name ('dense_3/kernel', 'alphas')."""
    return name.rsplit("/", 1)[-1]


class Milestones:
    """The first step at which each kind of tensor (kernels, biases, the alphas) differs at all,
    and passes each threshold: which tensor, by how much, and the largest ones then."""

    def __init__(self, names, thresholds):
        self.names = names
        self.members = {kind: [i for i, name in enumerate(names) if kind_of(name) == kind]
                        for kind in KINDS}
        self.thresholds = [0.0] + list(thresholds)
        self.first = {kind: {self.label(t): None for t in self.thresholds} for kind in KINDS}

    @staticmethod
    def label(threshold):
        return "any" if threshold == 0 else f"{threshold:g}"

    def update(self, step, epoch, weights_rel):
        """Records the thresholds passed at this step; returns what was passed, as text."""
        passed = []
        for kind, members in self.members.items():
            for threshold in self.thresholds:
                label = self.label(threshold)
                if self.first[kind][label] is not None:
                    continue
                above = sorted((i for i in members if weights_rel[i] > threshold),
                               key=lambda i: -weights_rel[i])
                if not above:
                    break  # nor any larger threshold
                self.first[kind][label] = {
                    "step": step, "epoch": epoch, "tensor": self.names[above[0]],
                    "value": finite(weights_rel[above[0]]), "tensors_above": len(above),
                    "largest": [{"tensor": self.names[i], "value": finite(weights_rel[i])}
                                for i in above[:5]]}
                passed.append(f"{kind} {'differs' if threshold == 0 else '> ' + label}")
                print(f"  step {step} (epoch {epoch}): {kind} weight_rel "
                      f"{'> 0' if threshold == 0 else '> ' + label} first in "
                      f"{self.names[above[0]]} ({weights_rel[above[0]]:.3g}; {len(above)} "
                      f"{kind} tensors above)", flush=True)
        return passed

    def growth(self, kind, part, steps_per_epoch):
        """How fast the largest weight_rel of `kind` grew: from the first step above the
        smallest threshold to the step above `part`."""
        start = self.first[kind][self.label(self.thresholds[1])]
        end = self.first[kind][self.label(part)]
        if start is None or end is None or end["step"] <= start["step"]:
            return None
        decades = math.log10(end["value"] / start["value"])
        if decades <= 0:
            return None
        steps = (end["step"] - start["step"]) / decades
        return {"kind": kind, "from_step": start["step"], "to_step": end["step"],
                "steps_per_decade": finite(steps),
                "epochs_per_decade": finite(steps / steps_per_epoch)}


def plot(comparison, path):
    from lbe_ops import _plots
    import matplotlib.colors
    import matplotlib.pyplot as plt

    steps = comparison["steps"]
    per_epoch = comparison["steps_per_epoch"]
    x = np.asarray(steps["step"], dtype=float) / per_epoch
    fig, (ax_steps, ax_layers) = plt.subplots(1, 2, figsize=(14, 5), constrained_layout=True)
    for key, label, style in (("max_weight_rel_kernel", "weight_rel, kernels", "-"),
                              ("max_weight_rel_bias", "weight_rel, biases", "-"),
                              ("max_weight_rel_alphas", "weight_rel, alphas", "-"),
                              ("max_update_rel", "update_rel, all tensors", ":")):
        values = np.array([np.nan if v is None or v == 0 else v for v in steps[key]], float)
        ax_steps.plot(x, values, style, label=label, linewidth=1)
    ax_steps.axhline(comparison["config"]["part_threshold"], color="gray", linestyle="--",
                     linewidth=1, label="--part")
    ax_steps.set(xlabel="epoch (steps / steps per epoch)", ylabel="largest over the tensors",
                 yscale="log", title="A against B after every step")
    ax_steps.grid(alpha=0.3, which="both")
    ax_steps.legend(fontsize=8)
    ends = [c for c in comparison["checkpoints"] if c["why"].startswith(("epoch end", "stop"))]
    kernels = [i for i, name in enumerate(comparison["tensors"]) if name.endswith("/kernel")]
    grid = np.array([[np.nan if c["weight_rel"][i] is None else c["weight_rel"][i]
                      for i in kernels] for c in ends], float).T
    grid[grid <= 0] = np.nan
    finite_values = grid[np.isfinite(grid)]
    if finite_values.size:
        norm = matplotlib.colors.LogNorm(vmin=finite_values.min(), vmax=finite_values.max())
        image = ax_layers.pcolormesh(edges([c["step"] / per_epoch for c in ends]),
                                     np.arange(len(kernels) + 1) + 0.5, grid, norm=norm,
                                     cmap="viridis", shading="flat")
        fig.colorbar(image, ax=ax_layers).set_label("weight_rel of the kernel")
    ax_layers.set(xlabel="epoch", ylabel="layer (last: the head)",
                  title="Kernels' weight_rel at the end of each epoch (white: equal)")
    config = comparison["config"]
    fig.suptitle(f"A = {config['paths'][0]}, B = {config['paths'][1]}"
                 + (f", B's weights perturbed by {config['perturb']:g}" if config["perturb"]
                    else "") + "\n" + _plots._title(config), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser, args = parse(argv, _comparison_options, "lbe-compare", OUTPUT_FILES)
    if not 0 < args.part < 1:
        parser.error(f"--part: expected a threshold in (0, 1), got {args.part}")
    last_epoch = args.epochs if args.stop_after is None else min(args.stop_after, args.epochs)
    if last_epoch < 1:
        parser.error(f"--stop-after: expected a positive number of epochs, got {args.stop_after}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from lbe_ops import train

    started = time.perf_counter()
    data, validation, weights = prepare(parser, args)
    sides = [Side(parser, args, args.paths[0], data, validation, weights),
             Side(parser, args, args.paths[1], data, validation,
                  perturbed(weights, args.perturb, args.perturb_seed))]
    a, b = sides
    names = [name for name, _ in a.tensors]
    steps_per_epoch = int(a.train_ds.cardinality())
    milestones = Milestones(names, sorted({t for t in MILESTONES if t < args.part} | {args.part}))
    kinds = milestones.members
    os.makedirs(args.out, exist_ok=True)
    print(f"compare: A = {a.path} ({a.info['backend']}), B = {b.path} ({b.info['backend']})"
          + (f", B perturbed by {args.perturb:g} (seed {args.perturb_seed})" if args.perturb
             else "") + f"; seed {args.seed}, depth {args.depth}, up to {last_epoch} epochs of "
          f"{steps_per_epoch} steps; output {os.path.abspath(args.out)}", flush=True)

    series = {key: [] for key in ("step", "epoch", "learning_rate", "max_weight_rel",
                                  "max_weight_rel_tensor", "max_update_rel",
                                  "max_update_rel_tensor")
              + tuple(f"max_weight_rel_{kind}" for kind in KINDS)}
    previous = [a.weights(), b.weights()]
    initial = [weight_rel(x, y) for x, y in zip(*previous)]
    checkpoints, accuracies = [], []
    step = 0
    parted = None
    loop_started = time.perf_counter()
    for epoch in range(1, last_epoch + 1):
        for x, y in fit_batches(a.train_ds, epoch):
            learning_rate = float(a.model.optimizer.learning_rate)
            a.step(x, y)
            b.step(x, y)
            step += 1
            if step == 1:
                a.check_graph()
                b.check_graph()
            current = [a.weights(), b.weights()]
            weights_rel = [weight_rel(x_, y_) for x_, y_ in zip(*current)]
            updates_rel = [update_rel(new_a - old_a, new_b - old_b) for new_a, old_a, new_b, old_b
                           in zip(current[0], previous[0], current[1], previous[1])]
            previous = current
            largest = int(np.argmax(weights_rel))
            largest_update = int(np.argmax(updates_rel))
            for key, value in (
                    ("step", step), ("epoch", epoch), ("learning_rate", finite(learning_rate)),
                    ("max_weight_rel", finite(weights_rel[largest])),
                    ("max_weight_rel_tensor", names[largest]),
                    ("max_update_rel", finite(updates_rel[largest_update])),
                    ("max_update_rel_tensor", names[largest_update])):
                series[key].append(value)
            for kind, members in kinds.items():
                series[f"max_weight_rel_{kind}"].append(
                    finite(max(weights_rel[i] for i in members)))
            passed = milestones.update(step, epoch, weights_rel)
            if passed:
                checkpoints.append({"step": step, "epoch": epoch, "why": ", ".join(passed),
                                    "weight_rel": finite_list(weights_rel),
                                    "update_rel": finite_list(updates_rel)})
            parted = milestones.first["kernel"][Milestones.label(args.part)]
            if parted is not None and not args.full:
                break
        ended = "epoch end" if step == epoch * steps_per_epoch else "stop"
        accuracies.append({"epoch": epoch, "step": step, "at": ended,
                           "elapsed_s": round(time.perf_counter() - loop_started, 1),
                           "test_accuracy": [a.test_accuracy(), b.test_accuracy()]})
        if not checkpoints or checkpoints[-1]["step"] != step:
            checkpoints.append({"step": step, "epoch": epoch, "why": ended,
                                "weight_rel": finite_list(weights_rel),
                                "update_rel": finite_list(updates_rel)})
        else:
            checkpoints[-1]["why"] = f"{ended}, {checkpoints[-1]['why']}"
        largest_by_kind = ", ".join(f"{kind} {max(weights_rel[i] for i in members):.3g}"
                                    for kind, members in kinds.items())
        print(f"epoch {epoch}: step {step}, largest weight_rel: {largest_by_kind}; largest "
              f"update_rel {updates_rel[largest_update]:.3g} ({names[largest_update]}); test "
              f"accuracy A {accuracies[-1]['test_accuracy'][0]:.3f}, B "
              f"{accuracies[-1]['test_accuracy'][1]:.3f} ({accuracies[-1]['elapsed_s']:.0f} s)",
              flush=True)
        if parted is not None and not args.full:
            break

    config = train.run_config(a.args, data, validation, a.info)
    config.update({"paths": list(args.paths), "perturb": args.perturb,
                   "perturb_seed": args.perturb_seed, "part_threshold": args.part,
                   "full": args.full, "stop_after": last_epoch})
    for key in ("backend", "backend_requested", "baseline"):
        config.pop(key)
    comparison = {
        "version": COMPARISON_VERSION,
        "config": config,
        "sides": [side.describe() for side in sides],
        "definitions": DEFINITIONS,
        "steps_per_epoch": steps_per_epoch,
        "tensors": names,
        "initial_weight_rel": finite(max(initial)),
        "milestones": milestones.first,
        "parted": parted,
        "growth": {kind: milestones.growth(kind, args.part, steps_per_epoch) for kind in KINDS},
        "steps": {**series, "loss_a": a.losses, "loss_b": b.losses},
        "checkpoints": checkpoints,
        "test_accuracy": accuracies,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "environment": train._environment(),
    }
    write_json(os.path.join(args.out, "comparison.json"), comparison)
    plot(comparison, os.path.join(args.out, "comparison.png"))
    if parted is None:
        print(f"\nthe kernels of A and B did not part (weight_rel <= {args.part:g}) in {step} "
              "steps")
    else:
        print(f"\nthe kernels of A and B parted at step {parted['step']} (epoch "
              f"{parted['epoch']}): {parted['tensor']} weight_rel {parted['value']:.3g}")
    for kind, growth in comparison["growth"].items():
        if growth:
            print(f"the largest {kind} weight_rel grew tenfold every "
                  f"{growth['steps_per_decade']:.0f} steps ({growth['epochs_per_decade']:.2f} "
                  f"epochs) from step {growth['from_step']} to {growth['to_step']}")
    for name in OUTPUT_FILES:
        print(f"wrote {os.path.join(args.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
