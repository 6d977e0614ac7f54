"""Choose the array library and the device once, at the edge, and pass the result around.

``get_backend("cpu")`` gives NumPy, ``get_backend("cuda")`` or ``get_backend("cuda:N")`` gives CuPy on GPU N, and
``get_backend("auto")`` takes the GPU when one answers and the CPU otherwise. Everything below the CLI, the
benchmarks and the test fixtures receives the resulting :class:`Backend`; nothing else picks a device.

This is the only module of gpunn that imports CuPy, and it does so only when a CUDA device is asked for, so
``import gpunn`` and ``gpunn --help`` work (and stay fast) on machines without it. Why a device cannot be used, and
what the machine is, are worked out in :mod:`gpunn.diagnostics`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from gpunn import diagnostics, fused_cpu
from gpunn.errors import BackendError, ConfigError, DeviceSpecError
from gpunn.nn import Architecture, loss_and_gradients
from gpunn.optim import Optimizer

__all__ = ["Backend", "CupyBackend", "GradientPass", "NumpyBackend", "Step", "UpdateRule", "get_backend",
           "parse_device"]

#: ``(params, X, Y, y, *, l2, dropout, rng) -> (loss, accuracy, grads)``, as :func:`gpunn.nn.loss_and_gradients`
GradientPass = Callable[..., tuple[Any, Any, list[Any]]]
#: ``(params, grads, state, lr, t) -> (params, state)``, as :meth:`gpunn.optim.Optimizer.step`
UpdateRule = Callable[..., tuple[list[Any], dict[str, list[Any]]]]

DEVICE_CHOICES = "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
GENERIC = "the generic array-API math"
_DEVICE_RE = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


def _generic_update(rule: Optimizer) -> AbstractContextManager[UpdateRule]:
    return nullcontext(rule.step)


@dataclass(frozen=True)
class Step:
    """How one training run computes its steps: the one decision :meth:`Backend.step` makes, named in the run's
    header (``step:``) and opened by the training loop around its epochs.

    ``gradients()`` and ``update(rule)`` are context managers giving the run's gradient pass and update rule (a fast
    path may hold buffers, threads or library settings while they last). ``pixels``: the gradient pass takes the raw
    uint8 pixels, with the 1/255 folded into its arithmetic, instead of scaled floats. ``notice``: what the first step
    will do that takes a while (compile a kernel), for the header. ``evaluates_pixels``: the gradient pass also has
    ``evaluate(params, X, y)``, the validation loss and accuracy from the raw uint8 pixels X, which the training loop
    calls instead of the generic forward pass (the validation set then stays uint8 pixels on the device). ``epochs``:
    where a fast path runs whole epochs itself (the CUDA graph of a full-batch epoch), ``epochs(config, train, val,
    capacity)`` makes the object that does, as :class:`gpunn.train.Epochs` does for the rest, or returns None for a run
    it leaves to them (mini-batches, for the CUDA graph).
    """

    name: str
    gradients: Callable[[], AbstractContextManager[GradientPass]]
    update: Callable[[Optimizer], AbstractContextManager[UpdateRule]] = _generic_update
    pixels: bool = False
    epochs: Callable[..., Any] | None = None
    #: a line for the run's header when the first step will take a while longer (a kernel compiling), else ""
    notice: str = ""
    evaluates_pixels: bool = False


class Backend:
    """An array namespace and a device: everything the generic code needs to know about where it runs.

    ``xp`` is an array-API-standard namespace. Arrays cross between the host and the device only through
    :meth:`asarray` (host to device) and :meth:`to_numpy` (device to host); both are explicit so that a reader
    can find every transfer. Subclasses add what a library needs (device synchronization, clocks, a description)
    and fast paths (:meth:`step`) for the networks they cover. ``fast=False`` turns the fast paths off: the generic
    code runs everywhere, to compare against or to read; ``fast=None``: the device's default
    (:attr:`FAST_BY_DEFAULT`).
    """

    #: whether fast paths are on when nobody says: only where they were measured to win on this kind of device
    FAST_BY_DEFAULT = True

    def __init__(self, name: str, xp: ModuleType, device: Any, reason: str = "", *, fast: bool | None = None
                 ) -> None:
        self.name = name
        self.xp = xp
        self.device = device
        #: why this backend was chosen, when ``auto`` chose it; empty otherwise
        self.reason = reason
        self.fast = self.FAST_BY_DEFAULT if fast is None else fast

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

    def mark(self) -> Any:
        """A point in the device's work queue, for :meth:`seconds`; here, where work is synchronous, the clock."""
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds of device work between two :meth:`mark` s (waiting for ``end`` to be reached)."""
        return end - start

    def random(self, seed: int) -> Any:
        """A generator of uniform [0, 1) arrays on the device: ``.random(shape, dtype)``, seeded with ``seed``.

        The array API has no random numbers, so each backend brings its own. This generic one draws on the host
        and transfers the result: correct anywhere, fast nowhere; NumPy and CuPy override it.
        """
        return _HostDrawn(np.random.default_rng(seed), self)

    def step(self, arch: Architecture, *, dtype: str, columns: int, dropout: float = 0.0, pixels: bool = True,
             batches: bool = False, precision: str = "float32") -> Step:
        """How a run of ``arch`` in ``dtype`` with ``columns`` samples per step computes its steps. ``pixels``: the
        run's inputs are the pixels / 255 and nothing more, so a step may take the raw uint8 pixels and fold the 1/255
        in (not with standardized inputs). ``batches``: the steps are over chosen samples of the training set
        (mini-batches), not all of it. ``precision`` (:data:`gpunn.nn.PRECISIONS`): ``"tf32"`` or ``"bf16"`` asks
        for a float32 run's matrix products on tensor cores, which only the CUDA fast path's cuBLAS GEMMs compute;
        a step that cannot raises ConfigError.

        Here, and wherever a backend's fast path does not cover the run, it is the generic
        :func:`gpunn.nn.loss_and_gradients` and :meth:`gpunn.optim.Optimizer.step`, which the fast paths are
        tested against.
        """
        if precision != "float32":
            raise ConfigError(f"precision {precision} runs a network's matrix products on CUDA tensor cores, which "
                              f"only the CUDA fast path does (its cuBLAS GEMMs: ReLU hidden layers, no dropout); this "
                              f"run on {self.name} would compute them in {dtype}: use --device cuda (not --generic) "
                              f"with --dtype float32, or --precision float32")
        return Step(GENERIC, lambda: nullcontext(partial(loss_and_gradients, arch=arch)))

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

    Its fast paths compute ReLU networks with a softmax output, without dropout: for one hidden layer of up to
    :data:`SINGLE_PASS_MAX_HIDDEN` units, :class:`gpunn.numba_cpu.SinglePassCpu`, one compiled pass over the uint8
    pixels per step; for the rest, :class:`gpunn.fused_cpu.FusedCpuPass`, NumPy and BLAS in place on every core."""

    #: up to this many hidden units the Numba single pass beats the fused BLAS pass; measured interleaved on the 2-core
    #: development machine on MNIST, float32: 9.3x faster at h = 10, 3.4x at 64, 2.7x at 256
    #: (benchmarks/results/intel-xeon-cpu.md); in an earlier run, 1.2x at 512 and 0.9x at 1024
    #: (benchmarks/numba_single_pass.py)
    SINGLE_PASS_MAX_HIDDEN = 512

    def __init__(self, reason: str = "", *, fast: bool | None = None) -> None:
        super().__init__("cpu", array_api_compat.array_namespace(np.empty(0)), "cpu", reason, fast=fast)

    def random(self, seed: int) -> Any:
        return np.random.default_rng(seed)

    def step(self, arch: Architecture, *, dtype: str, columns: int, dropout: float = 0.0, pixels: bool = True,
             batches: bool = False, precision: str = "float32") -> Step:
        # the CPU's fast paths compute in the run's dtype: a reduced precision is the generic step's refusal
        if precision != "float32" or not (self.fast and fused_cpu.supports(arch, dropout=dropout)):
            return super().step(arch, dtype=dtype, columns=columns, dropout=dropout, pixels=pixels, batches=batches,
                                precision=precision)
        refused = None  # why the single pass does not run, where it would have
        if pixels and arch.depth == 2 and arch.sizes[1] <= self.SINGLE_PASS_MAX_HIDDEN:
            numba_cpu, error = _single_pass()
            refused = (f"the single CPU pass needs Numba, which does not import: {error}" if numba_cpu is None else
                       numba_cpu.refusal(arch, dropout=dropout, dtype=dtype))
            if refused is None:
                threads = numba_cpu.threads_for(columns, arch.sizes[1])
                narrow = numba_cpu.runs_narrow(arch, dtype, batches=batches)
                notice = ""
                if numba_cpu.needs_compile(dtype, threads=threads, arch=arch, batches=batches):
                    where = numba_cpu.cache_dir()
                    # cold compiles measured on the development machine (numba_single_pass.py --compile-times)
                    notice = (f"compiling the single-pass CPU kernel for {dtype}"
                              + (f" and {arch.sizes[1]} hidden units (once, about 4 s; " if narrow else
                                 " (once, about 7 s; ")
                              + (f"cached in {where})" if where else "no writable cache directory, so every run does)"))
                # the pass runs the kernel named here: a run of mini-batches makes no scratch for the narrow one
                return Step(f"single pass over uint8 pixels (Numba, {numba_cpu.lanes_hold(narrow=narrow)}), "
                            f"{threads} thread{'s' if threads > 1 else ''}",
                            lambda: numba_cpu.SinglePassCpu(arch, dtype, columns, narrow=narrow), pixels=True,
                            notice=notice, evaluates_pixels=narrow)
        threads = fused_cpu.threads_for(columns)
        return Step(f"fused CPU pass, {threads} thread{'s' if threads > 1 else ''}"
                    + (f" ({refused})" if refused else ""),
                    lambda: fused_cpu.FusedCpuPass(arch, dtype, columns))

    def single_pass_summary(self) -> str:
        """How the single pass runs on this CPU, in one line (for ``gpunn info``), or why it does not."""
        numba_cpu, error = _single_pass()
        if numba_cpu is None:
            return f"unavailable: Numba does not import ({error}); CPU runs take the fused BLAS pass"
        return numba_cpu.describe()

    def describe(self) -> dict[str, str]:
        return {
            "device": "cpu",
            "cpu": f"{diagnostics.cpu_model()}, {os.cpu_count()} logical cores",
            "numpy": f"numpy {np.__version__}",
            "blas": diagnostics.numpy_blas(),
        }


