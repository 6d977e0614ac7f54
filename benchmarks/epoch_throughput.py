"""Steady-state time of one full-batch epoch: gpunn on every device present, beside what a user would run instead.

    python benchmarks/epoch_throughput.py                        # synthetic data of MNIST's shape, m = 60,000
    python benchmarks/epoch_throughput.py --data-dir DIR         # real MNIST training images
    python benchmarks/epoch_throughput.py --m 512 --hidden 10 --epochs 2 --out-dir /tmp/b   # toy size

For every device, dtype and hidden size it times gpunn's training step and each peer (benchmarks/peers/) doing the
same step from the same initial weights. A peer is timed only after it has shown that it computes that step: its
loss after 3 epochs must match gpunn's. The machine's own read bandwidth and GEMM rate give each row a lower bound
(X read once; 3196·h·m FLOPs per epoch for one hidden layer of h units), and the ratio to it.

Writes NAME.json (environment and every measurement), NAME.md (the table) and, with matplotlib, NAME.png.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the peers package beside this script

from gpunn.backend import GENERIC, Backend, get_backend  # noqa: E402
from gpunn.errors import BackendError  # noqa: E402
from gpunn.model import Preprocessing  # noqa: E402
from gpunn.nn import Architecture, Layer, cost, forward, init_params, one_hot  # noqa: E402
from gpunn.optim import Optimizer  # noqa: E402
from gpunn.train import DeviceData, train_step  # noqa: E402

CHECK_EPOCHS = 3
CHECK_SAMPLES = 1024
LR = 0.1
# implementation name -> (module in peers/, factory in it)
PEERS = {
    "numpy-naive": ("peers.naive_numpy", "make"),
    "torch-eager": ("peers.torch_step", "make"),
    "torch-compile": ("peers.torch_step", "make_compiled"),
}


@dataclass
class Row:
    device: str
    dtype: str
    hidden: int
    implementation: str
    status: str = "ok"  # ok | refused: ... | failed: ...
    warmup_ms: list[float] = field(default_factory=list)
    epoch_ms: list[float] = field(default_factory=list)
    check_loss: float | None = None
    reference_loss: float | None = None
    bound_ms: float | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.epoch_ms)


# --- what is timed --------------------------------------------------------------------------------------------


class GpunnRunner:
    """gpunn's own training step, as `gpunn train` runs it (loss and accuracy computed on the device included),
    with the backend's gradient pass (its fast path, or the generic math) held from construction to close()."""

    def __init__(self, images, labels, params, *, lr, dtype, backend: Backend):
        self.backend = backend
        self.arch = Architecture((images.shape[1], *(W.shape[0] for W, _ in params[:-1]), 10))
        step = backend.step(self.arch, dtype=dtype, columns=len(labels))
        self.data = DeviceData.from_host(np.ascontiguousarray(images.T), labels, backend=backend, dtype=dtype,
                                         preprocessing=None if step.pixels else Preprocessing())
        self.weights = [Layer(backend.asarray(W.astype(dtype)), backend.asarray(b.astype(dtype))) for W, b in params]
        self.lr = lr
        self.rule = Optimizer("gd")
        self._scope = ExitStack()
        self.gradients = self._scope.enter_context(step.gradients())
        self.update = self._scope.enter_context(step.update(self.rule))

    def step(self) -> None:
        self.weights, _, _, _ = train_step(self.weights, {}, self.data, self.arch, lr=self.lr, t=1, rule=self.rule,
                                           gradients=self.gradients, update=self.update)

    def close(self) -> None:
        self._scope.close()

    def sync(self) -> None:
        self.backend.synchronize()

    def params(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.backend.to_numpy(W), self.backend.to_numpy(b)) for W, b in self.weights]


@dataclass(frozen=True)
class Budget:
    """How many epochs to time: ``warmup`` untimed ones, then ``epochs``, or fewer (but at least ``min_epochs``)
    once the timed ones add up to ``row_seconds``, so that the largest rows do not take minutes each."""

    warmup: int = 1
    epochs: int = 5
    min_epochs: int = 2
    row_seconds: float = 2.0


