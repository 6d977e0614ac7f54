// The single pass: a whole training step's gradient sums for an n0-h-C network (one ReLU hidden layer, softmax
// output) in one kernel that reads each sample's uint8 pixels once, and a second kernel that adds the blocks'
// partial sums in a fixed order. The math is gpunn.nn.loss_and_gradients on X / 255, per tile of 32 samples:
//
//   Z1 = W1 x / 255 + b1          (x the integer pixel values: the 1/255 is one division per entry of Z1)
//   A1 = max(Z1, 0)               Z2 = W2 A1 + b2       P = softmax(Z2), from Z2 - max Z2
//   loss_j = log sum exp(Z2 - max) - (Z2[y_j] - max),   hit_j = (first argmax of Z2 == y_j)
//   dZ2 = P - onehot(y)           dZ1 = (W2^T dZ2) * (A1 > 0)
//   dW1 += dZ1 x^T (in pixel units: the reduction divides by 255)    db1 += sum_j dZ1
//   dW2 += dZ2 A1^T               db2 += sum_j dZ2
//
// Unnormalized sums, like the cuBLAS path's: gpunn/kernels/optimizer.cu's update and scale_grads apply 1/m and L2.
// The result lands in the flat layout [W1 (h, n0), W2 (C, h), b1 (h), b2 (C)] of gpunn.fused_cuda.FlatLayout.
//
// Grid: a fixed number of blocks (about the number that fit on the GPU at once), each looping over the tiles
// b, b + gridDim.x, ... (neighbouring blocks read neighbouring 32-byte pieces of each pixel row at about the same
// time). Each block keeps its share of every gradient in registers (dW1) and shared memory (the rest) across its
// tiles and writes it once, to its own row of `part`; single_pass_reduce adds the rows in a fixed order. No
// atomics, so two runs give the same bits; another grid size changes only how the sums are grouped.
//
// Block: blockDim.x threads, a power of two from 16 to 256, with n0 <= 3 blockDim.x + 16 and n0 <= 3.5 blockDim.x
// (256 threads on a GPU: n0 <= 784). Per tile:
//   load    the tile's pixels, (n0, 32) bytes, into shared memory (prefetched into registers one tile ahead, with
//           the widest loads that each chunk's address allows), and a flag per 16-byte chunk: is it all zero?
//   list    the pixels that are nonzero in at least one of the tile's samples, in ascending order. MNIST's pixels
//           are 81 % zeros: 42 % of (pixel, 32-sample tile) pairs are all zero, and a skipped pixel adds w * 0 = 0
//           to every sum (exactly, for finite weights), so the forward pass and dW1 skip them.
//   forward the threads form slices of 16; thread g of a slice takes samples 2g, 2g+1 and every hidden unit, and
//           the slices split the pixel list (slice s takes entries s, s + slices, ...). The slices' partial sums
//           are then added pairwise through shared memory in a fixed order. W1 is read transposed, W1T (n0, hp4),
//           made by single_pass_prepare, so one pixel's weights are hp4 / 4 16-byte loads shared by the slice.
//   output  Z2 per (sample, class); softmax, loss, hit and dZ2 per sample; dZ1 per (sample, unit).
//   dW1     thread i owns pixels i, i + blockDim.x, i + 2 blockDim.x and all hp units: its sums stay in registers
//           across every tile of the block (3 hp of them; with the rest of the pass that is what bounds hp to 16).
//           A pixel that is zero in the whole tile is skipped.
//   small   dW2, db1, db2 (C h + h + C sums) and dW1 of the pixels past 3 blockDim.x (MNIST's last 16), one thread
//           per sum, kept in shared memory.
//
// Where a few threads work while the rest of the block waits at the next barrier (the list, the output layer, the
// softmax, dZ1, the small sums), their loops run over constant bounds (SP_GROUP, HP, SP_MAX_CLASSES, SP_TILE) and
// are unrolled, so that a thread's loads go out together: a loop of one load per trip waits out each load's
// latency in turn. The order of every sum is that of the plain loop.
//
// Shared memory stays under the 48 KB of static shared memory every CUDA GPU gives a block without an opt-in
// (about 43 KB in float32, 45 KB in float64), so nothing needs cudaFuncSetAttribute and any GPU can run it.
//
// Written for NVRTC and for the CPU emulator (tests/cuda_on_cpu/cuda_cpu.h): no warp intrinsics (threads of a
// warp are not in lockstep there), no dynamic shared memory, no atomics.
#include "common.cuh"

