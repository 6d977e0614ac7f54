"""Choose the array library and the device once, at the edge, and pass the result around.

``get_backend("cpu")`` gives NumPy, ``get_backend("cuda")`` or ``get_backend("cuda:N")`` gives CuPy on GPU N, and
``get_backend("auto")`` takes the GPU when one answers and the CPU otherwise. Everything below the CLI, the
benchmarks and the test fixtures receives the resulting :class:`Backend`; nothing else picks a device.

This is the only module of gpunn that imports CuPy, and it does so only when a CUDA device is asked for, so
``import gpunn`` and ``gpunn --help`` work (and stay fast) on machines without it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from gpunn import fused_cpu
from gpunn.errors import BackendError, DeviceSpecError
from gpunn.nn import Architecture, loss_and_gradients

__all__ = ["Backend", "CupyBackend", "GradientPass", "NumpyBackend", "get_backend", "parse_device"]

#: ``(params, X, Y, y, *, l2, dropout, rng) -> (loss, accuracy, grads)``, as :func:`gpunn.nn.loss_and_gradients`
GradientPass = Callable[..., tuple[Any, Any, list[Any]]]

DEVICE_CHOICES = "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
CUDA_EXTRAS_HINT = (
    "install the extra that matches your NVIDIA driver: pip install 'gpunn[cuda12]' or 'gpunn[cuda13]' "
    "(nvidia-smi prints the highest CUDA version the driver supports)"
)

_DEVICE_RE = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")
# cupy (a source build), cupy-cuda11x / -cuda12x / -cuda13x, cupy-rocm-5-0 ...: all install the module `cupy`.
_CUPY_DIST_RE = re.compile(r"cupy(-cuda\d+x?|-rocm-[\d-]+)?")


class Backend:
    """An array namespace and a device: everything the generic code needs to know about where it runs.

    ``xp`` is an array-API-standard namespace. Arrays cross between the host and the device only through
    :meth:`asarray` (host to device) and :meth:`to_numpy` (device to host); both are explicit so that a reader
    can find every transfer. Subclasses add what a library needs (device synchronization, a description) and
    fast paths (:meth:`gradient_pass`) that fall back to the generic code for what they do not cover.
    ``fast=False`` turns the fast paths off: the generic code runs everywhere, to compare against or to read.
    """

    def __init__(self, name: str, xp: ModuleType, device: Any, reason: str = "", *, fast: bool = True) -> None:
        self.name = name
        self.xp = xp
        self.device = device
        #: why this backend was chosen, when ``auto`` chose it; empty otherwise
        self.reason = reason
        self.fast = fast

    @property
    def is_cuda(self) -> bool:
        return self.name.startswith("cuda")

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """Host to device: the array ``a`` (NumPy or nested sequences) as an array of this backend."""
        return self.xp.asarray(a, dtype=dtype, device=self.device)

    def to_numpy(self, a: Any) -> np.ndarray:
        """Device to host: ``a`` as a NumPy array (a copy where the data lives elsewhere)."""
        return np.asarray(a)

    def synchronize(self) -> None:
        """Wait until all work queued on the device has finished; a no-op where work is synchronous."""

    def random(self, seed: int) -> Any:
        """A generator of uniform [0, 1) arrays on the device: ``.random(shape, dtype)``, seeded with ``seed``.

        The array API has no random numbers, so each backend brings its own. This generic one draws on the host
        and transfers the result: correct anywhere, fast nowhere; NumPy and CuPy override it.
        """
        return _HostDrawn(np.random.default_rng(seed), self)

    def fast_path(self, arch: Architecture, *, columns: int, dropout: float = 0.0) -> str | None:
        """What :meth:`gradient_pass` would use for this network and batch: a fast path's name, or None for the
        generic code. ``columns``: the samples in one step."""
        return None

    @contextmanager
    def gradient_pass(self, arch: Architecture, *, dtype: str, columns: int, dropout: float = 0.0
                      ) -> Iterator[GradientPass]:
        """The function that computes every step's loss, accuracy and gradients during one training run.

        Entered once around the run (a fast path may hold buffers, threads or library settings while it lasts).
        Here, and wherever a backend's fast path does not cover ``arch``, ``dropout`` or ``dtype``, it is the
        generic :func:`gpunn.nn.loss_and_gradients`, which the fast paths are tested against.
        """
        yield partial(loss_and_gradients, arch=arch)

    def describe(self) -> dict[str, str]:
        """Library versions and hardware, as ``{label: text}`` in display order."""
        return {"device": self.name, "array library": self.xp.__name__}

    def summary(self) -> str:
        """The description on one line."""
        items = self.describe()
        head = items.pop("device")
        return f"{head} ({', '.join(items.values())})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _HostDrawn:
    def __init__(self, rng: np.random.Generator, backend: Backend) -> None:
        self.rng, self.backend = rng, backend

    def random(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.backend.asarray(self.rng.random(shape), dtype=dtype)


class NumpyBackend(Backend):
    """The CPU through NumPy (seen through array-api-compat's standard namespace).

    Its fast path is :class:`gpunn.fused_cpu.FusedCpuPass`: ReLU networks with a softmax output, without dropout,
    computed in place on every core."""

    def __init__(self, reason: str = "", *, fast: bool = True) -> None:
        super().__init__("cpu", array_api_compat.array_namespace(np.empty(0)), "cpu", reason, fast=fast)

    def random(self, seed: int) -> Any:
        return np.random.default_rng(seed)

    def fast_path(self, arch: Architecture, *, columns: int, dropout: float = 0.0) -> str | None:
        if not (self.fast and fused_cpu.supports(arch, dropout=dropout)):
            return None
        threads = fused_cpu.threads_for(columns)
        return f"fused CPU pass, {threads} thread{'s' if threads > 1 else ''}"

    @contextmanager
    def gradient_pass(self, arch: Architecture, *, dtype: str, columns: int, dropout: float = 0.0
                      ) -> Iterator[GradientPass]:
        if self.fast_path(arch, columns=columns, dropout=dropout) is None:
            with super().gradient_pass(arch, dtype=dtype, columns=columns, dropout=dropout) as generic:
                yield generic
            return
        with fused_cpu.FusedCpuPass(arch, dtype, columns) as fused:
            yield fused

    def describe(self) -> dict[str, str]:
        return {
            "device": "cpu",
            "cpu": f"{_cpu_model()}, {os.cpu_count()} logical cores",
            "numpy": f"numpy {np.__version__}",
            "blas": _numpy_blas(),
        }


class CupyBackend(Backend):
    """One CUDA GPU through CuPy. Made by :func:`get_backend`, which checks first that the GPU answers."""

    def __init__(self, cupy: ModuleType, index: int, reason: str = "", *, fast: bool = True) -> None:
        import array_api_compat.cupy as xp

        self.cupy = cupy
        self.index = index
        device = cupy.cuda.Device(index)
        # CuPy launches work on the *current* device: make it this one for the thread, once, here at the edge.
        device.use()
        super().__init__(f"cuda:{index}", xp, device, reason, fast=fast)

    def to_numpy(self, a: Any) -> np.ndarray:
        return self.cupy.asnumpy(a)

    def synchronize(self) -> None:
        self.device.synchronize()

    def random(self, seed: int) -> Any:
        return self.cupy.random.default_rng(seed)  # drawn on the GPU

    def describe(self) -> dict[str, str]:
        runtime = self.cupy.cuda.runtime
        props = runtime.getDeviceProperties(self.index)
        free, total = self.device.mem_info
        return {
            "device": self.name,
            "gpu": f"{_decode(props['name'])} (compute capability {props['major']}.{props['minor']})",
            "memory": f"{total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free",
            "cuda": f"CUDA runtime {_cuda_version(runtime.runtimeGetVersion())}, "
            f"driver supports {_cuda_version(runtime.driverGetVersion())}",
            "cupy": f"cupy {self.cupy.__version__}",
        }


def parse_device(device: str) -> tuple[str, int | None]:
    """``"cuda:1"`` -> ``("cuda", 1)``; ``"cpu"`` -> ``("cpu", None)``. Raises DeviceSpecError when malformed."""
    match = _DEVICE_RE.fullmatch(device.strip().lower())
    if match is None or (match[1] != "cuda" and match[2] is not None):
        raise DeviceSpecError(f"unknown device {device!r}; {DEVICE_CHOICES}")
    return match[1], None if match[2] is None else int(match[2])


def get_backend(device: str = "auto", *, fast: bool = True) -> Backend:
    """The backend for ``device``: ``"auto"``, ``"cpu"``, ``"cuda"`` (GPU 0) or ``"cuda:N"``.

    ``auto`` uses cuda:0 when CuPy imports and the GPU answers, else the CPU; ``Backend.reason`` says which and
    why. An explicit ``cuda`` raises BackendError naming the cause and the fix when the GPU cannot be used.
    ``fast=False``: the generic code only, no fast paths.
    """
    kind, index = parse_device(device)
    if kind == "cpu":
        return NumpyBackend(fast=fast)
    if kind == "cuda":
        return _cuda_backend(0 if index is None else index, fast=fast)
    try:
        backend = _cuda_backend(0, fast=fast)
    except BackendError as error:
        return NumpyBackend(reason=f"auto chose the CPU: {error.cause}", fast=fast)
    gpu = backend.describe()["gpu"]
    backend.reason = f"auto chose cuda:0: {gpu}"
    return backend


def out_of_memory_message(error: BaseException) -> str | None:
    """One line for an allocation failure on any backend (how much was needed, how much is free), else None.

    CuPy's OutOfMemoryError is recognized by name, so that this works without importing CuPy.
    """
    kind = type(error)
    if kind.__name__ != "OutOfMemoryError" or not kind.__module__.startswith("cupy"):
        # CuPy's error is a MemoryError too, so NumPy's ("Unable to allocate 1.5 GiB ...") is told apart second
        if isinstance(error, MemoryError):
            return f"out of host memory: {_one_line(error)}; try a smaller --hidden or less data"
        return None
    # CuPy says "Out of memory allocating 1,234,567 bytes (allocated so far: 5,000,000 bytes)."
    numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", str(error))]
    needed = f"{numbers[0] / 2**30:.2f} GiB" if numbers else "an allocation"
    where = "the GPU"
    cupy = importlib.import_module("cupy")  # already imported: it raised the error
    try:
        device = cupy.cuda.Device()
        free, total = device.mem_info
        where = f"cuda:{device.id}, which has {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB"
    except Exception:  # noqa: BLE001 - a failing query must not hide the original message
        pass
    return (f"out of GPU memory: needed {needed} more on {where}; try a smaller --hidden, --dtype float32, "
            "or --device cpu")


def cuda_devices() -> list[str]:
    """``["cuda:0 (NVIDIA H100 80GB HBM3)", ...]``, or BackendError saying why there are none."""
    cupy = _import_cupy()
    return [f"cuda:{i} ({name})" for i, name in enumerate(_device_names(cupy))]


def _cuda_backend(index: int, *, fast: bool = True) -> CupyBackend:
    cupy = _import_cupy()
    names = _device_names(cupy)
    if index >= len(names):
        visible = ", ".join(f"cuda:{i} ({name})" for i, name in enumerate(names))
        raise BackendError(
            f"cuda:{index} is out of range: {len(names)} CUDA device{'s' if len(names) != 1 else ''} "
            f"visible: {visible}; use one of them, or set CUDA_VISIBLE_DEVICES",
            cause=f"cuda:{index} is out of range",
        )
    try:
        backend = CupyBackend(cupy, index, fast=fast)
        # a first real operation creates the context and compiles a kernel: a broken driver or a missing
        # NVRTC library fails here, at selection time, rather than in the middle of training
        float(cupy.arange(4, dtype=cupy.float32).sum())
    except Exception as error:  # CuPy raises several unrelated types here; all of them mean "unusable"
        raise BackendError(
            f"CuPy {cupy.__version__} found cuda:{index} but could not use it: {_one_line(error)}; "
            "check the NVIDIA driver with nvidia-smi, or use --device cpu",
            cause=f"cuda:{index} failed its first operation ({_one_line(error)})",
        ) from error
    return backend


def _import_cupy() -> ModuleType:
    """Import CuPy, or raise BackendError with a distinct message for each reason it cannot be used."""
    wheels = _cupy_distributions()
    if len(wheels) > 1:
        raise BackendError(
            f"{len(wheels)} CuPy packages are installed at once ({', '.join(wheels)}) and they overwrite each "
            f"other's files; keep one: pip uninstall {' '.join(name.split()[0] for name in wheels)}, "
            "then reinstall the one that matches your driver",
            cause="several CuPy packages are installed at once",
        )
    try:
        return importlib.import_module("cupy")
    except ModuleNotFoundError as error:
        if error.name != "cupy":
            raise _broken_cupy(error) from error
        raise BackendError(
            f"CuPy is not installed, so CUDA devices cannot be used; {CUDA_EXTRAS_HINT}; or use --device cpu",
            cause="CuPy is not installed",
        ) from error
    except Exception as error:  # an ImportError or OSError from a missing CUDA library, mostly
        raise _broken_cupy(error) from error


def _broken_cupy(error: BaseException) -> BackendError:
    return BackendError(
        f"CuPy is installed but failed to import: {_one_line(error)}; reinstall the extra that matches your "
        f"driver ({CUDA_EXTRAS_HINT}), or use --device cpu",
        cause=f"CuPy failed to import ({_one_line(error)})",
    )


def _device_names(cupy: ModuleType) -> list[str]:
    runtime = cupy.cuda.runtime
    try:
        count = runtime.getDeviceCount()
    except runtime.CUDARuntimeError as error:
        count, why = 0, _one_line(error)
    else:
        why = "the CUDA runtime reports 0 devices"
    if count == 0:
        raise BackendError(
            f"CuPy {cupy.__version__} is installed but no CUDA device answers: {why}; "
            "check the GPU and its driver with nvidia-smi, or use --device cpu",
            cause=f"no CUDA device answers ({why})",
        )
    return [_decode(runtime.getDeviceProperties(i)["name"]) for i in range(count)]


def _cupy_distributions() -> list[str]:
    """The installed distributions that provide the ``cupy`` module, as ``"name version"``."""
    found = set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if _CUPY_DIST_RE.fullmatch(name):
            found.add(f"{name} {dist.version}")
    return sorted(found)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _numpy_blas() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except (TypeError, KeyError):  # NumPy before 1.25 has no mode="dicts"
        return "BLAS unknown"
    return f"BLAS {blas.get('name', '?')} {blas.get('version', '')}".strip()


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def _decode(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}" if type(error).__name__ not in text else text
