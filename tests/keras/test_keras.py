"""lbe_ops.keras: the regularizer, LBEModel in every model style, wrap(), logs and the callback,
saving, export, XLA and mixed precision. Numbers are checked against float64 numpy / TensorFlow.

MirroredStrategy needs logical devices configured before TensorFlow starts: see
test_keras_distributed.py.
"""

import json
import os
import subprocess
import sys
import textwrap
import threading
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import lbe_ops
import lbe_ops.keras as lk
from lbe_ops.keras import _capture as lk_capture
from lbe_ops.keras import regularizer as lk_regularizer
from oracle64 import PI_E, entropy as np_entropy

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- helpers -------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


def data(rng, n=32, features=5, classes=3):
    x = (rng.standard_normal((n, features)) * 1.5 + 0.3).astype(np.float32)
    y = rng.integers(0, classes, n)
    return x, y


def mlp_layers(regularizers, units=(7, 6), classes=3, out_regularizer=None):
    hidden = [keras.layers.Dense(u, activation="tanh", activity_regularizer=r)
              for u, r in zip(units, regularizers)]
    return hidden, keras.layers.Dense(classes, kernel_regularizer=out_regularizer)


def functional_mlp(regularizers, features=5, model_cls=lk.LBEModel, **model_kwargs):
    inputs = keras.Input((features,))
    hidden, head = mlp_layers(regularizers, out_regularizer=model_kwargs.pop("l2", None))
    h = inputs
    for layer in hidden:
        h = layer(h)
    return model_cls(inputs, head(h), **model_kwargs), hidden, head


def layer_params(layer):
    # (not get_weights(): a layer's weights include its regularizer's alpha)
    return layer.kernel.numpy().astype(np.float64), layer.bias.numpy().astype(np.float64)


def np_forward(x, hidden, head):
    """Activations of the tanh MLP and its logits, in float64."""
    acts, h = [], x.astype(np.float64)
    for layer in hidden:
        kernel, bias = layer_params(layer)
        h = np.tanh(h @ kernel + bias)
        acts.append(h)
    kernel, bias = (w.astype(np.float64) for w in head.get_weights())
    return acts, h @ kernel + bias


def np_cross_entropy(logits, y):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(y)), y].mean()


def np_lbe(acts, regularizers):
    entropies = np.array([np_entropy(a, r.ddof) for a, r in zip(acts, regularizers)])
    targets = np.array([max(r.alpha_min, abs(float(r.alpha.numpy()))) for r in regularizers])
    betas = np.array([r.beta for r in regularizers])
    return float(np.mean(betas * (entropies - targets) ** 2)), entropies


def alphas(model):
    return np.array([float(r.alpha.numpy()) for r in model.lbe_regularizers])


# ---- LBERegularizer ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, name", [
    ({"beta": -0.1}, ValueError, "beta"),
    ({"alpha_min": -1e-3}, ValueError, "alpha_min"),
    ({"alpha": float("nan")}, ValueError, "alpha"),
    ({"alpha": float("inf")}, ValueError, "alpha"),
    ({"beta": "strong"}, TypeError, "beta"),
    ({"alpha_min": None}, TypeError, "alpha_min"),
    ({"ddof": -1}, ValueError, "ddof"),
    ({"ddof": 0.5}, ValueError, "ddof"),
])
def test_regularizer_rejects_bad_arguments_naming_them(kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name} must"):
        lk.LBERegularizer(**kwargs)


def test_regularizer_alpha_is_a_tracked_trainable_float32_variable_of_its_layer():
    regularizer = lk.LBERegularizer(alpha=1.25, alpha_min=0.3, beta=2.0, ddof=0)
    assert isinstance(regularizer.alpha, keras.Variable)
    assert regularizer.alpha.trainable and regularizer.alpha.dtype == "float32"
    assert float(regularizer.alpha.numpy()) == 1.25
    layer = keras.layers.Dense(4, activity_regularizer=regularizer)
    layer.build((None, 3))
    assert any(v is regularizer.alpha for v in layer.trainable_weights)
    model = keras.Sequential([keras.Input((3,)), layer])
    assert any(v is regularizer.alpha for v in model.trainable_variables)