#define SP_TILE 32            // samples per tile
#define SP_MAX_INPUTS 784     // n0 at most: the tile's pixels are a static shared array of n0 * 32 bytes
#define SP_MAX_HIDDEN 16      // h at most: each thread keeps 3 pixels x 16 units of dW1 in registers
#define SP_MAX_CLASSES 16     // C at most
#define SP_OWNED 3            // pixels of dW1 per thread in registers: pixels tid + blockDim.x * r, r < 3
#define SP_LEFTOVER 16        // pixels past 3 blockDim.x (784 = 3 x 256 + 16), their dW1 in shared memory
#define SP_PREFETCH 7         // 16-byte chunks per thread in the prefetch registers: 2 n0 <= 7 blockDim.x
#define SP_SLICE 16           // threads per forward slice: 16 threads x 2 samples = one tile
#define SP_SCRATCH_BYTES 12288
// the sums kept in shared memory: dW2 (C, h), db1 (h), db2 (C), then dW1 of the leftover pixels (16, h)
#define SP_SMALL (SP_MAX_CLASSES * SP_MAX_HIDDEN + SP_MAX_HIDDEN + SP_MAX_CLASSES + SP_LEFTOVER * SP_MAX_HIDDEN)
#define SP_GROUP 16           // pixels per counting thread when the pixel list is built
#define SP_MAX_GROUPS ((SP_MAX_INPUTS + SP_GROUP - 1) / SP_GROUP)

// 16 and 8 bytes read as one load: alignas makes the compiler use one 128-bit or 64-bit instruction.
struct alignas(16) SpWords16 {
    unsigned w[4];
};
struct alignas(8) SpWords8 {
    unsigned w[2];
};
// Four consecutive values of a 16-byte-aligned array: one 128-bit load in float32, two in float64.
template <typename T>
struct alignas(16) SpVec4 {
    T v[4];
};
template <typename T>
__device__ __forceinline__ void sp_load4(const T* at, T (&out)[4]) {
    const SpVec4<T> v = *reinterpret_cast<const SpVec4<T>*>(at);
    for (int q = 0; q < 4; ++q) out[q] = v.v[q];
}

// The block's shared memory. scratch is reused: during the forward pass it holds the slices' partial sums; from
// the end of the forward pass to the end of the tile, A1, dZ1 and Z2 (then dZ2); after the last tile, block_sum's
// slots.
template <typename T>
struct alignas(16) SpShared {
    // xs[p * 8 + (w ^ ((p >> 2) & 7))] = samples 4w .. 4w + 3 of pixel p (one byte each, little-endian). The XOR
    // swizzle puts the 32 pixels that a warp's threads read in the dW1 loop (consecutive p, same w) in 32
    // different banks; unswizzled, rows of 8 words would put every 4th pixel in the same bank.
    unsigned xs[SP_MAX_INPUTS * SP_TILE / 4];
    alignas(16) unsigned char scratch[SP_SCRATCH_BYTES];
    T small[SP_SMALL];                      // dW2, db1, db2 (the flat order after W1), leftover dW1 (16, h)
    long long ys[SP_TILE];                  // the tile's labels
    // the tile's nonzero pixels p, ascending, as p * 8 + ((p >> 2) & 7): then word w of pixel p is xs[entry ^ w]
    unsigned short list[SP_MAX_INPUTS];
    alignas(8) unsigned char nz[2 * SP_MAX_INPUTS];  // nz[2p + half]: chunk `half` of pixel p has a nonzero byte
    int counts[SP_MAX_GROUPS];              // nonzero pixels per group of SP_GROUP, to build the list
    int count;                              // the list's length
};

// Slices whose partial sums fit in scratch at once: the pairwise additions go in rounds of at most this many.
template <typename T, int HP>
struct SpExchange {
    static constexpr int slots = SP_SCRATCH_BYTES / (2 * HP * SP_SLICE * (int)sizeof(T));
};

// The bytes of a chunk that the wide loads below cannot take: the row's last samples (left < 16), or an address
// not 8-byte aligned. 4 bytes at a time where aligned, else byte by byte; zero beyond m. Out of line: rare, and
// inlined at each of the 14 places a chunk is loaded it would be a good part of the kernel's code.
__device__ __noinline__ SpWords16 sp_load_narrow(const unsigned char* src, long long left) {
    SpWords16 v;
    const bool aligned = ((unsigned long long)src & 3) == 0;
    for (int q = 0; q < 4; ++q) {
        if (aligned && left >= 4 * (q + 1)) {
            v.w[q] = *reinterpret_cast<const unsigned*>(src + 4 * q);
        } else {
            unsigned word = 0u;
            for (int b = 0; b < 4; ++b) {
                if (4 * q + b < left) word |= (unsigned)src[4 * q + b] << (8 * b);
            }
            v.w[q] = word;
        }
    }
    return v;
}

