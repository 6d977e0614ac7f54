"""Build gpunn's unchanged .cu files as shared libraries that run on CPU threads (see cuda_cpu.h), once per source.

For each .cu file, a small generated C++ file includes it and exports one launcher per kernel,
``extern "C" void launch_<kernel>(dim3 grid, dim3 block, void** args)``, in cudaLaunchKernel's convention: args[i]
points at the i-th argument's value, and cuda_cpu::launch unpacks them by the kernel's own parameter types. The
kernel names come from the ``extern "C" __global__`` lines of the source (gpunn.fused_cuda.kernel_signatures).

Libraries are cached in a directory keyed by a hash of every input (the kernel sources, the header, this
generator, the flags and the compiler's version), so a test session builds each at most once and later sessions
not at all. A ThreadSanitizer build (``tsan=True``) is the same source with -fsanitize=thread.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

from gpunn.fused_cuda import KERNEL_DIR, kernel_files, kernel_names

HEADER = Path(__file__).resolve().parent / "cuda_cpu.h"
# -ffp-contract=off: no fused multiply-adds from the host compiler, so results do not depend on the host's ISA
FLAGS = ("-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-ffp-contract=off")
TSAN_FLAGS = ("-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fsanitize=thread")


class BuildError(RuntimeError):
    """g++ failed; the message holds its output."""


def compiler() -> str | None:
    """The C++ compiler to use ($CXX, else g++), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def run_compiler(command: list[str]) -> subprocess.CompletedProcess[str]:
    """``command`` (the compiler), without the LD_PRELOAD of the process that asks: a ThreadSanitizer scenario runs
    with libtsan preloaded, and a compiler started under it can fail with no output at all (seen on a GPU machine,
    whose g++ is not the one libtsan came with), or answer --version otherwise and so change the cache key."""
    environment = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    return subprocess.run(command, capture_output=True, text=True, env=environment)


@cache
def compiler_missing() -> str | None:
    """Why the emulator cannot be built here, or None when it can (for a skip with the reason)."""
    cxx = compiler()
    if cxx is None:
        return f"no C++ compiler: {os.environ.get('CXX', 'g++')} is not on PATH (the CUDA-on-CPU emulator needs g++ " \
               "with C++20)"
    probe = "#include <barrier>\nvoid f() { std::barrier<> b(1); b.arrive_and_wait(); }\n"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "probe.cpp"
        source.write_text(probe)
        result = run_compiler([cxx, "-std=c++20", "-fsyntax-only", str(source)])
    if result.returncode != 0:
        return f"{cxx} cannot build C++20 with std::barrier: {' '.join(result.stderr.split())[:300]}"
    return None


@cache
def _compiler_version(cxx: str) -> str:
    return run_compiler([cxx, "--version"]).stdout


def cache_dir() -> Path:
    folder = Path(os.environ.get("GPUNN_CUDA_CPU_CACHE", Path(tempfile.gettempdir()) / f"gpunn-cuda-cpu-{os.getuid()}"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def launcher_source(cu_file: Path) -> str:
    names = kernel_names(cu_file.read_text())
    lines = [f'#include "{cu_file.name}"', ""]  # found through -I: the cache key does not depend on the folder
    lines += [f'extern "C" void launch_{name}(dim3 grid, dim3 block, void** args) '
              f"{{ cuda_cpu::launch(&{name}, grid, block, args); }}" for name in names]
    return "\n".join(lines) + "\n"


def _cached_build(stem: str, parts: list[bytes], compile_into: Callable[[Path, Path], list[str]]) -> Path:
    """The cached shared library ``stem-DIGEST.so``, DIGEST a hash of ``parts`` (every input of the build) and the
    compiler's version; built now where the cache has none: ``compile_into(folder, output)`` is the compiler's
    command line, run in a temporary folder of the cache (which it may write sources to)."""
    cxx = compiler()
    if cxx is None:
        raise BuildError(compiler_missing() or "no compiler")
    digest = hashlib.sha256()
    for part in [*parts, _compiler_version(cxx).encode()]:
        digest.update(hashlib.sha256(part).digest())
    target = cache_dir() / f"{stem}-{digest.hexdigest()[:20]}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as folder:
        built = Path(folder) / target.name
        command = [cxx, *compile_into(Path(folder), built)]
        result = run_compiler(command)
        if result.returncode != 0:
            raise BuildError(f"{' '.join(command)}\n{result.stdout}{result.stderr}")
        os.replace(built, target)  # atomic: a concurrent session sees the whole library or none
    return target


def build_library(cu_file: str | Path, *, tsan: bool = False, kernel_dir: Path = KERNEL_DIR) -> Path:
    """The shared library of one kernel file of ``kernel_dir`` (built now if the cache has none for these inputs).
    Another ``kernel_dir`` than gpunn's serves the tests that break a kernel on purpose."""
    cu_file = Path(kernel_dir) / Path(cu_file).name
    source = launcher_source(cu_file)
    flags = TSAN_FLAGS if tsan else FLAGS

    def compile_into(folder: Path, built: Path) -> list[str]:
        launchers = folder / f"{cu_file.stem}_launchers.cpp"
        launchers.write_text(source)
        return [*flags, f"-I{kernel_dir}", "-include", str(HEADER), str(launchers), "-o", str(built)]

    parts = [HEADER.read_bytes(), Path(__file__).read_bytes(), source.encode(), " ".join(flags).encode()]
    parts += [path.read_bytes() for path in sorted(Path(kernel_dir).iterdir())]
    return _cached_build(cu_file.stem + ("-tsan" if tsan else ""), parts, compile_into)


CUBLAS_STAND_IN = Path(__file__).resolve().parent / "cublas_cpu.cpp"
CUBLAS_STAND_IN_FLAGS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off")


def build_cublas_stand_in() -> Path:
    """The shared library of cublas_cpu.cpp, a host stand-in for libcublas (built now if the cache has none)."""
    return _cached_build("cublas_cpu", [CUBLAS_STAND_IN.read_bytes(), " ".join(CUBLAS_STAND_IN_FLAGS).encode()],
                         lambda folder, built: [*CUBLAS_STAND_IN_FLAGS, str(CUBLAS_STAND_IN), "-o", str(built)])


@cache
def build_all(tsan: bool = False) -> str | None:
    """Build every kernel file's library (in parallel, once per process): None when done, else why it cannot be."""
    reason = compiler_missing()
    if reason is not None:
        return reason
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for library in pool.map(lambda path: build_library(path, tsan=tsan), kernel_files()):
            assert library.exists()
    return None


def tsan_runtime() -> tuple[Path | None, str]:
    """(libtsan's path, "") where a ThreadSanitizer build can run in a Python subprocess, else (None, why not).

    A TSan-built library cannot be loaded into a process that started without the TSan runtime ("cannot allocate
    memory in static TLS block"), so it runs in a fresh interpreter with libtsan preloaded. This probes that an
    interpreter starts that way here."""
    cxx = compiler()
    if cxx is None:
        return None, compiler_missing() or "no compiler"
    name = run_compiler([cxx, "-print-file-name=libtsan.so"]).stdout.strip()
    path = Path(name).resolve() if name and Path(name).is_absolute() else None
    if path is None or not path.is_file():
        return None, f"{cxx} has no ThreadSanitizer runtime (libtsan.so not found)"
    probe = subprocess.run([sys.executable, "-c", "import numpy"],
                           env={**os.environ, "LD_PRELOAD": str(path), "OPENBLAS_NUM_THREADS": "1"},
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"Python does not start with {path} preloaded: {' '.join(probe.stderr.split())[:300]}"
    return path, ""

