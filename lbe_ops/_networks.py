"""The plain deep ReLU networks that LBE makes trainable, as Keras models (lbe-train's network;
the fit() benchmark's models are the same stacks)."""

import math


def plain_relu_network(arch, depth, width, input_shape, classes, initializers, *,
                       pooling="flatten", name=None, input_name=None):
    """A functional keras.Model: `depth` ReLU layers, then a linear Dense(classes) head.

    arch: "mlp" (Dense(width) layers; inputs of more than one dimension flattened first) or
    "cnn" (Conv2D(width, 3, padding="same") layers, whose feature maps reach the head through
    `pooling`: "flatten" or "average", GlobalAveragePooling2D).
    initializers(index, fan_in): the (kernel, bias) initializers of layer `index` (0-based; the
    head is layer `depth`), given the number of inputs of each of its units.
    Layers are named dense_1, ..., conv_1, ..., flatten or pooling, and logits.
    """
    import keras

    if arch not in ("mlp", "cnn") or pooling not in ("flatten", "average"):
        raise ValueError(f"arch must be 'mlp' or 'cnn' and pooling 'flatten' or 'average', got "
                         f"{arch!r} and {pooling!r}")
    input_shape = tuple(input_shape)
    inputs = keras.Input(shape=input_shape, name=input_name)
    x = inputs
    if arch == "mlp":
        if len(input_shape) > 1:
            x = keras.layers.Flatten(name="flatten")(x)
        fan_in = int(math.prod(input_shape))
        for i in range(depth):
            kernel, bias = initializers(i, fan_in)
            x = keras.layers.Dense(width, activation="relu", kernel_initializer=kernel,
                                   bias_initializer=bias, name=f"dense_{i + 1}")(x)
            fan_in = width
    else:
        fan_in = 9 * input_shape[-1]
        for i in range(depth):
            kernel, bias = initializers(i, fan_in)
            x = keras.layers.Conv2D(width, 3, padding="same", activation="relu",
                                    kernel_initializer=kernel, bias_initializer=bias,
                                    name=f"conv_{i + 1}")(x)
            fan_in = 9 * width
        if pooling == "flatten":
            x = keras.layers.Flatten(name="flatten")(x)
            fan_in = int(math.prod(input_shape[:-1])) * width
        else:
            x = keras.layers.GlobalAveragePooling2D(name="pooling")(x)
            fan_in = width
    kernel, bias = initializers(depth, fan_in)
    logits = keras.layers.Dense(classes, kernel_initializer=kernel, bias_initializer=bias,
                                name="logits")(x)
    return keras.Model(inputs, logits, name=name)
