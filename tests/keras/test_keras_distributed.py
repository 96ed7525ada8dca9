"""LBEModel under tf.distribute.MirroredStrategy with two logical CPU devices.

The strategy runs in a fresh process (support/keras_distributed_helper.py): logical devices can only be
configured before TensorFlow initialises, which this test process has already done.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)


# Starts processes that train (a cluster or a subprocess with two replicas): pytest -m slow.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    helper = os.path.join(TESTS, "support", "keras_distributed_helper.py")
    result = subprocess.run([sys.executable, helper],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


FORMS = ["multiplicative", "additive"]
KEYS = ("loss", "task_loss", "lbe", "entropy_mean")


def test_runs_on_two_replicas_with_mirrored_alphas(run):
    assert run["replicas"] == 2
    for form in FORMS:
        assert run[f"{form}_alpha_is_mirrored"]
        assert run[f"{form}_fit_keys"] == sorted(KEYS)
        assert min(run[f"{form}_alpha_change"]) > 1e-3


def test_cross_replica_statistics_equal_one_device_on_the_global_batch(run):
    single = run["single_eval"]
    for key in KEYS:
        np.testing.assert_allclose(run["multiplicative_cross_eval"][key], single[key], rtol=2e-6)
    cross = run["additive_cross_eval"]
    for key in ("task_loss", "lbe", "entropy_mean"):
        np.testing.assert_allclose(cross[key], single[key], rtol=2e-6)
    np.testing.assert_allclose(cross["loss"], single["task_loss"] + single["lbe"], rtol=2e-6)


def test_per_replica_statistics_are_those_of_each_half_batch(run):
    half_means = np.mean(run["half_entropies"], axis=1)  # per layer: mean over the replicas
    for form in FORMS:
        local = run[f"{form}_local_eval"]
        np.testing.assert_allclose(local["entropy_mean"], half_means.mean(), rtol=2e-6)
        assert abs(local["entropy_mean"] - run["single_eval"]["entropy_mean"]) > 1e-4


@pytest.mark.parametrize("form", FORMS)
def test_one_training_step_follows_the_float64_gradient(run, form):
    # cross_replica: the gradient of the loss on the global batch, as on one device;
    # per replica: the gradient of the mean over replicas of each half batch's LBE loss.
    assert run[f"{form}_cross_step_error"] < 2e-6
    assert run[f"{form}_local_step_error"] < 2e-6
    assert run[f"{form}_local_vs_global"] > 1e-3  # the two options really differ


@pytest.mark.parametrize("samples", [65, 66])
@pytest.mark.parametrize("cross_replica", [False, True])
def test_uneven_last_batches_train_without_error_or_nan(run, samples, cross_replica):
    # 65 samples: the last global batch has one sample, so one replica gets none; 66: one each.
    result = run[f"uneven_{samples}_{cross_replica}"]
    assert result["finite"]
    # A replica with too few samples (local entropies), or a global batch of one (cross-replica),
    # has no LBE term and is reported once.
    expected = 0 if (cross_replica and samples == 66) else 1
    assert result["warned"] == expected
