"""The benchmark scripts run at toy size and write well-formed results: the epoch benchmark interleaves its
implementations in rotated rounds, gives each a time and a ratio to gpunn per round, and refuses a peer that
computes another step."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import epoch_throughput as bench  # noqa: E402
from peers import naive_numpy  # noqa: E402

from gpunn.backend import GENERIC  # noqa: E402

DTYPES = ("float32", "float64")
HIDDEN = (10, 16)


def gpunn_names(dtype: str, hidden: int, m: int) -> list[str]:
    """gpunn, and each variant whose step differs from gpunn's (as the script decides): the fused BLAS pass where
    gpunn takes the single pass, and the generic math where gpunn has a fast path."""
    arch = bench.Architecture((784, hidden, 10))
    names, seen = [], set()
    for name, backend in bench.gpunn_variants("cpu"):
        step = backend.step(arch, dtype=dtype, columns=m).name
        if step not in seen:
            names.append(name)
            seen.add(step)
    return names


def test_epoch_throughput_at_toy_size(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "epoch_throughput.py"), "--m", "256", "--hidden", "10,16", "--dtypes",
         "float32,float64", "--rounds", "3", "--slot-ms", "2", "--settle-ms", "0", "--peers", "numpy-naive",
         "--devices", "cpu", "--out-dir", str(tmp_path), "--name", "toy"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "toy.json").read_text())
    assert data["m"] == 256 and data["rounds"]["rounds"] == 3 and data["rounds"]["slot_ms"] == 2
    assert data["command"].startswith("python ") and "--rounds 3" in data["command"]
    assert set(data["limits"]["cpu"]) == {"read_bytes_per_s", "gemm_flops_per_s_float32", "gemm_flops_per_s_float64"}
    env = data["machine"]
    assert env["cpu"] and env["logical_cores"] >= env["usable_cores"] >= 1
    assert env["blas"] and {"internal_api", "version", "architecture", "num_threads"} <= set(env["blas"][0])
    assert env["numpy"] == np.__version__ and env["gpunn"] and env["torch"] is None  # no torch peer asked for
    assert data["peak_rss_mib"] > 0

    expected = {(d, h): gpunn_names(d, h, 256) + ["numpy-naive"] for d in DTYPES for h in HIDDEN}
    rows = {(r["dtype"], r["hidden"], r["implementation"]): r for r in data["rows"]}
    assert set(rows) == {(d, h, name) for (d, h), names in expected.items() for name in names}
    groups = {(g["dtype"], g["hidden"]): g for g in data["groups"]}
    assert set(groups) == set(expected)
    for (dtype, h), names in expected.items():
        group = groups[(dtype, h)]
        # every round has every implementation once, and round r starts at implementation r mod n
        assert group["implementations"] == names and group["rounds"] == 3 and len(group["order"]) == 3
        assert group["load_after"] is None or group["load_after"] >= 0
        for r, order in enumerate(group["order"]):
            assert order == names[r % len(names):] + names[:r % len(names)]
        assert len({order[0] for order in group["order"]}) == min(3, len(names))
        gpunn = rows[(dtype, h, "gpunn")]
        assert gpunn["step"] != GENERIC and gpunn["ratio_to_gpunn"] == [1.0] * 3
        for name in names:
            row = rows[(dtype, h, name)]
            assert row["status"] == "ok", row["status"]
            assert len(row["epoch_ms"]) == len(row["ratio_to_gpunn"]) == 3 and min(row["epoch_ms"]) > 0
            assert row["ratio_to_gpunn"] == pytest.approx([t / g for t, g in zip(row["epoch_ms"], gpunn["epoch_ms"])])
            assert row["min_ms"] == min(row["epoch_ms"]) and row["min_ms"] <= row["median_ms"] <= max(row["epoch_ms"])
            assert row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
            assert row["epochs_per_slot"] >= 1 and row["first_epoch_ms"] > 0 and row["bound_ms"] > 0
            # the naive program in float32 too, and it computes gpunn's step in that dtype
            assert row["check_loss"] == pytest.approx(row["reference_loss"], rel=1e-9 if dtype == "float64" else 1e-4)

    table = (tmp_path / "toy.md").read_text()
    n_rows = sum(len(names) for names in expected.values())
    assert table.count("\n| cpu |") == n_rows and "| × gpunn (median of rounds) |" in table
    assert f"Command: `{data['command']}`" in table and "BLAS (threadpoolctl): " in table
    assert table.count("3 rounds in") == 4
    assert "toy.json" in result.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "toy.png").stat().st_size > 10_000


def test_a_signal_keeps_the_groups_already_timed(tmp_path):
    """SIGTERM (a time limit's `timeout`) or Ctrl-C in the middle of a run writes the groups done before it, says
    so in the results, and exits with 128 + the signal's number, as a shell reports a process a signal ended."""
    command = [sys.executable, "-u", str(BENCHMARKS / "epoch_throughput.py"), "--m", "256", "--hidden", "10,16,24,32",
               "--dtypes", "float32,float64", "--rounds", "3", "--slot-ms", "50", "--settle-ms", "0", "--peers",
               "numpy-naive", "--devices", "cpu", "--out-dir", str(tmp_path), "--name", "cut"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        # after the second group's line: the first group is then in the results (a group's line is printed just
        # before the group is added to them)
        groups = 0
        for line in run.stdout:
            groups += " rounds in " in line
            if groups == 2:
                run.send_signal(signal.SIGTERM)
                break
        out, err = run.communicate(timeout=300)
    assert run.returncode == 128 + signal.SIGTERM, err
    data = json.loads((tmp_path / "cut.json").read_text())
    done = len(data["groups"])
    assert 1 <= done < 8 and data["interrupted"].startswith(f"SIGTERM during group {done + 1} of 8")
    assert {row["hidden"] for row in data["rows"]} <= {10, 16, 24, 32} and data["machine"]["cpu"]
    assert "**Interrupted** (SIGTERM during group" in (tmp_path / "cut.md").read_text()
    assert "interrupted: SIGTERM" in out


def group_of(peers: list[str], *, m: int = 96, hidden: int = 8, dtype: str = "float64", rounds=None, bias=0.1,
             extra=()):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (m, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, m).astype(np.int64)
    arch = bench.Architecture((784, hidden, 10))
    params = [(W, b + bias) for W, b in bench.init_params(arch, init="he", seed=0, dtype="float64")]
    candidates, unavailable = bench.candidates_for("cpu", arch, dtype, m, peers, bench.gpunn_variants("cpu"))
    rounds = rounds or bench.Rounds(rounds=3, min_rounds=3, group_seconds=60, slot_ms=1, settle_ms=0)
    rows, record = bench.run_group("cpu", dtype, hidden, [*candidates, *extra], images, labels, params, rounds,
                                   bound_ms=1.0)
    return {row.implementation: row for row in rows + unavailable}, record


def test_a_wrong_peer_is_refused(monkeypatch):
    """The notebook's own bias bug (db summed into one scalar) computes another step: it is not timed."""

    def scalar_bias_backward(Z1, A1, Z2, A2, W1, W2, X, Y):
        dW1, _, dW2, _ = correct_backward(Z1, A1, Z2, A2, W1, W2, X, Y)
        m = Y.size
        dZ2 = A2 - naive_numpy.one_hot(Y)
        dZ1 = W2.T.dot(dZ2) * (Z1 > 0)
        return dW1, 1 / m * np.sum(dZ1), dW2, 1 / m * np.sum(dZ2)

    correct_backward = naive_numpy.backward_prop
    monkeypatch.setattr(naive_numpy, "backward_prop", scalar_bias_backward)
    rows, record = group_of(["numpy-naive"])
    naive = rows["numpy-naive"]
    assert naive.status.startswith("refused: its loss after 3 epochs is")
    assert naive.epoch_ms == [] and naive.ratio_to_gpunn == [] and naive.first_epoch_ms is None
    assert "numpy-naive" not in record["implementations"] and all("numpy-naive" not in o for o in record["order"])
    assert rows["gpunn"].status == "ok" and len(rows["gpunn"].epoch_ms) == record["rounds"] == 3

    monkeypatch.setattr(naive_numpy, "backward_prop", correct_backward)
    rows, record = group_of(["numpy-naive"])
    assert rows["numpy-naive"].status == "ok" and len(rows["numpy-naive"].ratio_to_gpunn) == 3
    assert record["implementations"][-1] == "numpy-naive"


def test_a_peer_that_cannot_run_is_a_failed_row():
    """A peer that raises while it is built or timed is reported as failed; the group goes on without it."""

    def broken(*args, **kwargs):
        raise RuntimeError("no such device")

    class DiesInRound2:
        def __init__(self, images, labels, params, *, lr, dtype, columns=None):
            self.inner = naive_numpy.make(images, labels, params, lr=lr, dtype=dtype, device="cpu")
            self.steps = 0

        def step(self):
            self.steps += 1
            # the first epoch, the calibration (its runs of one epoch each, as slot_ms=0), round 1
            if self.steps > 1 + bench.CALIBRATION_RUNS + 1:
                raise MemoryError("out of memory")
            self.inner.step()

        def sync(self):
            pass

        def params(self):
            return self.inner.params()

    rounds = bench.Rounds(rounds=3, min_rounds=3, group_seconds=60, slot_ms=0, settle_ms=0)
    rows, record = group_of([], rounds=rounds, extra=[bench.Candidate("broken", broken),
                                                      bench.Candidate("dies", DiesInRound2)])
    assert rows["broken"].status == "failed: RuntimeError: no such device"
    assert rows["dies"].status == "failed: MemoryError: out of memory" and rows["dies"].epoch_ms == []
    assert record["order"][0][-1] == "dies" and all("dies" not in order for order in record["order"][2:])
    assert rows["gpunn"].status == "ok" and len(rows["gpunn"].epoch_ms) == 3

    # without gpunn's own row, the group has nothing to compare with: every row says so, nothing is timed
    naive = bench.Candidate("numpy-naive", lambda *a, columns=None, **k: naive_numpy.make(*a, **k, device="cpu"))
    rows, record = bench.run_group("cpu", "float64", 8, [bench.Candidate("gpunn", broken), naive],
                                   np.zeros((32, 784), np.uint8), np.arange(32) % 10, group_of_params(8), rounds)
    assert rows[0].status == "failed: RuntimeError: no such device" and rows[1].status.startswith("failed: gpunn's")
    assert record["rounds"] == 0 and all(row.epoch_ms == [] for row in rows)


def group_of_params(hidden: int):
    return bench.init_params(bench.Architecture((784, hidden, 10)), init="he", seed=0, dtype="float64")


def test_the_group_budget_cuts_rounds_but_not_below_the_minimum():
    rows, record = group_of([], rounds=bench.Rounds(rounds=7, min_rounds=3, group_seconds=0, slot_ms=1, settle_ms=0))
    assert record["rounds"] == 3 and record["stopped_by"] == "group-seconds"
    assert all(len(row.epoch_ms) == 3 for row in rows.values())
    rows, record = group_of([], rounds=bench.Rounds(rounds=2, min_rounds=3, group_seconds=0, slot_ms=1, settle_ms=0))
    assert record["rounds"] == 2 and record["stopped_by"] == "rounds"


def test_a_slot_is_calibrated_on_warm_epochs(monkeypatch):
    """k comes from the fastest of the calibration's final runs: a runner whose first epochs run cold (10 ms, then
    2 ms, on a clock that only its epochs move) gets slots that last the slot's length warm, not a fifth of it."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    class Runner:
        epochs = 0

        def sync(self):
            pass

        def step(self):
            clock.now += 0.010 if self.epochs < 5 else 0.002
            self.epochs += 1

    runner = Runner()
    k = bench.epochs_per_slot(runner, slot_seconds=0.1)
    assert k == 50  # 100 ms of 2 ms epochs (a cold calibration alone: 10)
    assert bench.time_epochs(runner, k) == pytest.approx(0.1)


def test_the_naive_program_stays_in_its_dtype():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, 50)
    params = bench.init_params(bench.Architecture((784, 6, 10)), init="he", seed=0, dtype="float64")
    for dtype in DTYPES:
        runner = naive_numpy.make(images, labels, params, lr=0.1, dtype=dtype, device="cpu")
        assert runner.X.dtype == dtype and runner.X.flags.f_contiguous  # the notebook's transposed view, divided
        runner.step()
        assert all(a.dtype == dtype for layer in runner.params() for a in layer)


def test_torch_peers_compute_gpunn_step_on_the_cpu():
    pytest.importorskip("torch")
    for dtype in DTYPES:
        rows, record = group_of(["torch-eager", "torch-graph"], dtype=dtype)
        assert rows["torch-eager"].status == "ok" and len(rows["torch-eager"].ratio_to_gpunn) == 3
        assert "torch-graph" not in rows  # CUDA only: not a candidate on the CPU


def test_train_memory_at_toy_size(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_memory.py"), "--epochs", "1", "--out-dir", str(tmp_path), "--name",
         "toy", "--", "--hidden", "12"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    data = json.loads((tmp_path / "toy.json").read_text())
    assert data["train_command"] == "gpunn train --device cpu --epochs 1 --val-size 1000 --hidden 12"
    assert data["train_samples"] == 4000 and data["x_float32_mib"] == pytest.approx(784 * 4000 * 4 / 2**20)
    assert data["baseline_mib"] > 20 and data["peak_mib"] > 20  # an interpreter with NumPy in it, at least
    assert data["over_baseline_mib"] == pytest.approx(data["peak_mib"] - data["baseline_mib"])
    assert data["single_pass_floor_mib"] > data["baseline_mib"]  # Numba's runtime, on top of the baseline
    assert "| over / X |" in (tmp_path / "toy.md").read_text()


@pytest.mark.parametrize("hidden", [10, 32])  # the single pass's graph, and the fused kernels' graph
def test_gpunn_is_timed_on_the_whole_epoch_runner_where_its_step_has_one(monkeypatch, hidden):
    """On CUDA `gpunn train` runs a full-batch epoch as one graph replay; the benchmark times that same runner (not
    the step's gradient pass and update called from Python), and it computes the generic math's epochs, also past
    the end of its learning-rate table, where it starts over from where it stands."""
    from conftest import emulated_cuda_or_skip

    backend = emulated_cuda_or_skip()
    monkeypatch.setattr(bench, "RUNNER_EPOCHS", 2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, 48)
    params = bench.init_params(bench.Architecture((784, hidden, 10)), init="he", seed=0, dtype="float32")
    fast = bench.GpunnRunner(images, labels, params, lr=bench.LR, dtype="float32", backend=backend)
    generic = bench.GpunnRunner(images, labels, params, lr=bench.LR, dtype="float32",
                                backend=bench.get_backend("cpu", fast=False))
    assert fast._epochs is not None and generic._epochs is None
    for runner in (fast, generic):
        with bench.active(runner):
            for _ in range(5):  # epochs 1, 2, then the table again from the weights after epoch 2
                runner.step()
            runner.sync()
    for (W, b), (W_ref, b_ref) in zip(fast.params(), generic.params(), strict=True):
        np.testing.assert_allclose(W, W_ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b, b_ref, rtol=1e-4, atol=1e-6)
    fast.close()
    assert fast._epochs is None


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_a_reduced_precision_group_times_the_tensor_core_step_and_says_who_refuses_it(precision):
    """--precision: gpunn (here on the emulated CUDA device) takes its tensor-core GEMMs and is checked and timed;
    the generic math refuses the run in a row that says why; a peer without precisions is left out of it."""
    from conftest import emulated_cuda_or_skip

    cuda = emulated_cuda_or_skip()
    arch = bench.Architecture((784, 16, 10))
    variants = [("gpunn", cuda), ("gpunn-generic", bench.get_backend("cpu", fast=False))]
    candidates, refused = bench.candidates_for("cuda-emulated", arch, "float32", 64, ["numpy-naive"], variants,
                                               precision)
    assert [c.name for c in candidates] == ["gpunn"] and "GEMMs on" in candidates[0].step
    assert [(r.implementation, r.precision) for r in refused] == [("gpunn-generic", precision)]
    assert refused[0].status.startswith(f"refused: precision {precision} runs")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (64, 784), dtype=np.uint8), rng.integers(0, 10, 64)
    rounds = bench.Rounds(rounds=2, min_rounds=2, group_seconds=60, slot_ms=0, settle_ms=0)
    rows, record = bench.run_group("cuda-emulated", "float32", 16, candidates, images, labels, group_of_params(16),
                                   rounds, precision=precision)
    assert rows[0].status == "ok" and rows[0].precision == precision and len(rows[0].epoch_ms) == 2
    assert record["precision"] == precision
    assert set(cuda.kernels.precisions) == {precision}
    assert bench.same_step(1.0 + bench.CHECK_RTOL[precision] / 2, 1.0, "float32", precision)
    assert not bench.same_step(1.0 + bench.CHECK_RTOL[precision] / 2, 1.0, "float32")


def test_a_reduced_precision_is_for_float32_on_cuda():
    for args in (["--precision", "tf32"], ["--precision", "bf16", "--devices", "cuda", "--dtypes", "float32,float64"]):
        result = subprocess.run([sys.executable, str(BENCHMARKS / "epoch_throughput.py"), "--m", "64", *args],
                                capture_output=True, text=True)
        assert result.returncode == 2 and "tensor cores: give it with --dtypes float32 --devices cuda" in result.stderr


def test_cuda_compile_times_the_modules_a_run_loads():
    """benchmarks/cuda_compile.py compiles what a CUDA run of 784-h-10 loads: every kernel file but single_pass.cu
    whole, and of single_pass.cu the module of the run's hidden size (odd sizes run on the next even kernel) and the
    one with prepare and reduce alone."""
    import cuda_compile

    for hidden, hp in [(10, 10), (7, 8), (16, 16)]:
        modules = cuda_compile.run_modules(hidden)
        assert set(modules) == {("layers.cu", ()), ("metrics.cu", ()), ("optimizer.cu", ()),
                                ("single_pass.cu", ("-DSP_ONLY_HP=0",)), ("single_pass.cu", (f"-DSP_ONLY_HP={hp}",))}
        assert set(modules[("single_pass.cu", (f"-DSP_ONLY_HP={hp}",))]) == {f"single_pass_h{hp}_f32",
                                                                           f"single_pass_h{hp}_f64"}
