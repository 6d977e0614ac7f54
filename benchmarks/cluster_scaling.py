"""Epoch time on a Dask LocalCluster of 1 and 2 workers beside one process, interleaved, and the engine's overhead
per step.

    python benchmarks/cluster_scaling.py --data-dir ../shared/data/mnist     # MNIST's 60,000 training digits
    python benchmarks/cluster_scaling.py                                     # the bundled sample (5,000 digits)
    python benchmarks/cluster_scaling.py --m 600 --rounds 2 --workers 2 --out-dir /tmp/c   # toy size

Every configuration is built once and kept: "one process" is gpunn's own epoch runner (gpunn.train.Epochs) on the
CPU backend's step, "local:N" a LocalCluster of N worker processes (each pinned to its share of the cores) with its
runner (gpunn.cluster.ClusterEpochs), the shards already on the workers. All start from the same weights and run two
untimed epochs, after which their losses must agree (the same step, or the row is refused). Then come rounds: in each
round every configuration runs one slot of k epochs, in an order rotated from round to round, so that a drift of the
machine's load falls on all alike; the table gives the median and min epoch time and the median of the per-round
ratios to one process. There is no validation pass: the epoch is its steps.

Overhead per step, two ways: at full size, the client's wall time per step minus the slowest worker's own time (its
gradient pass and the copy of its sums to the host), which the workers report; and the time of a step on shards of
one sample, where there is nothing left but the engine: messages, scheduling, the sum and the update.

Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import numpy as np

import gpunn
from gpunn import diagnostics
from gpunn.backend import get_backend
from gpunn.cluster import ClusterBackend, ClusterEpochs, connect
from gpunn.model import Preprocessing
from gpunn.nn import Architecture, Layer, init_params
from gpunn.train import DeviceData, Epochs, TrainConfig

WARM_EPOCHS = 2
TINY_STEPS = 40


class OneProcess:
    """gpunn's single-process runner. Its step's context (a fast path's buffers, the Numba pass's index of X, its
    thread count) is held for the whole benchmark: nothing else in this process uses Numba or multi-threaded BLAS
    (the clusters' client only sums and updates)."""

    name = "one process"

    def __init__(self, arch: Architecture, config: TrainConfig, X: np.ndarray, y: np.ndarray, params: list[Layer]):
        backend = get_backend("cpu")
        step = backend.step(arch, dtype=config.dtype, columns=config.batch_columns(len(y)))
        self.step_name = step.name
        train = DeviceData.from_host(X, y, backend=backend, dtype=config.dtype,
                                     preprocessing=None if step.pixels else Preprocessing())
        self.stack = ExitStack()
        gradients = self.stack.enter_context(step.gradients())
        update = self.stack.enter_context(step.update(config.rule))
        self.runner = Epochs(arch, config, train, None, backend, gradients, update)
        self.runner.load(params, config.rule.init(params), epochs_done=0)
        self.epoch = 0

    def run(self, epochs: int) -> None:
        for _ in range(epochs):
            self.epoch += 1
            self.runner.run(self.epoch)

    def loss(self) -> float:
        return float(self.runner.metrics[(self.epoch - 1) % self.runner.capacity, 0])

    def close(self) -> None:
        self.stack.close()


class OnCluster(OneProcess):
    """A LocalCluster of ``workers`` processes, and gpunn's cluster runner on it, its shards sent."""

    def __init__(self, workers: int, arch: Architecture, config: TrainConfig, X: np.ndarray, y: np.ndarray,
                 params: list[Layer]):
        self.name = f"local:{workers}"
        self.stack = ExitStack()
        self.backend: ClusterBackend = self.stack.enter_context(connect(self.name, device="cpu"))
        step = self.backend.step(arch, dtype=config.dtype, columns=config.batch_columns(len(y)))
        train = DeviceData.from_host(X, y, backend=self.backend, dtype=config.dtype, preprocessing=None)
        self.runner: ClusterEpochs = self.stack.enter_context(step.epochs(config, train, None, 1))
        self.step_name = self.runner.name
        self.runner.load(params, config.rule.init(params), epochs_done=0)
        self.epoch = 0
        self.workers = [w.label() for w in self.backend.workers]

    def tiny_step_seconds(self, arch: Architecture, config: TrainConfig, X: np.ndarray, y: np.ndarray,
                          params: list[Layer]) -> dict[str, float]:
        """Steps on shards of one sample each: the engine alone (the workers' own time is reported beside it)."""
        n = len(self.backend.workers)
        train = DeviceData.from_host(np.ascontiguousarray(X[:, :n]), y[:n], backend=self.backend, dtype=config.dtype,
                                     preprocessing=None)
        full = TrainConfig(**{**config.as_dict(), "hidden": tuple(config.hidden), "batch_size": None})
        with self.backend.step(arch, dtype=config.dtype, columns=n).epochs(full, train, None, 1) as runner:
            runner.load(params, full.rule.init(params), epochs_done=0)
            runner.run(1)  # the first call of a new actor
            runner.profile = type(runner.profile)()
            start = time.perf_counter()
            for epoch in range(2, TINY_STEPS + 2):
                runner.run(epoch)
            seconds = (time.perf_counter() - start) / TINY_STEPS
            return {"step_ms": seconds * 1e3, "worker_ms": runner.profile.worker_seconds / TINY_STEPS * 1e3}


def slot(config: Any, epochs: int) -> float:
    """Seconds per epoch over ``epochs`` epochs, the garbage collector run before and held off meanwhile."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        config.run(epochs)
        return (time.perf_counter() - start) / epochs
    finally:
        gc.enable()


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


@click.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="MNIST's IDX files; default: the bundled sample.")
@click.option("--m", "m", type=click.IntRange(min=2), default=None,
              help="Use the first M training digits (default: all).")
@click.option("--hidden", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Mini-batches of this many (default: full batch).")
@click.option("--workers", default="1,2", show_default=True, help="Cluster sizes to time, comma-separated.")
@click.option("--rounds", type=click.IntRange(min=1), default=7, show_default=True)
@click.option("--slot-ms", type=click.FloatRange(min=0), default=1000, show_default=True,
              help="Each slot runs the epochs that last at least this long in one process.")
@click.option("--settle-ms", type=click.FloatRange(min=0), default=150, show_default=True,
              help="Untimed rest after each slot (OpenBLAS's threads spin for ~0.1 s after their last call).")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path(__file__).resolve().parent / "results",
              show_default=True)
@click.option("--name", default="cluster-scaling", show_default=True)
def main(data_dir: Path | None, m: int | None, hidden: int, dtype: str, batch_size: int | None, workers: str,
         rounds: int, slot_ms: float, settle_ms: float, out_dir: Path, name: str) -> None:
    data = gpunn.load_bundled_sample() if data_dir is None else gpunn.load_idx_dir(data_dir)
    X = np.ascontiguousarray(data.train_images[:m].T)  # (784, m), one digit per column, as gpunn.split gives it
    y = data.train_labels[:m].astype(np.int64)
    m = len(y)
    arch = Architecture((X.shape[0], hidden, 10))
    config = TrainConfig(hidden=(hidden,), dtype=dtype, epochs=10**9, lr=0.1, batch_size=batch_size)
    params = [Layer(W, b) for W, b in init_params(arch, init="he", seed=0, dtype=dtype)]
    sizes = [int(n) for n in workers.split(",")]
    load_before = load_average()

    configs: list[OneProcess] = [OneProcess(arch, config, X, y, params)]
    configs += [OnCluster(n, arch, config, X, y, params) for n in sizes]
    try:
        for c in configs:
            c.run(WARM_EPOCHS)  # compile or load the kernels, build indexes, first messages: not timed
        reference = configs[0].loss()
        checks = {c.name: c.loss() for c in configs}
        tolerance = 1e-4 if dtype == "float32" else 1e-9
        refused = [n for n, loss in checks.items() if abs(loss - reference) > tolerance * abs(reference)]
        if refused:
            raise click.ClickException(f"not the same step: losses after {WARM_EPOCHS} epochs {checks}")
        k = max(1, math.ceil(slot_ms / 1e3 / slot(configs[0], 1)))
        times: dict[str, list[float]] = {c.name: [] for c in configs}
        orders = []
        profiles: dict[str, list[float]] = {c.name: [0, 0.0, 0.0] for c in configs if isinstance(c, OnCluster)}
        for r in range(rounds):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            orders.append([c.name for c in order])
            for c in order:
                before = (c.runner.profile.steps, c.runner.profile.seconds, c.runner.profile.worker_seconds) \
                    if isinstance(c, OnCluster) else None
                times[c.name].append(slot(c, k))
                if before is not None:
                    p = c.runner.profile
                    total = profiles[c.name]
                    total[0] += p.steps - before[0]
                    total[1] += p.seconds - before[1]
                    total[2] += p.worker_seconds - before[2]
                time.sleep(settle_ms / 1e3)
        tiny = {c.name: c.tiny_step_seconds(arch, config, X, y, params) for c in configs if isinstance(c, OnCluster)}
    finally:
        for c in reversed(configs):
            c.close()

    n_params = sum(W.size + b.size for W, b in params)
    itemsize = np.dtype(dtype).itemsize
    steps = -(-m // config.batch_columns(m))
    rows = []
    for c in configs:
        own = times[c.name]
        ratios = [t / base for t, base in zip(own, times[configs[0].name])]
        row = {"configuration": c.name, "step": c.step_name, "epoch_ms": [t * 1e3 for t in own],
               "median_ms": statistics.median(own) * 1e3, "min_ms": min(own) * 1e3,
               "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
               "loss_after_warmup": checks[c.name]}
        if isinstance(c, OnCluster):
            count, wall, worker = profiles[c.name]
            row.update(workers=c.workers, steps_timed=count, step_ms=wall / count * 1e3,
                       worker_step_ms=worker / count * 1e3, overhead_ms=(wall - worker) / count * 1e3,
                       tiny_step_ms=tiny[c.name]["step_ms"], tiny_worker_ms=tiny[c.name]["worker_ms"])
        rows.append(row)
    result = {
        "name": name,
        "command": "python " + " ".join([Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv)]),
        "data": data.source, "m": m, "hidden": hidden, "dtype": dtype, "batch_size": batch_size,
        "steps_per_epoch": steps, "epochs_per_slot": k, "rounds": rounds, "orders": orders,
        "parameters": n_params,
        "bytes_per_step_per_worker": {"to_worker": n_params * itemsize, "from_worker": n_params * itemsize + 16,
                                      "index_to_worker": 0 if batch_size is None else 8 * config.batch_columns(m)},
        "load_average": {"before": load_before, "after": load_average()},
        "machine": {"cpu": diagnostics.cpu_model(), "logical_cores": os.cpu_count(),
                    "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "python": platform.python_version(), "numpy": np.__version__, "gpunn": gpunn.__version__,
                    "dask": _version("distributed")},
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(result))
    click.echo(markdown(result))


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def markdown(result: dict[str, Any]) -> str:
    machine, load = result["machine"], result["load_average"]
    batch = "full batch" if result["batch_size"] is None else f"mini-batches of {result['batch_size']}"
    lines = [
        f"# Epoch time on a LocalCluster, interleaved: {result['name']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"- data: {result['data']}, m = {result['m']:,}; 784-{result['hidden']}-10, {result['dtype']}, {batch} "
        f"({result['steps_per_epoch']} step{'s' if result['steps_per_epoch'] != 1 else ''} per epoch), no validation",
        f"- {result['rounds']} rounds of one slot of {result['epochs_per_slot']} epochs per configuration, order "
        "rotated each round",
        f"- machine: {machine['cpu']}, {machine['logical_cores']} logical cores, {machine['usable_cores']} usable; "
        f"Python {machine['python']}, NumPy {machine['numpy']}, Dask distributed {machine['dask']}, gpunn "
        f"{machine['gpunn']}; 1-minute load average {load['before']} before, {load['after']} after (ours included)",
        f"- per step and worker: {result['bytes_per_step_per_worker']['to_worker']:,} bytes of parameters out, "
        f"{result['bytes_per_step_per_worker']['from_worker']:,} bytes of sums back"
        + (f", up to {result['bytes_per_step_per_worker']['index_to_worker']:,} bytes of sample numbers out"
           if result["batch_size"] else ""),
        "",
        "| configuration | median ms/epoch | min | ratio to one process (median, min–max) | mean ms/step | the slowest "
        "worker's own | overhead per step | ms/step on 1-sample shards | step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in result["rows"]:
        cluster = [f"{row[k]:.2f}" for k in ("step_ms", "worker_step_ms", "overhead_ms", "tiny_step_ms")] \
            if "step_ms" in row else ["", "", "", ""]
        lines.append(f"| {row['configuration']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | "
                     f"{row['ratio_median']:.2f} ({row['ratio_min']:.2f}–{row['ratio_max']:.2f}) | "
                     + " | ".join(cluster) + f" | {row['step']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
