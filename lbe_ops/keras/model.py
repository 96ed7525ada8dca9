"""LBEModel: a keras.Model whose train and test steps use the LBE loss of the paper.

The class joins the parts, each in a module of its own: how it is constructed (_flavours), its
alpha vector (alphas), what the regularizers do in each step (_capture), the step's loss
(_steps), its logs and per-layer statistics (_metrics), tf.distribute (_distribution) and export
(_export).
"""

import functools
import warnings

import keras

from lbe_ops.keras import (_capture, _compat, _distribution, _export, _flavours, _metrics,
                           _steps)
from lbe_ops.keras.alphas import alpha_vector, gather_alphas, regularized_layers
from lbe_ops.keras.regularizer import PACKAGE, check_flag

# The constructor options that a functional config records, with their defaults.
_OPTION_DEFAULTS = {"additive": False, "cross_replica": False}


def _keras_loop(evaluating=False):
    """Decorates the LBEModel methods that run one of Keras' loops (fit, evaluate,
    train_on_batch, test_on_batch): afterwards the model warns, once, if batches were too small
    for an LBE term. `evaluating`: inside the loop the training statistics survive
    reset_metrics (fit's validation runs evaluate()), and a nested evaluate() leaves the warning
    to the outer one."""

    def decorate(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            in_evaluate = self._lbe_in_evaluate
            self._lbe_in_evaluate = in_evaluate or evaluating
            try:
                return method(self, *args, **kwargs)
            finally:
                self._lbe_in_evaluate = in_evaluate
                if not (evaluating and in_evaluate):
                    self._lbe_warn_of_small_batches()

        return run

    return decorate


@keras.saving.register_keras_serializable(package=PACKAGE)
@_compat.builds_from(_distribution.build_batch)
class LBEModel(keras.Model):
    """A keras.Model trained with the LBE loss of Peer et al. (TMLR 2022).

    loss = task_loss + task_loss * lbe        (additive=True: task_loss + lbe)
    lbe  = mean over regularized layer outputs of beta * (H - max(alpha_min, |alpha|))^2

    task_loss is the compiled loss (override `compute_task_loss` for another); losses added
    with add_loss and weight regularizers are added on top, as usual. Every layer whose
    `activity_regularizer` is an LBERegularizer takes part (in nested models too); all entropies
    of a step come from one `lbe_ops.batch_entropies` call. The model holds the alphas of its
    regularizers in one vector, `lbe_alphas` (`regularizer.alpha` is a view of one entry).

    Build it functionally, `LBEModel(inputs, outputs, additive=False, cross_replica=False)`, or
    subclass it like keras.Model. `cross_replica=True` uses, under a tf.distribute strategy, the
    entropy of the global batch instead of each replica's (across all workers under
    MultiWorkerMirroredStrategy; docs/distributed.md).

    A batch of at most ddof samples (a last partial batch of one sample, an empty replica)
    contributes no LBE term; the task loss still trains on it, and fit/evaluate warn once.

    fit/evaluate logs gain `task_loss`, `lbe` and `entropy_mean`; `layer_entropies()` gives
    the per-layer means that LayerEntropyLogger records.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _flavours.then_collect_alphas(cls.__dict__["__init__"])

    def __new__(cls, *args, **kwargs):
        if _flavours.is_functional_call(args, kwargs) and not issubclass(cls, _compat.Functional):
            variant = _flavours.functional_variant(cls, _OPTION_DEFAULTS,
                                                   config_records_defaults=cls is LBEModel)
            return super(LBEModel, variant).__new__(variant, *args, **kwargs)
        # keras.Model.__new__ drops the constructor arguments before Layer.__new__ records
        # them for the automatic get_config(); pass them on, so that a subclassed LBEModel's
        # config keeps its arguments (additive=True included).
        return super(keras.Model, cls).__new__(cls, *args, **kwargs)

    def __init__(self, *args, additive=False, cross_replica=False, **kwargs):
        additive = check_flag("additive", additive)
        cross_replica = check_flag("cross_replica", cross_replica)
        functional = _flavours.is_functional_call(args, kwargs)
        if functional:
            # What keras.Model.__init__ does for functional arguments, minus its rewrite of
            # this class's bases (see _flavours.functional_variant).
            _compat.init_trainer(self)
            _compat.Functional.__init__(self, *args, **kwargs)
        else:
            super().__init__(*args, **kwargs)
        self._lbe_additive = additive
        self._lbe_cross_replica = cross_replica
        self._lbe_in_evaluate = False
        self._lbe_warned = set()
        self._lbe_stats = _metrics.LayerStats()
        self._lbe_stores = []
        self.task_loss_tracker, self.lbe_tracker, self.entropy_tracker = (
            _metrics.make_trackers())
        if functional:
            self._lbe_collect_alphas()

    # -- options and structure ---------------------------------------------------------------

    @property
    def additive(self):
        """True: loss = task + lbe; False (the paper): loss = task + task * lbe."""
        return self._lbe_additive

    @property
    def cross_replica(self):
        """True: entropies of the global batch under a tf.distribute strategy."""
        return self._lbe_cross_replica

    @property
    def lbe_regularizers(self):
        """The model's LBERegularizers in layer order."""
        return [regularizer for _, regularizer in regularized_layers(self)]

    @property
    def lbe_alphas(self):
        """The variable holding the alphas of this model's regularized layers, in layer order
        (None if it has none). Layers shared with an LBEModel made earlier (say, by wrapping the
        same model twice) keep their alphas in that model's vector, which this model trains too.
        """
        own = [store for store in self._lbe_stores if store.owner_id == id(self)]
        return own[0].alphas if own else None

    def _lbe_collect_alphas(self):
        """Moves the alphas of the model's regularizers into one vector held by the model."""
        _compat.assign_sublayers(self, "_lbe_stores", gather_alphas(self))

    # -- the steps ----------------------------------------------------------------------------

    def train_step(self, data):
        with _capture.capturing():
            logs = super().train_step(data)
        return _distribution.reducible_across_workers(logs)

    def test_step(self, data):
        with _capture.capturing():
            logs = super().test_step(data)
        return _distribution.reducible_across_workers(logs)

    def predict_step(self, data):
        with _capture.regularizers_disabled():
            return super().predict_step(data)

    def compute_task_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The task loss that LBE multiplies: the compiled loss (None if there is none)."""
        del x, training
        compile_loss = _compat.compiled_loss(self)
        if compile_loss is None:
            return None
        return compile_loss(y, y_pred, sample_weight)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if _capture.current_mode() is not _capture.Mode.CAPTURE:
            # Not inside an LBE step: the regularizers added their additive terms themselves.
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        capture = _capture.current_capture()
        records = capture.take_records()
        task = self.compute_task_loss(x, y, y_pred, sample_weight, training)
        other_losses = [loss for loss in self.losses if not capture.is_placeholder_loss(loss)]
        if not records:
            self._lbe_warn_once(
                "no regularizers",
                "no layer has an LBERegularizer as activity_regularizer; training with the task "
                "loss alone.", stacklevel=2)
        if task is None and not self._lbe_additive:
            raise ValueError(
                f"LBEModel {self.name!r}: the LBE loss task_loss * (1 + lbe) needs a task "
                "loss; pass `loss=` to compile(), override compute_task_loss(), or build "
                "the model with additive=True.")
        step = _steps.step_loss(
            records, task, other_losses,
            lambda regularizers: alpha_vector(list(self._lbe_stores), regularizers),
            additive=self._lbe_additive, cross_replica=self._lbe_cross_replica)
        _metrics.record_step(self, x, step, records, training)
        return step.total

    def make_train_function(self, force=False):
        self._lbe_prepare_loop()
        return super().make_train_function(force=force)

    def make_test_function(self, force=False):
        self._lbe_prepare_loop()
        return super().make_test_function(force=force)

    def _lbe_prepare_loop(self):
        _distribution.check_steps_per_execution(self)
        self._lbe_stats.rebuild(regularized_layers(self), self.distribute_strategy)

    # -- the loops and their statistics ---------------------------------------------------------

    @_keras_loop()
    def fit(self, *args, **kwargs):
        return super().fit(*args, **kwargs)

    @_keras_loop(evaluating=True)
    def evaluate(self, *args, **kwargs):
        return super().evaluate(*args, **kwargs)

    @_keras_loop()
    def train_on_batch(self, *args, **kwargs):
        return super().train_on_batch(*args, **kwargs)

    @_keras_loop()
    def test_on_batch(self, *args, **kwargs):
        return super().test_on_batch(*args, **kwargs)

    def reset_metrics(self):
        super().reset_metrics()
        stats = getattr(self, "_lbe_stats", None)
        if stats is not None:
            # fit's validation runs evaluate() between the training steps and on_epoch_end:
            # the training statistics of the epoch must survive it.
            stats.reset(keep_train=self._lbe_in_evaluate)

    def layer_entropies(self, validation=False):
        """{layer name: mean batch entropy} over the steps since the last reset.

        Training steps (reset at each epoch of fit) or, with validation=True, test steps
        (reset at each evaluate, including fit's validation). Empty before the first step.
        """
        return self._lbe_stats.means(validation)

    def _lbe_warn_of_small_batches(self):
        if "small batches" in self._lbe_warned:
            return
        skipped = self._lbe_stats.small_batch_count()
        if skipped:
            ddofs = sorted({regularizer.ddof for regularizer in self.lbe_regularizers})
            self._lbe_warn_once(
                "small batches",
                f"{skipped:.0f} batch(es) (or replicas' parts of a batch) had at most "
                f"{max(ddofs)} sample(s), too few for a batch variance with "
                f"ddof={'/'.join(map(str, ddofs))}; the layers concerned contributed no LBE term "
                "for them (the task loss still trained on them). Shown once per model.",
                stacklevel=3)

    def _lbe_warn_once(self, topic, message, stacklevel):
        """Warns of `topic` once per model; stacklevel as warnings.warn's, counted from the
        caller."""
        if topic in self._lbe_warned:
            return
        self._lbe_warned.add(topic)
        warnings.warn(f"LBEModel {self.name!r}: {message}", RuntimeWarning,
                      stacklevel=stacklevel + 1)

    # -- export ---------------------------------------------------------------------------

    def export(self, filepath, *args, **kwargs):
        """keras.Model.export, with the LBE terms left out of the serving graph.

        The served function does not compute batch entropies at all, so the artifact has no
        Lbe ops and does not need lbe_ops to run.
        """
        with _export.without_lbe_terms():
            return super().export(filepath, *args, **kwargs)
