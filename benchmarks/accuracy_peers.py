"""Test accuracy of gpunn beside its peers for the same network and the same settings, measured in one run.

    python benchmarks/accuracy_peers.py --data-dir ../shared/data/mnist --name accuracy-peers   # the committed run
    python benchmarks/accuracy_peers.py --rows adam-784-10-10 --seeds 0 --epochs adam-784-10-10=2   # toy size

Every implementation trains on the same training digits and is scored on the same test digits, by the same
function: a float64 forward pass of its final weights, in gpunn's layout, and the argmax of the logits. With
``--data-dir`` those are gpunn's split of MNIST (59,000 train and 1,000 validation digits, shuffled with seed 0, and
the 10,000 test digits); the validation digits are seen by no one but gpunn's progress report. Without it, the
bundled sample, of which ``--test-size`` digits are held out first as a test set (the sample has none). Pixels are
scaled by 1/255 into float32 for every implementation.

Each row is one network and its settings (:data:`ROWS`); gpunn and each of the row's peers train it once per seed,
interleaved seed by seed, so that a drift of the machine's load falls on all of them alike. The JSON records every
setting of every implementation (scikit-learn's ``get_params()``, PyTorch's optimizer defaults, gpunn's TrainConfig)
and how each still differs from gpunn's (initial weights, batch order). Wall and CPU times are recorded per run, as
information only: the machine may be shared.

Writes NAME.json and NAME.md to ``--out-dir`` only when ``--name`` or ``--out-dir`` is given; otherwise it prints
the table.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the peers package and epoch_throughput beside this script

import gpunn  # noqa: E402
from epoch_throughput import machine, machine_lines  # noqa: E402

from gpunn.backend import Backend, get_backend  # noqa: E402
from gpunn.data import Dataset, Split  # noqa: E402
from gpunn.diagnostics import usable_cores  # noqa: E402
from gpunn.nn import Architecture, init_params  # noqa: E402
from gpunn.optim import learning_rate  # noqa: E402

DEFAULT_OUT_DIR = Path("benchmarks/results")
DEFAULT_NAME = "accuracy-peers"
VAL_SIZE = 1000  # gpunn's default validation split
#: what the settings record says where a setting is each run's own seed (the runs list them)
RUN_SEED = "the run's seed"
SPLIT_SEED = 0  # gpunn's split of the training digits, the same for every training seed and every implementation

Params = list[tuple[np.ndarray, np.ndarray]]  # [(W (n_out, n_in), b (n_out, 1))], gpunn's layout, on the host


@dataclass(frozen=True)
class Settings:
    """One row: a network and how it is trained, as gpunn's TrainConfig says it and every peer of the row mirrors it."""

    id: str
    hidden: tuple[int, ...]
    batch_size: int | None  # None: full batch
    optimizer: str  # "gd" or "adam" (beta1 0.9, beta2 0.999, eps 1e-8 everywhere: every library's default)
    lr: float
    l2: float  # gpunn's lambda of (lambda / 2m) sum ||W||^2, m the batch's size
    epochs: int
    lr_schedule: str  # "constant" or "cosine" (per epoch, gpunn's formula)
    peers: tuple[str, ...]
    why: str
    max_seeds: int | None = None  # run only the first this many seeds (a costly row; --every-seed lifts it)
    max_seeds_why: str = ""

    def config(self, seed: int) -> gpunn.TrainConfig:
        return gpunn.TrainConfig(hidden=self.hidden, epochs=self.epochs, lr=self.lr, seed=seed,
                                 batch_size=self.batch_size, optimizer=self.optimizer, l2=self.l2,
                                 lr_schedule=self.lr_schedule, val_size=VAL_SIZE)

    @property
    def network(self) -> str:
        return "-".join(map(str, (784, *self.hidden, 10)))

    def text(self) -> str:
        batches = "full batch" if self.batch_size is None else f"batches of {self.batch_size}"
        rule = "plain gradient descent" if self.optimizer == "gd" else "Adam (0.9, 0.999, 1e-8)"
        schedule = "" if self.lr_schedule == "constant" else f", {self.lr_schedule}"
        epochs = f"{self.epochs} epoch" + ("s" if self.epochs != 1 else "")
        parts = [batches, rule, f"lr {self.lr:g}{schedule}", f"L2 λ {self.l2:g}" if self.l2 else "no L2", epochs,
                 "He init", "float32"]
        return ", ".join(parts)

    def gpunn_options(self) -> str:
        """The `gpunn train` options of this row (on gpunn's split, which is seed 0's: --seed also shuffles it)."""
        options = [f"--hidden {','.join(map(str, self.hidden))}"] if self.hidden != (10,) else []
        if self.batch_size is not None:
            options.append(f"--batch-size {self.batch_size}")
        if self.optimizer != "gd":
            options.append(f"--optimizer {self.optimizer}")
        if self.lr != 0.1:
            options.append(f"--lr {self.lr:g}")
        if self.l2:
            options.append(f"--l2 {self.l2:g}")
        if self.epochs != 500:
            options.append(f"--epochs {self.epochs}")
        if self.lr_schedule != "constant":
            options.append(f"--lr-schedule {self.lr_schedule}")
        return " ".join(options) or "(defaults)"