// The 16 bytes of pixel row `src` (samples j .. j + 15, `left` = m - j of them in the row), zero beyond m: one
// 16-byte load where the address allows it (every chunk when m % 16 == 0 and X is aligned, as for m = 60,000), two
// 8-byte loads where it is 8-byte aligned (every other row for gpunn's 59,000-sample split of MNIST). Decided per
// chunk from its address: a test once per launch would be loop-invariant, and the compiler then made one copy of
// the whole tile loop per case.
__device__ __forceinline__ void sp_load_chunk(const unsigned char* src, long long left, unsigned (&w)[4]) {
    w[0] = w[1] = w[2] = w[3] = 0u;
    if (left <= 0) return;
    const unsigned long long address = (unsigned long long)src;
    if (left >= 16 && (address & 15) == 0) {
        const SpWords16 v = *reinterpret_cast<const SpWords16*>(src);
        for (int q = 0; q < 4; ++q) w[q] = v.w[q];
    } else if (left >= 16 && (address & 7) == 0) {
        for (int q = 0; q < 2; ++q) {
            const SpWords8 v = *reinterpret_cast<const SpWords8*>(src + 8 * q);
            w[2 * q] = v.w[0];
            w[2 * q + 1] = v.w[1];
        }
    } else {
        const SpWords16 v = sp_load_narrow(src, left);
        for (int q = 0; q < 4; ++q) w[q] = v.w[q];
    }
}

// Issue the loads of tile `tile` into the registers `pre`: chunk c = threadIdx.x + blockDim.x * i is half c & 1 of
// pixel row c >> 1. The values are first used after the current tile's work, so the loads' latency is hidden.
__device__ __forceinline__ void sp_fetch(const unsigned char* X, int m, int n0, int tile,
                                         unsigned (&pre)[SP_PREFETCH][4]) {
#pragma unroll
    for (int i = 0; i < SP_PREFETCH; ++i) {
        const int c = threadIdx.x + blockDim.x * i;
        if (c < 2 * n0) {
            const long long p = c >> 1, j = (long long)tile * SP_TILE + 16 * (c & 1);
            sp_load_chunk(X + p * m + j, (long long)m - j, pre[i]);
        }
    }
}

