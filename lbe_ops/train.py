"""lbe-train: trains one deep plain ReLU network with and without LBE, and compares the two.

    lbe-train                                   # digits, 100 layers, both runs, ~minutes on a CPU
    lbe-train --data mnist.npz --depth 500 ...  # the paper's setting (see the README, "The main job")

Both runs start from the same weights, see the batches in the same order and are trained by the
same code (lbe_ops.keras.wrap -> LBEModel, Adam); the baseline differs only in beta = 0, so its
loss is the task loss alone while its per-layer batch entropies are still recorded. The output
folder receives results.json, curves.png (test accuracy and task loss per epoch) and
layer_entropy.png (per-layer batch entropy, layer x epoch, for both runs).
"""

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

# The defaults below were chosen by the multi-seed search recorded in the README ("The main job")
# (scripts/sweep_train.py reruns it).
DEFAULTS = {
    "arch": "mlp",
    "depth": 100,
    "width": None,          # per architecture, see DEFAULT_WIDTH
    "epochs": 200,
    "batch_size": 32,
    "lr": 1.5e-4,
    "lr_decay": 0.4,
    "lr_warmup": 0.0,
    "clip_norm": None,
    "alpha": 1.0,
    "alpha_min": 1.0,
    "beta": 0.5,
    "init": "orthogonal",
    "seed": 0,
    "backend": "auto",
}
DEFAULT_WIDTH = {"mlp": 64, "cnn": 8}
INITS = ("torch", "glorot_uniform", "he_uniform", "he_normal", "lecun_normal", "orthogonal")
EVAL_BATCH_SIZE = 500
RESULTS_VERSION = 1


# --------------------------------------------------------------------------------------------
# Command line

