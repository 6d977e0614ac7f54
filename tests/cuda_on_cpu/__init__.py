"""CUDA on the CPU, for the tests: gpunn's .cu kernels compiled with NVRTC (nvrtc.py) and run unchanged on CPU
threads (cuda_cpu.h, build.py), an emulated device that runs gpunn.fused_cuda's driver on them (device.py), and a
host stand-in for libcublas's C API (cublas_cpu.cpp)."""

from .build import BuildError, build_all, build_cublas_stand_in, build_library, compiler_missing, tsan_runtime
from .device import TEST_CONFIG, EmulatedDevice, RecordedGraph
from .nvrtc import Nvrtc, NvrtcCompileError, NvrtcNotFound, find_nvrtc

__all__ = ["TEST_CONFIG", "BuildError", "build_all", "build_cublas_stand_in", "EmulatedDevice", "Nvrtc",
           "NvrtcCompileError", "NvrtcNotFound", "RecordedGraph", "build_library", "compiler_missing", "find_nvrtc",
           "tsan_runtime"]
