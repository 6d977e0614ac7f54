"""Data-parallel training on a Dask cluster: the same step over shards of the training set, the same weights as one
device.

A step's gradient is a sum over samples, so it splits exactly. The training set is cut by samples into one
contiguous shard per worker and sent to that worker once; the worker puts it on its own device through the same
:class:`gpunn.backend.Backend` a single-process run uses, and keeps it, with its gradient pass held open, in an actor
(:class:`ShardWorker`) for the whole run. Each step the client sends every worker the parameters (and, for
mini-batches, the sample numbers of the batch that fall in its shard); every worker runs its backend's gradient pass
(the generic math or its fast path) on those samples and returns **unnormalized sums** (Σ dW, Σ db, Σ loss, hits);
the sums are added in a fixed pairwise tree over the shards (on the client, or on the workers, see
:attr:`ClusterBackend.reduce`), divided by the batch's m, L2 is added once, and the update rule runs once, here.
So the math exists once: only where the sums are added differs from one process, and the weights agree with a
single-process run to float rounding.

The cluster is chosen at the edge, like a device: :func:`connect` (``gpunn train --cluster``) gives a
:class:`ClusterBackend`, whose :meth:`~ClusterBackend.step` hands the training loop :class:`ClusterEpochs`, a
whole-epoch runner with :class:`gpunn.train.Epochs`' protocol. Checkpoints, resume, metrics, the progress display
and Ctrl-C are :func:`gpunn.train.fit`'s, unchanged. A worker lost mid-run raises :class:`WorkerLost`, which ``fit``
hands back with the model of the last completed epoch (see :class:`gpunn.train.TrainingFailed`).

Dask (``distributed``) is imported only here, and only when a cluster is asked for, so ``import gpunn`` and
``gpunn --help`` never load it. The workers must have gpunn installed (a local cluster's workers use this
interpreter).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from gpunn import diagnostics
from gpunn.backend import Backend, GradientPass, Step, get_backend, parse_device
from gpunn.errors import ConfigError, GpunnError
from gpunn.model import Preprocessing
from gpunn.nn import Architecture, Layer, accuracy, cost, forward
from gpunn.train import DeviceData, TrainConfig, TrainingFailed, batch_gradients

__all__ = ["ClusterBackend", "ClusterEpochs", "ClusterError", "ClusterSpecError", "ShardWorker", "WorkerLost",
           "connect", "parse_cluster", "shard_bounds", "tree_levels", "tree_sum"]

INSTALL_HINT = "pip install 'gpunn[dask]'"
CLUSTER_CHOICES = "expected local:N (N worker processes on this machine), local-cuda (one worker per GPU, dask-cuda) " \
                  "or a scheduler's address such as tcp://HOST:8786"
#: seconds to wait for a scheduler to answer, and for it to have at least one worker
CONNECT_SECONDS = 30
#: above this many workers the sums are added on the workers, in a tree of log2 N rounds, rather than all sent here.
#: A modelled threshold, not a measured one (no cluster of more than 2 workers has run gpunn yet): N messages into
#: one client cost about N times the sums' bytes over its link, the tree log2 N round trips of a few milliseconds
#: each (benchmarks/README.md, "cluster_scaling.py")
TREE_ABOVE = 8
REDUCTIONS = ("auto", "client", "tree")
#: after a broken connection to a worker, how long to wait for the scheduler to drop it, to name it in the error
LOST_SECONDS = 3.0
_LOCAL_RE = re.compile(r"local:(\d+)")


class ClusterError(GpunnError):
    """The cluster cannot be used: Dask missing, a scheduler that does not answer, a worker that cannot run the
    step. Exit status 1, as for a device that cannot be used."""


class ClusterSpecError(ClusterError):
    """``--cluster`` itself is malformed, or does not go with ``--device``: a usage error."""

    exit_code = 2


class WorkerLost(ClusterError, TrainingFailed):
    """A worker left the cluster during training, taking its shard with it. :func:`gpunn.train.fit` attaches the model
    of the last completed epoch (``model``, ``epoch``) before it reaches the caller."""


@dataclass(frozen=True)
class ClusterSpec:
    """What ``--cluster`` asked for: ``kind`` "local" (``workers`` processes here), "local-cuda", or "address"."""

    kind: str
    text: str
    workers: int | None = None
    address: str | None = None


def parse_cluster(text: str) -> ClusterSpec:
    """``"local:2"``, ``"local-cuda"`` or ``"tcp://host:8786"`` (any ``scheme://``); ClusterSpecError otherwise."""
    spec = text.strip()
    match = _LOCAL_RE.fullmatch(spec.lower())
    if match is not None:
        workers = int(match[1])
        if workers < 1:
            raise ClusterSpecError(f"--cluster {text!r}: a local cluster needs at least 1 worker")
        return ClusterSpec("local", spec.lower(), workers=workers)
    if spec.lower() == "local-cuda":
        return ClusterSpec("local-cuda", "local-cuda")
    if "://" in spec and spec.split("://", 1)[1]:
        return ClusterSpec("address", spec, address=spec)
    raise ClusterSpecError(f"unknown cluster {text!r}; {CLUSTER_CHOICES}")


def import_distributed() -> ModuleType:
    """Dask's ``distributed``, or ClusterError saying what to install."""
    try:
        import distributed
    except ImportError as error:
        raise ClusterError(_import_failure("Dask's distributed", "distributed", error, INSTALL_HINT)) from error
    return distributed


def _import_failure(what: str, module: str, error: ImportError, install: str) -> str:
    """Not installed, or installed but broken: two causes, two fixes."""
    if isinstance(error, ModuleNotFoundError) and error.name == module:
        return f"--cluster needs {what}, which is not installed; install it with: {install}"
    return (f"--cluster needs {what}, which is installed but cannot be imported ({diagnostics.one_line(error)}); "
            f"reinstall it with: {install} --force-reinstall")


def connect(text: str, *, device: str = "auto", fast: bool | None = None, reduce: str = "auto") -> ClusterBackend:
    """The cluster ``text`` names (see :func:`parse_cluster`), started or joined, as a :class:`ClusterBackend` whose
    workers compute on ``device`` (each worker picks it with :func:`gpunn.backend.get_backend`) with ``fast``.

    Use it as a context manager (or call :meth:`ClusterBackend.close`): a cluster it started is shut down with it.
    """
    spec = parse_cluster(text)
    parse_device(device)  # a malformed --device is a usage error here, before anything starts
    if reduce not in REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduce!r}; expected one of {REDUCTIONS}")
    if spec.kind == "local-cuda":
        kind, index = parse_device(device)
        if kind == "cpu" or index is not None:
            raise ClusterSpecError(f"--cluster local-cuda gives each worker one GPU of its own (set "
                                   f"CUDA_VISIBLE_DEVICES to choose which); use it with --device cuda, not {device}")
        device = "cuda"
    distributed = import_distributed()
    cluster: Any = None
    local = dict(
        # no dashboard, and the scheduler's HTTP server (which starts anyway) on a free port of its own: on Dask's
        # 8787 a second run on the same machine would warn, and fail to bind
        dashboard_address=None, scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
        # gpunn reports a failure itself, in one line; Dask's own log lines would only repeat it
        silence_logs=logging.CRITICAL,
        # the workers share this machine's memory with each other and the client: Dask's per-worker share of it
        # would pause or restart a worker whose shard is large, and a run cannot survive that
        memory_limit=0,
        preload=[__name__])  # dask_setup below: the workers ignore the terminal's Ctrl-C
    start: Callable[..., Any] | None = None
    if spec.kind == "local":
        start = partial(distributed.LocalCluster, n_workers=spec.workers, threads_per_worker=1, processes=True)
    elif spec.kind == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster as start
        except ImportError as error:
            raise ClusterError(_import_failure("dask-cuda (for local-cuda: one worker per GPU)", "dask_cuda", error,
                                               "pip install dask-cuda")) from error
    if start is not None:
        try:
            cluster = start(**local)
        except Exception as error:  # no free port, no memory, a worker that does not start: Dask raises several
            raise ClusterError(f"could not start a {spec.text} cluster: {diagnostics.one_line(error)}") from error
    try:
        client = distributed.Client(cluster if cluster is not None else spec.address, timeout=CONNECT_SECONDS)
    except Exception as error:  # OSError when nothing answers in time; Dask has other types for a refused handshake
        if cluster is not None:
            cluster.close()
        raise ClusterError(f"cannot reach the Dask scheduler at {spec.address}: {diagnostics.one_line(error)}; check "
                           "the address, or start a scheduler with `dask scheduler` and workers with "
                           "`dask worker ADDRESS`") from error
    try:
        return ClusterBackend(client, spec, device=device, fast=fast, reduce=reduce, cluster=cluster,
                              pin_cores=spec.kind == "local")
    except BaseException:
        client.close()
        if cluster is not None:
            cluster.close()
        raise


