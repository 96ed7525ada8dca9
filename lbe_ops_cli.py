"""The console scripts of lbe-ops, lbe-train and lbe-bench: parsed before TensorFlow is imported.

`import lbe_ops` imports TensorFlow and registers the compiled op (a SavedModel that uses the op
needs that), which takes seconds. The console scripts start here, outside the package, so that
`--help` and a wrong argument answer at once. Each command has one entry point, which parses and
then imports the package to do the work: train_main -> lbe_ops.train.run, bench_main ->
lbe_ops.bench.cli.run. The package does not import this module; only the script behind
`python -m lbe_ops.bench` (lbe_ops/bench/__main__.py) calls bench_main.
"""

import argparse
import math
import os
import sys

# --------------------------------------------------------------------------------------------
# Argument types of both commands

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
_non_negative_seconds = _checked_float(lambda value: value >= 0, "a number of seconds >= 0")


def _comma_items(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def _names_from(allowed, aliases=None):
    """An argparse type: a comma-separated list of names from `allowed` (or their aliases)."""
    def parse(text):
        items = tuple((aliases or {}).get(item, item) for item in _comma_items(text))
        if not items or any(item not in allowed for item in items):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(allowed)}, got {text!r}")
        return items
    return parse


# --------------------------------------------------------------------------------------------
# lbe-train

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None) or the help says it."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_train_parser():
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


def parse_train_args(argv=None, parser=None):
    """(parser, args): lbe-train's options, checked; `parser` may be build_train_parser()'s
    with options added."""
    parser = parser or build_train_parser()
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


def train_main(argv=None):
    """The `lbe-train` console script (argv: sys.argv[1:] by default); returns the exit code."""
    parser, args = parse_train_args(argv)
    from lbe_ops import train
    return train.run(parser, args)


# --------------------------------------------------------------------------------------------
# lbe-bench

# The names lbe_ops.bench defines, here so that they are checked before TensorFlow is imported:
# the kernel cases (cases.all_cases(), in its order), cases.DTYPES, MODES and VARIANTS, and the
# fit() models (fit.FIT_MODELS, fit.STANDARD_FIT_MODELS). tests/commands/test_cli.py checks that
# they agree.
BENCH_CASES = ("tiny", "small", "mlp", "large", "tall", "wide", "conv", "group-20", "group-500",
               "group-100", "group-mixed")
BENCH_DTYPES = ("float32", "float16", "bfloat16", "float64")
BENCH_MODES = ("fwd", "fwdbwd")
BENCH_VARIANTS = ("op", "tf", "xla")
BENCH_FIT_MODELS = ("mlp-500x32", "mlp-100x64", "cnn-30x16", "mlp-10x16")
BENCH_STANDARD_FIT_MODELS = ("mlp-500x32", "mlp-100x64", "cnn-30x16")
# --variants also takes `graph` for the pure-TensorFlow variant, so that command lines written
# with that name keep working.
_VARIANT_ALIASES = {"graph": "tf"}


def _case_names(text):
    """--cases: names or prefixes of names; the matching cases in their usual order."""
    wanted = _comma_items(text)

    def matches(name, item):
        return name == item or name.startswith(item)

    unknown = [item for item in wanted if not any(matches(name, item) for name in BENCH_CASES)]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(
            f"unknown case(s): {', '.join(unknown) or repr(text)}; known: "
            f"{', '.join(BENCH_CASES)}")
    return [name for name in BENCH_CASES if any(matches(name, item) for item in wanted)]


_dtypes = _names_from(BENCH_DTYPES)
_modes = _names_from(BENCH_MODES)


def _variants(text):
    variants = tuple(dict.fromkeys(_names_from(BENCH_VARIANTS, _VARIANT_ALIASES)(text)))
    if "op" not in variants:
        raise argparse.ArgumentTypeError(
            f"must include op (everything is compared to it), got {text!r}")
    return variants


