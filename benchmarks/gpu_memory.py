"""GPU memory of training on CUDA: CuPy's memory pool after every epoch, and the most the run held.

    python benchmarks/gpu_memory.py --data-dir ../shared/data/mnist                 # 784-10-10, 20 epochs, --fast
    python benchmarks/gpu_memory.py --data-dir DIR --generic --hidden 256 --epochs 50

The run is gpunn's own `fit`, as `gpunn train` calls it, with a callback that reads CuPy's default memory pool after
each epoch's report: the bytes in use (``used_bytes``) and the bytes the pool holds from the device
(``total_bytes``). The pool keeps what it takes until it is told to give it back, so its holding at the end of the
run, the test set's evaluation included, is the most it held at any moment. The device's own view
(``cudaMemGetInfo``: what is in use on the GPU, this process's CUDA context, cuBLAS's workspace and CUDA graphs
included) is read at the start, after the first epoch and at the end.

"Flat" means the pool's bytes in use are the same after every epoch from the second on: a training loop that
allocates afresh each epoch without freeing would grow there.

Writes NAME.json and NAME.md; exit status 1 when the pool was not flat.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

MIB = 2**20


def device_used(cupy: Any) -> int:
    free, total = cupy.cuda.runtime.memGetInfo()
    return total - free


def row_md(when: str, row: dict[str, int]) -> str:
    gpu = f"{row['device_used'] / MIB:.0f}" if "device_used" in row else ""
    return f"| {when} | {row['pool_used'] / MIB:.1f} | {row['pool_total'] / MIB:.1f} | {gpu} |"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", type=click.Path(path_type=Path), help="MNIST IDX directory; default: the bundled sample.")
@click.option("--epochs", type=click.IntRange(min=3), default=20, show_default=True)
@click.option("--hidden", default="10", show_default=True, help="Hidden layer sizes, comma-separated.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--fast/--generic", default=True, show_default=True, help="The CUDA fast path, or the generic math.")
@click.option("--device", default="cuda", show_default=True, help="cuda or cuda:N.")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
@click.option("--name", default="gpu-memory", show_default=True, help="File name stem of the results.")
def main(data_dir: Path | None, epochs: int, hidden: str, dtype: str, fast: bool, device: str, out_dir: Path,
         name: str) -> None:
    """CuPy's pool after each epoch of a CUDA training run, and the most it held."""
    from gpunn.backend import get_backend
    from gpunn.data import load_bundled_sample, load_idx_dir, split
    from gpunn.train import EpochStats, TrainConfig, fit

    backend = get_backend(device, fast=fast)  # one place picks the device; BackendError says why not
    if not backend.is_cuda:
        raise click.UsageError(f"--device {device} is not a CUDA device: this script measures CuPy's pool")
    cupy = backend.cupy
    pool = cupy.get_default_memory_pool()
    dataset = load_idx_dir(data_dir) if data_dir is not None else load_bundled_sample()
    config = TrainConfig(hidden=tuple(int(n) for n in hidden.split(",")), dtype=dtype, epochs=epochs)
    parts = split(dataset, val_size=config.val_size, seed=config.seed)
    start = {"device_used": device_used(cupy), "pool_used": pool.used_bytes(), "pool_total": pool.total_bytes()}
    after: list[dict[str, int]] = []

    def on_epoch(stats: EpochStats) -> None:
        after.append({"epoch": stats.epoch, "pool_used": pool.used_bytes(), "pool_total": pool.total_bytes(),
                      **({"device_used": device_used(cupy)} if stats.epoch == 1 else {})})

    result = fit(parts, config, backend=backend, on_epoch=on_epoch)
    end = {"device_used": device_used(cupy), "pool_used": pool.used_bytes(), "pool_total": pool.total_bytes()}
    steady = [row["pool_used"] for row in after if row["epoch"] >= 2]
    growth = max(steady) - min(steady)
    record = {
        "name": name,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "gpu": backend.summary(),
        "step": result.model.info.get("step"),
        "layer_sizes": list(result.model.arch.sizes),
        "dtype": dtype,
        "train_samples": result.train_samples,
        "epochs": epochs,
        "start": start,
        "after_epoch": after,
        "end": end,
        "pool_peak_mib": end["pool_total"] / MIB,
        "device_peak_seen_mib": max(start["device_used"], after[0]["device_used"], end["device_used"]) / MIB,
        "steady_growth_bytes": growth,
        "flat_after_epoch_2": growth == 0,
        "test_accuracy": result.test_accuracy,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# GPU memory: {record['gpu']}", "",
        f"`{record['command']}`", "",
        f"{'-'.join(map(str, record['layer_sizes']))}, {dtype}, {result.train_samples:,} samples, {epochs} epochs, "
        f"step: {record['step']}", "",
        "| when | pool in use (MiB) | pool held (MiB) | GPU in use (MiB) |", "| --- | ---: | ---: | ---: |",
        row_md("start (CUDA started)", start),
        *(row_md(f"after epoch {row['epoch']}", row) for row in after[:3] + after[-1:]),
        row_md("end (test set evaluated)", end), "",
        f"Pool in use after epochs 2-{epochs}: {'flat' if growth == 0 else f'grew by {growth:,} bytes'}. "
        f"Most the pool held: {record['pool_peak_mib']:.1f} MiB.",
    ]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    click.echo("\n".join(lines))
    sys.exit(0 if growth == 0 else 1)


if __name__ == "__main__":
    main()
