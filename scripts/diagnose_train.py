#!/usr/bin/env python
"""One lbe-train run, measured per epoch and per regularized layer (issue 26, item 1).

    python scripts/diagnose_train.py --seed 6 --backend tf --out diag-tf-6
    python scripts/diagnose_train.py --seed 0 --backend op --epochs-every 5 --out diag-op-0
    python scripts/diagnose_train.py --seed 0 --run baseline --out diag-baseline-0
    python scripts/diagnose_train.py --seed 0 --perturb 1e-7 --perturb-seed 1 --out diag-p1

Trains the network of `lbe-train` exactly as lbe-train does for the same options (its parser,
data split, datasets, initial weights, learning-rate schedule, wrap() and compile(), and its
train_one(), so the run's results entry is lbe-train's), one run: `--run lbe` (default) or
`--run baseline` (beta = 0), through one `--backend`. Before the first step and after every
`--epochs-every` N-th epoch (and the last) a callback measures the model on a fixed probe of
training examples; the training itself is untouched (the measurement changes no weight and
draws no random number). Writes, into --out:

    diagnostics.json    config, the quantities' definitions, one record per measured epoch
                        (per-layer values as lists in layer order), and lbe-train's run entry
    diag_layers.png     layer x epoch heatmaps: entropy - target, dead share, effective rank,
                        nearest-class-mean accuracy
    diag_epochs.png     per epoch: accuracies, per-class training accuracy, task and LBE
                        gradient norms, update sizes, learning rate, alphas

Every quantity is defined in DEFINITIONS below (and in the JSON).
"""

import json
import math
import os
import sys
import time
import warnings

# One BLAS thread, set before numpy loads OpenBLAS: the measurements' small products and
# eigenvalue problems ran 10 times slower on OpenBLAS's threads, which contend with TensorFlow's.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from lbe_ops.train import default_out_dir  # noqa: E402
from lbe_ops_cli import build_train_parser, parse_train_args  # noqa: E402

DIAGNOSTICS_VERSION = 1
PROBE_SEED = 0            # the probe does not follow --seed: every run is measured on it
DEFAULT_PROBE_SIZE = 256
NEAR_CONSTANT = 1e-2      # a unit's std below this share of its layer's RMS unit std
RANK_TOLERANCE = 1e-3     # singular values above this share of the largest count to the rank
EVAL_CHUNK = 500
OUTPUT_FILES = ("diagnostics.json", "diag_layers.png", "diag_epochs.png")

DEFINITIONS = {
    "probe": "a fixed set of training examples (class-balanced, chosen with seed 0 whatever "
             "--seed), split into groups of --batch-size: the batches of the measurements",
    "entropy_probe": "batch entropy H of the layer's output over each of the probe's batches, "
                     "averaged over the batches: the mean over the units of 0.5 * ln(pi*e * v "
                     "+ 1), v the unit's variance (ddof 1) from lbe_ops.batch_entropy_moments "
                     "through the run's backend (batch_entropy's value, to rounding)",
    "entropy_train": "mean batch entropy over the epoch's training steps (LBEModel."
                     "layer_entropies(), as lbe-train records it); null at epoch 0",
    "alpha": "the layer's learnable alpha; target = max(alpha_min, |alpha|)",
    "entropy_minus_target": "entropy_probe - target",
    "dead_share": "share of the layer's units whose output is the same for every probe example",
    "near_constant_share": f"share of units whose std over the probe is at most {NEAR_CONSTANT:g}"
                           " x the layer's RMS unit std (dead units included)",
    "effective_rank": "exp of the Shannon entropy of p_i = s_i / sum(s), s the singular values "
                      "of the layer's probe outputs [examples, units] centered per unit (Roy & "
                      "Vetterli 2007): how many directions the layer carries",
    "rank": f"number of those singular values above {RANK_TOLERANCE:g} x the largest",
    "ncm_accuracy": "accuracy on the probe of the nearest class mean (Euclidean, class means of "
                    "the probe) in the layer's outputs: falls where classes merge",
    "closest_pair": "the two classes whose probe means are closest relative to their spread: "
                    "|mu_a - mu_b| / sqrt((r_a^2 + r_b^2) / 2), r_c^2 the mean squared distance"
                    " of class c's examples to mu_c; closest_separation is that ratio",
    "grad_task_*": "norm of the task part of the gradient: d/dw of mean_b (1 + lbe_b) * CE_b "
                   "with (1 + lbe_b) held constant, over the probe's batches b",
    "grad_lbe_*": "norm of the LBE part: d/dw of mean_b CE_b * lbe_b with CE_b held constant, "
                  "through the run's backend's entropy gradient (one call for all batches and "
                  "layers, each unit's gradient weighted by d(CE_b * lbe_b)/dH of its batch "
                  "and layer). grad_task + grad_lbe is the gradient of mean_b CE_b * (1 + "
                  "lbe_b), the mean of the training loss's gradients on the probe's batches "
                  "(before clipping)",
    "grad_cosine_kernel": "cosine between the task and LBE parts of the kernel's gradient",
    "grad_lbe_alpha": "d/dalpha of the LBE part (the alphas get no task gradient)",
    "adam_step_*": "norm of the epoch's last Adam step as Adam applied it: lr * sqrt(1 - b2^t) /"
                   " (1 - b1^t) * m / (sqrt(v) + eps), from the optimizer's m and v after step "
                   "t, lr of that step (weight decay not included)",
    "epoch_change_*": "norm of the change of the weights over the epoch (all its steps)",
    "*_norm": "Frobenius norm of the weights at the end of the epoch",
    "learning_rate": "the learning rate of the epoch's last step (at epoch 0: of the first)",
    "train_class_accuracy": "accuracy per class on all training examples (the weights at the "
                            "end of the epoch, inference mode)",
    "train_confusion": "[true class][predicted class] counts on all training examples",
    "top_confusions": "the largest off-diagonal entries of train_confusion",
}


