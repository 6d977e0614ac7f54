"""An emulated CUDA device for gpunn.fused_cuda's driver: the kernels are the unchanged .cu sources built for CPU
threads (build.py, cuda_cpu.h) and called through ctypes, the GEMMs are NumPy's, the arrays are NumPy arrays.

It is stricter than a GPU where that helps the GPU's first run:
- every launch is checked against the kernel's parameter list (gpunn.fused_cuda.check_launch, as on the GPU);
- every buffer has guard bytes on both sides, checked after every launch, GEMM and copy: a kernel that writes
  out of bounds fails the test at that launch;
- ``empty`` fills new buffers with 0xFF bytes (NaN in float32 and float64, -1 in integers), so that a kernel that
  reads memory nobody wrote produces NaN rather than a plausible zero;
- a capture records the launches without running them, as CUDA's does, and refuses any allocation meanwhile;
  a replay re-issues the recorded launches, and each recorded operation says which arrays it writes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from gpunn.fused_cuda import (
    KERNEL_DIR,
    KernelInfo,
    LaunchConfig,
    as_grid,
    check_gemm,
    check_launch,
    kernel_signatures,
)

from . import build

#: small grids and blocks: every CUDA thread is an OS thread here, and every barrier wakes each of them, so a block
#: of 8 threads keeps a whole training step in milliseconds; the small limits also make every grid-stride and row
#: loop of the kernels run several times on test-sized shapes (tests/test_kernels.py runs blocks of 32 and 256)
TEST_CONFIG = LaunchConfig(block=8, reduce_blocks=3, blocks=6, rows=3)
GUARD = 256  # guard bytes on each side of every buffer
GUARD_BYTE = 0xA5


class dim3(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


_SCALARS = {np.dtype(np.int32): ctypes.c_int, np.dtype(np.int64): ctypes.c_longlong,
            np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double,
            np.dtype(np.uint8): ctypes.c_ubyte}


#: mantissa bits a reduced precision drops from a float32 (23 bits): TF32 keeps 10, bfloat16 7
DROPPED_BITS = {"tf32": 13, "bf16": 16}


def round_to(precision: str, x: np.ndarray) -> np.ndarray:
    """float32 ``x`` with its mantissa rounded (to nearest, ties to even) to what a tensor core takes in
    ``precision``, as float32 values: what cuBLAS's FAST_TF32 and FAST_16BF compute types do to a GEMM's inputs.
    NaN and the infinities stay as they are."""
    dropped = DROPPED_BITS[precision]
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    half, keep = np.uint32(1 << (dropped - 1)), np.uint32((0xFFFFFFFF << dropped) & 0xFFFFFFFF)
    odd = (bits >> np.uint32(dropped)) & np.uint32(1)
    rounded = ((bits + (half - np.uint32(1)) + odd) & keep).view(np.float32)
    return np.where(np.isfinite(x), rounded, x).astype(np.float32)


@cache
def _library(path: str) -> ctypes.CDLL:
    return ctypes.CDLL(path)


@dataclass
class Op:
    """One enqueued operation: what it is, how to run it, and which arrays it writes and reads."""

    kind: str  # "launch", "gemm" or "copy"
    name: str
    run: Callable[[], None]
    writes: list[np.ndarray] = field(default_factory=list)
    reads: list[np.ndarray] = field(default_factory=list)


@dataclass
class RecordedGraph:
    ops: list[Op]


@dataclass
class Allocation:
    raw: np.ndarray  # guard + data + guard
    start: int  # the data's first and last-plus-one addresses
    stop: int


class EmulatedDevice:
    """The device interface of gpunn.fused_cuda on CPU threads. ``tsan=True`` runs ThreadSanitizer builds of the
    kernels (only in a process started with libtsan preloaded: see build.tsan_runtime)."""

    name = "emulated CUDA device (CPU threads)"

    def __init__(self, config: LaunchConfig = TEST_CONFIG, *, tsan: bool = False, kernel_dir: Path = KERNEL_DIR
                 ) -> None:
        self.config = config
        self.tsan = tsan
        self.kernel_dir = Path(kernel_dir)
        self.allocations: list[Allocation] = []
        self.launches: list[str] = []  # the name of every kernel run, in order
        self.precisions: list[str] = []  # the precision of every GEMM issued, in order
        self._recording: list[Op] | None = None

    # arrays
    def _alloc(self, shape: tuple[int, ...] | int, dtype: Any) -> np.ndarray:
        if self._recording is not None:
            raise RuntimeError("allocation during a capture: a CUDA graph cannot hold it")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = np.full(nbytes + 2 * GUARD, GUARD_BYTE, np.uint8)
        data = raw[GUARD : GUARD + nbytes].view(dtype).reshape(shape)
        start = raw.ctypes.data + GUARD
        self.allocations.append(Allocation(raw, start, start + nbytes))
        return data

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        data = self._alloc(shape, dtype)
        data.view(np.uint8)[...] = 0xFF  # NaN in floats, -1 in integers: unwritten memory shows
        return data

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        data = self._alloc(shape, dtype)
        data[...] = 0
        return data

    def upload(self, host: np.ndarray) -> np.ndarray:
        data = self._alloc(host.shape, host.dtype)
        data[...] = host
        return data

    def is_device_array(self, value: Any) -> bool:
        return isinstance(value, np.ndarray)

    def allocation_of(self, array: np.ndarray) -> int | None:
        """The index of the allocation that holds all of ``array``, or None."""
        start = array.ctypes.data
        stop = start + array.nbytes
        for index, allocation in enumerate(self.allocations):
            if allocation.start <= start and stop <= allocation.stop:
                return index
        return None

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        if dst.shape != src.shape or dst.dtype != src.dtype or not (dst.flags.c_contiguous and src.flags.c_contiguous):
            raise ValueError(f"copy needs equal C-contiguous arrays, got {dst.shape} {dst.dtype} <- {src.shape} "
                             f"{src.dtype}")
        self._issue(Op("copy", "copy", lambda: np.copyto(dst, src), [dst], [src]))

    def clone(self, src: np.ndarray) -> np.ndarray:
        out = self._alloc(src.shape, src.dtype)
        self._issue(Op("copy", "clone", lambda: np.copyto(out, src), [out], [src]))
        return out

    # work
    def launch(self, name: str, grid: int | tuple[int, ...], block: int, args: Sequence[Any]) -> None:
        dims = as_grid(grid)
        info = check_launch(name, dims, block, args, self.is_device_array)
        writes = [arg for param, arg in zip(info.params, args) if param.writes]
        reads = [arg for param, arg in zip(info.params, args) if param.is_pointer and not param.writes]
        self._issue(Op("launch", name, lambda: self._run(info, dims, block, args), writes, reads))

    def _run(self, info: KernelInfo, grid: tuple[int, int, int], block: int, args: Sequence[Any]) -> None:
        values = []
        for param, arg in zip(info.params, args):
            if param.is_pointer:
                values.append(ctypes.c_void_p(arg.ctypes.data))
            else:
                values.append(_SCALARS[param.dtype](arg.item()))
        argv = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        library = build.build_library(info.file, tsan=self.tsan, kernel_dir=self.kernel_dir)
        function = getattr(_library(str(library)), f"launch_{info.name}")
        function.argtypes = [dim3, dim3, ctypes.c_void_p]
        function.restype = None
        function(dim3(*grid), dim3(block, 1, 1), argv)
        self.launches.append(info.name)

    def gemm(self, C: np.ndarray, A: np.ndarray, B: np.ndarray, *, trans_a: bool = False, trans_b: bool = False,
             alpha: float = 1.0, beta: float = 0.0, precision: str = "float32") -> None:
        check_gemm(C, A, B, trans_a, trans_b, precision)
        self.precisions.append(precision)

        def run() -> None:
            a, b = (A.T if trans_a else A), (B.T if trans_b else B)
            if precision != "float32":  # the inputs as the tensor cores take them; the sums in float32
                a, b = round_to(precision, a), round_to(precision, b)
            # one BLAS thread: OpenBLAS's threads keep spinning for a while after a call, and would take the cores
            # from the kernel threads of the next launch (measured: 1 ms launches became 60 ms)
            with threadpool_limits(limits=1, user_api="blas"):
                if alpha == 1 and beta == 0:
                    np.matmul(a, b, out=C)
                else:
                    C[...] = alpha * (a @ b) + beta * C

        self._issue(Op("gemm", "gemm", run, [C], [A, B]))

    def _issue(self, op: Op) -> None:
        if self._recording is not None:
            self._recording.append(op)
            return
        op.run()
        self.check_guards(op.name)

    def check_guards(self, after: str) -> None:
        """Raise AssertionError when any buffer's guard bytes changed: ``after`` wrote out of bounds."""
        for allocation in self.allocations:
            raw = allocation.raw
            if (raw[:GUARD] != GUARD_BYTE).any() or (raw[-GUARD:] != GUARD_BYTE).any():
                raise AssertionError(f"{after} wrote outside a buffer of {allocation.stop - allocation.start} bytes")

    def prepare(self, names: Sequence[str]) -> None:
        for name in names:
            build.build_library(kernel_signatures()[name].file, tsan=self.tsan, kernel_dir=self.kernel_dir)

    # graphs
    def capture_unavailable(self) -> str | None:
        return None

    def capture(self, enqueue: Callable[[], None]) -> RecordedGraph:
        self._recording = []
        try:
            enqueue()
            return RecordedGraph(self._recording)
        finally:
            self._recording = None

    def replay(self, graph: RecordedGraph) -> None:
        for op in graph.ops:
            self._issue(op)
