"""Run every kernel through gpunn.fused_cuda's driver on ThreadSanitizer builds of the emulator, in both dtypes.

    OPENBLAS_NUM_THREADS=1 LD_PRELOAD=$(g++ -print-file-name=libtsan.so) \
        python -m cuda_on_cpu.tsan_scenario [--kernel-dir DIR] [--only FILE]

(from tests/). TSan reports a data race between the threads of a block, such as a missing __syncthreads, on
stderr and makes the process exit with 66. The last line of stdout lists the kernels that ran, so that the test
can check that every kernel was covered. ``--only metrics.cu`` runs just that file's sum_squares (a quick check
that a broken block_sum is caught); ``--only single_pass.cu`` just the single pass, every width in both dtypes;
``--kernel-dir`` runs the kernels of another directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gpunn.fused_cuda import (
    KERNEL_DIR,
    CudaGraphStep,
    FusedCudaPass,
    FusedCudaUpdate,
    LaunchConfig,
    SinglePassCudaPass,
    SinglePassGraphStep,
)
from gpunn.nn import Architecture, Layer, init_params, one_hot
from gpunn.optim import Optimizer

from .device import EmulatedDevice

# several blocks of several threads, loops that run more than once, and a last partial tile
CONFIG = LaunchConfig(block=16, reduce_blocks=3, blocks=4, rows=2)


def single_pass(device: EmulatedDevice, rng: np.random.Generator) -> None:
    """Every width of the single pass in both dtypes: 200 inputs take blocks of 64 threads (four forward slices, so
    two rounds of their pairwise sums; 8 pixels past 3 x 64 kept in shared memory; the per-sample phases' items
    then belong to other threads than the samples' own), 150 samples are 5 tiles on 3 blocks (a block runs two,
    with the prefetch between them; the last is partial). Pixels are mostly zero, as MNIST's, so that pixels are
    skipped. Odd h runs the padded unit. Then one epoch of the runner, replayed from its graph, and the reduction
    on 128 threads (4 lanes per column: a tree of two rounds; 2 blocks for 300 sums: each block runs 5 rounds)."""
    n0, m = 200, 150
    X = (rng.random((n0, m)) < 0.3) * rng.integers(1, 256, (n0, m))
    X[:, 40:45] = 0  # samples without a single nonzero pixel
    Xd = device.upload(X.astype(np.uint8))
    y = rng.integers(0, 7, m).astype(np.int64)
    y[3] = 9  # a label out of range: the loss is NaN, nothing else changes
    yd = device.upload(y)
    for dtype in ("float32", "float64"):
        for h in (1, 4, 5, 8, 9, 12, 13, 16):  # every kernel width 2 .. 16, odd and even h
            arch = Architecture((n0, h, 7))
            params = [Layer(device.upload(W), device.upload(b + 0.1))
                      for W, b in init_params(arch, init="he", seed=h, dtype=dtype)]
            with SinglePassCudaPass(arch, dtype, m, device=device) as gradients:
                gradients(params, Xd, None, yd, l2=0.1)
    arch = Architecture((n0, 10, 7))
    params = [Layer(device.upload(W), device.upload(b)) for W, b in init_params(arch, init="he", seed=0)]
    rule = Optimizer("momentum")
    X_val = device.upload((X[:, :20] / 255).astype(np.float32))
    runner = SinglePassGraphStep(arch, "float32", rule, 0.1, [0.01], (Xd, device.upload(np.abs(y) % 7)),
                                 (X_val, device.upload(y[:20] % 7)), 2, device)
    with runner:
        runner.load(params, {"v": [Layer(0 * W, 0 * b) for W, b in params]}, epochs_done=0)
        runner.run(1)
    part = rng.standard_normal((7, 300))
    G = device.empty((300,), np.float64)
    device.launch("single_pass_reduce_f64", 2, 128, (device.upload(part), np.int32(7), np.int64(300), np.int64(50), G))
    expected = part.sum(axis=0)
    expected[:50] /= 255
    assert np.allclose(G, expected, rtol=1e-13), (G, expected)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel-dir", type=Path, default=KERNEL_DIR)
    parser.add_argument("--only")
    options = parser.parse_args()
    device = EmulatedDevice(CONFIG, tsan=True, kernel_dir=options.kernel_dir)
    rng = np.random.default_rng(0)
    if options.only == "metrics.cu":
        P = device.upload(rng.standard_normal(101).astype(np.float32))
        squares = device.zeros((2 * CONFIG.reduce_blocks,), np.float64)
        device.launch("sum_squares_f32", 3, CONFIG.block, (P, np.int64(60), np.int64(101), squares))
        expected = float(np.sum(np.square(P, dtype=np.float64)))
        assert abs(squares[3:].sum() - expected) < 1e-9 * expected, (squares, expected)
    elif options.only == "single_pass.cu":
        single_pass(device, rng)
    else:
        single_pass(device, rng)
        arch = Architecture((9, 5, 4, 3))
        m = 53
        for dtype in ("float32", "float64"):
            params = [Layer(W, b + 0.1) for W, b in init_params(arch, init="he", seed=1, dtype=dtype)]
            X = rng.random((9, m)).astype(dtype)
            y = rng.integers(0, 3, m).astype(np.int64)
            on_device = [Layer(device.upload(W), device.upload(b)) for W, b in params]
            Xd, yd = device.upload(X), device.upload(y)
            with FusedCudaPass(arch, dtype, m, device=device) as gradients:
                _, _, grads = gradients(on_device, Xd, one_hot(y, 3, np.dtype(dtype)), yd, l2=0.1)
            rule = Optimizer("adam")
            update = FusedCudaUpdate(rule, dtype, device=device)
            update(on_device, grads, {name: [Layer(0 * W, 0 * b) for W, b in on_device] for name in ("v", "s")},
                   0.01, 1)
            runner = CudaGraphStep(arch, dtype, rule, 0.1, [0.01], (Xd, yd), (Xd[:, :20].copy(), yd[:20].copy()), 2,
                                   device)
            with runner:
                runner.load(on_device, {name: [Layer(0 * W, 0 * b) for W, b in on_device] for name in ("v", "s")},
                            epochs_done=0)
                runner.run(1)  # a replay of the captured epoch
    print(" ".join(sorted(set(device.launches))))


if __name__ == "__main__":
    main()