# --------------------------------------------------------------------------------------------
# Command line (lbe-train's options, plus the measurement's)

def add_perturbation_options(parser, whose):
    group = parser.add_argument_group("perturbation")
    group.add_argument("--perturb", type=float, default=0.0, metavar="EPS",
                       help=f"multiply {whose} initial weights elementwise by (1 + EPS * N(0, 1))"
                            " (0: no perturbation)")
    group.add_argument("--perturb-seed", type=int, default=0,
                       help="seed of the perturbation's normal numbers")
    return group


def parse(argv, add_options, prefix, output_files):
    """(parser, args): lbe-train's parser with the script's options (add_options(parser) adds
    them); --out defaults to a new ./<prefix>-<time> and must not hold `output_files` unless
    --overwrite is given."""
    parser = build_train_parser()
    parser.prog = os.path.basename(sys.argv[0])
    add_options(parser)
    parser, args = parse_train_args(argv, parser)
    if args.out is None:
        args.out = default_out_dir(prefix)
    elif not args.overwrite:
        earlier = [name for name in output_files if os.path.exists(os.path.join(args.out, name))]
        if earlier:
            parser.error(f"--out: {args.out} already holds {', '.join(earlier)}; choose another "
                         "folder, or give --overwrite")
    if not math.isfinite(args.perturb) or args.perturb < 0:
        parser.error(f"--perturb: expected a number >= 0, got {args.perturb}")
    return parser, args


def _diagnosis_options(parser):
    parser.description = __doc__.split("\n")[0]
    group = parser.add_argument_group("diagnosis")
    group.add_argument("--run", choices=("lbe", "baseline"), default="lbe",
                       help="which of lbe-train's two runs to train and measure "
                            "(--no-baseline does nothing here)")
    group.add_argument("--epochs-every", type=int, default=1, metavar="N",
                       help="measure after every N-th epoch (and after the last)")
    group.add_argument("--probe-size", type=int, default=DEFAULT_PROBE_SIZE,
                       help="training examples measured (rounded down to whole batches)")
    add_perturbation_options(parser, "the run's")


# --------------------------------------------------------------------------------------------
# What both scripts share

def prepare(parser, args):
    """(data, validation, initial weights) as lbe-train makes them for the options."""
    import keras

    from lbe_ops import train

    data = train.load_data(parser, args)
    data, validation = train.hold_out_validation(args, data)
    weights = train.initial_weights(keras, args, data)
    return data, validation, weights


def perturbed(weights, eps, seed):
    """Each weight array times (1 + eps * N(0, 1)), elementwise, computed in float64."""
    if eps == 0:
        return weights
    rng = np.random.default_rng(seed)
    return [(w.astype(np.float64) * (1.0 + eps * rng.standard_normal(w.shape))).astype(w.dtype)
            for w in weights]


