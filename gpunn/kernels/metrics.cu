// An epoch's figures, written on the device into one row of a metrics ring buffer, so that the host reads one
// small row per epoch instead of synchronizing on each figure:
//   metrics[row] = [loss, train_accuracy, val_loss, val_accuracy, finite],  row = (epoch - 1) mod capacity.
#include "common.cuh"

// Sums of squares over the flat parameter buffer P = [W1, ..., WL, b1, ..., bL] (n_total elements, the first
// n_weights of them weights): block b writes its share of sum_{i < n_weights} P_i^2 to partials[b] and of
// sum_{all i} P_i^2 to partials[gridDim.x + b]. One pass gives both: the weights' sum is the L2 term of the loss,
// and the total is finite exactly when every parameter is (the squares are taken in double, where a float32
// square cannot overflow; a float64 parameter above ~1e154 in magnitude would count as non-finite).
template <typename T>
__device__ void sum_squares(const T* P, long long n_weights, long long n_total, double* partials) {
    __shared__ double shared[GPUNN_MAX_BLOCK];
    double weights = 0.0, all = 0.0;
    for (long long i = grid_first(); i < n_total; i += grid_stride()) {
        const double p = (double)P[i];
        all += p * p;
        if (i < n_weights) weights += p * p;
    }
    weights = block_sum(weights, shared);
    all = block_sum(all, shared);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = weights;
        partials[gridDim.x + blockIdx.x] = all;
    }
}

// The row of the ring buffer that epoch *counter (1-based) writes.
__device__ __forceinline__ long long metrics_row(const long long* counter, int capacity) {
    const long long row = (*counter - 1) % capacity;
    return row < 0 ? row + capacity : row;
}

// One block. metrics[row][0] = loss, [1] = accuracy of the training step:
//   loss = sum(loss partials) / m + l2 / (2m) * sum(W^2),   accuracy = sum(hit partials) / m,
// from softmax_xent's `parts` partials (loss, then hits) and sum_squares' `squares` partials (the weights' part,
// taken from the parameters before the update). Each thread adds a fixed strided subset; then the tree.
template <typename T>
__device__ void train_metrics(T* metrics, int capacity, const long long* counter, const double* partials, int parts,
                              const double* squares, int square_parts, int m, double l2) {
    __shared__ double shared[GPUNN_MAX_BLOCK];
    double loss = 0.0, hits = 0.0, weights = 0.0;
    for (int k = threadIdx.x; k < parts; k += blockDim.x) {
        loss += partials[k];
        hits += partials[parts + k];
    }
    for (int k = threadIdx.x; k < square_parts; k += blockDim.x) weights += squares[k];
    loss = block_sum(loss, shared);
    hits = block_sum(hits, shared);
    weights = block_sum(weights, shared);
    if (threadIdx.x == 0) {
        T* row = metrics + 5 * metrics_row(counter, capacity);
        // without L2 the term is left out rather than multiplied by 0, which would turn an infinite sum into NaN
        const double penalty = l2 != 0.0 ? l2 / (2.0 * m) * weights : 0.0;
        row[0] = (T)(loss / m + penalty);
        row[1] = (T)(hits / m);
    }
}

// One block. metrics[row][2] = validation loss, [3] = validation accuracy (NaN for both when m_val is 0: no
// validation set), [4] = 1 when every parameter is finite after the update, else 0, from the total part of
// sum_squares' partials (taken after the update).
template <typename T>
__device__ void val_metrics(T* metrics, int capacity, const long long* counter, const double* partials, int parts,
                            const double* squares, int square_parts, int m_val) {
    __shared__ double shared[GPUNN_MAX_BLOCK];
    double loss = 0.0, hits = 0.0, all = 0.0;
    for (int k = threadIdx.x; k < parts; k += blockDim.x) {
        loss += partials[k];
        hits += partials[parts + k];
    }
    for (int k = threadIdx.x; k < square_parts; k += blockDim.x) all += squares[square_parts + k];
    loss = block_sum(loss, shared);
    hits = block_sum(hits, shared);
    all = block_sum(all, shared);
    if (threadIdx.x == 0) {
        T* row = metrics + 5 * metrics_row(counter, capacity);
        row[2] = (T)(m_val > 0 ? loss / m_val : g_nan());
        row[3] = (T)(m_val > 0 ? hits / m_val : g_nan());
        row[4] = isfinite(all) ? T(1) : T(0);
    }
}

extern "C" __global__ void sum_squares_f32(const float* P, long long n_weights, long long n_total, double* partials) {
    sum_squares<float>(P, n_weights, n_total, partials);
}
extern "C" __global__ void sum_squares_f64(const double* P, long long n_weights, long long n_total, double* partials) {
    sum_squares<double>(P, n_weights, n_total, partials);
}

extern "C" __global__ void train_metrics_f32(float* metrics, int capacity, const long long* counter,
                                             const double* partials, int parts, const double* squares,
                                             int square_parts, int m, double l2) {
    train_metrics<float>(metrics, capacity, counter, partials, parts, squares, square_parts, m, l2);
}
extern "C" __global__ void train_metrics_f64(double* metrics, int capacity, const long long* counter,
                                             const double* partials, int parts, const double* squares,
                                             int square_parts, int m, double l2) {
    train_metrics<double>(metrics, capacity, counter, partials, parts, squares, square_parts, m, l2);
}

extern "C" __global__ void val_metrics_f32(float* metrics, int capacity, const long long* counter,
                                           const double* partials, int parts, const double* squares,
                                           int square_parts, int m_val) {
    val_metrics<float>(metrics, capacity, counter, partials, parts, squares, square_parts, m_val);
}
extern "C" __global__ void val_metrics_f64(double* metrics, int capacity, const long long* counter,
                                           const double* partials, int parts, const double* squares,
                                           int square_parts, int m_val) {
    val_metrics<double>(metrics, capacity, counter, partials, parts, squares, square_parts, m_val);
}
