"""What gpunn can find out about the machine, and how it explains what went wrong with it.

Installation and hardware diagnostics kept apart from :mod:`gpunn.backend`, so that the backend reads on one screen:
importing CuPy with a distinct message for each reason it cannot be used (not installed, two wheels installed at
once, broken, no device), the CPU's model and NumPy's BLAS for ``gpunn info`` and benchmark records, and the one-line
message for an allocation that failed on either device.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import re
from types import ModuleType

import numpy as np

from gpunn.errors import BackendError, flat

CUDA_EXTRAS_HINT = (
    "install the extra that matches your NVIDIA driver: pip install 'gpunn[cuda12]' or 'gpunn[cuda13]' "
    "(nvidia-smi prints the highest CUDA version the driver supports)"
)

# cupy (a source build), cupy-cuda11x / -cuda12x / -cuda13x, cupy-rocm-5-0 ...: all install the module `cupy`.
_CUPY_DIST_RE = re.compile(r"cupy(-cuda\d+x?|-rocm-[\d-]+)?")


def import_cupy() -> ModuleType:
    """Import CuPy, or raise BackendError with a distinct message for each reason it cannot be used."""
    wheels = cupy_distributions()
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
        f"CuPy is installed but failed to import: {one_line(error)}; reinstall the extra that matches your "
        f"driver ({CUDA_EXTRAS_HINT}), or use --device cpu",
        cause=f"CuPy failed to import ({one_line(error)})",
    )


def device_names(cupy: ModuleType) -> list[str]:
    """The names of the CUDA devices CuPy sees, or BackendError saying why there are none."""
    runtime = cupy.cuda.runtime
    try:
        count = runtime.getDeviceCount()
    except runtime.CUDARuntimeError as error:
        count, why = 0, one_line(error)
    else:
        why = "the CUDA runtime reports 0 devices"
    if count == 0:
        raise BackendError(
            f"CuPy {cupy.__version__} is installed but no CUDA device answers: {why}; "
            "check the GPU and its driver with nvidia-smi, or use --device cpu",
            cause=f"no CUDA device answers ({why})",
        )
    return [decode(runtime.getDeviceProperties(i)["name"]) for i in range(count)]


def cupy_distributions() -> list[str]:
    """The installed distributions that provide the ``cupy`` module, as ``"name version"``."""
    found = set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if _CUPY_DIST_RE.fullmatch(name):
            found.add(f"{name} {dist.version}")
    return sorted(found)


def out_of_memory_message(error: BaseException) -> str | None:
    """One line for an allocation failure on any backend (how much was needed, how much is free), else None.

    CuPy's OutOfMemoryError is recognized by name, so that this works without importing CuPy.
    """
    kind = type(error)
    if kind.__name__ != "OutOfMemoryError" or not kind.__module__.startswith("cupy"):
        # CuPy's error is a MemoryError too, so NumPy's ("Unable to allocate 1.5 GiB ...") is told apart second
        if isinstance(error, MemoryError):
            return f"out of host memory: {one_line(error)}; try a smaller --hidden or less data"
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


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, as under taskset or a cgroup)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def numpy_blas() -> str:
    """The BLAS NumPy was built with, as ``"BLAS scipy-openblas 0.3.29"``."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except (TypeError, KeyError):  # NumPy before 1.25 has no mode="dicts"
        return "BLAS unknown"
    return f"BLAS {blas.get('name', '?')} {blas.get('version', '')}".strip()


def cuda_version(code: int) -> str:
    """CUDA's integer version, 12040, as ``"12.4"``."""
    return f"{code // 1000}.{code % 1000 // 10}"


def decode(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


def one_line(error: BaseException) -> str:
    """An exception's message on one line, led by its type unless the message names it already."""
    text = flat(error)
    return f"{type(error).__name__}: {text}" if type(error).__name__ not in text else text
