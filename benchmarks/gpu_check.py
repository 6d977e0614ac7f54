"""Check gpunn on a machine with an NVIDIA GPU, in one command, and keep everything it saw.

    make gpu-check OUT=DIR [DATA=../shared/data/mnist]
    python3 benchmarks/gpu_check.py --out DIR [--data-dir DIR] [--budget-s 450] [--steps trainings,precision,...]

It runs with the interpreter that starts it and the PYTHONPATH it finds: it makes no virtual environment and
installs nothing (the GPU machines have no network). In order, each step with its output in its own log under DIR:

1. ``gpunn info`` (printed too): versions, the CPU, the GPU or why there is none;
2. the data: MNIST's four IDX files in --data-dir;
3. the GPU: CuPy imports and cuda:0 answers. Where it does not, the check stops here with one line and exit 1;
4. ``gpunn train`` of the default 784-10-10 for 500 epochs on the full MNIST, on cuda and on cpu from the same
   seed, each with its fast path (--fast) and with --generic (--metrics-out and --out under DIR); each step's
   seconds are the command's, from its start to the model on disk, and the metrics hold the training's share;
5. the comparison of those runs: test accuracy within 0.1 point and final weights within 1e-4 (relative to each
   array's largest weight) between cuda and cpu, and between cuda's fast path and its generic math;
6. ``gpunn train --device cuda`` with its defaults, as a user waits for it: once cold (CuPy's kernel cache and the
   driver's JIT cache empty, so NVRTC compiles what the run needs, as on a user's first run), then three times warm;
   wall time and the training's share (DIR/e2e.json);
7. benchmarks/gpu_memory.py: CuPy's pool after each epoch (flat from the second on) and the most it held, with
   the fast path and with the generic math;
8. benchmarks/epoch_throughput.py on cuda with the PyTorch peers (eager, and CUDA graphs where the script has
   them), with shorter timing options than its defaults where it has them; its JSON and markdown go to DIR/bench;
9. torch.compile beside gpunn and the other peers on cuda, for 784-10-10 in float32 alone (its compilations take
   tens of seconds per shape);
10. the tensor-core precisions: ``gpunn train --device cuda --hidden 256`` in float32, tf32 and bf16 from the same
    seed, their test accuracies within 0.3 point of float32's (DIR/precision.json), and the benchmark's rows for
    h = 256 and 1024 in tf32 and bf16 (--precision), beside PyTorch's in the same precision;
11. ``pytest -m gpu``: every test marked gpu, the CuPy case of each backend-parametrized test and the CuPy variant
    of each CUDA fast-path parity test among them (after the figures: how long the tests take on a GPU is unknown);
12. ``ncu`` (where it is on PATH) on the single pass's kernels: throughput, occupancy, stall reasons and where
    they stall; and each kernel's time in one epoch of 784-10-10 and of 784-64-10 (DIR/ncu-epoch.json);
13. the CPU rows of the benchmark on the same machine;
14. the CUDA fast path's CPU-side tests (tests/test_kernels.py, tests/test_fused_cuda.py: NVRTC, the emulator),
    last, since CI runs them too.

A step that fails is recorded and the next ones still run (except after step 3); the exit status is 1 when any
step failed. ``--steps`` runs only the named ones, after steps 1-3 (which every check needs): trainings (4 and 5),
e2e, memory, bench-cuda (8 and 9), precision, tests, profile, bench-cpu and cpu-tests, in that order. The last thing
printed is a summary table, also written as DIR/summary.md and DIR/summary.json. Every step has a time limit, and
all of them together share --budget-s (7.5 minutes by default), so that the check fits the 10 minutes a GPU
session has: what the budget leaves out is marked skipped, for a second call with --steps.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
MNIST = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
ACCURACY_POINTS = 0.1  # test accuracies may differ by this many percentage points
WEIGHTS_RTOL = 1e-4  # max |W_a - W_b| / max |W_b|, per array
# name -> (device, the option choosing the step): each device's fast path, and its generic math
TRAININGS = {"cuda": ("cuda", "--fast"), "cuda-generic": ("cuda", "--generic"), "cpu": ("cpu", "--fast"),
             "cpu-generic": ("cpu", "--generic")}
PAIRS = [("cuda", "cpu"), ("cuda-generic", "cpu-generic"), ("cuda", "cuda-generic")]
E2E_RUNS = 3
#: the precision step's runs (gpunn.nn.PRECISIONS): float32, the reference, and the tensor cores' precisions, whose
#: test accuracy is to be within PRECISION_POINTS points of the float32 run's (the issue's target)
PRECISIONS = ("float32", "tf32", "bf16")
REDUCED = PRECISIONS[1:]
PRECISION_POINTS = 0.3
PRECISION_HIDDEN = 256
#: the profile step's epoch breakdowns: the default 784-10-10 (the single pass) and 784-64-10 (layer-wise kernels)
PROFILE_HIDDEN = (10, 64)
EPOCH_METRIC = "gpu__time_duration.sum"  # a kernel's time on the GPU, start to end
EPOCH_START = "advance_epoch"  # the first kernel of each epoch that a CUDA graph step runs

# Runs in a subprocess, so that this process never holds a CUDA context while the tests and trainings run.
GPU_PROBE = """
import json
from gpunn.backend import get_backend
from gpunn.errors import BackendError
try:
    backend = get_backend("cuda")
