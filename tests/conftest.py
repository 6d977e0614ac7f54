"""Backends for the tests: NumPy always; CuPy (marked ``gpu``) skipped with its reason where no GPU answers;
array-api-strict on a simulated non-CPU device, which fails on any implicit host conversion or device mixing; and
the CUDA fast path emulated on the CPU (its unchanged .cu kernels run by CPU threads, tests/cuda_on_cpu), skipped
with its reason where no C++ compiler is found."""

from __future__ import annotations

import numpy as np
import pytest

from gpunn.backend import Backend, Step, get_backend
from gpunn.errors import BackendError


def cuda_backend_or_skip(*, fast: bool | None = None) -> Backend:
    try:
        return get_backend("cuda", fast=fast)
    except BackendError as error:
        pytest.skip(f"no usable CUDA device: {error.cause}")


class StrictBackend(Backend):
    """array-api-strict on its simulated 'device1': arrays there cannot reach NumPy except through to_numpy."""

    def __init__(self) -> None:
        import array_api_strict

        super().__init__("array-api-strict:device1", array_api_strict, array_api_strict.Device("device1"))

    def to_numpy(self, a):
        return np.asarray(a.to_device(self.xp.Device("CPU_DEVICE")))


class EmulatedCudaBackend(Backend):
    """NumPy arrays, with gpunn.fused_cuda's driver as the fast path, its kernels the unchanged .cu sources run on CPU
    threads: through this backend every backend-parametrized test also runs the CUDA fast path (one step, the
    update rules, whole epochs as a recorded graph)."""

    def __init__(self) -> None:
        import array_api_compat.numpy as xp
        from cuda_on_cpu import EmulatedDevice

        super().__init__("cuda-emulated", xp, "cpu", fast=True)
        self.kernels = EmulatedDevice()

    def asarray(self, a, dtype=None):
        return np.ascontiguousarray(super().asarray(a, dtype))  # row-major, as CupyBackend lays out what it copies

    def random(self, seed: int):
        return np.random.default_rng(seed)

    def step(self, arch, *, dtype: str, columns: int, dropout: float = 0.0, pixels: bool = True,
             batches: bool = False, precision: str = "float32") -> Step:
        from gpunn import fused_cuda

        fused = self.fast and fused_cuda.cuda_step(arch, dtype=dtype, columns=columns, dropout=dropout,
                                                   pixels=pixels, precision=precision, device=self.kernels)
        return fused or super().step(arch, dtype=dtype, columns=columns, dropout=dropout, pixels=pixels,
                                     batches=batches, precision=precision)


@pytest.fixture(scope="module")
def nvrtc():
    """NVRTC, the compiler CuPy's RawModule runs (pip nvidia-cuda-nvrtc), or a skip that says why it is missing."""
    from cuda_on_cpu import NvrtcNotFound, find_nvrtc

    try:
        return find_nvrtc()
    except NvrtcNotFound as error:
        pytest.skip(str(error))


def emulated_cuda_or_skip() -> Backend:
    from cuda_on_cpu import build_all

    reason = build_all()
    if reason is not None:
        pytest.skip(f"the CUDA kernels cannot run on the CPU here: {reason}")
    return EmulatedCudaBackend()


@pytest.fixture
def cpu() -> Backend:
    return get_backend("cpu")


@pytest.fixture
def cuda() -> Backend:
    return cuda_backend_or_skip()


@pytest.fixture
def strict() -> Backend:
    return StrictBackend()


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu), "array-api-strict", "cuda-emulated"])
def backend(request) -> Backend:
    """Every backend the generic code must run on, each with its fast path where it has one."""
    if request.param == "numpy":
        return get_backend("cpu")
    if request.param == "cupy":
        return cuda_backend_or_skip(fast=True)
    if request.param == "cuda-emulated":
        return emulated_cuda_or_skip()
    return StrictBackend()