template <typename T, int HP>
__device__ void single_pass(const unsigned char* X, const long long* y, int n0, int m, int h, int classes,
                            const T* P, const T* W1T, T* part, double* losses) {
    constexpr int HP4 = (HP + 3) / 4 * 4;  // W1T's and dZ1's row length: 16-byte rows
    __shared__ SpShared<T> sh;
    const int tid = threadIdx.x, threads = blockDim.x;
    const int C = classes;
    const T* W2 = P + (long long)h * n0;  // the flat layout [W1, W2, b1, b2]
    const T* b1 = W2 + C * h;
    const T* b2 = b1 + h;
    const int n_small = C * h + h + C;                        // dW2, db1, db2
    const int leftover = max(0, n0 - SP_OWNED * threads);    // pixels whose dW1 is kept in shared memory
    const int n_kept = n_small + leftover * h;
    const int tiles = (m + SP_TILE - 1) / SP_TILE;
    T* const exch = reinterpret_cast<T*>(sh.scratch);
    T* const A1s = reinterpret_cast<T*>(sh.scratch);   // [t][HP4]
    T* const dZ1s = A1s + SP_TILE * HP4;               // [t][HP4]
    T* const Z2s = dZ1s + SP_TILE * HP4;               // [t][SP_MAX_CLASSES]: Z2, then dZ2 in place

    T acc[SP_OWNED][HP];  // this thread's dW1 sums: pixels tid + threads * r, all units
#pragma unroll
    for (int r = 0; r < SP_OWNED; ++r)
#pragma unroll
        for (int k = 0; k < HP; ++k) acc[r][k] = T(0);
    for (int i = tid; i < n_kept; i += threads) sh.small[i] = T(0);  // read and written by thread i only
    double loss = 0.0, hits = 0.0;  // of the samples t = tid, tid + blockDim.x, ... of each tile

    unsigned pre[SP_PREFETCH][4];
    if ((int)blockIdx.x < tiles) sp_fetch(X, m, n0, blockIdx.x, pre);

    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int j0 = tile * SP_TILE;
        const int valid = min(SP_TILE, m - j0);

        // load: the prefetched chunks into xs (swizzled) and their zero flags; the labels
#pragma unroll
        for (int i = 0; i < SP_PREFETCH; ++i) {
            const int c = tid + threads * i;
            if (c < 2 * n0) {
                const int p = c >> 1, half = c & 1, swizzle = (p >> 2) & 7;
#pragma unroll
                for (int q = 0; q < 4; ++q) sh.xs[p * 8 + ((4 * half + q) ^ swizzle)] = pre[i][q];
                sh.nz[c] = (pre[i][0] | pre[i][1] | pre[i][2] | pre[i][3]) != 0u;
            }
        }
        for (int t = tid; t < SP_TILE; t += threads) sh.ys[t] = t < valid ? y[j0 + t] : 0;
        __syncthreads();

        // list: count each group's nonzero pixels, then write the list in order from the groups' offsets
        const int groups = (n0 + SP_GROUP - 1) / SP_GROUP;
        if (tid < groups) {
            int n = 0;
#pragma unroll
            for (int q = 0; q < SP_GROUP; ++q) {
                const int p = tid * SP_GROUP + q;
                if (p < n0) n += (sh.nz[2 * p] | sh.nz[2 * p + 1]) != 0;
            }
            sh.counts[tid] = n;
        }
        __syncthreads();
        if (tid < groups) {
            int at = 0;
#pragma unroll
            for (int g = 0; g < SP_MAX_GROUPS; ++g) {
                if (g < tid) at += sh.counts[g];
            }
#pragma unroll
            for (int q = 0; q < SP_GROUP; ++q) {
                const int p = tid * SP_GROUP + q;
                if (p < n0 && (sh.nz[2 * p] | sh.nz[2 * p + 1])) {
                    sh.list[at++] = (unsigned short)(p * 8 + ((p >> 2) & 7));
                }
            }
            if (tid == groups - 1) sh.count = at;
        }
        __syncthreads();

        // forward: slice s, thread g: samples 2g and 2g + 1, every unit, over the slice's share of the list
        const int slices = threads / SP_SLICE, s = tid / SP_SLICE, g = tid % SP_SLICE;
        T a0[HP], a1[HP];
#pragma unroll
        for (int k = 0; k < HP; ++k) a0[k] = a1[k] = T(0);
        const int count = sh.count;
        const int shift = 16 * (g & 1);  // samples 2g, 2g + 1: bytes 2 (g & 1) and 2 (g & 1) + 1 of word g >> 1
        for (int i = s; i < count; i += slices) {
            const int entry = sh.list[i];
            const unsigned word = sh.xs[entry ^ (g >> 1)] >> shift;
            const T x0 = (T)(word & 0xFFu), x1 = (T)((word >> 8) & 0xFFu);
            const T* w = W1T + (entry >> 3) * HP4;
#pragma unroll
            for (int k4 = 0; k4 < HP4; k4 += 4) {
                T v[4];
                sp_load4(w + k4, v);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    if (k4 + q < HP) {
                        a0[k4 + q] += v[q] * x0;
                        a1[k4 + q] += v[q] * x1;
                    }
                }
            }
        }
        // the slices' sums, pairwise in a fixed order: in each round the last `w` slices hand theirs to the
        // `w` before them (w limited by scratch's size), until slice 0 holds the tile's sums
        constexpr int per_slot = 2 * HP * SP_SLICE;
        for (int n = slices; n > 1;) {
            const int w = min(n / 2, SpExchange<T, HP>::slots);
            if (s >= n - w && s < n) {
                T* slot = exch + (s - (n - w)) * per_slot;
#pragma unroll
                for (int k = 0; k < HP; ++k) {
                    slot[k * SP_SLICE + g] = a0[k];
                    slot[(HP + k) * SP_SLICE + g] = a1[k];
                }
            }
            __syncthreads();
            if (s >= n - 2 * w && s < n - w) {
                const T* slot = exch + (s - (n - 2 * w)) * per_slot;
#pragma unroll
                for (int k = 0; k < HP; ++k) {
                    a0[k] += slot[k * SP_SLICE + g];
                    a1[k] += slot[(HP + k) * SP_SLICE + g];
                }
            }
            // the next round's writes, or A1 below (the same memory), wait for this round's reads
            __syncthreads();
            n -= w;
        }
        // the next tile's pixels: loaded while this tile's output layer and dW1 are computed
        if (tile + (int)gridDim.x < tiles) sp_fetch(X, m, n0, tile + gridDim.x, pre);
        if (s == 0) {
#pragma unroll
            for (int k = 0; k < HP4; ++k) {
                // NaN stays NaN (as in bias_relu), so that a diverging run shows
                T z0 = T(0), z1 = T(0);
                if (k < h) {
                    const T bias = b1[k];
                    z0 = a0[k < HP ? k : 0] / T(255) + bias;
                    z1 = a1[k < HP ? k : 0] / T(255) + bias;
                }
                A1s[(2 * g) * HP4 + k] = z0 < T(0) ? T(0) : z0;
                A1s[(2 * g + 1) * HP4 + k] = z1 < T(0) ? T(0) : z1;
            }
        }
        __syncthreads();

        // output layer: Z2[t][c] = sum_k W2[c][k] A1[t][k] + b2[c]
        for (int i = tid; i < SP_TILE * C; i += threads) {
            const int t = i % SP_TILE, c = i / SP_TILE;
            T z = T(0);
#pragma unroll
            for (int k = 0; k < HP; ++k) {
                if (k < h) z += W2[c * h + k] * A1s[t * HP4 + k];
            }
            Z2s[t * SP_MAX_CLASSES + c] = z + b2[c];
        }
        __syncthreads();

        // softmax, loss, hit and dZ2 = P - onehot(y), in place, one thread per sample (thread t % blockDim.x: a block
        // of 16 takes two); zero for samples past m. A label outside 0..C-1 makes the loss NaN (and its dZ2 is P,
        // as one_hot gives no 1 for it).
        for (int t = tid; t < SP_TILE; t += threads) {
            T* z = Z2s + t * SP_MAX_CLASSES;
            if (t < valid) {
                T top = z[0];
                int predicted = 0;
#pragma unroll 4
                for (int c = 1; c < SP_MAX_CLASSES; ++c) {
                    if (c < C && z[c] > top) {  // strictly greater: the first maximum wins, as NumPy's argmax
                        top = z[c];
                        predicted = c;
                    }
                }
                T sum = T(0);
#pragma unroll 4
                for (int c = 0; c < SP_MAX_CLASSES; ++c) {
                    if (c < C) sum += g_exp(z[c] - top);
                }
                const long long label = sh.ys[t];
                const bool known = label >= 0 && label < C;
                if (known) {
                    loss += (double)(g_log(sum) - (z[label] - top));
                    hits += predicted == label ? 1.0 : 0.0;
                } else {
                    loss += g_nan();
                }
#pragma unroll 4
                for (int c = 0; c < SP_MAX_CLASSES; ++c) {
                    if (c < C) z[c] = g_exp(z[c] - top) / sum - (known && c == label ? T(1) : T(0));
                }
            } else {
                for (int c = 0; c < C; ++c) z[c] = T(0);
            }
        }
        __syncthreads();

        // dZ1[t][k] = (sum_c W2[c][k] dZ2[t][c]) * (A1[t][k] > 0): multiplied by the mask, not replaced, so that a
        // NaN or infinite delta stays visible (gpunn.nn.relu_backward); zero for padded units and samples past m
        for (int i = tid; i < SP_TILE * HP4; i += threads) {
            const int t = i % SP_TILE, k = i / SP_TILE;
            T d = T(0);
            if (k < h && t < valid) {
#pragma unroll 4
                for (int c = 0; c < SP_MAX_CLASSES; ++c) {
                    if (c < C) d += W2[c * h + k] * Z2s[t * SP_MAX_CLASSES + c];
                }
                d = d * (A1s[t * HP4 + k] > T(0) ? T(1) : T(0));
            }
            dZ1s[t * HP4 + k] = d;
        }
        __syncthreads();

        // dW1: each of the thread's pixels in turn, 4 samples (one word of xs) at a time. A pixel that is zero in the
        // whole tile adds nothing and is skipped; the threads of a warp hold 32 consecutive pixels, so whole warps
        // skip the image's empty top and bottom rows. (Taking the pixels inside the sample loop would share each
        // dZ1 load between them, but costs a branch per sample and pixel and skips nothing.)
