"""scripts/diagnose_train.py and scripts/compare_paths.py (issue 26) on tiny networks."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

import lbe_ops
from lbe_ops_cli import train_main
from pngs import check_png

SCRIPTS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "scripts")
TINY = ["--depth", "3", "--width", "8", "--quiet"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(lbe_ops.backend_info()["backend"] != "op",
                                reason="compares the op's path with pure TF")]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagnose_records_each_quantity_and_trains_as_lbe_train(tmp_path, capsys):
    pytest.importorskip("sklearn")
    diagnose = _script("diagnose_train")
    options = TINY + ["--epochs", "3", "--backend", "op", "--seed", "1"]
    out = tmp_path / "diag"
    assert diagnose.main(options + ["--epochs-every", "2", "--probe-size", "64",
                                    "--out", str(out)]) == 0
    assert "measuring" in capsys.readouterr().out
    result = json.loads((out / "diagnostics.json").read_text())
    assert result["config"]["backend"] == "op" and result["config"]["run"] == "lbe"
    assert result["config"]["probe"]["examples"] == 64
    assert result["config"]["probe"]["batches"] == 2
    assert result["layers"] == ["dense_1", "dense_2", "dense_3"]
    # Before training, then every second epoch and the last.
    assert [r["epoch"] for r in result["epochs"]] == [0, 2, 3]
    per_layer = ("entropy_probe", "entropy_train", "alpha", "target", "entropy_minus_target",
                 "dead_share", "near_constant_share", "effective_rank", "rank", "ncm_accuracy",
                 "closest_pair", "closest_separation", "grad_task_kernel", "grad_lbe_kernel",
                 "grad_task_bias", "grad_lbe_bias", "grad_cosine_kernel", "grad_lbe_alpha",
                 "kernel_norm", "bias_norm", "adam_step_kernel", "adam_step_bias",
                 "epoch_change_kernel", "epoch_change_bias")
    for record in result["epochs"]:
        assert set(per_layer) <= set(record["layers"])
        assert all(len(record["layers"][key]) == 3 for key in per_layer)
        layers = record["layers"]
        for key in ("entropy_probe", "target", "dead_share", "effective_rank",
                    "grad_task_kernel", "grad_lbe_kernel", "kernel_norm"):
            assert all(v is not None and math.isfinite(v) for v in layers[key]), key
        assert all(0 <= v <= 1 for v in layers["dead_share"] + layers["near_constant_share"])
        assert all(d <= n for d, n in zip(layers["dead_share"], layers["near_constant_share"]))
        assert all(0 <= r <= 8 for r in layers["rank"])
        assert len(record["train_class_accuracy"]) == 10
        assert np.array(record["train_confusion"]).sum() == result["config"]["train_examples"]
        assert record["learning_rate"] > 0 and record["measure_time_s"] > 0
        assert {"grad_task_norm", "grad_lbe_norm"} <= set(record["global"])
        moved = record["epoch"] > 0
        assert all((v is not None) == moved for v in layers["adam_step_kernel"])
        assert all((v is not None) == moved for v in layers["epoch_change_kernel"])
        assert all((v is not None) == moved for v in layers["entropy_train"])
    assert set(result["definitions"]) >= {"effective_rank", "grad_task_*", "adam_step_*"}
    for name in ("diag_layers.png", "diag_epochs.png"):
        check_png(out / name)

    # The measurements change nothing: lbe-train's LBE run, step for step.
    reference = tmp_path / "lbe-train"
    assert train_main(options + ["--no-baseline", "--out", str(reference)]) == 0
    expected = json.loads((reference / "results.json").read_text())["runs"]["lbe"]
    for key in ("test_accuracy", "train_loss", "validation_task_loss"):
        assert result["run"]["history"][key] == expected["history"][key], key
    assert result["run"]["final_alpha"] == expected["final_alpha"]


def test_compare_paths_in_lockstep(tmp_path, capsys):
    pytest.importorskip("sklearn")
    compare = _script("compare_paths")
    options = TINY + ["--epochs", "2", "--seed", "1"]
    out = tmp_path / "op-tf"
    assert compare.main(options + ["--full", "--out", str(out)]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert [side["path"] for side in result["sides"]] == ["op", "tf"]
    assert [side["lbe_op_in_graph"] for side in result["sides"]] == [True, False]
    steps = 2 * result["steps_per_epoch"]
    assert result["steps"]["step"] == list(range(1, steps + 1))
    assert all(len(result["steps"][key]) == steps for key in result["steps"])
    assert result["tensors"] == ["dense_1/kernel", "dense_1/bias", "dense_2/kernel",
                                 "dense_2/bias", "dense_3/kernel", "dense_3/bias",
                                 "logits/kernel", "logits/bias", "alphas"]
    assert result["initial_weight_rel"] == 0
    assert set(result["milestones"]) == {"kernel", "bias", "alphas"}
    for milestones in result["milestones"].values():
        assert set(milestones) == {"any", "1e-06", "0.0001", "0.01"}
    assert set(result["growth"]) == {"kernel", "bias", "alphas"}
    assert [a["at"] for a in result["test_accuracy"]] == ["epoch end"] * 2
    for checkpoint in result["checkpoints"]:
        assert len(checkpoint["weight_rel"]) == len(checkpoint["update_rel"]) == 9
    check_png(out / "comparison.png")

    # Model A is lbe-train's run through the op: the same batches, step for step.
    reference = tmp_path / "lbe-train"
    assert train_main(options + ["--no-baseline", "--backend", "op",
                                 "--out", str(reference)]) == 0
    expected = json.loads((reference / "results.json").read_text())["runs"]["lbe"]
    assert [a["test_accuracy"][0] for a in result["test_accuracy"]] == pytest.approx(
        expected["history"]["test_accuracy"][1:], abs=1e-5)

    # One path against itself, B's initial weights perturbed: different from the start.
    perturbed = tmp_path / "perturbed"
    assert compare.main(options + ["--epochs", "1", "--paths", "tf", "tf", "--perturb", "1e-7",
                                   "--out", str(perturbed)]) == 0
    result = json.loads((perturbed / "comparison.json").read_text())
    assert 0 < result["initial_weight_rel"] < 1e-6
    assert result["milestones"]["kernel"]["any"]["step"] == 1
    assert "the kernels of A and B" in capsys.readouterr().out