ROWS = (
    Settings("gd-784-10-10", (10,), None, "gd", 0.1, 0.0, 500, "constant", ("numpy-naive", "torch"),
             "gpunn's defaults: the seed notes' network and step", max_seeds=1,
             max_seeds_why="one seed: 500 full-batch epochs are the costliest runs (the notebook program alone takes "
                           "minutes), and all three compute the same step from the same initial weights, so another "
                           "seed moves them together"),
    # scikit-learn's MLPClassifier defaults: Adam, lr 0.001, batches of min(200, m), alpha 1e-4 (= gpunn's lambda,
    # see sklearn_settings), here for a fixed 100 epochs
    Settings("adam-784-10-10", (10,), 200, "adam", 0.001, 1e-4, 100, "constant", ("sklearn", "torch"),
             "scikit-learn MLPClassifier((10,))'s defaults, 100 epochs"),
    Settings("adam-784-100-10", (100,), 64, "adam", 0.001, 0.0, 10, "constant", ("sklearn", "torch"),
             "the README's 784-100-10 row without its schedule, which scikit-learn's Adam cannot follow"),
    Settings("adam-784-100-10-cosine", (100,), 64, "adam", 0.001, 0.0, 10, "cosine", ("torch",),
             "the README's 784-100-10 row as it is"),
)
ROW_IDS = tuple(row.id for row in ROWS)


@dataclass
class Run:
    """One training run of one implementation: its final weights' test accuracy, and what it cost."""

    seed: int
    test_accuracy: float
    wall_s: float
    cpu_s: float
    own_test_accuracy: float | None = None  # the implementation's own prediction, where it has one (a cross-check)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Implementation:
    name: str
    label: str
    status: str = "ok"
    settings: dict[str, Any] = field(default_factory=dict)  # everything needed to reproduce it
    differs: list[str] = field(default_factory=list)  # how it still differs from gpunn's run of the same row
    runs: list[Run] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        accuracies = [run.test_accuracy for run in self.runs]
        if not accuracies:
            return {"mean": None, "sd": None, "min": None, "max": None, "wall_s_mean": None}
        return {"mean": statistics.fmean(accuracies),
                "sd": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
                "min": min(accuracies), "max": max(accuracies),
                "wall_s_mean": statistics.fmean(run.wall_s for run in self.runs)}


# --- data and scoring ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    split: Split  # gpunn's: X (784, m) uint8, y (m,) int64; X_test and y_test always present here
    source: str
    note: str
    X_train_float: np.ndarray  # (m, 784) float32 pixels / 255, C-contiguous: the peers' input, one sample per row
    X_test_float: np.ndarray  # (784, m_test) float64 pixels / 255: the scorer's input


def load_data(data_dir: Path | None, test_size: int) -> Data:
    if data_dir is not None:
        dataset = gpunn.load_idx_dir(data_dir)
        note = "the 10,000 MNIST test digits" if dataset.test_images is not None else ""
    else:
        dataset = gpunn.load_bundled_sample()
        note = ""
    if dataset.test_images is None:
        # No test part (the bundled sample): hold out test_size digits first, shuffled with a seed of its own, so
        # that gpunn's split of the rest stays its usual one.
        order = np.random.default_rng(12345).permutation(len(dataset.train_labels))
        test, train = order[:test_size], order[test_size:]
        dataset = Dataset(dataset.source, dataset.train_images[train], dataset.train_labels[train],
                          dataset.train_images[test], dataset.train_labels[test])
        note = f"{test_size:,} digits held out of the training digits (the data have no test part)"
    split = gpunn.split(dataset, val_size=VAL_SIZE, seed=SPLIT_SEED)
    X_train_float = np.ascontiguousarray(split.X_train.T, dtype=np.float32) / np.float32(255)
    X_test_float = split.X_test.astype(np.float64) / 255
    return Data(split, dataset.source, note, X_train_float, X_test_float)


