"""The CUDA fast path: a ReLU/softmax network's training step as cuBLAS GEMMs and a few kernels of our own, over
buffers made once, and a whole full-batch epoch as one CUDA graph.

The generic :func:`gpunn.nn.loss_and_gradients` and :meth:`gpunn.optim.Optimizer.step` are the reference; this
computes the same quantities for ReLU hidden layers of any depth and a softmax output, in float32 or float64, with
or without L2, without dropout; in float32, its GEMMs may run on tensor cores (``precision``, below). The kernels
are CUDA C++ files in ``gpunn/kernels/`` (the math of each is written above it there); this module holds no CUDA
code, only the order of the launches and the buffers they use:

    forward   Z[l] = W[l] @ A[l-1]          GEMM (cuBLAS, alpha = 1, beta = 0)
              A[l] = max(Z[l] + b[l], 0)     bias_relu, in place (hidden layers)
              P, loss, hits, dZ[L] = P - Y   softmax_xent, in place on Z[L], with per-block partial sums
    backward  dW[l] = dZ[l] @ A[l-1].T       GEMM, an unnormalized sum over the samples
              db[l] = sum_j dZ[l][:, j]      row_sum
              dZ[l-1] = (W[l].T @ dZ[l]) * (A[l-1] > 0)     GEMM, then relu_mask in place
    update    every parameter in one launch  update (gd, momentum, rmsprop, adam), over the flat buffer
    figures   metrics[row] = [loss, train_accuracy, val_loss, val_accuracy, finite]   train_metrics, val_metrics

All parameters live in ONE contiguous buffer ordered [W1, ..., WL, b1, ..., bL] (the gradients and the optimizer's
averages likewise), with per-layer views into it, so one launch updates everything and the L2 term applies to the
first ``n_weights`` elements only. Reductions are deterministic: no atomics, a grid fixed by the problem size,
per-block partial sums and a one-block kernel that adds them in a fixed order, so two runs give the same bits.

Everything runs against a small device interface (:class:`Device`): :class:`CupyDevice` here, on a GPU; in the
tests, an emulated device that runs the same ``.cu`` sources on CPU threads (``tests/cuda_on_cpu``), with NumPy
for the GEMMs. The driver code is the same for both.

Why cuBLAS through ctypes rather than CuPy's ``cupy.cuda.cublas``: CuPy's cuBLAS bindings refuse to run while a
stream is being captured (``setStream`` raises NotImplementedError during capture, CuPy 13 and 14), and
``cupy.matmul`` goes through them. So the device makes its own cuBLAS handle from the library CuPy has already
loaded, with a workspace of its own (cuBLAS otherwise allocates one, which a capture must not do).

``precision`` (:data:`gpunn.nn.PRECISIONS`): "float32" runs cublasSgemm, the products exact to float32 rounding, as
the generic math computes them; "tf32" and "bf16" run cublasGemmEx on float32 matrices with the compute type
CUBLAS_COMPUTE_32F_FAST_TF32 or CUBLAS_COMPUTE_32F_FAST_16BF, which lets cuBLAS round the inputs to TF32 or
bfloat16 for the tensor cores and sum the products in float32. Only the GEMMs change: the weights, the gradients,
the kernels of our own and the update stay float32, so the precision is a property of the device's GEMM calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar

import numpy as np

from gpunn.backend import Step
from gpunn.nn import PRECISIONS, Architecture, Layer
from gpunn.optim import Optimizer

Array = Any  # a device array: cupy.ndarray on a GPU, numpy.ndarray on the emulated device

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
#: what gpunn passes to cupy.RawModule. CuPy 14 adds (cupy/_core/core.pyx, assemble_cupy_compiler_options, and
#: cupy/cuda/compiler.py): -I for its own and the CUDA headers, -ftz=true, -arch=sm_XY (compute_XY when it emits
#: PTX) and --device-as-default-execution-space. The tests compile with exactly that set (CUPY_ADDED_OPTIONS).
RAWMODULE_OPTIONS: tuple[str, ...] = ("--std=c++17",)
CUPY_ADDED_OPTIONS: tuple[str, ...] = ("-ftz=true", "--device-as-default-execution-space")
RULES = {"gd": 0, "momentum": 1, "rmsprop": 2, "adam": 3}
SUFFIX = {"float32": "f32", "float64": "f64"}
#: cuBLAS workspace: 32 MiB is what the cuBLAS guide recommends for Hopper (4 MiB before it)
CUBLAS_WORKSPACE_BYTES = 32 * 2**20
#: cublasComputeType_t of a reduced precision's cublasGemmEx (cublas_api.h): CUBLAS_COMPUTE_32F_FAST_TF32,
#: CUBLAS_COMPUTE_32F_FAST_16BF; their matrices are CUDA_R_32F, the algorithm CUBLAS_GEMM_DEFAULT
COMPUTE_TYPES = {"tf32": 77, "bf16": 75}
#: cublasStatus_t's names (cublas_api.h), for a failed call's message
CUBLAS_STATUS = {1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE", 8: "ARCH_MISMATCH", 11: "MAPPING_ERROR",
                 13: "EXECUTION_FAILED", 14: "INTERNAL_ERROR", 15: "NOT_SUPPORTED", 16: "LICENSE_ERROR"}
CUDA_R_32F = 0
CUBLAS_GEMM_DEFAULT = -1
#: how the step's name says what the GEMMs compute in
PRECISION_NAMES = {"float32": "", "tf32": ", cuBLAS GEMMs on TF32 tensor cores",
                   "bf16": ", cuBLAS GEMMs on bfloat16 tensor cores"}

_C_TYPES = {"float": np.float32, "double": np.float64, "int": np.int32, "long long": np.int64,
            "unsigned char": np.uint8}
_EXPORT_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')
_INCLUDE_RE = re.compile(r'^#include\s+"([^"]+)"\s*$', re.MULTILINE)
_MAX_BLOCK_RE = re.compile(r"#define\s+GPUNN_MAX_BLOCK\s+(\d+)")


def supports(arch: Architecture, *, dropout: float) -> bool:
    """Can the CUDA fast path compute this step? ReLU hidden layers, a softmax output, no dropout."""
    return arch.activation == "relu" and arch.output == "softmax" and not dropout


# --- the kernels' sources and signatures -----------------------------------------------------------------------


@dataclass(frozen=True)
class KernelParam:
    """One parameter of an exported kernel, as written in its .cu file: ``const float* b``."""

    ctype: str
    name: str

    @property
    def is_pointer(self) -> bool:
        return self.ctype.endswith("*")

    @property
    def writes(self) -> bool:
        """A pointer the kernel may write through (not declared const)."""
        return self.is_pointer and not self.ctype.startswith("const ")

    @property
    def dtype(self) -> np.dtype:
        """The element type of a pointer, or the type of a scalar."""
        return np.dtype(_C_TYPES[self.ctype.removeprefix("const ").rstrip("*").strip()])


@dataclass(frozen=True)
class KernelInfo:
    name: str
    file: str
    params: tuple[KernelParam, ...]


def kernel_files() -> list[Path]:
    return sorted(KERNEL_DIR.glob("*.cu"))


def kernel_source(file: str | Path) -> str:
    """The .cu file with each ``#include "x.cuh"`` replaced by that header's text (once per header): the one
    string CuPy compiles. Inlining makes the header part of CuPy's kernel-cache key, which hashes the source
    string, so an edited header cannot bring back a stale cached binary."""
    path = KERNEL_DIR / Path(file).name
    seen: set[str] = set()

    def inline(match: re.Match[str]) -> str:
        name = match[1]
        if name in seen:
            return ""
        seen.add(name)
        text = (KERNEL_DIR / name).read_text()
        return _INCLUDE_RE.sub(inline, text.replace("#pragma once", ""))

    return _INCLUDE_RE.sub(inline, path.read_text())


def kernel_names(source: str) -> list[str]:
    """The exported kernels of one .cu source, in order."""
    return [name for name, _ in _EXPORT_RE.findall(source)]


@cache
def kernel_signatures() -> dict[str, KernelInfo]:
    """Every exported kernel (``extern "C" __global__ void name(...)``) of gpunn/kernels/*.cu, by name."""
    kernels: dict[str, KernelInfo] = {}
    for path in kernel_files():
        for name, params in _EXPORT_RE.findall(path.read_text()):
            parsed = []
            for param in params.split(","):
                words = " ".join(param.replace("*", "* ").split())
                ctype, _, pname = words.rpartition(" ")
                parsed.append(KernelParam(ctype.replace(" *", "*"), pname))
            kernels[name] = KernelInfo(name, path.name, tuple(parsed))
    return kernels


@cache
def max_block() -> int:
    """GPUNN_MAX_BLOCK of common.cuh: the most threads per block, and the size of the shared sum arrays."""
    match = _MAX_BLOCK_RE.search((KERNEL_DIR / "common.cuh").read_text())
    assert match is not None, "common.cuh defines GPUNN_MAX_BLOCK"
    return int(match[1])


def check_launch(name: str, grid: tuple[int, int, int], block: int, args: Sequence[Any],
                 is_device_array: Callable[[Any], bool]) -> KernelInfo:
    """Raise TypeError/ValueError unless ``args`` fit the kernel's parameter list exactly: a device array of the
    right element type, C-contiguous, for each pointer, and a NumPy scalar of the exact C type for each scalar.

    A GPU reads a launch's arguments as raw bytes, so a float64 passed for a float or an int64 for an int is read
    as garbage there, silently. Both devices check every launch with this, so the CPU tests catch such slips."""
    info = kernel_signatures().get(name)
    if info is None:
        raise ValueError(f"no kernel named {name!r} in {KERNEL_DIR}; known: {', '.join(sorted(kernel_signatures()))}")
    if len(args) != len(info.params):
        raise TypeError(f"{name} takes {len(info.params)} arguments, got {len(args)}")
    for param, arg in zip(info.params, args):
        if param.is_pointer:
            if not is_device_array(arg):
                raise TypeError(f"{name}: {param.ctype} {param.name} needs a device array, got {type(arg).__name__}")
            if arg.dtype != param.dtype or not arg.flags.c_contiguous:
                raise TypeError(f"{name}: {param.ctype} {param.name} needs a C-contiguous {param.dtype} array, got "
                                f"{arg.dtype}{'' if arg.flags.c_contiguous else ' (not contiguous)'}")
        elif not isinstance(arg, np.generic) or arg.dtype != param.dtype:
            got = f"{type(arg).__name__} {getattr(arg, 'dtype', '')}".strip()
            raise TypeError(f"{name}: {param.ctype} {param.name} needs a numpy.{param.dtype} scalar, got {got}")
    if not (1 <= block <= max_block() and block & (block - 1) == 0):
        raise ValueError(f"{name}: {block} threads per block; the kernels need a power of two <= {max_block()}")
    if min(grid) < 1 or grid[1] > 65535 or grid[2] > 65535:
        raise ValueError(f"{name}: grid {grid} is outside CUDA's limits")
    return info


def check_gemm(C: Array, A: Array, B: Array, trans_a: bool, trans_b: bool, precision: str = "float32"
               ) -> tuple[int, int, int]:
    """(M, N, K) of C (M, N) = op(A) (M, K) @ op(B) (K, N), after checking shapes, dtypes, contiguity and the
    precision (a reduced one is for float32 operands)."""
    M, N = C.shape
    K = A.shape[0] if trans_a else A.shape[1]
    a_rows = A.shape[1] if trans_a else A.shape[0]
    b_rows, b_cols = (B.shape[1], B.shape[0]) if trans_b else B.shape
    if a_rows != M or b_rows != K or b_cols != N:
        raise ValueError(f"GEMM shapes do not fit: C {C.shape} = op(A) {A.shape}{'.T' if trans_a else ''} @ "
                         f"op(B) {B.shape}{'.T' if trans_b else ''}")
    if not (A.dtype == B.dtype == C.dtype) or not all(x.flags.c_contiguous for x in (A, B, C)):
        raise ValueError("GEMM operands must be C-contiguous and of one dtype")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown GEMM precision {precision!r}; expected one of {PRECISIONS}")
    if precision != "float32" and C.dtype != np.float32:
        raise ValueError(f"a {precision} GEMM takes float32 operands, not {C.dtype}")
    return M, N, K


# --- the device interface ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """Grid and block sizes. The defaults are for a GPU; the CPU emulator uses small ones (a CUDA thread is an OS
    thread there), which also make every loop in the kernels run more than once on small test shapes."""

    block: int = 256  # threads per block of every kernel but the one-thread counters
    reduce_blocks: int = 1024  # most blocks (and partial sums) of a reduction over samples or parameters
    blocks: int = 4096  # most blocks of an element-wise launch; grid-stride loops cover the rest
    rows: int = 1024  # most rows of a per-row launch (grid.y of bias_relu, grid.x of row_sum); rows loop beyond

    def reduce_grid(self, n: int) -> int:
        return max(1, min(-(-n // self.block), self.reduce_blocks))

    def elementwise_grid(self, n: int) -> int:
        return max(1, min(-(-n // self.block), self.blocks))


class Device(Protocol):
    """What the driver needs from a device. Arrays are the device's own (cupy.ndarray, numpy.ndarray). Work is
    enqueued in order on the caller's current stream; nothing here waits for the device, except ``upload``."""

    name: str
    config: LaunchConfig

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Array: ...

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array: ...

    def upload(self, host: np.ndarray) -> Array:
        """A device copy of a host array (made at construction, never during an epoch)."""

    def copy(self, dst: Array, src: Array) -> None:
        """dst[...] = src, on the device, both C-contiguous and of the same shape and dtype."""

    def clone(self, src: Array) -> Array:
        """A new device array holding a copy of src."""

    def launch(self, name: str, grid: int | tuple[int, ...], block: int, args: Sequence[Any]) -> None: ...

    def gemm(self, C: Array, A: Array, B: Array, *, trans_a: bool = False, trans_b: bool = False,
             alpha: float = 1.0, beta: float = 0.0, precision: str = "float32") -> None:
        """C = alpha op(A) @ op(B) + beta C, all row-major; op(X) is X.T where trans_x; a float32 product on tensor
        cores where ``precision`` is "tf32" or "bf16"."""

    def prepare(self, names: Sequence[str]) -> None:
        """Load these kernels now, outside any capture."""

    def capture_unavailable(self) -> str | None:
        """Why this device cannot capture graphs, or None when it can."""

    def capture(self, enqueue: Callable[[], None]) -> Any:
        """Record what ``enqueue`` launches into a graph, without running it; raises when the capture fails."""

    def replay(self, graph: Any) -> None:
        """Enqueue a captured graph on the caller's current stream."""


def as_grid(grid: int | tuple[int, ...]) -> tuple[int, int, int]:
    dims = (grid,) if isinstance(grid, int) else tuple(grid)
    return tuple(int(d) for d in (*dims, 1, 1)[:3])  # type: ignore[return-value]


# --- the GPU: CuPy and cuBLAS ------------------------------------------------------------------------------------

_MODULES: dict[tuple[str, tuple[str, ...]], Any] = {}  # (file, options) -> cupy.RawModule, compiled on first use


_SINGLE_PASS_HP = re.compile(r"single_pass_h(\d+)_")


def module_options(info: KernelInfo) -> tuple[str, ...]:
    """The compile options, past RAWMODULE_OPTIONS, of the module a kernel is loaded from: a kernel of
    single_pass.cu comes from a module of its own hidden size's passes (SP_ONLY_HP; 0 for prepare and reduce,
    which every module has), since compiling all 16 passes would make a first run wait for them all."""
    if info.file != "single_pass.cu":
        return ()
    match = _SINGLE_PASS_HP.match(info.name)
    return (f"-DSP_ONLY_HP={match.group(1) if match else 0}",)


def _raw_module(cupy: ModuleType, file: str, options: tuple[str, ...]) -> Any:
    """The RawModule of one .cu file, made once per process (CuPy compiles it on the first get_function, and keeps
    the binary in its own disk cache, keyed on the source and options)."""
    key = (file, options)
    if key not in _MODULES:
        _MODULES[key] = cupy.RawModule(code=kernel_source(file), options=options)
    return _MODULES[key]


def loaded_library(prefix: str, maps: str | None = None) -> str | None:
    """The path of a shared library already mapped into this process whose file name starts with ``prefix``
    (``libcublas.so``), from /proc/self/maps (Linux), or None."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if len(line.split(maxsplit=5)) == 6 else ""
        if Path(path).name.startswith(prefix):
            return path
    return None


def cublas_arguments(C: tuple[int, int], A: tuple[int, int], B: tuple[int, int], trans_a: bool, trans_b: bool
                     ) -> tuple[int, int, int, int, int, int, int, int]:
    """(transa, transb, m, n, k, lda, ldb, ldc) of the cuBLAS GEMM whose first operand is B and second is A, which
    computes the row-major C (M, N) = op(A) (M, K) @ op(B) (K, N) given the three shapes.

    cuBLAS is column-major, and a row-major (r, c) matrix is the column-major (c, r) matrix, its transpose, with
    leading dimension c. So the call computes C.T (N, M) = op(B).T (N, K) @ op(A).T (K, M): B comes first, each
    operand keeps its own transpose flag, and each leading dimension is that operand's row length."""
    M, N = C
    K = A[0] if trans_a else A[1]
    return int(trans_b), int(trans_a), N, M, K, B[1], A[1], N  # CUBLAS_OP_N = 0, CUBLAS_OP_T = 1


def _gemm_call(dtype: np.dtype, C: tuple[int, tuple[int, int]], A: tuple[int, tuple[int, int]],
               B: tuple[int, tuple[int, int]], trans_a: bool, trans_b: bool, alpha: float, beta: float
               ) -> tuple[bool, tuple[int, ...], tuple[Any, Any], tuple[int, int, int]]:
    """What a row-major GEMM's cuBLAS call takes: whether it is float32 (sgemm), the column-major arguments
    (:func:`cublas_arguments`), alpha and beta as C scalars of the dtype, and the pointers of A, B and C."""
    (c_ptr, c_shape), (a_ptr, a_shape), (b_ptr, b_shape) = C, A, B
    single = np.dtype(dtype) == np.float32
    scalar = ctypes.c_float if single else ctypes.c_double
    return (single, cublas_arguments(c_shape, a_shape, b_shape, trans_a, trans_b), (scalar(alpha), scalar(beta)),
            (a_ptr, b_ptr, c_ptr))


class Cublas:
    """One cuBLAS handle of our own, called through ctypes, for row-major GEMMs on a chosen stream.

    Host pointer mode: alpha and beta are read at the call (and baked into a captured graph, which is what we
    want: they are constants). Default math mode: no TF32 for cublasSgemm (cuBLAS's default; set explicitly because
    the comparison with the CPU needs full float32 products); a reduced precision asks for tensor cores per call,
    through cublasGemmEx's compute type. ``cublasSetStream`` resets the workspace to cuBLAS's own pool, so the
    workspace is set again after every change of stream.
    """

    #: the functions used, with their argument types (cuBLAS's exported names; the unsuffixed name is tried too)
    SIGNATURES = {
        "cublasCreate_v2": [ctypes.POINTER(ctypes.c_void_p)],
        "cublasDestroy_v2": [ctypes.c_void_p],
        "cublasSetPointerMode_v2": [ctypes.c_void_p, ctypes.c_int],
        "cublasSetMathMode": [ctypes.c_void_p, ctypes.c_int],
        "cublasSetStream_v2": [ctypes.c_void_p, ctypes.c_void_p],
        "cublasSetWorkspace_v2": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t],
        "cublasSgemm_v2": [ctypes.c_void_p, *[ctypes.c_int] * 5, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                           ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float),
                           ctypes.c_void_p, ctypes.c_int],
        "cublasDgemm_v2": [ctypes.c_void_p, *[ctypes.c_int] * 5, ctypes.POINTER(ctypes.c_double), ctypes.c_void_p,
                           ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_double),
                           ctypes.c_void_p, ctypes.c_int],
        # (handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, computeType,
        # algo): alpha and beta are floats for the CUBLAS_COMPUTE_32F_* types
        "cublasGemmEx": [ctypes.c_void_p, *[ctypes.c_int] * 5, ctypes.POINTER(ctypes.c_float),
                         *[ctypes.c_void_p, ctypes.c_int, ctypes.c_int] * 2, ctypes.POINTER(ctypes.c_float),
                         ctypes.c_void_p, *[ctypes.c_int] * 4],
    }

    def __init__(self, lib: Any, workspace_ptr: int, workspace_bytes: int) -> None:
        self.fn: dict[str, Any] = {}
        for name, argtypes in self.SIGNATURES.items():
            function = getattr(lib, name, None) or getattr(lib, name.removesuffix("_v2"), None)
            if function is None:
                raise RuntimeError(f"the cuBLAS library {getattr(lib, '_name', lib)} has no {name}")
            function.argtypes = argtypes
            function.restype = ctypes.c_int
            self.fn[name] = function
        self.handle = ctypes.c_void_p()
        self._check(self.fn["cublasCreate_v2"](ctypes.byref(self.handle)), "cublasCreate")
        self._check(self.fn["cublasSetPointerMode_v2"](self.handle, 0), "cublasSetPointerMode")  # POINTER_MODE_HOST
        self._check(self.fn["cublasSetMathMode"](self.handle, 0), "cublasSetMathMode")  # CUBLAS_DEFAULT_MATH
        self.workspace = (workspace_ptr, workspace_bytes)
        self.stream: int | None = None

    @staticmethod
    def _check(status: int, call: str) -> None:
        if status != 0:
            name = CUBLAS_STATUS.get(status, "unknown to gpunn")
            raise RuntimeError(f"{call} failed with cuBLAS status {status} (CUBLAS_STATUS_{name})")

    def use_stream(self, stream_ptr: int) -> None:
        if stream_ptr != self.stream:
            self._check(self.fn["cublasSetStream_v2"](self.handle, ctypes.c_void_p(stream_ptr)), "cublasSetStream")
            ptr, size = self.workspace
            self._check(self.fn["cublasSetWorkspace_v2"](self.handle, ctypes.c_void_p(ptr), ctypes.c_size_t(size)),
                        "cublasSetWorkspace")
            self.stream = stream_ptr

    def gemm(self, dtype: np.dtype, C: tuple[int, tuple[int, int]], A: tuple[int, tuple[int, int]],
             B: tuple[int, tuple[int, int]], trans_a: bool, trans_b: bool, alpha: float, beta: float,
             precision: str = "float32") -> None:
        """Row-major C (M, N) = alpha op(A) @ op(B) + beta C, each operand given as (pointer, shape); float32 with
        a reduced ``precision`` through cublasGemmEx."""
        single, (transa, transb, m, n, k, lda, ldb, ldc), (alpha_c, beta_c), (a_ptr, b_ptr, c_ptr) = \
            _gemm_call(dtype, C, A, B, trans_a, trans_b, alpha, beta)
        if precision != "float32":
            status = self.fn["cublasGemmEx"](
                self.handle, transa, transb, m, n, k, ctypes.byref(alpha_c), ctypes.c_void_p(b_ptr), CUDA_R_32F,
                lda, ctypes.c_void_p(a_ptr), CUDA_R_32F, ldb, ctypes.byref(beta_c), ctypes.c_void_p(c_ptr),
                CUDA_R_32F, ldc, COMPUTE_TYPES[precision], CUBLAS_GEMM_DEFAULT)
            self._check(status, f"cublasGemmEx ({precision})")
            return
        status = self.fn["cublasSgemm_v2" if single else "cublasDgemm_v2"](
            self.handle, transa, transb, m, n, k, ctypes.byref(alpha_c), ctypes.c_void_p(b_ptr), lda,
            ctypes.c_void_p(a_ptr), ldb, ctypes.byref(beta_c), ctypes.c_void_p(c_ptr), ldc)
        self._check(status, "cublasSgemm" if single else "cublasDgemm")

    def close(self) -> None:
        if self.handle:
            self.fn["cublasDestroy_v2"](self.handle)
            self.handle = ctypes.c_void_p()


class CupyBlas:
    """The fallback when our own cuBLAS handle cannot be made: CuPy's bindings on CuPy's handle, on the current
    stream. Same GEMMs, but no graphs: these bindings refuse to run during a stream capture."""

    def __init__(self, cupy: ModuleType) -> None:
        self.cupy = cupy
        self.cublas = cupy.cuda.cublas

    def use_stream(self, stream_ptr: int) -> None:
        pass  # CuPy's bindings set the current stream on every call

    def gemm(self, dtype: np.dtype, C: tuple[int, tuple[int, int]], A: tuple[int, tuple[int, int]],
             B: tuple[int, tuple[int, int]], trans_a: bool, trans_b: bool, alpha: float, beta: float,
             precision: str = "float32") -> None:
        single, (transa, transb, m, n, k, lda, ldb, ldc), (alpha_c, beta_c), (a_ptr, b_ptr, c_ptr) = \
            _gemm_call(dtype, C, A, B, trans_a, trans_b, alpha, beta)
        handle = self.cupy.cuda.device.get_cublas_handle()
        mode = self.cublas.getPointerMode(handle)
        self.cublas.setPointerMode(handle, 0)  # alpha and beta are host scalars
        try:
            if precision != "float32":
                self.cublas.gemmEx(handle, transa, transb, m, n, k, ctypes.addressof(alpha_c), b_ptr, CUDA_R_32F,
                                   lda, a_ptr, CUDA_R_32F, ldb, ctypes.addressof(beta_c), c_ptr, CUDA_R_32F, ldc,
                                   COMPUTE_TYPES[precision], CUBLAS_GEMM_DEFAULT)
            else:
                (self.cublas.sgemm if single else self.cublas.dgemm)(
                    handle, transa, transb, m, n, k, ctypes.addressof(alpha_c), b_ptr, lda, a_ptr, ldb,
                    ctypes.addressof(beta_c), c_ptr, ldc)
        finally:
            self.cublas.setPointerMode(handle, mode)

    def close(self) -> None:
        pass


def _load_cublas(cupy: ModuleType) -> ctypes.CDLL:
    """The cuBLAS library CuPy itself uses: asking CuPy for its handle loads it, and /proc/self/maps says from
    where. Loading that same file again returns the library already loaded, never a second copy."""
    cupy.cuda.device.get_cublas_handle()
    path = loaded_library("libcublas.so")
    candidates = [path] if path else []
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib  # CuPy 14's own library finder

        candidates.append(load_nvidia_dynamic_lib("cublas").abs_path)
    except Exception:  # noqa: BLE001 - absent, or no cuBLAS there: try the loader's path next
        pass
    candidates += [ctypes.util.find_library("cublas"), "libcublas.so.13", "libcublas.so.12"]
    errors = []
    for candidate in filter(None, candidates):
        try:
            return ctypes.CDLL(candidate)
        except OSError as error:
            errors.append(f"{candidate}: {error}")
    raise RuntimeError(f"cannot load cuBLAS for the CUDA fast path ({'; '.join(errors) or 'no candidate found'})")


class CupyDevice:
    """A CUDA GPU through CuPy: kernels from cupy.RawModule, GEMMs from cuBLAS (ctypes), graphs from CuPy's stream
    capture. Work goes to the caller's current stream; a capture records on a private non-blocking stream (CUDA
    cannot capture the legacy default stream), and the graph is replayed on the caller's current stream, so that
    everything stays in one stream order and the caller needs no events to read the results.

    ``cupy`` is the module the backend imported (gpunn.backend is the one place that imports CuPy).
    """

    def __init__(self, cupy: ModuleType, config: LaunchConfig | None = None) -> None:
        self.cupy = cupy
        self.config = config or LaunchConfig()
        self.name = f"cuda:{cupy.cuda.Device().id}"
        self.options = RAWMODULE_OPTIONS
        self._functions: dict[str, Any] = {}
        self._cublas: Cublas | CupyBlas | None = None
        self._cublas_error: str | None = None  # why our own cuBLAS handle could not be made
        self._workspace: Array | None = None
        self._capturing: Any = None  # the stream being captured, while a capture runs
        self._capture_streams: list[Any] = []

    # arrays
    def empty(self, shape: tuple[int, ...], dtype: Any) -> Array:
        return self.cupy.empty(shape, dtype=dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array:
        return self.cupy.zeros(shape, dtype=dtype)

    def upload(self, host: np.ndarray) -> Array:
        return self.cupy.asarray(np.ascontiguousarray(host))

    def is_device_array(self, value: Any) -> bool:
        return isinstance(value, self.cupy.ndarray)

    def copy(self, dst: Array, src: Array) -> None:
        if dst.shape != src.shape or dst.dtype != src.dtype or not (dst.flags.c_contiguous and src.flags.c_contiguous):
            raise ValueError(f"copy needs equal C-contiguous arrays, got {dst.shape} {dst.dtype} <- {src.shape} "
                             f"{src.dtype}")
        # a device-to-device memcpy on the current stream: no kernel, no allocation
        dst.data.copy_from_device_async(src.data, src.nbytes, stream=self._stream())

    def clone(self, src: Array) -> Array:
        return src.copy()

    def _stream(self) -> Any:
        return self._capturing if self._capturing is not None else self.cupy.cuda.get_current_stream()

    # kernels
    def _function(self, name: str) -> Any:
        function = self._functions.get(name)
        if function is None:
            info = kernel_signatures()[name]
            function = _raw_module(self.cupy, info.file, self.options + module_options(info)).get_function(name)
            self._functions[name] = function
        return function

    def launch(self, name: str, grid: int | tuple[int, ...], block: int, args: Sequence[Any]) -> None:
        dims = as_grid(grid)
        check_launch(name, dims, block, args, self.is_device_array)
        self._function(name)(dims, (block, 1, 1), tuple(args))

    def prepare(self, names: Sequence[str]) -> None:
        """Compile and load every kernel now: with CUDA's lazy loading, a kernel would otherwise be loaded at its
        first launch, which must not happen inside a capture. Asking for an attribute loads it."""
        for name in names:
            limit = self._function(name).max_threads_per_block
            if limit < self.config.block:
                raise RuntimeError(f"{name} can run at most {limit} threads per block here, not "
                                   f"{self.config.block}; use a smaller LaunchConfig.block")

    def resident_blocks(self, name: str, block: int) -> int:
        """How many blocks of ``block`` threads of kernel ``name`` the GPU holds at once: its SM count times the
        occupancy the driver computes from the kernel's registers and shared memory (0 when it cannot run at all).
        Compiles and loads the kernel (call it outside a capture)."""
        # RawModule.get_function gives a RawKernel; its CUfunction handle is .kernel.ptr (cupy/_core/raw.pyx)
        handle = self._function(name).kernel.ptr
        per_sm = self.cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(handle, block, 0)
        return int(per_sm) * int(self.cupy.cuda.Device().attributes["MultiProcessorCount"])

    # GEMMs
    def _blas(self) -> Cublas | CupyBlas:
        if self._cublas is None:
            try:
                self._workspace = self.cupy.empty(CUBLAS_WORKSPACE_BYTES, dtype=self.cupy.uint8)
                self._cublas = Cublas(_load_cublas(self.cupy), self._workspace.data.ptr, CUBLAS_WORKSPACE_BYTES)
            except (OSError, RuntimeError, AttributeError) as error:
                self._cublas_error = " ".join(str(error).split())[:200]
                self._cublas = CupyBlas(self.cupy)
        return self._cublas

    def gemm(self, C: Array, A: Array, B: Array, *, trans_a: bool = False, trans_b: bool = False,
             alpha: float = 1.0, beta: float = 0.0, precision: str = "float32") -> None:
        check_gemm(C, A, B, trans_a, trans_b, precision)
        blas = self._blas()
        blas.use_stream(self._stream().ptr)
        blas.gemm(np.dtype(C.dtype), (C.data.ptr, C.shape), (A.data.ptr, A.shape), (B.data.ptr, B.shape),
                  trans_a, trans_b, alpha, beta, precision)

    # graphs
    def capture_unavailable(self) -> str | None:
        cuda = self.cupy.cuda
        if getattr(cuda.runtime, "is_hip", False):
            return "CuPy on ROCm/HIP has no stream capture"
        if not hasattr(cuda.Stream, "begin_capture") or not hasattr(cuda, "Graph"):
            return f"CuPy {self.cupy.__version__} has no stream capture (CuPy 10 added it)"
        if isinstance(self._blas(), CupyBlas):
            return f"no cuBLAS handle of our own ({self._cublas_error}), and CuPy's cuBLAS refuses stream capture"
        return None

    def capture(self, enqueue: Callable[[], None]) -> Any:
        reason = self.capture_unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        stream = self.cupy.cuda.Stream(non_blocking=True)
        blas = self._blas()  # made, with its workspace, before the capture: nothing may allocate during it
        blas.use_stream(stream.ptr)
        self._capturing = stream
        try:
            with stream:
                stream.begin_capture()
                try:
                    enqueue()
                except BaseException:
                    try:
                        stream.end_capture()  # leave capture mode; the partial graph is dropped
                    except Exception:  # noqa: BLE001 - the first error is the one to report
                        pass
                    raise
                graph = stream.end_capture()
        finally:
            self._capturing = None
        self._capture_streams.append(stream)  # kept for the device's life, like the graphs captured on it
        return graph

    def replay(self, graph: Any) -> None:
        graph.launch(stream=self.cupy.cuda.get_current_stream())

    def close(self) -> None:
        if self._cublas is not None:
            self._cublas.close()
            self._cublas = None
        self._workspace = None


# --- the network's buffers and launches, shared by the pass and the epoch runner ----------------------------------


class FlatLayout:
    """Where each layer's W and b lie in the flat buffer [W1, ..., WL, b1, ..., bL]."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.shapes = [((n_out, n_in), (n_out, 1)) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        self.n_weights = sum(n_out * n_in for (n_out, n_in), _ in self.shapes)
        self.n_total = self.n_weights + sum(n_out for (n_out, _), _ in self.shapes)

    def views(self, flat: Array) -> list[Layer]:
        layers, w_at, b_at = [], 0, self.n_weights
        for (w_shape, b_shape) in self.shapes:
            w_size, b_size = w_shape[0] * w_shape[1], b_shape[0]
            W, b = flat[w_at : w_at + w_size].reshape(w_shape), flat[b_at : b_at + b_size].reshape(b_shape)
            layers.append(Layer(W, b))
            w_at, b_at = w_at + w_size, b_at + b_size
        return layers


class _Network:
    """Buffers for samples of up to ``columns`` columns, and the launches of a forward and a backward pass, whose
    GEMMs compute in ``precision``."""

    def __init__(self, arch: Architecture, dtype: str, device: Device, columns: int, precision: str = "float32"
                 ) -> None:
        if not supports(arch, dropout=0.0):
            raise ValueError(f"the CUDA fast path needs ReLU hidden layers and a softmax output, not {arch}")
        if dtype not in SUFFIX:
            raise ValueError(f"the CUDA fast path runs float32 or float64, not {dtype}")
        if precision not in PRECISIONS or (precision != "float32" and dtype != "float32"):
            raise ValueError(f"the CUDA fast path's GEMMs compute float64 in float64 and float32 in one of "
                             f"{PRECISIONS}, not {dtype} in {precision}")
        self.arch, self.device, self.columns, self.precision = arch, device, columns, precision
        self.dtype = np.dtype(dtype)
        self.suffix = SUFFIX[dtype]
        self.layout = FlatLayout(arch.sizes)
        config = device.config
        sizes = arch.sizes
        # A[l] for l = 1..L (index 0 unused), flat so that the first n_l * m elements are a contiguous (n_l, m)
        # matrix for any m <= columns; dA[l] for the hidden layers
        self.A = [None] + [device.empty((n * columns,), self.dtype) for n in sizes[1:]]
        self.dA = [None] + [device.empty((sizes[l] * columns,), self.dtype) for l in range(1, len(sizes) - 1)]
        self.G = device.empty((self.layout.n_total,), self.dtype)  # unnormalized gradient sums, flat
        self.grads = self.layout.views(self.G)
        self.partials = device.empty((2 * config.reduce_blocks,), np.float64)  # the loss and hits of each block

    def kernel(self, name: str) -> str:
        return f"{name}_{self.suffix}"

    def matrix(self, flat: Array, rows: int, m: int) -> Array:
        return flat[: rows * m].reshape(rows, m)

    def forward(self, params: Sequence[Layer], X: Array, y: Array, m: int, partials: Array, *, delta: bool) -> int:
        """A[l] for every layer, then the output layer's loss and hits (per-block partials) and, with ``delta``,
        dZ[L] in place of A[L]. Returns the number of partials (the grid of softmax_xent)."""
        device, config, sizes = self.device, self.device.config, self.arch.sizes
        L = len(params)
        previous = X
        for l, (W, b) in enumerate(params, start=1):
            Z = self.matrix(self.A[l], sizes[l], m)
            device.gemm(Z, W, previous, precision=self.precision)
            if l < L:
                rows = min(sizes[l], config.rows)
                columns = max(1, min(-(-m // config.block), config.blocks // rows))
                device.launch(self.kernel("bias_relu"), (columns, rows), config.block,
                              (Z, b, np.int32(sizes[l]), np.int32(m)))
            previous = Z
        grid = config.reduce_grid(m)
        device.launch(self.kernel("softmax_xent"), grid, config.block,
                      (previous, params[-1].b, y, np.int32(sizes[-1]), np.int32(m), partials, np.int32(delta)))
        return grid

    def backward(self, params: Sequence[Layer], X: Array, m: int) -> None:
        """The gradient sums into G: dW[l] = dZ[l] @ A[l-1].T and db[l] = rows sums of dZ[l], from dZ[L] in A[L]."""
        device, config, sizes = self.device, self.device.config, self.arch.sizes
        L = len(params)
        dZ = self.matrix(self.A[L], sizes[L], m)
        for l in range(L, 0, -1):
            previous = X if l == 1 else self.matrix(self.A[l - 1], sizes[l - 1], m)
            dW, db = self.grads[l - 1]
            device.gemm(dW, dZ, previous, trans_b=True, precision=self.precision)
            device.launch(self.kernel("row_sum"), min(sizes[l], config.rows), config.block,
                          (dZ, db, np.int32(sizes[l]), np.int32(m)))
            if l > 1:
                dA = self.matrix(self.dA[l - 1], sizes[l - 1], m)
                device.gemm(dA, params[l - 1].W, dZ, trans_a=True, precision=self.precision)
                size = sizes[l - 1] * m
                device.launch(self.kernel("relu_mask"), config.elementwise_grid(size), config.block,
                              (dA, previous, np.int64(size)))
                dZ = dA

    def sum_squares(self, P: Array, squares: Array) -> int:
        grid = self.device.config.reduce_grid(self.layout.n_total)
        self.device.launch(self.kernel("sum_squares"), grid, self.device.config.block,
                           (P, np.int64(self.layout.n_weights), np.int64(self.layout.n_total), squares))
        return grid

    def check_data(self, X: Array, y: Array, what: str) -> int:
        m = int(y.shape[0])
        if X.shape != (self.arch.sizes[0], m) or X.dtype != self.dtype or not X.flags.c_contiguous:
            raise ValueError(f"{what}: X must be a C-contiguous {self.dtype} array of shape ({self.arch.sizes[0]}, m), "
                             f"got {X.dtype} {X.shape}")
        if y.dtype != np.int64 or y.ndim != 1 or not y.flags.c_contiguous:
            raise ValueError(f"{what}: y must be int64 labels of shape (m,), got {y.dtype} {y.shape}")
        if not 1 <= m <= self.columns:
            raise ValueError(f"{what}: made for 1 to {self.columns} columns, got {m}")
        return m


_Entered = TypeVar("_Entered", bound="_HoldsNothing")


class _HoldsNothing:
    """A pass or update rule entered for a run as :meth:`gpunn.backend.Backend.step` asks (the CPU's fast paths set
    thread counts while entered): the CUDA ones hold nothing process-wide, so entering and leaving do nothing."""

    def __enter__(self: _Entered) -> _Entered:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def _call_buffers(owner: Any, layout: FlatLayout, dtype: np.dtype, device: Device) -> None:
    """What a gradient pass called like loss_and_gradients keeps between calls: the call's parameters copied into
    one flat buffer (``P``, with per-layer views ``params``), the normalized gradients (``out``), the partial sums of
    squares for L2, a one-row metrics buffer (``figures``: loss, accuracy) and its row counter."""
    owner.P = device.empty((layout.n_total,), dtype)
    owner.params = layout.views(owner.P)
    owner.out = device.empty((layout.n_total,), dtype)
    owner.squares = device.empty((2 * device.config.reduce_blocks,), np.float64)
    owner.figures = device.empty((1, 5), dtype)
    owner.counter = device.zeros((1,), np.int64)  # a one-row buffer takes row 0 whatever the count


class FusedCudaPass(_HoldsNothing):
    """``loss_and_gradients`` on the CUDA kernels for one run: made once with the network and the largest batch,
    called every step. Returns what :func:`gpunn.nn.loss_and_gradients` returns (new device arrays: the loss and
    the accuracy 0-d, the gradients normalized by m with the L2 term), and never waits for the device."""

    def __init__(self, arch: Architecture, dtype: str, columns: int, *, device: Device, precision: str = "float32"
                 ) -> None:
        self.net = _Network(arch, dtype, device, columns, precision)
        self.device = device
        _call_buffers(self, self.net.layout, self.net.dtype, device)

    def __call__(self, params: Sequence[Layer], X: Array, Y: Array, y: Array, *, l2: float = 0.0,
                 dropout: float = 0.0, rng: Any = None) -> tuple[Array, Array, list[Layer]]:
        """The mean cross-entropy (with the L2 term), the accuracy and the gradients. X: (n_0, m), m <= columns;
        Y: (classes, m) one-hot (unused: the labels y say the same); y: (m,) int64. ``dropout`` must be 0."""
        if dropout:
            raise ValueError("the CUDA fast path has no dropout; the backend uses the generic code for it")
        net, device, config = self.net, self.device, self.device.config
        m = net.check_data(X, y, "FusedCudaPass")
        for (W, b), (W_flat, b_flat) in zip(params, self.params, strict=True):
            device.copy(W_flat, W)
            device.copy(b_flat, b)
        square_parts = net.sum_squares(self.P, self.squares)
        parts = net.forward(self.params, X, y, m, net.partials, delta=True)
        net.backward(self.params, X, m)
        device.launch(net.kernel("train_metrics"), 1, config.block,
                      (self.figures, np.int32(1), self.counter, net.partials, np.int32(parts), self.squares,
                       np.int32(square_parts), np.int32(m), np.float64(l2)))
        layout = net.layout
        device.launch(net.kernel("scale_grads"), config.elementwise_grid(layout.n_total), config.block,
                      (net.G, self.P, self.out, np.int64(layout.n_weights), np.int64(layout.n_total),
                       net.dtype.type(1 / m), net.dtype.type(l2 / m)))
        grads = [Layer(device.clone(dW), device.clone(db)) for dW, db in layout.views(self.out)]
        return device.clone(self.figures[0, 0, ...]), device.clone(self.figures[0, 1, ...]), grads


class FusedCudaUpdate(_HoldsNothing):
    """:meth:`gpunn.optim.Optimizer.step` on the fused update kernel: the same call, ``(params, grads, state, lr,
    t) -> (params, state)``, new arrays, nothing modified in place. The layers are copied into flat buffers, one
    launch updates them all, and the results are copied out; lr and t reach the kernel through device memory,
    written by a one-thread kernel (no host-to-device copy, so nothing waits)."""

    def __init__(self, rule: Optimizer, dtype: str, *, device: Device) -> None:
        if dtype not in SUFFIX:
            raise ValueError(f"the CUDA fast path runs float32 or float64, not {dtype}")
        self.rule, self.device = rule, device
        self.dtype = np.dtype(dtype)
        self.suffix = SUFFIX[dtype]
        self.lr_now = device.zeros((1,), self.dtype)
        self.counter = device.zeros((1,), np.int64)
        self._shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] | None = None

    def _buffers(self, params: Sequence[Layer]) -> None:
        shapes = [(tuple(W.shape), tuple(b.shape)) for W, b in params]
        if shapes == self._shapes:
            return
        sizes = [shapes[0][0][1]] + [W[0] for W, _ in shapes]
        self.layout = FlatLayout(sizes)
        if self.layout.shapes != shapes:
            raise ValueError(f"the layers' shapes {shapes} are not those of a chain of dense layers")
        n = self.layout.n_total
        self.flat = {name: self.device.empty((n,), self.dtype) for name in ("P", "G", "v", "s")}
        self.views = {name: self.layout.views(flat) for name, flat in self.flat.items()}
        self._shapes = shapes

    def __call__(self, params: list[Layer], grads: list[Layer], state: dict[str, list[Layer]], lr: float, t: int
                 ) -> tuple[list[Layer], dict[str, list[Layer]]]:
        device, config = self.device, self.device.config
        self._buffers(params)
        for name, layers in [("P", params), ("G", grads)] + [(key, state[key]) for key in self.rule.state_names]:
            for (W, b), (W_flat, b_flat) in zip(layers, self.views[name], strict=True):
                device.copy(W_flat, W)
                device.copy(b_flat, b)
        device.launch(f"set_step_{self.suffix}", 1, 1, (self.counter, self.lr_now, np.int64(t), self.dtype.type(lr)))
        layout = self.layout
        one, zero = self.dtype.type(1), self.dtype.type(0)
        device.launch(f"update_{self.suffix}", config.elementwise_grid(layout.n_total), config.block,
                      (self.flat["P"], self.flat["G"], self.flat["v"], self.flat["s"], np.int64(layout.n_weights),
                       np.int64(layout.n_total), one, zero, self.lr_now, self.counter, np.int32(RULES[self.rule.name]),
                       np.float64(self.rule.beta1), np.float64(self.rule.beta2), np.float64(self.rule.eps)))

        def copies(name: str) -> list[Layer]:
            return [Layer(device.clone(W), device.clone(b)) for W, b in self.views[name]]

        return copies("P"), {name: copies(name) for name in self.rule.state_names}


# --- the whole epoch, as one graph ---------------------------------------------------------------------------------


class CudaGraphStep:
    """A full-batch epoch for a ReLU/softmax network: forward, loss, backward, update, validation pass and the
    metrics row, with the parameters and the optimizer's averages in static flat buffers updated in place. On a
    device that can capture, the epoch is recorded once as a CUDA graph (in :meth:`load`) and each :meth:`run`
    replays it: one launch from the host per epoch. Where capture is unavailable or fails, the same launches are
    issued one by one each epoch, and :attr:`name` says so and why.

    Implements the training loop's EpochRunner protocol: ``name``, ``metrics`` (capacity, 5), ``load``, ``run``,
    ``state``, and use as a context manager. ``learning_rates[e - 1]`` is epoch e's rate (the schedule evaluated
    once on the host by gpunn.optim.learning_rate); the device reads it from a table, by its own epoch counter.
    """

    GRAPH_NAME = "fused CUDA kernels, one CUDA graph per epoch"
    EAGER_NAME = "fused CUDA kernels, launched one by one per epoch"

    def __init__(self, arch: Architecture, dtype: str, rule: Optimizer, l2: float, learning_rates: Sequence[float],
                 train: tuple[Array, Array], val: tuple[Array, Array] | None, capacity: int, device: Device, *,
                 graph: bool = True, precision: str = "float32") -> None:
        X, y = train
        m_val = 0 if val is None else int(val[1].shape[0])
        # the layer-wise kernels' activations, for the training set and the validation set alike
        net = _Network(arch, dtype, device, max(int(y.shape[0]), m_val), precision)
        self._setup(arch, net, net.check_data(X, y, "training data"), rule, l2, learning_rates, train, val, capacity,
                    device, graph)

    def _setup(self, arch: Architecture, net: _Network, m: int, rule: Optimizer, l2: float,
               learning_rates: Sequence[float], train: tuple[Array, Array], val: tuple[Array, Array] | None,
               capacity: int, device: Device, graph: bool) -> None:
        """The state every epoch runner keeps (``m``: the checked number of training samples): the flat
        parameters and averages, the metrics ring, the learning rates and counters, and whether to capture."""
        if not learning_rates:
            raise ValueError("learning_rates must hold one rate per epoch, got none")
        if capacity < 1:
            raise ValueError(f"the metrics buffer needs at least one row, got capacity {capacity}")
        if val is not None:
            net.check_data(*val, "validation data")
        self.net, self.m = net, m
        self.arch, self.rule, self.l2, self.device = arch, rule, float(l2), device
        self.dtype = net.dtype
        self.X, self.y = train
        self.val, self.m_val = val, 0 if val is None else int(val[1].shape[0])
        self.epochs = len(learning_rates)
        self.capacity = capacity
        layout = net.layout
        self.P = device.empty((layout.n_total,), self.dtype)
        self.state_flat = {name: device.zeros((layout.n_total,), self.dtype) for name in ("v", "s")}
        self.metrics = device.upload(np.full((capacity, 5), np.nan, self.dtype))
        self.lr_table = device.upload(np.asarray(learning_rates, self.dtype))
        self.lr_now = device.zeros((1,), self.dtype)
        self.counter = device.zeros((1,), np.int64)  # epochs done; the epoch under way once advance_epoch ran
        self.squares = device.empty((2 * device.config.reduce_blocks,), np.float64)
        self.val_partials = device.empty((2 * device.config.reduce_blocks,), np.float64)
        self._graph: Any = None
        self._next: int | None = None
        reason = None if graph else "graphs turned off"
        reason = reason or device.capture_unavailable()
        self.name = self._named(self.GRAPH_NAME if reason is None else f"{self.EAGER_NAME} ({reason})")
        self._want_graph = reason is None

    def _named(self, how: str) -> str:
        """The runner's name: how it launches an epoch, then what its GEMMs compute in (the training's and the
        validation pass's)."""
        return how + PRECISION_NAMES[self.net.precision]

    def __enter__(self) -> CudaGraphStep:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._graph = None

    def load(self, params: list[Layer], optimizer_state: dict[str, list[Layer]], *, epochs_done: int) -> None:
        """Copy the starting state in (device arrays); the next epoch is ``epochs_done + 1``."""
        if set(optimizer_state) != set(self.rule.state_names):
            raise ValueError(f"{self.rule.name} keeps {sorted(self.rule.state_names)}, got {sorted(optimizer_state)}")
        if not 0 <= epochs_done < self.epochs:
            raise ValueError(f"epochs_done must be in 0..{self.epochs - 1}, got {epochs_done}")
        device, net = self.device, self.net
        for (W, b), (W_flat, b_flat) in zip(params, net.layout.views(self.P), strict=True):
            device.copy(W_flat, W)
            device.copy(b_flat, b)
        for name, layers in optimizer_state.items():
            for (W, b), (W_flat, b_flat) in zip(layers, net.layout.views(self.state_flat[name]), strict=True):
                device.copy(W_flat, W)
                device.copy(b_flat, b)
        device.launch(net.kernel("set_step"), 1, 1,
                      (self.counter, self.lr_now, np.int64(epochs_done), self.dtype.type(0)))
        # the weights' squares before the first update: later epochs find them left by the previous epoch
        net.sum_squares(self.P, self.squares)
        self._next = epochs_done + 1
        if self._want_graph and self._graph is None:
            self._capture()

    def _capture(self) -> None:
        self._before_capture()
        try:
            self._graph = self.device.capture(self._enqueue_epoch)
        except Exception as error:  # noqa: BLE001 - any failure of the capture means: run without a graph
            self._want_graph = False
            self.name = self._named(f"{self.EAGER_NAME} (CUDA graph capture failed: "
                                    f"{' '.join(str(error).split())[:200]})")

    def _before_capture(self) -> None:
        """A dry run of the launches that a capture may not be the first to make (kernel loading, cuBLAS's choice of
        kernels), writing only scratch buffers (activations, gradients, partial sums), and every kernel loaded."""
        net = self.net
        net.forward(net.layout.views(self.P), self.X, self.y, self.m, net.partials, delta=True)
        net.backward(net.layout.views(self.P), self.X, self.m)
        self.device.prepare([net.kernel(name) for name in ("advance_epoch", "bias_relu", "softmax_xent", "row_sum",
                                                            "relu_mask", "train_metrics", "update", "sum_squares",
                                                            "val_metrics")])

    def _enqueue_epoch(self) -> None:
        """One epoch's launches, the same whether captured or issued one by one. Nothing here reads the host's
        epoch: the device's counter says which epoch, which learning rate and which metrics row."""
        device, net, config = self.device, self.net, self.device.config
        layout = net.layout
        params = layout.views(self.P)
        block = config.block
        device.launch(net.kernel("advance_epoch"), 1, 1,
                      (self.counter, self.lr_table, np.int32(self.epochs), self.lr_now))
        parts, partials = self._enqueue_gradients(params)
        square_parts = config.reduce_grid(layout.n_total)
        device.launch(net.kernel("train_metrics"), 1, block,
                      (self.metrics, np.int32(self.capacity), self.counter, partials, np.int32(parts),
                       self.squares, np.int32(square_parts), np.int32(self.m), np.float64(self.l2)))
        device.launch(net.kernel("update"), config.elementwise_grid(layout.n_total), block,
                      (self.P, net.G, self.state_flat["v"], self.state_flat["s"], np.int64(layout.n_weights),
                       np.int64(layout.n_total), self.dtype.type(1 / self.m), self.dtype.type(self.l2 / self.m),
                       self.lr_now, self.counter, np.int32(RULES[self.rule.name]), np.float64(self.rule.beta1),
                       np.float64(self.rule.beta2), np.float64(self.rule.eps)))
        net.sum_squares(self.P, self.squares)
        val_parts = 0
        if self.val is not None:
            val_parts = net.forward(params, *self.val, self.m_val, self.val_partials, delta=False)
        device.launch(net.kernel("val_metrics"), 1, block,
                      (self.metrics, np.int32(self.capacity), self.counter, self.val_partials, np.int32(val_parts),
                       self.squares, np.int32(square_parts), np.int32(self.m_val)))

    def _enqueue_gradients(self, params: list[Layer]) -> tuple[int, Array]:
        """The step's forward and backward passes, the gradient sums left in ``net.G``: returns how many partial sums
        of the loss and hits there are, and the buffer that holds them."""
        parts = self.net.forward(params, self.X, self.y, self.m, self.net.partials, delta=True)
        self.net.backward(params, self.X, self.m)
        return parts, self.net.partials

    def run(self, epoch: int) -> None:
        """Enqueue epoch ``epoch`` (1-based, consecutive): its step, its validation pass and the write of row
        (epoch - 1) % capacity of ``metrics``. Never waits for the device."""
        if self._next is None:
            raise RuntimeError("load() the starting state before running epochs")
        if epoch != self._next:
            raise ValueError(f"epochs run consecutively: expected epoch {self._next}, got {epoch}")
        if epoch > self.epochs:
            raise ValueError(f"this runner has learning rates for {self.epochs} epochs, not {epoch}")
        if self._graph is not None:
            self.device.replay(self._graph)
        else:
            self._enqueue_epoch()
        self._next = epoch + 1

    def state(self) -> tuple[list[Layer], dict[str, list[Layer]]]:
        """Copies (new device arrays) of the parameters and the optimizer's averages after the last epoch."""
        device, layout = self.device, self.net.layout
        params = [Layer(device.clone(W), device.clone(b)) for W, b in layout.views(self.P)]
        averages = {name: [Layer(device.clone(W), device.clone(b)) for W, b in layout.views(self.state_flat[name])]
                    for name in self.rule.state_names}
        return params, averages


def metrics_row(epoch: int, capacity: int) -> int:
    """The row of the metrics buffer that epoch ``epoch`` (1-based) writes."""
    return (epoch - 1) % capacity


def fused_step(arch: Architecture, *, dtype: str, columns: int, dropout: float, device: Device,
               precision: str = "float32") -> Step | None:
    """The CUDA fast path as :meth:`gpunn.backend.Backend.step` hands it out, or None where it does not cover the
    run: the gradient pass and update rule on the fused kernels, their GEMMs in ``precision``, and for full-batch
    epochs a :class:`CudaGraphStep` (``Step.epochs``)."""
    if not (supports(arch, dropout=dropout) and dtype in SUFFIX):
        return None
    if precision != "float32" and dtype != "float32":
        return None  # tensor cores take float32 matrices: the generic step refuses the run, saying why
    unavailable = device.capture_unavailable()
    name = "fused CUDA kernels" + PRECISION_NAMES[precision] + (
        ", a full-batch epoch as one CUDA graph" if unavailable is None else
        f", launched one by one (no CUDA graphs: {unavailable})")

    def epochs(config: Any, train: Any, val: Any, capacity: int) -> CudaGraphStep | None:
        if config.batch_columns(train.m) != train.m:
            return None  # mini-batches: the fused pass and update in gpunn.train's loop, without a graph
        rates = [config.lr_at(epoch) for epoch in range(1, config.epochs + 1)]
        return CudaGraphStep(arch, dtype, config.rule, config.l2, rates, (train.X, train.y),
                             None if val is None else (val.X, val.y), capacity, device, precision=precision)

    return Step(name, lambda: FusedCudaPass(arch, dtype, columns, device=device, precision=precision),
                update=lambda rule: FusedCudaUpdate(rule, dtype, device=device), epochs=epochs)


# --- the single pass: one kernel per step that reads the uint8 pixels once (gpunn/kernels/single_pass.cu) ----------
#
# For an n0-h-C network with one ReLU hidden layer (h <= 16) and a softmax output, the whole gradient pass is
#   single_pass_prepare   W1T = W1 transposed, padded to hp4 columns (the pass reads one pixel's weights at once)
#   single_pass_hHP       per block: its tiles of 32 samples, forward, loss, hits and every gradient's share, from
#                         X as uint8 pixels with the 1/255 folded in; one row of partial sums per block
#   single_pass_reduce    the rows added in a fixed order into G, the unnormalized sums in the flat layout
# after which the fused path's own kernels take over: train_metrics reads the pass's loss and hit partials as it
# reads softmax_xent's, and update (or scale_grads) reads G. X stays on the device as uint8 (Step.pixels): 47 MB
# for MNIST's 60,000 training digits instead of 188 MB of float32, read once per epoch.

_SP_DEFINE_RE = re.compile(r"^#define\s+SP_(\w+)\s+(\d+)\b", re.MULTILINE)


@cache
def single_pass_limits() -> dict[str, int]:
    """single_pass.cu's numeric constants (``TILE``, ``MAX_INPUTS``, ``MAX_HIDDEN``, ``MAX_CLASSES``, ``OWNED``,
    ``LEFTOVER``, ``PREFETCH``, ``SLICE``, ...), read from the source, so that the host's checks are the kernel's."""
    return {name: int(value) for name, value in _SP_DEFINE_RE.findall((KERNEL_DIR / "single_pass.cu").read_text())}


def single_pass_unsupported(arch: Architecture, *, dtype: str, dropout: float) -> str | None:
    """Why the single pass cannot compute this step, or None when it can."""
    limits = single_pass_limits()
    if not supports(arch, dropout=dropout):
        return "it needs ReLU hidden layers, a softmax output and no dropout"
    if dtype not in SUFFIX:
        return f"it runs float32 or float64, not {dtype}"
    if len(arch.sizes) != 3:
        return f"it computes networks with exactly one hidden layer, not {arch.depth - 1}"
    n0, h, classes = arch.sizes
    if n0 > limits["MAX_INPUTS"]:
        return f"it takes at most {limits['MAX_INPUTS']} inputs (a 32-sample tile of them in 48 KB), not {n0}"
    if h > limits["MAX_HIDDEN"]:
        # each thread keeps 3 pixels x h units of dW1 in registers across the pass; see single_pass.cu
        return f"it keeps dW1 in registers, which allows at most {limits['MAX_HIDDEN']} hidden units, not {h}"
    if classes > limits["MAX_CLASSES"]:
        return f"it computes at most {limits['MAX_CLASSES']} classes, not {classes}"
    return None


def single_pass_width(h: int) -> int:
    """The hidden width of the kernel a single pass of ``h`` units runs (single_pass_hHP): the kernels come for even
    widths, and an odd h runs with one zero unit."""
    return h + (h & 1)


def single_pass_block(n0: int, config: LaunchConfig) -> int:
    """Threads per block of the single pass: ``config.block`` (256 on a GPU), raised to the smallest power of two
    the kernel needs for n0 inputs: one forward slice, 3 pixels of dW1 per thread plus 16 kept in shared memory,
    and 7 prefetched 16-byte chunks per thread (a tile holds two per pixel)."""
    limits = single_pass_limits()
    need = max(limits["SLICE"], -(-(n0 - limits["LEFTOVER"]) // limits["OWNED"]), -(-2 * n0 // limits["PREFETCH"]))
    block = max(config.block, 1 << (need - 1).bit_length())
    if block > max_block():
        raise ValueError(f"the single pass needs {block} threads per block for {n0} inputs; at most {max_block()}")
    return block


class _SinglePass:
    """The single pass's buffers and launches for one network and at most ``columns`` samples per call.

    Its grid: blocks that loop over the tiles, as many as the device holds at once (``resident_blocks``, from the
    driver's occupancy, on a GPU; ``config.reduce_blocks`` elsewhere), then evened out so that every block gets the
    same number of tiles give or take one: 1,875 tiles of 60,000 samples on 264 resident blocks (132 SMs x 2) are
    8 rounds, so 235 blocks of 8 tiles do the same in the same time with fewer partial rows to add."""

    def __init__(self, arch: Architecture, dtype: str, device: Device, columns: int) -> None:
        reason = single_pass_unsupported(arch, dtype=dtype, dropout=0.0)
        if reason is not None:
            raise ValueError(f"the single pass cannot compute {arch}: {reason}")
        if columns < 1:
            raise ValueError(f"the single pass needs room for at least one sample, got columns={columns}")
        limits = single_pass_limits()
        self.device, self.dtype, self.suffix = device, np.dtype(dtype), SUFFIX[dtype]
        self.n0, self.h, self.classes = arch.sizes
        self.layout = FlatLayout(arch.sizes)
        self.tile = limits["TILE"]
        self.hp = single_pass_width(self.h)
        self.hp4 = -(-self.hp // 4) * 4
        self.kernel = f"single_pass_h{self.hp}_{self.suffix}"
        self.block = single_pass_block(self.n0, device.config)
        resident = getattr(device, "resident_blocks", None)
        self.resident = resident(self.kernel, self.block) if resident is not None else device.config.reduce_blocks
        if self.resident < 1:
            raise RuntimeError(f"{self.kernel} cannot run with {self.block} threads per block on {device.name}")
        self.columns = columns
        self.max_blocks = self.blocks_for(columns)
        self.W1T = device.empty((self.n0 * self.hp4,), self.dtype)
        self.part = device.empty((self.max_blocks * self.layout.n_total,), self.dtype)
        self.losses = device.empty((2 * self.max_blocks,), np.float64)  # each block's loss sum, then its hits

    def blocks_for(self, m: int) -> int:
        tiles = -(-m // self.tile)
        rounds = -(-tiles // self.resident)
        return -(-tiles // rounds)

    def kernels(self) -> list[str]:
        return [f"single_pass_prepare_{self.suffix}", self.kernel, f"single_pass_reduce_{self.suffix}"]

    def check_data(self, X: Array, y: Array, what: str) -> int:
        m = int(y.shape[0])
        if X.shape != (self.n0, m) or X.dtype != np.uint8 or not X.flags.c_contiguous:
            raise ValueError(f"{what}: X must be the C-contiguous uint8 pixels, shape ({self.n0}, m), got {X.dtype} "
                             f"{X.shape}")
        if y.dtype != np.int64 or y.ndim != 1 or not y.flags.c_contiguous:
            raise ValueError(f"{what}: y must be int64 labels of shape (m,), got {y.dtype} {y.shape}")
        if not 1 <= m <= self.columns:
            raise ValueError(f"{what}: made for 1 to {self.columns} columns, got {m}")
        return m

    def enqueue(self, P: Array, X: Array, y: Array, m: int, G: Array) -> int:
        """G = the unnormalized gradient sums for the parameters P (flat) on the m samples X (uint8), y, and the
        blocks' loss and hit sums in ``losses``. Returns the number of blocks (of partials)."""
        device, config, layout = self.device, self.device.config, self.layout
        blocks = self.blocks_for(m)
        device.launch(f"single_pass_prepare_{self.suffix}", config.elementwise_grid(self.n0 * self.hp4), config.block,
                      (P, np.int32(self.n0), np.int32(self.h), np.int32(self.hp4), self.W1T))
        device.launch(self.kernel, blocks, self.block,
                      (X, y, np.int32(self.n0), np.int32(m), np.int32(self.h), np.int32(self.classes), P, self.W1T,
                       self.part, self.losses))
        width = min(32, config.block)
        device.launch(f"single_pass_reduce_{self.suffix}", max(1, min(-(-layout.n_total // width), config.blocks)),
                      config.block, (self.part, np.int32(blocks), np.int64(layout.n_total),
                                     np.int64(self.h * self.n0), G))
        return blocks


class SinglePassCudaPass(_HoldsNothing):
    """``loss_and_gradients`` on the single pass, for X as uint8 pixels: made once with the network and the largest
    batch, called every step. Returns what :func:`gpunn.nn.loss_and_gradients` returns for X / 255 (new device
    arrays: the loss and the accuracy 0-d, the gradients normalized by m with the L2 term), and never waits for the
    device."""

    def __init__(self, arch: Architecture, dtype: str, columns: int, *, device: Device) -> None:
        self.sp = _SinglePass(arch, dtype, device, columns)
        self.device, self.dtype = device, np.dtype(dtype)
        _call_buffers(self, self.sp.layout, self.dtype, device)
        self.G = device.empty((self.sp.layout.n_total,), self.dtype)  # unnormalized sums

    def __call__(self, params: Sequence[Layer], X: Array, Y: Array, y: Array, *, l2: float = 0.0,
                 dropout: float = 0.0, rng: Any = None) -> tuple[Array, Array, list[Layer]]:
        """The mean cross-entropy (with the L2 term), the accuracy and the gradients on X / 255. X: (n_0, m) uint8
        pixels, m <= columns; Y: unused (the labels y say the same); y: (m,) int64. ``dropout`` must be 0."""
        if dropout:
            raise ValueError("the single pass has no dropout; the backend uses the generic code for it")
        sp, device, config = self.sp, self.device, self.device.config
        m = sp.check_data(X, y, "SinglePassCudaPass")
        for (W, b), (W_flat, b_flat) in zip(params, self.params, strict=True):
            device.copy(W_flat, W)
            device.copy(b_flat, b)
        layout, suffix = sp.layout, sp.suffix
        square_parts = config.reduce_grid(layout.n_total)
        device.launch(f"sum_squares_{suffix}", square_parts, config.block,
                      (self.P, np.int64(layout.n_weights), np.int64(layout.n_total), self.squares))
        parts = sp.enqueue(self.P, X, y, m, self.G)
        device.launch(f"train_metrics_{suffix}", 1, config.block,
                      (self.figures, np.int32(1), self.counter, sp.losses, np.int32(parts), self.squares,
                       np.int32(square_parts), np.int32(m), np.float64(l2)))
        device.launch(f"scale_grads_{suffix}", config.elementwise_grid(layout.n_total), config.block,
                      (self.G, self.P, self.out, np.int64(layout.n_weights), np.int64(layout.n_total),
                       self.dtype.type(1 / m), self.dtype.type(l2 / m)))
        grads = [Layer(device.clone(dW), device.clone(db)) for dW, db in layout.views(self.out)]
        return device.clone(self.figures[0, 0, ...]), device.clone(self.figures[0, 1, ...]), grads


class SinglePassGraphStep(CudaGraphStep):
    """:class:`CudaGraphStep` with the single pass in place of the layer-wise forward and backward: X is the uint8
    pixels. Loading, running, the graph (or its fallback), the metrics ring and the state are CudaGraphStep's.

    The validation pass stays on the layer-wise kernels (cuBLAS and softmax_xent) over float X_val: the training
    loop prepares the validation set as floats whatever the step (gpunn.train.DeviceData), and at 1,000 samples
    its 3 MB are 6 % of the epoch's bytes. What it costs is its four launches (two GEMMs, bias_relu,
    softmax_xent); a forward-only single pass over uint8 X_val would make them one, if the loop kept X_val as
    pixels too.
    """

    GRAPH_NAME = "single-pass CUDA kernel over uint8 pixels, one CUDA graph per epoch"
    EAGER_NAME = "single-pass CUDA kernel over uint8 pixels, launched one by one per epoch"

    def __init__(self, arch: Architecture, dtype: str, rule: Optimizer, l2: float, learning_rates: Sequence[float],
                 train: tuple[Array, Array], val: tuple[Array, Array] | None, capacity: int, device: Device, *,
                 graph: bool = True) -> None:
        # not CudaGraphStep.__init__, which checks the training X as floats and sizes the layer-wise activations for
        # the training set: here only the validation pass has activations
        X, y = train
        m_val = 0 if val is None else int(val[1].shape[0])
        self.sp = _SinglePass(arch, dtype, device, int(y.shape[0]))
        m = self.sp.check_data(X, y, "training data")
        self._setup(arch, _Network(arch, dtype, device, max(m_val, 1)), m, rule, l2, learning_rates, train, val,
                    capacity, device, graph)

    def _before_capture(self) -> None:
        """The single pass's dry run, and the validation pass's (cuBLAS's choice of kernels for it): it writes only
        scratch buffers (W1T, partials, G, activations); then every kernel loaded."""
        net = self.net
        self.sp.enqueue(self.P, self.X, self.y, self.m, net.G)
        if self.val is not None:
            net.forward(net.layout.views(self.P), *self.val, self.m_val, self.val_partials, delta=False)
        self.device.prepare(self.sp.kernels() + [net.kernel(name) for name in (
            "advance_epoch", "train_metrics", "update", "sum_squares", "bias_relu", "softmax_xent", "val_metrics")])

    def _enqueue_gradients(self, params: list[Layer]) -> tuple[int, Array]:
        """The single pass (3 launches) in place of CudaGraphStep's layer-wise forward and backward passes."""
        return self.sp.enqueue(self.P, self.X, self.y, self.m, self.net.G), self.sp.losses


def single_pass_step(arch: Architecture, *, dtype: str, columns: int, dropout: float, device: Device) -> Step | None:
    """The single pass as :meth:`gpunn.backend.Backend.step` hands it out, or None where it does not cover the run:
    a :class:`Step` with ``pixels=True`` (the training loop keeps the training X as uint8 on the device), the
    gradient pass :class:`SinglePassCudaPass`, the fused update, and for full-batch epochs a
    :class:`SinglePassGraphStep`. It computes on X / 255: a backend hands it out only where
    :meth:`gpunn.backend.Backend.step` is told ``pixels=True`` (not for standardized inputs)."""
    if single_pass_unsupported(arch, dtype=dtype, dropout=dropout) is not None:
        return None
    unavailable = device.capture_unavailable()
    name = "single-pass CUDA kernel over uint8 pixels" + (
        ", a full-batch epoch as one CUDA graph" if unavailable is None else
        f", launched one by one (no CUDA graphs: {unavailable})")

    def epochs(config: Any, train: Any, val: Any, capacity: int) -> SinglePassGraphStep | None:
        if config.batch_columns(train.m) != train.m:
            return None  # mini-batches: SinglePassCudaPass and the fused update in gpunn.train's loop, no graph
        rates = [config.lr_at(epoch) for epoch in range(1, config.epochs + 1)]
        return SinglePassGraphStep(arch, dtype, config.rule, config.l2, rates, (train.X, train.y),
                                   None if val is None else (val.X, val.y), capacity, device)

    return Step(name, lambda: SinglePassCudaPass(arch, dtype, columns, device=device),
                update=lambda rule: FusedCudaUpdate(rule, dtype, device=device), pixels=True, epochs=epochs)


def cuda_step(arch: Architecture, *, dtype: str, columns: int, dropout: float, pixels: bool, device: Device,
              precision: str = "float32") -> Step | None:
    """The CUDA fast path for a run, or None where neither covers it: the single pass over uint8 pixels for one small
    hidden layer on plain pixels / 255 (``pixels``), else the layer-wise fused kernels. A reduced ``precision`` asks
    for tensor-core GEMMs, which the single pass has none of (its products are float32 FMAs): those runs take the
    fused kernels, whose GEMMs compute in it."""
    if pixels and precision == "float32":
        single = single_pass_step(arch, dtype=dtype, columns=columns, dropout=dropout, device=device)
        if single is not None:
            return single
    return fused_step(arch, dtype=dtype, columns=columns, dropout=dropout, device=device, precision=precision)