def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _batch_size(text):
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"the batch entropy needs a batch of at least 2, got {value}")
    return value


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _checked_float(accept, expected):
    """An argparse type: a finite float for which accept(value) holds, else 'expected ...'."""
    def parse(text):
        value = _finite_float(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_non_negative_float = _checked_float(lambda value: value >= 0, "a number >= 0")
_positive_float = _checked_float(lambda value: value > 0, "a number > 0")
_fraction = _checked_float(lambda value: 0 <= value <= 1, "a fraction in [0, 1]")


def build_parser():
    d = DEFAULTS
    parser = argparse.ArgumentParser(
        prog="lbe-train",
        description=(
            "Train the same deep plain ReLU network (no residuals, no normalization) twice, "
            "with Layerwise Batch-Entropy regularization (LBE, Peer et al., TMLR 2022) and "
            "without, and compare them. With the defaults, on scikit-learn's digits (no "
            "download), the network without LBE stays near chance while LBE trains it."),
        epilog=(
            "Outputs (in --out): results.json (config, per-run final test accuracy, per-epoch "
            "history, per-layer entropies, wall time), curves.png and layer_entropy.png. "
            "The paper's setting: lbe-train --data mnist.npz --depth 500 --width 1000 "
            "--batch-size 128 --lr 1e-5 --lr-decay 0 --init torch --alpha 2.0 --alpha-min 0.2 "
            "--beta 0.1 --epochs 100 "
            "(see the README, 'The main job')."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("network")
    model.add_argument("--arch", choices=("mlp", "cnn"), default=d["arch"],
                       help="mlp: `depth` Dense+ReLU layers; cnn: `depth` 3x3 Conv2D+ReLU layers "
                            "(stride 1, same padding); both end in one linear classifier")
    model.add_argument("--depth", type=_positive_int, default=d["depth"],
                       help="number of hidden ReLU layers (each one is LBE-regularized)")
    model.add_argument("--width", type=_positive_int, default=d["width"],
                       help="units per Dense layer (mlp) or channels per conv layer (cnn); "
                            f"default {DEFAULT_WIDTH['mlp']} (mlp), {DEFAULT_WIDTH['cnn']} (cnn)")
    model.add_argument("--init", choices=INITS, default=d["init"],
                       help="weight initialization; orthogonal: random orthogonal weights "
                            "(gain 1) and zero biases, under which a plain 100-layer ReLU network "
                            "without LBE stays at chance (each ReLU halves the signal); torch: "
                            "PyTorch's default for Linear/Conv (weights and biases "
                            "U(+-1/sqrt(fan_in))), as in the paper's code, which LBE trained on "
                            "fewer seeds here (see the README); the others are Keras "
                            "initializers with zero biases")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=_positive_int, default=d["epochs"])
    train.add_argument("--batch-size", type=_batch_size, default=d["batch_size"])
    train.add_argument("--lr", "--learning-rate", dest="lr", type=_positive_float,
                       default=d["lr"], help="Adam learning rate")
    train.add_argument("--lr-decay", type=_fraction, default=d["lr_decay"], metavar="FRACTION",
                       help="the last FRACTION of the training steps lower the learning rate to "
                            "0 along a half cosine (0: a constant learning rate)")
    train.add_argument("--lr-warmup", type=_fraction, default=d["lr_warmup"], metavar="FRACTION",
                       help="the first FRACTION of the training steps raise the learning rate "
                            "linearly to --lr (0: no warm-up)")
    train.add_argument("--clip-norm", type=_positive_float, default=d["clip_norm"],
                       help="clip the gradient to this global norm (default: no clipping)")
    train.add_argument("--seed", type=int, default=d["seed"],
                       help="seed of the initialization and of the batch order (the same for "
                            "both runs)")
    lbe = parser.add_argument_group("LBE (loss = CE + CE * mean_l beta*(H_l - "
                                    "max(alpha_min, |alpha_l|))^2)")
    lbe.add_argument("--alpha", type=_finite_float, default=d["alpha"],
                     help="initial value of each layer's learnable entropy target alpha_l")
    lbe.add_argument("--alpha-min", type=_non_negative_float, default=d["alpha_min"],
                     help="lower bound of the entropy target")
    lbe.add_argument("--beta", type=_non_negative_float, default=d["beta"],
                     help="strength of the LBE term")
    run = parser.add_argument_group("data, runs and output")
    run.add_argument("--data", metavar="PATH",
                     help="a local .npz in the Keras layout (x_train, y_train, x_test, y_test), "
                          "e.g. MNIST or Fashion-MNIST; default: scikit-learn's digits")
    run.add_argument("--no-baseline", action="store_true",
                     help="train only the LBE run")
    run.add_argument("--backend", choices=("auto", "op", "tf"), default=d["backend"],
                     help="batch-entropy implementation: op (compiled), tf (pure TensorFlow) "
                          "or auto (op where available)")
    run.add_argument("--out", metavar="DIR",
                     help="output folder (created); default: a new ./lbe-train-YYYYmmdd-HHMMSS")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.width is None:
        args.width = DEFAULT_WIDTH[args.arch]
    if args.data is not None and not os.path.isfile(args.data):
        parser.error(f"--data: no such file: {args.data}")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out: {args.out} exists and is not a folder")
    return parser, args


def default_out_dir():
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.abspath(f"lbe-train-{stamp}")
    suffix = 1
    while os.path.exists(path):
        suffix += 1
        path = os.path.abspath(f"lbe-train-{stamp}-{suffix}")
    return path


# --------------------------------------------------------------------------------------------
# Model

def _initializers(keras, init, fan_in, seed):
    """(kernel, bias) initializers of one layer."""
    if init == "torch":
        # torch.nn.Linear/Conv2d.reset_parameters: kaiming_uniform(a=sqrt(5)) for the weights,
        # i.e. U(+-1/sqrt(fan_in)) = VarianceScaling(1/3, fan_in, uniform); same bound for bias.
        bound = 1.0 / math.sqrt(fan_in)
        return (keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform", seed=seed),
                keras.initializers.RandomUniform(-bound, bound, seed=seed + 1))
    return keras.initializers.get({"class_name": init, "config": {"seed": seed}}), "zeros"


def build_network(keras, args, image_shape, num_classes):
    """The plain network as a functional keras.Model: `depth` ReLU layers and a linear head."""
    inputs = keras.Input(shape=image_shape, name="image")
    seed = args.seed * 100_003  # distinct initializer seeds per layer, reproducible per --seed
    if args.arch == "mlp":
        x = keras.layers.Flatten(name="flatten")(inputs)
        fan_in = int(math.prod(image_shape))
        for i in range(args.depth):
            kernel, bias = _initializers(keras, args.init, fan_in, seed + 2 * i)
            x = keras.layers.Dense(args.width, activation="relu", kernel_initializer=kernel,
                                   bias_initializer=bias, name=f"dense_{i + 1}")(x)
            fan_in = args.width
    else:
        x = inputs
        fan_in = 9 * image_shape[-1]
        for i in range(args.depth):
            kernel, bias = _initializers(keras, args.init, fan_in, seed + 2 * i)
            x = keras.layers.Conv2D(args.width, 3, padding="same", activation="relu",
                                    kernel_initializer=kernel, bias_initializer=bias,
                                    name=f"conv_{i + 1}")(x)
            fan_in = 9 * args.width
        x = keras.layers.Flatten(name="flatten")(x)
        fan_in = int(math.prod(image_shape[:-1])) * args.width
    kernel, bias = _initializers(keras, args.init, fan_in, seed + 2 * args.depth)
    logits = keras.layers.Dense(num_classes, kernel_initializer=kernel, bias_initializer=bias,
                                name="logits")(x)
    return keras.Model(inputs, logits, name=f"plain_{args.arch}_{args.depth}")


# --------------------------------------------------------------------------------------------
# Progress

def _make_progress_callback(keras, label, epochs, quiet):
    class EpochProgress(keras.callbacks.Callback):
        """One bar per run over the epochs (a line every ~5% when stdout is not a terminal)."""

        def __init__(self):
            super().__init__()
            self.interactive = sys.stdout.isatty()
            self.bar = None
            self.epoch_times = []
            self._epoch_start = None
            self._every = max(1, epochs // 20)

        def on_train_begin(self, logs=None):
            print(f"{label}: {epochs} epochs (the first one includes tracing the graph)",
                  flush=True)
            if self.interactive and not quiet:
                self.bar = keras.utils.Progbar(
                    epochs, width=25, unit_name="epoch",
                    stateful_metrics=["loss", "task_loss", "lbe", "acc", "test_acc", "H"])

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch_start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_times.append(time.perf_counter() - self._epoch_start)
            logs = logs or {}
            values = [("task_loss", logs.get("task_loss", float("nan"))),
                      ("acc", logs.get("accuracy", float("nan"))),
                      ("test_acc", logs.get("val_accuracy", float("nan"))),
                      ("H", logs.get("entropy_mean", float("nan")))]
            if quiet:
                return
            if self.bar is not None:
                self.bar.update(epoch + 1, values=values)
            elif (epoch + 1) % self._every == 0 or epoch + 1 == epochs:
                text = "  ".join(f"{name} {float(value):.4f}" for name, value in values)
                print(f"  epoch {epoch + 1:>{len(str(epochs))}}/{epochs}  {text}  "
                      f"({sum(self.epoch_times):.0f} s)", flush=True)

    return EpochProgress()


# --------------------------------------------------------------------------------------------
# One run

def _datasets(tf, data, batch_size, seed):
    train_count = len(data.x_train)
    # A last batch of one example has no batch entropy (ddof=1): drop it in that one case.
    drop_remainder = train_count % batch_size == 1
    train = (tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
             .shuffle(train_count, seed=seed, reshuffle_each_iteration=True)
             .batch(batch_size, drop_remainder=drop_remainder)
             .prefetch(tf.data.AUTOTUNE))
    test_count = len(data.x_test)
    eval_batch = min(EVAL_BATCH_SIZE, test_count)
    while test_count % eval_batch == 1:
        eval_batch -= 1
    test = tf.data.Dataset.from_tensor_slices((data.x_test, data.y_test)).batch(eval_batch)
    return train, test


def learning_rate(keras, lr, total_steps, decay, warmup=0.0):
    """Adam's learning rate: a linear warm-up over the first `warmup` fraction of the steps,
    constant, then a half cosine from lr down to 0 over the last `decay` fraction. Without the
    decay, the LBE run's test accuracy often dropped late in training and the final value
    depended on where the last epoch landed."""
    if decay <= 0 and warmup <= 0:
        return lr

    class WarmupCosineTail(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, lr, total_steps, decay, warmup):
            self.lr, self.total_steps = float(lr), int(total_steps)
            self.decay, self.warmup = float(decay), float(warmup)
            self.warmup_steps = int(round(total_steps * warmup))
            self.start = int(round(total_steps * (1.0 - decay))) if decay > 0 else total_steps
            self.span = max(1, total_steps - self.start)

        def __call__(self, step):
            ops = keras.ops
            step = ops.cast(step, "float32")
            t = ops.clip((step - self.start) / self.span, 0.0, 1.0)
            rate = self.lr * 0.5 * (1.0 + ops.cos(math.pi * t))
            if self.warmup_steps > 0:
                rate = rate * ops.minimum(1.0, (step + 1.0) / self.warmup_steps)
            return rate

        def get_config(self):
            return {"lr": self.lr, "total_steps": self.total_steps, "decay": self.decay,
                    "warmup": self.warmup}

    return WarmupCosineTail(lr, total_steps, decay, warmup)


def _round(values, digits=5):
    return [None if v is None or not math.isfinite(v) else round(float(v), digits)
            for v in values]


def train_one(name, args, data, initial_weights, quiet):
    """Trains one run; returns its results.json entry."""
    import keras
    import tensorflow as tf

    import lbe_ops.keras as lbe_keras

    beta = args.beta if name == "lbe" else 0.0
    keras.utils.set_random_seed(args.seed)
    started = time.perf_counter()
    cpu_started = time.process_time()
    network = build_network(keras, args, data.image_shape, data.num_classes)
    network.set_weights(initial_weights)
    model = lbe_keras.wrap(network, alpha=args.alpha, alpha_min=args.alpha_min, beta=beta)
    train_ds, test_ds = _datasets(tf, data, args.batch_size, args.seed)
    steps = args.epochs * int(train_ds.cardinality())
    model.compile(
        optimizer=keras.optimizers.Adam(
            learning_rate=learning_rate(keras, args.lr, steps, args.lr_decay, args.lr_warmup),
            global_clipnorm=args.clip_norm),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])

    # Epoch 0: the initialized network, before any step.
    initial = model.evaluate(test_ds, verbose=0, return_dict=True)
    initial_entropies = model.layer_entropies(validation=True)
    layer_names = list(initial_entropies)

    logger = lbe_keras.LayerEntropyLogger()
    label = "LBE run" if name == "lbe" else "baseline run (beta = 0)"
    progress = _make_progress_callback(keras, label, args.epochs, quiet)
    fit = model.fit(train_ds, epochs=args.epochs, validation_data=test_ds,
                    callbacks=[logger, progress], shuffle=False, verbose=0)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    logs = fit.history

    def column(key, first=None):
        return _round([first] + list(logs.get(key, [None] * args.epochs)))

    history = {
        "epoch": list(range(args.epochs + 1)),
        "test_accuracy": column("val_accuracy", initial["accuracy"]),
        "test_task_loss": column("val_task_loss", initial["task_loss"]),
        "train_accuracy": column("accuracy"),
        "train_task_loss": column("task_loss"),
        "train_loss": column("loss"),
        "train_lbe": column("lbe"),
        "train_entropy_mean": column("entropy_mean"),
        "test_entropy_mean": column("val_entropy_mean", initial.get("entropy_mean")),
        "epoch_time_s": _round([None] + progress.epoch_times, 3),
    }
    per_layer_test = [_round([initial_entropies[layer]]
                             + logs.get(f"val_entropy/{layer}", []), 4)
                      for layer in layer_names]
    per_layer_train = [_round([None] + logs.get(f"entropy/{layer}", []), 4)
                       for layer in layer_names]
    alphas = [float(keras.ops.convert_to_numpy(r.alpha)) for r in model.lbe_regularizers]
    test_accuracy = history["test_accuracy"]
    return {
        "beta": beta,
        "final_test_accuracy": test_accuracy[-1],
        "best_test_accuracy": max(v for v in test_accuracy if v is not None),
        "final_test_task_loss": history["test_task_loss"][-1],
        "final_train_task_loss": history["train_task_loss"][-1],
        "wall_time_s": round(wall, 2),
        "cpu_time_s": round(cpu, 2),     # all threads of this process
        "history": history,
        # [layer][epoch]; epoch 0 is the initialized network. "test": entropies of test-set
        # batches at the end of each epoch; "train": means over the epoch's training steps.
        "layer_entropy": {"layers": layer_names, "test": per_layer_test,
                          "train": per_layer_train},
        "final_alpha": _round(alphas, 4),
    }


# --------------------------------------------------------------------------------------------
# Report

def _summary_table(results):
    header = ("run", "final test acc", "best test acc", "train CE", "test CE", "wall time")
    rows = []
    for name, run in results["runs"].items():
        rows.append((
            "LBE" if name == "lbe" else "baseline",
            f"{run['final_test_accuracy']:.4f}",
            f"{run['best_test_accuracy']:.4f}",
            _fmt(run["final_train_task_loss"]),
            _fmt(run["final_test_task_loss"]),
            f"{run['wall_time_s']:.0f} s"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, rule, *body])


def _fmt(value):
    return "n/a" if value is None else f"{value:.4f}"


def _environment():
    import keras
    import tensorflow as tf

    import lbe_ops
    return {
        "lbe_ops": lbe_ops.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        # Other processes on the machine slow the runs down: the 1/5/15-minute load averages
        # when this one started put the wall times in context.
        "load_average": _load_average(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
    }


def _load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def main(argv=None):
    parser, args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from lbe_ops import _data
    try:
        data = _data.load_npz(args.data) if args.data else _data.load_digits()
    except _data.DataError as exc:
        parser.error(str(exc))
    if args.arch == "cnn" and data.image_shape[0] < 3:
        parser.error(f"--arch cnn needs images; the data are {data.image_shape}")

    import keras

    import lbe_ops
    from lbe_ops import _plots

    out_dir = os.path.abspath(args.out) if args.out else default_out_dir()
    with lbe_ops.use_backend(args.backend):
        info = lbe_ops.backend_info()
        if args.backend == "op" and info["backend"] != "op":
            parser.error(f"--backend op: the compiled op cannot be used: {info['reason']}")
        print(f"lbe-train: batch entropy backend: {info['backend']}"
              + (f" ({info['reason']})" if info["reason"] else f" ({info['library']})"))
        print(f"data: {data.name}: {len(data.x_train)} train / {len(data.x_test)} test, "
              f"{data.image_shape}, {data.num_classes} classes")
        print(f"network: plain {args.arch}, depth {args.depth}, width {args.width}, "
              f"init {args.init}; Adam lr {args.lr:g}"
              + (f" (cosine to 0 over the last {args.lr_decay:.0%} of the steps)"
                 if args.lr_decay > 0 else "")
              + (f", warm-up over the first {args.lr_warmup:.0%}" if args.lr_warmup > 0 else "")
              + (f", clip norm {args.clip_norm:g}" if args.clip_norm else "")
              + f", batch {args.batch_size}, "
              f"{args.epochs} epochs, seed {args.seed}")
        print(f"LBE: alpha {args.alpha:g}, alpha_min {args.alpha_min:g}, beta {args.beta:g}")
        os.makedirs(out_dir, exist_ok=True)
        print(f"output: {out_dir}", flush=True)

        keras.utils.set_random_seed(args.seed)
        initial_weights = build_network(keras, args, data.image_shape,
                                        data.num_classes).get_weights()
        config = {
            "arch": args.arch, "depth": args.depth, "width": args.width, "init": args.init,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "lr_decay": args.lr_decay, "lr_warmup": args.lr_warmup, "clip_norm": args.clip_norm,
            "optimizer": "adam", "alpha": args.alpha, "alpha_min": args.alpha_min,
            "beta": args.beta, "ddof": 1, "seed": args.seed,
            "loss": "CE + CE * mean_l beta*(H_l - max(alpha_min, |alpha_l|))^2; baseline: beta=0",
            "data": data.name, "data_description": data.description,
            "train_examples": len(data.x_train), "test_examples": len(data.x_test),
            "input_shape": list(data.image_shape), "num_classes": data.num_classes,
            "baseline": not args.no_baseline,
            "backend": info["backend"], "backend_requested": args.backend,
        }
        results = {"version": RESULTS_VERSION, "config": config, "runs": {},
                   "environment": _environment()}
        names = ["lbe"] if args.no_baseline else ["lbe", "baseline"]
        started = time.perf_counter()
        for i, name in enumerate(names):
            print(f"\n[{i + 1}/{len(names)}]", end=" ")
            results["runs"][name] = train_one(name, args, data, initial_weights, args.quiet)
        results["total_wall_time_s"] = round(time.perf_counter() - started, 2)

    results_path = os.path.join(out_dir, "results.json")
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
    figures = _plots.write_plots(results, out_dir)

    print()
    print(_summary_table(results))
    print(f"\nchance: {1 / data.num_classes:.3f}; total wall time "
          f"{results['total_wall_time_s']:.0f} s")
    print(f"wrote {results_path}")
    for figure in figures:
        print(f"wrote {os.path.join(out_dir, figure)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
