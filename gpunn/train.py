"""The training loop. An epoch is one pass over the training set in steps of ``batch_size`` samples: by default
one full-batch step (one forward pass, one backward pass and one update over all of X). Mini-batches, the update
rules of :mod:`gpunn.optim`, L2, dropout and schedules are options of the same step; resume, checkpoints, early
stopping and stopping on a signal are small pieces that :func:`fit` wraps around the loop.

The data go to the device once, before the first epoch. The loop never waits for the device: each epoch writes its
metrics (loss, accuracies, a finiteness flag for the weights) into one row of a device buffer, and the host reads
the buffer back in one transfer about every 0.25 s of wall time (:data:`DRAIN_SECONDS`), at checkpoints and at the
end. Progress, metrics files and the epoch a divergence happened in are exactly what a read after every epoch would
give; only their arrival is batched. Early stopping reads back after every epoch, because it decides on each.
"""

from __future__ import annotations

import hashlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from gpunn.backend import Backend, GradientPass, Step, UpdateRule
from gpunn.data import CLASSES, Split
from gpunn.errors import ConfigError, GpunnError, ModelError, SignalInterrupt, TrainingDivergedError
from gpunn.files import HELD_SIGNALS
from gpunn.model import PREPROCESSINGS, Model, Preprocessing
from gpunn.nn import (
    ACTIVATIONS,
    DTYPES,
    INITS,
    PRECISIONS,
    Architecture,
    Layer,
    accuracy,
    cost,
    default_init,
    forward,
    init_params,
    loss_and_gradients,
    one_hot,
)
from gpunn.optim import OPTIMIZERS, SCHEDULES, Optimizer, learning_rate

#: input preparations a run may choose: pixels / 255, or then standardized per pixel with the training split's stats
NORMALIZATIONS = PREPROCESSINGS
#: the most epochs a run may have: epoch numbers are 64-bit integers in checkpoints, metrics files and their readers
MAX_EPOCHS = 2**63 - 1
#: the host reads the epochs' metrics back from the device at most this often (and at checkpoints and the end)
DRAIN_SECONDS = 0.25
#: signals that stop training after the current epoch, with a checkpoint (a second one stops at once): those a save
#: holds back too
STOP_SIGNALS = HELD_SIGNALS


#: TrainConfig's settings added after checkpoints were first written, with the value every run saved before them had:
#: a file that lacks one of these is from that earlier version, not damaged (gpunn.model.Model.resume_state)
SETTINGS_ADDED_LATER: dict[str, Any] = {"precision": "float32"}


