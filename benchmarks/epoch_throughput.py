"""Steady-state time of one full-batch epoch: gpunn on every device present, beside what a user would run instead,
compared interleaved in one run.

    python benchmarks/epoch_throughput.py                        # synthetic data of MNIST's shape, m = 60,000
    python benchmarks/epoch_throughput.py --data-dir DIR         # real MNIST training images
    python benchmarks/epoch_throughput.py --m 512 --hidden 10 --rounds 3 --out-dir /tmp/b   # toy size
    python benchmarks/epoch_throughput.py --devices cuda --dtypes float32 --precision tf32  # tensor-core GEMMs

The runs fall into groups, one per device, dtype and hidden size. In a group, every implementation (gpunn's
variants, from gpunn_variants(), and the peers of benchmarks/peers/) is first checked to compute gpunn's step (its
loss after 3 epochs from the same initial weights must match gpunn's), then built at full size and warmed up. Then
come rounds: in each round every implementation runs one timed slot of k epochs, in an order that rotates from round
to round, so that a drift of the machine's load falls on all of them alike. Per implementation the script reports
the min and the median over the rounds, and in each round its time over gpunn's in the same round. The machine's own
read bandwidth and GEMM rate give each row a lower bound (X read once; 3196·h·m FLOPs per epoch for one hidden
layer of h units), and the ratio to it.

``--precision tf32`` or ``bf16`` (float32 only, on CUDA): every implementation's float32 matrix products may run on
tensor cores, gpunn's as `gpunn train --precision` runs them (its generic math refuses, and says so), PyTorch's as
``torch.set_float32_matmul_precision`` lets them ("high": TF32, "medium": bfloat16 where its cuBLAS calls take it);
the check of each step against gpunn's allows for the inputs' rounding, and the bound's GEMM rate is that of
gpunn's own cuBLAS call in that precision.

Writes NAME.json (machine, command, every slot's time and order), NAME.md (the table) and, with matplotlib,
NAME.png.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the peers package beside this script

import gpunn  # noqa: E402
from gpunn import diagnostics  # noqa: E402
from gpunn.backend import Backend, NumpyBackend, get_backend  # noqa: E402
from gpunn.errors import BackendError, ConfigError  # noqa: E402
from gpunn.model import Preprocessing  # noqa: E402
from gpunn.nn import PRECISIONS, Architecture, Layer, cost, forward, init_params, one_hot  # noqa: E402
from gpunn.optim import Optimizer  # noqa: E402
from gpunn.train import DeviceData, Epochs, TrainConfig, dtype_label, train_step  # noqa: E402

CHECK_EPOCHS = 3
#: epochs a whole-epoch runner is built for (its learning-rate table); GpunnRunner starts it over after as many
RUNNER_EPOCHS = 2**16
CHECK_SAMPLES = 1024
LR = 0.1
#: how far a step's loss after CHECK_EPOCHS epochs may be from gpunn's, relative: float32's and float64's rounding,
#: or a reduced precision's (its GEMMs' inputs keep 10 or 7 mantissa bits; gpunn's and a peer's round differently)
CHECK_RTOL = {"float64": 1e-9, "float32": 1e-4, "tf32": 2e-3, "bf16": 1e-2}


class Peer(NamedTuple):
    module: str  # in benchmarks/peers/
    factory: str  # make(images, labels, params, *, lr, dtype, device) -> runner
    devices: tuple[str, ...]  # device kinds it runs on; its dtypes are the module's DTYPES


PEERS = {
    "numpy-naive": Peer("peers.naive_numpy", "make", ("cpu",)),
    "torch-eager": Peer("peers.torch_step", "make", ("cpu", "cuda")),
    "torch-compile": Peer("peers.torch_step", "make_compiled", ("cpu", "cuda")),
    "torch-graph": Peer("peers.torch_step", "make_graphed", ("cuda",)),
}
#: implementations with a fixed colour in every figure; others get one from their name's hash
KNOWN = ("gpunn", "gpunn-generic", *PEERS, "gpunn-fused-blas")


def gpunn_variants(device: str) -> list[tuple[str, Backend]]:
    """gpunn's implementations to time on ``device``, named; the first is gpunn with its fast path (as `gpunn train`
    runs it by default).

    A later one is timed only where its step differs from the first's (Backend.step(...).name), and it must agree
    with the first like a peer. One line per variant: a named backend that makes a different step decision.
    """
    variants = [("gpunn", get_backend(device, fast=True))]
    if device == "cpu":
        variants.append(("gpunn-fused-blas", _FusedBlasEverywhere(fast=True)))
    variants.append(("gpunn-generic", get_backend(device, fast=False)))
    return variants


class _FusedBlasEverywhere(NumpyBackend):
    """The CPU with the fused BLAS pass for every ReLU network: the single pass's rival, timed beside it (the
    backend takes the single pass up to NumpyBackend.SINGLE_PASS_MAX_HIDDEN hidden units, measured here)."""

    SINGLE_PASS_MAX_HIDDEN = 0


@dataclass
class Row:
    device: str
    dtype: str
    hidden: int
    implementation: str
    status: str = "ok"  # ok | refused: ... | failed: ...
    precision: str = "float32"  # what float32 matrix products compute in (gpunn.nn.PRECISIONS)
    step: str | None = None  # gpunn's variants: the step the backend chose (Backend.step(...).name)
    first_epoch_ms: float | None = None  # the first epoch after building, apart (context creation, compilation)
    epochs_per_slot: int = 0  # k: epochs in each timed slot
    epoch_ms: list[float] = field(default_factory=list)  # per round: the slot's time / k
    ratio_to_gpunn: list[float] = field(default_factory=list)  # per round: epoch_ms over gpunn's in that round
    min_ms: float | None = None
    median_ms: float | None = None
    ratio_median: float | None = None
    ratio_min: float | None = None
    ratio_max: float | None = None
    check_loss: float | None = None
    reference_loss: float | None = None
    bound_ms: float | None = None

    def summarize(self) -> None:
        self.min_ms, self.median_ms = min(self.epoch_ms), statistics.median(self.epoch_ms)
        ratios = self.ratio_to_gpunn
        self.ratio_median, self.ratio_min, self.ratio_max = statistics.median(ratios), min(ratios), max(ratios)


@dataclass(frozen=True)
class Rounds:
    """How the timed rounds of a group run.

    ``rounds`` rounds at most; fewer, but at least ``min_rounds``, when the next round would take the group's
    rounds past ``group_seconds``. A slot is k epochs, k the smallest count that lasts ``slot_ms`` (one epoch when an
    epoch alone lasts that long): a slot's first epoch starts cold (the other implementations' data in the caches,
    threads waking after the rest), while the epochs of a training run follow one another, so a slot must be long
    beside one cold start. Measured with gpunn's 784-10-10 epoch on MNIST, 2 cores: 7.6 ms min and 9.2 median with
    slots of 20 ms (k = 2) against 4.2 and 5.2 with slots of 200 ms (k = 27), in one session; and in two runs of the
    whole group minutes apart on another day, 5.06 and 6.35 with slots of 200 ms (k = 30) against 4.77 and 5.70 with
    slots of 1 s (k = 193), where a training run's epochs took 4.6-4.8 ms (median of its 500). In a slot's first
    epochs the pixels come back into the caches the other implementations' data took. ``settle_ms``: a pause after
    each slot, untimed, so that the threads one implementation leaves spinning are asleep when the next one starts:
    OpenBLAS's worker threads spin for about 0.1 s after its last call (measured on the 2-core machine: half a
    core's time over that 0.1 s, nothing after).
    """

    rounds: int = 7
    min_rounds: int = 3
    group_seconds: float = 60.0
    slot_ms: float = 1000.0
    settle_ms: float = 150.0


# --- what is timed --------------------------------------------------------------------------------------------


class GpunnRunner:
    """gpunn's own training step, as `gpunn train` runs it (loss and accuracy computed on the device included), with
    the backend's step for ``columns`` samples (default: the data's), so that the equivalence check on a few samples
    runs the very step that is timed on all of them. Where the step runs whole epochs itself (``Step.epochs``: the
    CUDA graph of a full-batch epoch), an epoch is that runner's, as in `gpunn train`: one replay, its metrics row
    written on the device.

    The step's gradient pass and update rule are made once, and entered only while the runner is :meth:`active`:
    a fast path may change process-wide settings while entered (the fused CPU pass sets BLAS to one thread), which
    must not reach the other implementations' slots.
    """

    def __init__(self, images, labels, params, *, lr, dtype, backend: Backend, columns: int | None = None,
                 precision: str = "float32"):
        self.backend = backend
        self.arch = Architecture((images.shape[1], *(W.shape[0] for W, _ in params[:-1]), 10))
        self.rule = Optimizer("gd")
        self.precision = precision
        step = backend.step(self.arch, dtype=dtype, columns=columns or len(labels), precision=precision)
        self.step_name = step.name
        self.data = DeviceData.from_host(np.ascontiguousarray(images.T), labels, backend=backend, dtype=dtype,
                                         preprocessing=None if step.pixels else Preprocessing())
        self.weights = [Layer(backend.asarray(W.astype(dtype)), backend.asarray(b.astype(dtype))) for W, b in params]
        self.lr = lr
        self._step = step
        self.gradients = self.update = None
        self._scope = ExitStack()
        self._epochs = self._open_epochs(dtype)
        # the step's gradient pass and update rule, for steps called from Python: made only where no runner of
        # whole epochs runs them (a fast path's pass may hold buffers from the moment it is made)
        self._contexts = [] if self._epochs is not None else [_Reenterable(step.gradients),
                                                              _Reenterable(lambda: step.update(self.rule))]

    def _open_epochs(self, dtype: str) -> Any:
        """The step's whole-epoch runner, entered and loaded with the weights, or None where it has none. It stays
        entered until :meth:`close` (leaving it drops its CUDA graph) and changes no process-wide setting."""
        if self._step.epochs is None:
            return None
        config = TrainConfig(hidden=self.arch.sizes[1:-1], dtype=dtype, epochs=RUNNER_EPOCHS, lr=self.lr,
                             precision=self.precision)
        runner = self._step.epochs(config, self.data, None, Epochs.CAPACITY)
        if runner is not None:
            self._scope.enter_context(runner)
            runner.load(self.weights, {}, epochs_done=0)
            self._epoch = 0
        return runner

    def close(self) -> None:
        self._scope.close()
        self._epochs = None

    @contextmanager
    def active(self) -> Iterator[None]:
        if self._epochs is not None:
            yield
            return
        with ExitStack() as scope:
            self.gradients, self.update = (scope.enter_context(context) for context in self._contexts)
            try:
                yield
            finally:
                self.gradients = self.update = None

    def step(self) -> None:
        if self._epochs is not None:
            if self._epoch == RUNNER_EPOCHS:  # its learning-rate table is spent: start it over where it stands
                self._epochs.load(*self._epochs.state(), epochs_done=0)
                self._epoch = 0
            self._epoch += 1
            self._epochs.run(self._epoch)
            return
        if self.gradients is None:
            raise RuntimeError("GpunnRunner.step outside active()")
        self.weights, _, _, _ = train_step(self.weights, {}, self.data, self.arch, lr=self.lr, t=1, rule=self.rule,
                                           gradients=self.gradients, update=self.update)

    def sync(self) -> None:
        self.backend.synchronize()

    def params(self) -> list[tuple[np.ndarray, np.ndarray]]:
        weights = self.weights if self._epochs is None else self._epochs.state()[0]
        return [(self.backend.to_numpy(W), self.backend.to_numpy(b)) for W, b in weights]


class _Reenterable:
    """One of a Step's context managers, made once and entered again for every slot (a fast path keeps its buffers
    and any index it built from the data); made anew only when it cannot be entered twice (a generator-based one)."""

    def __init__(self, make: Callable[[], Any]):
        self.make, self.manager, self.entered = make, make(), False

    def __enter__(self) -> Any:
        if self.entered:
            try:
                return self._enter()
            except (AttributeError, RuntimeError, TypeError):  # contextlib's single-use managers
                self.manager = self.make()
        return self._enter()

    def _enter(self) -> Any:
        value = self.manager.__enter__()
        self.entered = True
        return value

    def __exit__(self, *exc_info: Any) -> Any:
        return self.manager.__exit__(*exc_info)


def active(runner: Any):
    """The runner's slot context: gpunn's step entered; nothing for the peers, which hold nothing process-wide."""
    return getattr(runner, "active", nullcontext)()


def time_epochs(runner: Any, epochs: int) -> float:
    """Seconds of ``epochs`` epochs, the device synchronized before the first clock read and before the second."""
    runner.sync()
    start = time.perf_counter()
    for _ in range(epochs):
        runner.step()
    runner.sync()
    return time.perf_counter() - start


def timed_slot(runner: Any, epochs: int) -> float:
    """One slot: the runner's step entered, the garbage collector run before and held off while the clock runs."""
    with active(runner):
        gc.collect()
        gc.disable()
        try:
            return time_epochs(runner, epochs)
        finally:
            gc.enable()