def dask_setup(worker: Any) -> None:
    """Run by each worker of a cluster gpunn starts on this machine (Dask's preload), in its main thread: ignore
    SIGINT and SIGHUP. A terminal sends them to every process of its foreground group, workers included; gpunn's own
    process handles them (stop after this epoch, with a checkpoint) and then shuts the workers down."""
    for name in ("SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


# --- the client's side ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerInfo:
    address: str
    device: str  # the worker's backend, as its header line would name it
    cores: int  # the CPU cores it may run on
    host: str
    pid: int

    def label(self) -> str:
        return f"{self.address} ({self.device}, {self.cores} core{'s' if self.cores != 1 else ''})"


class ClusterBackend(Backend):
    """A Dask cluster as one backend: the client's arrays (parameters, optimizer state, validation set) are NumPy
    arrays in this process, and :meth:`step` hands the training loop :class:`ClusterEpochs`, which computes each
    step's gradients on the workers.

    Why the client computes on the host, whatever the workers' device: what it holds is the parameters (thousands of
    numbers), the update rule over them and a validation pass of about a thousand digits, all of which it would
    otherwise move to and from a device; and the training set, which ``fit`` hands over on this backend, then stays a
    view of the host's uint8 pixels instead of being copied to a device the workers do not use.

    ``reduce``: where the sums are added. "client": every worker sends its sums here; "tree": the workers add them
    pairwise in log2 N rounds and only the total comes here; "auto": the tree above :data:`TREE_ABOVE` workers.
    Both add in the same fixed order over the shards, so they give the same bits.
    """

    def __init__(self, client: Any, spec: ClusterSpec, *, device: str = "auto", fast: bool | None = None,
                 reduce: str = "auto", cluster: Any = None, pin_cores: bool = False) -> None:
        super().__init__(f"cluster {spec.text}", array_api_compat.array_namespace(np.empty(0)), "cpu", fast=fast)
        self.client, self.spec, self.cluster = client, spec, cluster
        self.worker_device, self.worker_fast = device, fast
        self.reduce = reduce
        self._steps: dict[tuple[Any, ...], tuple[str, str]] = {}
        self.workers = self._start_workers(pin_cores)

    def _start_workers(self, pin_cores: bool) -> list[WorkerInfo]:
        try:
            self.client.wait_for_workers(1, timeout=CONNECT_SECONDS)
        except TimeoutError:
            raise ClusterError(f"the Dask scheduler at {self.client.scheduler.address} has no workers after "
                               f"{CONNECT_SECONDS} s; start some with `dask worker {self.client.scheduler.address}`"
                               ) from None
        addresses = sorted(self.client.nthreads())
        cores = _core_sets(len(addresses)) if pin_cores else [None] * len(addresses)
        futures = [self.client.submit(_describe_worker, self.worker_device, self.worker_fast, mine, workers=[address],
                                      allow_other_workers=False, pure=False)
                   for address, mine in zip(addresses, cores)]
        infos = []
        for address, future in zip(addresses, futures):
            try:
                infos.append(WorkerInfo(address, **future.result()))
            except GpunnError as error:  # the worker cannot use the device asked for
                raise ClusterError(f"worker {address}: {error}") from error
        return infos

    @property
    def n_workers(self) -> int:
        return len(self.workers)

    def reduction(self) -> str:
        """Where this backend's runs add their sums: "client" or "tree"."""
        if self.reduce == "auto":
            return "tree" if self.n_workers > TREE_ABOVE else "client"
        return self.reduce

    def random(self, seed: int) -> Any:
        return np.random.default_rng(seed)

    def step(self, arch: Architecture, *, dtype: str, columns: int, dropout: float = 0.0, pixels: bool = True,
             batches: bool = False, precision: str = "float32") -> Step:
        """A step computed by every worker on its shard: named after the workers' own step (asked of them, for a
        worker's share of ``columns``), run by :class:`ClusterEpochs`. It takes the raw uint8 pixels: the training
        set stays as it is here, and each worker prepares its shard on its own device."""
        share = -(-columns // self.n_workers)
        key = (arch, dtype, share, dropout, pixels, batches, precision)
        if key not in self._steps:
            futures = [self.client.submit(_worker_step, arch, dtype, share, dropout, pixels, batches, precision,
                                          self.worker_device, self.worker_fast, workers=[w.address],
                                          allow_other_workers=False, pure=False)
                       for w in self.workers]
            described = [future.result() for future in futures]
            names = sorted({name for name, _ in described})
            notices = sorted({notice for _, notice in described if notice})
            self._steps[key] = ("; ".join(names), "; ".join(f"workers: {notice}" for notice in notices))
        name, notice = self._steps[key]
        return Step(f"{self.describe_parallel()}: {name}", _no_pass_here, pixels=True,
                    epochs=lambda config, train, val, capacity: ClusterEpochs(self, config, train, val),
                    notice=notice)

    def describe_parallel(self) -> str:
        where = "sums added here" if self.reduction() == "client" else "sums added in a tree on the workers"
        return f"data-parallel on {self.n_workers} worker{'s' if self.n_workers != 1 else ''}, {where}"

    def describe(self) -> dict[str, str]:
        shown = [w.label() for w in self.workers[:4]]
        if self.n_workers > 4:
            shown.append(f"and {self.n_workers - 4} more")
        items = {
            "device": self.name,
            "workers": f"{self.n_workers} worker{'s' if self.n_workers != 1 else ''}: {'; '.join(shown)}",
            "scheduler": f"scheduler {self.client.scheduler.address}",
            "client": f"the update and validation in this process (numpy {np.__version__})",
        }
        if self.spec.kind == "address":
            del items["scheduler"]  # the name says it
        return items

    def summary(self) -> str:
        items = self.describe()
        return f"{items.pop('device')}: {'; '.join(items.values())}"

    def lost_workers(self, addresses: Sequence[str]) -> list[str]:
        """Those of ``addresses`` the scheduler no longer knows (all of them where the scheduler does not answer)."""
        try:
            alive = set(self.client.nthreads())
        except Exception:  # the scheduler itself is gone: distributed raises OSError, TimeoutError or its own
            return list(addresses)
        return [address for address in addresses if address not in alive]

    def close(self) -> None:
        """Disconnect, and shut down the cluster where this backend started it."""
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def __enter__(self) -> ClusterBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _no_pass_here() -> Any:
    # ClusterBackend.step's runner never declines a run, so the loop never asks for a gradient pass in this process
    raise RuntimeError("a cluster computes its steps through its epochs runner (Step.epochs), not in the client")


def _core_sets(n: int) -> list[set[int]]:
    """This machine's usable cores, divided among ``n`` local workers: whole cores each, or one core shared round
    robin when there are more workers than cores. Each worker's fast path reads its own share as its core count (as
    it does under taskset), so N workers do not each start one thread per core of the machine."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if n >= len(cores):
        return [{cores[r % len(cores)]} for r in range(n)]
    per = len(cores) // n
    return [set(cores[r * per:(r + 1) * per]) for r in range(n)]


def shard_bounds(m: int, n: int) -> list[int]:
    """Where the ``n`` contiguous shards of ``m`` samples begin and end: shard r is ``bounds[r]:bounds[r + 1]``."""
    return [m * r // n for r in range(n + 1)]


def tree_levels(n: int) -> list[list[tuple[int, int]]]:
    """The rounds of a pairwise sum over ``n`` shards: in round k, shard r adds in the sums of shard r + 2^k, for
    every r that is a multiple of 2^(k+1). :func:`tree_sum` adds in the same order, so both give the same bits."""
    levels, stride = [], 1
    while stride < n:
        levels.append([(r, r + stride) for r in range(0, n - stride, 2 * stride)])
        stride *= 2
    return levels


def tree_sum(parts: list[Any], add: Callable[[Any, Any], Any]) -> Any:
    """parts[0] + ... + parts[n-1], added pairwise: ((p0 + p1) + (p2 + p3)) + ..., the order of :func:`tree_levels`."""
    while len(parts) > 1:
        parts = [add(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


@dataclass
class Sums:
    """A step's figures over some samples, not yet divided by their number: Σ dW and Σ db per layer (NumPy, the
    training dtype), Σ loss, and the number of correct predictions."""

    grads: list[Layer]
    loss: float
    hits: int


def add_sums(a: Sums | None, b: Sums | None) -> Sums | None:
    """a + b, where None (a worker with no samples in the step) is zero: x + 0 is x, bit for bit."""
    if a is None or b is None:
        return b if a is None else a
    return Sums([Layer(p.W + q.W, p.b + q.b) for p, q in zip(a.grads, b.grads)], a.loss + b.loss, a.hits + b.hits)


@dataclass
class StepProfile:
    """Where a run's step time went: ``seconds``, the client's wall time from sending a step's parameters to having
    its summed gradients; ``worker_seconds``, the slowest worker's own time for the same steps (its gradient pass and
    the copy of its sums to the host). Their difference is the engine's overhead: messages, scheduling, reduction."""

    steps: int = 0
    seconds: float = 0.0
    worker_seconds: float = 0.0

    @property
    def overhead_per_step(self) -> float:
        return (self.seconds - self.worker_seconds) / self.steps if self.steps else math.nan


