// A stand-in for libcublas with the C signatures of the functions gpunn.fused_cuda.Cublas calls, computing on host
// pointers: loaded through ctypes in place of the real library, it checks that Cublas's argument types, pointers and
// enums arrive as cuBLAS's C API declares them (cublas_api.h), which a stand-in written in Python cannot.
//
// GEMMs are column-major, as cuBLAS's: C (m, n) = alpha op(A) (m, k) op(B) (k, n) + beta C, with leading dimensions.
// cublasGemmEx takes float32 matrices (CUDA_R_32F) and, for CUBLAS_COMPUTE_32F_FAST_TF32 and _FAST_16BF, rounds each
// input to TF32 or bfloat16 (to nearest, ties to even) before multiplying, as a tensor core takes it; the sums are
// float32. The last call's compute type is kept for the test to read (cublas_cpu_last_compute_type).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kStatusSuccess = 0;
constexpr int kStatusInvalidValue = 7;
constexpr int kStatusNotSupported = 15;
constexpr int kComputeF32 = 68, kComputeFastBF16 = 75, kComputeFastTF32 = 77;
constexpr int kR32F = 0;

int last_compute_type = -1;
int handles = 0;

float rounded(float x, int dropped_bits) {
    if (dropped_bits == 0 || !std::isfinite(x)) return x;
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const std::uint32_t half = 1u << (dropped_bits - 1), odd = (bits >> dropped_bits) & 1u;
    bits = (bits + half - 1u + odd) & ~((1u << dropped_bits) - 1u);
    std::memcpy(&x, &bits, sizeof bits);
    return x;
}

// op(X)[i][j] of a column-major matrix with leading dimension ld
template <typename T>
T element(const T* X, int ld, bool transposed, int i, int j) {
    return transposed ? X[j + static_cast<long long>(i) * ld] : X[i + static_cast<long long>(j) * ld];
}

template <typename T>
int gemm(int transa, int transb, int m, int n, int k, T alpha, const T* A, int lda, const T* B, int ldb, T beta,
         T* C, int ldc, int dropped_bits) {
    if (m < 0 || n < 0 || k < 0 || ldc < m || lda < (transa ? k : m) || ldb < (transb ? n : k)) {
        return kStatusInvalidValue;
    }
    for (int j = 0; j < n; ++j) {
        for (int i = 0; i < m; ++i) {
            T sum = T(0);
            for (int p = 0; p < k; ++p) {
                T a = element(A, lda, transa != 0, i, p), b = element(B, ldb, transb != 0, p, j);
                if constexpr (sizeof(T) == 4) {
                    a = rounded(a, dropped_bits);
                    b = rounded(b, dropped_bits);
                }
                sum += a * b;
            }
            T& c = C[i + static_cast<long long>(j) * ldc];
            c = alpha * sum + (beta == T(0) ? T(0) : beta * c);
        }
    }
    return kStatusSuccess;
}

}  // namespace

extern "C" {

int cublasCreate_v2(void** handle) {
    *handle = &handles;
    ++handles;
    return kStatusSuccess;
}
int cublasDestroy_v2(void*) { return kStatusSuccess; }
int cublasSetPointerMode_v2(void*, int mode) { return mode == 0 ? kStatusSuccess : kStatusNotSupported; }
int cublasSetMathMode(void*, int) { return kStatusSuccess; }
int cublasSetStream_v2(void*, void*) { return kStatusSuccess; }
int cublasSetWorkspace_v2(void*, void*, std::size_t) { return kStatusSuccess; }

int cublasSgemm_v2(void*, int transa, int transb, int m, int n, int k, const float* alpha, const float* A, int lda,
                   const float* B, int ldb, const float* beta, float* C, int ldc) {
    last_compute_type = kComputeF32;
    return gemm<float>(transa, transb, m, n, k, *alpha, A, lda, B, ldb, *beta, C, ldc, 0);
}

int cublasDgemm_v2(void*, int transa, int transb, int m, int n, int k, const double* alpha, const double* A,
                   int lda, const double* B, int ldb, const double* beta, double* C, int ldc) {
    last_compute_type = -1;
    return gemm<double>(transa, transb, m, n, k, *alpha, A, lda, B, ldb, *beta, C, ldc, 0);
}

int cublasGemmEx(void*, int transa, int transb, int m, int n, int k, const void* alpha, const void* A, int Atype,
                 int lda, const void* B, int Btype, int ldb, const void* beta, void* C, int Ctype, int ldc,
                 int computeType, int algo) {
    last_compute_type = computeType;
    if (Atype != kR32F || Btype != kR32F || Ctype != kR32F || algo != -1) return kStatusNotSupported;
    const int dropped = computeType == kComputeFastTF32 ? 13 : computeType == kComputeFastBF16 ? 16
                        : computeType == kComputeF32 ? 0 : -1;
    if (dropped < 0) return kStatusNotSupported;
    return gemm<float>(transa, transb, m, n, k, *static_cast<const float*>(alpha), static_cast<const float*>(A),
                       lda, static_cast<const float*>(B), ldb, *static_cast<const float*>(beta),
                       static_cast<float*>(C), ldc, dropped);
}

int cublas_cpu_last_compute_type() { return last_compute_type; }

}  // extern "C"