#pragma unroll
        for (int r = 0; r < SP_OWNED; ++r) {
            const int p = tid + threads * r;
            if (p < n0 && (sh.nz[2 * p] | sh.nz[2 * p + 1])) {
                const unsigned* row = sh.xs + p * 8;
                const int swizzle = (p >> 2) & 7;
#pragma unroll 2
                for (int w = 0; w < SP_TILE / 4; ++w) {
                    const unsigned word = row[w ^ swizzle];
#pragma unroll
                    for (int b = 0; b < 4; ++b) {
                        T d[4];
                        const T x = (T)((word >> (8 * b)) & 0xFFu);
#pragma unroll
                        for (int k4 = 0; k4 < HP4; k4 += 4) {
                            sp_load4(dZ1s + (4 * w + b) * HP4 + k4, d);
#pragma unroll
                            for (int q = 0; q < 4; ++q) {
                                if (k4 + q < HP) acc[r][k4 + q] += d[q] * x;
                            }
                        }
                    }
                }
            }
        }

        // dW2, db1, db2 and the leftover pixels' dW1: thread i sums over the tile's samples in order and adds to its
        // running sum
        for (int i = tid; i < n_kept; i += threads) {
            T sum = T(0);
            if (i >= n_small) {
                const int p = SP_OWNED * threads + (i - n_small) / h, k = (i - n_small) % h;
                if (sh.nz[2 * p] | sh.nz[2 * p + 1]) {
#pragma unroll 8
                    for (int t = 0; t < SP_TILE; ++t) {
                        const unsigned word = sh.xs[p * 8 + ((t >> 2) ^ ((p >> 2) & 7))];
                        sum += dZ1s[t * HP4 + k] * (T)((word >> (8 * (t & 3))) & 0xFFu);
                    }
                }
            } else if (i < C * h) {
                const int c = i / h, k = i % h;
#pragma unroll 4
                for (int t = 0; t < SP_TILE; ++t) sum += Z2s[t * SP_MAX_CLASSES + c] * A1s[t * HP4 + k];
            } else if (i < C * h + h) {
                const int k = i - C * h;
#pragma unroll 4
                for (int t = 0; t < SP_TILE; ++t) sum += dZ1s[t * HP4 + k];
            } else {
                const int c = i - C * h - h;
#pragma unroll 4
                for (int t = 0; t < SP_TILE; ++t) sum += Z2s[t * SP_MAX_CLASSES + c];
            }
            sh.small[i] += sum;
        }
        // the next tile overwrites xs, the flags, the list and scratch
        __syncthreads();
    }

    // the block's row of partial sums, in the flat layout (dW1 still in pixel units)
    const long long n_total = (long long)h * n0 + n_small;
    T* out = part + (long long)blockIdx.x * n_total;