@dataclass(frozen=True)
class ShardSpec:
    """What a worker needs to compute its shard's part of every step (sent once, with the shard)."""

    arch: Architecture
    dtype: str
    device: str
    fast: bool | None
    columns: int  # the most samples of this shard in one step
    batches: bool  # the steps are mini-batches
    dropout: float
    normalize: str  # Preprocessing kind: "scale" or "standardize"
    mean: np.ndarray | None = None  # the training split's statistics, for "standardize"
    std: np.ndarray | None = None
    precision: str = "float32"  # what the matrix products compute in (gpunn.nn.PRECISIONS)


class ClusterEpochs:
    """The epochs of one run on a cluster, with :class:`gpunn.train.Epochs`' protocol: :meth:`load`, :meth:`run`,
    :meth:`state`, :attr:`metrics`, :attr:`capacity`, used as a context manager (entering it sends the shards).

    Each step: the client sends the parameters to every worker (with the sample numbers of the batch in its shard),
    the workers return their sums, these are added, divided by the batch's m, L2 is added, and the update rule runs
    here, once. The epoch's loop is :meth:`gpunn.train.Epochs.run`'s: the same learning rate, step count t, batches
    from ``default_rng([seed, epoch])``, dropout generator and metrics row.

    ``capacity`` is 1: the loop reads the figures back after every epoch. A step here already waits for the workers,
    so nothing is lost by it, and the state the loop last read is always the last completed epoch: the one a lost
    worker's checkpoint must hold.
    """

    capacity = 1

    def __init__(self, backend: ClusterBackend, config: TrainConfig, train: DeviceData, val: DeviceData | None
                 ) -> None:
        self.backend, self.config, self.train, self.val = backend, config, train, val
        self.arch = config.architecture(int(train.X.shape[0]))
        self.rule = config.rule
        self.metrics = np.full((self.capacity, 5), math.nan, dtype=config.dtype)
        self.params: list[Layer] = []
        self.optimizer_state: dict[str, list[Layer]] = {}
        self.profile = StepProfile()
        self.reduction = backend.reduction()
        self.addresses = [w.address for w in backend.workers]
        self.bounds = shard_bounds(train.m, len(self.addresses))
        self.actors: list[Any] = []
        self.name = ""

    # -- setting up and tearing down: the shards go to the workers once --------------------------------------------

    def __enter__(self) -> ClusterEpochs:
        config, train, client = self.config, self.train, self.backend.client
        n, m = len(self.addresses), self.train.m
        if m < n:
            raise ConfigError(f"{m} training samples cannot be shared by {n} workers; use at most {m} workers")
        lost = self.backend.lost_workers(self.addresses)
        if lost:
            raise ClusterError(f"worker {lost[0]} left the cluster before training started; connect again")
        assert train.X.dtype == np.uint8, "the cluster's step takes raw pixels (Step.pixels)"
        X, y = np.asarray(train.X), np.asarray(train.y)
        # the statistics come from the whole training split, as in one process (fit fitted the same ones on this X
        # for the validation set; the runner's protocol does not hand them over, and computing them again is cheap
        # beside training)
        kind = config.normalize
        mean = std = None
        if kind == "standardize":
            pre = Preprocessing.fit(kind, X, getattr(np, config.dtype))
            mean, std = np.asarray(pre.mean), np.asarray(pre.std)
        batch = config.batch_columns(m)

        def send(r: int, address: str) -> Any:
            start, stop = self.bounds[r], self.bounds[r + 1]
            spec = ShardSpec(self.arch, config.dtype, self.backend.worker_device, self.backend.worker_fast,
                             min(batch, stop - start), batch < m, config.dropout, kind, mean, std,
                             config.precision)
            # straight to that worker, once; the actor made there from it keeps it for the run (and the scattered
            # copy is released when this function's futures go)
            shard = client.scatter([X[:, start:stop], y[start:stop]], workers=[address], hash=False)
            return client.submit(ShardWorker, *shard, spec, actor=True, workers=[address], allow_other_workers=False,
                                 pure=False)

        # an actor's handle talks through the current client, and a process may hold several (a notebook, a
        # benchmark comparing clusters): make it this cluster's while the handles are made
        with client.as_current():
            self.actors = self._results([send(r, address) for r, address in enumerate(self.addresses)],
                                        "while receiving its shard", tasks=True)
        names = self._results([actor.describe() for actor in self.actors], "while receiving its shard")
        self.name = f"{self.backend.describe_parallel()}: {'; '.join(sorted(set(names)))}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        # close each worker's gradient pass (a fast path restores its thread settings); a lost worker has nothing to
        # close, and the error that brought us here is the one to report
        closing = []
        for actor in self.actors:
            try:
                closing.append(actor.close())
            except Exception:  # the actor's worker is gone (distributed raises RuntimeError for that)
                pass
        for future in closing:
            try:
                future.result(timeout=10)
            except Exception:  # as above, or a worker too busy to answer: it drops the actor when released
                pass
        self.actors = []

    # -- Epochs' protocol ------------------------------------------------------------------------------------------

    def load(self, params: list[Layer], optimizer_state: dict[str, list[Layer]], *, epochs_done: int) -> None:
        self.params, self.optimizer_state = params, optimizer_state

    def state(self) -> tuple[list[Layer], dict[str, list[Layer]]]:
        return self.params, self.optimizer_state

    def run(self, epoch: int) -> None:
        """Epoch ``epoch`` (1-based): its steps across the workers, the validation pass here, its metrics row."""
        config, m = self.config, self.train.m
        lr = config.lr_at(epoch)
        batch = config.batch_columns(m)
        steps = -(-m // batch)
        t = (epoch - 1) * steps
        # dropout masks: each worker draws the whole batch's from the generator one process would use, seeded from
        # (seed, epoch), and keeps its own samples' columns, so the masks are one process's
        seed = int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0]) if config.dropout else None
        if batch == m:
            batches: list[np.ndarray | None] = [None]  # full batch: every worker its whole shard, in order
        else:
            order = np.random.default_rng([config.seed, epoch]).permutation(m)  # as Epochs.run draws it
            batches = [order[first:first + batch] for first in range(0, m, batch)]
        params, optimizer_state = self.params, self.optimizer_state
        loss = train_accuracy = 0.0
        dtype = np.dtype(config.dtype)
        for columns in batches:
            t += 1
            m_b = m if columns is None else len(columns)
            sums = self._gradient_sums(params, columns, seed, epoch)
            # one process's gradient pass divides by the batch's m and adds L2 itself: here it happens once, after
            # the sum over the shards
            grads = [Layer(dW / m_b + (config.l2 / m_b) * W if config.l2 else dW / m_b, db / m_b)
                     for (dW, db), (W, _) in zip(sums.grads, params)]
            batch_loss = sums.loss / m_b
            if config.l2:
                batch_loss += config.l2 / (2 * m_b) * sum(float(np.vdot(W, W)) for W, _ in params)
            params, optimizer_state = self.rule.step(params, grads, optimizer_state, lr, t)
            loss = loss + np.asarray(batch_loss, dtype) * (m_b / m)
            train_accuracy = train_accuracy + np.asarray(sums.hits / m_b, dtype) * (m_b / m)
        val_loss = val_accuracy = math.nan
        if self.val is not None:
            trace = forward(params, self.val.X, self.arch)
            val_loss, val_accuracy = cost(trace.Z[-1], self.val.Y, self.arch.output), accuracy(trace.A[-1], self.val.y)
        finite = all(bool(np.all(np.isfinite(W)) and np.all(np.isfinite(b))) for W, b in params)
        self.metrics[(epoch - 1) % self.capacity, :] = [loss, train_accuracy, val_loss, val_accuracy, finite]
        self.params, self.optimizer_state = params, optimizer_state

    # -- one step ----------------------------------------------------------------------------------------------------

    def _gradient_sums(self, params: list[Layer], columns: np.ndarray | None, seed: int | None, epoch: int) -> Sums:
        """The step's sums over ``columns`` (sample numbers of the training set; None: all of it), from the workers."""
        started = time.perf_counter()
        host = [Layer(np.asarray(W), np.asarray(b)) for W, b in params]
        tree = self.reduction == "tree"
        calls = []
        for r, actor in enumerate(self.actors):
            start, stop = self.bounds[r], self.bounds[r + 1]
            if columns is None:
                index, positions, batch = None, (start, stop), self.train.m
            else:
                # this shard's samples of the batch, in the batch's order, as numbers within the shard: an index
                # array, never the data; and where they sit in the batch, for the dropout masks
                mine = (columns >= start) & (columns < stop)
                index, positions, batch = columns[mine] - start, np.flatnonzero(mine), len(columns)
            draw = None if seed is None else (seed, epoch, batch, positions)
            calls.append(actor.gradient_sums(host, index, draw, keep=tree))
        answers = self._results(calls, f"during epoch {epoch}")
        if tree:
            for level in tree_levels(len(self.actors)):
                self._results([self.actors[r].absorb(self.actors[s]) for r, s in level], f"during epoch {epoch}",
                              [r for r, _ in level])
            total = self._results([self.actors[0].take()], f"during epoch {epoch}", [0])[0]
        else:
            total = tree_sum([sums for sums, _ in answers], add_sums)
        self.profile.steps += 1
        self.profile.seconds += time.perf_counter() - started
        self.profile.worker_seconds += max(seconds for _, seconds in answers)
        assert total is not None, "a step has at least one sample"
        return total

    def _results(self, futures: Sequence[Any], when: str, ranks: Sequence[int] | None = None, *, tasks: bool = False
                 ) -> list[Any]:
        """The results of calls on the workers' actors (``tasks``: of tasks, such as an actor being made), the call i
        on the worker of shard ``ranks[i]`` (by default shard i), in order; WorkerLost when a worker is gone."""
        outcomes = self._wait(futures, tasks)
        results = []
        for i, outcome in enumerate(outcomes):
            try:
                if isinstance(outcome, BaseException):
                    raise outcome
                results.append(outcome)
            except GpunnError:
                raise
            except Exception as error:
                # distributed says a worker is gone with an OSError (the connection broke) or "Worker holding Actor
                # was lost" (a RuntimeError); the scheduler may take a moment longer to drop it from its list
                broken = isinstance(error, OSError) or "was lost" in str(error)
                lost = self._lost(wait=LOST_SECONDS if broken else 0.0)
                if lost or broken:
                    suspect = self.addresses[(ranks or range(len(futures)))[i]]
                    raise WorkerLost(self._lost_message(lost or [suspect], when, error)) from error
                raise  # every worker is there: the error is the computation's own
        return results

    def _wait(self, futures: Sequence[Any], tasks: bool) -> list[Any]:
        """Each future's result, or the exception it raised. Calls on actors are awaited together, in one trip
        through the client's event loop (each ``.result()`` would make a trip of its own, per worker and step)."""
        if not tasks:
            async def gather() -> list[Any]:
                return await asyncio.gather(*futures, return_exceptions=True)

            try:
                return self.backend.client.sync(gather)
            except Exception as error:  # the client's own connection broke: every call failed with it
                return [error] * len(futures)
        outcomes: list[Any] = []
        for future in futures:  # a task's future cannot be awaited in a synchronous client's loop
            try:
                outcomes.append(future.result())
            except Exception as error:
                outcomes.append(error)
        return outcomes

    def _lost(self, wait: float) -> list[str]:
        """This run's workers the scheduler has dropped, waiting up to ``wait`` seconds for it to notice."""
        deadline = time.monotonic() + wait
        while True:
            lost = self.backend.lost_workers(self.addresses)
            if lost or time.monotonic() >= deadline:
                return lost
            time.sleep(0.1)

    def _lost_message(self, lost: list[str], when: str, error: BaseException) -> str:
        n = len(self.addresses)
        r = self.addresses.index(lost[0])
        who = (f"worker {lost[0]} (shard {r + 1} of {n}: samples {self.bounds[r]:,} to {self.bounds[r + 1] - 1:,})"
               + (f" and {len(lost) - 1} more" if len(lost) > 1 else ""))
        return (f"{who} left the cluster {when} ({diagnostics.one_line(error)}); its shard went with it, so training "
                "stopped")