def test_regularizer_serializes_with_a_registered_name_and_current_alpha():
    regularizer = lk.LBERegularizer(alpha=0.8, alpha_min=0.1, beta=0.25, ddof=0)
    regularizer.alpha.assign(1.75)  # as after training
    config = keras.saving.serialize_keras_object(regularizer)
    assert config["registered_name"] == "lbe_ops>LBERegularizer"
    assert config["config"]["alpha"] == 1.75
    restored = keras.regularizers.deserialize(json.loads(json.dumps(config)))
    assert isinstance(restored, lk.LBERegularizer) and restored is not regularizer
    assert (restored.alpha_min, restored.beta, restored.ddof) == (0.1, 0.25, 0)
    assert float(restored.alpha.numpy()) == 1.75
    layer = keras.layers.Dense.from_config(
        keras.layers.Dense(3, activity_regularizer=regularizer).get_config())
    assert isinstance(layer.activity_regularizer, lk.LBERegularizer)


@pytest.mark.parametrize("batch", [4, 16])
def test_plain_model_regularizer_adds_the_intended_term_after_keras_scaling(rng, batch):
    regularizer = lk.LBERegularizer(alpha=-1.3, alpha_min=0.2, beta=0.6)
    layer = keras.layers.Dense(5, activation="tanh", activity_regularizer=regularizer)
    model = keras.Sequential([keras.Input((3,)), layer])
    x = rng.standard_normal((batch, 3)).astype(np.float32)
    out = model(x)
    assert len(model.losses) == 1
    expected = 0.6 * (np_entropy(out.numpy(), 1) - 1.3) ** 2
    np.testing.assert_allclose(float(model.losses[0]), expected, rtol=1e-5)


def test_regularizer_compensates_whichever_scaling_keras_applies(rng, monkeypatch):
    assert lk.keras_divides_activity_regularization() == (
        tuple(int(p) for p in keras.__version__.split(".")[:2]) >= (3, 14))
    x = tf.constant(rng.standard_normal((6, 4)), tf.float32)
    # A target far from the entropy (about 1 here): (H - alpha)^2 near H = alpha would lose
    # the float32 entropy's digits to cancellation.
    regularizer = lk.LBERegularizer(alpha=3.0, alpha_min=0.0, beta=1.0)
    term = (np_entropy(x.numpy(), 1) - 3.0) ** 2
    monkeypatch.setitem(lk_regularizer._scaling, "divides", True)
    np.testing.assert_allclose(float(regularizer(x)), 6 * term, rtol=1e-5)
    monkeypatch.setitem(lk_regularizer._scaling, "divides", False)  # a Keras that adds the value as is
    np.testing.assert_allclose(float(regularizer(x)), term, rtol=1e-5)


def test_plain_sequential_model_trains_alpha_and_restores_it_from_config(rng, tmp_path):
    x, y = data(rng)
    regularizer = lk.LBERegularizer(alpha=1.5, alpha_min=0.1, beta=1.0)
    model = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(8, activation="tanh",
                                                 activity_regularizer=regularizer),
                              keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.2), CE)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    trained = float(regularizer.alpha.numpy())
    assert abs(trained - 1.5) > 1e-4
    model.save(tmp_path / "plain.keras")
    loaded = keras.models.load_model(tmp_path / "plain.keras")
    assert float(loaded.layers[0].activity_regularizer.alpha.numpy()) == pytest.approx(trained)


# ---- LBEModel: the loss, its gradient, its logs ----------------------------------------------

@pytest.mark.parametrize("additive", [False, True])
def test_functional_loss_and_logs_match_float64_reference(rng, additive):
    x, y = data(rng)
    regularizers = [lk.LBERegularizer(alpha=0.9, alpha_min=0.3, beta=0.7),
                    lk.LBERegularizer(alpha=-1.4, alpha_min=0.2, beta=1.5, ddof=0)]
    model, hidden, head = functional_mlp(regularizers, additive=additive,
                                         l2=keras.regularizers.L2(0.01))
    model.compile(keras.optimizers.SGD(0.1), CE)
    logs = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)

    acts, logits = np_forward(x, hidden, head)
    task = np_cross_entropy(logits, y)
    lbe, entropies = np_lbe(acts, regularizers)
    l2 = 0.01 * np.sum(layer_params(head)[0] ** 2)
    expected = (task + lbe if additive else task * (1 + lbe)) + l2
    assert set(logs) == {"loss", "task_loss", "lbe", "entropy_mean"}
    np.testing.assert_allclose(logs["task_loss"], task, rtol=1e-5)
    np.testing.assert_allclose(logs["lbe"], lbe, rtol=1e-4)
    np.testing.assert_allclose(logs["entropy_mean"], entropies.mean(), rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)


