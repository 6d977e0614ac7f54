"""The training loop. By default every epoch is one full-batch step: one forward pass, one backward pass and one
update over all of X. Mini-batches, the update rules of :mod:`gpunn.optim`, L2, dropout, schedules, early stopping
and checkpoints are options of the same loop.

The data go to the device once, before the first epoch. Inside an epoch nothing comes back to the host; with
mini-batches only the epoch's permutation goes to it. The epoch's metrics (loss, accuracies, a finiteness flag for
the weights) are stacked into one small device array and read back in a single transfer at the epoch's end, which
is also where the clock is read.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from gpunn.backend import Backend, GradientPass
from gpunn.data import CLASSES, Split
from gpunn.errors import ConfigError, ModelError, TrainingDivergedError
from gpunn.model import Model, Preprocessing
from gpunn.nn import (
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
from gpunn.optim import Optimizer, learning_rate


@dataclass(frozen=True)
class TrainConfig:
    """What ``gpunn train`` lets a user choose; the defaults are the seed notes' network and settings."""

    hidden: tuple[int, ...] = (10,)
    activation: str = "relu"
    init: str | None = None  # None: he for relu, xavier otherwise
    dtype: str = "float32"
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

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be positive, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"the batch size must be at least 1, got {self.batch_size}")
        if self.l2 < 0:
            raise ValueError(f"the L2 strength must not be negative, got {self.l2}")
        self.rule  # validates the optimizer and its hyper-parameters
        self.lr_at(1)  # validates the schedule
        if self.lr_step_size < 1 or not 0 < self.lr_gamma <= 1:
            raise ValueError(f"the step schedule needs a step size >= 1 and 0 < gamma <= 1, got {self.lr_step_size} "
                             f"and {self.lr_gamma}")
        if self.normalize not in ("scale", "standardize"):
            raise ValueError(f"unknown normalization {self.normalize!r}; expected 'scale' or 'standardize'")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"the dropout probability must be in [0, 1), got {self.dropout}")
        if self.early_stop is not None and self.early_stop < 1:
            raise ValueError(f"early stopping needs a patience of at least 1 epoch, got {self.early_stop}")

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
        return cls(**{**values, "hidden": tuple(values["hidden"])})


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
    model: Model
    history: list[EpochStats]
    test_accuracy: float | None
    n_test: int


@dataclass
class TrainState:
    """Where a run stands after a completed epoch: enough to save a checkpoint and to resume bit for bit.

    The optimizer's step count is not kept: it is the epoch times the (fixed) number of batches per epoch."""

    params: list[Layer]
    optimizer_state: dict[str, list[Layer]]
    epoch: int


class TrainingInterrupted(Exception):
    """Ctrl-C during training; ``model`` is the network after the last completed epoch, ready to save and resume."""

    def __init__(self, model: Model, epoch: int) -> None:
        super().__init__(f"interrupted after epoch {epoch}")
        self.model = model
        self.epoch = epoch


def fingerprint(split: Split) -> str:
    """SHA-256 of the training and validation data in their shuffled order: a resumed run must see the same."""
    digest = hashlib.sha256()
    for array in (split.X_train, split.y_train, split.X_val, split.y_val):
        digest.update(np.ascontiguousarray(array).data)
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
    """A labelled set on the device: X (n_0, m) in the training dtype, y (m,) int64, Y (classes, m) one-hot."""

    X: Any
    y: Any
    Y: Any

    @classmethod
    def from_host(cls, X_uint8: Any, y: Any, *, backend: Backend, dtype: str,
                  preprocessing: Preprocessing | None = None) -> DeviceData:
        """The one host-to-device transfer of a data set: uint8 pixels and int64 labels, prepared on the device."""
        float_dtype = getattr(backend.xp, dtype)
        X = (preprocessing or Preprocessing())(backend.asarray(X_uint8), float_dtype)
        y_dev = backend.asarray(y)
        return cls(X, y_dev, one_hot(y_dev, CLASSES, float_dtype))

    @property
    def m(self) -> int:
        return int(self.y.shape[0])

    def take(self, columns: Any) -> DeviceData:
        """The samples at the device index array ``columns``, gathered on the device."""
        xp = array_namespace(self.X)
        return DeviceData(xp.take(self.X, columns, axis=1), xp.take(self.y, columns, axis=0),
                          xp.take(self.Y, columns, axis=1))


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
) -> tuple[list[Layer], dict[str, list[Layer]], Any, Any]:
    """One gradient step on ``data`` (all of it, or a mini-batch): forward, cost, backward, update rule.

    Returns the new parameters and optimizer state, and the cost (L2 term included) and the accuracy, both 0-d device
    arrays measured before the update. ``t`` is the 1-based step count (Adam's bias correction uses it). With
    ``dropout``, the masks come from ``rng`` (see :meth:`gpunn.backend.Backend.random`), and the loss and accuracy
    are those of the thinned network being trained. ``gradients``: the backend's pass for this run (see
    :meth:`gpunn.backend.Backend.gradient_pass`); the generic :func:`gpunn.nn.loss_and_gradients` when None.
    """
    gradients = gradients or partial(loss_and_gradients, arch=arch)
    loss, batch_accuracy, grads = gradients(params, data.X, data.Y, data.y, l2=l2, dropout=dropout, rng=rng)
    params, optimizer_state = rule.step(params, grads, optimizer_state, lr, t)
    return params, optimizer_state, loss, batch_accuracy


