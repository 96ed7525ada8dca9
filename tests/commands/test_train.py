"""lbe-train end to end on tiny configurations (seconds), and its argument errors."""

import json
import os

import numpy as np
import pytest

from lbe_ops import train
from lbe_ops_cli import DEFAULTS, train_main
from pngs import check_png

TINY = ["--depth", "3", "--width", "8", "--epochs", "2", "--quiet"]


def _check_run(run, epochs, depth, beta, validated=True):
    assert run["beta"] == beta
    assert 0.0 <= run["final_test_accuracy"] <= 1.0
    assert run["best_test_accuracy"] >= run["final_test_accuracy"]
    assert run["wall_time_s"] > 0
    history = run["history"]
    assert history["epoch"] == list(range(epochs + 1))
    for key in ("test_accuracy", "test_task_loss", "train_accuracy", "train_task_loss",
                "train_loss", "train_lbe", "train_entropy_mean", "test_entropy_mean",
                "validation_accuracy", "validation_task_loss", "epoch_time_s"):
        assert len(history[key]) == epochs + 1, key
    # The reported weights are those of one epoch: its test accuracy is the reported one.
    epoch = run["reported_epoch"]
    assert 1 <= epoch <= epochs
    assert history["test_accuracy"][epoch] == pytest.approx(run["final_test_accuracy"], abs=1e-5)
    assert history["test_accuracy"][-1] == run["last_epoch_test_accuracy"]
    if validated:
        accuracy = history["validation_accuracy"]
        assert run["validation_accuracy"] == pytest.approx(max(accuracy[1:]), abs=1e-5)
        assert accuracy[epoch] == pytest.approx(max(accuracy[1:]), abs=1e-5)
        assert "validation" in run["selection"]
    else:
        assert epoch == epochs and run["validation_accuracy"] is None
        assert history["validation_accuracy"] == [None] * (epochs + 1)
        assert "last epoch" in run["selection"]
    assert history["train_task_loss"][0] is None  # epoch 0: no training step yet
    assert all(np.isfinite(v) for v in history["test_task_loss"])
    assert all(np.isfinite(v) and v > 0 for v in history["train_task_loss"][1:])
    entropies = run["layer_entropy"]
    assert len(entropies["layers"]) == depth
    assert np.array(entropies["test"], dtype=float).shape == (depth, epochs + 1)
    assert np.all(np.isfinite(np.array(entropies["test"], dtype=float)))
    assert np.array(entropies["train"], dtype=float).shape == (depth, epochs + 1)
    assert len(run["final_alpha"]) == depth


