"""Full-batch gradient descent: every epoch is one forward pass, one backward pass and one update over all of X.

The data go to the device once, before the first epoch. Inside an epoch nothing comes back to the host: the
epoch's metrics (loss, accuracies, a finiteness flag for the weights) are stacked into one small device array and
read back in a single transfer at the epoch's end, which is also where the clock is read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gpunn.backend import Backend
from gpunn.data import CLASSES, Split
from gpunn.errors import ModelError, TrainingDivergedError
from gpunn.model import Model
from gpunn.nn import (
    Architecture,
    Layer,
    accuracy,
    backward,
    cost,
    default_init,
    forward,
    init_params,
    one_hot,
    scale_pixels,
    sgd_update,
)


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

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be positive, got {self.lr}")

    @property
    def weight_init(self) -> str:
        return self.init or default_init(self.activation)


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


@dataclass(frozen=True)
class DeviceData:
    """A labelled set on the device: X (n_0, m) in the training dtype, y (m,) int64, Y (classes, m) one-hot."""

    X: Any
    y: Any
    Y: Any

    @classmethod
    def from_host(cls, X_uint8: Any, y: Any, *, backend: Backend, dtype: str) -> DeviceData:
        """The one host-to-device transfer of a data set: uint8 pixels and int64 labels, converted on the device."""
        float_dtype = getattr(backend.xp, dtype)
        X = scale_pixels(backend.asarray(X_uint8), float_dtype)
        y_dev = backend.asarray(y)
        return cls(X, y_dev, one_hot(y_dev, CLASSES, float_dtype))

    @property
    def m(self) -> int:
        return int(self.y.shape[0])


def train_epoch(params: list[Layer], data: DeviceData, arch: Architecture, lr: float) -> tuple[list[Layer], Any, Any]:
    """One full-batch step: forward, cost, backward, update. Returns the new parameters, the loss and the
    training accuracy (0-d device arrays, both measured before the update)."""
    trace = forward(params, data.X, arch)
    loss = cost(trace.Z[-1], data.Y, arch.output)
    train_accuracy = accuracy(trace.A[-1], data.y)
    grads = backward(params, trace, data.Y, arch)
    return sgd_update(params, grads, lr), loss, train_accuracy


def fit(
    split: Split,
    config: TrainConfig,
    *,
    backend: Backend,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FitResult:
    """Train a new network on ``split`` with full-batch gradient descent on ``backend``."""
    arch = Architecture((split.X_train.shape[0], *config.hidden, CLASSES), config.activation)
    train = DeviceData.from_host(split.X_train, split.y_train, backend=backend, dtype=config.dtype)
    val = DeviceData.from_host(split.X_val, split.y_val, backend=backend, dtype=config.dtype) if len(split.y_val) else None
    params = [
        Layer(backend.asarray(W), backend.asarray(b))
        for W, b in init_params(arch, init=config.weight_init, seed=config.seed, dtype=config.dtype)
    ]
    # Overflow is caught once per epoch by the finiteness check and reported with the epoch and a fix; NumPy's own
    # floating-point warnings would only repeat it, several times per epoch and with neither.
    with np.errstate(over="ignore", invalid="ignore"):
        params, history = _run_epochs(params, train, val, arch, config, backend, on_epoch)
    model = Model(
        arch,
        params,
        config.dtype,
        info={
            "epochs": config.epochs,
            "lr": config.lr,
            "seed": config.seed,
            "init": config.weight_init,
            "train_samples": train.m,
            "device": backend.name,
        },
    )
    test_accuracy, n_test = None, 0
    if split.X_test is not None and split.y_test is not None and len(split.y_test):
        test_accuracy, n_test = evaluate(model, split.X_test, split.y_test, backend=backend), len(split.y_test)
    return FitResult(model, history, test_accuracy, n_test)


def _run_epochs(
    params: list[Layer],
    train: DeviceData,
    val: DeviceData | None,
    arch: Architecture,
    config: TrainConfig,
    backend: Backend,
    on_epoch: Callable[[EpochStats], None] | None,
) -> tuple[list[Layer], list[EpochStats]]:
    xp = backend.xp
    nan = xp.asarray(math.nan, dtype=train.X.dtype, device=backend.device)
    history: list[EpochStats] = []
    backend.synchronize()
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        params, loss, train_accuracy = train_epoch(params, train, arch, config.lr)
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
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return params, history


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
