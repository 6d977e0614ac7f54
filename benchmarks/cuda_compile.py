"""How long a first CUDA run waits for its kernels: NVRTC's time for each module gpunn loads, on this CPU.

    python benchmarks/cuda_compile.py                      # the modules of a 784-10-10 run, and every whole file
    python benchmarks/cuda_compile.py --hidden 16 --arch sm_80 --rounds 5

CuPy compiles each RawModule once, on the host, with NVRTC, and keeps the binary in its disk cache; a machine's first
run of gpunn on CUDA waits for the modules its step loads (gpunn.fused_cuda.module_options: single_pass.cu's passes
for one hidden size at a time). This script compiles, with the options CupyDevice gives CuPy and the cubin CuPy asks
for on a GPU it knows, the modules a run of 784-h-10 loads (no GPU needed), and each kernel file whole, as it was
compiled before modules were cut by hidden size. Each compile is timed --rounds times, in rotated order (NVRTC in
this process, through the test suite's ctypes wrapper: pip install nvidia-cuda-nvrtc==13.0.*, as `make test` has it).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # cuda_on_cpu.nvrtc: NVRTC through ctypes

from cuda_on_cpu.nvrtc import NvrtcNotFound, find_nvrtc  # noqa: E402

from gpunn.fused_cuda import (  # noqa: E402
    CUPY_ADDED_OPTIONS,
    RAWMODULE_OPTIONS,
    kernel_files,
    kernel_signatures,
    kernel_source,
    module_options,
    single_pass_width,
)


def run_modules(hidden: int) -> dict[tuple[str, tuple[str, ...]], list[str]]:
    """The modules CupyDevice loads for a 784-h-10 run's fast path, both dtypes: (file, options) -> kernels."""
    hp = single_pass_width(hidden)
    wanted = [info for info in kernel_signatures().values()
              if info.file != "single_pass.cu" or module_options(info) in {(f"-DSP_ONLY_HP={hp}",), ("-DSP_ONLY_HP=0",)}]
    modules: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for info in wanted:
        modules.setdefault((info.file, module_options(info)), []).append(info.name)
    return modules


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hidden", type=click.IntRange(1, 16), default=10, show_default=True,
              help="The run's hidden units (one layer, the single pass's range).")
@click.option("--arch", default="sm_90", show_default=True, help="NVRTC's -arch: sm_XY (a cubin) or compute_XY (PTX).")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Also write the results here, as JSON.")
def main(hidden: int, arch: str, rounds: int, out: Path | None) -> None:
    """NVRTC's time for the modules a first CUDA run compiles, and for each kernel file whole."""
    try:
        nvrtc = find_nvrtc()
    except NvrtcNotFound as error:
        raise click.ClickException(str(error)) from None
    modules = run_modules(hidden)
    jobs = {f"{file} {' '.join(options) or '(whole)'}": (file, options) for file, options in modules}
    jobs.update({f"{path.name} (whole)": (path.name, ()) for path in kernel_files()})
    seconds: dict[str, list[float]] = {name: [] for name in jobs}
    names = list(jobs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            file, options = jobs[name]
            # a distinct comment per round: the wrapper keeps each compile's result for the process
            source = kernel_source(file) + f"\n// round {r}\n"
            start = time.perf_counter()
            nvrtc.compile(source, file, RAWMODULE_OPTIONS + CUPY_ADDED_OPTIONS + options + (f"-arch={arch}",))
            seconds[name].append(time.perf_counter() - start)
    rows = [{"module": name, "in_a_run": jobs[name] in modules, "min_s": min(times), "median_s": statistics.median(times)}
            for name, times in seconds.items()]
    click.echo(f"NVRTC {nvrtc.version[0]}.{nvrtc.version[1]}, -arch={arch}, {rounds} rounds; a 784-{hidden}-10 run "
               "loads the modules marked *")
    for row in rows:
        click.echo(f"{'*' if row['in_a_run'] else ' '} {row['module']:<40} min {row['min_s']:6.2f} s  "
                   f"median {row['median_s']:6.2f} s")
    total = sum(row["median_s"] for row in rows if row["in_a_run"])
    whole = sum(row["median_s"] for row in rows if row["module"].endswith("(whole)"))
    click.echo(f"a run's modules: {total:.2f} s (medians added); every file whole: {whole:.2f} s")
    if out is not None:
        out.write_text(json.dumps({"command": "python " + " ".join(["benchmarks/cuda_compile.py", *sys.argv[1:]]),
                                   "nvrtc": list(nvrtc.version), "arch": arch, "hidden": hidden, "rounds": rounds,
                                   "rows": rows, "run_s": total, "whole_s": whole}, indent=1) + "\n")


if __name__ == "__main__":
    main()