def layer_variables(model):
    """[(layer name, kernel, bias)] of the regularized layers, in depth order."""
    from lbe_ops.keras.alphas import regularized_layers

    return [(layer.name, layer.kernel, layer.bias) for layer, _ in regularized_layers(model)]


def write_json(path, content):
    with open(path, "w") as f:
        json.dump(content, f, indent=1, allow_nan=False)


def finite(value, digits=6):
    """A float for JSON: rounded to `digits` significant digits; None where not finite."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def finite_list(values, digits=6):
    return [finite(v, digits) for v in values]


# --------------------------------------------------------------------------------------------
# The measurements

def probe_indices(labels, count, seed=PROBE_SEED):
    """`count` training examples, as many of each class as can be (round robin over the classes
    in a seeded order), shuffled."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    rank_in_class = np.zeros(len(labels))
    for label in np.unique(labels):
        members = order[labels[order] == label]
        rank_in_class[members] = np.arange(len(members))
    picked = order[np.argsort(rank_in_class[order], kind="stable")][:count]
    return rng.permutation(picked)


def probe_count(requested, batch_size, available):
    """Whole batches of --batch-size within `requested` (at least one) and the data."""
    batches = max(1, min(requested, available) // batch_size)
    return min(batches * batch_size, available)


def unit_statistics(outputs):
    """(dead share, near-constant share) of one layer's outputs [examples, units]."""
    dead = np.ptp(outputs, axis=0) == 0
    std = outputs.std(axis=0)
    rms = math.sqrt(float(np.mean(std ** 2)))
    return float(dead.mean()), float((std <= NEAR_CONSTANT * rms).mean())


def ranks(outputs):
    """(effective rank, rank) of one layer's outputs [examples, units], centered per unit."""
    centered = outputs - outputs.mean(axis=0)
    # The squared singular values are the eigenvalues of the smaller Gram matrix (in float64).
    gram = centered @ centered.T if len(centered) < centered.shape[1] else centered.T @ centered
    singular = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None))[::-1]
    total = float(singular.sum())
    if total == 0:
        return 0.0, 0
    p = singular[singular > 0] / total
    return math.exp(-float(np.sum(p * np.log(p)))), int(np.sum(singular > RANK_TOLERANCE
                                                                  * singular[0]))