def tf64_lbe_loss(x, y, weights, regularizer_settings, additive):
    """The LBE loss of the tanh MLP written out in float64 TensorFlow (independent of lbe_ops)."""
    (k1, b1, a1, k2, b2, a2, k3, b3) = weights
    h1 = tf.tanh(x @ k1 + b1)
    h2 = tf.tanh(h1 @ k2 + b2)
    logits = h2 @ k3 + b3
    task = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    terms = []
    for h, alpha, (alpha_min, beta, ddof) in zip((h1, h2), (a1, a2), regularizer_settings):
        n = tf.cast(tf.shape(h)[0], tf.float64)
        var = tf.reduce_sum(tf.square(h - tf.reduce_mean(h, 0)), 0) / (n - ddof)
        entropy = tf.reduce_mean(0.5 * tf.math.log1p(PI_E * var))
        terms.append(beta * tf.square(entropy - tf.maximum(tf.abs(alpha), alpha_min)))
    lbe = tf.add_n(terms) / 2
    return task + lbe if additive else task * (1 + lbe)


def backend_or_skip(name):
    if name == "op" and lbe_ops.backend_info()["backend"] != "op":
        pytest.skip("the compiled op is not available")
    return lbe_ops.use_backend(name)


@pytest.mark.parametrize("backend", ["op", "tf"])
@pytest.mark.parametrize("additive", [False, True])
def test_one_training_step_follows_the_float64_gradient(rng, additive, backend):
    x, y = data(rng, n=24)
    settings = [(0.3, 0.7, 1), (0.2, 1.5, 0)]
    regularizers = [lk.LBERegularizer(alpha=0.9, alpha_min=0.3, beta=0.7),
                    lk.LBERegularizer(alpha=-1.4, alpha_min=0.2, beta=1.5, ddof=0)]
    model, hidden, head = functional_mlp(regularizers, additive=additive)
    model.compile(keras.optimizers.SGD(learning_rate=1.0), CE)
    # The model trains kernel and bias of each layer and one vector of the two alphas.
    assert len(model.trainable_variables) == 7
    assert model.lbe_alphas.shape == (2,)

    def parameters():  # in tf64_lbe_loss's order: kernel, bias, alpha per hidden layer; head
        values = []
        for layer, regularizer in zip(hidden, regularizers):
            values += [layer.kernel.numpy(), layer.bias.numpy(), regularizer.alpha.numpy()]
        values += [head.kernel.numpy(), head.bias.numpy()]
        return [np.asarray(v, np.float64) for v in values]

    before = parameters()
    variables = [tf.Variable(w) for w in before]
    with tf.GradientTape() as tape:
        loss = tf64_lbe_loss(tf.constant(x, tf.float64), y, variables, settings, additive)
    expected = tape.gradient(loss, variables)

    with backend_or_skip(backend):  # the backend chosen when Keras traces the step
        logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["loss"], float(loss), rtol=1e-5)
    for k, (w0, w1, grad) in enumerate(zip(before, parameters(), expected)):
        np.testing.assert_allclose(w0 - w1, grad.numpy(), rtol=2e-4, atol=2e-6,
                                   err_msg=f"parameter {k}")
    assert abs(float(expected[2])) > 1e-4 and abs(float(expected[5])) > 1e-4  # alphas moved


def test_fit_logs_carry_lbe_keys_and_alphas_train(rng):
    x, y = data(rng, n=48)
    regularizers = [lk.LBERegularizer(alpha=1.5), lk.LBERegularizer(alpha=1.5)]
    model, _, _ = functional_mlp(regularizers)
    model.compile(keras.optimizers.Adam(0.05), CE, metrics=["accuracy"])
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_data=(x, y))
    for key in ("loss", "task_loss", "lbe", "entropy_mean", "accuracy"):
        assert len(history.history[key]) == 2 and len(history.history["val_" + key]) == 2
    assert np.all(np.isfinite(history.history["lbe"]))
    assert np.all(np.abs(alphas(model) - 1.5) > 1e-3)