#pragma unroll
    for (int r = 0; r < SP_OWNED; ++r) {
        const int p = tid + threads * r;
        if (p < n0) {
#pragma unroll
            for (int k = 0; k < HP; ++k) {
                if (k < h) out[(long long)k * n0 + p] = acc[r][k];
            }
        }
    }
    for (int i = tid; i < n_kept; i += threads) {
        if (i < n_small) {
            out[(long long)h * n0 + i] = sh.small[i];
        } else {
            const int p = SP_OWNED * threads + (i - n_small) / h, k = (i - n_small) % h;
            out[(long long)k * n0 + p] = sh.small[i];
        }
    }
    double* slots = reinterpret_cast<double*>(sh.scratch);
    loss = block_sum(loss, slots);
    hits = block_sum(hits, slots);
    if (tid == 0) {
        losses[blockIdx.x] = loss;
        losses[gridDim.x + blockIdx.x] = hits;
    }
}

// W1T[p][k] = W1[k][p] for k < h, 0 for h <= k < hp4: the forward pass reads one pixel's weights as hp4 / 4
// 16-byte loads. W1 is the first h * n0 entries of the flat parameters P. Runs before each pass (the update
// changes W1 in place).
template <typename T>
__device__ void single_pass_prepare(const T* P, int n0, int h, int hp4, T* W1T) {
    const long long size = (long long)n0 * hp4;
    for (long long i = grid_first(); i < size; i += grid_stride()) {
        const long long p = i / hp4, k = i % hp4;
        W1T[i] = k < h ? P[k * n0 + p] : T(0);
    }
}

// G[i] = sum over b = 0 .. blocks-1 of part[b][i], divided by 255 for the first n_w1 entries (dW1, summed in
// pixel units). Each block takes `width` = min(32, blockDim.x) consecutive entries; the blockDim.x / width lanes of
// a column add the rows lane, lane + lanes, ... in order, in double, and then the lanes' sums pairwise in a fixed
// tree: the same bits every run for the same launch.
//
// A lane's rows are read SP_REDUCE_LOADS at a time, all loads issued before the first add: on an H200 (264 rows
// of 8,070 sums for 784-10-10) the loop of one load and one add per row took 18 us under ncu, a load's latency per
// row; the additions keep their order, so the bits are those of the one-at-a-time loop.
#define SP_REDUCE_LOADS 8
template <typename T>
__device__ void single_pass_reduce(const T* part, int blocks, long long n_total, long long n_w1, T* G) {
    __shared__ double sums[GPUNN_MAX_BLOCK];
    const int width = blockDim.x < 32 ? blockDim.x : 32;
    const int lanes = blockDim.x / width;
    const int column = threadIdx.x % width, lane = threadIdx.x / width;
    for (long long first = (long long)blockIdx.x * width; first < n_total; first += (long long)gridDim.x * width) {
        const long long i = first + column;
        double sum = 0.0;
        if (i < n_total) {
            int b = lane;
            for (; b + (SP_REDUCE_LOADS - 1) * lanes < blocks; b += SP_REDUCE_LOADS * lanes) {
                T rows[SP_REDUCE_LOADS];
#pragma unroll
                for (int q = 0; q < SP_REDUCE_LOADS; ++q) rows[q] = part[(long long)(b + q * lanes) * n_total + i];
#pragma unroll
                for (int q = 0; q < SP_REDUCE_LOADS; ++q) sum += (double)rows[q];
            }
            for (; b < blocks; b += lanes) sum += (double)part[(long long)b * n_total + i];
        }
        // Each thread writes only its own slot, and after the tree below a thread reads only its own (lane 0's
        // is sums[column]): so the previous round needs no barrier here, only this round's readers do.
        sums[threadIdx.x] = sum;
        __syncthreads();
        for (int stride = lanes / 2; stride > 0; stride >>= 1) {
            if (lane < stride) sums[threadIdx.x] += sums[threadIdx.x + stride * width];
            // the next round reads what this round wrote
            __syncthreads();
        }
        if (lane == 0 && i < n_total) G[i] = (T)(i < n_w1 ? sums[column] / 255.0 : sums[column]);
    }
}