#: calibration runs of the final epoch count: the fastest of them sets k
CALIBRATION_RUNS = 3


def epochs_per_slot(runner: Any, slot_seconds: float) -> int:
    """k: the epochs a slot needs to last ``slot_seconds``, from untimed runs of 1, then more epochs (as timeit's
    autorange) until a run lasts a quarter of a slot; that many epochs are run CALIBRATION_RUNS times in all, and the
    fastest run sets k. The first such run starts cold (measured: a k of 17 for gpunn's 7 ms epochs, whose slots then
    lasted 125 ms), and too small a k makes slots shorter than ``slot_seconds`` and their cold starts weigh more."""
    epochs = 1
    while True:
        seconds = timed_slot(runner, epochs)
        if seconds >= slot_seconds / 4 or epochs >= 1_000_000:
            seconds = min([seconds] + [timed_slot(runner, epochs) for _ in range(CALIBRATION_RUNS - 1)])
            return max(1, math.ceil(slot_seconds * epochs / seconds))
        epochs = min(epochs * 100, max(epochs * 2, math.ceil(epochs * slot_seconds / 4 / max(seconds, 1e-7))))


def reference_loss(params: list[tuple[np.ndarray, np.ndarray]], images: np.ndarray, labels: np.ndarray) -> float:
    """The cross-entropy of ``params`` on the data, computed by gpunn's math in float64 on the host."""
    weights = [Layer(W.astype(np.float64), b.astype(np.float64)) for W, b in params]
    arch = Architecture((images.shape[1], *(W.shape[0] for W, _ in params[:-1]), 10))
    X = np.ascontiguousarray(images.T) / 255.0
    return float(cost(forward(weights, X, arch).Z[-1], one_hot(labels, 10, np.float64)))