def score(params: Params, X: np.ndarray, y: np.ndarray) -> float:
    """The fraction of the digits X (784, m), already scaled, whose largest logit is their label: one scorer, in
    float64, for every implementation's weights, so that no implementation's own prediction code enters the figure."""
    A = X
    for l, (W, b) in enumerate(params):
        Z = W.astype(np.float64) @ A + b.astype(np.float64).reshape(-1, 1)
        A = np.maximum(Z, 0) if l < len(params) - 1 else Z
    return float(np.mean(np.argmax(A, axis=0) == y))


def initial_params(row: Settings, seed: int) -> Params:
    """gpunn's initial weights for this row and seed (He normal, zero biases), as gpunn.fit draws them."""
    arch = Architecture((784, *row.hidden, 10))
    return [(np.asarray(W), np.asarray(b)) for W, b in init_params(arch, init="he", seed=seed, dtype="float32")]


# --- the implementations ------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The implementation cannot run here (a library not installed): a status line, not a crash."""


def run_gpunn(row: Settings, data: Data, seed: int, backend: Backend, impl: Implementation) -> tuple[Params, dict]:
    config = row.config(seed)
    result = gpunn.fit(data.split, config, backend=backend)
    impl.settings = {**config.as_dict(), "seed": RUN_SEED, "device": backend.name, "split_seed": SPLIT_SEED,
                     "step": result.model.info.get("step"),
                     "python": f"gpunn.fit(gpunn.split(dataset, val_size={VAL_SIZE}, seed={SPLIT_SEED}), "
                               f"gpunn.TrainConfig(...), backend=gpunn.get_backend('cpu'))",
                     "input": "float32 pixels / 255"}
    params = [(np.asarray(backend.to_numpy(W)), np.asarray(backend.to_numpy(b))) for W, b in result.model.params]
    return params, {"own_test_accuracy": result.test_accuracy, "epochs_run": len(result.history)}


def run_numpy_naive(row: Settings, data: Data, seed: int, backend: Backend, impl: Implementation
                    ) -> tuple[Params, dict]:
    from peers import naive_numpy

    if row.optimizer != "gd" or row.batch_size is not None or row.l2 or row.lr_schedule != "constant":
        raise Unavailable("the seed notebook's program does full-batch plain gradient descent only")
    params = initial_params(row, seed)
    runner = naive_numpy.make(data.split.X_train.T, data.split.y_train, params, lr=row.lr, dtype="float32",
                              device="cpu")
    for _ in range(row.epochs):
        runner.step()
    impl.settings = {"program": "benchmarks/peers/naive_numpy.py (the seed notebook's forward_prop, backward_prop, "
                                "update_params; per-unit biases)",
                     "init": "gpunn's init_params(he, seed), float32", "dtype": "float32", "lr": row.lr,
                     "epochs": row.epochs, "batch": "full batch, every epoch one step", "input": "float32 pixels / 255"}
    impl.differs = ["none in the math: the same step from the same initial weights (the softmax without "
                    "max-subtraction, new arrays every step)"]
    return [(np.asarray(W), np.asarray(b)) for W, b in runner.params()], {}


def sklearn_settings(row: Settings, seed: int) -> dict[str, Any]:
    """MLPClassifier's arguments for this row.

    L2: scikit-learn's loss on a batch of n samples is mean cross-entropy + (alpha / 2) sum ||W||^2 / n, and its
    gradient adds alpha W / n (MLPClassifier._backprop, _compute_loss_grad: both divide by the batch's sample count).
    gpunn's is mean cross-entropy + (lambda / 2m) sum ||W||^2 with m the batch's size, biases not penalized in
    either: so alpha = lambda, exactly.
    Stopping: scikit-learn stops when the training loss has not improved by tol for n_iter_no_change epochs, even
    without early_stopping; n_iter_no_change = max_iter makes that impossible within max_iter epochs (it stops when
    the count *exceeds* n_iter_no_change), so it runs exactly the row's epochs, as gpunn does.
    """
    if row.lr_schedule != "constant" or row.optimizer != "adam":
        raise Unavailable("scikit-learn's MLP schedules its rate for SGD only; its Adam keeps a constant rate")
    return dict(hidden_layer_sizes=row.hidden, activation="relu", solver="adam", alpha=row.l2,
                batch_size=row.batch_size, learning_rate_init=row.lr, max_iter=row.epochs, shuffle=True,
                random_state=seed, tol=1e-4, n_iter_no_change=row.epochs, early_stopping=False, beta_1=0.9,
                beta_2=0.999, epsilon=1e-8, verbose=False, warm_start=False)