@pytest.mark.slow  # lbe-train end to end
def test_digits_end_to_end(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    assert train_main(TINY + ["--out", str(out), "--lr", "1e-3", "--seed", "3",
                              "--val-fraction", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "batch entropy backend:" in printed
    assert "test acc" in printed and "baseline" in printed
    assert "142 of the training examples held out" in printed

    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert config["depth"] == 3 and config["width"] == 8 and config["epochs"] == 2
    assert config["lr"] == 1e-3 and config["seed"] == 3 and config["arch"] == "mlp"
    assert config["data"] == "digits" and config["num_classes"] == 10
    assert config["train_examples"] + config["validation_examples"] + config[
        "test_examples"] == 1797
    assert config["val_fraction"] == 0.1
    assert config["backend"] in ("op", "tf")
    assert set(results["runs"]) == {"lbe", "baseline"}
    _check_run(results["runs"]["lbe"], epochs=2, depth=3, beta=DEFAULTS["beta"])
    _check_run(results["runs"]["baseline"], epochs=2, depth=3, beta=0.0)
    # Both runs start from the same weights: the same network at epoch 0.
    lbe, baseline = results["runs"]["lbe"]["history"], results["runs"]["baseline"]["history"]
    assert lbe["test_task_loss"][0] == baseline["test_task_loss"][0]
    assert lbe["test_accuracy"][0] == baseline["test_accuracy"][0]
    # The baseline's loss is its task loss alone; the LBE run's loss adds task * lbe.
    assert baseline["train_loss"][1:] == pytest.approx(baseline["train_task_loss"][1:], rel=1e-4)
    assert lbe["train_loss"][-1] == pytest.approx(
        lbe["train_task_loss"][-1] * (1 + lbe["train_lbe"][-1]), rel=0.05)
    for name in ("curves.png", "layer_entropy.png"):
        check_png(out / name)


def _write_npz(path, image_shape=(6, 6), train_count=41, test_count=17, classes=3):
    rng = np.random.default_rng(0)
    y_train = rng.integers(0, classes, train_count).astype(np.uint8)
    y_test = rng.integers(0, classes, test_count).astype(np.uint8)
    x_train = rng.integers(0, 256, (train_count, *image_shape)).astype(np.uint8)
    x_test = rng.integers(0, 256, (test_count, *image_shape)).astype(np.uint8)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_npz_data_and_default_out_dir(tmp_path, monkeypatch, capsys, arch):
    data = _write_npz(tmp_path / "tiny.npz")
    monkeypatch.chdir(tmp_path)
    # cnn: all 41 training examples with batch 8 leave a last batch of 1 each epoch, which
    # trains (the LBE term leaves it out); mlp: a validation split of the 41.
    validated = arch == "mlp"
    argv = ["--data", str(data), "--arch", arch, "--depth", "2", "--width", "4",
            "--epochs", "2", "--batch-size", "8", "--no-baseline", "--backend", "tf",
            "--val-fraction", "0.2" if validated else "0"]
    assert train_main(argv) == 0
    capsys.readouterr()
    outs = [p for p in tmp_path.iterdir() if p.name.startswith("lbe-train-")]
    assert len(outs) == 1 and outs[0].is_dir()
    results = json.loads((outs[0] / "results.json").read_text())
    config = results["config"]
    assert config["data"] == "tiny" and config["num_classes"] == 3
    assert config["input_shape"] == [6, 6, 1] and config["arch"] == arch
    assert config["backend"] == "tf" and config["baseline"] is False
    assert set(results["runs"]) == {"lbe"}
    _check_run(results["runs"]["lbe"], epochs=2, depth=2, beta=DEFAULTS["beta"],
               validated=validated)
    for name in ("curves.png", "layer_entropy.png"):
        check_png(outs[0] / name)


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        train_main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--depth", "0"], "--depth: expected a positive integer, got 0"),
    (["--width", "x"], "--width: expected a positive integer, got 'x'"),
    (["--batch-size", "1"], "batch of at least 2"),
    (["--lr", "0"], "expected a number > 0, got '0'"),
    (["--beta", "-1"], "--beta: expected a number >= 0"),
    (["--alpha", "nan"], "--alpha: expected a finite number"),
    (["--arch", "resnet"], "invalid choice: 'resnet'"),
    (["--backend", "cuda"], "invalid choice: 'cuda'"),
    (["--data", "/nonexistent/mnist.npz"], "--data: no such file"),
    (["--lr-decay", "1.5"], "--lr-decay: expected a fraction in [0, 1]"),
    (["--clip-norm", "0"], "--clip-norm: expected a number > 0"),
    (["--init", "zeros"], "invalid choice: 'zeros'"),
    (["--val-fraction", "0.95"], "--val-fraction: expected a fraction in [0, 0.9)"),
    (["--weight-decay", "-1"], "--weight-decay: expected a number >= 0"),
])
def test_bad_arguments(capsys, argv, message):
    assert message in _error(capsys, argv)


def test_bad_npz(tmp_path, capsys):
    partial = tmp_path / "partial.npz"
    np.savez(partial, x_train=np.zeros((4, 2, 2)), y_train=np.zeros(4))
    err = _error(capsys, ["--data", str(partial), "--out", str(tmp_path / "o")])
    assert "lacks x_test, y_test" in err
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, x_train=np.zeros((4, 2, 2)), y_train=np.zeros(3),
             x_test=np.zeros((4, 2, 2)), y_test=np.zeros(4))
    assert "x_train has 4 examples but y_train has 3" in _error(
        capsys, ["--data", str(mismatched), "--out", str(tmp_path / "o")])
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    assert "cannot read" in _error(capsys, ["--data", str(not_npz), "--out", str(tmp_path / "o")])
    assert not os.path.exists(tmp_path / "o")


