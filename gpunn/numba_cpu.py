"""The CPU single pass: one compiled Numba kernel per step that reads each sample's uint8 pixels once.

Two kernels compute it. This module's holds hidden units in its vectors' lanes and runs mini-batches and wide layers;
:mod:`gpunn.numba_narrow`'s holds samples in the lanes and runs full batches through a narrow hidden layer (784-10-10
among them). :class:`SinglePassCpu` picks between them per step; this docstring describes this module's kernel.

For a network n0-h-C with one ReLU hidden layer and a softmax output (MNIST: 784-h-10), one call of the kernel
computes what :func:`gpunn.nn.loss_and_gradients` computes (loss, accuracy, dW1, db1, dW2, db2) from the raw pixels,
tile by tile: for each tile of 8 samples, the pixels are read once and converted to floats, then the forward pass,
the softmax, the loss and hits, the deltas, and the tile's contributions to every gradient, while the tile is in
cache. The 1/255 is folded into the arithmetic: the products with X use the integer pixel values, Z1 is scaled once
per (unit, sample) and dW1 once per weight at the end.

Design, and why (measured on the 2-core development machine, Intel Xeon with AVX-512, shared with other work):

- **Vectors run over hidden units.** W1 is held transposed and padded, W1T (n0, hp) with hp = h rounded up to 16,
  so that one pixel's weights to 16 hidden units are one 64-byte vector. Z1[:, j] is a sum over pixels p of
  x[j, p] * W1T[p], and dW1T[p] += x[j, p] * dZ1[:, j] is a vector update per pixel: neither product needs a
  horizontal sum, and a pixel whose value is 0 can be left out of both without changing any other term.
- **Pixel-major over groups of eight samples.** For each pixel p, the row W1T[p] (and dW1T[p]) is loaded once and
  meets the eight samples' values: eight FMAs with eight independent sums, which hides the FMA latency. The loop is
  bound by loads (one broadcast value per FMA), so where h > 16 two hidden vectors share each broadcast (-16 % time
  at h = 64 and 256). Per-sample alternatives measured slower: a list of each sample's nonzero pixels with four
  partial sums per sample was 12 % faster at h = 10 but 30 % slower at h = 256, and needs a 29 MB index.
- **Zero blocks are skipped, exactly.** 81 % of MNIST's pixel values are 0, and 54 % of its (pixel, 8-sample) blocks
  are all zero. The sparse kernel visits, for each group, only the pixels that are nonzero in one of its eight
  samples (for a full-batch step from lists made once per training set by :func:`full_batch`, for a mini-batch from
  per-sample bit masks, :func:`samples_of`); the dense kernel visits every pixel, in the same order. A left-out term
  is x * w with x = 0, and adding it to a running sum never changes the sum (the sums start at +0 and never become
  -0), so the two give the same bits for finite weights and deltas. Both are one compiled function.
- **A full batch is summed in the order that leaves out most.** Its samples are sorted once, by where their ink
  lies (:func:`support_order`), and copied in that order, so that the eight samples of a group are alike: 32 % of
  the blocks are then not all zero, against 46 % in the files' order. In one interleaved run
  (benchmarks/results/intel-xeon-numba-single-pass.md) the same kernel summing in the files' order was 1.03x slower
  at h = 10 and 1.28x at h = 256. The copy is what makes it pay: read in place through the sorted order, the rows
  come from all over memory, and while building it that was slower than not sorting at all.
- **Sample-major pixels.** A tile is read as 8 rows of n0 contiguous bytes, so the kernel wants the samples as
  C-ordered rows (m, n0): the sorted copy for a full batch; for a mini-batch, X's own rows where X is the transposed
  view of an (m, n0) C-ordered array (strides (1, n0), the IDX files' own layout), read in place at the batch's
  sample numbers (gpunn's training loop hands a mini-batch over as such an index: ``reads_in_place``).
- **Explicit 512-bit vectors** (:mod:`gpunn.numba_vectors`: LLVM's auto-vectorizer on this host kept no sums in
  registers across the pixel loop, 7 GFLOP/s).
- **Parallel over chunks, deterministic.** A step's samples are split into one contiguous chunk per thread; each
  chunk has its own gradient sums, added in chunk order at the end. The result depends on the number of chunks, not
  on which thread runs which. The one prange loop is the only parallel region: the rest are explicit loops (an
  array expression in a parallel function would be a parallel region of its own).
- **One function for the whole chunk.** The helpers a chunk calls per group and per sample are inlined into it
  (Numba's ``inline="always"``) and no array view is made inside its loops: a call passes every array as a dozen
  words, and each view counts a reference atomically on a count both threads share (measured while building it:
  about 5 % of a 784-10-10 step).
- **Float accumulation in the training dtype**, as the generic math does; the loss is summed in float64.
- **Compiled once per dtype, on first use, cached on disk** (6.4-6.6 s cold, 0.3 s from the cache:
  ``python benchmarks/numba_single_pass.py --compile-times``); see :func:`needs_compile` and :func:`cache_dir`.
  A run whose steps use one thread (small mini-batches, one core) calls a kernel of its own that runs on the calling
  thread, compiled only for such runs (:func:`kernel_for`).

Measurements: benchmarks/numba_single_pass.py (and its --compile-times and --contention modes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numba import njit, prange
from threadpoolctl import threadpool_limits

from gpunn import numba_narrow
from gpunn.diagnostics import usable_cores
from gpunn.nn import Architecture, Layer
from gpunn.numba_vectors import (LANES, aligned_zeros, clear, cttz, enable_cache, half_squares, is_ready, read_only,
                                 sget, vadd, vadd_lane, vdiv, vexp, vfirst_max, vfma, vlane, vload, vload_u8, vmax,
                                 vpositive, vstore, vsub, vsum, vzero)

TILE = 8  #: samples per tile: its pixels as floats (25 KB for MNIST), activations and deltas stay in L1
GROUP = 8  #: samples whose terms meet each row of W1T and dW1T together (eight independent sums per row)
#: the least work worth a thread, in samples times hidden vectors (16 units): measured on 2 cores with random
#: mini-batches, a second thread started to pay at about 2,048 samples for h = 10 and 512 for h = 100 (the launch and
#: each chunk's fixed costs are tens of microseconds)
MIN_WORK_PER_THREAD = 1024


# --- threads ------------------------------------------------------------------------------------------------------


def _choose_threading_layer() -> None:
    """Use Numba's own workqueue threads unless the user chose a layer, before the first parallel call.

    Numba's default here is OpenMP (libgomp), whose idle workers spin after every parallel region. With one parallel
    region per step, measured 2-thread steps (benchmarks/numba_single_pass.py --contention) were as fast on OpenMP
    as on workqueue, alone and beside one or two busy processes, but OpenMP burned 5-30 % more CPU time per step
    spinning between steps, time that other processes on a shared machine lose. (The stalls of about a second seen
    earlier came with many small parallel regions per step, which this kernel does not have.) A passive OpenMP wait
    policy exists only as an environment variable (OMP_WAIT_POLICY), which a library must not set for its host
    process; the workqueue's threads sleep when idle. The workqueue does not allow two Python threads to launch
    parallel kernels at once; gpunn's training loop runs in one thread. Set in code, before the first launch, and
    only when neither NUMBA_THREADING_LAYER nor numba.config says otherwise; once a layer runs, it stays.
    """
    if _layer_chosen_elsewhere():
        return
    try:
        numba.threading_layer()  # raises ValueError until a layer has been launched
    except ValueError:
        numba.config.THREADING_LAYER = "workqueue"


def _layer_chosen_elsewhere() -> bool:
    """Did the user choose Numba's threading layer (NUMBA_THREADING_LAYER or numba.config)?"""
    return "NUMBA_THREADING_LAYER" in os.environ or numba.config.THREADING_LAYER != "default"