except BackendError as error:
    print(json.dumps({"ok": False, "why": error.cause}))
else:
    print(json.dumps({"ok": True, "gpu": backend.summary()}))
"""


def epoch_kernels(text: str) -> dict[str, Any] | None:
    """One steady epoch's kernels from ncu's ``--csv --page raw`` output (mixed with other lines, which are left
    out): those from the second launch of an EPOCH_START kernel up to the third (the first epoch may still load
    kernels), each with its EPOCH_METRIC in microseconds, and their sum. None where the output holds no such epoch."""
    rows = [row for row in csv.reader(line for line in text.splitlines() if line.startswith('"')) if row]
    header = next((row for row in rows if row[0] == "ID"), None)
    if header is None or "Kernel Name" not in header or EPOCH_METRIC not in header:
        return None
    name_at, value_at = header.index("Kernel Name"), header.index(EPOCH_METRIC)
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6}
    units = next((row[value_at] for row in rows if row is not header and not row[0] and len(row) > value_at), "")
    launches = [(row[name_at], float(row[value_at].replace(",", "")) * scale.get(units, 1e-3))
                for row in rows if row[0] and row[0] != "ID" and len(row) > value_at]
    starts = [i for i, (name, _) in enumerate(launches) if name.startswith(EPOCH_START)]
    if len(starts) < 3:
        return None
    kernels = [{"name": name, "us": round(us, 3)} for name, us in launches[starts[1]:starts[2]]]
    return {"epoch_us": round(sum(kernel["us"] for kernel in kernels), 3), "kernels": kernels}


def run_summary(metrics: Path) -> dict[str, Any]:
    """The summary record `gpunn train --metrics-out` writes last."""
    return json.loads(metrics.read_text().strip().splitlines()[-1])


@dataclass
class Result:
    step: str
    status: str  # "ok", "FAILED", "skipped" (the time budget was spent) or "n/a" (an optional tool is missing)
    seconds: float
    detail: str
    log: str | None = None


class GpuCheck:
    def __init__(self, out: Path, data: Path, budget_s: float) -> None:
        self.out, self.data = out, data
        self.deadline = time.monotonic() + budget_s
        self.results: list[Result] = []
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.env = {**os.environ, "PYTHONPATH": path}
        self._benchmark_help: str | None = None  # benchmarks/epoch_throughput.py --help, once read

    # --- running and recording ------------------------------------------------------------------------------

    def record(self, result: Result) -> Result:
        self.results.append(result)
        where = f"  ({result.log})" if result.log else ""
        print(f"[{len(self.results):2d}] {result.step:<22} {result.status:<7} {result.seconds:7.1f} s  {result.detail}"
              f"{where}", flush=True)
        return result

    def command(self, step: str, argv: list[str], *, limit: float, log: str,
                env: dict[str, str] | None = None) -> Result:
        """Run argv with its output in DIR/log, for at most ``limit`` seconds (less if the budget is nearly spent),
        with ``env`` added to the environment."""
        remaining = self.deadline - time.monotonic()
        if remaining < 5:
            return self.record(Result(step, "skipped", 0.0, "the time budget is spent"))
        limit = min(limit, remaining)
        path = self.out / log
        start = time.monotonic()
        with path.open("w") as handle:
            handle.write(f"$ {' '.join(argv)}\n")
            handle.flush()
            try:
                code = subprocess.run(argv, cwd=REPO, env={**self.env, **(env or {})}, stdout=handle,
                                      stderr=subprocess.STDOUT, timeout=limit).returncode
            except subprocess.TimeoutExpired:
                return self.record(Result(step, "FAILED", time.monotonic() - start,
                                          f"timed out after {limit:.0f} s", str(path)))
        seconds = time.monotonic() - start
        status = "ok" if code == 0 else "FAILED"
        return self.record(Result(step, status, seconds, self.last_line(path) if code else self.summary_line(path),
                                  str(path)))

    @staticmethod
    def last_line(path: Path) -> str:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][:200] if lines else "no output"

    @staticmethod
    def summary_line(path: Path) -> str:
        """pytest's closing counts ("12 passed, 3 skipped in 9.1s"), else the last line."""
        for line in reversed(path.read_text(errors="replace").splitlines()):
            if " passed" in line or " failed" in line or " skipped" in line:
                return line.strip("= ").strip()
        return GpuCheck.last_line(path)

    def stop(self, step: str, why: str) -> None:
        """One line, then exit 1: a prerequisite of every later step is missing."""
        self.results.append(Result(step, "FAILED", 0.0, why))
        self.write_summary()
        print(f"gpu-check: FAILED: {why}", flush=True)
        sys.exit(1)

    def python(self) -> list[str]:
        return [sys.executable]

    def gpunn_train(self, *options: str) -> list[str]:
        """``gpunn train`` on the check's MNIST with ``options``, as this Python runs it."""
        return [*self.python(), "-m", "gpunn", "train", "--data-dir", str(self.data), *options]

    # --- the steps ------------------------------------------------------------------------------------------------

    def info(self) -> None:
        result = self.command("gpunn info", [*self.python(), "-m", "gpunn", "info"], limit=120, log="info.log")
        if result.log:
            text = Path(result.log).read_text(errors="replace").split("\n", 1)[-1].rstrip()
            print("\n".join(f"     {line}" for line in text.splitlines()), flush=True)
            result.detail = text.splitlines()[0][:120] if result.status == "ok" and text else result.detail
        if result.status != "ok":
            self.stop("gpunn info", f"`{sys.executable} -m gpunn info` failed: {result.detail} (see {result.log}); "
                                    "gpunn or its dependencies do not import with this interpreter and PYTHONPATH")

    def check_data(self) -> None:
        missing = [name for name in MNIST if not any((self.data / f"{name}{suffix}").is_file()
                                                      for suffix in (".gz", ""))]
        if missing:
            self.stop("data", f"MNIST not found: {self.data} lacks {', '.join(missing)} (raw or .gz); pass "
                              "DATA=DIR (make) or --data-dir DIR holding MNIST's four IDX files")
        self.record(Result("data", "ok", 0.0, str(self.data)))

    def check_gpu(self) -> None:
        start = time.monotonic()
        try:
            probe = subprocess.run([*self.python(), "-c", GPU_PROBE], cwd=REPO, env=self.env, capture_output=True,
                                   text=True, timeout=180)
        except subprocess.TimeoutExpired:
            self.stop("gpu", "the GPU probe (import CuPy, one operation on cuda:0) did not finish in 180 s")
        lines = probe.stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            tail = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            self.stop("gpu", f"the GPU probe failed: {tail}")
        if not answer["ok"]:
            self.stop("gpu", f"no usable CUDA device: {answer['why']}")
        self.record(Result("gpu", "ok", time.monotonic() - start, answer["gpu"]))

    def pytest(self) -> list[str] | None:
        """pytest's command line, or None (and a failed step) where it is not installed."""
        if importlib.util.find_spec("pytest") is None:
            self.record(Result("pytest", "FAILED", 0.0, f"pytest is not installed for {sys.executable}"))
            return None
        return [*self.python(), "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs"]

    def tests(self) -> None:
        if (pytest := self.pytest()) is None:
            return
        self.command("pytest -m gpu", [*pytest, "-m", "gpu", f"--junitxml={self.out / 'pytest-gpu.xml'}", "tests"],
                     limit=300, log="pytest-gpu.log")

    def cpu_side_tests(self) -> None:
        if (pytest := self.pytest()) is None:
            return
        self.command("pytest fast path (cpu)", [*pytest, "-m", "not gpu",
                                                f"--junitxml={self.out / 'pytest-fast-path.xml'}",
                                                "tests/test_kernels.py", "tests/test_fused_cuda.py"],
                     limit=240, log="pytest-fast-path.log")

    def memory(self) -> None:
        for choice in ("--fast", "--generic"):
            name = f"gpu-memory{'-generic' if choice == '--generic' else ''}"
            self.command(f"memory cuda {choice[2:]}", [*self.python(), "benchmarks/gpu_memory.py", "--data-dir",
                                                       str(self.data), choice, "--out-dir", str(self.out / "bench"),
                                                       "--name", name], limit=120, log=f"{name}.log")

    def end_to_end(self) -> None:
        """`gpunn train --device cuda` as a user runs it (the defaults: 784-10-10, 500 epochs): each run's wall time
        from the command's start to the model on disk, beside its training's share (the metrics' total_s), in
        DIR/e2e.json. The first run starts cold: CuPy's kernel cache (CUPY_CACHE_DIR) and the driver's JIT cache
        (CUDA_CACHE_PATH) point to empty folders, so it compiles every kernel it launches, as a user's first run on a
        machine does; the E2E_RUNS after it find them in CuPy's usual cache (the trainings compiled them), as every
        later run does."""
        runs = []
        with tempfile.TemporaryDirectory(prefix="gpunn-cold-") as cold:
            env = {"CUPY_CACHE_DIR": str(Path(cold, "cupy")), "CUDA_CACHE_PATH": str(Path(cold, "cuda"))}
            runs.append(self.end_to_end_run("cold", env))
        runs += [self.end_to_end_run(run) for run in range(1, E2E_RUNS + 1)]
        (self.out / "e2e.json").write_text(json.dumps([run for run in runs if run], indent=1) + "\n")

    def end_to_end_run(self, run: str | int, env: dict[str, str] | None = None) -> dict[str, Any] | None:
        """One run of end_to_end, or None where it failed (the failure is in the step's record)."""
        metrics, model = self.out / f"e2e-{run}.jsonl", self.out / f"e2e-{run}.npz"
        argv = self.gpunn_train("--device", "cuda", "--quiet", "--metrics-out", str(metrics), "--out", str(model))
        result = self.command(f"e2e cuda {run}", argv, limit=60 if env is None else 90, log=f"e2e-{run}.log", env=env)
        if result.status != "ok":
            return None
        training = run_summary(metrics)["total_s"]
        result.detail = f"{result.seconds:.2f} s in all, {training:.3f} s of it training"
        return {"run": run, "kernels": "cached" if env is None else "compiled", "command": " ".join(argv[1:]),
                "wall_s": result.seconds, "training_s": training, "rest_s": result.seconds - training}

    def profile(self) -> None:
        """ncu's view of the epoch, under a training run's clocks and caches (by default ncu locks the SM clock at
        its base, 1.49 GHz on the H200 against the 1.98 GHz a timed run gets, and flushes the caches before each
        kernel, so the reduce would read the pass's partial sums from DRAM, where a training run may find them still
        in L2):

        - the single pass's kernels in a short default run: throughput, occupancy, memory, the warps' stall reasons
          and where in the code they stall (SourceCounters), in DIR/ncu-single-pass.log;
        - every kernel of one steady epoch (the second of three) at each of PROFILE_HIDDEN, the single pass's and
          the layer-wise kernels', cuBLAS's GEMMs among them: each one's time on the GPU, in DIR/ncu-epoch.json."""
        ncu = shutil.which("ncu")
        if ncu is None:
            self.record(Result("ncu single pass", "n/a", 0.0, "ncu is not on PATH"))
            return
        real_clocks = ["--target-processes", "all", "--clock-control", "none", "--cache-control", "none"]
        sections = [item for name in ("SpeedOfLight", "LaunchStats", "Occupancy", "MemoryWorkloadAnalysis",
                                      "SchedulerStats", "WarpStateStats", "SourceCounters")
                    for item in ("--section", name)]
        three_epochs = ("--device", "cuda", "--epochs", "3", "--quiet")
        self.command("ncu single pass", [
            ncu, *real_clocks, "-k", "regex:single_pass", "--launch-count", "3", *sections,
            *self.gpunn_train(*three_epochs, "--out", str(self.out / "ncu.npz"))], limit=120, log="ncu-single-pass.log")
        epochs = {}
        for hidden in PROFILE_HIDDEN:
            model = str(self.out / f"ncu-h{hidden}.npz")
            result = self.command(f"ncu epoch h={hidden}", [
                ncu, *real_clocks, "--csv", "--page", "raw", "--print-units", "base", "--metrics", EPOCH_METRIC,
                *self.gpunn_train(*three_epochs, "--hidden", str(hidden), "--out", model)],
                limit=120, log=f"ncu-epoch-h{hidden}.log")
            if result.status != "ok" or result.log is None:
                continue
            epoch = epoch_kernels(Path(result.log).read_text(errors="replace"))
            if epoch is None:
                result.status, result.detail = "FAILED", f"no epoch between {EPOCH_START} launches in ncu's CSV"
                continue
            epochs[f"h{hidden}"] = epoch
            top = max(epoch["kernels"], key=lambda kernel: kernel["us"])
            result.detail = (f"{len(epoch['kernels'])} kernels, {epoch['epoch_us']:.1f} us on the GPU; the largest "
                             f"{top['name'][:60]} {top['us']:.1f} us")
        (self.out / "ncu-epoch.json").write_text(json.dumps(epochs, indent=1) + "\n")

    def train(self, name: str, options: list[str], *, limit: float) -> dict[str, Any] | None:
        """One ``gpunn train`` on the full MNIST, 500 epochs from seed 0, with ``options`` (the device, the network):
        its summary record, model file, step and wall time, or None where it failed (the failure is in the step's
        record). Metrics, model and log go to DIR/train-NAME.jsonl, model-NAME.npz and train-NAME.log."""
        metrics, model = self.out / f"train-{name}.jsonl", self.out / f"model-{name}.npz"
        argv = self.gpunn_train(*options, "--seed", "0", "--epochs", "500", "--metrics-out", str(metrics), "--out",
                                str(model))
        result = self.command(f"train {name}", argv, limit=limit, log=f"train-{name}.log")
        if result.status != "ok":
            return None
        summary = run_summary(metrics)
        header = Path(result.log).read_text().splitlines() if result.log else []
        step = next((line.split(":", 1)[1].strip() for line in header if line.startswith("step:")), "?")
        result.detail = (f"test {100 * summary['test_accuracy']:.2f} %, median epoch "
                         f"{1e3 * summary['median_epoch_s']:.3f} ms, step: {step}")
        return {"summary": summary, "model": model, "step": step, "wall_s": result.seconds}

    def trainings(self) -> dict[str, dict[str, Any]]:
        runs = {name: self.train(name, ["--device", device, choice], limit=150 if device == "cuda" else 300)
                for name, (device, choice) in TRAININGS.items()}
        return {name: run for name, run in runs.items() if run is not None}

    def compare(self, runs: dict[str, dict[str, Any]]) -> None:
        import numpy as np

        start = time.monotonic()
        report, problems = [], []
        for a, b in PAIRS:
            if a not in runs or b not in runs:
                problems.append(f"{a} vs {b}: a run is missing")
                continue
            accuracy = [runs[n]["summary"]["test_accuracy"] for n in (a, b)]
            with np.load(runs[a]["model"]) as left, np.load(runs[b]["model"]) as right:
                names = sorted(k for k in right.files if k[0] in "Wb" and k[1:].isdigit())
                differences = {k: float(np.max(np.abs(left[k] - right[k])) / max(np.max(np.abs(right[k])), 1e-30))
                               for k in names}
            points = 100 * abs(accuracy[0] - accuracy[1])
            worst = max(differences.values())
            ok = points <= ACCURACY_POINTS and worst <= WEIGHTS_RTOL
            report.append({"pair": [a, b], "test_accuracy": accuracy, "accuracy_points": points,
                           "weights_relative": differences, "ok": ok})
            if not ok:
                problems.append(f"{a} vs {b}: test accuracy {100 * accuracy[0]:.2f} vs {100 * accuracy[1]:.2f} %, "
                                f"weights differ by {worst:.2e} of their largest")
        path = self.out / "compare.json"
        path.write_text(json.dumps({"accuracy_points_allowed": ACCURACY_POINTS, "weights_rtol": WEIGHTS_RTOL,
                                    "pairs": report}, indent=2) + "\n")
        detail = "; ".join(problems) or "; ".join(
            f"{r['pair'][0]} vs {r['pair'][1]}: {r['accuracy_points']:.2f} points, weights "
            f"{max(r['weights_relative'].values()):.1e}" for r in report)
        self.record(Result("compare runs", "FAILED" if problems else "ok", time.monotonic() - start, detail,
                           str(path)))

    def benchmark_options(self) -> tuple[set[str], str]:
        """The options and the help text of benchmarks/epoch_throughput.py as it is now (it changes), so that
        the check passes only what the script takes rather than failing on a renamed option. Read once per check."""
        if self._benchmark_help is None:
            self._benchmark_help = subprocess.run([*self.python(), "benchmarks/epoch_throughput.py", "--help"],
                                                  cwd=REPO, env=self.env, capture_output=True, text=True,
                                                  timeout=120).stdout
        help_text = self._benchmark_help
        return set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text)), help_text

    def benchmark(self) -> tuple[list[str], Callable[..., str]] | None:
        """The benchmark's command line up to --devices, and a function naming those of the given peers it has."""
        options, help_text = self.benchmark_options()
        if "--devices" not in options:
            self.record(Result("bench", "FAILED", 0.0, "benchmarks/epoch_throughput.py --help does not answer"))
            return None
        # shorter than the script's defaults, where it has such options: the whole check must fit the budget
        budget = {"--rounds": "5", "--min-rounds": "2", "--group-seconds": "8", "--slot-ms": "200",
                  "--row-seconds": "1", "--epochs": "5"}
        common = [*self.python(), "benchmarks/epoch_throughput.py", "--data-dir", str(self.data), "--out-dir",
                  str(self.out / "bench")]
        common += [item for option, value in budget.items() if option in options for item in (option, value)]

        def peers(*names: str) -> str:
            return ",".join(name for name in names if name in help_text) or "none"

        return common, peers

    def cuda_benchmarks(self) -> None:
        if (benchmark := self.benchmark()) is None:
            return
        common, peers = benchmark
        if importlib.util.find_spec("torch") is None:
            self.record(Result("torch", "FAILED", 0.0, f"PyTorch is not installed for {sys.executable}: the "
                                                       "benchmark runs without its torch peers"))
        # torch.compile has a step of its own, on one shape: compiling each of the 8 takes tens of seconds
        self.command("bench cuda", [*common, "--devices", "cuda", "--peers", peers("torch-eager", "torch-graph"),
                                    "--name", "gpu-check-cuda"], limit=240, log="bench-cuda.log")
        self.command("bench cuda compile", [*common, "--devices", "cuda", "--hidden", "10", "--dtypes", "float32",
                                            "--peers", peers("torch-eager", "torch-graph", "torch-compile"),
                                            "--name", "gpu-check-cuda-compile"], limit=180,
                     log="bench-cuda-compile.log")

    def precisions(self) -> None:
        """784-256-10 on CUDA, 500 epochs from one seed, with float32 GEMMs and on TF32 and bfloat16 tensor cores:
        each reduced precision's test accuracy against float32's (DIR/precision.json); then the benchmark's rows in
        each precision, h = 256 and 1024, beside PyTorch's."""
        start_all = time.monotonic()
        runs: dict[str, dict[str, Any]] = {}
        for precision in PRECISIONS:
            run = self.train(precision, ["--device", "cuda", "--hidden", str(PRECISION_HIDDEN), "--precision",
                                         precision], limit=120)
            if run is not None:
                summary = run["summary"]
                runs[precision] = {"test_accuracy": summary["test_accuracy"], "step": run["step"],
                                   "median_epoch_ms": 1e3 * summary["median_epoch_s"], "training_s": summary["total_s"],
                                   "wall_s": run["wall_s"]}
        problems = [f"{name}: no run" for name in PRECISIONS if name not in runs]
        if "float32" in runs:
            for name in REDUCED:
                if name in runs:
                    points = 100 * abs(runs[name]["test_accuracy"] - runs["float32"]["test_accuracy"])
                    runs[name]["points_from_float32"] = points
                    if points > PRECISION_POINTS:
                        problems.append(f"{name}: {points:.2f} points from float32's test accuracy")
        path = self.out / "precision.json"
        path.write_text(json.dumps({"hidden": PRECISION_HIDDEN, "points_allowed": PRECISION_POINTS, "runs": runs},
                                   indent=2) + "\n")
        self.record(Result("compare precisions", "FAILED" if problems else "ok", time.monotonic() - start_all,
                           "; ".join(problems) or ", ".join(f"{n} {100 * r['test_accuracy']:.2f} %"
                                                            for n, r in runs.items()), str(path)))
        if (benchmark := self.benchmark()) is None:
            return
        common, peers = benchmark
        if "--precision" not in self.benchmark_options()[0]:
            self.record(Result("bench precision", "FAILED", 0.0, "benchmarks/epoch_throughput.py has no --precision"))
            return
        for precision in REDUCED:
            self.command(f"bench cuda {precision}", [*common, "--devices", "cuda", "--dtypes", "float32", "--hidden",
                                                     "256,1024", "--precision", precision, "--peers",
                                                     peers("torch-eager", "torch-graph"), "--name",
                                                     f"gpu-check-cuda-{precision}"],
                         limit=120, log=f"bench-cuda-{precision}.log")

    def cpu_benchmarks(self) -> None:
        if (benchmark := self.benchmark()) is None:
            return
        common, peers = benchmark
        self.command("bench cpu", [*common, "--devices", "cpu", "--peers", peers("numpy-naive", "torch-eager"),
                                   "--name", "gpu-check-cpu"], limit=200, log="bench-cpu.log")

    # --- the end ----------------------------------------------------------------------------------------------------

    def write_summary(self) -> str:
        rows = ["| step | result | seconds | details |", "| --- | --- | ---: | --- |"]
        rows += [f"| {r.step} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |" for r in self.results]
        table = "\n".join(rows)
        (self.out / "summary.md").write_text(f"# gpunn GPU check\n\n{table}\n")
        (self.out / "summary.json").write_text(json.dumps([asdict(r) for r in self.results], indent=2) + "\n")
        return table

    def run(self, steps: Sequence[str] = ()) -> int:
        """The check: steps 1-3, then the named ``steps`` of :data:`STEPS` in their order (every one by default)."""
        self.info()
        self.check_data()
        self.check_gpu()
        for name, method in STEPS.items():
            if not steps or name in steps:
                method(self)
        table = self.write_summary()
        failed = [r.step for r in self.results if r.status not in ("ok", "n/a")]
        print(f"\n{table}\n")
        print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all steps passed'} (logs in {self.out})")
        return 1 if failed else 0