@dataclass(frozen=True)
class TrainConfig:
    """What ``gpunn train`` lets a user choose; the defaults are the seed notes' network and settings."""

    hidden: tuple[int, ...] = (10,)
    activation: str = "relu"
    init: str | None = None  # None: he for relu, xavier otherwise
    dtype: str = "float32"
    precision: str = "float32"  # a float32 run's matrix products: "float32", or on CUDA tensor cores "tf32", "bf16"
    epochs: int = 500
    lr: float = 0.1
    seed: int = 0
    val_size: int = 1000
    batch_size: int | None = None  # None: full batch
    optimizer: str = "gd"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    l2: float = 0.0
    lr_schedule: str = "constant"
    lr_step_size: int = 100
    lr_gamma: float = 0.1
    early_stop: int | None = None  # stop after this many epochs without a lower validation loss
    dropout: float = 0.0  # probability of dropping a hidden unit, in training only
    normalize: str = "scale"  # "scale": pixels / 255; "standardize": then per pixel (x - mean) / std of the train split

    @classmethod
    def resumed(cls, saved: dict[str, Any], given: dict[str, Any]) -> TrainConfig:
        """The settings of a resumed run: those ``given`` again (``epochs``: the new total), the rest from the
        checkpoint's ``saved`` settings."""
        return cls.from_dict({**{key: value for key, value in saved.items() if key in cls.__dataclass_fields__},
                              **given})

    def __post_init__(self) -> None:
        # Every field is checked for type and range, because settings also arrive from files (a resumed checkpoint)
        # and from Python, not only through the CLI's option types: a NaN rate would otherwise train silently.
        _check(isinstance(self.hidden, tuple) and len(self.hidden) > 0
               and all(_is_int(n) and n >= 1 for n in self.hidden),
               "hidden", "hidden layer sizes of at least 1 unit", self.hidden)
        _check(self.activation in ACTIVATIONS, "activation", f"one of {ACTIVATIONS}", self.activation)
        _check(self.init is None or self.init in INITS, "init", f"one of {INITS}", self.init)
        _check(self.dtype in DTYPES, "dtype", f"one of {DTYPES}", self.dtype)
        _check(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}", self.precision)
        if self.precision != "float32" and self.dtype != "float32":
            raise ConfigError(f"precision {self.precision} rounds float32 matrices for the tensor cores; it needs "
                              f"dtype float32, not {self.dtype}: use --dtype float32, or --precision float32")
        for name, minimum in [("epochs", 1), ("seed", 0), ("val_size", 0), ("lr_step_size", 1)]:
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= minimum, name,
                   f"an integer >= {minimum}", getattr(self, name))
        _check(self.epochs <= MAX_EPOCHS, "epochs", f"at most {MAX_EPOCHS:,} (a 64-bit count)", self.epochs)
        for name in ("batch_size", "early_stop"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and value >= 1), name, "an integer >= 1 (or none)", value)
        for name, (text, within) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            _check(_is_number(value) and math.isfinite(value) and within(value), name, f"a finite number {text}", value)
        _check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}", self.optimizer)
        _check(self.lr_schedule in SCHEDULES, "lr_schedule", f"one of {SCHEDULES}", self.lr_schedule)
        _check(self.normalize in NORMALIZATIONS, "normalize", f"one of {NORMALIZATIONS}", self.normalize)

    def lr_at(self, epoch: int) -> float:
        return learning_rate(self.lr_schedule, self.lr, epoch, self.epochs, step_size=self.lr_step_size,
                             gamma=self.lr_gamma)

    def architecture(self, n_inputs: int) -> Architecture:
        """The network these settings train on inputs of ``n_inputs`` features: n_inputs-hidden...-10."""
        return Architecture((n_inputs, *self.hidden, CLASSES), self.activation)

    def batch_columns(self, m: int) -> int:
        """The samples in one step on ``m`` training samples: the batch size, or all m for full-batch training."""
        return self.batch_size if self.batch_size is not None and self.batch_size < m else m

    @property
    def rule(self) -> Optimizer:
        return Optimizer(self.optimizer, self.beta1, self.beta2, self.eps)

    @property
    def weight_init(self) -> str:
        return self.init or default_init(self.activation)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hidden": list(self.hidden), "init": self.weight_init}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The settings in ``values`` (as :meth:`as_dict` writes them); ConfigError for unknown or mistyped ones."""
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown training settings {unknown}; expected some of {sorted(cls.__dataclass_fields__)}")
        hidden = values.get("hidden", cls.hidden)
        return cls(**{**values, "hidden": tuple(hidden) if isinstance(hidden, (list, tuple)) else hidden})


_FLOAT_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "lr": ("> 0", lambda v: v > 0),
    "eps": ("> 0", lambda v: v > 0),
    "l2": (">= 0", lambda v: v >= 0),
    "beta1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "lr_gamma": ("in (0, 1]", lambda v: 0 < v <= 1),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, name: str, expected: str, found: Any) -> None:
    if not ok:
        option = "--" + name.replace("_", "-")
        raise ConfigError(f"{option}: expected {expected}, got {found!r}")


@dataclass(frozen=True)
class EpochStats:
    """One epoch's report. Loss and training accuracy come from the epoch's forward pass (before its update);
    the validation figures from the weights after it. ``seconds`` is the whole epoch, metrics read-back included."""

    epoch: int
    loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float
    samples_per_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """A finished run: the model kept, every epoch's report, and the test accuracy where the data had a test set."""

    model: Model
    history: list[EpochStats]
    test_accuracy: float | None
    n_test: int
    train_samples: int = 0
    val_samples: int = 0

    @property
    def kept(self) -> EpochStats:
        """The report of the epoch whose weights the model holds: the last, or the best when training stopped early."""
        done = self.model.info.get("epochs_done", 0)
        return next((s for s in self.history if s.epoch == done), self.history[-1])

    @property
    def median_epoch_seconds(self) -> float:
        """The median epoch time, leaving out the first epoch (it includes start-up work) when there are others."""
        steady = sorted(s.seconds for s in self.history[1:] or self.history)
        return steady[len(steady) // 2]

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.history)

    def summary(self) -> dict[str, Any]:
        """The run in one JSON-ready record: settings, data sizes, the kept epoch's figures and the timings."""
        kept = self.kept
        return {
            "type": "summary",
            "device": self.model.info.get("device"),
            "layer_sizes": list(self.model.arch.sizes),
            **self.model.info.get("config", {}),
            "early_stopping": self.model.info.get("early_stop"),
            "train_samples": self.train_samples,
            "val_samples": self.val_samples,
            "loss": kept.loss,
            "train_accuracy": kept.train_accuracy,
            "val_accuracy": kept.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "test_samples": self.n_test,
            "median_epoch_s": self.median_epoch_seconds,
            "total_s": self.total_seconds,
        }


