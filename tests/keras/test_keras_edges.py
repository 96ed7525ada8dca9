"""lbe_ops.keras on ordinary data and models: small and single-sample batches, pretrained
weights, nested models and separate activation layers, misuse, TensorBoard."""

import glob
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import lbe_ops
import lbe_ops.keras as lk
from lbe_ops.keras.alphas import walk_layers

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.utils.set_random_seed(4321)
    yield


def mlp(depth=3, width=8, features=5, classes=3, name=None):
    return keras.Sequential(
        [keras.Input((features,))]
        + [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
        + [keras.layers.Dense(classes)], name=name)


def data(rng, n, features=5, classes=3):
    return (rng.standard_normal((n, features)).astype(np.float32),
            rng.integers(0, classes, n))


def all_finite(model):
    return all(np.all(np.isfinite(keras.ops.convert_to_numpy(v))) for v in model.weights)


# ---- a batch too small for a variance ------------------------------------------------------

@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("backend", ["op", "tf"])
def test_a_last_batch_of_one_sample_trains_without_error_or_nan(rng, jit_compile, backend):
    x, y = data(rng, 65)  # batch_size 64: the last batch holds one sample
    model = lk.wrap(mlp())
    model.compile(keras.optimizers.SGD(0.05), CE, jit_compile=jit_compile)
    with lbe_ops.use_backend(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=64, epochs=2, verbose=0, shuffle=False)
        logs = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
        model.train_on_batch(x[:1], y[:1])
        model.test_on_batch(x[:1], y[:1])
    assert all(np.isfinite(history.history["loss"])) and all(np.isfinite(list(logs.values())))
    assert all_finite(model)
    messages = [str(w.message) for w in caught if "too few for a batch variance" in str(w.message)]
    assert len(messages) == 1, messages  # once per model
    assert "no LBE term" in messages[0]


def test_a_batch_of_one_contributes_the_task_loss_alone(rng):
    x, y = data(rng, 1)
    model = lk.wrap(mlp())
    model.compile(keras.optimizers.SGD(0.1), CE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logs = model.test_on_batch(x, y, return_dict=True)
    task = float(CE(y, model.predict(x, verbose=0)))
    np.testing.assert_allclose(logs["loss"], task, rtol=1e-5)
    np.testing.assert_allclose(logs["task_loss"], task, rtol=1e-5)
    assert logs["lbe"] == 0.0
    alphas = model.lbe_alphas.numpy().copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train_on_batch(x, y)
    np.testing.assert_array_equal(model.lbe_alphas.numpy(), alphas)  # no LBE gradient


def test_tf_data_without_drop_remainder_and_small_batches_in_the_epoch_means(rng):
    x, y = data(rng, 33)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)  # 16, 16, 1
    model = lk.wrap(mlp())
    model.compile(keras.optimizers.SGD(0.05), CE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = model.fit(dataset, epochs=1, verbose=0)
    assert np.isfinite(history.history["entropy_mean"][0])
    assert history.history["entropy_mean"][0] > 0  # the batch of one did not pull it to 0


# ---- inference on any batch size -------------------------------------------------------------

def test_single_sample_inference_on_wrapped_and_original_models(rng):
    x, _ = data(rng, 1)
    base = mlp()
    model = lk.wrap(base)
    for call in (lambda: model(x), lambda: model(x, training=False),
                 lambda: model(x, training=True), lambda: base(x), lambda: base(x, training=False),
                 lambda: model.predict(x, verbose=0), lambda: base.predict(x, verbose=0)):
        out = keras.ops.convert_to_numpy(call())
        assert out.shape == (1, 3) and np.all(np.isfinite(out))
    base(x)  # eager: the regularizers' terms are concrete
    assert base.losses and all(float(loss) == 0.0 for loss in base.losses)  # none for one sample


def test_plain_model_with_regularizers_serves_single_samples(rng):
    x, _ = data(rng, 1)
    model = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(4, activation="relu",
                                                 activity_regularizer=lk.LBERegularizer()),
                              keras.layers.Dense(3)])
    assert model.predict(x, verbose=0).shape == (1, 3)
    assert model(x).shape == (1, 3)


# ---- pretrained weights ----------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_a_plain_models_weights_load_into_a_wrapped_model(rng, tmp_path, suffix):
    x, y = data(rng, 32)
    plain = mlp()
    plain.compile(keras.optimizers.SGD(0.1), CE)
    plain.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / f"plain{suffix}")
    if suffix == ".keras":
        plain.save(path)
    else:
        plain.save_weights(path)
    model = lk.wrap(mlp(), alpha=0.7)
    model.load_weights(path)
    for mine, theirs in zip(model.layers[1:], plain.layers):
        for a, b in zip(mine.get_weights(), theirs.get_weights()):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.lbe_alphas.numpy(), np.full(3, 0.7, np.float32))
    np.testing.assert_allclose(model.predict(x, verbose=0), plain.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)


