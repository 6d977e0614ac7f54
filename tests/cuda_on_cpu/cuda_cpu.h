// cuda_cpu.h: run unchanged CUDA C++ kernel sources on the CPU, for tests.
//
// g++ -std=c++20 -x c++ -include cuda_cpu.h kernels.cu ...  compiles a .cu file as plain C++: __global__ and
// __device__ disappear, __shared__ becomes `static`, threadIdx/blockIdx are thread_local, and __syncthreads() is a
// std::barrier. cuda_cpu::launch(kernel, grid, block, args) runs one launch on one std::thread per thread of a
// block (a pool, kept between launches), and each thread walks through every block of the grid in the same order,
// with a barrier between blocks.
// So the threads of one block really run concurrently (a missing __syncthreads is a real data race, which
// ThreadSanitizer reports), while blocks run one after another, which is what lets a `static` local stand in for
// a block's shared memory.
//
// Limits, by design: no warps (no __shfl*, no warp-synchronous code: threads of a "warp" are not in lockstep here),
// no dynamic shared memory (extern __shared__), no cooperative groups, no streams or events, no device-side printf
// guarantees. A thread that leaves the kernel early while the others wait at a __syncthreads deadlocks, as it is
// undefined behaviour on a GPU. Float arithmetic is the host's: no -ftz, no fused multiply-add unless the host
// compiler contracts one, and libm's expf/logf rather than CUDA's (results agree to rounding, not bits).
#pragma once

#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct uint3 {
    unsigned x, y, z;
};

// the built-in variables: per thread where they differ between threads, shared where a launch fixes them
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
// a hint to the GPU's register allocator: nothing to do on the CPU
#define __launch_bounds__(...)
// one block runs at a time, so one copy of a block's shared array serves every block in turn
#define __shared__ static

namespace cuda_cpu {
// the barrier of the block now running; set by launch() before its threads start
inline std::barrier<>* block_barrier = nullptr;

inline std::mutex& launch_mutex() {
    static std::mutex mutex;
    return mutex;
}
}  // namespace cuda_cpu

inline void __syncthreads() { cuda_cpu::block_barrier->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
inline T atomicAdd(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_add(value);
}

// CUDA's bit casts and fast-math spellings
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }
inline long long __double_as_longlong(double v) { return std::bit_cast<long long>(v); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
// CUDA's integer min/max, which device code may call unqualified
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
using std::isfinite;
using std::isnan;

namespace cuda_cpu {
template <typename... P, std::size_t... I>
std::tuple<P...> unpack(void** args, std::index_sequence<I...>) {
    // args[i] points at the i-th argument's value, as cudaLaunchKernel's kernelParams do
    return std::tuple<P...>{*static_cast<std::remove_cv_t<P>*>(args[I])...};
}

// The threads that play a block's threads. They are made on the first launch that needs them and then kept,
// waiting on a condition variable between launches: making and joining an OS thread per CUDA thread per launch
// cost more than the kernels themselves. (Detached and never destroyed: the process's exit ends them.)
class Pool {
  public:
    // Runs body() as every thread of every block of grid: block.x * block.y * block.z threads, each visiting
    // every block in order, with a barrier after each block.
    void run(dim3 grid, dim3 block, const std::function<void()>& body) {
        const unsigned threads = block.x * block.y * block.z;
        std::barrier<> barrier(threads);
        std::unique_lock<std::mutex> lock(mutex_);
        while (wakes_.size() < threads) {
            wakes_.push_back(std::make_unique<std::condition_variable>());
            std::thread(&Pool::work, this, static_cast<unsigned>(wakes_.size() - 1), generation_).detach();
        }
        block_barrier = &barrier;
        blockDim = block;
        gridDim = grid;
        job_ = Job{&body, &barrier, grid, block, threads};
        remaining_ = threads;
        ++generation_;
        // wake only the threads this launch uses: after a launch of 256 threads, one of 8 need not wake 256
        for (unsigned t = 0; t < threads; ++t) wakes_[t]->notify_one();
        done_.wait(lock, [this] { return remaining_ == 0; });
        block_barrier = nullptr;
    }

  private:
    struct Job {
        const std::function<void()>* body;
        std::barrier<>* barrier;
        dim3 grid, block;
        unsigned threads;
    };

    void work(unsigned t, unsigned long seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        for (;;) {
            wakes_[t]->wait(lock, [&] { return generation_ != seen; });
            seen = generation_;
            const Job job = job_;
            if (t >= job.threads) continue;  // this launch needs fewer threads
            lock.unlock();
            threadIdx = uint3{t % job.block.x, t / job.block.x % job.block.y, t / (job.block.x * job.block.y)};
            for (unsigned z = 0; z < job.grid.z; ++z)
                for (unsigned y = 0; y < job.grid.y; ++y)
                    for (unsigned x = 0; x < job.grid.x; ++x) {
                        blockIdx = uint3{x, y, z};
                        (*job.body)();
                        // the next block may reuse the shared arrays only when every thread is done with them
                        job.barrier->arrive_and_wait();
                    }
            lock.lock();
            if (--remaining_ == 0) done_.notify_one();
        }
    }

    std::mutex mutex_;
    std::condition_variable done_;
    std::vector<std::unique_ptr<std::condition_variable>> wakes_;  // one per thread
    Job job_{};
    unsigned remaining_ = 0;
    unsigned long generation_ = 0;
};

inline void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
    std::lock_guard<std::mutex> lock(launch_mutex());  // launches are serialized, as on one stream
    static Pool* pool = new Pool;
    pool->run(grid, block, body);
}

// kernel<<<grid, block>>>(args...), with args[i] pointing at the i-th argument's value (cudaLaunchKernel's
// convention); the values are unpacked by the kernel's own parameter types.
template <typename... P>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, void** args) {
    const std::tuple<P...> values = unpack<P...>(args, std::index_sequence_for<P...>{});
    run_grid(grid, block, [kernel, &values] { std::apply(kernel, values); });
}
}  // namespace cuda_cpu