def check_l2_mapping(data: Data, samples: int = 500, alpha: float = 0.5) -> dict[str, Any] | None:
    """scikit-learn's training loss beside gpunn's cost with lambda = alpha, on the same weights and digits: the
    mapping of sklearn_settings measured rather than read. None without scikit-learn.

    One full-batch epoch (shuffle off) gives weights W; a warm-started second epoch records its loss on W before it
    updates them, L2 term included. gpunn's cost + (alpha / 2m) sum ||W||^2 on W, in float64, must equal it. A large
    alpha makes the L2 term a visible part of the loss."""
    try:
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        return None
    from gpunn.nn import Layer, cost, forward, l2_cost, one_hot

    X = np.ascontiguousarray(data.split.X_train[:, :samples].T, dtype=np.float64) / 255
    y = data.split.y_train[:samples]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one epoch is not convergence, and says so
        clf = MLPClassifier((10,), alpha=alpha, batch_size=len(y), max_iter=1, shuffle=False, random_state=0)
        clf.fit(X, y)
        params = [Layer(W.T.copy(), b.reshape(-1, 1).copy()) for W, b in zip(clf.coefs_, clf.intercepts_)]
        clf.set_params(warm_start=True)
        clf.fit(X, y)
    arch = Architecture((784, 10, 10))
    ce = float(cost(forward(params, X.T, arch).Z[-1], one_hot(np.asarray(y), 10, np.float64)))
    l2 = float(l2_cost(params, alpha, len(y)))
    sklearn_loss = float(clf.loss_curve_[-1])
    return {"samples": len(y), "alpha": alpha, "sklearn_loss": sklearn_loss, "gpunn_loss_lambda_eq_alpha": ce + l2,
            "gpunn_l2_term": l2, "relative_difference": abs(sklearn_loss - (ce + l2)) / sklearn_loss}


def run_sklearn(row: Settings, data: Data, seed: int, backend: Backend, impl: Implementation) -> tuple[Params, dict]:
    try:
        import sklearn
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
    except ImportError as error:
        raise Unavailable(f"scikit-learn not installed ({error}); it is no gpunn dependency") from error
    clf = MLPClassifier(**sklearn_settings(row, seed))
    with warnings.catch_warnings(record=True) as caught:
        # "Maximum iterations reached": expected, every implementation runs the row's fixed number of epochs
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(data.X_train_float, data.split.y_train)
    if list(clf.classes_) != list(range(10)):
        raise RuntimeError(f"scikit-learn's classes are {clf.classes_}, not 0-9: its outputs would be misread")
    impl.settings = {"class": f"sklearn.neural_network.MLPClassifier (scikit-learn {sklearn.__version__})",
                     "get_params": {**_jsonable(clf.get_params()), "random_state": RUN_SEED},
                     "input": "float32 pixels / 255 (it trains in float32)",
                     "alpha_from": "alpha = gpunn's lambda (see sklearn_settings in the script)"}
    impl.differs = ["initial weights: its own Glorot uniform, U(±sqrt(6/(fan_in+fan_out))) for weights and biases "
                    "(gpunn: He normal, zero biases)",
                    "batch order: its own shuffling each epoch (random_state = seed)",
                    "Adam's eps is added to sqrt(v) before the bias correction (eps·sqrt(1 − β2^t) in gpunn's "
                    "terms)"]
    params = [(W.T.astype(np.float32), b.reshape(-1, 1).astype(np.float32))
              for W, b in zip(clf.coefs_, clf.intercepts_)]
    own = float(np.mean(clf.predict(np.ascontiguousarray(data.X_test_float.T, dtype=np.float32))
                        == data.split.y_test))
    return params, {"own_test_accuracy": own, "epochs_run": clf.n_iter_, "final_loss": float(clf.loss_),
                    "warnings": sorted({str(w.message).split(".")[0] for w in caught})}