def test_learning_rate_schedule():
    import keras

    assert train.learning_rate(keras, 1e-3, 100, 0.0) == 1e-3
    schedule = train.learning_rate(keras, 1e-3, 100, 0.4)
    lr = [float(keras.ops.convert_to_numpy(schedule(step))) for step in range(100)]
    # Constant for the first 60 steps, then a half cosine down towards 0.
    assert lr[:61] == pytest.approx([1e-3] * 61)
    assert lr[80] == pytest.approx(0.5e-3, rel=1e-5)
    assert all(a > b for a, b in zip(lr[60:], lr[61:]))
    assert 0 < lr[-1] < 1e-5
    assert schedule.get_config() == {"lr": 1e-3, "total_steps": 100, "decay": 0.4, "warmup": 0.0}
    warm = train.learning_rate(keras, 1e-3, 100, 0.0, warmup=0.1)
    rates = [float(keras.ops.convert_to_numpy(warm(step))) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[4] == pytest.approx(5e-4)
    assert rates[9:] == pytest.approx([1e-3] * 91)


def test_schedule_and_clipping_reach_the_results(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    argv = TINY + ["--out", str(out), "--no-baseline", "--lr-decay", "0.5", "--clip-norm",
                   "2", "--init", "orthogonal", "--weight-decay", "1e-4"]
    assert train_main(argv) == 0
    printed = capsys.readouterr().out
    assert "cosine to 0 over the last 50% of the steps" in printed
    assert "weight decay 0.0001" in printed
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["lr_decay"] == 0.5 and config["clip_norm"] == 2.0
    assert config["init"] == "orthogonal"
    assert config["weight_decay"] == 1e-4 and config["optimizer"] == "adamw"


def test_out_refuses_an_earlier_run_unless_overwrite(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")       # a folder with other files is fine
    argv = TINY + ["--depth", "2", "--epochs", "1", "--no-baseline", "--out", str(out)]
    assert train_main(argv) == 0
    first = (out / "results.json").read_text()
    capsys.readouterr()
    err = _error(capsys, argv)
    assert "already holds a run (results.json, curves.png, layer_entropy.png)" in err
    assert "--overwrite" in err
    assert (out / "results.json").read_text() == first
    assert train_main(argv + ["--overwrite", "--seed", "5"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 5
    assert (out / "notes.txt").read_text() == "mine"


def test_validation_split_is_stratified_fixed_and_disjoint():
    from lbe_ops import _data

    data = _data.Dataset(
        name="toy", x_train=np.arange(60, dtype=np.float32).reshape(60, 1, 1, 1),
        y_train=np.repeat(np.arange(3), 20), x_test=np.zeros((4, 1, 1, 1), np.float32),
        y_test=np.zeros(4, np.int64), num_classes=3, description="")
    train_part, (x_val, y_val) = _data.split_validation(data, 0.1)
    assert np.bincount(y_val).tolist() == [2, 2, 2]
    assert len(train_part.x_train) == 54 and len(x_val) == 6
    assert not set(x_val.ravel()) & set(train_part.x_train.ravel())
    assert set(x_val.ravel()) | set(train_part.x_train.ravel()) == set(range(60))
    again = _data.split_validation(data, 0.1)[1][0]
    np.testing.assert_array_equal(again, x_val)       # the same split every time
    assert train_part.x_test is data.x_test
    tiny = data._replace(x_train=data.x_train[:2], y_train=np.array([0, 1]))
    with pytest.raises(_data.DataError, match="both need at least 2"):
        _data.split_validation(tiny, 0.5)


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--depth", "--width", "--epochs", "--batch-size", "--lr", "--alpha",
                   "--alpha-min", "--beta", "--seed", "--backend", "--no-baseline", "--data",
                   "--out", "--arch", "--lr-decay", "--clip-norm", "--init", "--val-fraction",
                   "--weight-decay", "--overwrite"):
        assert option in text
    flat = " ".join(text.split())
    assert "(default: None)" not in flat
    assert "passes over the training examples (default: 100)" in flat
    assert "(default: 32)" in flat and "(default: 128 for mlp, 8 for cnn)" in flat


@pytest.mark.slow  # lbe-train end to end
def test_sweep_script_runs_seeds_and_backends_side_by_side(tmp_path, capsys, monkeypatch):
    """scripts/sweep_train.py (docs/training.md's grid): one tiny seed through both backends, two
    runs at a time. Run from the repository root, as the docs do, without the suite's
    PYTHONSAFEPATH: the op runs must still use the installed package's compiled op, not the
    source tree's fallback."""
    pytest.importorskip("sklearn")
    import importlib.util

    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))

    path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "scripts",
                        "sweep_train.py")
    spec = importlib.util.spec_from_file_location("sweep_train", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "sweep"
    argv = ["--seeds", "0", "--backends", "op", "tf", "--jobs", "2", "--out", str(out), "--",
            "--depth", "2", "--width", "4", "--epochs", "1"]
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| seed |" in printed and "LBE over 2 runs: min" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0] and summary["backends"] == ["op", "tf"]
    assert summary["config"]["depth"] == 2 and "seed" not in summary["config"]
    op_run = json.loads((out / "op-seed-0" / "results.json").read_text())
    tf_run = json.loads((out / "tf-seed-0" / "results.json").read_text())
    assert op_run["config"]["backend"] == "op" and tf_run["config"]["backend"] == "tf"
    # The baseline does not depend on the backend: trained once per seed.
    assert set(op_run["runs"]) == {"lbe", "baseline"} and set(tf_run["runs"]) == {"lbe"}
    result = summary["summary"]
    assert result["lbe_runs"] == 2 and result["baseline_runs"] == 1
    assert 0.0 <= result["lbe_min"] <= result["lbe_median"] <= result["lbe_max"] <= 1.0
    assert (out / "summary.md").read_text().startswith("| seed |")


def test_summary_says_when_the_lbe_run_ends_below_the_documented_result():
    from lbe_ops_cli import parse_train_args

    def results(accuracy):
        return {"runs": {"lbe": {"final_test_accuracy": accuracy},
                         "baseline": {"final_test_accuracy": 0.1}}}

    _, defaults = parse_train_args(["--seed", "4"])
    low = train.EXPECTED_LBE_ACCURACY - 0.1
    note = train.below_expectation(defaults, results(low))
    assert f"{low:.3f}" in note and "the defaults" in note and "docs/training.md" in note
    assert train.below_expectation(defaults, results(train.EXPECTED_LBE_ACCURACY)) is None

    _, changed = parse_train_args(["--depth", "50", "--width", "64"])
    note = train.below_expectation(changed, results(low))
    assert "--depth, --width" in note
    _, cnn = parse_train_args(["--arch", "cnn"])  # its own default width is not a change
    assert "(--arch)" in train.below_expectation(cnn, results(low))
    assert train.below_expectation(defaults, {"runs": {"baseline": {}}}) is None