def time_epochs(runner: Any, budget: Budget) -> tuple[list[float], list[float]]:
    """Milliseconds of each warm-up epoch and each timed epoch; the device is synchronized before every clock read."""
    warmup, timed = [], []
    runner.sync()
    while len(timed) < budget.epochs and (len(timed) < budget.min_epochs or sum(timed) < budget.row_seconds * 1e3):
        start = time.perf_counter()
        runner.step()
        runner.sync()
        elapsed = (time.perf_counter() - start) * 1e3
        (warmup if len(warmup) < budget.warmup else timed).append(elapsed)
    return warmup, timed


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
        for _ in range(CHECK_EPOCHS):
            runner.step()
        runner.sync()
        return reference_loss(runner.params(), images, labels)
    finally:
        close(runner)


def close(runner: Any) -> None:
    """Let a runner give back what it holds (gpunn's threads and BLAS setting); peers hold nothing."""
    getattr(runner, "close", lambda: None)()


def same_step(loss: float, reference: float, dtype: str) -> bool:
    """Do two losses after CHECK_EPOCHS epochs agree within the rounding of ``dtype``?"""
    tolerance = 1e-9 if dtype == "float64" else 1e-4
    return abs(loss - reference) <= tolerance * abs(reference)


def verdict(loss: float, reference: float, dtype: str) -> str:
    """A row's status after the check: "ok" when its loss matches gpunn's, else why it is refused."""
    if same_step(loss, reference, dtype):
        return "ok"
    return (f"refused: its loss after {CHECK_EPOCHS} epochs is {loss:.8g}, gpunn's {reference:.8g}: it does not "
            "compute the same step")


# --- the machine's limits -------------------------------------------------------------------------------------


def measure_limits(backend: Backend, dtypes: list[str], *, size: int) -> dict[str, float]:
    """Read bandwidth (bytes/s) and GEMM rate (FLOP/s per dtype), best of a few runs, on ``backend``."""
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
    return limits


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


def lower_bound_ms(hidden: int, m: int, dtype: str, limits: dict[str, float]) -> float:
    """X (784 x m, in the dtype) read once, or the GEMM FLOPs 3196·h·m done at the measured rate: the larger."""
    itemsize = np.dtype(dtype).itemsize
    read = 784 * m * itemsize / limits["read_bytes_per_s"]
    flops = 3196 * hidden * m / limits[f"gemm_flops_per_s_{dtype}"]
    return max(read, flops) * 1e3


# --- environment and reports ----------------------------------------------------------------------------------


