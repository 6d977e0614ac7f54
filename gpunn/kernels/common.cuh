// Shared by gpunn's kernels: the block-wide sum and the math overloads.
//
// Layout everywhere: C-contiguous (row-major) matrices; X is (n_in, m) with one sample per column, W is (n_out,
// n_in), Z and A are (n, m). So element (i, j) of an (n, m) matrix is at i * m + j, and consecutive threads that
// take consecutive columns j read consecutive addresses (coalesced).
//
// Determinism: no atomics. A reduction runs on a grid whose size the host fixes from the problem size alone; each
// block sums its fixed share in a fixed order (a grid-stride loop, then the tree below) into its own slot of a
// partials array, and a one-block kernel sums the partials in a fixed order. The same inputs give the same bits.
//
// Written for NVRTC (it includes no system header: CuPy's RawModule compiles this with no CUDA headers on the path
// that we rely on) and for g++ through tests/cuda_on_cpu/cuda_cpu.h, which runs the same source on CPU threads.
#pragma once

// The most threads per block a launch may use; block-wide sums keep one shared slot per thread. Every launch of
// a kernel that calls block_sum must use a power-of-two blockDim.x <= GPUNN_MAX_BLOCK (the host checks this).
#define GPUNN_MAX_BLOCK 256

// Sum of `value` over the threads of the block, returned to every thread. Every thread of the block must call it
// (it contains barriers). `shared` holds GPUNN_MAX_BLOCK values.
template <typename A>
__device__ __forceinline__ A block_sum(A value, A* shared) {
    const unsigned tid = threadIdx.x;
    // a previous call may still be reading shared[0]: wait before overwriting the slots
    __syncthreads();
    shared[tid] = value;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (tid < stride) shared[tid] += shared[tid + stride];
        // the next round reads what this round wrote
        __syncthreads();
    }
    return shared[0];
}

// One spelling per operation for both element types (expf/exp ...), so the templates below read as the math.
__device__ __forceinline__ float g_exp(float x) { return expf(x); }
__device__ __forceinline__ double g_exp(double x) { return exp(x); }
__device__ __forceinline__ float g_log(float x) { return logf(x); }
__device__ __forceinline__ double g_log(double x) { return log(x); }
__device__ __forceinline__ float g_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double g_sqrt(double x) { return sqrt(x); }

// A quiet NaN without <cmath>'s NAN macro, which NVRTC does not define without headers.
__device__ __forceinline__ double g_nan() { return __longlong_as_double(0x7ff8000000000000LL); }

// The first thread index and the stride of a grid-stride loop over one dimension, in 64 bits: h * m can pass 2^31.
__device__ __forceinline__ long long grid_first() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long grid_stride() { return (long long)gridDim.x * blockDim.x; }
