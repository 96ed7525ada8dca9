"""Every use of TensorFlow internals in lbe_ops, in one place.

TensorFlow has no public API for the things below; each entry says what it works around and which
public API would replace it. They are pinned by the TensorFlow the op library is built for (2.21),
so they change only with it. Keras internals are in lbe_ops/keras/_compat.py: this module is
imported by `import lbe_ops`, which must not import Keras.
"""

import tensorflow as tf
from tensorflow.python.ops import control_flow_util


def in_xla_context():
    """True while tracing a function that XLA will compile (jit_compile=True).

    Works around: the compiled op has no XLA kernel, so the backend choice must know at trace
    time whether XLA will compile the graph; TensorFlow answers that only through the private
    control_flow_util.GraphOrParentsInXlaContext. Public replacement: none (an XLA lowering of the
    op would make the question moot).
    """
    if tf.executing_eagerly():
        return False
    graph = tf.compat.v1.get_default_graph()
    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))


def in_multi_worker_mode(strategy):
    """True under MultiWorkerMirroredStrategy with more than one worker.

    Works around: Keras' multi-worker failures (docs/distributed.md) happen only with several
    workers, which the strategy tells only through the private
    `extended._in_multi_worker_mode()`. Public replacement: none direct; counting the tasks of
    `strategy.cluster_resolver.cluster_spec()` would rebuild it.
    """
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


def concrete_functions(function):
    """Every concrete function that a tf.function has traced so far.

    Works around: tf.function lists its traces only through the private
    `_list_all_concrete_functions()`. Public replacement: `get_concrete_function(*signature)`,
    which needs the input signature of each trace.
    """
    return function._list_all_concrete_functions()
