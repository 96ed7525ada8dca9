"""One worker of a tf.distribute.MultiWorkerMirroredStrategy cluster training a wrapped model.

Started by tests/keras/test_keras_multiworker.py: one process per worker, with TF_CONFIG naming
the cluster on 127.0.0.1; or with `--single` as one process without a strategy, which trains the
same models on the same global batches (the reference for cross_replica=True). Writes one JSON
file (the path in --out) with what the test checks.

    --die-after N   the worker with index --die-worker exits abruptly after N training steps
                    (counted over epochs); the other records how its training ends (the
                    collective timeout is --timeout seconds, if given).
    --stall         that worker hangs (sleeps) instead of exiting.
    --backup DIR    trains with keras.callbacks.BackupAndRestore(DIR/worker-<index>): each
                    worker keeps its own copy (the weights are the same on all workers), so no
                    two processes write one file.
"""

import argparse
import json
import os
import sys
import time

import tensorflow as tf

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import lbe_ops.keras as lk  # noqa: E402

SAMPLES = 64
GLOBAL_BATCH = 16
FEATURES = 6
CLASSES = 3
# (name, LBEModel options) trained one after the other in the same cluster.
RUNS = [
    ("cross", {"cross_replica": True}),
    ("local", {"cross_replica": False}),
    ("cross_additive", {"cross_replica": True, "additive": True}),
]


def data(seed, samples):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((samples, FEATURES)) * 2 + 0.5).astype(np.float32)
    y = rng.integers(0, CLASSES, samples)
    return x, y


def build(**options):
    keras.utils.set_random_seed(11)
    inputs = keras.Input((FEATURES,))
    h = keras.layers.Dense(16, activation="tanh")(inputs)
    h = keras.layers.Dense(16, activation="relu")(h)
    h = keras.layers.Dense(8, activation="tanh")(h)
    model = lk.wrap(keras.Model(inputs, keras.layers.Dense(CLASSES)(h)), alpha=1.2, beta=0.7,
                    **options)
    model.compile(keras.optimizers.SGD(0.5, momentum=0.5),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def snapshot(model):
    return {
        "weights": [np.asarray(w, np.float64).tolist() for w in model.get_weights()],
        "alphas": np.asarray(keras.ops.convert_to_numpy(model.lbe_alphas)).tolist(),
    }


class _DieAfter(keras.callbacks.Callback):
    def __init__(self, steps, stall):
        super().__init__()
        self.steps = steps
        self.stall = stall
        self.done = 0

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        if self.done >= self.steps:
            if self.stall:  # alive (TensorFlow's threads keep sending heartbeats), but stuck
                time.sleep(3600)
            os._exit(3)  # no cleanup, no goodbye to the cluster: as a crashed machine


def train(args, strategy):
    x, y = data(args.seed, args.samples)
    out = {}
    for name, options in RUNS[:args.runs]:
        with strategy.scope():
            model = build(**options)
        before = snapshot(model)
        callbacks = []
        if args.die_after and strategy.cluster_resolver.task_id == args.die_worker:
            callbacks.append(_DieAfter(args.die_after, args.stall))
        if args.backup:
            callbacks.append(keras.callbacks.BackupAndRestore(
                os.path.join(args.backup, f"worker-{strategy.cluster_resolver.task_id}")))
        start = time.monotonic()
        try:
            history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=args.epochs, verbose=0,
                                shuffle=False, callbacks=callbacks)
        except Exception as error:  # the fault test records how training ended
            out[name] = {"error": f"{type(error).__name__}: {str(error)[:400]}",
                         "seconds": time.monotonic() - start}
            return out
        result = {"history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
                  "seconds": time.monotonic() - start, "initial": before}
        result.update(snapshot(model))
        result["evaluate"] = model.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0,
                                            return_dict=True)
        out[name] = result
    if args.runs == len(RUNS) and not args.single:
        # Keras' loop over several steps per execution fails under several workers.
        model.compile(model.optimizer, model.loss, steps_per_execution=2)
        try:
            model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
        except ValueError as error:
            out["steps_per_execution_error"] = str(error)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--runs", type=int, default=len(RUNS))
    parser.add_argument("--die-after", type=int, default=0)
    parser.add_argument("--die-worker", type=int, default=1)
    parser.add_argument("--stall", action="store_true")
    parser.add_argument("--timeout", type=float, default=0)
    parser.add_argument("--backup", default="")
    args = parser.parse_args()
    if args.single:
        out = train(args, tf.distribute.get_strategy())
    else:
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=args.timeout or None)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        out = train(args, strategy)
        out["replicas"] = strategy.num_replicas_in_sync
        out["task_id"] = strategy.cluster_resolver.task_id
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    sys.exit(main())