// The exported kernels. single_pass_hHP_T: hidden layers of HP - 1 or HP units (an odd h runs with one padded
// unit whose weights are zero), written out one by one: gpunn.fused_cuda and the emulator find the exported kernels
// by reading their declarations in this text, so a macro would hide them.
extern "C" __global__ void single_pass_prepare_f32(const float* P, int n0, int h, int hp4, float* W1T) {
    single_pass_prepare<float>(P, n0, h, hp4, W1T);
}
extern "C" __global__ void single_pass_prepare_f64(const double* P, int n0, int h, int hp4, double* W1T) {
    single_pass_prepare<double>(P, n0, h, hp4, W1T);
}

extern "C" __global__ void single_pass_reduce_f32(const float* part, int blocks, long long n_total, long long n_w1,
                                                  float* G) {
    single_pass_reduce<float>(part, blocks, n_total, n_w1, G);
}
extern "C" __global__ void single_pass_reduce_f64(const double* part, int blocks, long long n_total,
                                                  long long n_w1, double* G) {
    single_pass_reduce<double>(part, blocks, n_total, n_w1, G);
}

// Which hidden sizes' passes a compilation holds: every one by default (the tests' builds, the emulator), or only
// SP_ONLY_HP's (0: none; prepare and reduce are always there). gpunn.fused_cuda compiles each module it loads for
// one size: NVRTC takes 9.4 s for the whole file for sm_90, 1.3 s with one size's two passes (benchmarks/
// cuda_compile.py, on the 2-core development machine), and a first run on a machine waits for it. The host still
// finds every kernel in this text.
#ifdef SP_ONLY_HP
#define SP_BUILDS(hp) (SP_ONLY_HP == (hp))
#else
#define SP_BUILDS(hp) 1
#endif

// Launch bounds, declared apart inside braces (the host finds kernels by their unbraced definitions below): at
// most 256 threads, and for float32 with up to 14 hidden units two blocks per SM, i.e. at most 128 registers per
// thread (ptxas 13.0 for sm_90 then spills a few loop-invariant values, none inside the inner loops; at 16 units it
// would spill inside the dW1 loop). float64 and 16 units: one block per SM, up to 255 registers, no spills.
extern "C" {
#if SP_BUILDS(2)
__global__ void __launch_bounds__(256, 2) single_pass_h2_f32(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const float* P, const float* W1T, float* part, double* losses);
__global__ void __launch_bounds__(256, 1) single_pass_h2_f64(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const double* P, const double* W1T, double* part, double* losses);
#endif
#if SP_BUILDS(4)
__global__ void __launch_bounds__(256, 2) single_pass_h4_f32(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const float* P, const float* W1T, float* part, double* losses);
__global__ void __launch_bounds__(256, 1) single_pass_h4_f64(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const double* P, const double* W1T, double* part, double* losses);
#endif
#if SP_BUILDS(6)
__global__ void __launch_bounds__(256, 2) single_pass_h6_f32(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const float* P, const float* W1T, float* part, double* losses);
__global__ void __launch_bounds__(256, 1) single_pass_h6_f64(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const double* P, const double* W1T, double* part, double* losses);
#endif
#if SP_BUILDS(8)
__global__ void __launch_bounds__(256, 2) single_pass_h8_f32(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const float* P, const float* W1T, float* part, double* losses);
__global__ void __launch_bounds__(256, 1) single_pass_h8_f64(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const double* P, const double* W1T, double* part, double* losses);
#endif
#if SP_BUILDS(10)
__global__ void __launch_bounds__(256, 2) single_pass_h10_f32(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const float* P, const float* W1T, float* part, double* losses);
__global__ void __launch_bounds__(256, 1) single_pass_h10_f64(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const double* P, const double* W1T, double* part, double* losses);
#endif
#if SP_BUILDS(12)
__global__ void __launch_bounds__(256, 2) single_pass_h12_f32(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const float* P, const float* W1T, float* part, double* losses);
__global__ void __launch_bounds__(256, 1) single_pass_h12_f64(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const double* P, const double* W1T, double* part, double* losses);
#endif
#if SP_BUILDS(14)
__global__ void __launch_bounds__(256, 2) single_pass_h14_f32(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const float* P, const float* W1T, float* part, double* losses);
__global__ void __launch_bounds__(256, 1) single_pass_h14_f64(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const double* P, const double* W1T, double* part, double* losses);
#endif
#if SP_BUILDS(16)
__global__ void __launch_bounds__(256, 1) single_pass_h16_f32(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const float* P, const float* W1T, float* part, double* losses);
__global__ void __launch_bounds__(256, 1) single_pass_h16_f64(const unsigned char* X, const long long* y, int n0, int m,
    int h, int classes, const double* P, const double* W1T, double* part, double* losses);
#endif
}