def loss_after_steps(make: Callable[..., Any], images, labels, params, *, dtype: str, **kwargs) -> float:
    """Run ``make``'s runner for CHECK_EPOCHS epochs from ``params`` and return the loss of its new weights."""
    runner = make(images, labels, params, lr=LR, dtype=dtype, **kwargs)
    try:
        with active(runner):
            for _ in range(CHECK_EPOCHS):
                runner.step()
            runner.sync()
        return reference_loss(runner.params(), images, labels)
    finally:
        getattr(runner, "close", lambda: None)()


def arithmetic(dtype: str, precision: str = "float32") -> str:
    """What sets a step's rounding and its GEMMs' rate: a reduced ``precision`` where there is one, else the dtype
    (the key of CHECK_RTOL and of the limits' GEMM rates)."""
    return dtype if precision == "float32" else precision


def same_step(loss: float, reference: float, dtype: str, precision: str = "float32") -> bool:
    """Do two losses after CHECK_EPOCHS epochs agree within the rounding of ``dtype`` (or of ``precision``'s GEMMs)?"""
    return abs(loss - reference) <= CHECK_RTOL[arithmetic(dtype, precision)] * abs(reference)


def verdict(loss: float, reference: float, dtype: str, precision: str = "float32") -> str:
    """A row's status after the check: "ok" when its loss matches gpunn's, else why it is refused."""
    if same_step(loss, reference, dtype, precision):
        return "ok"
    return (f"refused: its loss after {CHECK_EPOCHS} epochs is {loss:.8g}, gpunn's {reference:.8g}: it does not "
            "compute the same step")