def environment(backends: list[Backend]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "devices": {backend.name: backend.describe() for backend in backends},
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    return env


def markdown(result: dict[str, Any]) -> str:
    rows = [Row(**{k: v for k, v in r.items() if k in Row.__dataclass_fields__}) for r in result["rows"]]
    ok = [r for r in rows if r.status == "ok"]
    budget = result["budget"]

    def find(device, dtype, hidden, implementation):
        return next((r for r in ok if (r.device, r.dtype, r.hidden, r.implementation) ==
                     (device, dtype, hidden, implementation)), None)

    lines = [
        f"# Full-batch epoch throughput: {result['name']}",
        "",
        f"Data: {result['data']}, m = {result['m']:,}. Each row: {budget['warmup']} warm-up epoch (its time in "
        f"'first epoch'), then {budget['min_epochs']} to {budget['epochs']} timed epochs (fewer for the slowest rows, "
        f"whose timed epochs stop after {budget['row_seconds']:g} s). Command: `{result['command']}`",
        "",
    ]
    for name, described in result["environment"]["devices"].items():
        lines.append(f"- {name}: " + ", ".join(v for k, v in described.items() if k != "device"))
    torch_version = result["environment"].get("torch")
    lines += [f"- torch: {torch_version or 'not installed (no PyTorch rows)'}", ""]
    for device, limits in result["limits"].items():
        gemm = ", ".join(f"{k.rsplit('_', 1)[1]} {v / 1e9:.0f} GFLOP/s" for k, v in limits.items() if k.startswith("gemm"))
        lines.append(f"- measured limits on {device}: read {limits['read_bytes_per_s'] / 1e9:.1f} GB/s, GEMM {gemm}")
    lines += [
        "",
        "| device | dtype | hidden | implementation | median ms/epoch | min–max ms | first epoch ms | epochs/s "
        "| M samples/s | bound ms | × bound | × gpunn | × naive NumPy | GPU speed-up |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in ok:
        gpunn = find(r.device, r.dtype, r.hidden, "gpunn")
        naive = find("cpu", "float64", r.hidden, "numpy-naive")
        cpu_twin = find("cpu", r.dtype, r.hidden, r.implementation)
        speedup = f"{cpu_twin.median_ms / r.median_ms:.1f}×" if r.device != "cpu" and cpu_twin else ""
        lines.append(
            f"| {r.device} | {r.dtype} | {r.hidden} | {r.implementation} | {r.median_ms:.2f} | "
            f"{min(r.epoch_ms):.2f}–{max(r.epoch_ms):.2f} | {r.warmup_ms[0] if r.warmup_ms else float('nan'):.1f} | "
            f"{1e3 / r.median_ms:.1f} | {result['m'] / r.median_ms / 1e3:.2f} | {r.bound_ms:.2f} | "
            f"{r.median_ms / r.bound_ms:.2f} | {r.median_ms / gpunn.median_ms if gpunn else float('nan'):.2f} | "
            f"{naive.median_ms / r.median_ms if naive else float('nan'):.2f} | {speedup} |"
        )
    skipped = [r for r in rows if r.status != "ok"]
    if skipped:
        lines += ["", "Not reported:", ""]
        lines += [f"- {r.implementation} on {r.device}, {r.dtype}, hidden {r.hidden}: {r.status}" for r in skipped]
    lines += [
        "",
        "× bound: median time over the lower bound (X read once at the measured bandwidth, or 3196·h·m FLOPs at the "
        "measured GEMM rate, whichever is larger). × gpunn: time over gpunn's on the same device, dtype and size "
        "(above 1 is slower than gpunn). × naive NumPy: the naive program's time (float64, CPU) over this row's "
        "(above 1 is faster than it). GPU speed-up: the same implementation's CPU time over its GPU time.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for r in result["rows"]:
        if r["status"] == "ok":
            key = (r["device"], r["implementation"], r["dtype"])
            series.setdefault(key, []).append((r["hidden"], result["m"] / statistics.median(r["epoch_ms"]) * 1e3))
    colors = {name: f"C{i}" for i, name in enumerate(["gpunn", "gpunn-generic", *PEERS])}
    for (device, implementation, dtype), points in sorted(series.items()):
        points.sort()
        ax.plot(*zip(*points), color=colors.get(implementation, "k"), linestyle="-" if dtype == "float32" else "--",
                marker="o" if device == "cpu" else "s", label=f"{implementation} on {device}, {dtype}")
    sizes = sorted({r["hidden"] for r in result["rows"]})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(h) for h in sizes])
    ax.minorticks_off()
    ax.set_xlabel("hidden units (784-h-10)")
    ax.set_ylabel("training samples per second (full-batch epochs)")
    ax.set_title(f"Full-batch epoch throughput, m = {result['m']:,} ({result['name']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
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
@click.option("--peers", default="numpy-naive,torch-eager", show_default=True,
              help=f"Peers to time beside gpunn, from {', '.join(PEERS)}; 'none' for none.")
@click.option("--warmup", type=click.IntRange(min=1), default=1, show_default=True, help="Untimed epochs per row.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True, help="Timed epochs per row, at most.")
@click.option("--min-epochs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Timed epochs per row, at least.")
@click.option("--row-seconds", type=float, default=2.0, show_default=True,
              help="Stop timing a row after --min-epochs once its timed epochs add up to this.")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
@click.option("--name", help="File name stem of the results; default: the CPU or GPU model.")
def main(data_dir, m, hidden, dtypes, devices, peers, warmup, epochs, min_epochs, row_seconds, out_dir, name) -> None:
    """Time full-batch epochs of gpunn and its peers on every device present."""
    budget = Budget(warmup, epochs, min(min_epochs, epochs), row_seconds)
    hidden_sizes = [int(h) for h in hidden.split(",")]
    dtype_list = dtypes.split(",")
    peer_list = [] if peers == "none" else peers.split(",")
    for peer in peer_list:
        if peer not in PEERS:
            raise click.BadParameter(f"unknown peer {peer!r}; expected one of {', '.join(PEERS)}", param_hint="--peers")
    backends = [get_backend("cpu")]
    if devices == "auto":
        try:
            backends.append(get_backend("cuda"))
        except BackendError as error:
            click.echo(f"no GPU rows: {error.cause}")
    else:
        backends = [get_backend(d) for d in devices.split(",")]

    images, labels, data = load_data(data_dir, m)
    m = len(labels)
    click.echo(f"data: {data}, m = {m:,}")
    result: dict[str, Any] = {
        "name": name or default_name(backends),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "data": data,
        "m": m,
        "budget": asdict(budget),
        "environment": environment(backends),
        "limits": {},
        "rows": [],
    }
    check_images, check_labels = images[:CHECK_SAMPLES], labels[:CHECK_SAMPLES]
    for backend in backends:
        limits = measure_limits(backend, dtype_list, size=min(784 * m, 64 * 2**20))
        result["limits"][backend.name] = limits
        for dtype in dtype_list:
            for h in hidden_sizes:
                arch = Architecture((784, h, 10))
                params = init_params(arch, init="he", seed=0, dtype="float64")
                bound = lower_bound_ms(h, m, dtype, limits)
                # gpunn as `gpunn train` runs it and, where the backend has a fast path for this network, the
                # generic math beside it ("gpunn-generic"), which must agree with it like any peer
                variants = [("gpunn", backend)]
                if backend.step(arch, dtype=dtype, columns=m).name != GENERIC:
                    variants.append(("gpunn-generic", generic_twin(backend)))
                gpunn_check = None
                for implementation, variant in variants:
                    row = Row(backend.name, dtype, h, implementation, bound_ms=bound, reference_loss=gpunn_check)
                    make = lambda *a, _variant=variant, **k: GpunnRunner(*a, **k, backend=_variant)  # noqa: E731
                    row.check_loss = loss_after_steps(make, check_images, check_labels, params, dtype=dtype)
                    if gpunn_check is None:
                        gpunn_check = row.reference_loss = row.check_loss
                    else:
                        row.status = verdict(row.check_loss, gpunn_check, dtype)
                    if row.status == "ok":
                        run_row(row, lambda: make(images, labels, params, lr=LR, dtype=dtype), budget)
                    result["rows"].append(asdict(row))
                for peer in peer_list:
                    row = time_peer(peer, backend, dtype, h, params, images, labels, check_images, check_labels,
                                    gpunn_check, bound, budget)
                    if row is not None:
                        result["rows"].append(asdict(row))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_results(result, out_dir)


def time_peer(peer, backend, dtype, h, params, images, labels, check_images, check_labels, gpunn_check, bound,
              budget: Budget) -> Row | None:
    module_name, factory = PEERS[peer]
    module = import_module(module_name)
    device = backend.name
    if device.split(":")[0] not in module.DEVICES or dtype not in module.DTYPES:
        return None
    row = Row(device, dtype, h, peer, bound_ms=bound, reference_loss=gpunn_check)
    if not module.AVAILABLE:
        row.status = "failed: not installed"
        return row
    make = getattr(module, factory)
    try:
        row.check_loss = loss_after_steps(make, check_images, check_labels, params, dtype=dtype, device=device)
    except Exception as error:  # a peer that cannot run here (no compiler for torch.compile, ...) is reported
        row.status = f"failed: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
        return row
    row.status = verdict(row.check_loss, gpunn_check, dtype)
    if row.status != "ok":
        return row
    run_row(row, lambda: make(images, labels, params, lr=LR, dtype=dtype, device=device), budget)
    return row


def generic_twin(backend: Backend) -> Backend:
    """The same device with the fast paths off."""
    return get_backend(backend.name, fast=False)


def run_row(row: Row, make: Callable[[], Any], budget: Budget) -> None:
    runner = make()
    try:
        row.warmup_ms, row.epoch_ms = time_epochs(runner, budget)
    finally:
        close(runner)
    del runner
    click.echo(f"{row.device:>7} {row.dtype} h={row.hidden:<5} {row.implementation:<14} "
               f"{row.median_ms:9.2f} ms/epoch (first {row.warmup_ms[0]:.1f} ms, bound {row.bound_ms:.2f} ms)")


def load_data(data_dir: Path | None, m: int) -> tuple[np.ndarray, np.ndarray, str]:
    if data_dir is not None:
        from gpunn.data import load_idx_dir

        dataset = load_idx_dir(data_dir)
        return dataset.train_images[:m], dataset.train_labels[:m].astype(np.int64), f"MNIST from {data_dir}"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(m, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, size=m).astype(np.int64)
    return images, labels, "synthetic (uint8 pixels, labels 0-9, MNIST's shape; an epoch's cost does not depend on values)"


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