# --- the workers' side ----------------------------------------------------------------------------------------------

#: each worker process's backends, made once: the device is picked on the worker, through get_backend, as in one process
_BACKENDS: dict[tuple[str, bool | None], Backend] = {}


def worker_backend(device: str, fast: bool | None) -> Backend:
    key = (device, fast)
    if key not in _BACKENDS:
        _BACKENDS[key] = get_backend(device, fast=fast)
    return _BACKENDS[key]


def _describe_worker(device: str, fast: bool | None, cores: set[int] | None) -> dict[str, Any]:
    """Run once on each worker as the cluster is joined: take its share of this machine's cores (local clusters),
    pick its device, and say what it is."""
    if cores is not None and hasattr(os, "sched_setaffinity"):
        _pin_process(cores)
    backend = worker_backend(device, fast)
    items = backend.describe()
    label = items["device"] + (f", {items['gpu']}" if "gpu" in items else "")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"device": label, "cores": usable, "host": socket.gethostname(), "pid": os.getpid()}


def _pin_process(cores: set[int]) -> None:
    """Every thread of this process onto ``cores``; threads started later inherit it from the thread starting them.
    (os.sched_setaffinity(0, ...) alone would pin only the calling thread on Linux.)"""
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:  # a thread that ended meanwhile
            pass