def _fit_models(text):
    """--fit: fit() model names, 'all' (the standard models) or 'none'; a list of names."""
    items = _comma_items(text)
    if items == ["none"]:
        return []
    if items == ["all"]:
        return list(BENCH_STANDARD_FIT_MODELS)
    unknown = [item for item in items if item not in BENCH_FIT_MODELS]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"unknown fit model(s) {', '.join(unknown) or repr(text)}; known: "
            f"{', '.join(BENCH_FIT_MODELS)}, or all, or none")
    return list(dict.fromkeys(items))


def build_bench_parser():
    p = argparse.ArgumentParser(
        prog="lbe-bench",
        description="Time the lbe_ops batch-entropy op against pure TensorFlow (graph mode "
                    "and XLA) and the machine's copy bandwidth.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="tiny shapes, few repetitions, a 10-layer training step (smoke run)")
    size.add_argument("--full", action="store_true", help="every case in every dtype")
    p.add_argument("--cases", type=_case_names,
                   help="comma-separated case names (or prefixes) to run; "
                        f"known: {', '.join(BENCH_CASES)}")
    p.add_argument("--dtypes", type=_dtypes,
                   help=f"comma-separated dtypes ({', '.join(BENCH_DTYPES)}); "
                        "overrides each case's dtype list")
    p.add_argument("--modes", type=_modes, default="fwd,fwdbwd",
                   help="comma-separated: fwd, fwdbwd")
    p.add_argument("--variants", type=_variants, default="op,tf,xla",
                   help="comma-separated: op (the compiled op), tf (pure TensorFlow, graph "
                        "mode), xla (pure TensorFlow under XLA)")
    p.add_argument("--min-time", type=_non_negative_seconds, default=None,
                   help="seconds of interleaved rounds per case and mode (default 2, quick 0.1)")
    p.add_argument("--train-layers", type=int, default=None,
                   help="depth of the training-step network (default 500, quick 10; 0: skip)")
    p.add_argument("--train-time", type=_non_negative_seconds, default=None,
                   help="seconds of interleaved rounds for the training step (default 15, quick "
                        "0.1): its variants differ by a few percent, about as much as the noise "
                        "of a few rounds on a shared VM")
    p.add_argument("--train-width", type=int, default=32)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--train-xla", action="store_true",
                   help="also time the training step compiled by XLA (slow to compile)")
    p.add_argument("--fit", type=_fit_models, default=None, metavar="MODELS",
                   help="comma-separated fit() models, 'all' or 'none' (default all, quick "
                        f"mlp-10x16); known: {', '.join(BENCH_FIT_MODELS)}")
    p.add_argument("--fit-time", type=_non_negative_seconds, default=None,
                   help="seconds of interleaved fit() rounds per model (default 20, quick 0.1; "
                        "at least 5 rounds, quick 3)")
    p.add_argument("--fit-xla", action=argparse.BooleanOptionalAction, default=None,
                   help="also time plain and LBE fit() compiled by XLA (default on, off in "
                        "--quick but on a GPU; compiling the 500-layer LBE model takes minutes). "
                        "On a GPU the fit table is plain and wrap() with jit_compile=False (the "
                        "op) and under XLA (compile()'s default there)")
    p.add_argument("--fit-only", action="store_true",
                   help="run only the fit() table: no kernel cases, no training step, no chart")
    p.add_argument("--allocator", choices=("default", "bfc"), default="default",
                   help="TensorFlow's CPU allocator: 'default' (what users get) or 'bfc' "
                        "(TF_CPU_ALLOCATOR_USE_BFC=true: keeps freed memory, so large outputs "
                        "do not page-fault on every call); must be chosen before TF runs an op")
    p.add_argument("--out", default="lbe-bench-results", help="output folder (JSON, table, PNG)")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    return p


def parse_bench_args(argv=None):
    parser = build_bench_parser()
    args = parser.parse_args(argv)
    if args.fit_only:
        if args.cases or args.full:
            parser.error("--fit-only runs no kernel cases; drop --cases/--full")
        if args.fit == []:
            parser.error("--fit-only with --fit none leaves nothing to run")
    return args


def bench_main(argv=None):
    """The `lbe-bench` console script (argv: sys.argv[1:] by default); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_bench_args(argv)
    from lbe_ops.bench import cli
    return cli.run(args, command="lbe-bench " + " ".join(argv))