@dataclass
class TrainState:
    """Where a run stands after a completed epoch: enough to save a checkpoint and to resume bit for bit.

    The optimizer's step count is not kept: it is the epoch times the (fixed) number of batches per epoch."""

    params: list[Layer]
    optimizer_state: dict[str, list[Layer]]
    epoch: int


class TrainingInterrupted(Exception):
    """Ctrl-C (or SIGTERM, SIGHUP) during training; ``model`` is the network after the last completed epoch, ready to
    save and resume. ``signal``: the signal's number (SIGINT for a KeyboardInterrupt)."""

    def __init__(self, model: Model, epoch: int, signum: int = signal.SIGINT) -> None:
        super().__init__(f"interrupted after epoch {epoch}")
        self.model = model
        self.epoch = epoch
        self.signal = signum


class TrainingFailed(GpunnError):
    """What runs the epochs broke down mid-run (a cluster lost a worker): one line and exit 1, as any gpunn error.
    :func:`fit` attaches ``model``, the network after the last epoch read back (ready to save and resume, as
    :class:`TrainingInterrupted` carries it), and ``epoch``, its number; both stay None where the failure came before
    the loop."""

    model: Model | None = None
    epoch: int | None = None


def fingerprint(split: Split) -> str:
    """SHA-256 of the training and validation data in their shuffled order: a resumed run must see the same."""
    digest = hashlib.sha256()
    for array in (split.X_train, split.y_train, split.X_val, split.y_val):
        # the bytes in row-major order, a row at a time: the same digest whatever the layout, with no copy of X
        for row in np.atleast_2d(array):
            digest.update(np.ascontiguousarray(row).data)
    return digest.hexdigest()


def make_model(arch: Architecture, state: TrainState, config: TrainConfig, split: Split, data_sha256: str,
               backend: Backend, preprocessing: Preprocessing) -> Model:
    """The network as it stands, with what a resumed run needs to continue it exactly (config, epoch, data)."""
    return Model(
        arch,
        state.params,
        config.dtype,
        preprocessing,
        optimizer_state=state.optimizer_state,
        info={
            "config": config.as_dict(),
            "epochs_done": state.epoch,
            "data_sha256": data_sha256,
            "train_samples": len(split.y_train),
            "device": backend.name,
        },
    )


@dataclass(frozen=True)
class DeviceData:
    """A labelled set on the device: X (n_0, m) in the training dtype (or its raw uint8 pixels, see
    :meth:`from_host`), y (m,) int64, Y (classes, m) one-hot."""

    X: Any
    y: Any
    Y: Any

    @classmethod
    def from_host(cls, X_uint8: Any, y: Any, *, backend: Backend, dtype: str,
                  preprocessing: Preprocessing | None = None) -> DeviceData:
        """The one host-to-device transfer of a data set: uint8 pixels and int64 labels, prepared on the device.
        ``preprocessing`` None: X stays uint8 pixels (for a step that takes them raw, or evaluates on them: see
        :class:`Step`)."""
        float_dtype = getattr(backend.xp, dtype)
        X = backend.asarray(X_uint8)
        if preprocessing is not None:
            X = preprocessing(X, float_dtype)
        y_dev = backend.asarray(y)
        return cls(X, y_dev, one_hot(y_dev, CLASSES, float_dtype))

    @property
    def m(self) -> int:
        return int(self.y.shape[0])

    def take(self, columns: Any) -> DeviceData:
        """The samples at the device index array ``columns``, gathered on the device."""
        xp = array_namespace(self.X)
        return DeviceData(_take_columns(xp, self.X, columns), xp.take(self.y, columns, axis=0),
                          _take_columns(xp, self.Y, columns))


def _take_columns(xp: Any, a: Any, columns: Any) -> Any:
    """a[:, columns], gathered along the axis whose elements are contiguous. Where each column is contiguous (X as
    the transposed view of the files' rows, and floats made from it), the columns are the rows of a.T, and NumPy's
    take along axis 1 would first copy all of ``a`` (measured: 300 ms for MNIST's float X, for 128 columns or 4,096,
    against 0.01 and 1.2 ms taking rows of a.T)."""
    flags = getattr(a, "flags", None)  # NumPy and CuPy arrays say how they are laid out; others take the plain way
    if flags is not None and flags.f_contiguous and not flags.c_contiguous:
        return xp.take(a.T, columns, axis=0).T
    return xp.take(a, columns, axis=1)


