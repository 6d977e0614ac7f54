"""The CUDA kernels of gpunn/kernels/: compiled by NVRTC with the options CuPy uses, run unchanged on CPU threads
against NumPy on odd shapes (several blocks, loops that wrap, a last partial tile), and checked for data races
between a block's threads with ThreadSanitizer. No GPU is needed; each part skips with its reason where its tool
(NVRTC, g++, libtsan) is missing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cuda_on_cpu import EmulatedDevice, build_all, tsan_runtime
from conftest import cuda_backend_or_skip
from gpunn.fused_cuda import (
    CUPY_ADDED_OPTIONS,
    KERNEL_DIR,
    RAWMODULE_OPTIONS,
    CupyDevice,
    LaunchConfig,
    kernel_files,
    kernel_names,
    kernel_signatures,
    kernel_source,
)
from gpunn.nn import Layer, cost, one_hot, softmax
from gpunn.optim import OPTIMIZERS, Optimizer

TESTS = Path(__file__).resolve().parent
FILES = [path.name for path in kernel_files()]
DTYPES = ["float32", "float64"]
SUFFIX = {"float32": "f32", "float64": "f64"}


# --- NVRTC: the compiler CuPy's RawModule runs -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["compute_80", "compute_90", "sm_90"])
@pytest.mark.parametrize("file", FILES)
def test_nvrtc_compiles_each_file_as_cupy_would(nvrtc, file, arch):
    """The source and options CuPy 14's RawModule compiles: PTX for compute_XY (Ampere, Hopper), a cubin for sm_90
    (CuPy asks NVRTC for sm_XY when it knows the GPU, as for an H100 or H200). Without warnings; the PTX exports
    exactly the kernels the driver parses from the source, and has no atomics (reductions are deterministic) and no
    warp shuffles (the emulator has no warps)."""
    options = RAWMODULE_OPTIONS + CUPY_ADDED_OPTIONS + (f"-arch={arch}",)
    binary, log = nvrtc.compile(kernel_source(file), file, options)
    assert binary and "warning" not in log.lower(), log
    if arch.startswith("compute"):
        ptx = binary.decode()
        assert sorted(re.findall(r"\.entry\s+(\w+)", ptx)) == sorted(kernel_names((KERNEL_DIR / file).read_text()))
        assert not re.search(r"\b(atom|red)\.", ptx), "an atomic operation makes a sum's order vary between runs"
        assert "shfl" not in ptx


def test_a_compile_error_shows_nvrtcs_log(nvrtc):
    from cuda_on_cpu import NvrtcCompileError

    with pytest.raises(NvrtcCompileError, match=r"broken\.cu.*undefined_name"):
        nvrtc.compile('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }', "broken.cu",
                      RAWMODULE_OPTIONS + ("-arch=compute_80",))


def test_the_source_cupy_compiles_carries_its_headers():
    """Headers are inlined, so that CuPy's cache key (a hash of the source string) changes when a header does."""
    for file in FILES:
        source = kernel_source(file)
        assert not re.search(r"^#include", source, re.MULTILINE) and "#pragma once" not in source
        assert "block_sum" in source


def test_each_kernel_comes_in_both_element_types_with_one_parameter_list():
    kernels = kernel_signatures()
    for name, info in kernels.items():
        if name.endswith("_f32"):
            twin = kernels[name.removesuffix("_f32") + "_f64"]
            assert [p.name for p in twin.params] == [p.name for p in info.params]
            assert [p.ctype.replace("float", "double") for p in info.params] == [p.ctype for p in twin.params]
    assert len(kernels) == 42


# --- the same sources on CPU threads (and, marked gpu, on the GPU) ---------------------------------------------


@pytest.fixture(scope="module", params=["emulated", pytest.param("cupy", marks=pytest.mark.gpu)])
def device(request):
    """The emulator runs the unchanged sources on CPU threads; the CuPy case runs the same launches on the GPU,
    where a kernel that misbehaves is then pinpointed by its own test."""
    if request.param == "cupy":
        return CupyDevice(cuda_backend_or_skip().cupy)
    reason = build_all()
    if reason is not None:
        pytest.skip(reason)
    return EmulatedDevice()


def down(array):
    """A device array as a NumPy array (CuPy's .get() copies it to the host)."""
    return array.get() if hasattr(array, "get") else np.asarray(array)


