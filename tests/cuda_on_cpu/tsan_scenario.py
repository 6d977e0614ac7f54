"""Run every kernel through gpunn.fused_cuda's driver on ThreadSanitizer builds of the emulator, in both dtypes.

    OPENBLAS_NUM_THREADS=1 LD_PRELOAD=$(g++ -print-file-name=libtsan.so) \
        python -m cuda_on_cpu.tsan_scenario [--kernel-dir DIR] [--only FILE]

(from tests/). TSan reports a data race between the threads of a block, such as a missing __syncthreads, on
stderr and makes the process exit with 66. The last line of stdout lists the kernels that ran, so that the test
can check that every kernel was covered. ``--only metrics.cu`` runs just that file's sum_squares (a quick check
that a broken block_sum is caught); ``--kernel-dir`` runs the kernels of another directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gpunn.fused_cuda import KERNEL_DIR, CudaGraphStep, FusedCudaPass, FusedCudaUpdate, LaunchConfig
from gpunn.nn import Architecture, Layer, init_params, one_hot
from gpunn.optim import Optimizer

from .device import EmulatedDevice

# several blocks of several threads, loops that run more than once, and a last partial tile
CONFIG = LaunchConfig(block=16, reduce_blocks=3, blocks=4, rows=2)


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
    else:
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