def test_entropies_of_all_layers_come_from_one_batch_entropies_call(rng, monkeypatch):
    calls = []
    original = lbe_ops.ops.batch_entropies

    def counting(xs, ddof=1, dtype=None, **kwargs):
        calls.append(len(xs))
        return original(xs, ddof=ddof, dtype=dtype, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("per-layer batch_entropy called inside an LBEModel step")

    monkeypatch.setattr(lbe_ops.ops, "batch_entropies", counting)
    monkeypatch.setattr(lbe_ops.ops, "batch_entropy", forbidden)
    x, y = data(rng)
    regularizers = [lk.LBERegularizer(), lk.LBERegularizer(), lk.LBERegularizer()]
    inputs = keras.Input((5,))
    h = inputs
    for regularizer in regularizers:
        h = keras.layers.Dense(6, activation="relu", activity_regularizer=regularizer)(h)
    model = lk.LBEModel(inputs, keras.layers.Dense(3)(h))
    model.compile("sgd", CE, run_eagerly=True)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert calls == [3] * 4  # one call per step, holding the three layers


def test_regularizer_modes_nest_per_thread():
    mode = lk_capture.Mode
    assert lk_capture.current_mode() is mode.TERM
    with lk_capture.capturing() as capture:
        assert lk_capture.current_mode() is mode.CAPTURE
        assert lk_capture.current_capture() is capture
        with lk_capture.regularizers_disabled():
            assert lk_capture.current_mode() is mode.DISABLED
        assert lk_capture.current_capture() is capture
        seen = []
        thread = threading.Thread(target=lambda: seen.append(lk_capture.current_mode()))
        thread.start()
        thread.join()
        assert seen == [mode.TERM]
    assert lk_capture.current_mode() is mode.TERM
    with pytest.raises(RuntimeError, match="no LBEModel step"):
        lk_capture.current_capture()


def test_placeholder_activity_losses_are_left_out_of_the_step_graph(rng):
    # In an LBEModel step the regularizers hand Keras placeholder zeros; compute_loss recognises
    # what Keras made of them (on 3.14+ a quotient by the batch size) and leaves them out, while
    # real add_loss terms stay.
    class AddedLoss(keras.layers.Layer):
        def call(self, inputs):
            self.add_loss(keras.ops.sum(inputs))
            return inputs

    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, activity_regularizer=lk.LBERegularizer())(inputs)
    h = keras.layers.Dense(3, activity_regularizer=lk.LBERegularizer(),
                           kernel_regularizer="l2")(AddedLoss()(h))
    model = keras.Model(inputs, h)

    flags = []

    @tf.function
    def step(x):
        with lk_capture.capturing() as capture:
            model(x)
            flags.extend(capture.is_placeholder_loss(loss) for loss in model.losses)
        return x

    step(tf.constant(rng.standard_normal((5, 4)), tf.float32))
    assert sorted(flags) == [False, False, True, True]


