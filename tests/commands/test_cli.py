"""The command lines of lbe-train and lbe-bench (lbe_ops_cli): parsed before TensorFlow is
imported, their argument errors, and the bench names they know."""

import subprocess
import sys

import pytest

import lbe_ops_cli

# A console script as installed: the entry point, with SystemExit turned into a last line that
# says the exit code and whether TensorFlow was imported.
_CONSOLE_SCRIPT = ("import sys, lbe_ops_cli\n"
                   "try:\n    lbe_ops_cli.{entry}(sys.argv[1:])\n"
                   "except SystemExit as exc:\n"
                   "    print('exit', exc.code, 'tensorflow' in sys.modules)\n")


@pytest.mark.parametrize("entry, argv, status, expected", [
    ("train_main", ["--depth", "0"], 2, "--depth: expected a positive"),
    ("train_main", ["--help"], 0, "usage: lbe-train"),
    ("bench_main", ["--min-time", "-1"], 2, "--min-time: expected a number of seconds >= 0"),
    ("bench_main", ["--cases", "no-such-case"], 2, "--cases: unknown case(s): no-such-case"),
    ("bench_main", ["--fit-only", "--fit", "none"], 2, "leaves nothing to run"),
    ("bench_main", ["--help"], 0, "usage: lbe-bench"),
])
def test_commands_answer_help_and_bad_arguments_without_tensorflow(entry, argv, status, expected):
    """Both console scripts start in lbe_ops_cli: --help and wrong arguments answer without
    importing TensorFlow (which takes seconds)."""
    proc = subprocess.run([sys.executable, "-c", _CONSOLE_SCRIPT.format(entry=entry), *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == f"exit {status} False", proc.stdout
    assert expected in proc.stdout + proc.stderr


def test_the_package_does_not_import_the_command_lines():
    """lbe_ops_cli imports the package after parsing; the package never imports it back."""
    code = ("import sys\n"
            "import lbe_ops, lbe_ops.train, lbe_ops.bench.cli, lbe_ops.keras\n"
            "print('lbe_ops_cli' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stdout + proc.stderr


def test_bench_names_are_those_of_lbe_ops_bench():
    from lbe_ops.bench import cases, fit

    assert lbe_ops_cli.BENCH_CASES == tuple(cases.all_cases())
    assert lbe_ops_cli.BENCH_DTYPES == cases.DTYPES
    assert lbe_ops_cli.BENCH_MODES == cases.MODES
    assert lbe_ops_cli.BENCH_VARIANTS == cases.VARIANTS
    assert lbe_ops_cli.BENCH_FIT_MODELS == tuple(fit.FIT_MODELS)
    assert lbe_ops_cli.BENCH_STANDARD_FIT_MODELS == fit.STANDARD_FIT_MODELS
    assert fit.QUICK_FIT_MODEL in lbe_ops_cli.BENCH_FIT_MODELS


def _bench_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        lbe_ops_cli.parse_bench_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--min-time", "--train-time", "--fit-time"])
@pytest.mark.parametrize("value", ["-1", "nan", "abc"])
def test_lbe_bench_rejects_bad_times_naming_the_flag(capsys, flag, value):
    assert f"argument {flag}:" in _bench_error(capsys, [flag, value])


@pytest.mark.parametrize("value", ["no-such-model", "mlp-100x64,nope", "", "all,mlp-10x16"])
def test_lbe_bench_rejects_unknown_fit_models_naming_the_flag(capsys, value):
    err = _bench_error(capsys, ["--fit", value])
    assert "argument --fit:" in err and "mlp-500x32" in err


def test_lbe_bench_fit_models():
    def fit(text):
        return lbe_ops_cli.parse_bench_args(["--fit", text]).fit

    assert fit("all") == ["mlp-500x32", "mlp-100x64", "cnn-30x16"]
    assert fit("none") == []
    assert fit("cnn-30x16, mlp-10x16,cnn-30x16") == ["cnn-30x16", "mlp-10x16"]
    assert lbe_ops_cli.parse_bench_args([]).fit is None  # per mode: all, or --quick's model


def test_lbe_bench_cases_take_prefixes_in_the_usual_order():
    args = lbe_ops_cli.parse_bench_args(["--cases", "group,tiny", "--dtypes", "float64"])
    assert args.cases == ["tiny", "group-20", "group-500", "group-100", "group-mixed"]
    assert args.dtypes == ("float64",)


def test_lbe_bench_variants_flag_takes_the_old_name_of_tf(capsys):
    parse = lbe_ops_cli.parse_bench_args
    assert parse([]).variants == ("op", "tf", "xla") and parse([]).modes == ("fwd", "fwdbwd")
    assert parse(["--variants", "op,graph,xla,tf"]).variants == ("op", "tf", "xla")
    assert "argument --variants:" in _bench_error(capsys, ["--variants", "op,nope"])
    assert "must include op" in _bench_error(capsys, ["--variants", "tf,xla"])


def test_lbe_bench_fit_only_runs_no_kernel_cases(capsys):
    assert "--fit-only runs no kernel cases" in _bench_error(capsys, ["--fit-only", "--full"])
