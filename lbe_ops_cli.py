"""The command lines of lbe-ops, parsed before TensorFlow is imported.

`import lbe_ops` imports TensorFlow and registers the compiled op (a SavedModel that uses the op
needs that), which takes seconds. The console scripts start here, outside the package, so that
`lbe-train --help` and a wrong argument answer at once; the work itself is in lbe_ops.train.
"""

import argparse
import datetime
import math
import os

# lbe-train's defaults: docs/training.md shows what they give over seeds and backends
# (scripts/sweep_train.py reruns that grid).
DEFAULTS = {
    "arch": "mlp",
    "depth": 100,
    "width": None,          # per architecture, see DEFAULT_WIDTH
    "epochs": 100,
    "batch_size": 32,
    "lr": 2e-4,
    "lr_decay": 0.4,
    "lr_warmup": 0.0,
    "clip_norm": None,
    "weight_decay": 0.0,
    "val_fraction": 0.1,
    "alpha": 1.0,
    "alpha_min": 1.0,
    "beta": 0.5,
    "init": "orthogonal",
    "seed": 0,
    "backend": "auto",
}
DEFAULT_WIDTH = {"mlp": 128, "cnn": 8}
INITS = ("torch", "glorot_uniform", "he_uniform", "he_normal", "lecun_normal", "orthogonal")
OUTPUT_FILES = ("results.json", "curves.png", "layer_entropy.png")


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
_val_fraction = _checked_float(lambda value: 0 <= value < 0.9, "a fraction in [0, 0.9)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None) or the help says it."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


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
            "(see docs/training.md)."),
        formatter_class=_HelpFormatter)
    model = parser.add_argument_group("network")
    model.add_argument("--arch", choices=("mlp", "cnn"), default=d["arch"],
                       help="mlp: `depth` Dense+ReLU layers; cnn: `depth` 3x3 Conv2D+ReLU layers "
                            "(stride 1, same padding); both end in one linear classifier")
    model.add_argument("--depth", type=_positive_int, default=d["depth"],
                       help="number of hidden ReLU layers (each one is LBE-regularized)")
    model.add_argument("--width", type=_positive_int, default=d["width"],
                       help="units per Dense layer (mlp) or channels per conv layer (cnn) "
                            f"(default: {DEFAULT_WIDTH['mlp']} for mlp, {DEFAULT_WIDTH['cnn']} "
                            "for cnn)")
    model.add_argument("--init", choices=INITS, default=d["init"],
                       help="weight initialization; orthogonal: random orthogonal weights "
                            "(gain 1) and zero biases, under which a plain 100-layer ReLU network "
                            "without LBE stays at chance (each ReLU halves the signal); torch: "
                            "PyTorch's default for Linear/Conv (weights and biases "
                            "U(+-1/sqrt(fan_in))), as in the paper's code, which LBE trained on "
                            "fewer seeds here (see docs/training.md); the others are Keras "
                            "initializers with zero biases")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=_positive_int, default=d["epochs"],
                       help="passes over the training examples")
    train.add_argument("--batch-size", type=_batch_size, default=d["batch_size"],
                       help="examples per training step (the batch entropy is taken over them)")
    train.add_argument("--lr", "--learning-rate", dest="lr", type=_positive_float,
                       default=d["lr"], help="Adam learning rate")
    train.add_argument("--lr-decay", type=_fraction, default=d["lr_decay"], metavar="FRACTION",
                       help="the last FRACTION of the training steps lower the learning rate to "
                            "0 along a half cosine (0: a constant learning rate)")
    train.add_argument("--lr-warmup", type=_fraction, default=d["lr_warmup"], metavar="FRACTION",
                       help="the first FRACTION of the training steps raise the learning rate "
                            "linearly to --lr (0: no warm-up)")
    train.add_argument("--weight-decay", type=_non_negative_float, default=d["weight_decay"],
                       help="decoupled weight decay of Adam (AdamW) on the kernels (0: none)")
    train.add_argument("--val-fraction", type=_val_fraction, default=d["val_fraction"],
                       metavar="FRACTION",
                       help="hold out this fraction of the training examples (stratified, the "
                            "same for every seed) and report the weights of the epoch with the "
                            "best validation accuracy; 0: train on all of them and report the "
                            "last epoch. The test set never chooses anything.")
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
                     help="output folder (created; an existing one must not hold a run's "
                          "results unless --overwrite is given); default: a new "
                          "./lbe-train-YYYYmmdd-HHMMSS")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the results and plots of an earlier run in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None, parser=None):
    """(parser, args): lbe-train's options, checked; `parser` may be build_parser()'s with
    options added."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.width is None:
        args.width = DEFAULT_WIDTH[args.arch]
    if args.data is not None and not os.path.isfile(args.data):
        parser.error(f"--data: no such file: {args.data}")
    if args.out is not None and os.path.exists(args.out):
        if not os.path.isdir(args.out):
            parser.error(f"--out: {args.out} exists and is not a folder")
        earlier = [name for name in OUTPUT_FILES if os.path.exists(os.path.join(args.out, name))]
        if earlier and not args.overwrite:
            parser.error(f"--out: {args.out} already holds a run ({', '.join(earlier)}); "
                         "choose another folder, or give --overwrite to replace it")
    return parser, args


def default_out_dir(prefix="lbe-train"):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.abspath(f"{prefix}-{stamp}")
    suffix = 1
    while os.path.exists(path):
        suffix += 1
        path = os.path.abspath(f"{prefix}-{stamp}-{suffix}")
    return path


def train_main(argv=None):
    """The `lbe-train` console script."""
    parser, args = parse_args(argv)
    from lbe_ops import train
    return train.run(parser, args)
