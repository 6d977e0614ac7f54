"""benchmarks/gpu_check.py (``make gpu-check``) up to its first GPU step, which is as far as a machine without a
GPU gets: it prints gpunn info, checks the data, and stops with one line and exit 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpunn.backend import get_backend
from gpunn.errors import BackendError
from gpunn.nn import PRECISIONS
from helpers import write_mnist_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def module():
    """benchmarks/gpu_check.py, imported: a script, not a module of a package."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check as script

    return script


@pytest.fixture(scope="module")
def no_gpu():
    try:
        get_backend("cuda")
    except BackendError as error:
        return error.cause
    pytest.skip("a CUDA device answers here, so gpu-check would run its whole course: run `make gpu-check` itself")


def gpu_check(*args):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_without_a_gpu_it_stops_with_one_line_after_info_and_data(no_gpu, tmp_path):
    data = write_mnist_dir(tmp_path / "mnist", n_train=20, n_test=5)
    result = gpu_check("--out", tmp_path / "out", "--data-dir", data)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"gpu-check: FAILED: no usable CUDA device: {no_gpu}"
    assert "gpunn info" in lines[0] and "ok" in lines[0] and any("cpu:" in line for line in lines)
    assert "gpunn" in (tmp_path / "out" / "info.log").read_text()
    steps = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(s["step"], s["status"]) for s in steps] == [("gpunn info", "ok"), ("data", "ok"), ("gpu", "FAILED")]


def test_missing_data_is_one_line_before_any_gpu_work(tmp_path):
    result = gpu_check("--out", tmp_path / "out", "--data-dir", tmp_path / "nowhere")
    assert result.returncode == 1
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu-check: FAILED: MNIST not found:") and "train-images-idx3-ubyte" in last
    assert "gpu" not in [s["step"] for s in json.loads((tmp_path / "out" / "summary.json").read_text())]