def run_torch(row: Settings, data: Data, seed: int, backend: Backend, impl: Implementation) -> tuple[Params, dict]:
    """nn.Sequential(Linear, ReLU, Linear, ...) with autograd and torch.optim, as a PyTorch user writes it, from
    gpunn's initial weights and with gpunn's settings."""
    try:
        import torch
        from torch import nn
    except ImportError as error:
        raise Unavailable(f"torch not installed ({error}); it is no gpunn dependency") from error
    params = initial_params(row, seed)
    layers: list[nn.Module] = []
    for l, (W, _) in enumerate(params):
        layers.append(nn.Linear(W.shape[1], W.shape[0]))
        if l < len(params) - 1:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    linears = [layer for layer in model if isinstance(layer, nn.Linear)]
    with torch.no_grad():
        for linear, (W, b) in zip(linears, params):  # nn.Linear's weight is (out, in), as gpunn's W
            linear.weight.copy_(torch.from_numpy(W))
            linear.bias.copy_(torch.from_numpy(b.reshape(-1)))
    if row.optimizer == "gd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=row.lr)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=row.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    # gpunn's per-epoch rate (cosine: lr (1 + cos(pi (epoch - 1) / epochs)) / 2), as a factor of lr per epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: learning_rate(row.lr_schedule, row.lr, e + 1, row.epochs) / row.lr)
    X = torch.from_numpy(data.X_train_float)
    y = torch.from_numpy(data.split.y_train)
    m = len(y)
    batch = row.batch_size or m
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()  # mean over the batch, as gpunn's cost
    for _ in range(row.epochs):
        order = torch.randperm(m, generator=generator) if batch < m else None
        for first in range(0, m, batch):
            index = order[first:first + batch] if order is not None else slice(None)
            xb, yb = X[index], y[index]
            loss = loss_fn(model(xb), yb)
            if row.l2:
                # gpunn's L2 term, weights only, over this batch's size; torch's weight_decay would add lambda W
                # (no 1/m) and decay the biases too
                loss = loss + row.l2 / (2 * len(yb)) * sum((linear.weight ** 2).sum() for linear in linears)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    impl.settings = {"torch": torch.__version__,
                     "model": str(model).replace("\n", " "), "init": "gpunn's init_params(he, seed), copied",
                     "loss": "nn.CrossEntropyLoss() (mean)"
                             + (f" + {row.l2:g} / (2 * batch) * sum(weight ** 2), weights only" if row.l2 else ""),
                     "optimizer": type(optimizer).__name__, "optimizer_defaults": _jsonable(optimizer.defaults),
                     "schedule": f"LambdaLR, gpunn's {row.lr_schedule} rate per epoch",
                     "batches": "full batch" if batch >= m else
                                f"{batch}, torch.randperm(m, generator=torch.Generator().manual_seed(seed)) each epoch",
                     "epochs": row.epochs, "dtype": "float32", "input": "float32 pixels / 255"}
    impl.differs = (["none in the math: the same step from the same initial weights (autograd, float rounding)"]
                    if batch >= m else ["batch order: its own shuffling each epoch (torch.randperm, seeded with the "
                                        "seed); same initial weights"])
    with torch.no_grad():
        out = [(linear.weight.numpy().copy(), linear.bias.numpy().reshape(-1, 1).copy()) for linear in linears]
    return out, {}


IMPLEMENTATIONS: dict[str, tuple[str, Callable[..., tuple[Params, dict]]]] = {
    "gpunn": ("gpunn", run_gpunn),
    "numpy-naive": ("the seed notebook's NumPy program", run_numpy_naive),
    "sklearn": ("scikit-learn MLPClassifier", run_sklearn),
    "torch": ("PyTorch nn.Sequential", run_torch),
}


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {key: (list(v) if isinstance(v, tuple) else v if isinstance(v, (int, float, str, bool, type(None)))
                  else repr(v)) for key, v in values.items()}


# --- the run ------------------------------------------------------------------------------------------------------


def gpunn_threads(row: Settings, data: Data, backend: Backend) -> int:
    """The threads gpunn's step uses for this row (its name says: "..., 2 threads"), else the usable cores."""
    arch = Architecture((784, *row.hidden, 10))
    columns = row.config(0).batch_columns(len(data.split.y_train))
    found = re.search(r"(\d+) threads?\b", backend.step(arch, dtype="float32", columns=columns).name)
    return int(found[1]) if found else usable_cores()


@contextmanager
def threads_held(threads: int) -> Iterator[None]:
    """BLAS (NumPy's, scikit-learn's) and torch's intra-op pool held to ``threads`` for a peer's run.

    The peers get the threads gpunn's step takes for the row: 1 for mini-batches, where gpunn's step runs on one
    thread, the cores for full batches. On this shared 2-core machine a second BLAS thread made scikit-learn's
    batches of 200 twelve times slower (3.2 s an epoch instead of 0.27), each tiny product waiting for a thread the
    other work holds."""
    torch = sys.modules.get("torch")
    saved = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=threads):
        if torch is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            if torch is not None and saved is not None:
                torch.set_num_threads(saved)


