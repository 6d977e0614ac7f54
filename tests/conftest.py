"""Backends for the tests: NumPy always; CuPy (marked ``gpu``) skipped with its reason where no GPU answers;
array-api-strict on a simulated non-CPU device, which fails on any implicit host conversion or device mixing."""

from __future__ import annotations

import numpy as np
import pytest

from gpunn.backend import Backend, get_backend
from gpunn.errors import BackendError


def cuda_backend_or_skip() -> Backend:
    try:
        return get_backend("cuda")
    except BackendError as error:
        pytest.skip(f"no usable CUDA device: {error.cause}")


class StrictBackend(Backend):
    """array-api-strict on its simulated 'device1': arrays there cannot reach NumPy except through to_numpy."""

    def __init__(self) -> None:
        import array_api_strict

        super().__init__("array-api-strict:device1", array_api_strict, array_api_strict.Device("device1"))

    def to_numpy(self, a):
        return np.asarray(a.to_device(self.xp.Device("CPU_DEVICE")))


@pytest.fixture
def cpu() -> Backend:
    return get_backend("cpu")


@pytest.fixture
def cuda() -> Backend:
    return cuda_backend_or_skip()


@pytest.fixture
def strict() -> Backend:
    return StrictBackend()


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu), "array-api-strict"])
def backend(request) -> Backend:
    """Every backend the generic code must run on."""
    if request.param == "numpy":
        return get_backend("cpu")
    if request.param == "cupy":
        return cuda_backend_or_skip()
    return StrictBackend()