def batch_gradients(gradients: GradientPass, params: list[Layer], data: DeviceData, columns: Any = None,
                    **options: Any) -> tuple[Any, Any, list[Layer]]:
    """``gradients`` (a gradient pass) over the samples ``columns`` of ``data`` (a device index array; None: all of
    them). A pass that reads a batch in place (its ``reads_in_place`` is true: it takes ``index=``) is handed all
    of ``data`` and the index; any other gets the samples gathered into arrays of their own."""
    if columns is not None and getattr(gradients, "reads_in_place", False):
        return gradients(params, data.X, data.Y, data.y, index=columns, **options)
    part = data if columns is None else data.take(columns)
    return gradients(params, part.X, part.Y, part.y, **options)


def train_step(
    params: list[Layer],
    optimizer_state: dict[str, list[Layer]],
    data: DeviceData,
    arch: Architecture,
    *,
    lr: float,
    t: int,
    rule: Optimizer,
    l2: float = 0.0,
    dropout: float = 0.0,
    rng: Any = None,
    gradients: GradientPass | None = None,
    update: UpdateRule | None = None,
    columns: Any = None,
) -> tuple[list[Layer], dict[str, list[Layer]], Any, Any]:
    """One gradient step on ``data`` (all of it, or the mini-batch of its samples ``columns``, a device index
    array): forward, cost, backward, update rule.

    Returns the new parameters and optimizer state, and the cost (L2 term included) and the accuracy, both 0-d device
    arrays measured before the update. ``t`` is the 1-based step count (Adam's bias correction uses it). With
    ``dropout``, the masks come from ``rng`` (see :meth:`gpunn.backend.Backend.random`), and the loss and accuracy
    are those of the thinned network being trained. ``gradients`` and ``update``: the run's gradient pass and update
    rule (see :meth:`gpunn.backend.Backend.step`); the generic :func:`gpunn.nn.loss_and_gradients` and
    ``rule.step`` when None.
    """
    gradients = gradients or partial(loss_and_gradients, arch=arch)
    loss, batch_accuracy, grads = batch_gradients(gradients, params, data, columns, l2=l2, dropout=dropout, rng=rng)
    params, optimizer_state = (update or rule.step)(params, grads, optimizer_state, lr, t)
    return params, optimizer_state, loss, batch_accuracy