def test_autoencoder_with_mse_and_extra_losses(rng):
    x = rng.standard_normal((20, 6)).astype(np.float32)
    regularizer = lk.LBERegularizer(alpha=1.1, alpha_min=0.5, beta=0.9)

    class AddedLoss(keras.layers.Layer):
        def call(self, inputs):
            self.add_loss(0.05 * keras.ops.mean(keras.ops.square(inputs)))
            return inputs

    inputs = keras.Input((6,))
    encoder = keras.layers.Dense(3, activation="tanh", activity_regularizer=regularizer)
    code = AddedLoss()(encoder(inputs))
    decoder = keras.layers.Dense(6)
    model = lk.LBEModel(inputs, decoder(code))
    model.compile("adam", "mse")
    logs = model.evaluate(x, x, batch_size=20, verbose=0, return_dict=True)

    kernel, bias = layer_params(encoder)
    code64 = np.tanh(x @ kernel + bias)
    kernel, bias = layer_params(decoder)
    mse = np.mean((code64 @ kernel + bias - x) ** 2)
    lbe = 0.9 * (np_entropy(code64, 1) - 1.1) ** 2
    added = 0.05 * np.mean(code64 ** 2)
    np.testing.assert_allclose(logs["loss"], mse * (1 + lbe) + added, rtol=1e-5)
    np.testing.assert_allclose(logs["task_loss"], mse, rtol=1e-5)
    history = model.fit(x, x, batch_size=10, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_multiplicative_form_without_a_task_loss_is_a_clear_error(rng):
    x, y = data(rng)
    model, _, _ = functional_mlp([lk.LBERegularizer(), lk.LBERegularizer()])
    model.compile("sgd")
    with pytest.raises(ValueError, match="needs a task loss"):
        model.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(TypeError, match="additive"):
        functional_mlp([None, None], additive="yes")


# ---- model styles --------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="lbe_ops_tests")
class SubclassedNet(lk.LBEModel):
    def __init__(self, units=6, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = [keras.layers.Dense(units, activation="tanh",
                                          activity_regularizer=lk.LBERegularizer(alpha=1.2))
                       for _ in range(2)]
        self.head = keras.layers.Dense(3)

    def call(self, inputs):
        for layer in self.hidden:
            inputs = layer(inputs)
        return self.head(inputs)


def test_functional_use_leaves_lbe_model_subclassable(rng):
    # keras.Model(inputs, outputs) on a subclass rewrites the class's bases to Functional; the
    # Functional flavour of LBEModel is a separate class, so subclasses keep working after it.
    model, _, _ = functional_mlp([lk.LBERegularizer(), lk.LBERegularizer()])
    assert isinstance(model, lk.LBEModel) and type(model).__name__ == "LBEModel"
    assert lk.LBEModel.__bases__ == (keras.Model,)
    x, y = data(rng)
    net = SubclassedNet(additive=True)
    assert "Functional" not in [c.__name__ for c in type(net).__mro__]
    net.compile(keras.optimizers.SGD(0.2), CE)
    history = net.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert {"task_loss", "lbe", "entropy_mean"} <= set(history.history)
    assert len(net.lbe_regularizers) == 2 and np.all(np.abs(alphas(net) - 1.2) > 1e-5)
    # A subclass used functionally gets its own Functional flavour; the class stays as it was.

    class Sub(lk.LBEModel):
        pass

    sub, _, _ = functional_mlp([lk.LBERegularizer(), None], model_cls=Sub)
    assert isinstance(sub, Sub) and Sub.__bases__ == (lk.LBEModel,)


def test_wrap_sequential_regularizes_dense_and_conv_but_not_the_output(rng):
    images = rng.standard_normal((16, 6, 6, 1)).astype(np.float32)
    labels = rng.integers(0, 2, 16)
    seq = keras.Sequential([keras.Input((6, 6, 1)),
                            keras.layers.Conv2D(3, 3, activation="relu", name="conv"),
                            keras.layers.Flatten(name="flat"),
                            keras.layers.Dense(5, activation="relu", name="hidden"),
                            keras.layers.Dense(2, name="logits")])
    model = lk.wrap(seq, beta=0.2, alpha=1.0)
    assert isinstance(model, lk.LBEModel)
    regularized = {layer.name: layer.activity_regularizer for layer in model.layers}
    assert isinstance(regularized["conv"], lk.LBERegularizer)
    assert isinstance(regularized["hidden"], lk.LBERegularizer)
    assert regularized["logits"] is None and regularized["flat"] is None
    assert regularized["hidden"].beta == 0.2
    model.compile("adam", CE)
    history = model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["lbe"][0]) and history.history["lbe"][0] > 0


def test_wrap_functional_with_chosen_layers_and_options(rng):
    inputs = keras.Input((5,))
    a = keras.layers.Dense(4, activation="tanh", name="a")(inputs)
    b = keras.layers.Dense(4, activation="tanh", name="b")(inputs)
    merged = keras.layers.Concatenate()([a, b])
    outputs = keras.layers.Dense(3, name="out")(merged)
    base = keras.Model(inputs, outputs)
    model = lk.wrap(base, layers=["b", base.get_layer("out")], additive=True, ddof=0)
    assert model.additive and not model.cross_replica
    names = [layer.name for layer in model.layers if layer.activity_regularizer is not None]
    assert names == ["b", "out"]
    assert all(r.ddof == 0 for r in model.lbe_regularizers)
    x, y = data(rng)
    model.compile("sgd", CE)
    np.testing.assert_allclose(model.predict(x, verbose=0), base.predict(x, verbose=0))


def test_wrap_rejects_what_it_cannot_wrap():
    with pytest.raises(TypeError, match="Sequential or Functional"):
        lk.wrap(SubclassedNet())
    with pytest.raises(ValueError, match="no defined input"):
        lk.wrap(keras.Sequential([keras.layers.Dense(3)]))
    seq = keras.Sequential([keras.Input((4,)),
                            keras.layers.Dense(3, activity_regularizer="l2", name="l2_dense"),
                            keras.layers.Dense(2, name="head")])
    with pytest.raises(ValueError, match="'l2_dense' already has the activity_regularizer"):
        lk.wrap(seq)
    with pytest.raises(ValueError, match="no layer named 'missing'"):
        lk.wrap(seq, layers=["missing"])
    with pytest.raises(ValueError, match="^beta must"):
        lk.wrap(seq, layers=["head"], beta=-1.0)
    assert seq.get_layer("head").activity_regularizer is None  # nothing changed on failure


# ---- per-layer entropies ------------------------------------------------------------------

def read_histogram_steps(directory, tag):
    steps = []
    for name in sorted(os.listdir(directory)):
        for record in tf.data.TFRecordDataset(os.path.join(directory, name)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            steps += [event.step for value in event.summary.value
                      if value.tag == tag and histogram_count(value) == 2]
    return steps


def histogram_count(value):
    """Values in a histogram record: a classic HistogramProto (written without the tensorboard
    package) or the histograms plugin's [buckets, 3] tensor (tf.summary.histogram)."""
    if value.WhichOneof("value") == "histo":
        return value.histo.num
    if value.WhichOneof("value") == "tensor":
        return float(tf.make_ndarray(value.tensor)[:, 2].sum())
    return None


def test_layer_entropy_logger_records_history_and_tensorboard(rng, tmp_path):
    x, y = data(rng, n=24)
    regularizers = [lk.LBERegularizer(), lk.LBERegularizer()]
    model, hidden, head = functional_mlp(regularizers)
    # lr 0: the weights stay put, so every epoch's entropies are those of the full batch.
    model.compile(keras.optimizers.SGD(0.0), CE)
    logger = lk.LayerEntropyLogger(log_dir=tmp_path)
    history = model.fit(x, y, batch_size=24, epochs=2, verbose=0, validation_data=(x, y),
                        callbacks=[logger])
    acts, _ = np_forward(x, hidden, head)
    for layer, act in zip(hidden, acts):
        for key in (f"entropy/{layer.name}", f"val_entropy/{layer.name}"):
            assert len(history.history[key]) == 2, key
            np.testing.assert_allclose(history.history[key], [np_entropy(act, 1)] * 2, rtol=1e-5)
            assert logger.history[key] == history.history[key]
    assert not any(key.startswith("entropy/") for key in model.get_metrics_result())
    assert read_histogram_steps(tmp_path / "train", "lbe/layer_entropies") == [0, 1]
    assert read_histogram_steps(tmp_path / "validation", "lbe/layer_entropies") == [0, 1]


# ---- saving and export ------------------------------------------------------------------

def saved_weight_paths(path):
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as handle:
        with h5py.File(handle, "r") as weights:
            paths = []
            weights.visit(paths.append)
    return paths


def test_save_and_load_restores_trained_alphas_in_every_style(rng, tmp_path):
    x, y = data(rng)
    seq = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                            keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)])
    functional = lk.wrap(seq, alpha=1.3, additive=True)
    subclassed = SubclassedNet(units=5, cross_replica=True)
    for model in (functional, subclassed):
        model.compile(keras.optimizers.SGD(0.3), CE)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        path = tmp_path / f"{model.name}.keras"
        model.save(path)
        # alphas are in the weights file, not only in the layer configs
        assert any("lbe_regularizers" in p for p in saved_weight_paths(path))
        loaded = keras.models.load_model(path)
        assert type(loaded).__name__ == type(model).__name__
        assert isinstance(loaded, lk.LBEModel)
        assert (loaded.additive, loaded.cross_replica) == (model.additive, model.cross_replica)
        np.testing.assert_array_equal(alphas(loaded), alphas(model))
        assert np.all(alphas(loaded) != (1.3 if model is functional else 1.2))
        np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                                   rtol=1e-6)
        expected = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
        got = loaded.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-6)
        loaded.fit(x, y, batch_size=16, epochs=1, verbose=0)  # and trains on