def fit(
    split: Split,
    config: TrainConfig,
    *,
    backend: Backend,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_checkpoint: Callable[[Model], None] | None = None,
    checkpoint_every: int = 0,
    resume: Model | None = None,
) -> FitResult:
    """Train on ``split`` with full-batch gradient descent on ``backend``, up to ``config.epochs`` in all.

    ``resume``: a model or checkpoint saved by an earlier run of the same configuration on the same data; training
    continues after its last epoch and ends exactly where an uninterrupted run would. ``on_checkpoint`` receives the
    model every ``checkpoint_every`` epochs. Ctrl-C raises TrainingInterrupted carrying the last completed epoch.
    """
    data_sha256 = fingerprint(split)
    arch = config.architecture(split.X_train.shape[0])
    X_train = backend.asarray(split.X_train)
    # statistics from the training split only, then applied unchanged to validation, test and prediction inputs
    preprocessing = Preprocessing.fit("standardize" if config.normalize == "standardize" else "scale-255", X_train,
                                      getattr(backend.xp, config.dtype))
    train = DeviceData.from_host(X_train, split.y_train, backend=backend, dtype=config.dtype,
                                 preprocessing=preprocessing)
    val = DeviceData.from_host(split.X_val, split.y_val, backend=backend, dtype=config.dtype,
                               preprocessing=preprocessing) if len(split.y_val) else None
    rule = config.rule
    if resume is None:
        params = [
            Layer(backend.asarray(W), backend.asarray(b))
            for W, b in init_params(arch, init=config.weight_init, seed=config.seed, dtype=config.dtype)
        ]
        state = TrainState(params, rule.init(params), 0)
    else:
        done = check_resumable(resume, config, data_sha256)
        if set(resume.optimizer_state) != set(rule.state_names):
            raise ModelError(f"cannot resume: the checkpoint holds optimizer state {sorted(resume.optimizer_state)}, "
                             f"{config.optimizer} needs {sorted(rule.state_names)}")
        state = TrainState(resume.params, resume.optimizer_state, done)
    def snapshot(state: TrainState) -> Model:
        return make_model(arch, state, config, split, data_sha256, backend, preprocessing)

    # Overflow is caught once per epoch by the finiteness check and reported with the epoch and a fix; NumPy's own
    # floating-point warnings would only repeat it, several times per epoch and with neither.
    if config.early_stop is not None and val is None:
        raise ConfigError("--early-stop watches the validation loss, so it needs --val-size > 0")
    history: list[EpochStats] = []
    best: tuple[float, TrainState] | None = None  # (validation loss, state) of the best epoch so far
    stopped_early = False
    columns = config.batch_columns(train.m)
    try:
        # the backend's fast path for this network where it has one (the generic math otherwise), held for the run
        with np.errstate(over="ignore", invalid="ignore"), \
                backend.gradient_pass(arch, dtype=config.dtype, columns=columns, dropout=config.dropout) as gradients:
            for stats, state in _run_epochs(state, train, val, arch, config, backend, gradients):
                history.append(stats)
                if on_epoch is not None:
                    on_epoch(stats)
                if on_checkpoint is not None and checkpoint_every and state.epoch % checkpoint_every == 0:
                    on_checkpoint(snapshot(state))
                if config.early_stop is not None:
                    if best is None or stats.val_loss < best[0]:
                        best = (stats.val_loss, state)
                    elif state.epoch - best[1].epoch >= config.early_stop:
                        stopped_early = True
                        break
    except KeyboardInterrupt:
        raise TrainingInterrupted(snapshot(state), state.epoch) from None
    if stopped_early and best is not None:
        state = best[1]  # parameters are never modified in place, so the best epoch's arrays are intact
    model = snapshot(state)
    if config.early_stop is not None:
        model.info["early_stop"] = {"stopped": stopped_early, "best_epoch": None if best is None else best[1].epoch,
                                    "epochs_run": history[-1].epoch if history else state.epoch}
    del train, val  # the training set in floats is the largest array of the run: free it before the test set's
    test_accuracy, n_test = None, 0
    if split.X_test is not None and split.y_test is not None and len(split.y_test):
        test_accuracy, n_test = evaluate(model, split.X_test, split.y_test, backend=backend), len(split.y_test)
    return FitResult(model, history, test_accuracy, n_test)


