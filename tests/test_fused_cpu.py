"""The CPU fast path against the generic math: the same loss, accuracy and gradients, step by step and after ten
epochs; its buffers, threads and BLAS setting; and the cases it leaves to the generic code."""

from __future__ import annotations

import tracemalloc
from functools import partial

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from gpunn import fused_cpu
from gpunn.backend import GENERIC, get_backend
from gpunn.data import load_bundled_sample, split
from gpunn.fused_cpu import FusedCpuPass
from gpunn.nn import Architecture, Layer, init_params, loss_and_gradients, one_hot
from gpunn.train import TrainConfig, fit

from helpers import assert_same_step


@pytest.fixture(scope="module")
def sample():
    data = load_bundled_sample()
    return np.ascontiguousarray(data.train_images.T), data.train_labels.astype(np.int64)


def step_inputs(sample, sizes, dtype, m):
    pixels, labels = sample
    arch = Architecture(sizes)
    params = [Layer(W, b + 0.01) for W, b in init_params(arch, init="he", seed=1, dtype=dtype)]  # b != 0 counts
    X = pixels[:, :m].astype(dtype) / 255
    y = labels[:m]
    return arch, params, X, one_hot(y, 10, getattr(np, dtype)), y


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("sizes", [(784, 10, 10), (784, 32, 16, 10)], ids=["one-hidden", "two-hidden"])
@pytest.mark.parametrize("l2", [0.0, 0.7])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_one_step_matches_the_generic_pass(sample, monkeypatch, dtype, sizes, l2, workers):
    # small chunks, so that three threads split 4,999 columns unevenly even where the machine has fewer cores
    monkeypatch.setattr(fused_cpu, "MIN_CHUNK", 500)
    arch, params, X, Y, y = step_inputs(sample, sizes, dtype, m=4999)
    with FusedCpuPass(arch, dtype, X.shape[1], workers=workers) as fused:
        assert fused.workers == workers
        result = fused(params, X, Y, y, l2=l2)
    assert_same_step(result, loss_and_gradients(params, X, Y, y, arch, l2=l2), dtype)


def test_tiles_that_bound_the_memory_give_the_same_step(sample):
    arch, params, X, Y, y = step_inputs(sample, (784, 64, 10), "float32", m=3001)
    with FusedCpuPass(arch, "float32", X.shape[1], workers=1, budget_bytes=200_000) as fused:
        assert 1 < fused.tile < 3001  # several tiles per chunk, the last one shorter
        result = fused(params, X, Y, y)
    assert_same_step(result, loss_and_gradients(params, X, Y, y, arch), "float32")


def test_smaller_batches_reuse_the_buffers(sample):
    """A pass made for the batch size also takes the epoch's last, shorter batch."""
    arch, params, X, Y, y = step_inputs(sample, (784, 10, 10), "float64", m=1000)
    with FusedCpuPass(arch, "float64", 1000) as fused:
        buffers = [id(a) for a in fused._scratch[0].A]
        result = fused(params, X[:, :333], Y[:, :333], y[:333])
        assert [id(a) for a in fused._scratch[0].A] == buffers
        with pytest.raises(ValueError, match="made for at most 1000 columns, got 1001"):
            fused(params, np.zeros((784, 1001)), np.zeros((10, 1001)), np.zeros(1001, np.int64))
    assert_same_step(result, loss_and_gradients(params, X[:, :333], Y[:, :333], y[:333], arch), "float64")


def test_a_step_allocates_almost_nothing(sample):
    """After the first step, a step allocates only its results: far less than one activation array (h x m)."""
    arch, params, X, Y, y = step_inputs(sample, (784, 32, 10), "float32", m=4999)
    activations = 32 * 4999 * 4
    with FusedCpuPass(arch, "float32", X.shape[1]) as fused:
        fused(params, X, Y, y)
        tracemalloc.start()
        fused(params, X, Y, y)
        _, fused_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    tracemalloc.start()
    loss_and_gradients(params, X, Y, y, arch)
    _, generic_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    results = sum(W.nbytes + b.nbytes for W, b in params)
    assert fused_peak < results + activations / 4 < generic_peak