def measure_row(row: Settings, data: Data, seeds: list[int], backend: Backend,
                echo: Callable[[str], None]) -> tuple[list[Implementation], int]:
    """Every implementation of the row, seed by seed (all of seed 0, then all of seed 1, ...), and the threads the
    peers were given."""
    impls = [Implementation(name, IMPLEMENTATIONS[name][0]) for name in ("gpunn", *row.peers)]
    threads = gpunn_threads(row, data, backend)
    if any(name == "torch" for name in row.peers):
        try:
            import torch  # noqa: F401  (imported here so that threads_held sets its pool before the first run)
        except ImportError:
            pass
    for seed in seeds:
        for impl in impls:
            if impl.status != "ok":
                continue
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                # gpunn runs as `gpunn train` does, choosing its own threads; a peer gets as many
                with nullcontext() if impl.name == "gpunn" else threads_held(threads):
                    params, extra = IMPLEMENTATIONS[impl.name][1](row, data, seed, backend, impl)
            except Unavailable as reason:
                impl.status = f"unavailable: {reason}"
                echo(f"  {row.id}  {impl.name}: {impl.status}")
                continue
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if impl.name != "gpunn":
                impl.settings["threads"] = threads
            own = extra.pop("own_test_accuracy", None)
            run = Run(seed, score(params, data.X_test_float, data.split.y_test), wall, cpu, own, extra)
            impl.runs.append(run)
            echo(f"  {row.id}  seed {seed}  {impl.name:12s} test {run.test_accuracy:.2%}  "
                 f"({wall:.1f} s wall, {cpu:.1f} s CPU)")
    return impls, threads


def row_command(base: list[str], row: Settings) -> str:
    """The script's command restricted to this row (the options that select rows removed, the row's added)."""
    kept, skip = [], False
    for arg in base:
        if skip:
            skip = False
            continue
        if arg in ("--rows", "--name", "--out-dir"):
            skip = True
            continue
        if arg.startswith(("--rows=", "--name=", "--out-dir=")):
            continue
        kept.append(arg)
    return " ".join(["python", *kept, "--rows", row.id])


def percent(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f} %" if sd is None else f"{100 * value:.2f} ± {100 * sd:.2f} %"


def accuracy_cell(impl: dict[str, Any]) -> str:
    if impl["status"] != "ok":
        return impl["status"]
    seeds = [run["seed"] for run in impl["runs"]]
    return percent(impl["mean"], impl["sd"]) + ("" if len(seeds) > 1 else f" (seed {seeds[0]} only)")