def check_resumable(model: Model, config: TrainConfig, data_sha256: str) -> int:
    """The number of epochs ``model`` has done, after checking that ``config`` and the data continue its run."""
    info = model.info
    if "config" not in info or "epochs_done" not in info:
        raise ModelError("the model to resume holds no training state; it was not saved by gpunn train")
    saved = {key: value for key, value in info["config"].items() if key != "epochs"}
    wanted = {key: value for key, value in config.as_dict().items() if key != "epochs"}
    if saved != wanted:
        differ = ", ".join(f"{key} {saved.get(key)!r} there, {wanted.get(key)!r} here" for key in saved
                           if saved.get(key) != wanted.get(key))
        raise ModelError(f"cannot resume: the settings differ from the checkpoint's ({differ})")
    if info.get("data_sha256") != data_sha256:
        raise ModelError("cannot resume: the training data (or its shuffled split) differ from the checkpoint's")
    done = int(info["epochs_done"])
    if done >= config.epochs:
        raise ModelError(f"nothing to resume: the checkpoint has done {done} epochs and --epochs is {config.epochs}; "
                         "--epochs counts all epochs, so raise it")
    return done


def _run_epochs(
    state: TrainState,
    train: DeviceData,
    val: DeviceData | None,
    arch: Architecture,
    config: TrainConfig,
    backend: Backend,
    gradients: GradientPass,
) -> Iterator[tuple[EpochStats, TrainState]]:
    """Epochs ``state.epoch + 1`` to ``config.epochs``; yields each epoch's report and the state after it."""
    xp = backend.xp
    nan = xp.asarray(math.nan, dtype=train.X.dtype, device=backend.device)
    rule = config.rule
    batch = config.batch_columns(train.m)
    steps_per_epoch = -(-train.m // batch)
    params, optimizer_state = state.params, state.optimizer_state
    backend.synchronize()
    for epoch in range(state.epoch + 1, config.epochs + 1):
        start = time.perf_counter()
        lr = config.lr_at(epoch)
        t = (epoch - 1) * steps_per_epoch
        # dropout masks from the device's own generator, seeded from (seed, epoch) so that a resumed run draws the same
        rng = backend.random(int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0])) \
            if config.dropout else None
        if batch == train.m:  # full batch: no shuffling, the step sees every sample at once
            t += 1
            params, optimizer_state, loss, train_accuracy = train_step(
                params, optimizer_state, train, arch, lr=lr, t=t, rule=rule, l2=config.l2, dropout=config.dropout,
                rng=rng, gradients=gradients)
        else:
            # Reshuffled every epoch from (seed, epoch), so a resumed run draws the same batches. Only this
            # permutation crosses to the device; the batches are gathered there.
            order = backend.asarray(np.random.default_rng([config.seed, epoch]).permutation(train.m))
            loss = train_accuracy = 0.0
            for first in range(0, train.m, batch):
                t += 1
                part = train.take(order[first : first + batch])
                params, optimizer_state, batch_loss, batch_accuracy = train_step(
                    params, optimizer_state, part, arch, lr=lr, t=t, rule=rule, l2=config.l2,
                    dropout=config.dropout, rng=rng, gradients=gradients)
                # epoch figures: the mean over samples of the figures each batch had before its own update
                loss = loss + batch_loss * (part.m / train.m)
                train_accuracy = train_accuracy + batch_accuracy * (part.m / train.m)
        if val is not None:
            val_trace = forward(params, val.X, arch)
            val_loss, val_accuracy = cost(val_trace.Z[-1], val.Y, arch.output), accuracy(val_trace.A[-1], val.y)
        else:
            val_loss = val_accuracy = nan
        finite = xp.all(xp.stack([xp.all(xp.isfinite(W)) & xp.all(xp.isfinite(b)) for W, b in params]))
        # the epoch's single device-to-host transfer; it waits for the device, so the clock is read after it
        metrics = xp.stack([loss, train_accuracy, val_loss, val_accuracy, xp.astype(finite, nan.dtype)])
        loss_value, train_value, val_loss_value, val_value, finite_value = map(float, backend.to_numpy(metrics))
        backend.synchronize()
        seconds = time.perf_counter() - start
        if not math.isfinite(loss_value):
            raise TrainingDivergedError(epoch, "the loss", config.lr)
        if finite_value != 1.0:
            raise TrainingDivergedError(epoch, "a weight", config.lr)
        stats = EpochStats(
            epoch,
            loss_value,
            train_value,
            None if val is None else val_loss_value,
            None if val is None else val_value,
            seconds,
            train.m / seconds,
        )
        yield stats, TrainState(params, optimizer_state, epoch)


def evaluate(model: Model, X_uint8: Any, y: Any, *, backend: Backend) -> float:
    """The fraction of the digits X (n_0, m) uint8 on the host that ``model`` labels correctly."""
    A_L = model.probabilities(backend.asarray(_fits(model, X_uint8)))
    return float(backend.to_numpy(accuracy(A_L, backend.asarray(y))))


def predict_proba(model: Model, X_uint8: Any, *, backend: Backend) -> np.ndarray:
    """Class probabilities (m, classes) on the host for the digits X (n_0, m) uint8 on the host."""
    A_L = model.probabilities(backend.asarray(_fits(model, X_uint8)))
    return backend.to_numpy(A_L).T


def _fits(model: Model, X_uint8: Any) -> Any:
    if X_uint8.shape[0] != model.arch.sizes[0]:
        raise ModelError(
            f"the model takes {model.arch.sizes[0]} inputs per digit but the data has {X_uint8.shape[0]} pixels per "
            f"image; use data of the kind the model was trained on"
        )
    return X_uint8
