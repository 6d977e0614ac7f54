// The update rules of gpunn/optim.py over ONE flat parameter buffer, so that one launch updates every layer:
//   P = [W1, ..., WL, b1, ..., bL] (n_total elements, the first n_weights of them weights), G, V, S alike.
// The learning rate and the step t are read from device memory (lr_now, step), not passed by value: a CUDA graph
// bakes its launch arguments in, and these change every epoch. Small kernels below advance them, and stream
// order makes each write visible to the launches after it.
#include "common.cuh"

// dP = G * inv_m + l2_over_m * P (weights only): G holds unnormalized sums (cuBLAS with alpha = 1), so the 1/m
// of the mean and the L2 gradient (lambda/m) W are applied here. Then, exactly as gpunn/optim.py (with NumPy's
// rule that a Python float meets a float32 array as a float32: coefficients are formed in double, then rounded
// to T, and each expression keeps the reference's order of operations):
//   rule 0, gd:        P <- P - lr dP
//   rule 1, momentum:  V <- b1 V + (1 - b1) dP;            P <- P - lr V
//   rule 2, rmsprop:   S <- b2 S + (1 - b2) dP dP;         P <- P - lr dP / (sqrt(S) + eps)
//   rule 3, adam:      V, S as above; V^ = V / (1 - b1^t), S^ = S / (1 - b2^t);  P <- P - lr V^ / (sqrt(S^) + eps)
// V and S are read and written only by the rules that keep them.
template <typename T>
__device__ void update(T* P, const T* G, T* V, T* S, long long n_weights, long long n_total, T inv_m, T l2_over_m,
                       const T* lr_now, const long long* step, int rule, double beta1, double beta2, double eps) {
    const T lr = *lr_now;
    const double t = (double)*step;
    const T b1 = (T)beta1, b2 = (T)beta2, c1 = (T)(1.0 - beta1), c2 = (T)(1.0 - beta2), e = (T)eps;
    const T correction1 = (T)(1.0 - pow(beta1, t)), correction2 = (T)(1.0 - pow(beta2, t));
    for (long long i = grid_first(); i < n_total; i += grid_stride()) {
        const T p = P[i];
        T g = G[i] * inv_m;
        if (i < n_weights) g = g + l2_over_m * p;
        if (rule == 0) {
            P[i] = p - lr * g;
        } else if (rule == 1) {
            const T v = b1 * V[i] + c1 * g;
            V[i] = v;
            P[i] = p - lr * v;
        } else if (rule == 2) {
            const T s = b2 * S[i] + c2 * g * g;
            S[i] = s;
            P[i] = p - lr * g / (g_sqrt(s) + e);
        } else {
            const T v = b1 * V[i] + c1 * g;
            const T s = b2 * S[i] + c2 * g * g;
            V[i] = v;
            S[i] = s;
            P[i] = p - lr * (v / correction1) / (g_sqrt(s / correction2) + e);
        }
    }
}

// out = G * inv_m + l2_over_m * P (weights only): the mean gradient with its L2 term, what
// gpunn.nn.loss_and_gradients returns, from the unnormalized sums G.
template <typename T>
__device__ void scale_grads(const T* G, const T* P, T* out, long long n_weights, long long n_total, T inv_m,
                            T l2_over_m) {
    for (long long i = grid_first(); i < n_total; i += grid_stride()) {
        T g = G[i] * inv_m;
        if (i < n_weights) g = g + l2_over_m * P[i];
        out[i] = g;
    }
}

// One thread: the next epoch. *counter += 1 (it is then the epoch, 1-based, and Adam's t for a full-batch step),
// and *lr_now = lr_table[epoch - 1], the schedule computed once on the host (clamped to the table's ends).
template <typename T>
__device__ void advance_epoch(long long* counter, const T* lr_table, int lr_count, T* lr_now) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const long long epoch = *counter + 1;
    *counter = epoch;
    long long k = epoch - 1;
    if (k < 0) k = 0;
    if (k >= lr_count) k = lr_count - 1;
    *lr_now = lr_table[k];
}

// One thread: *counter = t and *lr_now = lr, for launches outside a graph (and to set a resumed run's epoch).
template <typename T>
__device__ void set_step(long long* counter, T* lr_now, long long t, T lr) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    *counter = t;
    *lr_now = lr;
}

extern "C" __global__ void update_f32(float* P, const float* G, float* V, float* S, long long n_weights,
                                      long long n_total, float inv_m, float l2_over_m, const float* lr_now,
                                      const long long* step, int rule, double beta1, double beta2, double eps) {
    update<float>(P, G, V, S, n_weights, n_total, inv_m, l2_over_m, lr_now, step, rule, beta1, beta2, eps);
}
extern "C" __global__ void update_f64(double* P, const double* G, double* V, double* S, long long n_weights,
                                      long long n_total, double inv_m, double l2_over_m, const double* lr_now,
                                      const long long* step, int rule, double beta1, double beta2, double eps) {
    update<double>(P, G, V, S, n_weights, n_total, inv_m, l2_over_m, lr_now, step, rule, beta1, beta2, eps);
}

extern "C" __global__ void scale_grads_f32(const float* G, const float* P, float* out, long long n_weights,
                                           long long n_total, float inv_m, float l2_over_m) {
    scale_grads<float>(G, P, out, n_weights, n_total, inv_m, l2_over_m);
}
extern "C" __global__ void scale_grads_f64(const double* G, const double* P, double* out, long long n_weights,
                                           long long n_total, double inv_m, double l2_over_m) {
    scale_grads<double>(G, P, out, n_weights, n_total, inv_m, l2_over_m);
}

extern "C" __global__ void advance_epoch_f32(long long* counter, const float* lr_table, int lr_count, float* lr_now) {
    advance_epoch<float>(counter, lr_table, lr_count, lr_now);
}
extern "C" __global__ void advance_epoch_f64(long long* counter, const double* lr_table, int lr_count,
                                             double* lr_now) {
    advance_epoch<double>(counter, lr_table, lr_count, lr_now);
}

extern "C" __global__ void set_step_f32(long long* counter, float* lr_now, long long t, float lr) {
    set_step<float>(counter, lr_now, t, lr);
}
extern "C" __global__ void set_step_f64(long long* counter, double* lr_now, long long t, double lr) {
    set_step<double>(counter, lr_now, t, lr);
}