def failure(error: BaseException) -> str:
    return f"failed: {type(error).__name__}: {' '.join(str(error).split())[:200]}"


# --- one group: check, build, warm up, rounds -----------------------------------------------------------------


@dataclass
class Candidate:
    """An implementation of a group: ``make(images, labels, params, *, lr, dtype, columns) -> runner``."""

    name: str
    make: Callable[..., Any]
    step: str | None = None


def candidates_for(backend_name: str, arch: Architecture, dtype: str, m: int, peers: list[str],
                   variants: list[tuple[str, Backend]], precision: str = "float32"
                   ) -> tuple[list[Candidate], list[Row]]:
    """The implementations of a group, gpunn first, and rows for what cannot run here: peers not installed, and
    gpunn's variants whose step refuses the precision (the generic math computes in float32 only)."""
    kind = backend_name.split(":")[0]
    gpunn_step = None
    candidates, unavailable, refused = [], [], []
    for name, backend in variants:
        try:
            step = backend.step(arch, dtype=dtype, columns=m, precision=precision).name
        except ConfigError as error:
            refused.append(Row(backend_name, dtype, arch.sizes[1], name, status=f"refused: {error}",
                               precision=precision))
            continue
        if gpunn_step is None:
            gpunn_step = step
        elif step == gpunn_step:
            continue  # the same step as gpunn's here: nothing to compare
        candidates.append(Candidate(name, lambda *a, _b=backend, **k: GpunnRunner(*a, **k, backend=_b,
                                                                                  precision=precision), step))
    for name in peers:
        peer = PEERS[name]
        module = import_module(peer.module)
        if kind not in peer.devices or dtype not in module.DTYPES:
            continue
        if not module.AVAILABLE:
            unavailable.append(name)
            continue
        factory = getattr(module, peer.factory)
        # a reduced precision is asked of the peers that take one (PyTorch's); the others are left out of its runs
        if precision != "float32" and not getattr(module, "PRECISIONS", False):
            continue
        extra = {} if precision == "float32" else {"precision": precision}
        candidates.append(Candidate(name, lambda *a, _f=factory, _x=extra, columns=None, **k:
                                    _f(*a, **k, **_x, device=backend_name)))
    rows = [Row(backend_name, dtype, arch.sizes[1], name, status="failed: not installed", precision=precision)
            for name in unavailable]
    return candidates, refused + rows


def run_group(device: str, dtype: str, hidden: int, candidates: list[Candidate], images: np.ndarray,
              labels: np.ndarray, params: list[tuple[np.ndarray, np.ndarray]], rounds: Rounds, *,
              bound_ms: float | None = None, echo: Callable[[str], None] = lambda _: None, precision: str = "float32"
              ) -> tuple[list[Row], dict[str, Any]]:
    """Check, build, warm up and time ``candidates`` (gpunn first) interleaved; their rows and the group's record."""
    m = len(labels)
    check_images, check_labels = images[:CHECK_SAMPLES], labels[:CHECK_SAMPLES]
    rows = [Row(device, dtype, hidden, c.name, precision=precision, step=c.step, bound_ms=bound_ms)
            for c in candidates]
    runners: dict[str, Any] = {}
    reference = None
    for candidate, row in zip(candidates, rows):
        try:
            row.check_loss = loss_after_steps(candidate.make, check_images, check_labels, params, dtype=dtype,
                                              columns=m)
        except Exception as error:  # a peer that cannot run here (no compiler for torch.compile, ...) is reported
            row.status = failure(error)
            if reference is None:  # gpunn itself: nothing to compare against
                break
            continue
        if reference is None:
            reference = row.check_loss
        row.reference_loss = reference
        row.status = verdict(row.check_loss, reference, dtype, precision)
    for candidate, row in zip(candidates, rows):
        if rows[0].status != "ok":
            break
        if row.status != "ok":
            continue
        try:
            runner = candidate.make(images, labels, params, lr=LR, dtype=dtype, columns=m)
            row.first_epoch_ms = timed_slot(runner, 1) * 1e3
            row.epochs_per_slot = epochs_per_slot(runner, rounds.slot_ms / 1e3)
            runners[row.implementation] = runner
        except Exception as error:
            row.status = failure(error)
        runner = None
    order = [row for row in rows if row.implementation in runners]
    record: dict[str, Any] = {"device": device, "dtype": dtype, "precision": precision, "hidden": hidden,
                              "implementations": [row.implementation for row in order], "order": [],
                              "rounds": 0, "seconds": 0.0, "stopped_by": "rounds", "load_before": load_average(),
                              "load_after": None}
    if rows and rows[0].status != "ok":
        return _without_gpunn(rows, record, echo)
    time.sleep(rounds.settle_ms / 1e3)  # after the last calibration, as after every slot
    start = time.perf_counter()
    slots: dict[str, list[float]] = {row.implementation: [] for row in order}
    for r in range(rounds.rounds):
        live = [row for row in order if row.status == "ok"]
        turn = live[r % len(live):] + live[:r % len(live)]
        record["order"].append([row.implementation for row in turn])
        for row in turn:
            try:
                slots[row.implementation].append(timed_slot(runners[row.implementation], row.epochs_per_slot))
            except Exception as error:
                row.status = failure(error)
                slots[row.implementation].append(float("nan"))
            time.sleep(rounds.settle_ms / 1e3)
        record["rounds"] = done = r + 1
        record["seconds"] = elapsed = time.perf_counter() - start
        record["load_after"] = load_average()
        if rows[0].status != "ok":
            break
        if done < rounds.rounds and done >= min(rounds.min_rounds, rounds.rounds) and \
                elapsed * (done + 1) / done > rounds.group_seconds:
            record["stopped_by"] = "group-seconds"
            break
    for runner in runners.values():
        getattr(runner, "close", lambda: None)()
    runners.clear()
    gc.collect()
    if rows[0].status != "ok":
        return _without_gpunn(rows, record, echo)
    gpunn_ms = [s / rows[0].epochs_per_slot * 1e3 for s in slots[rows[0].implementation]]
    for row in order:
        if row.status != "ok":
            continue
        row.epoch_ms = [s / row.epochs_per_slot * 1e3 for s in slots[row.implementation]]
        row.ratio_to_gpunn = [t / g for t, g in zip(row.epoch_ms, gpunn_ms)]
        row.summarize()
    _echo_group(rows, record, echo)
    return rows, record