def threads_for(samples: int, hidden: int = LANES, cores: int | None = None) -> int:
    """The threads (and chunks) for a step over ``samples`` with ``hidden`` hidden units: at most one per usable core
    and per Numba thread, each with at least MIN_WORK_PER_THREAD of work."""
    available = min(usable_cores() if cores is None else cores, numba.config.NUMBA_NUM_THREADS)
    work = samples * -(-hidden // LANES)
    return max(1, min(available, work // MIN_WORK_PER_THREAD))


# --- the per-training-set index of nonzero pixels ----------------------------------------------------------------


def pixel_masks(rows: np.ndarray, block: int = 4096) -> np.ndarray:
    """Each sample's nonzero pixels as bits: mask[s, p // 64] has bit p % 64 set where rows[s, p] != 0.
    rows: (m, n0) uint8, any strides; mask: (m, ceil(n0 / 64)) uint64. NumPy, in blocks of samples."""
    m, n0 = rows.shape
    words = -(-n0 // 64)
    mask = np.zeros((m, words * 8), np.uint8)
    for first in range(0, m, block):
        packed = np.packbits(rows[first : first + block] != 0, axis=1, bitorder="little")
        mask[first : first + block, : packed.shape[1]] = packed
    return mask.view(np.uint64)


# --- the kernel ---------------------------------------------------------------------------------------------------
# Shapes: X has n0 pixels per sample, h hidden units padded to hp = nv * 16, C <= 16 classes padded to 16. Scratch
# that the caller owns and passes in, per chunk c (first index): D[c] (TILE, n0) the tile's pixels as floats,
# A1[c] and dZ1[c] (TILE, hp), P[c] (TILE, 16), pixels[c] (TILE // GROUP, n0) each group's pixel list, dW1T[c]
# (n0, hp), dW2T[c] (hp, 16), db1[c] (hp), db2[c] (16).


@njit
def _load_weights(W1, b1, W2, b2, W1T, W2p, W2T, b1p, b2p):
    """The step's weights in the kernel's layout. Padding (hidden units >= h, classes >= C) was set once, when the
    scratch was made: 0 in W1T, W2p, W2T and b1p, -inf in b2p (a class that is never the max and has exp 0). W1 is
    transposed in 16 x 16 blocks, which keeps both sides in cache lines (a small batch's step is mostly this)."""
    h, n0 = W1.shape
    C = W2.shape[0]
    for p0 in range(0, n0, LANES):
        for i0 in range(0, h, LANES):
            for p in range(p0, min(p0 + LANES, n0)):
                for i in range(i0, min(i0 + LANES, h)):
                    W1T[p, i] = W1[i, p]
    for i in range(h):
        b1p[i] = b1[i, 0]
    for c in range(C):
        for i in range(h):
            W2p[c, i] = W2[c, i]
            W2T[i, c] = W2[c, i]
        b2p[c] = b2[c, 0]


@njit(inline='always')
def _group_pixels(order, first, count, mask, pixels, start):
    """Fill pixels[start:] (ascending) with the pixels that are nonzero in one of the samples
    order[first : first + count]; return how many."""
    total = start
    for word in range(mask.shape[1]):
        bits = np.uint64(0)
        for k in range(count):
            bits |= mask[order[first + k], word]
        while bits != 0:
            pixels[total] = word * 64 + cttz(bits)
            total += 1
            bits &= bits - np.uint64(1)
    return total - start


@njit(inline='always')
def _relu_rows(j0, v, a0, a1, a2, a3, a4, a5, a6, a7, A1, b1p, inv255):
    """A1[j0 + k, v : v + 16] = relu(a_k / 255 + b1[v : v + 16]) for the eight samples."""
    hp = A1.shape[1]
    b = vload(b1p, v)
    a = j0 * hp + v
    z = vfma(a0, inv255, b)
    vstore(A1, a, vpositive(z, z))
    z = vfma(a1, inv255, b)
    vstore(A1, a + hp, vpositive(z, z))
    z = vfma(a2, inv255, b)
    vstore(A1, a + 2 * hp, vpositive(z, z))
    z = vfma(a3, inv255, b)
    vstore(A1, a + 3 * hp, vpositive(z, z))
    z = vfma(a4, inv255, b)
    vstore(A1, a + 4 * hp, vpositive(z, z))
    z = vfma(a5, inv255, b)
    vstore(A1, a + 5 * hp, vpositive(z, z))
    z = vfma(a6, inv255, b)
    vstore(A1, a + 6 * hp, vpositive(z, z))
    z = vfma(a7, inv255, b)
    vstore(A1, a + 7 * hp, vpositive(z, z))


@njit(inline='always')
def _forward_group(j0, pixels, first, count, D, W1T, b1p, A1, inv255):
    """A1[j] = relu(W1 x_j / 255 + b1) for the eight samples j0 .. j0 + 7 of the tile: for each listed pixel p, the
    row W1T[p] meets the eight samples' values D[j, p]. Each (sample, hidden vector) sum runs over the listed pixels
    in ascending order, one chain each (eight chains hide the FMA latency). Two hidden vectors at a time where there
    are two: each broadcast value then serves two FMAs (the loop is bound by loads, not FMAs)."""
    hp = W1T.shape[1]
    n0 = D.shape[1]
    f = j0 * n0
    v = 0
    while v + 2 * LANES <= hp:
        a0 = vzero(D)
        a1 = vzero(D)
        a2 = vzero(D)
        a3 = vzero(D)
        a4 = vzero(D)
        a5 = vzero(D)
        a6 = vzero(D)
        a7 = vzero(D)
        b0 = vzero(D)
        b1 = vzero(D)
        b2 = vzero(D)
        b3 = vzero(D)
        b4 = vzero(D)
        b5 = vzero(D)
        b6 = vzero(D)
        b7 = vzero(D)
        for q in range(first, first + count):
            p = np.intp(sget(pixels, q))
            w = vload(W1T, p * hp + v)
            u = vload(W1T, p * hp + v + LANES)
            x = sget(D, f + p)
            a0 = vfma(x, w, a0)
            b0 = vfma(x, u, b0)
            x = sget(D, f + n0 + p)
            a1 = vfma(x, w, a1)
            b1 = vfma(x, u, b1)
            x = sget(D, f + 2 * n0 + p)
            a2 = vfma(x, w, a2)
            b2 = vfma(x, u, b2)
            x = sget(D, f + 3 * n0 + p)
            a3 = vfma(x, w, a3)
            b3 = vfma(x, u, b3)
            x = sget(D, f + 4 * n0 + p)
            a4 = vfma(x, w, a4)
            b4 = vfma(x, u, b4)
            x = sget(D, f + 5 * n0 + p)
            a5 = vfma(x, w, a5)
            b5 = vfma(x, u, b5)
            x = sget(D, f + 6 * n0 + p)
            a6 = vfma(x, w, a6)
            b6 = vfma(x, u, b6)
            x = sget(D, f + 7 * n0 + p)
            a7 = vfma(x, w, a7)
            b7 = vfma(x, u, b7)
        _relu_rows(j0, v, a0, a1, a2, a3, a4, a5, a6, a7, A1, b1p, inv255)
        _relu_rows(j0, v + LANES, b0, b1, b2, b3, b4, b5, b6, b7, A1, b1p, inv255)
        v += 2 * LANES
    if v < hp:
        a0 = vzero(D)
        a1 = vzero(D)
        a2 = vzero(D)
        a3 = vzero(D)
        a4 = vzero(D)
        a5 = vzero(D)
        a6 = vzero(D)
        a7 = vzero(D)
        for q in range(first, first + count):
            p = np.intp(sget(pixels, q))
            w = vload(W1T, p * hp + v)
            a0 = vfma(sget(D, f + p), w, a0)
            a1 = vfma(sget(D, f + n0 + p), w, a1)
            a2 = vfma(sget(D, f + 2 * n0 + p), w, a2)
            a3 = vfma(sget(D, f + 3 * n0 + p), w, a3)
            a4 = vfma(sget(D, f + 4 * n0 + p), w, a4)
            a5 = vfma(sget(D, f + 5 * n0 + p), w, a5)
            a6 = vfma(sget(D, f + 6 * n0 + p), w, a6)
            a7 = vfma(sget(D, f + 7 * n0 + p), w, a7)
        _relu_rows(j0, v, a0, a1, a2, a3, a4, a5, a6, a7, A1, b1p, inv255)


@njit(inline='always')
def _head(j, label, A1, dZ1, P, W2p, W2T, b2p, dW2T, db1, db2, h, C):
    """Sample j of the tile, from its hidden activations A1[j] to dZ1[j]: Z2, softmax, loss and hit, dZ2 = P - Y,
    and its terms of dW2T, db2 and db1. Returns (its cross-entropy, 1 if predicted correctly else 0)."""
    hp = A1.shape[1]
    a = j * hp
    # Z2 = W2 A1 + b2 as four partial sums (a chain of h dependent FMAs would wait on each one's latency)
    q0 = vzero(A1)
    q1 = vzero(A1)
    q2 = vzero(A1)
    q3 = vzero(A1)
    h4 = h - h % 4
    for i in range(0, h4, 4):
        q0 = vfma(sget(A1, a + i), vload(W2T, i * LANES), q0)
        q1 = vfma(sget(A1, a + i + 1), vload(W2T, (i + 1) * LANES), q1)
        q2 = vfma(sget(A1, a + i + 2), vload(W2T, (i + 2) * LANES), q2)
        q3 = vfma(sget(A1, a + i + 3), vload(W2T, (i + 3) * LANES), q3)
    for i in range(h4, h):
        q0 = vfma(sget(A1, a + i), vload(W2T, i * LANES), q0)
    z2 = vadd(vload(b2p, 0), vadd(vadd(q0, q1), vadd(q2, q3)))
    # softmax from one max-subtracted exponential; loss = log(sum exp) - shifted z[y]
    top = vmax(z2)
    e = vexp(vsub(z2, top))
    total = vsum(e)
    loss = math.log(total) - (vlane(z2, label) - top)
    hit = 1 if vfirst_max(z2, top) == label else 0
    dz2 = vadd_lane(vdiv(e, total), label, -1.0)
    vstore(P, j * LANES, dz2)
    vstore(db2, 0, vadd(vload(db2, 0), dz2))
    for i in range(h):
        vstore(dW2T, i * LANES, vfma(sget(A1, a + i), dz2, vload(dW2T, i * LANES)))
    # dZ1 = (W2^T dZ2) * relu'(Z1), relu'(Z1) = A1 > 0
    for v in range(0, hp, LANES):
        acc = vzero(A1)
        for c in range(C):
            acc = vfma(sget(P, j * LANES + c), vload(W2p, c * hp + v), acc)
        dz1 = vpositive(vload(A1, a + v), acc)
        vstore(dZ1, a + v, dz1)
        vstore(db1, v, vadd(vload(db1, v), dz1))
    return loss, hit


@njit(inline='always')
def _backward_group(j0, pixels, first, count, D, dZ1, dW1T):
    """dW1T[p] += sum_j D[j, p] * dZ1[j] over the samples j0 .. j0 + 7, for the listed pixels: each row of dW1T is
    read and written once per group, and its eight terms are added in sample order. Two hidden vectors at a time
    where there are two (each broadcast value serves two FMAs)."""
    hp = dW1T.shape[1]
    n0 = D.shape[1]
    f = j0 * n0
    v = 0
    while v < hp:
        two = v + 2 * LANES <= hp
        u = v + LANES if two else v  # with one vector left, the second half repeats the first and is not stored
        d0 = vload(dZ1, j0 * hp + v)
        d1 = vload(dZ1, (j0 + 1) * hp + v)
        d2 = vload(dZ1, (j0 + 2) * hp + v)
        d3 = vload(dZ1, (j0 + 3) * hp + v)
        d4 = vload(dZ1, (j0 + 4) * hp + v)
        d5 = vload(dZ1, (j0 + 5) * hp + v)
        d6 = vload(dZ1, (j0 + 6) * hp + v)
        d7 = vload(dZ1, (j0 + 7) * hp + v)
        e0 = vload(dZ1, j0 * hp + u)
        e1 = vload(dZ1, (j0 + 1) * hp + u)
        e2 = vload(dZ1, (j0 + 2) * hp + u)
        e3 = vload(dZ1, (j0 + 3) * hp + u)
        e4 = vload(dZ1, (j0 + 4) * hp + u)
        e5 = vload(dZ1, (j0 + 5) * hp + u)
        e6 = vload(dZ1, (j0 + 6) * hp + u)
        e7 = vload(dZ1, (j0 + 7) * hp + u)
        if two:
            for q in range(first, first + count):
                p = np.intp(sget(pixels, q))
                g = vload(dW1T, p * hp + v)
                k = vload(dW1T, p * hp + u)
                x = sget(D, f + p)
                g = vfma(x, d0, g)
                k = vfma(x, e0, k)
                x = sget(D, f + n0 + p)
                g = vfma(x, d1, g)
                k = vfma(x, e1, k)
                x = sget(D, f + 2 * n0 + p)
                g = vfma(x, d2, g)
                k = vfma(x, e2, k)
                x = sget(D, f + 3 * n0 + p)
                g = vfma(x, d3, g)
                k = vfma(x, e3, k)
                x = sget(D, f + 4 * n0 + p)
                g = vfma(x, d4, g)
                k = vfma(x, e4, k)
                x = sget(D, f + 5 * n0 + p)
                g = vfma(x, d5, g)
                k = vfma(x, e5, k)
                x = sget(D, f + 6 * n0 + p)
                g = vfma(x, d6, g)
                k = vfma(x, e6, k)
                x = sget(D, f + 7 * n0 + p)
                g = vfma(x, d7, g)
                k = vfma(x, e7, k)
                vstore(dW1T, p * hp + v, g)
                vstore(dW1T, p * hp + u, k)
            v += 2 * LANES
        else:
            for q in range(first, first + count):
                p = np.intp(sget(pixels, q))
                g = vload(dW1T, p * hp + v)
                g = vfma(sget(D, f + p), d0, g)
                g = vfma(sget(D, f + n0 + p), d1, g)
                g = vfma(sget(D, f + 2 * n0 + p), d2, g)
                g = vfma(sget(D, f + 3 * n0 + p), d3, g)
                g = vfma(sget(D, f + 4 * n0 + p), d4, g)
                g = vfma(sget(D, f + 5 * n0 + p), d5, g)
                g = vfma(sget(D, f + 6 * n0 + p), d6, g)
                g = vfma(sget(D, f + 7 * n0 + p), d7, g)
                vstore(dW1T, p * hp + v, g)
            v += LANES


@njit
def _chunk(order, lo, hi, y, rows, mask, lists, list_start, W1T, b1p, W2p, W2T, b2p, D, A1, dZ1, P, pixels, dW1T,
           dW2T, db1, db2, h, C):
    """Samples order[lo:hi], tile by tile, into this chunk's gradient sums. Returns (sum of the samples'
    cross-entropies, number predicted correctly).

    The pixels each group of eight samples visits: with list_start of length 1, all of them (lists = 0 .. n0 - 1:
    the dense kernel); with one entry per group of the step plus one, group k's are lists[list_start[k] :
    list_start[k + 1]] (precomputed for a full-batch step); with an empty list_start, the group's nonzero pixels,
    found from the masks as the tile is read (a mini-batch). lo must be a multiple of GROUP."""
    hp = W1T.shape[1]
    n0 = rows.shape[1]
    n16 = n0 - n0 % LANES
    inv255 = 1.0 / 255.0
    clear(dW1T)
    clear(dW2T)
    clear(db1)
    clear(db2)
    loss = 0.0
    hits = 0
    groups = TILE // GROUP
    first = np.zeros(groups, np.int64)
    count = np.zeros(groups, np.int64)
    source = pixels.reshape(-1) if list_start.shape[0] == 0 else lists  # the pixel lists the groups read
    for t0 in range(lo, hi, TILE):
        n = min(TILE, hi - t0)
        # the tile's pixels as floats, read once. Rows n .. TILE - 1 keep finite values (earlier tiles', or zeros): a
        # short group computes them into rows of A1 that are not used, and adds them times zero rows of dZ1
        for j in range(n):
            s = order[t0 + j]
            for p in range(0, n16, LANES):
                vstore(D, j * n0 + p, vload_u8(rows, s * n0 + p, D))
            for p in range(n16, n0):
                D[j, p] = rows[s, p]
        for g in range((n + GROUP - 1) // GROUP):
            if list_start.shape[0] == 1:
                count[g] = n0
            elif list_start.shape[0] > 1:
                k = (t0 + g * GROUP) // GROUP
                first[g] = list_start[k]
                count[g] = list_start[k + 1] - first[g]
            else:
                first[g] = g * n0
                count[g] = _group_pixels(order, t0 + g * GROUP, min(GROUP, n - g * GROUP), mask, source, g * n0)
        for g in range((n + GROUP - 1) // GROUP):
            _forward_group(g * GROUP, source, first[g], count[g], D, W1T, b1p, A1, inv255)
        for j in range(n):
            l, k = _head(j, y[order[t0 + j]], A1, dZ1, P, W2p, W2T, b2p, dW2T, db1, db2, h, C)
            loss += l
            hits += k
        for j in range(n, (n + GROUP - 1) // GROUP * GROUP):
            for v in range(0, hp, LANES):
                vstore(dZ1, j * hp + v, vzero(dZ1))
        for g in range((n + GROUP - 1) // GROUP):
            _backward_group(g * GROUP, source, first[g], count[g], D, dZ1, dW1T)
    return loss, hits


@njit
def _finish(W1, W2, l2, m, scales, chunks, dW1T, dW2T, db1c, db2c, lossc, hitsc, dW1, db1, dW2, db2):
    """The chunks' sums added in chunk order, scaled, plus the L2 terms. scales: [1/m, 1/(255 m), l2/m] in the
    training dtype. Returns (loss, accuracy) as floats."""
    h, n0 = W1.shape
    C = W2.shape[0]
    total = dW1T[0].reshape(-1)
    for c in range(1, chunks):  # into chunk 0's sums, in chunk order
        part = dW1T[c].reshape(-1)
        for k in range(total.shape[0]):
            total[k] += part[k]
        for i in range(h):
            db1c[0, i] += db1c[c, i]
            for k in range(C):
                dW2T[0, i, k] += dW2T[c, i, k]
        for k in range(C):
            db2c[0, k] += db2c[c, k]
    loss = 0.0
    hits = 0
    for c in range(chunks):
        loss += lossc[c]
        hits += hitsc[c]
    for i0 in range(0, h, LANES):  # the transpose back, in 16 x 16 blocks
        for p0 in range(0, n0, LANES):
            for i in range(i0, min(i0 + LANES, h)):
                for p in range(p0, min(p0 + LANES, n0)):
                    dW1[i, p] = dW1T[0, p, i] * scales[1] + scales[2] * W1[i, p]
    for i in range(h):
        db1[i, 0] = db1c[0, i] * scales[0]
        for k in range(C):
            dW2[k, i] = dW2T[0, i, k] * scales[0] + scales[2] * W2[k, i]
    for k in range(C):
        db2[k, 0] = db2c[0, k] * scales[0]
    if l2 != 0.0:
        loss += l2 * half_squares(W1, W2)
    return loss / m, hits / m


@njit(parallel=True)
def _step(order, y, rows, mask, lists, list_start, W1, b1, W2, b2, l2, scales, chunks, W1T, W2p, W2T, b1p, b2p, D,
          A1, dZ1, P, pixels, dW1T, dW2T, db1c, db2c, lossc, hitsc, dW1, db1, dW2, db2):
    """One step over the samples ``order`` (see SinglePassCpu._arguments, and _chunk for lists and list_start): the
    chunks in parallel, then their sums. Chunks start at multiples of GROUP samples."""
    h = W1.shape[0]
    C = W2.shape[0]
    m = order.shape[0]
    _load_weights(W1, b1, W2, b2, W1T, W2p, W2T, b1p, b2p)
    for c in prange(chunks):
        lo = c * m // chunks // GROUP * GROUP
        hi = m if c == chunks - 1 else (c + 1) * m // chunks // GROUP * GROUP
        lossc[c], hitsc[c] = _chunk(order, lo, hi, y, rows, mask, lists, list_start, W1T, b1p, W2p, W2T, b2p, D[c],
                                    A1[c], dZ1[c], P[c], pixels[c], dW1T[c], dW2T[c], db1c[c], db2c[c], h, C)
    return _finish(W1, W2, l2, m, scales, chunks, dW1T, dW2T, db1c, db2c, lossc, hitsc, dW1, db1, dW2, db2)


@njit
def _step_on_one_thread(order, y, rows, mask, lists, list_start, W1, b1, W2, b2, l2, scales, chunks, W1T, W2p, W2T,
                        b1p, b2p, D, A1, dZ1, P, pixels, dW1T, dW2T, db1c, db2c, lossc, hitsc, dW1, db1, dW2, db2):
    """_step as one chunk on the calling thread (``chunks`` is 1), for a run whose steps do not pay for a second
    thread: launching a parallel region costs 50-125 us even for one chunk on one thread, 3x the work of a
    128-sample step (measured on the development machine, workqueue layer). A kernel of its own, compiled only for
    such runs: a branch in _step would compile the chunk's code twice, into _step and into its parallel region."""
    _load_weights(W1, b1, W2, b2, W1T, W2p, W2T, b1p, b2p)
    lossc[0], hitsc[0] = _chunk(order, 0, order.shape[0], y, rows, mask, lists, list_start, W1T, b1p, W2p, W2T, b2p,
                                D[0], A1[0], dZ1[0], P[0], pixels[0], dW1T[0], dW2T[0], db1c[0], db2c[0], W1.shape[0],
                                W2.shape[0])
    return _finish(W1, W2, l2, order.shape[0], scales, 1, dW1T, dW2T, db1c, db2c, lossc, hitsc, dW1, db1, dW2, db2)


enable_cache(_step)
enable_cache(_step_on_one_thread)


# --- Python side ----------------------------------------------------------------------------------------------------


def refusal(arch: Architecture, *, dropout: float = 0.0, dtype: str = "float32") -> str | None:
    """Why the single pass cannot compute this step, or None when it can."""
    if numba.config.DISABLE_JIT:
        # its vector operations are LLVM intrinsics: they exist only as compiled code
        return "the single CPU pass needs Numba's compiler, which NUMBA_DISABLE_JIT turns off"
    if arch.depth != 2:
        return f"the single CPU pass has exactly one hidden layer, not {arch.depth - 1} ({arch})"
    if arch.activation != "relu" or arch.output != "softmax":
        return f"the single CPU pass needs a ReLU hidden layer and a softmax output, not {arch}"
    if dropout:
        return "the single CPU pass has no dropout"
    if str(np.dtype(dtype)) not in ("float32", "float64"):
        return f"the single CPU pass computes in float32 or float64, not {dtype}"
    if arch.sizes[-1] > LANES or arch.sizes[0] > 2**16:
        return f"the single CPU pass handles at most {LANES} classes and 65,536 inputs, not {arch}"
    return None


def supports(arch: Architecture, *, dropout: float = 0.0, dtype: str = "float32") -> bool:
    """Can :class:`SinglePassCpu` compute this step? One ReLU hidden layer, softmax output (at most 16 classes), no
    dropout, float32 or float64."""
    return refusal(arch, dropout=dropout, dtype=dtype) is None


#: pixels per run in the coarse masks that order a full batch's samples (support_order)
SEGMENT = 16


def support_order(rows: np.ndarray, block: int = 4096) -> np.ndarray:
    """The samples of rows (m, n0) uint8 in the order a full-batch step sums them: sorted by their coarse masks, which
    say for each run of SEGMENT consecutive pixels whether one of them is nonzero, compared as binary numbers from
    the first run to the last (ties keep their order).

    A sum over samples may run in any order. This one puts samples whose ink lies in the same places side by side,
    so that more of the (pixel, 8-sample) blocks the kernel visits are all zero and left out: on MNIST 32 % of them
    are not all zero in this order, against 46 % in the files' order (sorting by the digits' bounding boxes, which
    needs the images' shape, left more)."""
    m, n0 = rows.shape
    runs = -(-n0 // SEGMENT)
    keys = np.zeros((m, -(-runs // 8)), np.uint8)
    for start in range(0, m, block):
        part = rows[start : start + block]
        nonzero = np.zeros((len(part), runs * SEGMENT), bool)
        nonzero[:, :n0] = part != 0
        keys[start : start + block] = np.packbits(nonzero.reshape(len(part), runs, SEGMENT).any(axis=2), axis=1)
    return np.lexsort(keys.T[::-1])  # lexsort's last key decides first: the first byte, whose top bit is run 0


@dataclass(frozen=True, eq=False)
class FullBatch:
    """What a full-batch step over a training set X (n0, m) of uint8 pixels reads; made once per X."""

    X: np.ndarray  # the array it was built from, to recognise it
    order: np.ndarray  # (m,) int64: X's samples in the order the step sums them (support_order)
    rows: np.ndarray  # (m, n0) uint8, C-contiguous: those samples' pixels in that order (a copy)
    positions: np.ndarray  # (m,) int64: 0 .. m - 1, the rows the step reads, in order
    lists: np.ndarray  # uint16: for each group of GROUP consecutive rows, its nonzero pixels, ascending
    list_start: np.ndarray  # (ceil(m / GROUP) + 1,) int64: group k's pixels are lists[list_start[k] : ...[k + 1]]

    @property
    def nonzero_blocks(self) -> float:
        """The fraction of (pixel, GROUP-sample) blocks of the step that are not all zero."""
        return len(self.lists) / max(1, len(self.list_start) - 1) / self.rows.shape[1]


@dataclass(frozen=True, eq=False)
class Samples:
    """What a step over chosen samples of X (n0, m) uint8 (a mini-batch) reads; made once per X."""

    X: np.ndarray  # the array it was built from, to recognise it
    rows: np.ndarray  # (m, n0) uint8, C-contiguous: X.T itself when X is a transposed (m, n0) array, else a copy
    mask: np.ndarray  # (m, ceil(n0 / 64)) uint64: each sample's nonzero pixels as bits (pixel_masks)


def _check_pixels(X: np.ndarray) -> None:
    if X.ndim != 2 or X.dtype != np.uint8:
        raise ValueError(f"the single CPU pass takes X as (n0, m) uint8 pixels, got {X.dtype} {X.shape}")


def full_batch(X: np.ndarray, *, sort: bool = True) -> FullBatch:
    """The full-batch index of X (n0, m) uint8: its samples in support_order (``sort=False``: in X's order, for
    measurements), copied into rows in that order, and the nonzero pixels of each group of GROUP consecutive rows
    (the (pixel, 8-sample) blocks that are not all zero)."""
    _check_pixels(X)
    samples = X.T  # (m, n0): each sample's pixels contiguous when X is the transposed view of the IDX rows
    order = support_order(samples) if sort else np.arange(samples.shape[0])
    rows = samples[order]
    m, n0 = rows.shape
    groups = -(-m // GROUP)
    mask = np.zeros((groups * GROUP, -(-n0 // 64)), np.uint64)
    mask[:m] = pixel_masks(rows)
    union = np.bitwise_or.reduce(mask.reshape(groups, GROUP, -1), axis=1)
    del mask
    # the lists in blocks of groups: np.nonzero's int64 indices for all of MNIST at once would take 40 MB for a moment
    counts, pieces = np.zeros(groups, np.int64), []
    for first in range(0, groups, 1024):
        bits = np.unpackbits(union[first : first + 1024].view(np.uint8), axis=1, bitorder="little")[:, :n0]
        group, pixels = np.nonzero(bits)
        counts[first : first + len(bits)] = np.bincount(group, minlength=len(bits))
        pieces.append(pixels.astype(np.uint16))
    list_start = np.zeros(groups + 1, np.int64)
    np.cumsum(counts, out=list_start[1:])
    lists = np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)
    return FullBatch(X, order, rows, np.arange(m, dtype=np.int64), lists, list_start)


def samples_of(X: np.ndarray) -> Samples:
    """The mini-batch index of X (n0, m) uint8: its samples as rows, their nonzero pixels as bits. X's fast layout is
    the transposed view of an (m, n0) C-ordered array (strides (1, n0)), used as is; an (n0, m) C-ordered X is
    copied once into rows."""
    _check_pixels(X)
    rows = np.ascontiguousarray(X.T)  # X.T itself when it is C-contiguous
    return Samples(X, rows, pixel_masks(rows))


class SinglePassCpu:
    """``loss_and_gradients`` for one run, as one compiled single pass per step over raw uint8 pixels.

    Made once with the network, the training dtype and the largest batch (``columns``), entered as a context manager
    for the run (it sets Numba's thread count, and restores it on exit), and called every step like
    :class:`gpunn.fused_cpu.FusedCpuPass`, but with X as the uint8 pixels (n0, m) (``pixels = True``); Y (one-hot)
    is accepted and not used; y: (m,) integer labels. With ``index`` (an integer array of sample numbers), the step is
    over those columns of X and y: a mini-batch, read in place (measured 10-30 % faster than gathering the batch into
    a new array and indexing that; gpunn's training loop hands mini-batches over this way, see ``reads_in_place``).

    Two kernels: a full-batch step through a narrow hidden layer (:func:`gpunn.numba_narrow.takes`: up to 28 units in
    float32, 12 in float64) runs :mod:`gpunn.numba_narrow`'s, samples in the vectors' lanes; every other step runs
    this module's, hidden units in the lanes (:attr:`full_batch_kernel` names the one a full batch runs).
    :meth:`prepare` builds what the steps over a training set read, once per X: for full-batch steps its pixels in the
    order the step sums them (support_order), laid out for the kernel (:func:`gpunn.numba_narrow.blocks_of`, or
    :func:`full_batch`); for mini-batches, its samples' bit masks (:func:`samples_of`).

    Mini-batches are read fastest from X.strides == (1, n0), the transposed view of the (m, n0) IDX rows, which is
    how gpunn's data split holds the training set; any other X is copied once. ``sparse=False`` runs the kernels
    densely (every pixel, the same order of sums, the same bits), for measurements and tests; ``sort=False`` sums a
    full batch in X's own order, and ``narrow`` (default: :func:`gpunn.numba_narrow.takes`) says which kernel a full
    batch runs (for measurements). ``threads``: at most this many (default: every usable core);
    :attr:`threads` is what a full step of ``columns`` samples uses, and smaller steps use fewer (see
    :func:`threads_for`).

    Measured on MNIST (m = 60,000, float32, the 2-core development machine): see the README's Performance section
    and benchmarks/results/intel-xeon-cpu.md. A cold compile takes a few seconds per kernel and dtype (and, for the
    narrow kernel, per hidden size), a cached one a fraction of a second.
    """

    pixels = True  # takes X as raw uint8 pixels, not floats
    reads_in_place = True  # takes a mini-batch as ``index=`` into the whole X (gpunn.train.batch_gradients)

    def __init__(self, arch: Architecture, dtype: str, columns: int, *, threads: int | None = None,
                 sparse: bool = True, sort: bool = True, narrow: bool | None = None) -> None:
        reason = refusal(arch, dtype=dtype)
        if reason is not None:
            raise ValueError(reason)
        _choose_threading_layer()
        self.arch = arch
        self.dtype = np.dtype(dtype)
        self.columns = columns
        self.sparse = sparse
        self.sort = sort
        self.threads = threads_for(columns, arch.sizes[1], threads)
        self._kernel = kernel_for(self.threads)
        if narrow is None:
            narrow = numba_narrow.takes(arch, dtype)
        self._narrow = numba_narrow.NarrowPass(arch, dtype, self.threads) if narrow else None
        n0, h, C = arch.sizes
        hp = -(-h // LANES) * LANES
        chunks, dt = self.threads, self.dtype
        # weights in the kernel's layout, with their padding set once (see _load_weights)
        self._W1T = aligned_zeros((n0, hp), dt)
        self._W2p = aligned_zeros((C, hp), dt)
        self._W2T = aligned_zeros((hp, LANES), dt)
        self._b1p = aligned_zeros(hp, dt)
        self._b2p = aligned_zeros(LANES, dt)
        self._b2p[:] = -np.inf
        # per chunk: the tile's buffers and the chunk's gradient sums. Zeros, not empty: the last group of a short
        # tile reads rows of D that hold finite values from earlier tiles, or these zeros
        self._D = aligned_zeros((chunks, TILE, n0), dt)
        self._A1 = aligned_zeros((chunks, TILE, hp), dt)
        self._dZ1 = aligned_zeros((chunks, TILE, hp), dt)
        self._pixels = np.zeros((chunks, TILE // GROUP, n0), np.uint16)
        self._all_pixels = np.arange(n0, dtype=np.uint16)
        self._P = aligned_zeros((chunks, TILE, LANES), dt)
        self._dW1T = aligned_zeros((chunks, n0, hp), dt)
        self._dW2T = aligned_zeros((chunks, hp, LANES), dt)
        self._db1 = aligned_zeros((chunks, hp), dt)
        self._db2 = aligned_zeros((chunks, LANES), dt)
        self._loss = np.zeros(chunks, np.float64)
        self._hits = np.zeros(chunks, np.int64)
        # what the steps read, made once per data set and kept by role (see _kept): the layouts of the training
        # pixels ("full", "narrow", "batches") and of the validation pixels ("validation"), and labels in their order
        self._layouts: dict[str, tuple[tuple[Any, ...], Any]] = {}
        self._labels: dict[str, tuple[tuple[Any, ...], np.ndarray]] = {}
        self._no_mask = np.zeros((0, 1), np.uint64)  # a full-batch step reads no masks
        self._checked_labels: list[np.ndarray] = []
        self._saved_threads: int | None = None
        self._blas: Any = None

    @property
    def full_batch_kernel(self) -> str:
        """Which kernel a full-batch step runs, in words."""
        return lanes_hold(narrow=self._narrow is not None)

    def prepare(self, X: np.ndarray, *, batches: bool = False) -> FullBatch | Samples | numba_narrow.Blocks:
        """Build (once per training set X) and keep what full-batch steps over X read, or with ``batches`` what steps
        over chosen samples of X read."""
        self._check_pixels(X)
        if batches:
            return self._kept(self._layouts, "batches", (X,), lambda: samples_of(X))
        if self._narrow is not None:
            return self._narrow_layout(X, "narrow")
        return self._kept(self._layouts, "full", (X,), lambda: full_batch(X, sort=self.sort))

    def _narrow_layout(self, X: np.ndarray, role: str) -> numba_narrow.Blocks:
        """X's layout for the narrow kernel (numba_narrow.blocks_of), kept under ``role``."""

        def make() -> numba_narrow.Blocks:
            samples = X.T
            order = support_order(samples) if self.sort else np.arange(samples.shape[0])
            return numba_narrow.blocks_of(samples, order, super_blocks=self._narrow.super_blocks,
                                          dense=not self.sparse)

        return self._kept(self._layouts, role, (X,), make)

    @staticmethod
    def _kept(store: dict[str, Any], role: str, sources: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        """store[role]'s value while it was made from these very ``sources`` (compared by identity), else ``make()``,
        kept in its place: a run's steps reuse what was built for its data, once. The old value goes first, so that
        two training sets' layouts are never held at once."""
        kept = store.get(role)
        if kept is None or any(a is not b for a, b in zip(kept[0], sources)):
            store.pop(role, None)
            kept = store[role] = (sources, make())
        return kept[1]

    def _check_pixels(self, X: np.ndarray) -> None:
        _check_pixels(X)
        if X.shape[0] != self.arch.sizes[0]:
            raise ValueError(f"X is {X.shape}; the network {self.arch} takes ({self.arch.sizes[0]}, m) pixels")

    def __enter__(self) -> SinglePassCpu:
        self._saved_threads = numba.get_num_threads()
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        # BLAS at one thread while the run lasts: the small products around the step (the validation pass) would
        # otherwise wake OpenBLAS's threads, which spin for about 0.1 s after each call and take the cores from the
        # kernel's threads (measured: 24 against 12 ms per 784-10-10 epoch on MNIST, 2 cores)
        self._blas = threadpool_limits(limits=1, user_api="blas")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._saved_threads is not None:
            numba.set_num_threads(self._saved_threads)
            self._saved_threads = None
        if self._blas is not None:
            self._blas.restore_original_limits()
            self._blas = None

    def __call__(self, params: Sequence[Layer], X: np.ndarray, Y: Any, y: np.ndarray, *, l2: float = 0.0,
                 dropout: float = 0.0, rng: Any = None, index: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[Layer]]:
        """The mean cross-entropy (with the L2 term), the accuracy, both 0-d arrays, and the gradients: what
        :func:`gpunn.nn.loss_and_gradients` returns for X / 255."""
        if dropout:
            raise ValueError("the single CPU pass has no dropout; the backend uses the generic code for it")
        self._check_pixels(X)
        m = X.shape[1] if index is None else len(index)
        if m > self.columns:
            raise ValueError(f"this pass was made for at most {self.columns} samples per step, got {m}")
        if m == 0:
            raise ValueError("a step needs at least one sample")
        self._check_labels(X, y)
        self._check_shapes(params)
        if index is None and self._narrow is not None:
            blocks = self.prepare(X)
            labels = self._kept(self._labels, "narrow", (y, blocks), lambda: self._narrow.labels(blocks, y))
            loss, accuracy, (dW1, db1, dW2, db2) = self._narrow(params, blocks, labels, l2)
        else:
            if index is None:
                full = self.prepare(X)
                dense = (self._all_pixels, np.zeros(1, np.int64))  # every pixel, for every group
                lists, list_start = (full.lists, full.list_start) if self.sparse else dense
                labels = self._kept(self._labels, "full", (y, full),
                                    lambda: np.ascontiguousarray(y[full.order], np.int64))
                batch = (full.positions, labels, full.rows, self._no_mask, lists, list_start)
            else:
                order = np.ascontiguousarray(index, dtype=np.int64)
                if order.min() < 0 or order.max() >= X.shape[1]:
                    raise ValueError(f"sample numbers must lie in 0..{X.shape[1] - 1}, got "
                                     f"{order.min()}..{order.max()}")
                samples = self.prepare(X, batches=True)
                # the dense kernel lists every pixel; the sparse one finds each group's from the masks
                list_start = np.zeros(1 if not self.sparse else 0, np.int64)
                batch = (order, y, samples.rows, samples.mask, self._all_pixels, list_start)
            args, (dW1, db1, dW2, db2) = self._arguments(params, *batch, l2)
            loss, accuracy = self._kernel(*args)
        return (np.asarray(loss, self.dtype), np.asarray(accuracy, self.dtype),
                [Layer(dW1, db1), Layer(dW2, db2)])

    def evaluate(self, params: Sequence[Layer], X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The mean cross-entropy (without the L2 term) and the accuracy of ``params`` on the uint8 pixels X (n0, m)
        / 255 with labels y, both 0-d arrays: the narrow kernel's forward pass alone, for a validation set (its
        layout made once per X). Only where the narrow kernel takes the network (:attr:`evaluates_pixels`)."""
        if self._narrow is None:
            raise ValueError(f"the single CPU pass evaluates with its narrow kernel, which does not take {self.arch} "
                             f"in {self.dtype}")
        self._check_pixels(X)
        if X.shape[1] == 0:
            raise ValueError("an evaluation needs at least one sample")
        self._check_labels(X, y)
        self._check_shapes(params)
        blocks = self._narrow_layout(X, "validation")
        labels = self._kept(self._labels, "validation", (y, blocks), lambda: self._narrow.labels(blocks, y))
        loss, accuracy = self._narrow.evaluate(params, blocks, labels)
        return np.asarray(loss, self.dtype), np.asarray(accuracy, self.dtype)

    @property
    def evaluates_pixels(self) -> bool:
        """Does :meth:`evaluate` run for this network and dtype?"""
        return self._narrow is not None

    def _check_labels(self, X: np.ndarray, y: np.ndarray) -> None:
        """The kernels read without bounds checks: what they index with is checked here, once per labels array (the
        training and the validation labels of a run)."""
        if any(y is checked for checked in self._checked_labels):
            return
        classes = self.arch.sizes[-1]
        if y.shape != (X.shape[1],) or len(y) and (y.min() < 0 or y.max() >= classes):
            raise ValueError(f"y must hold one label in 0..{classes - 1} per column of X ({X.shape[1]}), got "
                             f"{y.shape} {y.dtype}")
        self._checked_labels = [*self._checked_labels[-1:], y]

    def _check_shapes(self, params: Sequence[Layer]) -> None:
        expected = [(n_out, n_in) for n_in, n_out in zip(self.arch.sizes[:-1], self.arch.sizes[1:])]
        if [W.shape for W, _ in params] != expected or [b.shape for _, b in params] != [(n, 1) for n, _ in expected]:
            raise ValueError(f"the weights' shapes {[(W.shape, b.shape) for W, b in params]} are not {self.arch}'s")

    def _arguments(self, params: Sequence[Layer], order: np.ndarray, y: np.ndarray, rows: np.ndarray,
                   mask: np.ndarray, lists: np.ndarray, list_start: np.ndarray, l2: float
                   ) -> tuple[tuple[Any, ...], tuple[np.ndarray, ...]]:
        """The kernel's arguments (see _chunk for lists and list_start), each of a type fixed by the dtype alone, so
        that a run compiles one variant."""
        (W1, b1), (W2, b2) = params
        dt = self.dtype
        W1, b1, W2, b2 = (read_only(np.ascontiguousarray(a, dt)) for a in (W1, b1, W2, b2))
        labels = read_only(np.ascontiguousarray(y, np.int64))
        m = order.shape[0]
        chunks = threads_for(m, self.arch.sizes[1], self.threads)
        scales = np.array([1 / m, 1 / (255 * m), l2 / m], dt)
        outputs = (np.empty_like(W1), np.empty_like(b1), np.empty_like(W2), np.empty_like(b2))
        scratch = (self._W1T, self._W2p, self._W2T, self._b1p, self._b2p, self._D, self._A1, self._dZ1, self._P,
                   self._pixels, self._dW1T, self._dW2T, self._db1, self._db2, self._loss, self._hits)
        # order and rows may be the caller's arrays (read-only ones included); the index arrays are this module's
        inputs = (read_only(order), labels, read_only(rows), mask, lists, np.asarray(list_start, np.int64))
        return (*inputs, W1, b1, W2, b2, float(l2), scales, chunks, *scratch, *outputs), outputs


def _signature(dtype: str) -> tuple[Any, ...]:
    """The argument types of the kernel's calls in ``dtype`` (from a tiny pass's arguments): the key of its
    compiled variant."""
    arch = Architecture((4, 3, 2))
    tiny = SinglePassCpu(arch, dtype, 4, threads=1)
    params = [Layer(np.zeros((n_out, n_in), dtype), np.zeros((n_out, 1), dtype))
              for n_in, n_out in ((4, 3), (3, 2))]
    full = full_batch(np.zeros((4, 4), np.uint8))
    args, _ = tiny._arguments(params, full.positions, np.zeros(4, np.int64), full.rows, tiny._no_mask, full.lists,
                              full.list_start, 0.0)
    return tuple(numba.typeof(a) for a in args)


def lanes_hold(*, narrow: bool) -> str:
    """What a kernel's vectors hold in their lanes, in words: the narrow kernel's samples, or this module's hidden
    units (for the header's step line and :attr:`SinglePassCpu.full_batch_kernel`)."""
    return f"{LANES} samples per vector" if narrow else f"{LANES} hidden units per vector"


def kernel_for(threads: int) -> Any:
    """The compiled kernel a run whose full steps use ``threads`` threads calls for all its steps (one variant per
    run, so that no step compiles another): _step, or _step_on_one_thread where one thread does it all."""
    return _step if threads > 1 else _step_on_one_thread


def needs_compile(dtype: str = "float32", *, threads: int | None = None, arch: Architecture | None = None,
                  batches: bool = False) -> bool:
    """Will the first step in ``dtype`` of a run of ``threads`` threads (:func:`threads_for`; default: every usable
    core) compile its kernel (seconds) rather than load it from Numba's disk cache (a fraction of a second)? For a
    one-line notice before the first step. With ``arch``, the run's network, and ``batches`` (a run of mini-batches):
    where the run's steps take the narrow kernel (:func:`runs_narrow`), that one is asked about. The sparse and dense
    kernels are one compiled function."""
    if arch is not None and runs_narrow(arch, dtype, batches=batches):
        return numba_narrow.needs_compile(arch, dtype)
    return not is_ready(kernel_for(threads_for(2**62) if threads is None else threads), _signature(dtype))


def runs_narrow(arch: Architecture, dtype: str, *, batches: bool) -> bool:
    """Do the steps of a run of ``arch`` in ``dtype`` take the narrow kernel (:mod:`gpunn.numba_narrow`)? Full
    batches through a layer it takes (:func:`gpunn.numba_narrow.takes`) do; mini-batches (``batches``) never do."""
    return not batches and numba_narrow.takes(arch, dtype)


def cache_dir() -> str | None:
    """Where the compiled kernels are cached (None: nowhere writable was found, and each process compiles them)."""
    return getattr(_step._cache, "cache_path", None)


def threading_layer() -> str:
    """The Numba threading layer the kernels run on: after the first parallel call, the one running; before it, the
    one that call will take (the user's choice, else workqueue: see _choose_threading_layer)."""
    try:
        return numba.threading_layer()
    except ValueError:
        return str(numba.config.THREADING_LAYER) if _layer_chosen_elsewhere() else "workqueue"


def describe() -> str:
    """One line for ``gpunn info``: the vector width Numba compiles for and what the narrow kernel takes at that
    width, the threads and their layer, and where the kernels are cached; or why the single pass is off."""
    if numba.config.DISABLE_JIT:
        return "off: NUMBA_DISABLE_JIT is set, and CPU runs take the fused BLAS pass"
    bits = numba_narrow.vector_bits()
    narrow = numba_narrow.MAX_HIDDEN[bits]
    threads = threads_for(2**62)  # a step with work for every thread there is
    where = cache_dir()
    cached = f"kernels cached in {where}" if where else "no writable cache directory: each run compiles its kernel"
    return (f"{bits}-bit vectors ({lanes_hold(narrow=True)} up to {narrow['float32']} hidden units in float32, "
            f"{narrow['float64']} in float64), up to {threads} thread{'s' if threads > 1 else ''} "
            f"({threading_layer()}), {cached}")