def _worker_step(arch: Architecture, dtype: str, columns: int, dropout: float, pixels: bool, batches: bool,
                 precision: str, device: str, fast: bool | None) -> tuple[str, str]:
    step = worker_backend(device, fast).step(arch, dtype=dtype, columns=columns, dropout=dropout, pixels=pixels,
                                             batches=batches, precision=precision)
    return step.name, step.notice


class _BatchColumns:
    """The dropout generator of one process, seen from a worker: each draw is made for the whole batch (columns
    ``batch``) and only this worker's ``positions`` in it are kept, so the masks are those one process draws for the
    same samples, and the generator moves on exactly as it does there."""

    def __init__(self, rng: Any, batch: int, positions: Any, xp: Any) -> None:
        self.rng, self.batch, self.positions, self.xp = rng, batch, positions, xp

    def random(self, shape: tuple[int, ...], dtype: Any) -> Any:
        full = self.rng.random((shape[0], self.batch), dtype=dtype)
        if isinstance(self.positions, tuple):
            return full[:, self.positions[0]:self.positions[1]]
        return self.xp.take(full, self.positions, axis=1)


class ShardWorker:
    """One worker's part of a run: its shard on its device and its gradient pass, kept for the run (a Dask actor:
    it lives on its worker, and the client's calls reach it directly and run one at a time, on one thread)."""

    def __init__(self, X_uint8: np.ndarray, y: np.ndarray, spec: ShardSpec) -> None:
        backend = worker_backend(spec.device, spec.fast)
        # a pass over raw pixels folds in the 1/255 and nothing more: standardized inputs need the prepared floats
        step = backend.step(spec.arch, dtype=spec.dtype, columns=spec.columns, dropout=spec.dropout,
                            pixels=spec.normalize == "scale", batches=spec.batches, precision=spec.precision)
        float_dtype = getattr(backend.xp, spec.dtype)
        preprocessing = Preprocessing(spec.normalize, *(None if a is None else backend.asarray(a, dtype=float_dtype)
                                                         for a in (spec.mean, spec.std)))
        self.backend, self.spec, self.step = backend, spec, step
        self.name = step.name
        self.data = DeviceData.from_host(X_uint8, y, backend=backend, dtype=spec.dtype,
                                         preprocessing=None if step.pixels else preprocessing)
        self._float_dtype = float_dtype
        self._stack: ExitStack | None = None
        self._pass: GradientPass | None = None
        self._rng: Any = None
        self._rng_epoch: int | None = None
        self.sums: Sums | None = None

    def describe(self) -> str:
        return self.name

    def _gradient_pass(self) -> GradientPass:
        # entered on the actor's own thread, where the steps run (Numba's thread count, for one, is per thread)
        if self._pass is None:
            self._stack = ExitStack()
            self._pass = self._stack.enter_context(self.step.gradients())
        return self._pass

    def gradient_sums(self, params: list[Layer], index: np.ndarray | None,
                      draw: tuple[int, int, int, Any] | None, *, keep: bool = False) -> tuple[Sums | None, float]:
        """This shard's sums for one step: over the shard's samples ``index`` (None: all of them), with the
        parameters ``params`` (host arrays). ``draw``: (seed, epoch, batch, positions) for dropout. Returns the sums
        (None: no sample of the step is here) and the seconds spent; with ``keep`` the sums stay here, for
        :meth:`absorb` and :meth:`take`, and None is returned in their place."""
        started = time.perf_counter()
        backend, arch = self.backend, self.spec.arch
        rng = None
        if draw is not None:
            seed, epoch, batch, positions = draw
            if self._rng_epoch != epoch:  # a new epoch, a new generator, as in Epochs.run
                self._rng, self._rng_epoch = backend.random(seed), epoch
            if not isinstance(positions, tuple):
                positions = backend.asarray(positions)
            rng = _BatchColumns(self._rng, batch, positions, backend.xp)
        columns = None if index is None else backend.asarray(index)
        m = self.data.m if columns is None else int(columns.shape[0])
        sums = None
        if m == 0:
            if rng is not None:  # draw this step's masks all the same: the generator must stay in step
                for n in arch.sizes[1:-1]:
                    rng.random((n, 0), self._float_dtype)
        else:
            params_here = [Layer(backend.asarray(W), backend.asarray(b)) for W, b in params]
            loss, hit_rate, grads = batch_gradients(self._gradient_pass(), params_here, self.data, columns, l2=0.0,
                                                    dropout=self.spec.dropout, rng=rng)
            # the pass's means times the shard's m: sums, to be added across shards and divided by the batch's m once
            sums = Sums([Layer(backend.to_numpy(dW) * m, backend.to_numpy(db) * m) for dW, db in grads],
                        float(backend.to_numpy(loss)) * m, round(float(backend.to_numpy(hit_rate)) * m))
        seconds = time.perf_counter() - started
        if keep:
            self.sums = sums
            return None, seconds
        return sums, seconds

    def take(self) -> Sums | None:
        """The sums kept here (by :meth:`gradient_sums` with ``keep``, and :meth:`absorb`), handed over once."""
        sums, self.sums = self.sums, None
        return sums

    def absorb(self, peer: Any) -> None:
        """Add another shard's kept sums (``peer``, its actor) to this one's: one pair of a tree round."""
        self.sums = add_sums(self.sums, peer.take().result())

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack, self._pass = None, None