def _echo_group(rows: list[Row], record: dict[str, Any], echo: Callable[[str], None]) -> None:
    device, hidden = record["device"], record["hidden"]
    dtype = dtype_label(record["dtype"], record.get("precision", "float32"))
    echo(f"{device:>7} {dtype} h={hidden:<5} {record['rounds']} rounds in {record['seconds']:.1f} s "
         f"(stopped by --{record['stopped_by']}; load average {record['load_before']} -> {record['load_after']})")
    for row in rows:
        if row.status == "ok":
            echo(f"        {row.implementation:<14} min {row.min_ms:9.2f}  median {row.median_ms:9.2f} ms/epoch  "
                 f"x gpunn {row.ratio_median:5.2f} ({row.ratio_min:.2f}-{row.ratio_max:.2f})  "
                 f"k = {row.epochs_per_slot}, first epoch {row.first_epoch_ms:.1f} ms")
        else:
            echo(f"        {row.implementation:<14} {row.status}")


def _without_gpunn(rows: list[Row], record: dict[str, Any], echo: Callable[[str], None]
                   ) -> tuple[list[Row], dict[str, Any]]:
    """gpunn's own row failed: the others have nothing to be compared with."""
    for row in rows[1:]:
        if row.status == "ok":
            row.status = "failed: gpunn's own row failed, so nothing to compare with"
    for row in rows:
        row.epoch_ms, row.ratio_to_gpunn = [], []
    _echo_group(rows, record, echo)
    return rows, record


# --- the machine's limits -------------------------------------------------------------------------------------