def _single_pass() -> tuple[ModuleType | None, ImportError | None]:
    """gpunn.numba_cpu, imported on first use (Numba takes a few tenths of a second to import, which `gpunn --help`
    need not pay), or None and the import's error: a Numba that does not import (built for another NumPy, say)
    costs the single pass, not the command."""
    try:
        from gpunn import numba_cpu
    except ImportError as error:
        return None, error
    return numba_cpu, None


class CupyBackend(Backend):
    """One CUDA GPU through CuPy. Made by :func:`get_backend`, which checks first that the GPU answers.

    Its fast paths are in :mod:`gpunn.fused_cuda`, for ReLU networks with a softmax output, without dropout: one
    kernel's single pass over the uint8 pixels per step for one hidden layer of up to 16 units, else cuBLAS and a few
    fused kernels; a full-batch epoch as one CUDA graph. They are the default: on an H200 they beat the generic
    math at every size and dtype benchmarks/epoch_throughput.py times (benchmarks/results/nvidia-h200-cuda-f32.log
    and the files beside it), and ``fast=False`` (``gpunn train --generic``) turns them off."""

    def __init__(self, cupy: ModuleType, index: int, reason: str = "", *, fast: bool | None = None) -> None:
        import array_api_compat.cupy as xp

        self.cupy = cupy
        self.index = index
        device = cupy.cuda.Device(index)
        # CuPy launches work on the *current* device: make it this one for the thread, once, here at the edge.
        device.use()
        super().__init__(f"cuda:{index}", xp, device, reason, fast=fast)
        self._kernels: Any = None

    def step(self, arch: Architecture, *, dtype: str, columns: int, dropout: float = 0.0, pixels: bool = True,
             batches: bool = False, precision: str = "float32") -> Step:
        # imported here: gpunn.fused_cuda builds on this module's Step, and only a CUDA run needs it
        from gpunn import fused_cuda

        if precision != "float32":
            # cuBLAS takes a FAST_TF32 or FAST_16BF compute type as leave to use such tensor cores, not an order: an
            # older GPU would compute in float32 under a name that says otherwise
            props = self.cupy.cuda.runtime.getDeviceProperties(self.index)
            if props["major"] < 8:
                raise ConfigError(f"precision {precision} runs on tensor cores for TF32 and bfloat16, which came with "
                                  f"compute capability 8.0 (Ampere); {self.name} "
                                  f"({diagnostics.decode(props['name'])}) has {props['major']}.{props['minor']}: "
                                  f"use --precision float32")
        if self.fast:
            if self._kernels is None:
                self._kernels = fused_cuda.CupyDevice(self.cupy)
            fused = fused_cuda.cuda_step(arch, dtype=dtype, columns=columns, dropout=dropout, pixels=pixels,
                                         precision=precision, device=self._kernels)
            if fused is not None:
                return fused
        return super().step(arch, dtype=dtype, columns=columns, dropout=dropout, pixels=pixels, batches=batches,
                            precision=precision)

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        # row-major on the GPU whatever the host's layout (a split's X is a transposed view): the fused kernels read
        # rows, and the copy to the device is made anyway
        return self.cupy.ascontiguousarray(super().asarray(a, dtype))

    def to_numpy(self, a: Any) -> np.ndarray:
        return self.cupy.asnumpy(a)

    def synchronize(self) -> None:
        self.device.synchronize()

    def mark(self) -> Any:
        event = self.cupy.cuda.Event()
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        end.synchronize()
        return self.cupy.cuda.get_elapsed_time(start, end) / 1e3

    def random(self, seed: int) -> Any:
        return self.cupy.random.default_rng(seed)  # drawn on the GPU

    def describe(self) -> dict[str, str]:
        runtime = self.cupy.cuda.runtime
        props = runtime.getDeviceProperties(self.index)
        free, total = self.device.mem_info
        return {
            "device": self.name,
            "gpu": f"{diagnostics.decode(props['name'])} (compute capability {props['major']}.{props['minor']})",
            "memory": f"{total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free",
            "cuda": f"CUDA runtime {diagnostics.cuda_version(runtime.runtimeGetVersion())}, "
            f"driver supports {diagnostics.cuda_version(runtime.driverGetVersion())}",
            "cupy": f"cupy {self.cupy.__version__}",
        }