#if SP_BUILDS(2)
extern "C" __global__ void single_pass_h2_f32(const unsigned char* X, const long long* y, int n0, int m, int h,
                                              int classes, const float* P, const float* W1T, float* part,
                                              double* losses) {
    single_pass<float, 2>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
extern "C" __global__ void single_pass_h2_f64(const unsigned char* X, const long long* y, int n0, int m, int h,
                                              int classes, const double* P, const double* W1T, double* part,
                                              double* losses) {
    single_pass<double, 2>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
#endif
#if SP_BUILDS(4)
extern "C" __global__ void single_pass_h4_f32(const unsigned char* X, const long long* y, int n0, int m, int h,
                                              int classes, const float* P, const float* W1T, float* part,
                                              double* losses) {
    single_pass<float, 4>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
extern "C" __global__ void single_pass_h4_f64(const unsigned char* X, const long long* y, int n0, int m, int h,
                                              int classes, const double* P, const double* W1T, double* part,
                                              double* losses) {
    single_pass<double, 4>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
#endif
#if SP_BUILDS(6)
extern "C" __global__ void single_pass_h6_f32(const unsigned char* X, const long long* y, int n0, int m, int h,
                                              int classes, const float* P, const float* W1T, float* part,
                                              double* losses) {
    single_pass<float, 6>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
extern "C" __global__ void single_pass_h6_f64(const unsigned char* X, const long long* y, int n0, int m, int h,
                                              int classes, const double* P, const double* W1T, double* part,
                                              double* losses) {
    single_pass<double, 6>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
#endif
#if SP_BUILDS(8)
extern "C" __global__ void single_pass_h8_f32(const unsigned char* X, const long long* y, int n0, int m, int h,
                                              int classes, const float* P, const float* W1T, float* part,
                                              double* losses) {
    single_pass<float, 8>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
extern "C" __global__ void single_pass_h8_f64(const unsigned char* X, const long long* y, int n0, int m, int h,
                                              int classes, const double* P, const double* W1T, double* part,
                                              double* losses) {
    single_pass<double, 8>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
#endif
#if SP_BUILDS(10)
extern "C" __global__ void single_pass_h10_f32(const unsigned char* X, const long long* y, int n0, int m, int h,
                                               int classes, const float* P, const float* W1T, float* part,
                                               double* losses) {
    single_pass<float, 10>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
extern "C" __global__ void single_pass_h10_f64(const unsigned char* X, const long long* y, int n0, int m, int h,
                                               int classes, const double* P, const double* W1T, double* part,
                                               double* losses) {
    single_pass<double, 10>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
#endif
#if SP_BUILDS(12)
extern "C" __global__ void single_pass_h12_f32(const unsigned char* X, const long long* y, int n0, int m, int h,
                                               int classes, const float* P, const float* W1T, float* part,
                                               double* losses) {
    single_pass<float, 12>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
extern "C" __global__ void single_pass_h12_f64(const unsigned char* X, const long long* y, int n0, int m, int h,
                                               int classes, const double* P, const double* W1T, double* part,
                                               double* losses) {
    single_pass<double, 12>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
#endif
#if SP_BUILDS(14)
extern "C" __global__ void single_pass_h14_f32(const unsigned char* X, const long long* y, int n0, int m, int h,
                                               int classes, const float* P, const float* W1T, float* part,
                                               double* losses) {
    single_pass<float, 14>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
extern "C" __global__ void single_pass_h14_f64(const unsigned char* X, const long long* y, int n0, int m, int h,
                                               int classes, const double* P, const double* W1T, double* part,
                                               double* losses) {
    single_pass<double, 14>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
#endif
#if SP_BUILDS(16)
extern "C" __global__ void single_pass_h16_f32(const unsigned char* X, const long long* y, int n0, int m, int h,
                                               int classes, const float* P, const float* W1T, float* part,
                                               double* losses) {
    single_pass<float, 16>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
extern "C" __global__ void single_pass_h16_f64(const unsigned char* X, const long long* y, int n0, int m, int h,
                                               int classes, const double* P, const double* W1T, double* part,
                                               double* losses) {
    single_pass<double, 16>(X, y, n0, m, h, classes, P, W1T, part, losses);
}
#endif