def graph_op_types(saved_model_dir):
    from tensorflow.core.protobuf import saved_model_pb2
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as handle:
        proto.ParseFromString(handle.read())
    types = set()
    for meta_graph in proto.meta_graphs:
        types.update(node.op for node in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            types.update(node.op for node in function.node_def)
    return types


def test_export_has_no_lbe_ops_and_serves_without_lbe_ops(rng, tmp_path):
    x, y = data(rng)
    seq = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="relu"),
                            keras.layers.Dense(3)])
    model = lk.wrap(seq)
    model.compile("adam", CE)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    plain = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(4, activity_regularizer=lk.LBERegularizer()),
                              keras.layers.Dense(2)])
    model.export(str(tmp_path / "lbe_model"), verbose=False)
    lk.export(plain, str(tmp_path / "plain"), verbose=False)
    for name in ("lbe_model", "plain"):
        types = graph_op_types(tmp_path / name)
        assert "MatMul" in types and not any(t.startswith("Lbe") for t in types), name
    if lbe_ops.backend_info()["backend"] == "op":
        # What the helpers prevent: a plain export traces the regularizer with the op.
        keras.Model.export(plain, str(tmp_path / "raw"), verbose=False)
        assert any(t.startswith("Lbe") for t in graph_op_types(tmp_path / "raw"))

    artifact = tf.saved_model.load(str(tmp_path / "lbe_model"))
    served = artifact.serve(tf.constant(x))
    np.testing.assert_allclose(served.numpy(), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


# ---- XLA and mixed precision --------------------------------------------------------------

def test_jit_compile_gives_the_same_loss_and_trains(rng):
    x, y = data(rng)
    regularizers = [lk.LBERegularizer(alpha=1.3), lk.LBERegularizer(alpha=1.3)]
    model, _, _ = functional_mlp(regularizers)
    model.compile(keras.optimizers.SGD(0.2), CE, jit_compile=False)
    eager = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    model.compile(keras.optimizers.SGD(0.2), CE, jit_compile=True)
    xla = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    for key in eager:
        np.testing.assert_allclose(xla[key], eager[key], rtol=1e-5)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert np.all(np.abs(alphas(model) - 1.3) > 1e-4)


@pytest.mark.parametrize("policy, rtol", [("mixed_float16", 5e-3), ("mixed_bfloat16", 3e-2)])
def test_mixed_precision_matches_float32_and_trains(rng, policy, rtol):
    x, y = data(rng)
    reference, _, _ = functional_mlp([lk.LBERegularizer(alpha=1.3), lk.LBERegularizer(alpha=1.3)])
    reference.compile("sgd", CE)
    expected = reference.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)

    keras.config.set_dtype_policy(policy)
    model, hidden, _ = functional_mlp([lk.LBERegularizer(alpha=1.3), lk.LBERegularizer(alpha=1.3)])
    model.set_weights(reference.get_weights())
    assert hidden[0].compute_dtype == policy.split("_")[1]
    assert all(r.alpha.dtype == "float32" for r in model.lbe_regularizers)
    model.compile(keras.optimizers.SGD(0.2), CE)
    got = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    for key in ("entropy_mean", "lbe", "task_loss", "loss"):
        np.testing.assert_allclose(got[key], expected[key], rtol=rtol, err_msg=key)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert np.all(np.abs(alphas(model) - 1.3) > 1e-4)