def test_blas_runs_one_thread_per_chunk_while_entered_and_is_restored():
    def blas_threads():
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    with FusedCpuPass(Architecture((784, 10, 10)), "float32", 100_000, workers=2):
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before
    with FusedCpuPass(Architecture((784, 10, 10)), "float32", 100_000, workers=1):
        assert blas_threads() == [1] * len(before)  # one chunk: one thread too, as the step's name says
    assert blas_threads() == before


def test_a_floating_point_error_is_raised_from_every_thread(sample, monkeypatch):
    """np.errstate is per thread: the chunks' threads apply the caller's setting."""
    monkeypatch.setattr(fused_cpu, "MIN_CHUNK", 500)
    arch, params, X, Y, y = step_inputs(sample, (784, 10, 10), "float32", m=2000)
    huge = [Layer(W * np.float32(1e30), b) for W, b in params]
    with FusedCpuPass(arch, "float32", 2000, workers=2) as fused:
        with np.errstate(over="raise"), pytest.raises(FloatingPointError):
            fused(huge, X, Y, y)
        with np.errstate(over="ignore", invalid="ignore"):
            loss, _, _ = fused(huge, X, Y, y)
    assert not np.isfinite(loss)


def test_ten_epochs_end_where_the_generic_code_ends(monkeypatch):
    monkeypatch.setattr(fused_cpu, "MIN_CHUNK", 1000)  # several threads, even on this small sample
    parts = split(load_bundled_sample(), val_size=500, seed=0)
    # two hidden layers: the fused pass's (one hidden layer of up to 512 units goes to the Numba single pass)
    config = TrainConfig(hidden=(24, 16), epochs=10, lr=0.3, l2=0.1)
    fast, generic = get_backend("cpu"), get_backend("cpu", fast=False)
    assert fast.step(Architecture((784, 24, 16, 10)), dtype="float32", columns=4500).name.startswith("fused CPU pass")
    runs = [fit(parts, config, backend=backend) for backend in (fast, generic)]
    np.testing.assert_allclose([s.loss for s in runs[0].history], [s.loss for s in runs[1].history], rtol=1e-5)
    for (W, b), (ref_W, ref_b) in zip(runs[0].model.params, runs[1].model.params, strict=True):
        np.testing.assert_allclose(W, ref_W, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b, ref_b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("arch", "dropout", "fast"),
    [
        (Architecture((784, 10, 10), "sigmoid"), 0.0, True),
        (Architecture((784, 10, 10), "tanh"), 0.0, True),
        (Architecture((2, 3, 1), "relu", "sigmoid"), 0.0, True),
        (Architecture((784, 10, 10)), 0.2, True),
        (Architecture((784, 10, 10)), 0.0, False),
    ],
    ids=["sigmoid", "tanh", "sigmoid-output", "dropout", "fast-off"],
)
def test_the_generic_pass_runs_where_the_fast_path_does_not_apply(arch, dropout, fast):
    backend = get_backend("cpu", fast=fast)
    step = backend.step(arch, dtype="float32", columns=60_000, dropout=dropout)
    assert step.name == GENERIC and not step.pixels
    with step.gradients() as gradients:
        assert isinstance(gradients, partial) and gradients.func is loss_and_gradients


@pytest.mark.parametrize("arch", [Architecture((4, 3, 2), "tanh"), Architecture((4, 3, 1), "relu", "sigmoid")])
def test_the_pass_refuses_networks_it_does_not_compute(arch):
    with pytest.raises(ValueError, match="needs ReLU hidden layers and a softmax output"):
        FusedCpuPass(arch, "float32", 100)


def test_the_fast_path_names_its_threads(monkeypatch):
    backend, arch = get_backend("cpu"), Architecture((784, 10, 10, 10))  # two hidden layers: the fused pass's
    monkeypatch.setattr(fused_cpu, "usable_cores", lambda: 4)
    def name(columns):
        return backend.step(arch, dtype="float32", columns=columns).name

    assert name(60_000) == "fused CPU pass, 4 threads"
    assert name(10_000) == "fused CPU pass, 2 threads"  # chunks of at least MIN_CHUNK
    assert name(64) == "fused CPU pass, 1 thread"


def test_dropout_is_refused_by_the_pass_itself(sample):
    arch, params, X, Y, y = step_inputs(sample, (784, 10, 10), "float32", m=100)
    with FusedCpuPass(arch, "float32", 100) as fused, pytest.raises(ValueError, match="no dropout"):
        fused(params, X, Y, y, dropout=0.5, rng=np.random.default_rng(0))