def test_per_layer_weights_and_summary_are_the_plain_layers(rng):
    plain = mlp()
    model = lk.wrap(mlp())
    for mine, theirs in zip(model.layers[1:], plain.layers):
        assert len(mine.get_weights()) == len(theirs.get_weights())
        mine.set_weights(theirs.get_weights())
        assert mine.count_params() == theirs.count_params()
    assert model.count_params() == plain.count_params() + 3  # plus one alpha per layer
    lines = []
    model.summary(print_fn=lambda line, **kwargs: lines.append(line))
    assert not any("alpha" in line for line in lines if "dense" in line)


def test_a_wrapped_models_checkpoint_restores_its_trained_alphas(rng, tmp_path):
    x, y = data(rng, 32)
    model = lk.wrap(mlp(), alpha=1.5)
    model.compile(keras.optimizers.SGD(0.5), CE)
    model.fit(x, y, epochs=2, verbose=0)
    trained = model.lbe_alphas.numpy().copy()
    assert np.all(np.abs(trained - 1.5) > 1e-5)
    model.save_weights(str(tmp_path / "w.weights.h5"))
    fresh = lk.wrap(mlp(), alpha=1.5)
    fresh.load_weights(str(tmp_path / "w.weights.h5"))
    np.testing.assert_array_equal(fresh.lbe_alphas.numpy(), trained)
    np.testing.assert_array_equal([float(r.alpha) for r in fresh.lbe_regularizers], trained)
    base = mlp()
    other = lk.wrap(base, layers=base.layers[:2], alpha=1.5)
    with pytest.raises(ValueError, match="holds 3 LBE alphas, but this model regularizes 2"):
        other.load_weights(str(tmp_path / "w.weights.h5"))


def test_alpha_view_reads_and_assigns_one_entry(rng):
    model = lk.wrap(mlp(), alpha=0.9)
    regularizer = model.lbe_regularizers[1]
    assert isinstance(regularizer.alpha, lk.AlphaView)
    regularizer.alpha.assign(2.5)
    np.testing.assert_array_equal(model.lbe_alphas.numpy(), np.float32([0.9, 2.5, 0.9]))
    assert float(regularizer.alpha) == 2.5 and float(tf.convert_to_tensor(regularizer.alpha)) == 2.5
    assert regularizer.get_config()["alpha"] == 2.5
    assert sum(v is model.lbe_alphas for v in model.trainable_variables) == 1
    assert len([v for v in model.trainable_variables if "alpha" in v.path]) == 1


# ---- which outputs wrap() regularizes ------------------------------------------------------------

def regularized_names(model):
    return [layer.name for layer in walk_layers(model)
            if isinstance(getattr(layer, "activity_regularizer", None), lk.LBERegularizer)]


def test_wrap_reaches_into_nested_models(rng):
    backbone = keras.Sequential([keras.Input((5,)),
                                 keras.layers.Dense(8, activation="relu", name="b1"),
                                 keras.layers.Dense(8, activation="relu", name="b2")],
                                name="backbone")
    inputs = keras.Input((5,))
    h = backbone(inputs)
    h = keras.layers.Dense(8, activation="relu", name="top")(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    model = lk.wrap(keras.Model(inputs, outputs))
    assert regularized_names(model) == ["b1", "b2", "top"]
    x, y = data(rng, 32)
    model.compile(keras.optimizers.SGD(0.05), CE)
    history = model.fit(x, y, epochs=1, verbose=0)
    assert history.history["lbe"][0] > 0
    assert sorted(model.layer_entropies()) == ["b1", "b2", "top"]


def test_a_nested_model_that_produces_the_output_keeps_its_head_unregularized():
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu",
                                                                    name="i1"),
                              keras.layers.Dense(3, name="i_head")], name="inner")
    outer = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu",
                                                                    name="o1"), inner])
    assert regularized_names(lk.wrap(outer)) == ["o1", "i1"]


def test_wrap_regularizes_the_activation_layer_after_a_linear_layer(rng):
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, name="d1")(inputs)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="relu1")(h)
    h = keras.layers.Dense(8, activation=None, name="d2")(h)
    h = keras.layers.Activation("relu", name="act2")(h)
    h = keras.layers.Dense(8, activation="tanh", name="d3")(h)
    h = keras.layers.Dense(8, name="d4")(h)  # no activation follows: its own output
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Dropout(0.1)(h))
    model = lk.wrap(keras.Model(inputs, outputs))
    assert regularized_names(model) == ["relu1", "act2", "d3", "d4"]
    x, y = data(rng, 32)
    model.compile(keras.optimizers.SGD(0.05), CE)
    model.fit(x, y, epochs=1, verbose=0)
    assert min(model.layer_entropies().values()) >= 0
    plain = mlp()
    chosen = lk.wrap(plain, layers=[plain.layers[0].name])  # layers= is taken as given
    assert regularized_names(chosen) == [plain.layers[0].name]