class Epochs:
    """The epochs of one run on the device, one call of :meth:`run` each; the generic loop over a run's steps.

    Each epoch's figures go into row ``(epoch - 1) % capacity`` of :attr:`metrics`, a (capacity, 5) device array of
    loss, training accuracy, validation loss, validation accuracy and a finiteness flag for the weights, written
    without waiting for the device. ``train.X`` holds prepared floats, or raw pixels when the step takes them
    (:attr:`gpunn.backend.Step.pixels`). The validation pass is the generic forward pass on ``val.X`` in prepared
    floats, or, where ``evaluate`` is given, ``evaluate(params, val.X, val.y)``: the gradient pass's own, on the raw
    pixels ``val.X`` then holds (:attr:`gpunn.backend.Step.evaluates_pixels`).
    """

    #: rows of the metrics buffer: epochs that may wait on the device before the host reads them back
    CAPACITY = 1024

    def __init__(self, arch: Architecture, config: TrainConfig, train: DeviceData, val: DeviceData | None,
                 backend: Backend, gradients: GradientPass, update: UpdateRule, *, capacity: int = CAPACITY,
                 on_step: Callable[[int, int], None] | None = None,
                 evaluate: Callable[[list[Layer], Any, Any], tuple[Any, Any]] | None = None) -> None:
        self.arch, self.config, self.train, self.val, self.backend = arch, config, train, val, backend
        self.gradients, self.update, self.evaluate = gradients, update, evaluate
        self.on_step = on_step
        self.capacity = capacity
        xp = backend.xp
        dtype = getattr(xp, config.dtype)
        self.metrics = xp.full((capacity, 5), math.nan, dtype=dtype, device=backend.device)
        self._nan = xp.asarray(math.nan, dtype=dtype, device=backend.device)
        self.params: list[Layer] = []
        self.optimizer_state: dict[str, list[Layer]] = {}

    def load(self, params: list[Layer], optimizer_state: dict[str, list[Layer]], *, epochs_done: int) -> None:
        """Start from these parameters and optimizer state, after ``epochs_done`` epochs."""
        self.params, self.optimizer_state = params, optimizer_state

    def state(self) -> tuple[list[Layer], dict[str, list[Layer]]]:
        """The parameters and optimizer state after the last epoch run (arrays nobody modifies in place)."""
        return self.params, self.optimizer_state

    def run(self, epoch: int) -> None:
        """Epoch ``epoch`` (1-based): its steps, the validation pass, and the write of its metrics row."""
        config, train, xp = self.config, self.train, self.backend.xp
        lr = config.lr_at(epoch)
        batch = config.batch_columns(train.m)
        t = (epoch - 1) * -(-train.m // batch)
        # dropout masks from the device's own generator, seeded from (seed, epoch) so that a resumed run draws the same
        rng = self.backend.random(int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0])) \
            if config.dropout else None
        params, optimizer_state = self.params, self.optimizer_state
        if batch == train.m:
            batches: Iterator[Any] = iter([None])  # full batch: no shuffling, the step sees every sample
        else:
            # Reshuffled every epoch from (seed, epoch), so a resumed run draws the same batches. Only this
            # permutation crosses to the device; the batches are read or gathered there.
            order = self.backend.asarray(np.random.default_rng([config.seed, epoch]).permutation(train.m))
            batches = (order[first : first + batch] for first in range(0, train.m, batch))
        loss = train_accuracy = 0.0
        steps = -(-train.m // batch)
        for done, columns in enumerate(batches, start=1):
            t += 1
            params, optimizer_state, batch_loss, batch_accuracy = train_step(
                params, optimizer_state, train, self.arch, lr=lr, t=t, rule=config.rule, l2=config.l2,
                dropout=config.dropout, rng=rng, gradients=self.gradients, update=self.update, columns=columns)
            # the epoch's figures: the mean over samples of the figures each batch had before its own update
            share = 1.0 if columns is None else int(columns.shape[0]) / train.m
            loss = loss + batch_loss * share
            train_accuracy = train_accuracy + batch_accuracy * share
            if self.on_step is not None:
                self.on_step(done, steps)  # the host's view: the step is queued, not necessarily done
        val_loss = val_accuracy = self._nan
        if self.val is not None:
            if self.evaluate is not None:
                val_loss, val_accuracy = self.evaluate(params, self.val.X, self.val.y)
            else:
                trace = forward(params, self.val.X, self.arch)
                val_loss = cost(trace.Z[-1], self.val.Y, self.arch.output)
                val_accuracy = accuracy(trace.A[-1], self.val.y)
        finite = xp.all(xp.stack([xp.all(xp.isfinite(W)) & xp.all(xp.isfinite(b)) for W, b in params]))
        row = [loss, train_accuracy, val_loss, val_accuracy, finite]
        self.metrics[(epoch - 1) % self.capacity, :] = xp.stack([xp.astype(value, self._nan.dtype) for value in row])
        self.params, self.optimizer_state = params, optimizer_state


def check_config(config: TrainConfig, split: Split) -> None:
    """Refuse settings that cannot work with this data, before any of it goes to the device."""
    if config.early_stop is not None and not len(split.y_val):
        raise ConfigError("--early-stop watches the validation loss, so it needs --val-size > 0")


def fit(
    split: Split,
    config: TrainConfig,
    *,
    backend: Backend,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_checkpoint: Callable[[Model], None] | None = None,
    checkpoint_every: int = 0,
    resume: Model | None = None,
    on_signal: Callable[[int], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> FitResult:
    """Train on ``split`` on ``backend`` as ``config`` says, up to ``config.epochs`` epochs in all.

    ``resume``: a model or checkpoint saved by an earlier run of the same configuration on the same data; training
    continues after its last epoch and ends exactly where an uninterrupted run would. ``on_epoch`` receives each
    epoch's report, ``on_checkpoint`` the model every ``checkpoint_every`` epochs. Ctrl-C, SIGTERM or SIGHUP (in the
    main thread) stop training after the current epoch, ``on_signal`` hearing of it at once, and raise
    TrainingInterrupted carrying that epoch's model; a second such signal stops at once, with the model of the last
    epoch whose figures were read back. ``on_step(done, steps)`` hears of each step of an epoch as it is queued (for
    progress inside long epochs).
    """
    check_config(config, split)
    arch = config.architecture(split.X_train.shape[0])
    data_sha256 = fingerprint(split)
    epochs_done = 0 if resume is None else check_resumable(resume, config, data_sha256)
    rule = config.rule
    step = run_step(config, backend, arch, len(split.y_train))
    preprocessing, train, val = _to_device(split, config, backend, raw_pixels=step.pixels,
                                           val_pixels=step.evaluates_pixels)
    if resume is None:
        params = [Layer(backend.asarray(W), backend.asarray(b))
                  for W, b in init_params(arch, init=config.weight_init, seed=config.seed, dtype=config.dtype)]
        optimizer_state = rule.init(params)
    else:
        # check_resumable (Model.resume_state) has matched its optimizer state to this rule's
        params, optimizer_state = resume.params, resume.optimizer_state

    def snapshot(state: TrainState) -> Model:
        return make_model(arch, state, config, split, data_sha256, backend, preprocessing)

    history: list[EpochStats] = []
    stopper = _EarlyStopping(config.early_stop)
    # Overflow is caught by the finiteness check and reported with the epoch and a fix; NumPy's own floating-point
    # warnings would only repeat it, several times per epoch and with neither.
    with _stop_signals(on_signal) as stop, np.errstate(over="ignore", invalid="ignore"), \
            _open_epochs(step, arch, config, train, val, backend, on_step) as epochs:
        epochs.load(params, optimizer_state, epochs_done=epochs_done)
        computed_by = getattr(epochs, "name", step.name)  # a whole-epoch runner names itself (a graph, or not)
        state = TrainState(params, optimizer_state, epochs_done)
        try:
            for state, reports in _run(epochs, config, backend, train.m, val is not None, epochs_done,
                                       checkpoint_every, stopper.active, stop):
                for stats in reports:
                    history.append(stats)
                    if on_epoch is not None:
                        on_epoch(stats)
                    stopper.observe(stats, state)
                if on_checkpoint is not None and checkpoint_every and state.epoch % checkpoint_every == 0:
                    on_checkpoint(snapshot(state))
                if stop.signum is not None:
                    raise TrainingInterrupted(snapshot(state), state.epoch, stop.signum)
                if stopper.stopped:
                    break
        except KeyboardInterrupt as interrupt:
            # a second signal, or Ctrl-C outside the handler's reach (another thread's, a callback's): the state of the
            # last epoch read back is whole (a fast path that updates in place hands out copies), so it is saved
            raise TrainingInterrupted(snapshot(state), state.epoch,
                                      getattr(interrupt, "signal", signal.SIGINT)) from None
        except TrainingFailed as failure:
            # the runner lost part of itself (a cluster's worker): the last epoch read back is whole, so it leaves with
            # the error, for the caller to save as a checkpoint
            failure.model, failure.epoch = snapshot(state), state.epoch
            raise
    if stopper.stopped:
        state = stopper.best
    model = snapshot(state)
    model.info["step"] = computed_by
    if config.early_stop is not None:
        model.info["early_stop"] = stopper.record(history, state)
    del train, val, epochs  # the training set in floats is the run's largest array: free it before the test set's
    test_accuracy, n_test = None, 0
    if split.X_test is not None and split.y_test is not None and len(split.y_test):
        test_accuracy, n_test = evaluate(model, split.X_test, split.y_test, backend=backend), len(split.y_test)
    return FitResult(model, history, test_accuracy, n_test, len(split.y_train), len(split.y_val))


def run_step(config: TrainConfig, backend: Backend, arch: Architecture, m: int) -> Step:
    """How ``backend`` computes the steps of this run on ``m`` training samples: the one decision the header
    (:func:`describe_run`) names and :func:`fit` acts on."""
    columns = config.batch_columns(m)
    return backend.step(arch, dtype=config.dtype, columns=columns, dropout=config.dropout,
                        pixels=config.normalize == "scale", batches=columns < m, precision=config.precision)


def _to_device(split: Split, config: TrainConfig, backend: Backend, *, raw_pixels: bool, val_pixels: bool = False
               ) -> tuple[Preprocessing, DeviceData, DeviceData | None]:
    """The preprocessing fitted on the training split, and the training and validation sets on the device (each as
    raw uint8 pixels where the step reads them so: ``raw_pixels``, ``val_pixels``)."""
    X_train = backend.asarray(split.X_train)
    # statistics from the training split only, then applied unchanged to validation, test and prediction inputs
    preprocessing = Preprocessing.fit(config.normalize, X_train,
                                      getattr(backend.xp, config.dtype))
    train = DeviceData.from_host(X_train, split.y_train, backend=backend, dtype=config.dtype,
                                 preprocessing=None if raw_pixels else preprocessing)
    val = DeviceData.from_host(split.X_val, split.y_val, backend=backend, dtype=config.dtype,
                               preprocessing=None if val_pixels else preprocessing) if len(split.y_val) else None
    return preprocessing, train, val


@contextmanager
def _open_epochs(step: Step, arch: Architecture, config: TrainConfig, train: DeviceData, val: DeviceData | None,
                 backend: Backend, on_step: Callable[[int, int], None] | None) -> Iterator[Epochs]:
    """What runs the epochs: the step's own runner where it has one for this run (a CUDA graph of a full-batch
    epoch), else :class:`Epochs` around the step's gradient pass and update rule."""
    runner = None if step.epochs is None else step.epochs(config, train, val, Epochs.CAPACITY)
    if runner is not None:
        with runner:
            yield runner
        return
    with step.gradients() as gradients, step.update(config.rule) as update:
        yield Epochs(arch, config, train, val, backend, gradients, update, on_step=on_step,
                     evaluate=gradients.evaluate if step.evaluates_pixels else None)


def _run(epochs: Epochs, config: TrainConfig, backend: Backend, m: int, has_val: bool, epochs_done: int,
         checkpoint_every: int, every_epoch: bool, stop: _StopRequest) -> Iterator[tuple[TrainState, list[EpochStats]]]:
    """Run epochs ``epochs_done + 1`` to ``config.epochs`` without waiting for the device, reading the metrics back
    about every :data:`DRAIN_SECONDS`, after every epoch when ``every_epoch``, at checkpoints, on a stop request and at
    the end. Yields the state after the last epoch run and the reports read back since the previous yield."""
    pending: list[tuple[int, Any, Any]] = []  # (epoch, device marks before and after it) not yet read back
    last_read = time.monotonic()
    backend.synchronize()
    for epoch in range(epochs_done + 1, config.epochs + 1):
        start = backend.mark()
        epochs.run(epoch)
        pending.append((epoch, start, backend.mark()))
        due = (every_epoch or epoch == config.epochs or stop.signum is not None or len(pending) == epochs.capacity
               or (checkpoint_every and epoch % checkpoint_every == 0)
               or time.monotonic() - last_read >= DRAIN_SECONDS)
        if due:
            reports = _read_back(epochs, backend, pending, m, has_val, config.lr)
            pending, last_read = [], time.monotonic()
            params, optimizer_state = epochs.state()
            yield TrainState(params, optimizer_state, epoch), reports


def _read_back(epochs: Epochs, backend: Backend, pending: list[tuple[int, Any, Any]], m: int, has_val: bool,
               lr: float) -> list[EpochStats]:
    """The pending epochs' reports, in one device-to-host transfer (which waits for the device). Raises
    TrainingDivergedError for the first epoch whose loss or weights are not finite, after reporting the ones before."""
    rows = backend.to_numpy(epochs.metrics)
    reports = []
    for epoch, start, end in pending:
        # each figure as the shortest decimal its dtype holds (a NumPy scalar's str): 0.1084746 for a float32, not
        # 0.10847457498311996
        loss, train_accuracy, val_loss, val_accuracy, finite = (float(str(value))
                                                                for value in rows[(epoch - 1) % epochs.capacity])
        if not math.isfinite(loss):
            raise TrainingDivergedError(epoch, "the loss", lr)
        if finite != 1.0:
            raise TrainingDivergedError(epoch, "a weight", lr)
        seconds = backend.seconds(start, end)
        reports.append(EpochStats(epoch, float(loss), float(train_accuracy), float(val_loss) if has_val else None,
                                  float(val_accuracy) if has_val else None, seconds, m / seconds))
    return reports


@dataclass
class _EarlyStopping:
    """Stop when the validation loss has not improved for ``patience`` epochs, keeping the best epoch's state."""

    patience: int | None
    best: TrainState | None = None
    best_loss: float = math.inf
    stopped: bool = False
    last_epoch: int = 0

    @property
    def active(self) -> bool:
        return self.patience is not None

    def observe(self, stats: EpochStats, state: TrainState) -> None:
        """Called with each epoch's report while ``state`` is that epoch's (it reads back after every epoch)."""
        if self.patience is None or self.stopped:
            return
        self.last_epoch = stats.epoch
        if stats.val_loss is not None and stats.val_loss < self.best_loss:
            self.best, self.best_loss = state, stats.val_loss
        elif self.best is not None and stats.epoch - self.best.epoch >= self.patience:
            self.stopped = True

    def record(self, history: list[EpochStats], state: TrainState) -> dict[str, Any]:
        return {"stopped": self.stopped, "best_epoch": None if self.best is None else self.best.epoch,
                "epochs_run": history[-1].epoch if history else state.epoch}


@dataclass
class _StopRequest:
    signum: int | None = None


@contextmanager
def _stop_signals(on_signal: Callable[[int], None] | None) -> Iterator[_StopRequest]:
    """While training, SIGINT, SIGTERM and SIGHUP ask the loop to stop after the current epoch; a second one
    raises SignalInterrupt (a KeyboardInterrupt) at once. Only the main thread can install handlers; elsewhere
    Ctrl-C stays Python's."""
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: Any) -> None:
        if request.signum is not None:
            raise SignalInterrupt(signum)
        request.signum = signum
        if on_signal is not None:
            on_signal(signum)

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_resumable(model: Model, config: TrainConfig, data_sha256: str) -> int:
    """The number of epochs ``model`` has done, after checking that ``config`` and the data continue its run."""
    info = model.info
    settings, done = model.resume_state()  # ModelError for a file that holds no usable run
    saved = {key: value for key, value in settings.items() if key != "epochs"}
    wanted = {key: value for key, value in config.as_dict().items() if key != "epochs"}
    if saved != wanted:
        differ = ", ".join(f"{key} {saved.get(key)!r} there, {wanted.get(key)!r} here" for key in saved
                           if saved.get(key) != wanted.get(key))
        raise ModelError(f"cannot resume: the settings differ from the checkpoint's ({differ})")
    if config.lr_schedule == "cosine" and settings["epochs"] != config.epochs:
        planned = settings["epochs"]
        raise ModelError(f"cannot resume with --epochs {config.epochs}: the cosine schedule decays over the run's total "
                         f"of {planned} epochs, and another total would change every rate from here on; resume with "
                         f"--epochs {planned}, or train a new run")
    if info.get("data_sha256") != data_sha256:
        raise ModelError("cannot resume: the training data (or its shuffled split) differ from the checkpoint's")
    if done >= config.epochs:
        raise ModelError(f"nothing to resume: the checkpoint has done {done} epochs and --epochs is {config.epochs}; "
                         "--epochs counts all epochs, so raise it")
    return done


def dtype_label(dtype: str, precision: str = "float32") -> str:
    """``float32``, or ``float32 (tf32 GEMMs)`` where the matrix products run in a reduced precision."""
    return dtype if precision == "float32" else f"{dtype} ({precision} GEMMs)"


def describe_run(config: TrainConfig, backend: Backend, split: Split, source: str) -> list[str]:
    """The header a run prints before its first epoch: device, data, network and settings, and the step's
    computation (the same decision :func:`fit` acts on)."""
    c = config
    arch = c.architecture(split.X_train.shape[0])
    lines = [f"device:  {backend.summary()}"] + ([f"         {backend.reason}"] if backend.reason else [])
    lines.append(f"data:    {source}: {split.sizes()}")
    lines.append(f"network: {'-'.join(map(str, arch.sizes))} {c.activation}/{arch.output}, {c.weight_init} init, "
                 f"{dtype_label(c.dtype, c.precision)}, lr {c.lr:g}, {c.epochs} epochs, seed {c.seed}"
                 + (", standardized inputs" if c.normalize == "standardize" else ""))
    if c.lr_schedule != "constant" or c.early_stop is not None:
        lines.append(f"         lr schedule {c.lr_schedule}"
                     + (f" (every {c.lr_step_size} epochs x{c.lr_gamma:g})" if c.lr_schedule == "step" else "")
                     + ("" if c.early_stop is None else
                        f", early stop after {c.early_stop} epochs without a better val loss"))
    if (c.batch_size, c.optimizer, c.l2, c.dropout) != (None, "gd", 0.0, 0.0):
        lines.append(f"         {'full batch' if c.batch_size is None else f'mini-batches of {c.batch_size}'}, "
                     f"{c.optimizer}" + ("" if c.optimizer == "gd" else
                                         f" (beta1 {c.beta1:g}, beta2 {c.beta2:g}, eps {c.eps:g})")
                     + (f", L2 {c.l2:g}" if c.l2 else "") + (f", dropout {c.dropout:g}" if c.dropout else ""))
    step = run_step(c, backend, arch, len(split.y_train))
    lines.append(f"step:    {step.name}")
    if step.notice:
        lines.append(f"         {step.notice}")
    return lines


#: digits per forward pass in evaluation and prediction: the floats of a whole test set need not exist at once
EVALUATION_COLUMNS = 8192


def evaluate(model: Model, X_uint8: Any, y: Any, *, backend: Backend) -> float:
    """The fraction of the digits X (n_0, m) uint8 on the host that ``model`` labels correctly."""
    predicted = predict_proba(model, X_uint8, backend=backend).argmax(axis=1)
    return float(np.mean(predicted == np.asarray(y)))


def predict_proba(model: Model, X_uint8: Any, *, backend: Backend) -> np.ndarray:
    """Class probabilities (m, classes) on the host for the digits X (n_0, m) uint8 on the host, computed
    :data:`EVALUATION_COLUMNS` digits at a time."""
    X_uint8 = _fits(model, X_uint8)
    parts = [backend.to_numpy(model.probabilities(backend.asarray(X_uint8[:, first:first + EVALUATION_COLUMNS])))
             for first in range(0, X_uint8.shape[1], EVALUATION_COLUMNS)]
    classes = model.arch.sizes[-1]
    return np.concatenate(parts, axis=1).T if parts else np.empty((0, classes), np.dtype(model.dtype))


def _fits(model: Model, X_uint8: Any) -> Any:
    if X_uint8.shape[0] != model.arch.sizes[0]:
        raise ModelError(
            f"the model takes {model.arch.sizes[0]} inputs per digit but the data has {X_uint8.shape[0]} pixels per "
            f"image; use data of the kind the model was trained on"
        )
    return X_uint8
