"""Peak memory of `gpunn train` on the CPU, over what the interpreter and its libraries take before any data.

    python benchmarks/train_memory.py --data-dir ../shared/data/mnist      # full MNIST
    python benchmarks/train_memory.py --epochs 2 --out-dir /tmp/m          # the bundled sample, as a smoke test
    python benchmarks/train_memory.py --data-dir DIR -- --hidden 256       # after --: more `gpunn train` options

Three fresh interpreters report their own peak resident set size (Linux's VmHWM): a baseline that imports everything
`gpunn train` imports and makes one BLAS call (so OpenBLAS has started its threads and buffers); the training run
itself; and, after it, the floor of a run on the CPU's single pass: the baseline, then the run's step on 16 blank
samples (Numba imported, its kernel loaded from the cache the run left, called once), with no data set. The run's
peak over the baseline is set against the size of the training images in float32, X, which a full-batch step of
the generic math must hold.

Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

# Each child reads its own peak from /proc/self/status (VmHWM) as it exits. The kernel's rusage figure for a child
# (wait4) would not do: on Linux it starts from the parent's resident size at fork and keeps it across exec.
PROBE = """
import atexit, os

def _report_peak():
    with open("/proc/self/status") as status:
        peak_kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["GPUNN_PEAK_FILE"], "w") as out:
        out.write(peak_kib)

atexit.register(_report_peak)
"""
# what `gpunn train --data-dir` imports (pandas only comes with --train-csv), and one BLAS call
BASELINE = """
import numpy as np, click, threadpoolctl
import gpunn.cli, gpunn.backend, gpunn.data, gpunn.train, gpunn.model, gpunn.files, gpunn.fused_cpu
a = np.ones((512, 512), np.float32)
a @ a
"""
# the baseline, and the step `gpunn train` takes by default (784-10-10, float32, a full batch of 60,000) on 16
# blank samples: Numba's runtime with the run's kernel in it, and no data
SINGLE_PASS_FLOOR = BASELINE + """
import numpy as np
from gpunn.backend import get_backend
from gpunn.nn import Architecture, init_params
arch = Architecture((784, 10, 10))
step = get_backend("cpu").step(arch, dtype="float32", columns=60_000)
with step.gradients() as gradients:
    gradients(init_params(arch, init="he", seed=0, dtype="float32"), np.zeros((784, 16), np.uint8), None,
              np.zeros(16, np.int64))
"""
TRAIN = """
import sys
from gpunn.cli import main
main(sys.argv[1:], prog_name="gpunn")
"""


def peak_rss_bytes(code: str, *args: str) -> int:
    """Run ``code`` in a fresh interpreter, ``args`` as its arguments, and return its peak resident set size."""
    if not Path("/proc/self/status").exists():
        raise click.ClickException("this script reads peak memory from /proc/self/status, which only Linux has")
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "peak"
        done = subprocess.run([sys.executable, "-c", PROBE + code, *args], capture_output=True, text=True,
                              env={**os.environ, "GPUNN_PEAK_FILE": str(report)})
        if done.returncode != 0:
            raise click.ClickException(f"{' '.join(args) or 'the baseline'} failed ({done.returncode}):\n"
                                       f"{(done.stdout + done.stderr)[-2000:]}")
        return int(report.read_text()) * 1024


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", type=click.Path(path_type=Path), help="MNIST IDX directory; default: the bundled sample.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
@click.option("--name", default="train-memory", show_default=True, help="File name stem of the results.")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def main(data_dir: Path | None, epochs: int, out_dir: Path, name: str, train_args: tuple[str, ...]) -> None:
    """Peak memory of `gpunn train --device cpu`, over the interpreter and libraries."""
    from gpunn.data import load_bundled_sample, load_idx_dir

    dataset = load_idx_dir(data_dir) if data_dir is not None else load_bundled_sample()
    val_size = 1000
    n_train = len(dataset.train_labels) - val_size
    x_bytes = dataset.n_features * n_train * np.dtype(np.float32).itemsize
    options = ["--device", "cpu", "--epochs", str(epochs), "--val-size", str(val_size), *train_args]
    if data_dir is not None:
        options += ["--data-dir", str(data_dir)]
    with tempfile.TemporaryDirectory() as scratch:
        baseline = peak_rss_bytes(BASELINE)
        peak = peak_rss_bytes(TRAIN, "train", *options, "--quiet", "--out", str(Path(scratch) / "model.npz"))
        floor = peak_rss_bytes(SINGLE_PASS_FLOOR)
    over = peak - baseline
    result = {
        "name": name,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "train_command": " ".join(["gpunn", "train", *options]),
        "data": str(data_dir) if data_dir is not None else "bundled sample",
        "train_samples": n_train,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "baseline_mib": baseline / 2**20,
        "single_pass_floor_mib": floor / 2**20,
        "peak_mib": peak / 2**20,
        "over_baseline_mib": over / 2**20,
        "x_float32_mib": x_bytes / 2**20,
        "over_baseline_in_x": over / x_bytes,
    }
    table = "\n".join([
        f"# Peak memory of gpunn train on the CPU: {name}",
        "",
        f"`{result['train_command']}` ({n_train:,} training samples; measured with `{result['command']}`)",
        "",
        "| baseline (interpreter, libraries) | single pass's floor (no data) | peak of the training run | "
        "over the baseline | X in float32 | over / X |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {result['baseline_mib']:.0f} MiB | {result['single_pass_floor_mib']:.0f} MiB | "
        f"{result['peak_mib']:.0f} MiB | {result['over_baseline_mib']:.0f} MiB | {result['x_float32_mib']:.0f} MiB | "
        f"{result['over_baseline_in_x']:.2f} |",
        "",
        "The single pass's floor: the baseline, then the default run's step (784-10-10, float32, the narrow kernel "
        "from Numba's cache) on 16 blank samples.",
        "",
    ])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(table)
    click.echo(table)
    click.echo(f"wrote {out_dir / name}.json, {out_dir / name}.md")


if __name__ == "__main__":
    main()