def test_the_make_target_uses_python3_as_it_is_and_needs_out(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # --no-print-directory: under `make test` this make is a sub-make, which would add "Leaving directory" lines
    dry = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", f"OUT={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    command = dry.stdout.strip().splitlines()[-1]
    assert command == f"python3 benchmarks/gpu_check.py --out '{tmp_path}' --data-dir '../shared/data/mnist'"
    assert "venv" not in dry.stdout and "pip" not in dry.stdout
    missing = subprocess.run(["make", "--no-print-directory", "gpu-check"], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode != 0 and "make gpu-check needs OUT=DIR" in missing.stdout


def test_the_benchmark_steps_pass_only_options_the_benchmark_takes(module, tmp_path, monkeypatch):
    """benchmarks/epoch_throughput.py changes; the check reads its --help rather than failing on a GPU machine."""
    check = module.GpuCheck(tmp_path, tmp_path, budget_s=60)
    commands = {}
    monkeypatch.setattr(check, "command", lambda step, argv, **kwargs: commands.setdefault(step, argv))
    check.cuda_benchmarks()
    check.cpu_benchmarks()
    options, help_text = check.benchmark_options()
    assert set(commands) == {"bench cuda", "bench cuda compile", "bench cpu"}
    for argv in commands.values():
        assert {arg for arg in argv if arg.startswith("--")} <= options
        for peer in argv[argv.index("--peers") + 1].split(","):
            assert peer == "none" or peer in help_text
    assert commands["bench cuda"][commands["bench cuda"].index("--devices") + 1] == "cuda"


def test_end_to_end_runs_keep_wall_time_and_training_time(module, tmp_path, monkeypatch):
    """Each run's wall time is the command's (start to model on disk); its training's share comes from the metrics;
    a failed run is left out of DIR/e2e.json and stays a failed step. The first run finds CuPy's and the driver's
    kernel caches empty; the others run with the caches the environment already names."""
    check = module.GpuCheck(tmp_path, tmp_path / "mnist", budget_s=60)
    walls = iter([4.5, 1.5, 9.0, 1.25])
    caches = []

    def command(step, argv, env=None, **kwargs):
        caches.append(None if env is None else {name: sorted(Path(env[name]).parent.iterdir()) for name in env})
        wall = next(walls)
        if wall == 9.0:
            return check.record(module.Result(step, "FAILED", wall, "out of memory"))
        metrics = Path(argv[argv.index("--metrics-out") + 1])
        metrics.write_text('{"type": "epoch"}\n{"type": "summary", "total_s": 0.125}\n')
        return check.record(module.Result(step, "ok", wall, ""))

    monkeypatch.setattr(check, "command", command)
    check.end_to_end()
    runs = json.loads((tmp_path / "e2e.json").read_text())
    assert [(r["run"], r["kernels"], r["wall_s"], r["training_s"], r["rest_s"]) for r in runs] == [
        ("cold", "compiled", 4.5, 0.125, 4.375), (1, "cached", 1.5, 0.125, 1.375), (3, "cached", 1.25, 0.125, 1.125)]
    assert all("--device cuda" in r["command"] and "--epochs" not in r["command"] for r in runs)  # the defaults
    assert [r.status for r in check.results] == ["ok", "ok", "FAILED", "ok"]
    assert check.results[1].detail == "1.50 s in all, 0.125 s of it training"
    assert caches[0] == {"CUPY_CACHE_DIR": [], "CUDA_CACHE_PATH": []}  # an empty folder, made for the cold run
    assert caches[1:] == [None] * module.E2E_RUNS


def test_a_missing_profiler_is_not_a_failure(module, tmp_path, monkeypatch):
    check = module.GpuCheck(tmp_path, tmp_path, budget_s=60)
    monkeypatch.setattr(module.shutil, "which", lambda name: None)
    check.profile()
    assert [(r.step, r.status) for r in check.results] == [("ncu single pass", "n/a")]
    monkeypatch.setattr(module.shutil, "which", lambda name: f"/usr/local/cuda/bin/{name}")
    commands = []
    monkeypatch.setattr(check, "command", lambda step, argv, **kwargs: commands.append(argv) or module.Result(
        step, "FAILED", 0.0, "not run here"))
    check.profile()
    argv = commands[0]
    assert argv[0] == "/usr/local/cuda/bin/ncu" and argv[argv.index("-k") + 1] == "regex:single_pass"
    assert argv[argv.index("--device") + 1] == "cuda" and "WarpStateStats" in argv and "SourceCounters" in argv
    assert len(commands) == 1 + len(module.PROFILE_HIDDEN)  # then one epoch breakdown per hidden size
    for argv, hidden in zip(commands[1:], module.PROFILE_HIDDEN, strict=True):
        assert argv[argv.index("--hidden") + 1] == str(hidden) and argv[argv.index("--metrics") + 1] == \
            module.EPOCH_METRIC and argv[argv.index("--page") + 1] == "raw" and "--csv" in argv
    for argv in commands:
        # a training run's clocks and caches, not ncu's base clock and flushed caches
        assert argv[argv.index("--clock-control") + 1] == "none" and argv[argv.index("--cache-control") + 1] == "none"


def ncu_csv(launches, units="nsecond"):
    """ncu --csv --page raw as the profile step's log holds it: among the run's own lines, a header, a row of units
    and one row per launch (name, nanoseconds)."""
    quoted = lambda *fields: ",".join(f'"{field}"' for field in fields)  # noqa: E731
    rows = [quoted("ID", "Process ID", "Kernel Name", "Block Size", "gpu__time_duration.sum"),
            quoted("", "", "", "", units)]
    rows += [quoted(i, 4242, name, "(256, 1, 1)", f"{ns:,}") for i, (name, ns) in enumerate(launches)]
    return "\n".join(["$ ncu ...", "==PROF== Connected to process 4242", "step: single pass", *rows,
                      "==PROF== Disconnected from process 4242"])


def test_the_epoch_breakdown_is_the_second_epoch_of_ncus_csv(module):
    epoch = [("advance_epoch_f32", 2400), ("single_pass_h10_f32", 180500), ("single_pass_reduce_f32", 4100),
             ("update_f32", 3000)]
    setup = [("set_step_f32", 2000), ("single_pass_h10_f32", 250000)]
    first = [("advance_epoch_f32", 2500), ("single_pass_h10_f32", 260000)]  # the first epoch: not steady yet
    text = ncu_csv(setup + first + epoch + [("advance_epoch_f32", 2300), ("val_metrics_f32", 5000)])
    got = module.epoch_kernels(text)
    assert [kernel["name"] for kernel in got["kernels"]] == [name for name, _ in epoch]
    assert [kernel["us"] for kernel in got["kernels"]] == [2.4, 180.5, 4.1, 3.0]
    assert got["epoch_us"] == 190.0
    in_us = module.epoch_kernels(ncu_csv(first + epoch + first, units="usecond").replace("180,500", "180.5"))
    assert in_us["kernels"][1] == {"name": "single_pass_h10_f32", "us": 180.5}
    assert module.epoch_kernels(ncu_csv(first + epoch)) is None  # two epochs: no second one ended
    assert module.epoch_kernels("==PROF== Connected\nno kernels were profiled") is None


def test_the_profile_step_writes_each_epochs_kernels(module, tmp_path, monkeypatch):
    check = module.GpuCheck(tmp_path, tmp_path, budget_s=60)
    monkeypatch.setattr(module.shutil, "which", lambda name: f"/usr/bin/{name}")
    epoch = [("advance_epoch_f32", 2000), ("sm90_xmma_gemm_f32f32", 60000), ("update_f32", 3000)]

    def command(step, argv, log, **kwargs):
        path = tmp_path / log
        path.write_text(ncu_csv(epoch * 3) if "epoch" in step else "ncu's sections")
        return check.record(module.Result(step, "ok", 1.0, "", str(path)))

    monkeypatch.setattr(check, "command", command)
    check.profile()
    written = json.loads((tmp_path / "ncu-epoch.json").read_text())
    assert sorted(written) == [f"h{hidden}" for hidden in sorted(module.PROFILE_HIDDEN)]
    assert written["h64"]["epoch_us"] == 65.0 and len(written["h64"]["kernels"]) == 3
    assert check.results[-1].detail == "3 kernels, 65.0 us on the GPU; the largest sm90_xmma_gemm_f32f32 60.0 us"


def test_the_precision_step_holds_each_tensor_core_run_to_float32s_test_accuracy(module, tmp_path, monkeypatch):
    """784-256-10 in float32, tf32 and bf16: a reduced precision more than 0.3 point from float32's test accuracy
    fails the step, and DIR/precision.json keeps every run; then the benchmark's rows in tf32 and bf16 on CUDA."""
    check = module.GpuCheck(tmp_path, tmp_path / "mnist", budget_s=60)
    accuracy = {"float32": 0.9612, "tf32": 0.9601, "bf16": 0.9571}
    commands = {}

    def command(step, argv, **kwargs):
        commands[step] = argv
        if "--metrics-out" in argv:
            summary = {"type": "summary", "test_accuracy": accuracy[argv[argv.index("--precision") + 1]],
                       "median_epoch_s": 0.001, "total_s": 0.5}
            Path(argv[argv.index("--metrics-out") + 1]).write_text(json.dumps(summary) + "\n")
        return check.record(module.Result(step, "ok", 2.0, ""))

    monkeypatch.setattr(check, "command", command)
    check.precisions()
    saved = json.loads((tmp_path / "precision.json").read_text())
    assert saved["points_allowed"] == 0.3 and set(saved["runs"]) == {"float32", "tf32", "bf16"}
    assert saved["runs"]["tf32"]["points_from_float32"] == pytest.approx(0.11)
    compared = next(r for r in check.results if r.step == "compare precisions")
    assert compared.status == "FAILED" and compared.detail == "bf16: 0.41 points from float32's test accuracy"
    for precision in ("float32", "tf32", "bf16"):
        argv = commands[f"train {precision}"]
        assert argv[argv.index("--hidden") + 1] == "256" and argv[argv.index("--device") + 1] == "cuda"
    options, _ = check.benchmark_options()
    for precision in ("tf32", "bf16"):
        argv = commands[f"bench cuda {precision}"]
        assert {arg for arg in argv if arg.startswith("--")} <= options
        assert argv[argv.index("--precision") + 1] == precision and argv[argv.index("--dtypes") + 1] == "float32"
        assert argv[argv.index("--devices") + 1] == "cuda"


def test_steps_run_only_the_named_ones_after_the_prerequisites(module, tmp_path, monkeypatch):
    ran = []
    for name in ("info", "check_data", "check_gpu"):
        monkeypatch.setattr(module.GpuCheck, name, lambda self, _n=name: ran.append(_n))
    for name in module.STEPS:
        monkeypatch.setitem(module.STEPS, name, lambda check, _n=name: ran.append(_n))
    assert module.GpuCheck(tmp_path, tmp_path, budget_s=60).run(["precision", "e2e"]) == 0
    assert ran == ["info", "check_data", "check_gpu", "e2e", "precision"]  # in the check's order
    ran.clear()
    module.GpuCheck(tmp_path, tmp_path, budget_s=60).run()
    assert ran == ["info", "check_data", "check_gpu", *module.STEPS]
    with pytest.raises(SystemExit):
        module.main(["--out", str(tmp_path), "--steps", "precision,nonsense"])


def test_the_precision_step_runs_every_precision_gpunn_takes(module):
    """The check keeps its own list (it imports no gpunn; gpunn runs in its subprocesses): float32 first."""
    assert module.PRECISIONS == PRECISIONS and module.REDUCED == PRECISIONS[1:]
