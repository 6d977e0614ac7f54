// The element-wise and per-column work of a ReLU/softmax network's forward and backward pass. The products
// W @ A, dZ @ A.T and W.T @ dZ are cuBLAS GEMMs (gpunn/fused_cuda.py); these kernels do everything between them.
#include "common.cuh"

// Z <- max(Z + b, 0) in place.  Z: (n, m), b: (n, 1).
// Rows over blockIdx.y (b[row] is loaded once per row), columns over a grid-stride loop in x. NaN stays NaN, as
// in NumPy's clip and maximum, so that a diverging run is reported rather than silently zeroed.
template <typename T>
__device__ void bias_relu(T* Z, const T* b, int n, int m) {
    for (int row = blockIdx.y; row < n; row += gridDim.y) {
        const T bias = b[row];
        T* z = Z + (long long)row * m;
        for (long long j = grid_first(); j < m; j += grid_stride()) {
            const T value = z[j] + bias;
            z[j] = value < T(0) ? T(0) : value;
        }
    }
}

// dA <- dA * relu'(Z) in place, with relu'(Z) = 1 where A = relu(Z) > 0 and 0 elsewhere (A carries the mask,
// so Z need not be kept). Multiplying by 0 rather than writing 0 keeps a NaN or infinite dA visible, as in
// gpunn.nn.relu_backward.  dA, A: `size` elements.
template <typename T>
__device__ void relu_mask(T* dA, const T* A, long long size) {
    for (long long i = grid_first(); i < size; i += grid_stride()) {
        dA[i] = dA[i] * (A[i] > T(0) ? T(1) : T(0));
    }
}

// out[i] = sum_j Z[i, j]: the bias gradient db = sum over samples of dZ (unnormalized, like the GEMMs' dW).
// One block per row (rows beyond the grid loop over blockIdx.x), each thread a fixed strided share of the row,
// then the block's tree: the same order every run.  Z: (n, m), out: (n,).
template <typename T>
__device__ void row_sum(const T* Z, T* out, int n, int m) {
    __shared__ T shared[GPUNN_MAX_BLOCK];
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const T* z = Z + (long long)row * m;
        T sum = T(0);
        for (int j = threadIdx.x; j < m; j += blockDim.x) sum += z[j];
        sum = block_sum(sum, shared);
        if (threadIdx.x == 0) out[row] = sum;
    }
}

// The output layer of a softmax network, per column j of the logits Z (classes, m) without their bias b:
//   z = Z[:, j] + b,  P = softmax(z) computed from z - max(z) (exp overflows above ~88 in float32),
//   loss_j = log sum exp(z - max z) - (z[y_j] - max z)       (= -log P[y_j])
//   hit_j  = (argmax z == y_j), the first maximum winning, as NumPy's argmax does.
// With write_delta != 0, Z[:, j] <- P - onehot(y_j), the output delta dZ of the backward pass (in place); with 0,
// Z is only read (the validation pass). Each block writes the sums of its columns' loss and hits to
// partials[blockIdx.x] and partials[gridDim.x + blockIdx.x], in double: the one-block metrics kernels add them up.
// A label outside 0..classes-1 would index out of bounds: it contributes NaN to the loss instead.
template <typename T>
__device__ void softmax_xent(T* Z, const T* b, const long long* y, int classes, int m, double* partials,
                             int write_delta) {
    __shared__ double shared[GPUNN_MAX_BLOCK];
    double loss = 0.0, hits = 0.0;
    for (long long j = grid_first(); j < m; j += grid_stride()) {
        T top = Z[j] + b[0];
        int predicted = 0;
        for (int i = 1; i < classes; ++i) {
            const T z = Z[(long long)i * m + j] + b[i];
            if (z > top) {  // strictly greater: the first maximum wins
                top = z;
                predicted = i;
            }
        }
        T sum = T(0);
        for (int i = 0; i < classes; ++i) sum += g_exp(Z[(long long)i * m + j] + b[i] - top);
        const long long label = y[j];
        if (label < 0 || label >= classes) {
            loss += g_nan();
            continue;
        }
        const T picked = Z[label * m + j] + b[label] - top;
        loss += (double)(g_log(sum) - picked);
        hits += predicted == label ? 1.0 : 0.0;
        if (write_delta) {
            for (int i = 0; i < classes; ++i) {
                T* z = Z + (long long)i * m + j;
                *z = g_exp(*z + b[i] - top) / sum - (i == label ? T(1) : T(0));
            }
        }
    }
    loss = block_sum(loss, shared);
    hits = block_sum(hits, shared);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = loss;
        partials[gridDim.x + blockIdx.x] = hits;
    }
}

// The exported kernels, one per element type: CuPy's RawModule finds them by these unmangled names, and the
// host code checks its arguments against these parameter lists (gpunn/fused_cuda.py parses them).
extern "C" __global__ void bias_relu_f32(float* Z, const float* b, int n, int m) { bias_relu<float>(Z, b, n, m); }
extern "C" __global__ void bias_relu_f64(double* Z, const double* b, int n, int m) { bias_relu<double>(Z, b, n, m); }

extern "C" __global__ void relu_mask_f32(float* dA, const float* A, long long size) { relu_mask<float>(dA, A, size); }
extern "C" __global__ void relu_mask_f64(double* dA, const double* A, long long size) {
    relu_mask<double>(dA, A, size);
}

extern "C" __global__ void row_sum_f32(const float* Z, float* out, int n, int m) { row_sum<float>(Z, out, n, m); }
extern "C" __global__ void row_sum_f64(const double* Z, double* out, int n, int m) { row_sum<double>(Z, out, n, m); }

extern "C" __global__ void softmax_xent_f32(float* Z, const float* b, const long long* y, int classes, int m,
                                            double* partials, int write_delta) {
    softmax_xent<float>(Z, b, y, classes, m, partials, write_delta);
}
extern "C" __global__ void softmax_xent_f64(double* Z, const double* b, const long long* y, int classes, int m,
                                            double* partials, int write_delta) {
    softmax_xent<double>(Z, b, y, classes, m, partials, write_delta);
}
