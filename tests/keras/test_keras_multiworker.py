"""LBE training under tf.distribute.MultiWorkerMirroredStrategy with two real worker processes.

Each worker runs support/keras_multiworker_helper.py with TF_CONFIG naming a cluster of two workers
on 127.0.0.1 (free ports); a third process trains the same models without a strategy on the same
global batches. Every process a test starts is killed when the test ends, also when it fails.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)
HELPER = os.path.join(TESTS, "support", "keras_multiworker_helper.py")
# A bound on each group of processes, far above what they need: a worker that waits forever for
# a dead peer fails the test instead of hanging it.
LIMIT_SECONDS = 300
RUNS = ("cross", "local", "cross_additive")


def _free_loopback_ports(count):
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _env(tf_config=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


@contextlib.contextmanager
def _processes():
    """Starts processes through the yielded function; kills whichever still run at the end."""
    started = []

    def start(args, env, log_path):
        log = open(log_path, "w")
        try:
            process = subprocess.Popen([sys.executable, HELPER, *args], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=REPO)
        finally:
            log.close()
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
        for process in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)


def _wait_all(processes):
    """Return codes, once all processes have ended or LIMIT_SECONDS have passed (then None for
    the ones still running)."""
    deadline = time.monotonic() + LIMIT_SECONDS
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes


def _tail(path, chars=3000):
    with open(path) as f:
        return f.read()[-chars:]


def _cluster(start, workdir, tag, *args):
    """Starts two workers on loopback; returns their processes, result paths and log paths."""
    ports = _free_loopback_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes, outs, logs = [], [], []
    for index in range(2):
        out = os.path.join(workdir, f"{tag}-worker{index}.json")
        log = os.path.join(workdir, f"{tag}-worker{index}.log")
        env = _env({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(start(["--out", out, *args], env, log))
        outs.append(out)
        logs.append(log)
    return processes, outs, logs


def _load(path):
    with open(path) as f:
        return json.load(f)


# Starts processes that train (a cluster or a subprocess with two replicas): pytest -m slow.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The two workers' results and the single process's, for every run of the helper."""
    workdir = str(tmp_path_factory.mktemp("multiworker"))
    with _processes() as start:
        workers, outs, logs = _cluster(start, workdir, "train")
        single_out = os.path.join(workdir, "single.json")
        single_log = os.path.join(workdir, "single.log")
        single = start(["--single", "--out", single_out], _env(), single_log)
        codes = _wait_all(workers + [single])
    for code, log in zip(codes, logs + [single_log]):
        assert code == 0, f"{log} ended with {code}:\n{_tail(log)}"
    return [_load(out) for out in outs], _load(single_out)


def _parameters(result):
    return [np.asarray(w) for w in result["weights"]] + [np.asarray(result["alphas"])]


def _max_difference(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(_parameters(a), _parameters(b)))


def test_both_workers_train_the_same_weights_and_alphas(trained):
    workers, _ = trained
    assert [w["task_id"] for w in workers] == [0, 1]
    assert all(w["replicas"] == 2 for w in workers)
    for run in RUNS:
        first, second = workers[0][run], workers[1][run]
        for a, b in zip(_parameters(first), _parameters(second)):
            np.testing.assert_array_equal(a, b)
        assert first["history"] == second["history"]
        for key in ("loss", "task_loss", "lbe", "entropy_mean"):
            assert len(first["history"][key]) == 2
            assert np.all(np.isfinite(first["history"][key]))
        assert np.all(np.isfinite(np.concatenate([np.ravel(p) for p in _parameters(first)])))
        # Training moved the weights and the alphas.
        initial = first["initial"]
        assert _max_difference(first, initial) > 1e-2
        assert np.abs(np.subtract(first["alphas"], initial["alphas"])).min() > 1e-3


def test_several_steps_per_execution_are_refused_with_a_clear_error(trained):
    workers, _ = trained
    for worker in workers:
        message = worker.get("steps_per_execution_error", "")
        assert "steps_per_execution=2" in message and "steps_per_execution=1" in message


@pytest.mark.parametrize("run", ["cross", "cross_additive"])
def test_cross_replica_trains_like_one_process_on_the_global_batch(trained, run):
    workers, single = trained
    result, expected = workers[0][run], single[run]
    for a, b in zip(_parameters(result), _parameters(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key, values in expected["history"].items():
        np.testing.assert_allclose(result["history"][key], values, rtol=1e-5)
    for key, value in expected["evaluate"].items():
        np.testing.assert_allclose(result["evaluate"][key], value, rtol=1e-5)


def test_per_replica_entropies_are_not_those_of_the_global_batch(trained):
    # Without cross_replica each worker's entropies are those of its half of the batch: the
    # training differs from one process on the global batch (what makes the test above count).
    workers, single = trained
    assert _max_difference(workers[0]["local"], single["cross"]) > 1e-3
    assert abs(workers[0]["local"]["evaluate"]["entropy_mean"]
               - single["cross"]["evaluate"]["entropy_mean"]) > 1e-4


def test_a_dead_worker_stops_the_other_and_training_resumes_from_the_backup(trained, tmp_path):
    _, single = trained
    backup = str(tmp_path / "backup")
    common = ["--runs", "1", "--backup", backup]
    with _processes() as start:
        # Worker 1 dies in the second epoch (4 steps an epoch); the backup holds epoch 1's end.
        workers, outs, logs = _cluster(start, str(tmp_path), "crash", *common,
                                       "--die-after", "5", "--die-worker", "1",
                                       "--timeout", "120")
        codes = _wait_all(workers)
    assert codes[1] == 3, f"worker 1 ended with {codes[1]}:\n{_tail(logs[1])}"
    assert codes[0] == 0, f"worker 0 ended with {codes[0]}:\n{_tail(logs[0])}"
    survivor = _load(outs[0])["cross"]
    assert "error" in survivor, survivor
    assert survivor["error"].startswith(("UnavailableError", "DeadlineExceededError",
                                         "CancelledError", "InternalError")), survivor["error"]
    for index in range(2):
        with open(os.path.join(backup, f"worker-{index}", "training_metadata.json")) as f:
            assert json.load(f)["epoch"] == 1

    with _processes() as start:
        workers, outs, logs = _cluster(start, str(tmp_path), "resume", *common)
        codes = _wait_all(workers)
    for code, log in zip(codes, logs):
        assert code == 0, f"{log} ended with {code}:\n{_tail(log)}"
    resumed = [_load(out)["cross"] for out in outs]
    # Only the second epoch ran; weights, alphas and optimizer state came back from the backup,
    # so the result is that of an uninterrupted run.
    for result in resumed:
        assert len(result["history"]["loss"]) == 1
        for a, b in zip(_parameters(result), _parameters(single["cross"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_stuck_worker_ends_the_other_at_the_collective_timeout(tmp_path):
    # A worker that hangs while its process lives still sends heartbeats, so only the timeout
    # of MultiWorkerMirroredStrategy's CommunicationOptions ends the other worker's fit.
    with _processes() as start:
        workers, outs, logs = _cluster(start, str(tmp_path), "stall", "--runs", "1",
                                       "--die-after", "5", "--die-worker", "1", "--stall",
                                       "--timeout", "15")
        code = _wait_all(workers[:1])[0]
        assert code == 0, f"worker 0 ended with {code}:\n{_tail(logs[0])}"
        assert workers[1].poll() is None  # still stuck; killed on leaving the block
    survivor = _load(outs[0])["cross"]
    assert survivor.get("error", "").startswith("DeadlineExceededError"), survivor