def test_wrap_of_a_model_with_nothing_to_regularize_names_its_layers_and_layers_arg():
    """A stack of LSTMs has no Dense or convolution layer but its output head: wrap() says so
    (its LBEModel would train with lbe 0) and points at layers=, which makes it work."""
    def lstms():
        return keras.Sequential([keras.Input((6, 3)),
                                 keras.layers.LSTM(8, return_sequences=True, name="lstm_a"),
                                 keras.layers.LSTM(8, name="lstm_b"),
                                 keras.layers.Dense(2, name="head")], name="recurrent")

    with pytest.raises(ValueError, match=r"'recurrent' has no layer that wrap\(\) regularizes "
                                         r"by default.*its layers: 2 LSTM, 1 Dense\. .*layers="
                                         r".*\['lstm_a', 'lstm_b'\]"):
        lk.wrap(lstms())
    with pytest.raises(ValueError, match="layers= chooses no layer"):
        lk.wrap(lstms(), layers=[])
    model = lstms()
    assert regularized_names(lk.wrap(model, layers=["lstm_b"])) == ["lstm_b"]
    # Layers that already hold an LBERegularizer are enough: nothing new to choose.
    assert regularized_names(lk.wrap(model)) == ["lstm_b"]


def test_wrapping_the_same_layers_twice_shares_and_trains_their_alphas(rng):
    base = mlp()
    first = lk.wrap(base, alpha=1.5)
    second = lk.wrap(base, layers=base.layers[:3] + [base.layers[3]], alpha=2.5)
    # The three hidden layers keep their regularizers (and alphas in first's vector); the head,
    # chosen explicitly, gets a new one in second's own vector.
    assert second.lbe_alphas.shape == (1,) and first.lbe_alphas.shape == (3,)
    assert sum(v is first.lbe_alphas for v in second.trainable_variables) == 1
    x, y = data(rng, 32)
    for model in (first, second):
        model.compile(keras.optimizers.SGD(0.5), CE)
        before = [v.numpy().copy() for v in (first.lbe_alphas, second.lbe_alphas)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "gradients do not exist" for any alpha
            model.fit(x, y, epochs=1, verbose=0)
        moved = [np.any(v.numpy() != b) for v, b in zip((first.lbe_alphas, second.lbe_alphas),
                                                        before)]
        assert moved == ([True, False] if model is first else [True, True])


# ---- misuse ----------------------------------------------------------------------------------

def test_one_regularizer_on_two_layers_is_an_error():
    shared = lk.LBERegularizer()
    inputs = keras.Input((5,))
    h = keras.layers.Dense(4, activation="relu", activity_regularizer=shared)(inputs)
    h = keras.layers.Dense(4, activation="relu", activity_regularizer=shared)(h)
    with pytest.raises(ValueError, match="activity_regularizer of both"):
        lk.LBEModel(inputs, keras.layers.Dense(2)(h))


def test_lbe_regularizer_as_a_kernel_regularizer_is_an_error(rng):
    inputs = keras.Input((5,))
    h = keras.layers.Dense(4, kernel_regularizer=lk.LBERegularizer())(inputs)
    with pytest.raises(ValueError, match="kernel_regularizer"):
        lk.LBEModel(inputs, h)
    plain = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(4, kernel_regularizer=lk.LBERegularizer())])
    plain(np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="activity regularizer"):
        plain.losses


def test_keras_finds_the_regularizer_by_name_and_wrap_names_the_model():
    assert isinstance(keras.regularizers.get("LBERegularizer"), lk.LBERegularizer)
    layer = keras.layers.Dense(3, activity_regularizer="LBERegularizer")
    assert isinstance(layer.activity_regularizer, lk.LBERegularizer)
    base = mlp(name="net")
    assert lk.wrap(base).name == "net_lbe"
    assert lk.wrap(mlp(), name="mine").name == "mine"


# ---- TensorBoard ------------------------------------------------------------------------------

def read_events(directory):
    tags = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                tags.setdefault(value.tag, []).append((event.step, kind, value))
    return tags


def test_layer_entropy_logger_writes_a_scalar_per_layer_and_a_histogram(rng, tmp_path):
    x, y = data(rng, 32)
    model = lk.wrap(mlp(depth=2))
    model.compile(keras.optimizers.SGD(0.05), CE)
    logger = lk.LayerEntropyLogger(log_dir=str(tmp_path))
    model.fit(x, y, epochs=2, verbose=0, validation_data=(x, y), callbacks=[logger])
    for split in ("train", "validation"):
        tags = read_events(str(tmp_path / split))
        layer_tags = sorted(t for t in tags if t.startswith("lbe/entropy/"))
        assert len(layer_tags) == 2, tags.keys()
        assert "lbe/layer_entropies" in tags
        for tag in layer_tags:
            steps = [step for step, _, _ in tags[tag]]
            assert steps == [0, 1]
            value = tags[tag][-1][2]
            number = (value.simple_value if value.WhichOneof("value") == "simple_value"
                      else float(tf.make_ndarray(value.tensor)))
            layer = tag[len("lbe/entropy/"):]
            key = "entropy/" if split == "train" else "val_entropy/"
            assert number == pytest.approx(logger.history[key + layer][-1], rel=1e-6)
