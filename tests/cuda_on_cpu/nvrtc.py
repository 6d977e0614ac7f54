"""NVRTC, the compiler CuPy's RawModule uses at run time, called through ctypes: compile-checks the kernels with no
GPU and no CuPy.

The library comes from the ``nvidia-cuda-nvrtc`` wheel of the ``test`` extra (``nvidia/cu13/lib/libnvrtc.so.13``;
older wheels used ``nvidia/cuda_nvrtc/lib``), else from the system (``CUDA_PATH``, /usr/local/cuda, the loader's
path). :func:`find_nvrtc` says where it looked when it finds none, so that a test can skip with that reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

#: (library, source, name, options) -> (binary, log) of every successful compile in this process: the suite compiles
#: the same sources for the same architectures in more than one test, and gpunn/kernels/single_pass.cu alone takes
#: NVRTC 10-30 s per architecture on a 2-core machine
_COMPILED: dict[tuple[str, str, str, tuple[str, ...]], tuple[bytes, str]] = {}

# relative to a site-packages directory: the CUDA 13 wheel's layout first, then the CUDA 12 wheels'
_WHEEL_PATHS = ("nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.12")
_SYSTEM_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib")


class NvrtcNotFound(RuntimeError):
    """No NVRTC library could be loaded; the message lists where the search looked."""


class NvrtcCompileError(RuntimeError):
    """A program failed to compile; the message holds NVRTC's log, the options and the source's name."""


def _candidates() -> list[Path]:
    found = []
    for entry in sys.path:
        for relative in _WHEEL_PATHS:
            path = Path(entry or ".") / relative
            if path.is_file():
                found.append(path)
    roots = [os.environ[name] for name in ("CUDA_PATH", "CUDA_HOME") if os.environ.get(name)] + ["/usr/local/cuda"]
    for root in roots:
        for sub in _SYSTEM_DIRS:
            folder = Path(root) / sub
            found += sorted(folder.glob("libnvrtc.so.1*")) if folder.is_dir() else []
    system = ctypes.util.find_library("nvrtc")
    if system:
        found.append(Path(system))
    return found


@dataclass(frozen=True)
class Nvrtc:
    """A loaded libnvrtc and its version."""

    path: str
    lib: ctypes.CDLL
    version: tuple[int, int]

    def compile(self, source: str, name: str, options: tuple[str, ...]) -> tuple[bytes, str]:
        """Compiles ``source`` with ``options``: the PTX (``-arch=compute_XY``) or cubin (``-arch=sm_XY``), and
        NVRTC's log (its warnings). Raises NvrtcCompileError with the log when the compilation fails. The same
        compile asked again in this process returns the first one's result."""
        key = (self.path, source, name, tuple(options))
        if key not in _COMPILED:
            _COMPILED[key] = self._compile(source, name, tuple(options))
        return _COMPILED[key]

    def _compile(self, source: str, name: str, options: tuple[str, ...]) -> tuple[bytes, str]:
        lib = self.lib
        program = ctypes.c_void_p()
        self._check(lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            encoded = [option.encode() for option in options]
            array = (ctypes.c_char_p * len(encoded))(*encoded)
            status = lib.nvrtcCompileProgram(program, len(encoded), array)
            log = self._log(program)
            if status != 0:
                raise NvrtcCompileError(
                    f"NVRTC {self.version[0]}.{self.version[1]} failed to compile {name} "
                    f"({self._error(status)}) with options {' '.join(options)}:\n{log}")
            cubin = any(option.startswith(("-arch=sm_", "--gpu-architecture=sm_")) for option in options)
            size = ctypes.c_size_t()
            getter = "CUBIN" if cubin else "PTX"
            self._check(getattr(lib, f"nvrtcGet{getter}Size")(program, ctypes.byref(size)), f"nvrtcGet{getter}Size")
            buffer = ctypes.create_string_buffer(size.value)
            self._check(getattr(lib, f"nvrtcGet{getter}")(program, buffer), f"nvrtcGet{getter}")
            return buffer.raw, log
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(program))

    def _log(self, program: ctypes.c_void_p) -> str:
        size = ctypes.c_size_t()
        self._check(self.lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        buffer = ctypes.create_string_buffer(size.value)
        self._check(self.lib.nvrtcGetProgramLog(program, buffer), "nvrtcGetProgramLog")
        return buffer.value.decode(errors="replace")

    def _error(self, status: int) -> str:
        return self.lib.nvrtcGetErrorString(status).decode()

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            raise RuntimeError(f"{call} failed: {self._error(status)}")


def find_nvrtc() -> Nvrtc:
    """The first NVRTC that loads, or NvrtcNotFound naming every place tried and why each failed."""
    tried = []
    for path in _candidates():
        try:
            # libnvrtc dlopen()s its builtins library by name at the first compile; beside a wheel's copy that
            # name is not on the loader's path, but a library already loaded under that name is found first
            for builtins in sorted(path.parent.glob("libnvrtc-builtins.so.*")):
                if ".alt." not in builtins.name:
                    ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            lib = ctypes.CDLL(str(path))
        except OSError as error:
            tried.append(f"{path} ({error})")
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        for function in ("nvrtcCompileProgram", "nvrtcCreateProgram", "nvrtcDestroyProgram", "nvrtcGetProgramLog",
                         "nvrtcGetProgramLogSize", "nvrtcGetPTX", "nvrtcGetPTXSize", "nvrtcGetCUBIN",
                         "nvrtcGetCUBINSize", "nvrtcVersion"):
            getattr(lib, function).restype = ctypes.c_int
        major, minor = ctypes.c_int(), ctypes.c_int()
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        return Nvrtc(str(path), lib, (major.value, minor.value))
    where = "; ".join(tried) or (
        f"no {' or '.join(_WHEEL_PATHS)} under sys.path, no libnvrtc.so.1* under $CUDA_PATH, $CUDA_HOME or "
        "/usr/local/cuda, and none on the loader's path")
    raise NvrtcNotFound(f"NVRTC not found: {where}; pip install 'nvidia-cuda-nvrtc==13.0.*' (the test extra has it)")
