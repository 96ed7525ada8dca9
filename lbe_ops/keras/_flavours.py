"""How an LBEModel comes to be: functionally, `LBEModel(inputs, outputs)` (a class of its own per
LBEModel class), or as a subclass (the alphas collected once its __init__ has made the layers).
"""

import functools
import inspect

import keras

from lbe_ops.keras import _compat


def is_functional_call(args, kwargs):
    """True for constructor arguments of a functional model: (inputs, outputs, ...)."""
    return (len(args) == 2 or (len(args) == 1 and "outputs" in kwargs)
            or ("inputs" in kwargs and "outputs" in kwargs))


_functional_variants = {}


def functional_variant(cls, options, config_records_defaults):
    """The Functional flavour of an LBEModel class, made once per class.

    Keras's own route (Model.__init__ -> inject_functional_model_class) rewrites __bases__ of
    the class and of all its bases, so after one functional use of LBEModel every subclassed
    LBEModel would inherit Functional's methods. A separate class leaves LBEModel untouched.

    options: {attribute: default} of the constructor options that a functional config records
    (it is revived through cls(inputs, outputs, **options)): every one if
    config_records_defaults, else those that differ from their default.
    """
    variant = _functional_variants.get(cls)
    if variant is not None:
        return variant

    def get_config(self):
        config = super(variant, self).get_config()
        if "layers" in config:  # a functional config
            for option, default in options.items():
                value = getattr(self, option)
                if config_records_defaults or value != default:
                    config[option] = value
        return config

    variant = type(cls.__name__, (cls, _compat.Functional), {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "get_config": get_config,
    })
    # Serialize under the registered name of cls; deserialization goes through cls, whose
    # __new__ comes back here. (The registry entry for that name keeps pointing at cls.)
    registered = keras.saving.get_registered_name(cls)
    if registered != cls.__name__:
        package, _, name = registered.partition(">")
        keras.saving.register_keras_serializable(package=package, name=name)(variant)
        keras.saving.register_keras_serializable(package=package, name=name)(cls)
    _functional_variants[cls] = variant
    return variant


def then_collect_alphas(init):
    """Wraps a subclass's __init__: once the outermost __init__ has created the layers, the model
    takes their alphas into its vector (model._lbe_collect_alphas())."""

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        depth = self.__dict__.get("_lbe_init_depth", 0)
        self.__dict__["_lbe_init_depth"] = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            self.__dict__["_lbe_init_depth"] = depth
        if depth == 0:
            self._lbe_collect_alphas()

    # Keras reads the constructor's arguments (for the automatic get_config) with
    # inspect.getfullargspec, which does not follow __wrapped__ but honours __signature__.
    wrapped.__signature__ = inspect.signature(init)
    return wrapped