def class_separation(outputs, labels):
    """(nearest-class-mean accuracy, closest pair [a, b], its separation) on the probe."""
    classes = [c for c in np.unique(labels) if np.sum(labels == c) >= 2]
    means = np.stack([outputs[labels == c].mean(axis=0) for c in classes])
    radii = np.array([np.mean(np.sum((outputs[labels == c] - means[i]) ** 2, axis=1))
                      for i, c in enumerate(classes)])
    squared = (np.sum(outputs ** 2, axis=1)[:, None] - 2 * outputs @ means.T
               + np.sum(means ** 2, axis=1)[None, :])
    kept = np.isin(labels, classes)
    predicted = np.asarray(classes)[np.argmin(squared, axis=1)]
    accuracy = float(np.mean(predicted[kept] == labels[kept]))
    between = np.sqrt(np.clip(np.sum(means ** 2, axis=1)[:, None] - 2 * means @ means.T
                              + np.sum(means ** 2, axis=1)[None, :], 0, None))
    spread = np.sqrt((radii[:, None] + radii[None, :]) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(spread > 0, between / spread, np.where(between > 0, np.inf, 0.0))
    ratio[np.tril_indices(len(classes))] = np.inf
    i, j = np.unravel_index(np.argmin(ratio), ratio.shape)
    return accuracy, [int(classes[i]), int(classes[j])], float(ratio[i, j])


def top_confusions(confusion, count=3):
    """The `count` largest off-diagonal entries: {true, predicted, count, share of true}."""
    off = confusion.astype(float).copy()
    np.fill_diagonal(off, -1)
    order = np.argsort(off, axis=None)[::-1][:count]
    rows = confusion.sum(axis=1)
    found = []
    for flat in order:
        true, predicted = np.unravel_index(flat, confusion.shape)
        if confusion[true, predicted] <= 0:
            break
        found.append({"true": int(true), "predicted": int(predicted),
                      "count": int(confusion[true, predicted]),
                      "share_of_true": finite(confusion[true, predicted] / max(rows[true], 1))})
    return found


def _norms(arrays):
    return [float(np.linalg.norm(a)) for a in arrays]


def _learning_rate_at(optimizer, step):
    import keras

    schedule = optimizer._learning_rate
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        return float(keras.ops.convert_to_numpy(schedule(step)))
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def _by_batch(output, groups, group_size):
    """[groups * group_size, ...] -> [group_size, groups * units]: the units of each batch of
    the probe side by side (column g * units + j: unit j over batch g)."""
    import tensorflow as tf

    grouped = tf.reshape(output, (groups, group_size, -1))
    return tf.reshape(tf.transpose(grouped, (1, 0, 2)), (group_size, -1))


def _batch_entropies(columns, units, groups, ddof):
    """[groups, layers]: each layer's batch entropy over each batch of the probe, the mean of
    its units' 0.5 * ln(pi*e * variance + 1) (as lbe_ops computes it), from the variances of
    all columns in one call."""
    import tensorflow as tf

    from lbe_ops import ops, reference

    _, _, variance = ops.batch_entropy_moments(columns, ddof=ddof)
    per_unit = reference.entropy_from_variance(variance)
    return tf.stack([tf.reduce_mean(tf.reshape(part, (groups, u)), axis=1)
                     for part, u in zip(tf.split(per_unit, [groups * u for u in units]), units)],
                    axis=1)


def make_diagnostics_callback(args, data):
    """The callback that measures the run (see DEFINITIONS); its `records` and `layers` go into
    diagnostics.json."""
    import keras
    import tensorflow as tf

    from lbe_ops.keras import _capture, _loss, _steps
    from lbe_ops.keras.alphas import alpha_vector as _alpha_vector

    count = probe_count(args.probe_size, args.batch_size, len(data.y_train))
    picked = probe_indices(data.y_train, count)
    probe_x, probe_y = data.x_train[picked], data.y_train[picked]
    groups = count // args.batch_size or 1
    group_size = count // groups

    class Diagnostics(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.records = []
            self.layers = []
            self.measure_seconds = 0.0
            self.probe = {"examples": int(count), "batches": int(groups),
                          "batch_size": int(group_size),
                          "class_counts": np.bincount(probe_y).tolist()}
            self._start_weights = None

        def measured(self, epoch):
            """Whether the end of `epoch` (1-based; 0: before training) is measured."""
            return epoch == 0 or epoch % args.epochs_every == 0 or epoch == args.epochs

        # -- the two compiled measurements ----------------------------------------------------

        def _build(self):
            model = self.model
            self._variables = layer_variables(model)
            self.layers = [name for name, _, _ in self._variables]
            weights = [v for _, kernel, bias in self._variables for v in (kernel, bias)]
            alphas = model.lbe_alphas
            targets = weights + ([alphas] if alphas is not None else [])

            regularizers = model.lbe_regularizers
            (ddof,) = {regularizer.ddof for regularizer in regularizers}
            valid = tf.ones((len(regularizers),), tf.float32)

            @tf.function
            def probe(x, y):
                with tf.GradientTape(persistent=True) as tape:
                    with _capture.capturing() as capture:
                        logits = model(x, training=True)
                    outputs = [output for _, output in capture.records]
                    units = [int(np.prod(output.shape[1:])) for output in outputs]
                    # All layers' outputs as one [batch size, columns] tensor, layer after layer,
                    # batch after batch: column (layer l, batch g, unit j) holds unit j of l over
                    # the examples of the probe's batch g.
                    columns = tf.concat([_by_batch(output, groups, group_size)
                                         for output in outputs], axis=1)
                    with tape.stop_recording():
                        entropies = _batch_entropies(columns, units, groups, ddof)  # [G, L]
                    task = tf.stack([model.compute_task_loss(
                        None, y[g * group_size:(g + 1) * group_size],
                        logits[g * group_size:(g + 1) * group_size]) for g in range(groups)])
                    with tf.GradientTape() as by_entropy:
                        by_entropy.watch(entropies)
                        lbe = tf.stack([_steps.penalty(
                            regularizers, entropies[g], valid,
                            lambda rs: _alpha_vector(list(model._lbe_stores), rs))
                                        for g in range(groups)])
                        lbe_part = tf.reduce_mean(tf.stop_gradient(task) * lbe)
                    task_part = tf.reduce_mean(tf.stop_gradient(1.0 + lbe) * task)
                    # The LBE part's gradient goes through the library's entropy gradient, in
                    # one call for all batches and layers (the pure-TF path costs a tf.cond per
                    # tensor to trace: one per batch and layer took minutes at depth 100).
                    # Column (l, g, j) is weighted so that d surrogate / d column =
                    # d lbe_part / d H_gl * d H_gl / d column.
                    weights = tf.stop_gradient(by_entropy.gradient(lbe_part, entropies))
                    total = groups * sum(units)
                    scale = tf.concat([tf.repeat(weights[:, l] * (total / u), u)
                                       for l, u in enumerate(units)], axis=0)
                    weighted = (tf.stop_gradient(columns)
                                + (columns - tf.stop_gradient(columns)) * scale)
                    surrogate = _loss.local_entropies([weighted], [ddof])[0]
                    # The alphas' LBE gradient comes from lbe_part (the surrogate does not reach
                    # them), the weights' from the surrogate (lbe_part does not reach them).
                    lbe_target = surrogate + lbe_part
                task_grads, lbe_grads = (
                    [tf.zeros(v.shape) if g is None else g
                     for v, g in zip(targets, tape.gradient(part, targets))]
                    for part in (task_part, lbe_target))
                return {"outputs": outputs, "logits": logits,
                        "entropy": tf.reduce_mean(entropies, axis=0),
                        "task_part": task_part, "lbe_part": lbe_part,
                        "task_grads": task_grads, "lbe_grads": lbe_grads}

            @tf.function(input_signature=[tf.TensorSpec((None,) + data.image_shape, tf.float32)])
            def predict(x):
                with _capture.regularizers_disabled():
                    return tf.argmax(model(x, training=False), axis=-1)

            self._probe, self._predict = probe, predict
            self._alpha_mins = np.array([r.alpha_min for r in model.lbe_regularizers])

        # -- Keras hooks ------------------------------------------------------------------------

        def on_train_begin(self, logs=None):
            started = time.perf_counter()
            self._build()
            self._record(0, {}, started)

        def on_epoch_begin(self, epoch, logs=None):
            if self.measured(epoch + 1):
                self._start_weights = [(kernel.numpy(), bias.numpy())
                                       for _, kernel, bias in self._variables]

        def on_epoch_end(self, epoch, logs=None):
            if not self.measured(epoch + 1):
                return
            self._record(epoch + 1, logs or {}, time.perf_counter())

        def _record(self, epoch, logs, started):
            record = self._measure(epoch, logs)
            record["measure_time_s"] = round(time.perf_counter() - started, 3)
            self.measure_seconds += record["measure_time_s"]
            self.records.append(record)

        # -- one measurement ----------------------------------------------------------------------

        def _measure(self, epoch, logs):
            model = self.model
            result = self._probe(tf.constant(probe_x), tf.constant(probe_y))
            layers = {key: [] for key in (
                "entropy_probe", "entropy_train", "alpha", "target", "entropy_minus_target",
                "dead_share", "near_constant_share", "effective_rank", "rank", "ncm_accuracy",
                "closest_pair", "closest_separation")}
            train_entropy = model.layer_entropies() if epoch > 0 else {}
            alphas = (keras.ops.convert_to_numpy(model.lbe_alphas)
                      if model.lbe_alphas is not None else np.full(len(self.layers), np.nan))
            targets = np.maximum(self._alpha_mins, np.abs(alphas))
            entropy = result["entropy"].numpy()
            for i, (name, output) in enumerate(zip(self.layers, result["outputs"])):
                output = output.numpy().reshape(count, -1).astype(np.float64)
                dead, near = unit_statistics(output)
                effective, rank = ranks(output)
                ncm, pair, separation = class_separation(output, probe_y)
                layers["entropy_probe"].append(finite(entropy[i]))
                layers["entropy_train"].append(
                    finite(train_entropy[name]) if name in train_entropy else None)
                layers["alpha"].append(finite(alphas[i]))
                layers["target"].append(finite(targets[i]))
                layers["entropy_minus_target"].append(finite(entropy[i] - targets[i]))
                layers["dead_share"].append(finite(dead))
                layers["near_constant_share"].append(finite(near))
                layers["effective_rank"].append(finite(effective))
                layers["rank"].append(rank)
                layers["ncm_accuracy"].append(finite(ncm))
                layers["closest_pair"].append(pair)
                layers["closest_separation"].append(finite(separation))
            layers.update(self._gradients(result))
            layers.update(self._updates(epoch))

            predicted = np.concatenate([
                self._predict(tf.constant(data.x_train[i:i + EVAL_CHUNK])).numpy()
                for i in range(0, len(data.y_train), EVAL_CHUNK)])
            classes = data.num_classes
            confusion = np.zeros((classes, classes), np.int64)
            np.add.at(confusion, (data.y_train, predicted), 1)
            per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
            iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
            probe_logits = result["logits"].numpy()
            return {
                "epoch": epoch,
                "iterations": iterations,
                "learning_rate": finite(_learning_rate_at(model.optimizer,
                                                          max(iterations - 1, 0))),
                "logs": {key: finite(value) for key, value in logs.items()
                         if not key.startswith(("entropy/", "val_entropy/"))},
                "probe": {"task_part": finite(result["task_part"]),
                          "lbe_part": finite(result["lbe_part"]),
                          "accuracy": finite(np.mean(np.argmax(probe_logits, -1) == probe_y))},
                "train_accuracy_end": finite(np.mean(predicted == data.y_train)),
                "train_class_accuracy": finite_list(per_class, 4),
                "train_confusion": confusion.tolist(),
                "top_confusions": top_confusions(confusion),
                "global": {
                    "grad_task_norm": finite(np.sqrt(sum(
                        np.sum(g.numpy() ** 2) for g in result["task_grads"]))),
                    "grad_lbe_norm": finite(np.sqrt(sum(
                        np.sum(g.numpy() ** 2) for g in result["lbe_grads"]))),
                },
                "layers": layers,
            }

        def _gradients(self, result):
            task = [g.numpy() for g in result["task_grads"]]
            lbe = [g.numpy() for g in result["lbe_grads"]]
            depth = len(self.layers)
            kernel_task, kernel_lbe = task[0:2 * depth:2], lbe[0:2 * depth:2]
            cosine = [float(np.vdot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
                      if np.linalg.norm(a) * np.linalg.norm(b) > 0 else math.nan
                      for a, b in zip(kernel_task, kernel_lbe)]
            return {
                "grad_task_kernel": finite_list(_norms(kernel_task)),
                "grad_lbe_kernel": finite_list(_norms(kernel_lbe)),
                "grad_task_bias": finite_list(_norms(task[1:2 * depth:2])),
                "grad_lbe_bias": finite_list(_norms(lbe[1:2 * depth:2])),
                "grad_cosine_kernel": finite_list(cosine),
                "grad_lbe_alpha": (finite_list(lbe[2 * depth]) if len(lbe) > 2 * depth
                                   else [None] * depth),
            }

        def _updates(self, epoch):
            optimizer = self.model.optimizer
            t = int(keras.ops.convert_to_numpy(optimizer.iterations))
            kernels = [kernel.numpy() for _, kernel, _ in self._variables]
            biases = [bias.numpy() for _, _, bias in self._variables]
            values = {"kernel_norm": finite_list(_norms(kernels)),
                      "bias_norm": finite_list(_norms(biases))}
            for kind, index in (("kernel", 1), ("bias", 2)):
                steps = [None] * len(kernels)
                if t > 0:
                    b1, b2 = float(optimizer.beta_1), float(optimizer.beta_2)
                    scale = (_learning_rate_at(optimizer, t - 1) * math.sqrt(1 - b2 ** t)
                             / (1 - b1 ** t))
                    steps = []
                    for entry in self._variables:
                        slot = optimizer._get_variable_index(entry[index])
                        m = optimizer._momentums[slot].numpy()
                        v = optimizer._velocities[slot].numpy()
                        steps.append(finite(scale * np.linalg.norm(
                            m / (np.sqrt(v) + optimizer.epsilon))))
                values[f"adam_step_{kind}"] = steps
                changes = [None] * len(kernels)
                if epoch > 0 and self._start_weights is not None:
                    now = kernels if kind == "kernel" else biases
                    changes = finite_list(_norms(
                        [w - start[index - 1] for w, start in zip(now, self._start_weights)]))
                values[f"epoch_change_{kind}"] = changes
            return values

    return Diagnostics()


# --------------------------------------------------------------------------------------------
# Figures

def _matrix(records, key):
    """[layer, measured epoch] float array of records' per-layer `key`."""
    return np.array([[np.nan if v is None else v for v in r["layers"][key]] for r in records],
                    dtype=float).T


def edges(epochs):
    """Cell edges around the measured epochs (which need not be evenly spaced)."""
    epochs = np.asarray(epochs, dtype=float)
    if len(epochs) == 1:
        return np.array([epochs[0] - 0.5, epochs[0] + 0.5])
    middle = (epochs[1:] + epochs[:-1]) / 2
    return np.concatenate([[epochs[0] - (middle[0] - epochs[0])], middle,
                           [epochs[-1] + (epochs[-1] - middle[-1])]])


def _heading(diagnostics):
    from lbe_ops import _plots

    config, run = diagnostics["config"], diagnostics["run"]
    perturbation = (f", initial weights perturbed by {config['perturb']:g} (seed "
                    f"{config['perturb_seed']})" if config["perturb"] else "")
    return (f"{config['run']} run through {config['backend']}{perturbation}: test accuracy "
            f"{run['final_test_accuracy']:.3f} (epoch {run['reported_epoch']}), last epoch "
            f"{run['last_epoch_test_accuracy']:.3f}\n" + _plots._title(config))


def plot_layers(diagnostics, path):
    from lbe_ops import _plots  # noqa: F401  (chooses matplotlib's headless backend)
    import matplotlib.pyplot as plt

    records = diagnostics["epochs"]
    epochs = [r["epoch"] for r in records]
    depth = len(diagnostics["layers"])
    panels = (
        ("entropy_minus_target", "entropy - target (nats), probe", "RdBu_r", "symmetric"),
        ("dead_share", "share of dead units", "magma", (0, 1)),
        ("effective_rank", "effective rank", "viridis", None),
        ("ncm_accuracy", "nearest-class-mean accuracy", "viridis", (0, 1)),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.6),
                             constrained_layout=True)
    x_edges, y_edges = edges(epochs), np.arange(depth + 1) + 0.5
    for ax, (key, label, cmap, limits) in zip(axes, panels):
        grid = _matrix(records, key)
        if limits == "symmetric":
            bound = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
            limits = (-max(bound, 1e-6), max(bound, 1e-6))
        vmin, vmax = limits if limits else (None, None)
        image = ax.pcolormesh(x_edges, y_edges, grid, cmap=cmap, vmin=vmin, vmax=vmax,
                              shading="flat")
        fig.colorbar(image, ax=ax, shrink=0.9).set_label(label)
        ax.set(xlabel="epoch (0: before training)", ylabel="layer (1: next to the input)",
               title=label)
    fig.suptitle(_heading(diagnostics), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _over_layers(statistic, grid):
    """np.nanmedian / nanmin / nanmax of a [layer, epoch] grid over the layers; NaN (without a
    warning) where no layer has a value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return statistic(grid, axis=0)


def plot_epochs(diagnostics, path):
    from lbe_ops import _plots
    import matplotlib.pyplot as plt

    records = diagnostics["epochs"]
    epochs = np.array([r["epoch"] for r in records])
    history = diagnostics["run"]["history"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.4), constrained_layout=True)
    ax = axes[0, 0]
    for key, label, style in (("train_accuracy", "train (mean over the epoch)", "-"),
                              ("validation_accuracy", "validation", "--"),
                              ("test_accuracy", "test", ":")):
        ax.plot(history["epoch"], _plots._series(history[key]), style, label=label)
    ax.plot(epochs, [r["train_accuracy_end"] for r in records], "k.", markersize=4,
            label="train, end of epoch")
    ax.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title="Accuracy")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    per_class = np.array([r["train_class_accuracy"] for r in records], dtype=float)
    for c in range(per_class.shape[1]):
        ax.plot(epochs, per_class[:, c], label=str(c))
    ax.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02),
           title="Training accuracy per class (end of epoch)")
    ax.legend(fontsize=7, ncol=2, title="class", title_fontsize=7)
    ax = axes[0, 2]
    for part, color in (("task", "#1f77b4"), ("lbe", "#d62728")):
        ax.plot(epochs, [r["global"][f"grad_{part}_norm"] for r in records], color=color,
                label=f"{part}: all weights")
        grid = _matrix(records, f"grad_{part}_kernel")
        ax.plot(epochs, _over_layers(np.nanmedian, grid), "--", color=color,
                label=f"{part}: kernel, median layer")
        ax.plot(epochs, _over_layers(np.nanmax, grid), ":", color=color,
                label=f"{part}: kernel, largest layer")
    ax.set(xlabel="epoch", ylabel="gradient norm (probe)", yscale="log",
           title="Task and LBE parts of the gradient")
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    for key, color in (("adam_step_kernel", "#2ca02c"), ("epoch_change_kernel", "#9467bd")):
        relative = _matrix(records, key) / _matrix(records, "kernel_norm")
        ax.plot(epochs, _over_layers(np.nanmedian, relative), color=color,
                label=f"{key} / kernel_norm, median layer")
        ax.plot(epochs, _over_layers(np.nanmax, relative), ":", color=color,
                label="largest layer")
    ax.set(xlabel="epoch", ylabel="relative size", yscale="log", title="Update sizes (kernels)")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    ax.plot(epochs, [r["learning_rate"] for r in records], color="k")
    ax.set(xlabel="epoch", ylabel="learning rate", title="Learning rate (last step of the epoch)")
    ax = axes[1, 2]
    for key, label in (("alpha", "alpha"), ("entropy_probe", "entropy (probe)")):
        grid = _matrix(records, key)
        lines = ax.plot(epochs, _over_layers(np.nanmedian, grid), label=f"{label}, median layer")
        ax.fill_between(epochs, _over_layers(np.nanmin, grid), _over_layers(np.nanmax, grid),
                        color=lines[0].get_color(), alpha=0.2)
    ax.set(xlabel="epoch", ylabel="nats", title="Alphas and entropies (band: min to max layer)")
    ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(_heading(diagnostics), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------

def main(argv=None):
    parser, args = parse(argv, _diagnosis_options, "lbe-diagnose", OUTPUT_FILES)
    if args.epochs_every < 1 or args.probe_size < 2:
        parser.error("--epochs-every must be >= 1 and --probe-size >= 2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import lbe_ops
    from lbe_ops import train

    with lbe_ops.use_backend(args.backend):
        info = train.checked_backend(parser, args)
        data, validation, weights = prepare(parser, args)
        weights = perturbed(weights, args.perturb, args.perturb_seed)
        os.makedirs(args.out, exist_ok=True)
        print(f"diagnose: {args.run} run, backend {info['backend']}, seed {args.seed}, depth "
              f"{args.depth}, {args.epochs} epochs, measured every {args.epochs_every}; output "
              f"{os.path.abspath(args.out)}", flush=True)
        diagnostics = make_diagnostics_callback(args, data)
        run = train.train_one(args.run, args, data, validation, weights, args.quiet,
                              callbacks=[diagnostics])
    config = train.run_config(args, data, validation, info)
    config.update({"run": args.run, "baseline": args.run == "baseline",
                   "epochs_every": args.epochs_every,
                   "perturb": args.perturb, "perturb_seed": args.perturb_seed,
                   "probe": diagnostics.probe})
    wall = run["wall_time_s"]
    result = {
        "version": DIAGNOSTICS_VERSION,
        "config": config,
        "definitions": DEFINITIONS,
        "layers": diagnostics.layers,
        "epochs": diagnostics.records,
        "measure_time_s": round(diagnostics.measure_seconds, 2),
        "training_time_s": round(wall - diagnostics.measure_seconds, 2),
        "run": run,
        "environment": train._environment(),
    }
    write_json(os.path.join(args.out, "diagnostics.json"), result)
    plot_layers(result, os.path.join(args.out, "diag_layers.png"))
    plot_epochs(result, os.path.join(args.out, "diag_epochs.png"))
    measuring = diagnostics.measure_seconds
    print(f"\ntest accuracy {run['final_test_accuracy']:.4f} (epoch {run['reported_epoch']}), "
          f"last epoch {run['last_epoch_test_accuracy']:.4f}; wall {wall:.1f} s, of which "
          f"measuring {measuring:.1f} s (+{100 * measuring / max(wall - measuring, 1e-9):.0f} % "
          "over the run without it)")
    for name in OUTPUT_FILES:
        print(f"wrote {os.path.join(args.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