# ---- a fresh process ---------------------------------------------------------------------

@pytest.mark.slow  # a fresh Python process
def test_fresh_process_serves_the_export_without_lbe_ops_and_loads_without_custom_objects(
        rng, tmp_path):
    x, y = data(rng)
    model, _, _ = functional_mlp([lk.LBERegularizer(alpha=1.4), lk.LBERegularizer(alpha=1.4)],
                                 additive=True)
    model.compile(keras.optimizers.SGD(0.3), CE)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    model.export(str(tmp_path / "served"), verbose=False)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import json, sys, numpy as np, tensorflow as tf
        x = np.load({str(tmp_path / "x.npy")!r})
        artifact = tf.saved_model.load({str(tmp_path / "served")!r})
        served = artifact.serve(tf.constant(x))
        assert not any(m.startswith("lbe_ops") for m in sys.modules)  # served without lbe_ops

        import keras
        import lbe_ops.keras  # registers the classes: no custom_objects needed
        model = keras.models.load_model({str(tmp_path / "m.keras")!r})
        print(json.dumps({{"type": type(model).__name__, "additive": model.additive,
                          "alphas": [float(r.alpha.numpy()) for r in model.lbe_regularizers],
                          "served": served.numpy().tolist(),
                          "pred": model.predict(x, verbose=0).tolist()}}))
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["type"] == "LBEModel" and out["additive"] is True
    np.testing.assert_array_equal(out["alphas"], alphas(model))
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(out["pred"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["served"], expected, rtol=1e-5, atol=1e-6)