def markdown(result: dict[str, Any]) -> str:
    data, seeds = result["data"], result["seeds"]
    lines = [
        f"# Test accuracy beside the peers, same network and settings, one run: {result['name']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Data: {data['source']}: {data['train']:,} training digits (gpunn's split, seed {SPLIT_SEED}; every "
        f"implementation trains on these), {data['val']:,} validation digits (gpunn's progress report only), "
        f"{data['test']:,} test digits ({data['test_note']}). Pixels / 255 in float32 for all.",
        "",
        f"Seeds: {', '.join(map(str, seeds))} (each sets the initial weights and the batch order; gpunn's split stays "
        f"seed {SPLIT_SEED}). Accuracy: mean ± sample standard deviation over the seeds, every implementation's final "
        "weights scored by the same float64 forward pass on the same test digits.",
        "",
        "| network | settings | gpunn | peers (same network, same settings) | command |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for row in result["rows"]:
        impls = {impl["name"]: impl for impl in row["implementations"]}
        peers = "; ".join(f"{impl['label']}: {accuracy_cell(impl)}"
                          for impl in row["implementations"] if impl["name"] != "gpunn")
        # `gpunn train` reproduces gpunn's seed-0 run on the IDX files (its --seed would also reshuffle the split);
        # the sample's held-out test digits are this script's own, so there is no such command for them
        options = "" if row["gpunn_options"] == "(defaults)" else f" {row['gpunn_options']}"
        alone = (f"; gpunn alone, seed 0: `gpunn train --data-dir {data['dir']} --device cpu{options}`"
                 if data["dir"] else "")
        lines.append(f"| {row['network']} | {row['settings_text']} | {accuracy_cell(impls['gpunn'])} | {peers} "
                     f"| `{row['command']}`{alone} |")
    notes = [f"- {row['id']}: {row['seeds_note']} (`--every-seed` runs them all)." for row in result["rows"]
             if row["seeds_note"]]
    lines += ["", *notes, *([""] if notes else []),
              "Per seed, and the time of one run (informational: the machine was shared, see the load below):", "",
              "| row | implementation | test accuracy per seed (%) | mean ± sd (min–max) | wall s per run "
              "| CPU s per run | threads | still differs from gpunn's run by |",
              "| --- | --- | --- | --- | ---: | ---: | --- | --- |"]
    for row in result["rows"]:
        for impl in row["implementations"]:
            if impl["status"] != "ok":
                lines.append(f"| {row['id']} | {impl['label']} | {impl['status']} | | | | | |")
                continue
            runs = impl["runs"]
            per_seed = ", ".join(f"{100 * r['test_accuracy']:.2f}" for r in runs)
            spread = percent(impl["mean"], impl["sd"]) + f" ({100 * impl['min']:.2f}–{100 * impl['max']:.2f})"
            wall = statistics.fmean(r["wall_s"] for r in runs)
            cpu = statistics.fmean(r["cpu_s"] for r in runs)
            threads = impl["settings"].get("step", "") if impl["name"] == "gpunn" else impl["settings"]["threads"]
            differs = "; ".join(impl["differs"]) or "–"
            lines.append(f"| {row['id']} | {impl['label']} | {per_seed} | {spread} | {wall:.1f} | {cpu:.1f} "
                         f"| {threads} | {differs} |")
    lines += ["", "How the settings map (every setting of every implementation is in the JSON):", ""]
    lines += [f"- {line}" for line in result["mapping"]]
    check = result["l2_check"]
    if check is not None:
        lines.append(f"- The L2 mapping, measured: on {check['samples']} training digits and the same weights, "
                     f"scikit-learn's loss with alpha {check['alpha']:g} is {check['sklearn_loss']:.12f}, gpunn's "
                     f"cost with λ = alpha {check['gpunn_loss_lambda_eq_alpha']:.12f} (of which L2 "
                     f"{check['gpunn_l2_term']:.6f}): relative difference {check['relative_difference']:.1e}.")
    load = result["load_average"]
    lines += ["", "Machine:", "", *machine_lines(result["machine"]),
              f"- scikit-learn {result['versions']['sklearn'] or 'not installed'}, "
              f"torch {result['versions']['torch'] or 'not installed'}",
              f"- load average (1, 5, 15 min) at the start {load['start']}, at the end {load['end']}, on "
              f"{result['machine']['usable_cores']} usable cores; whole run {result['wall_s']:.0f} s", ""]
    return "\n".join(lines)


def mapping(rows: list[Settings], m: int) -> list[str]:
    """How each peer's settings map onto gpunn's, in words, for ``m`` training digits."""
    batches = sorted({row.batch_size for row in rows if row.batch_size is not None and row.batch_size < m})
    split = "; ".join(f"{m:,} = {m // b:,} × {b}" + (f" + {m % b}" if m % b else "") for b in batches)
    return [
        "L2: gpunn's `--l2` λ adds (λ / 2m) Σ‖W‖² to the mean cross-entropy, m the batch's size, biases exempt. "
        "scikit-learn's loss adds (alpha / 2) Σ‖W‖² / n, n the batch's sample count, biases exempt, and its gradient "
        "alpha W / n (`_backprop`, `_compute_loss_grad`): so alpha = λ exactly (its default 1e-4 is `--l2 1e-4`). "
        "PyTorch: the same term added to the loss by hand (its `weight_decay` would add λW without the 1/m, and to "
        "the biases too).",
        "Epochs: scikit-learn `max_iter` = the row's epochs and `n_iter_no_change` = max_iter (`tol` 1e-4), so its "
        "stop on a stalled training loss (active even without `early_stopping`, which is off) cannot fire; no "
        "implementation stops early.",
        "Adam: β1 0.9, β2 0.999, ε 1e-8 in all three; PyTorch's formula is gpunn's, scikit-learn adds ε before the "
        "bias correction. Batches: shuffled every epoch, the last one the remainder, in all three"
        + (f" ({split})" if split else "") + ". Schedule: PyTorch follows gpunn's per-epoch cosine with LambdaLR; "
        "scikit-learn's Adam has no schedule, so it sits in the constant-rate rows only.",
        "Initial weights: PyTorch and the notebook program start from gpunn's own (He normal, zero biases, drawn by "
        "`gpunn.init_params` from the seed); scikit-learn from its own Glorot uniform, as a user's MLPClassifier does.",
        "Threads: gpunn picks its own (its step's name says how many); each peer gets as many: BLAS through "
        "threadpoolctl, torch through `set_num_threads`.",
    ]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="MNIST's four IDX files; default: the bundled sample, with --test-size digits held out as test.")