def measure_limits(backend: Backend, dtypes: list[str], *, size: int, precision: str = "float32") -> dict[str, float]:
    """Read bandwidth (bytes/s) and GEMM rate (FLOP/s per dtype, and in a reduced ``precision``), best of a few runs,
    on ``backend``."""
    xp = backend.xp
    limits: dict[str, float] = {}
    rows = max(size // 4096, 1)
    big = xp.ones((rows, 4096), dtype=xp.float32, device=backend.device)
    right = xp.ones((4096,), dtype=xp.float32, device=backend.device)
    left = xp.ones((rows,), dtype=xp.float32, device=backend.device)
    # matrix-vector products read the matrix once with every core (NumPy's own sum would use one); the faster of
    # the two orientations is what a streaming pass over X can reach
    seconds = min(_best(lambda: big @ right, backend), _best(lambda: left @ big, backend))
    limits["read_bytes_per_s"] = big.size * 4 / seconds
    del big
    n = 2048 if not backend.is_cuda else 8192
    for dtype in dtypes:
        a = xp.ones((n, n), dtype=getattr(xp, dtype), device=backend.device)
        limits[f"gemm_flops_per_s_{dtype}"] = 2 * n**3 / _best(lambda: a @ a, backend)
    if precision != "float32":
        limits[f"gemm_flops_per_s_{precision}"] = _gemm_rate(backend, precision, n)
    return limits


def _gemm_rate(backend: Backend, precision: str, n: int) -> float:
    """FLOP/s of gpunn's own cuBLAS call (gpunn.fused_cuda.CupyDevice.gemm) on float32 (n, n) matrices in a reduced
    ``precision``: CuPy's ``@`` computes float32 products in float32."""
    from gpunn import fused_cuda

    device = fused_cuda.CupyDevice(backend.cupy)
    a = backend.cupy.ones((n, n), dtype=backend.cupy.float32)
    c = backend.cupy.empty_like(a)
    try:
        return 2 * n**3 / _best(lambda: device.gemm(c, a, a, precision=precision), backend)
    finally:
        device.close()


def _best(work: Callable[[], Any], backend: Backend, repeats: int = 5) -> float:
    work()
    backend.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        backend.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def lower_bound_ms(hidden: int, m: int, dtype: str, limits: dict[str, float], precision: str = "float32") -> float:
    """X (784 x m, in the dtype) read once, or the GEMM FLOPs 3196·h·m done at the rate measured for the dtype (or
    the reduced precision): the larger."""
    itemsize = np.dtype(dtype).itemsize
    read = 784 * m * itemsize / limits["read_bytes_per_s"]
    flops = 3196 * hidden * m / limits[f"gemm_flops_per_s_{arithmetic(dtype, precision)}"]
    return max(read, flops) * 1e3


# --- the machine, and reports ---------------------------------------------------------------------------------


def load_average() -> float | None:
    """The 1-minute load average (runnable threads, ours included), where the OS keeps one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine(backends: list[Backend], torch_used: bool) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, the BLAS libraries loaded (threadpoolctl), versions, GPUs."""
    from threadpoolctl import threadpool_info

    libraries = [{key: lib.get(key) for key in ("user_api", "internal_api", "version", "architecture",
                                                "threading_layer", "num_threads")}
                 | {"file": Path(lib.get("filepath", "")).name} for lib in threadpool_info()]
    described = {backend.name: backend.describe() for backend in backends}
    env: dict[str, Any] = {
        "cpu": diagnostics.cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": diagnostics.usable_cores(),
        "blas": [lib for lib in libraries if lib["user_api"] == "blas"],
        "openmp": [lib for lib in libraries if lib["user_api"] == "openmp"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "gpunn": gpunn.__version__,
        "devices": described,
        "gpus": {name: d for name, d in described.items() if name != "cpu"},
        "torch": None,
    }
    if torch_used:
        try:
            import torch
        except ImportError:
            return env
        config = torch.__config__.show()
        blas = re.search(r"BLAS_INFO=(\w+)", config)
        capability = re.search(r"CPU capability usage: (\w+)", config)
        env["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                        "blas": blas[1] if blas else None, "cpu_capability": capability[1] if capability else None,
                        "cuda": torch.version.cuda}
        if torch.cuda.is_available():
            env["torch"]["gpu"] = torch.cuda.get_device_name(0)
    return env


def machine_label(env: dict[str, Any]) -> str:
    """One line for titles: the CPU, its usable cores and BLAS kernel, and the GPUs."""
    blas = env["blas"][0] if env["blas"] else None
    cpu = f"{env['cpu']}, {env['usable_cores']} cores"
    if blas:
        cpu += f", {blas['internal_api']} {blas['architecture']}"
    gpus = [d.get("gpu", name).split(" (")[0] for name, d in env["gpus"].items()]
    return "; ".join([cpu, *gpus])


def machine_lines(env: dict[str, Any]) -> list[str]:
    lines = [f"- CPU: {env['cpu']}, {env['logical_cores']} logical cores, {env['usable_cores']} usable (affinity)"]
    for lib in env["blas"]:
        lines.append(f"- BLAS (threadpoolctl): {lib['internal_api']} {lib['version']}, kernel {lib['architecture']}, "
                     f"{lib['num_threads']} threads ({lib['threading_layer']}, {lib['file']})")
    lines.append(f"- Python {env['python']}, NumPy {env['numpy']}, gpunn {env['gpunn']}, {env['platform']}")
    torch = env.get("torch")
    if torch:
        lines.append(f"- torch {torch['version']}: {torch['threads']} threads, BLAS {torch['blas']}, "
                     f"CPU capability {torch['cpu_capability']}, CUDA {torch['cuda']}")
    else:
        lines.append("- torch: not used (no PyTorch peer asked for, or not installed)")
    for name, described in env["gpus"].items():
        lines.append(f"- {name}: " + ", ".join(v for k, v in described.items() if k != "device"))
    return lines


def markdown(result: dict[str, Any]) -> str:
    rows = [Row(**r) for r in result["rows"]]
    ok = [r for r in rows if r.status == "ok"]
    settings = result["rounds"]
    lines = [
        f"# Full-batch epoch time, interleaved: {result['name']}",
        "",
        f"Command: `{result['command']}`",
        "",
        *([f"**Interrupted** ({result['interrupted']}).", ""] if result.get("interrupted") else []),
        f"Data: {result['data']}, m = {result['m']:,}, 784-h-10, learning rate {LR}, plain gradient descent.",
        "",
        *machine_lines(result["machine"]),
        "",
    ]
    for device, limits in result["limits"].items():
        gemm = ", ".join(f"{k.rsplit('_', 1)[1]} {v / 1e9:.0f} GFLOP/s" for k, v in limits.items()
                         if k.startswith("gemm"))
        lines.append(f"- measured limits on {device}: read {limits['read_bytes_per_s'] / 1e9:.1f} GB/s, GEMM {gemm}")
    lines += [
        "",
        f"Method: per device, dtype and hidden size, every implementation is checked against gpunn's step, built, run "
        f"once ('first epoch') and calibrated, then timed in up to {settings['rounds']} rounds (at least "
        f"{settings['min_rounds']}; fewer than {settings['rounds']} when the rounds would pass "
        f"{settings['group_seconds']:g} s). In each round each implementation runs one slot of k epochs (a slot lasts "
        f"at least {settings['slot_ms']:g} ms), the order rotating by one from round to round, with "
        f"{settings['settle_ms']:g} ms of rest after each slot. Times are slot / k; × gpunn is a round's time over "
        "gpunn's in the same round.",
        "",
        "| device | dtype | hidden | implementation | rounds | k | min ms | median ms | × gpunn (median of rounds) "
        "| × gpunn min–max | first epoch ms | bound ms | median × bound |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in ok:
        lines.append(
            f"| {r.device} | {dtype_label(r.dtype, r.precision)} | {r.hidden} | {r.implementation} | "
            f"{len(r.epoch_ms)} | {r.epochs_per_slot} | "
            f"{r.min_ms:.2f} | {r.median_ms:.2f} | {r.ratio_median:.2f} | {r.ratio_min:.2f}–{r.ratio_max:.2f} | "
            f"{r.first_epoch_ms:.1f} | {r.bound_ms:.2f} | {r.median_ms / r.bound_ms:.2f} |"
        )
    lines += ["", f"Groups (the order of the first round; each later round starts one further on; the machine has "
                  f"{result['machine']['usable_cores']} usable cores, and a 1-minute load average above that means "
                  "other processes competed for them):", ""]
    for g in result["groups"]:
        gpunn_row = next((r for r in rows if (r.device, r.dtype, r.hidden, r.implementation) ==
                          (g["device"], g["dtype"], g["hidden"], "gpunn")), None)
        first = " → ".join(g["order"][0]) if g["order"] else "none"
        load = f"load average {g['load_before']} before, {g['load_after']} after its rounds" \
            if g["load_before"] is not None else "load average unknown"
        dtype = dtype_label(g["dtype"], g.get("precision", "float32"))
        lines.append(f"- {g['device']}, {dtype}, h = {g['hidden']}: {g['rounds']} rounds in {g['seconds']:.1f} s "
                     f"(stopped by --{g['stopped_by']}); {first}; gpunn's step: "
                     f"{gpunn_row.step if gpunn_row else '?'}; {load}")
    skipped = [r for r in rows if r.status != "ok"]
    if skipped:
        lines += ["", "Not reported:", ""]
        lines += [f"- {r.implementation} on {r.device}, {dtype_label(r.dtype, r.precision)}, hidden {r.hidden}: "
                  f"{r.status}" for r in skipped]
    speedups = gpu_speedups(ok)
    if speedups:
        lines += ["", "GPU over CPU (gpunn's median CPU time over its median GPU time; the two come from different "
                      "groups, so from different minutes, not interleaved):", ""]
        lines += [f"- {dtype}, h = {h}: {value:.1f}×" for dtype, h, value in speedups]
    lines += [
        "",
        "k: epochs per slot. × gpunn: above 1 is slower than gpunn. bound: the larger of X read once at the measured "
        "bandwidth and 3196·h·m FLOPs at the measured GEMM rate.",
    ]
    return "\n".join(lines) + "\n"


def gpu_speedups(ok: list[Row]) -> list[tuple[str, int, float]]:
    cpu = {(r.dtype, r.hidden): r.median_ms for r in ok if r.device == "cpu" and r.implementation == "gpunn"}
    return [(r.dtype, r.hidden, cpu[(r.dtype, r.hidden)] / r.median_ms) for r in ok
            if r.device != "cpu" and r.implementation == "gpunn" and (r.dtype, r.hidden) in cpu]


def colour(implementation: str) -> str:
    """The same colour for an implementation in every figure of every run."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    if implementation in KNOWN:
        return matplotlib.colors.to_hex(palette[KNOWN.index(implementation) % 10])
    extra = matplotlib.colormaps["Dark2"].colors
    return matplotlib.colors.to_hex(extra[zlib.crc32(implementation.encode()) % len(extra)])


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return False
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    panels = sorted({(r["device"], r["dtype"]) for r in ok}, key=lambda p: (p[0] != "cpu", p))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, (device, dtype) in zip(axes[0], panels):
        rows = [r for r in ok if (r["device"], r["dtype"]) == (device, dtype)]
        names = sorted({r["implementation"] for r in rows}, key=lambda n: (KNOWN.index(n) if n in KNOWN else 99, n))
        for name in names:
            points = sorted((r["hidden"], r["median_ms"], r["min_ms"]) for r in rows if r["implementation"] == name)
            hidden, median, best = zip(*points)
            ax.plot(hidden, median, color=colour(name), marker="o", label=f"{name} (median)")
            ax.plot(hidden, best, color=colour(name), marker="_", markersize=12, linestyle="none")
        bounds = sorted({(r["hidden"], r["bound_ms"]) for r in rows if r["implementation"] == "gpunn"})
        if bounds:
            ax.plot(*zip(*bounds), color="0.5", linestyle=":", label="lower bound")
        sizes = sorted({r["hidden"] for r in rows})
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(h) for h in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("hidden units h (784-h-10)")
        ax.set_ylabel("ms per full-batch epoch (lower is better)")
        ax.set_title(f"{device}, {dtype}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    data = "real MNIST" if result["data"].startswith("MNIST") else "synthetic data"
    fig.suptitle(f"{machine_label(result['machine'])}\n{data}, m = {result['m']:,}, gpunn {result['machine']['gpunn']}"
                 f" (median over interleaved rounds; dash: min)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def default_name(backends: list[Backend]) -> str:
    described = backends[-1].describe()
    label = described.get("gpu") or described.get("cpu", "cpu")
    return re.sub(r"[^a-z0-9]+", "-", label.split(" (")[0].split(",")[0].lower()).strip("-")


# --- the command --------------------------------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", type=click.Path(path_type=Path), help="MNIST IDX directory; default: synthetic data.")
@click.option("--m", "m", type=click.IntRange(min=16), default=60000, show_default=True, help="Samples per epoch.")
@click.option("--hidden", default="10,64,256,1024", show_default=True, help="Hidden sizes, comma-separated.")
@click.option("--dtypes", default="float32,float64", show_default=True)
@click.option("--devices", default="auto", show_default=True, help="'auto' (cpu, and cuda if present) or a list.")
@click.option("--peers", default="numpy-naive,torch-eager,torch-graph", show_default=True,
              help=f"Peers to time beside gpunn, from {', '.join(PEERS)}; 'none' for none. Each runs where it can "
              "(torch-graph: CUDA only).")
@click.option("--rounds", type=click.IntRange(min=1), default=7, show_default=True,
              help="Timed rounds per group, at most.")
@click.option("--min-rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed rounds per group, at least (or --rounds, if fewer).")
@click.option("--group-seconds", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Stop a group's rounds after --min-rounds once the next round would take them past this.")
@click.option("--slot-ms", type=click.FloatRange(min=0), default=1000.0, show_default=True,
              help="A slot is the fewest epochs that last this long (1 when one epoch does): long beside a cold start.")
@click.option("--settle-ms", type=click.FloatRange(min=0), default=150.0, show_default=True,
              help="Rest after each slot, untimed, so that the threads it left spinning (OpenBLAS's spin for about "
              "0.1 s after its last call) are asleep when the next slot starts.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="float32", show_default=True,
              help="tf32 or bf16: float32's matrix products on the GPU's tensor cores (with --devices cuda and "
              "--dtypes float32), as `gpunn train --precision` runs them.")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
@click.option("--name", help="File name stem of the results; default: the CPU or GPU model.")
def main(data_dir, m, hidden, dtypes, devices, peers, rounds, min_rounds, group_seconds, slot_ms, settle_ms,
         precision, out_dir, name) -> None:
    """Time full-batch epochs of gpunn and its peers, interleaved in rounds, on every device present."""
    settings = Rounds(rounds, min_rounds, group_seconds, slot_ms, settle_ms)
    hidden_sizes = [int(h) for h in hidden.split(",")]
    dtype_list = dtypes.split(",")
    if precision != "float32" and (dtype_list != ["float32"] or not devices.startswith("cuda") or "cpu" in devices):
        raise click.BadParameter(f"{precision} is for float32 matrix products on CUDA tensor cores: give it with "
                                 f"--dtypes float32 --devices cuda, not --dtypes {dtypes} --devices {devices}",
                                 param_hint="--precision")
    peer_list = [] if peers == "none" else peers.split(",")
    for peer in peer_list:
        if peer not in PEERS:
            raise click.BadParameter(f"unknown peer {peer!r}; expected one of {', '.join(PEERS)}", param_hint="--peers")
    device_names = ["cpu"]
    if devices == "auto":
        try:
            device_names.append(get_backend("cuda").name)
        except BackendError as error:
            click.echo(f"no GPU rows: {error.cause}")
    else:
        device_names = devices.split(",")
    variants = {}
    for device in device_names:
        named = gpunn_variants(device)
        variants[named[0][1].name] = named
    backends = [named[0][1] for named in variants.values()]

    images, labels, data = load_data(data_dir, m)
    m = len(labels)
    click.echo(f"data: {data}, m = {m:,}")
    result: dict[str, Any] = {
        "name": name or default_name(backends),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "data": data,
        "m": m,
        "rounds": asdict(settings),
        "check": {"epochs": CHECK_EPOCHS, "samples": min(CHECK_SAMPLES, m), "lr": LR},
        "precision": precision,
        "machine": {},
        "limits": {},
        "groups": [],
        "rows": [],
    }
    planned = len(backends) * len(dtype_list) * len(hidden_sizes)
    with stopped_by_signals() as stop:
        try:
            for backend in backends:
                limits = measure_limits(backend, dtype_list, size=min(784 * m, 64 * 2**20), precision=precision)
                result["limits"][backend.name] = limits
                for dtype in dtype_list:
                    for h in hidden_sizes:
                        arch = Architecture((784, h, 10))
                        params = init_params(arch, init="he", seed=0, dtype="float64")
                        candidates, unavailable = candidates_for(backend.name, arch, dtype, m, peer_list,
                                                                 variants[backend.name], precision)
                        rows, record = run_group(backend.name, dtype, h, candidates, images, labels, params,
                                                 settings, bound_ms=lower_bound_ms(h, m, dtype, limits, precision),
                                                 echo=click.echo, precision=precision)
                        result["groups"].append(record)
                        result["rows"] += [asdict(row) for row in rows + unavailable]
        except Interrupted as interrupted:
            # the groups done are kept: a time limit (timeout's SIGTERM) or Ctrl-C costs only the group under way
            result["interrupted"] = (f"{signal.Signals(interrupted.signum).name} during group "
                                     f"{len(result['groups']) + 1} of {planned}: the results hold the "
                                     f"{len(result['groups'])} before it")
            click.echo(f"interrupted: {result['interrupted']}")
        torch_used = any(p.startswith("torch") for p in peer_list)
        result["machine"] = machine(backends, torch_used)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        write_results(result, out_dir)
    if stop.signum is not None:
        sys.exit(128 + stop.signum)


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stopped_by_signals() -> Iterator[Any]:
    """While entered, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (once: a second one, while the
    results are written, is ignored). The context's ``signum`` is for the caller to record the one that came."""
    state = SimpleNamespace(signum=None)

    def interrupt(signum: int, frame: Any) -> None:
        if state.signum is None:
            state.signum = signum
            raise Interrupted(signum)

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def load_data(data_dir: Path | None, m: int) -> tuple[np.ndarray, np.ndarray, str]:
    if data_dir is not None:
        from gpunn.data import load_idx_dir

        dataset = load_idx_dir(data_dir)
        return dataset.train_images[:m], dataset.train_labels[:m].astype(np.int64), f"MNIST from {data_dir}"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(m, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, size=m).astype(np.int64)
    return images, labels, ("synthetic (uniform uint8 pixels, labels 0-9, MNIST's shape; no zero pixels to skip, "
                            "unlike MNIST's)")


def write_results(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / result["name"]
    table = markdown(result)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    Path(f"{stem}.md").write_text(table)
    click.echo("")
    click.echo(table)
    drew = plot(result, Path(f"{stem}.png"))
    click.echo(f"wrote {stem}.json, {stem}.md" + (f", {stem}.png" if drew else " (no plot: matplotlib not installed)"))


if __name__ == "__main__":
    main()
