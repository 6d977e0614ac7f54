"""The helpers of gpunn.numba_vectors that run in Python: scratch on cache lines, for both kernels. (The vector
operations themselves are checked through the kernels, in test_numba_cpu.py and test_numba_narrow.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from gpunn.nn import Architecture
from gpunn.numba_cpu import SinglePassCpu
from gpunn.numba_narrow import NarrowPass, blocks_of
from gpunn.numba_vectors import aligned_zeros


@pytest.mark.parametrize("shape", [1, 7, (3, 5), (2, 784, 16)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_aligned_zeros_are_zeros_on_a_cache_line(shape, dtype):
    # many at once: NumPy's own 16-byte alignment would put some of them on a 64-byte boundary by chance
    arrays = [aligned_zeros(shape, dtype) for _ in range(32)]
    for a in arrays:
        assert a.ctypes.data % 64 == 0
        assert a.shape == np.empty(shape).shape and a.dtype == dtype and a.flags.c_contiguous
        assert not a.any()
    arrays[0][...] = 1  # each its own memory
    assert not arrays[1].any()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hidden", [1, 10, 12])
def test_every_chunk_of_the_narrow_kernels_scratch_starts_on_a_cache_line(hidden, dtype):
    arch = Architecture((784, hidden, 10))
    for _ in range(8):
        narrow = NarrowPass(arch, dtype, threads=3)
        for name in ("_dZ", "_GW1", "_G1", "_G2", "_G2b"):
            scratch = getattr(narrow, name)
            assert [chunk.ctypes.data % 64 for chunk in scratch] == [0, 0, 0], name
        blocks = blocks_of(np.ones((37, 784), np.uint8), np.arange(37), super_blocks=narrow.super_blocks)
        labels = narrow.labels(blocks, np.arange(37) % 10)
        assert labels.ctypes.data % 64 == 0 and list(labels[37:]) == [-1] * (len(labels) - 37)


@pytest.mark.parametrize("hidden", [10, 40])
def test_the_other_kernels_weights_in_its_layout_start_on_cache_lines(hidden):
    for _ in range(8):
        single = SinglePassCpu(Architecture((784, hidden, 10)), "float32", 1000, narrow=False)
        for name in ("_W1T", "_W2p", "_W2T", "_b1p", "_b2p", "_D", "_A1", "_dZ1", "_P", "_dW1T"):
            assert getattr(single, name).ctypes.data % 64 == 0, name
        assert np.all(single._b2p == -np.inf)