@click.option("--rows", default=",".join(ROW_IDS), show_default=True, help="Rows to run, comma-separated.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Training seeds, comma-separated.")
@click.option("--every-seed", is_flag=True,
              help="Run every row on every seed (the 500-epoch full-batch row otherwise runs the first only).")
@click.option("--epochs", "epoch_overrides", multiple=True, metavar="ROW=N",
              help="Run ROW for N epochs instead of its own (for toy runs; repeatable).")
@click.option("--test-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Digits held out as the test set when the data have no test part (the bundled sample).")
@click.option("--out-dir", type=click.Path(path_type=Path), help=f"Write NAME.json and NAME.md here [default with "
              f"--name: {DEFAULT_OUT_DIR}].")
@click.option("--name", help=f"File name stem of the results [default with --out-dir: {DEFAULT_NAME}].")
def main(data_dir: Path | None, rows: str, seeds: str, every_seed: bool, epoch_overrides: tuple[str, ...],
         test_size: int, out_dir: Path | None, name: str | None) -> None:
    """Train each row's network with gpunn and its peers on the same digits, and score all on the same test set."""
    by_id = {row.id: row for row in ROWS}
    chosen = []
    for row_id in rows.split(","):
        if row_id not in by_id:
            raise click.BadParameter(f"unknown row {row_id!r}; expected some of {', '.join(ROW_IDS)}",
                                     param_hint="--rows")
        chosen.append(by_id[row_id])
    for override in epoch_overrides:
        row_id, _, count = override.partition("=")
        if row_id not in by_id or not count.isdigit() or int(count) < 1:
            raise click.BadParameter(f"{override!r}: expected ROW=N, ROW one of {', '.join(ROW_IDS)}",
                                     param_hint="--epochs")
        chosen = [replace(row, epochs=int(count)) if row.id == row_id else row for row in chosen]
    seed_list = [int(seed) for seed in seeds.split(",")]

    start = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    backend = get_backend("cpu")
    data = load_data(data_dir, test_size)
    click.echo(f"data: {data.source}: {data.split.sizes()}")
    base = [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]
    result: dict[str, Any] = {
        "name": name or DEFAULT_NAME,
        "command": "python " + " ".join(base),
        "data": {"source": data.source, "dir": None if data_dir is None else data_dir.as_posix(),
                 "train": len(data.split.y_train), "val": len(data.split.y_val), "test": len(data.split.y_test),
                 "test_note": data.note, "split_seed": SPLIT_SEED,
                 "scaling": "float32 pixels / 255 for every implementation"},
        "seeds": seed_list,
        "scorer": "float64 forward pass of the final weights (gpunn's layout), argmax of the logits, on the test "
                  "digits",
        "spread": "sample standard deviation over the seeds (null for one seed)",
        "mapping": mapping(chosen, len(data.split.y_train)),
        "l2_check": check_l2_mapping(data),
        "rows": [],
    }
    for row in chosen:
        click.echo(f"{row.id}: {row.network}, {row.text()}")
        row_seeds = seed_list if every_seed or row.max_seeds is None else seed_list[:row.max_seeds]
        impls, threads = measure_row(row, data, row_seeds, backend, click.echo)
        result["rows"].append({
            "id": row.id, "network": row.network, "settings": {**asdict(row), "hidden": list(row.hidden)},
            "settings_text": row.text(), "why": row.why, "gpunn_options": row.gpunn_options(),
            "command": row_command(base, row), "seeds": row_seeds,
            "seeds_note": "" if row_seeds == seed_list else row.max_seeds_why,
            "peer_threads": threads,
            "implementations": [{**asdict(impl), **impl.summary()} for impl in impls],
        })
    result["wall_s"] = time.perf_counter() - start
    result["load_average"] = {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}
    result["machine"] = machine([backend], torch_used=True)
    result["versions"] = {"sklearn": _version("sklearn"), "torch": _version("torch"), "gpunn": gpunn.__version__,
                          "numpy": np.__version__}
    table = markdown(result)
    click.echo("")
    click.echo(table)
    if name is not None or out_dir is not None:
        folder = out_dir or DEFAULT_OUT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / result["name"]
        Path(f"{stem}.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        Path(f"{stem}.md").write_text(table)
        click.echo(f"wrote {stem}.json, {stem}.md")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