def parse_device(device: str) -> tuple[str, int | None]:
    """``"cuda:1"`` -> ``("cuda", 1)``; ``"cpu"`` -> ``("cpu", None)``. Raises DeviceSpecError when malformed."""
    match = _DEVICE_RE.fullmatch(device.strip().lower())
    if match is None or (match[1] != "cuda" and match[2] is not None):
        raise DeviceSpecError(f"unknown device {device!r}; {DEVICE_CHOICES}")
    return match[1], None if match[2] is None else int(match[2])


def get_backend(device: str = "auto", *, fast: bool | None = None) -> Backend:
    """The backend for ``device``: ``"auto"``, ``"cpu"``, ``"cuda"`` (GPU 0) or ``"cuda:N"``.

    ``auto`` uses cuda:0 when CuPy imports and the GPU answers, else the CPU; ``Backend.reason`` says which and
    why. An explicit ``cuda`` raises BackendError naming the cause and the fix when the GPU cannot be used.
    ``fast=False``: the generic code only, no fast paths; ``fast=True``: the device's fast paths even where they are
    not the default; None: the device's default (:attr:`Backend.FAST_BY_DEFAULT`).
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


def cuda_devices() -> list[str]:
    """``["cuda:0 (NVIDIA H100 80GB HBM3)", ...]``, or BackendError saying why there are none."""
    names = diagnostics.device_names(diagnostics.import_cupy())
    return [f"cuda:{i} ({name})" for i, name in enumerate(names)]


def _cuda_backend(index: int, *, fast: bool | None = None) -> CupyBackend:
    cupy = diagnostics.import_cupy()
    names = diagnostics.device_names(cupy)
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
            f"CuPy {cupy.__version__} found cuda:{index} but could not use it: {diagnostics.one_line(error)}; "
            "check the NVIDIA driver with nvidia-smi, or use --device cpu",
            cause=f"cuda:{index} failed its first operation ({diagnostics.one_line(error)})",
        ) from error
    return backend