def random(shape, dtype, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_relu_over_rows_and_columns_that_wrap(device, dtype):
    n, m = 5, 77  # 3 rows of blocks for 5 rows, 2 x 32 threads for 77 columns: both loops wrap
    Z, b = random((n, m), dtype), random((n, 1), dtype, seed=1)
    Z[2, 40] = np.nan
    expected = np.maximum(Z + b, 0)
    Zd = device.upload(Z)
    device.launch(f"bias_relu_{SUFFIX[dtype]}", (2, 3), 32, (Zd, device.upload(b), np.int32(n), np.int32(m)))
    np.testing.assert_array_equal(down(Zd), expected)  # NaN stays NaN, as in np.maximum
    assert np.isnan(down(Zd)[2, 40])


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_mask(device, dtype):
    A = np.maximum(random((3, 61), dtype), 0)
    dA = random((3, 61), dtype, seed=2)
    dA[0, 5], A[0, 5] = np.inf, 0  # an infinite delta times relu' = 0 is NaN, as in gpunn.nn.relu_backward
    with np.errstate(invalid="ignore"):
        expected = dA * (A > 0).astype(dtype)
    out = device.upload(dA)
    device.launch(f"relu_mask_{SUFFIX[dtype]}", 2, 32, (out, device.upload(A), np.int64(A.size)))
    np.testing.assert_array_equal(down(out), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_sum(device, dtype):
    Z = random((5, 77), dtype)
    out = device.empty((5, 1), dtype)
    device.launch(f"row_sum_{SUFFIX[dtype]}", 3, 32, (device.upload(Z), out, np.int32(5), np.int32(77)))
    np.testing.assert_allclose(down(out)[:, 0], Z.sum(axis=1, dtype=np.float64),
                               rtol=1e-6 if dtype == "float32" else 1e-14)


def test_row_sum_with_the_gpus_block_of_256_threads(device):
    Z = random((3, 1000), "float32")
    out = device.empty((3,), "float32")
    device.launch("row_sum_f32", 2, 256, (device.upload(Z), out, np.int32(3), np.int32(1000)))
    np.testing.assert_allclose(down(out), Z.sum(axis=1, dtype=np.float64), rtol=1e-5)


def softmax_inputs(dtype, classes=4, m=77):
    Z = random((classes, m), dtype, scale=3)
    b = random((classes, 1), dtype, seed=1, scale=0.1)
    y = np.random.default_rng(3).integers(0, classes, m).astype(np.int64)
    # ties in the first 10 columns: classes 1 and 3 share the largest logit; NumPy's argmax takes the first
    b[3] = b[1]
    Z[1, :10] = Z[3, :10] = Z[:, :10].max(axis=0) + 5
    return Z, b, y


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_loss_hits_and_delta(device, dtype):
    Z, b, y = softmax_inputs(dtype)
    logits = Z + b
    classes, m = Z.shape
    partials = device.empty((6,), np.float64)
    Zd = device.upload(Z)
    device.launch(f"softmax_xent_{SUFFIX[dtype]}", 3, 32,
                  (Zd, device.upload(b), device.upload(y), np.int32(classes), np.int32(m), partials, np.int32(1)))
    sums = down(partials)
    tolerance = 1e-5 if dtype == "float32" else 1e-12
    Y = one_hot(y, classes, np.dtype(dtype))
    np.testing.assert_allclose(sums[:3].sum() / m, cost(logits, Y), rtol=tolerance)
    assert sums[3:].sum() == np.count_nonzero(np.argmax(logits, axis=0) == y)
    np.testing.assert_allclose(down(Zd), softmax(logits) - Y, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_without_delta_leaves_the_logits(device, dtype):
    Z, b, y = softmax_inputs(dtype)
    Zd = device.upload(Z)
    partials = device.empty((6,), np.float64)
    device.launch(f"softmax_xent_{SUFFIX[dtype]}", 3, 32,
                  (Zd, device.upload(b), device.upload(y), np.int32(4), np.int32(77), partials, np.int32(0)))
    np.testing.assert_array_equal(down(Zd), Z)
    assert np.isfinite(down(partials)).all()


def test_softmax_xent_stays_finite_for_huge_logits_and_flags_a_bad_label(device):
    Z = np.array([[1e4, -1e4], [-1e4, 1e4], [0, 0]], np.float32)
    b = np.zeros((3, 1), np.float32)
    partials = device.empty((2,), np.float64)
    device.launch("softmax_xent_f32", 1, 32, (device.upload(Z), device.upload(b), device.upload(np.array([0, 1])),
                                              np.int32(3), np.int32(2), partials, np.int32(1)))
    assert down(partials).tolist() == [0, 2]
    device.launch("softmax_xent_f32", 1, 32, (device.upload(Z), device.upload(b), device.upload(np.array([0, 7])),
                                              np.int32(3), np.int32(2), partials, np.int32(0)))
    assert np.isnan(down(partials)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_squares_and_the_metrics_rows(device, dtype):
    P = random(101, dtype)
    squares = device.empty((6,), np.float64)
    device.launch(f"sum_squares_{SUFFIX[dtype]}", 3, 32, (device.upload(P), np.int64(60), np.int64(101), squares))
    weights, total = np.sum(P[:60].astype(np.float64) ** 2), np.sum(P.astype(np.float64) ** 2)
    np.testing.assert_allclose([down(squares)[:3].sum(), down(squares)[3:].sum()], [weights, total], rtol=1e-13)

    metrics = device.upload(np.full((4, 5), -7, dtype))
    counter = device.upload(np.array([6], np.int64))  # epoch 6 of a 4-row ring: row 1
    partials = device.upload(np.array([10.0, 20.0, 3.0, 4.0, 40.0, 50.0]))  # 3 blocks: loss sums, then hits
    device.launch(f"train_metrics_{SUFFIX[dtype]}", 1, 32,
                  (metrics, np.int32(4), counter, partials, np.int32(3), squares, np.int32(3), np.int32(200),
                   np.float64(0.5)))
    device.launch(f"val_metrics_{SUFFIX[dtype]}", 1, 32,
                  (metrics, np.int32(4), counter, device.upload(np.array([10.0, 20.0, 3.0, 4.0])), np.int32(2),
                   squares, np.int32(3), np.int32(50)))
    rows = down(metrics)
    expected = [33 / 200 + 0.5 / 400 * weights, 94 / 200, 30 / 50, 7 / 50, 1]
    np.testing.assert_allclose(rows[1], np.asarray(expected, dtype), rtol=1e-6)
    assert (rows[[0, 2, 3]] == -7).all()

    P[70] = np.inf
    device.launch(f"sum_squares_{SUFFIX[dtype]}", 3, 32, (device.upload(P), np.int64(60), np.int64(101), squares))
    device.launch(f"val_metrics_{SUFFIX[dtype]}", 1, 32,
                  (metrics, np.int32(4), counter, partials, np.int32(0), squares, np.int32(3), np.int32(0)))
    row = down(metrics)[1]
    assert np.isnan(row[2]) and np.isnan(row[3]) and row[4] == 0  # no validation set; not finite


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", OPTIMIZERS)
def test_update_rules_match_gpunn_optim(device, rule, dtype):
    n_weights, n_total, m, l2, lr, t = 40, 53, 7, 0.3, 0.05, 3
    P, G = random(n_total, dtype), random(n_total, dtype, seed=1) * 7
    V, S = random(n_total, dtype, seed=2) * 0.1, np.abs(random(n_total, dtype, seed=3)) * 0.01
    inv_m, l2_over_m = np.dtype(dtype).type(1 / m), np.dtype(dtype).type(l2 / m)
    # the gradient the kernel forms from the unnormalized sums G, then gpunn.optim's rule on it
    dP = G * inv_m
    dP[:n_weights] += l2_over_m * P[:n_weights]
    optimizer = Optimizer(rule, beta1=0.8, beta2=0.95, eps=1e-6)
    empty = np.zeros(0, dtype)
    state = {name: [Layer({"v": V, "s": S}[name], empty)] for name in optimizer.state_names}
    [(expected_P, _)], expected_state = optimizer.step([Layer(P, empty)], [Layer(dP, empty)], state, lr, t)

    Pd, Vd, Sd = device.upload(P), device.upload(V), device.upload(S)
    lr_now, step = device.upload(np.array([lr], dtype)), device.upload(np.array([t], np.int64))
    device.launch(f"update_{SUFFIX[dtype]}", 2, 32,
                  (Pd, device.upload(G), Vd, Sd, np.int64(n_weights), np.int64(n_total), inv_m, l2_over_m, lr_now,
                   step, np.int32(OPTIMIZERS.index(rule)), np.float64(0.8), np.float64(0.95), np.float64(1e-6)))
    # the GPU may fuse a multiply and an add (nvcc's default), one rounding fewer than NumPy
    tolerance = {"rtol": 1e-6, "atol": 1e-7} if dtype == "float32" else {"rtol": 1e-14, "atol": 1e-15}
    np.testing.assert_allclose(down(Pd), expected_P, **tolerance)
    for name, kept in (("v", Vd), ("s", Sd)):
        if name in optimizer.state_names:
            np.testing.assert_allclose(down(kept), expected_state[name][0].W, **tolerance)
        else:
            np.testing.assert_array_equal(down(kept), {"v": V, "s": S}[name])  # a rule that keeps no such average


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_step_counters(device, dtype):
    counter, lr_now = device.zeros((1,), np.int64), device.zeros((1,), dtype)
    table = device.upload(np.array([0.5, 0.25, 0.125], dtype))
    suffix = SUFFIX[dtype]
    device.launch(f"set_step_{suffix}", 1, 1, (counter, lr_now, np.int64(1), np.dtype(dtype).type(9)))
    assert down(counter)[0] == 1 and down(lr_now)[0] == 9
    seen = []
    for _ in range(4):  # epochs 2, 3, then past the table's end: its last rate
        device.launch(f"advance_epoch_{suffix}", 1, 1, (counter, table, np.int32(3), lr_now))
        seen.append((int(down(counter)[0]), float(down(lr_now)[0])))
    assert seen == [(2, 0.25), (3, 0.125), (4, 0.125), (5, 0.125)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_grads(device, dtype):
    G, P = random(30, dtype), random(30, dtype, seed=1)
    out = device.empty((30,), dtype)
    inv_m, l2_over_m = np.dtype(dtype).type(1 / 9), np.dtype(dtype).type(0.2)
    device.launch(f"scale_grads_{SUFFIX[dtype]}", 1, 32,
                  (device.upload(G), device.upload(P), out, np.int64(12), np.int64(30), inv_m, l2_over_m))
    expected = G * inv_m
    expected[:12] += l2_over_m * P[:12]
    np.testing.assert_allclose(down(out), expected, rtol=3e-7 if dtype == "float32" else 1e-15)  # FMA on a GPU


def test_reductions_give_the_same_bits_every_run(device):
    Z, b, y = softmax_inputs("float32", m=500)
    runs = []
    for _ in range(2):
        partials = device.empty((6,), np.float64)
        device.launch("softmax_xent_f32", 3, 32, (device.upload(Z), device.upload(b), device.upload(y), np.int32(4),
                                                  np.int32(500), partials, np.int32(1)))
        runs.append(down(partials).tobytes())
    assert runs[0] == runs[1]


@pytest.fixture
def emulated():
    reason = build_all()
    if reason is not None:
        pytest.skip(reason)
    return EmulatedDevice()


def test_a_write_out_of_bounds_is_caught_at_its_launch(emulated):
    """The emulator's guard bytes: bias_relu told of 6 rows on a 5-row buffer writes past its end."""
    Z = emulated.upload(np.zeros((5, 50), np.float32))
    b = emulated.upload(np.zeros((6, 1), np.float32))
    with pytest.raises(AssertionError, match="bias_relu_f32 wrote outside a buffer of 1000 bytes"):
        emulated.launch("bias_relu_f32", (2, 3), 32, (Z, b, np.int32(6), np.int32(50)))


def test_uninitialized_device_memory_reads_as_nan(emulated):
    assert np.isnan(emulated.empty((3,), np.float32)).all() and (emulated.empty((2,), np.int64) == -1).all()


# --- ThreadSanitizer -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def libtsan():
    path, reason = tsan_runtime()
    if path is None:
        pytest.skip(f"ThreadSanitizer cannot run here: {reason}")
    reason = build_all(tsan=True)
    if reason is not None:
        pytest.skip(reason)
    return path


def run_tsan_scenario(libtsan, *arguments):
    # halt_on_error: the first report is enough, and symbolizing every stack of a broken kernel takes seconds
    # one OpenBLAS thread: its thread pool's start-up under TSan costs more than the whole scenario
    env = {**os.environ, "LD_PRELOAD": str(libtsan), "TSAN_OPTIONS": "exitcode=66 halt_on_error=1",
           "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "cuda_on_cpu.tsan_scenario", *arguments], cwd=TESTS, env=env,
                          capture_output=True, text=True, timeout=300)


def test_no_data_race_between_a_blocks_threads(libtsan):
    """Every kernel, both dtypes, through the driver, on ThreadSanitizer builds: no race is reported."""
    result = run_tsan_scenario(libtsan)
    assert result.returncode == 0 and "ThreadSanitizer" not in result.stderr, result.stderr[-4000:]
    assert set(result.stdout.split()) == set(kernel_signatures())


def test_thread_sanitizer_reports_a_missing_barrier(libtsan, tmp_path):
    """The check above can fail: block_sum without the barrier between its tree's rounds races."""
    broken = tmp_path / "kernels"
    shutil.copytree(KERNEL_DIR, broken)
    header = (broken / "common.cuh").read_text()
    needle = "        // the next round reads what this round wrote\n        __syncthreads();\n"
    assert needle in header
    (broken / "common.cuh").write_text(header.replace(needle, ""))
    result = run_tsan_scenario(libtsan, "--kernel-dir", str(broken), "--only", "metrics.cu")
    assert result.returncode == 66 and "WARNING: ThreadSanitizer: data race" in result.stderr, result.stderr[-2000:]
    assert "common.cuh" in result.stderr and "block_sum" in result.stderr


def test_launch_config_grids_fit_the_limits():
    config = LaunchConfig()
    assert config.reduce_grid(59_000) == 231 and config.reduce_grid(10**9) == 1024 and config.reduce_grid(1) == 1
    assert config.elementwise_grid(10**9) == 4096