#: the check's steps after the prerequisites, in order, by the names --steps takes
STEPS: dict[str, Callable[[GpuCheck], Any]] = {
    "trainings": lambda check: check.compare(check.trainings()),
    "e2e": GpuCheck.end_to_end,
    "memory": GpuCheck.memory,
    "bench-cuda": GpuCheck.cuda_benchmarks,
    "precision": GpuCheck.precisions,
    "tests": GpuCheck.tests,
    "profile": GpuCheck.profile,
    "bench-cpu": GpuCheck.cpu_benchmarks,
    "cpu-tests": GpuCheck.cpu_side_tests,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the logs, JSON and markdown go")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist",
                        help="MNIST's four IDX files (default: ../shared/data/mnist)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="all steps together, at most (seconds)")
    parser.add_argument("--steps", type=lambda text: text.split(","), default=[],
                        help=f"only these steps, comma-separated, after the prerequisites: {', '.join(STEPS)} "
                        "(default: all)")
    options = parser.parse_args(argv)
    unknown = sorted(set(options.steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {', '.join(unknown)}; expected some of {', '.join(STEPS)}")
    try:
        options.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"gpu-check: FAILED: cannot create --out {options.out}: {error}")
        return 1
    return GpuCheck(options.out.resolve(), options.data_dir.resolve(), options.budget_s).run(options.steps)


if __name__ == "__main__":
    sys.exit(main())
