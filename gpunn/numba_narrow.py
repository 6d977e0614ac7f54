"""The CPU single pass of a full batch through a narrow hidden layer (MNIST's 784-10-10; up to 28 units in float32,
12 in float64): samples in the vectors' lanes.

:mod:`gpunn.numba_cpu`'s kernel holds hidden units in its vectors' lanes, which suits wide layers. With h = 10, six
of every 16 lanes compute padding there, and each FMA waits on a broadcast load of a pixel. Here a vector holds one
value for each of 16 samples (a *block*), and the h hidden units are h vectors, held in registers for the whole of a
loop (:class:`gpunn.numba_vectors.Rows`, one LLVM value that the compiler splits into h registers):

- **Forward**, block by block: for each pixel that is nonzero in one of the block's samples, its 16 values (one load,
  converted from uint8) meet each unit's weight W1[i, p] (a broadcast operand of the FMA): h FMAs, every lane useful.
- **Head**, block by block, straight-line code over the h units and C classes with the samples in the lanes: Z2,
  softmax, loss and hits, dZ2, dZ1 and the block's terms of dW2, db2, db1; no horizontal sum per sample, and one
  logarithm per block (of the product of its 16 sums of exponentials, in float64).
- **Backward**, per *super-tile* of up to 64 blocks (1,024 samples; fewer for wider layers, so that its dZ1 stay in
  L1: see DZ_BYTES) once its dZ1 are known: for each pixel, the blocks in which it is nonzero (the bits of one
  word), each block's 16 values meeting that block's h vectors of dZ1: h FMAs into h register sums, added once per
  (pixel, super-tile) into the chunk's per-lane sums of dW1.

Design, and why (measured on the 2-core development machine, Intel Xeon with AVX-512, MNIST):

- **Two compact copies of the pixels.** The samples are put in :func:`gpunn.numba_cpu.support_order` (alike samples
  side by side), cut into blocks of 16, and only the (pixel, block) pairs that are not all zero are kept, as 16 bytes
  each: 36 % of MNIST's pairs, 17 MB. The forward pass reads them block by block, the backward pass pixel by pixel
  within a super-tile; each copy is read front to back once per step. A first version kept one copy of every pixel
  of every block (47 MB), which the backward pass read with a stride: reading cache-hot addresses instead took
  0.6 ms off its forward pass and 0.8 ms off its backward pass, of a 5.3 ms step.
- **Left-out terms are exact zeros in every lane**, so the kernel gives the bits of its dense twin (every pixel of
  every block, the same order of sums): a term 0 * w added to a sum that started at +0 never changes it.
- **Chunks of whole super-tiles, cut by work.** One chunk per thread, each with its own gradient sums, added in chunk
  order at the end (the result depends on the number of chunks, not on which thread ran which). In support order the
  work per sample varies (some digits have more ink), so the chunks are cut where the count of visited pairs is
  divided evenly, not the count of samples.
- **Full batches only**: the copies are made once per training set. Mini-batches run
  :mod:`gpunn.numba_cpu`'s kernel, which reads the samples where they are.

The vectors and their operations are :mod:`gpunn.numba_vectors`'; the hidden layer's size is part of the kernel's
type (a tuple of h zeros, ``units``), so each h compiles a variant of its own (3.5-4 s), cached on disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange
from numba.core.codegen import get_host_cpu_features

from gpunn.nn import Architecture, Layer
from gpunn.numba_vectors import (LANES, aligned_zeros, clear, cttz, enable_cache, half_squares, is_ready, radd_outer,
                                 radd_store, rdeltas, read_only, rexp_below, rfirst_max, rfma_scalars, rfma_vectors,
                                 rmatvec, rmax, rpick, rpositive, rrelu, rsplat, rstore, rsum, rzero, vload, vload_u8,
                                 vprod64, vsub, vsum, vsum64, vwhere_eq, vwhere_ge)

#: the most hidden units for which this kernel is the faster one, by the width of the vector registers Numba compiles
#: for (see vector_bits) and dtype: its loops hold h sums and a vector of pixels in registers (AVX-512: 32 registers,
#: one per float32 sum, two per float64 one; AVX2: 16 of half the width, and the compiler spills). Measured against
#: numba_cpu's kernel on MNIST, warm steps interleaved, median of the rounds' ratios, both kernels' scratch on cache
#: lines: with AVX-512 (benchmarks/results/intel-xeon-numba-kernels.md) float32 h = 10 1.52x faster, 16 1.35x, 20
#: 1.52x, 24 1.32x, 28 1.10x, 32 1.01x, float64 h = 10 1.79x, 12 1.23x, 14 1.03x, 16 1.09x (a second run, 9 rounds:
#: float32 28 1.18x, 32 0.96x; float64 14 1.10x, 16 1.06x, 18 1.08x, 20 1.01x, each with rounds the other way: on
#: par past 12, so float64 stays at 12); compiled for AVX2 on the same machine
#: (benchmarks/results/intel-xeon-numba-kernels-avx2.md) float32 h = 10 1.39x, 16 0.86x (the other kernel's vectors
#: of 16 units have no padding there), 20 1.45x, 24 1.09x, 28 0.81x, float64 h = 10 1.52x, 12 1.08x, 14 1.03x.
MAX_HIDDEN = {512: {"float32": 28, "float64": 12}, 256: {"float32": 24, "float64": 12}}
#: the most blocks in a super-tile: the bits of one word say in which of them a pixel is nonzero
SUPER = 64
#: the most bytes of a super-tile's dZ1 (its blocks x h x 16 lanes): the backward pass reads them for every pixel, and
#: they must stay in L1 (48 KB on the development machine) beside the pixels streaming through. Measured on MNIST,
#: float32, one step: h = 16 6.5 ms with 64 blocks (64 KB), 5.7 ms with 32; h = 10 3.9 ms with 64 blocks (40 KB),
#: 4.7 ms with 32 (the fixed work per pixel and super-tile grows as the super-tiles shrink).
DZ_BYTES = 40 * 1024


# --- the kernel ---------------------------------------------------------------------------------------------------
# Scratch per chunk c (first index): dZ[c] (S * h * 16) the super-tile's dZ1, block k's h vectors at 16 h k;
# GW1[c] (n0 * h * 16) per-lane sums of dW1, pixel p's h vectors at 16 h p; G1[c] (h * 16) of db1; G2[c]
# (C * h * 16) of dW2, row (c, i) at 16 (c h + i); G2b[c] (C * 16) of db2.


@njit(inline='always')
def _head(acc, y, b1, W2, b2, W2T, units, classes):
    """A block from its Z1 sums over integer pixels (acc) to its dZ2 and dZ1. y: the 16 labels as floats, -1 in lanes
    that hold no sample. Returns (A1, dZ2, dZ1, the block's summed cross-entropy, its correct predictions)."""
    a = rrelu(acc, 1.0 / 255.0, b1)
    z = rmatvec(W2, a, rsplat(b2, classes))
    top = rmax(z)
    e = rexp_below(z, top)
    total = rsum(e)
    # loss = log(sum of exps) - (z[y] - top), summed over the block's samples: one log of a product of 16 sums in
    # [1, C] (at most 16^16, exact enough in float64)
    loss = math.log(vprod64(vwhere_ge(y, 0.0, total, 1.0))) - vsum64(vwhere_ge(y, 0.0, vsub(rpick(z, y), top), 0.0))
    hits = vsum64(vwhere_eq(rfirst_max(z), y, 1.0, 0.0))
    dz2 = rdeltas(e, total, y)
    dz1 = rpositive(a, rmatvec(W2T, dz2, rzero(W2T, units)))
    return a, dz2, dz1, loss, hits


@njit
def _chunk(s_lo, s_hi, S, nblocks, lists, list_start, rows, bits, back_rows, labels, W1T, b1, W2, b2, W2T, units,
           classes, backward, dZ, GW1, G1, G2, G2b):
    """Super-tiles s_lo .. s_hi - 1 (of S blocks each) into this chunk's per-lane gradient sums (``backward``; else
    the forward pass only: loss and hits, for a validation set). Returns (summed cross-entropy, hits)."""
    n0, h = W1T.shape
    if backward:  # the forward pass alone writes no sums: n0 * h * 16 of GW1 per chunk go uncleared
        clear(GW1)
        clear(G1)
        clear(G2)
        clear(G2b)
    loss = 0.0
    hits = 0.0
    for s in range(s_lo, s_hi):
        b0 = s * S
        for b in range(b0, min(b0 + S, nblocks)):
            acc = rzero(W1T, units)
            for q in range(list_start[b], list_start[b + 1]):
                p = np.intp(lists[q])
                acc = rfma_scalars(W1T, p * h, vload_u8(rows, q * LANES, W1T), acc)
            a, dz2, dz1, block_loss, block_hits = _head(acc, vload(labels, b * LANES), b1, W2, b2, W2T, units,
                                                        classes)
            loss += block_loss
            hits += block_hits
            if not backward:
                continue
            radd_store(dz2, G2b, 0)
            radd_outer(G2, dz2, a)
            radd_store(dz1, G1, 0)
            rstore(dz1, dZ, (b - b0) * h * LANES)
        q = list_start[b0]  # the super-tile's pairs, pixel by pixel, in back_rows
        for p in range(n0 if backward else 0):
            word = bits[s * n0 + p]
            if word == 0:
                continue
            acc = rzero(W1T, units)
            while word != 0:
                k = cttz(word)
                word &= word - np.uint64(1)
                acc = rfma_vectors(dZ, k * h * LANES, vload_u8(back_rows, q * LANES, W1T), acc)
                q += 1
            radd_store(acc, GW1, p * h * LANES)
    return loss, hits


@njit(inline='always')
def _lanes_total(G, offset):
    """The sum of the vector at ``offset`` of every chunk's sums G[c]: its lanes, then the chunks in order."""
    total = 0.0
    for c in range(G.shape[0]):
        total += vsum(vload(G[c], offset))
    return total


@njit
def _finish(W1, W2, l2, m, scales, backward, GW1, G1, G2, G2b, lossc, hitsc, dW1, db1, dW2, db2):
    """The chunks' per-lane sums added up (lanes, then chunks in order), scaled, plus the L2 terms. scales: [1/m,
    1/(255 m), l2/m] in the training dtype. Returns (loss, accuracy) as floats."""
    h, n0 = W1.shape
    C = W2.shape[0]
    chunks = lossc.shape[0]
    loss = 0.0
    hits = 0.0
    for c in range(chunks):
        loss += lossc[c]
        hits += hitsc[c]
    if l2 != 0.0:
        loss += l2 * half_squares(W1, W2)
    if not backward:
        return loss / m, hits / m
    for p in range(n0):
        for i in range(h):
            dW1[i, p] = _lanes_total(GW1, (p * h + i) * LANES) * scales[1] + scales[2] * W1[i, p]
    for i in range(h):
        db1[i, 0] = _lanes_total(G1, i * LANES) * scales[0]
    for k in range(C):
        db2[k, 0] = _lanes_total(G2b, k * LANES) * scales[0]
        for i in range(h):
            dW2[k, i] = _lanes_total(G2, (k * h + i) * LANES) * scales[0] + scales[2] * W2[k, i]
    return loss / m, hits / m


@njit(parallel=True)
def _step(lists, list_start, rows, bits, back_rows, super_blocks, labels, bounds, m, W1, b1, W2, b2, l2, scales,
          units, classes, backward, W1T, W2T, dZ, GW1, G1, G2, G2b, lossc, hitsc, dW1, db1, dW2, db2):
    """One full-batch step (see NarrowPass._arguments): the chunks in parallel (chunk c: super-tiles bounds[c] ..
    bounds[c + 1] - 1), then their sums in chunk order. Without ``backward``, the loss and accuracy alone (dW1 ..
    db2 are left as they were)."""
    h, n0 = W1.shape
    C = W2.shape[0]
    for p in range(n0):
        for i in range(h):
            W1T[p, i] = W1[i, p]
    for c in range(C):
        for i in range(h):
            W2T[i, c] = W2[c, i]
    chunks = bounds.shape[0] - 1
    for c in prange(chunks):
        lossc[c], hitsc[c] = _chunk(bounds[c], bounds[c + 1], super_blocks, list_start.shape[0] - 1, lists,
                                    list_start, rows, bits, back_rows, labels, W1T, b1, W2, b2, W2T, units, classes,
                                    backward, dZ[c], GW1[c], G1[c], G2[c], G2b[c])
    return _finish(W1, W2, l2, m, scales, backward, GW1[:chunks], G1[:chunks], G2[:chunks], G2b[:chunks],
                   lossc[:chunks], hitsc[:chunks], dW1, db1, dW2, db2)


enable_cache(_step)


# --- Python side ----------------------------------------------------------------------------------------------------


def vector_bits() -> int:
    """The width of the vector registers Numba compiles for: 512 where its target CPU has AVX-512, else 256 (AVX2 or
    narrower). The target is this machine's CPU unless NUMBA_CPU_FEATURES says otherwise (with NUMBA_CPU_NAME alone
    and no features listed, 256 is assumed)."""
    features = numba.config.CPU_FEATURES
    if features is None:
        features = get_host_cpu_features()
    return 512 if "+avx512f" in features.split(",") else 256


def takes(arch: Architecture, dtype: str) -> bool:
    """Does this kernel compute a full-batch step of ``arch`` (one ReLU hidden layer, softmax output, at most 16
    classes, as :func:`gpunn.numba_cpu.supports` checks) in ``dtype`` faster than :mod:`gpunn.numba_cpu`'s? Up to
    MAX_HIDDEN[vector_bits()][dtype] hidden units (see there)."""
    return arch.depth == 2 and arch.sizes[1] <= MAX_HIDDEN[vector_bits()][str(np.dtype(dtype))]


@dataclass(frozen=True, eq=False)
class Blocks:
    """What a full-batch step over m samples of n0 uint8 pixels reads; made once per training set by
    :func:`blocks_of`. A *pair* is a pixel and a block of 16 samples in which it is not zero in every sample; its
    16 values are 16 bytes, kept twice, in the order each pass reads them."""

    order: np.ndarray  # (m,) int64: the samples, in the order of the blocks' lanes (sample order[16 b + l] in lane l)
    super_blocks: int  # S: blocks per super-tile, at most SUPER
    lists: np.ndarray  # (pairs,) uint16: each block's pixels, block by block, ascending
    list_start: np.ndarray  # (nblocks + 1,) int64: block b's pairs are lists[list_start[b] : list_start[b + 1]]
    rows: np.ndarray  # (pairs * 16,) uint8: the pairs' values in the order of lists (the forward pass's)
    bits: np.ndarray  # (nsuper * n0,) uint64: bit k of bits[s n0 + p] set: p is a pixel of block S s + k
    back_rows: np.ndarray  # (pairs * 16,) uint8: the same values, super-tile by super-tile, pixel by pixel (backward)

    @property
    def blocks(self) -> int:
        return len(self.list_start) - 1

    @property
    def super_tiles(self) -> int:
        return -(-self.blocks // self.super_blocks)

    @property
    def nonzero_blocks(self) -> float:
        """The fraction of (pixel, block) pairs that are not all zero."""
        return len(self.lists) / max(1, self.blocks) / (len(self.bits) // max(1, self.super_tiles))


def super_blocks_for(hidden: int, dtype: str) -> int:
    """The blocks per super-tile for ``hidden`` units in ``dtype``: as many as keep the super-tile's dZ1 within
    DZ_BYTES, a power of two, at least 8 and at most SUPER."""
    per_block = hidden * LANES * np.dtype(dtype).itemsize
    return max(8, min(SUPER, 2 ** int(math.log2(max(1, DZ_BYTES // per_block)))))


def blocks_of(samples: np.ndarray, order: np.ndarray, *, super_blocks: int = SUPER, dense: bool = False) -> Blocks:
    """The full-batch layout of samples (m, n0) uint8 (any strides) taken in ``order``: blocks of 16 consecutive
    samples (the last one padded with zero samples), super-tiles of ``super_blocks`` blocks, and their pairs
    (``dense``: every pixel of every block, for measurements and tests). Made a super-tile at a time: no whole-size
    temporary."""
    if not 1 <= super_blocks <= SUPER:
        raise ValueError(f"a super-tile holds 1 to {SUPER} blocks, not {super_blocks}")
    m, n0 = samples.shape
    S = super_blocks
    nblocks = -(-m // LANES)
    nsuper = -(-nblocks // S)

    def values(s: int) -> np.ndarray:
        """Super-tile s as (its blocks, n0, 16)."""
        first, last = s * S, min(nblocks, (s + 1) * S)
        part = np.zeros(((last - first) * LANES, n0), np.uint8)
        picked = samples[order[first * LANES : last * LANES]]
        part[: len(picked)] = picked
        return part.reshape(last - first, LANES, n0).transpose(0, 2, 1)

    nonzero = np.zeros((nsuper, SUPER, n0), bool)  # blocks past S in a super-tile, and past the last, stay False
    for s in range(nsuper):
        count = min(S, nblocks - s * S)
        nonzero[s, :count] = True if dense else values(s).any(axis=2)
    block, pixel = np.nonzero(nonzero[:, :S].reshape(nsuper * S, n0)[:nblocks])
    list_start = np.zeros(nblocks + 1, np.int64)
    np.cumsum(np.bincount(block, minlength=nblocks), out=list_start[1:])
    rows = np.empty((len(pixel), LANES), np.uint8)
    back_rows = np.empty((len(pixel), LANES), np.uint8)
    for s in range(nsuper):
        cube = values(s)
        inside = nonzero[s, : len(cube)]
        pairs = slice(list_start[s * S], list_start[s * S + len(cube)])
        rows[pairs] = cube[inside]
        back_rows[pairs] = cube.transpose(1, 0, 2)[inside.T]
    packed = np.packbits(nonzero, axis=1, bitorder="little")  # (nsuper, 8, n0): bit k of byte k // 8 is block k
    bits = np.ascontiguousarray(packed.transpose(0, 2, 1)).view(np.uint64).reshape(-1)
    return Blocks(np.asarray(order, np.int64), S, pixel.astype(np.uint16), list_start, rows.reshape(-1), bits,
                  back_rows.reshape(-1))


def chunk_bounds(blocks: Blocks, chunks: int) -> np.ndarray:
    """Where ``chunks`` contiguous runs of super-tiles about equal in work (pairs) begin and end: chunk c runs
    super-tiles bounds[c] .. bounds[c + 1] - 1 (at most one chunk per super-tile; a chunk may be empty)."""
    S = blocks.super_blocks
    ends = blocks.list_start[np.minimum(np.arange(1, blocks.super_tiles + 1) * S, blocks.blocks)]
    cuts = [int(np.searchsorted(ends, ends[-1] * c / chunks)) + 1 for c in range(1, chunks)]
    return np.minimum(np.maximum.accumulate(np.array([0, *cuts, blocks.super_tiles], np.int64)), blocks.super_tiles)


class NarrowPass:
    """The kernel's scratch for one network, dtype and thread count, and its calls: ``loss_and_gradients`` of a
    full batch laid out by :func:`blocks_of`, for :class:`gpunn.numba_cpu.SinglePassCpu`, which picks the kernel,
    holds the training set's layout and sets the threads."""

    def __init__(self, arch: Architecture, dtype: str, threads: int) -> None:
        n0, h, C = arch.sizes
        self.arch, self.dtype, self.threads = arch, np.dtype(dtype), threads
        dt, chunks = self.dtype, threads
        self._W1T = np.zeros((n0, h), dt)
        self._W2T = np.zeros((h, C), dt)
        self.super_blocks = super_blocks_for(h, dtype)
        # the vectors' scratch on cache lines (see aligned_zeros), each chunk's a whole number of lines long
        self._dZ = aligned_zeros((chunks, self.super_blocks * h * LANES), dt)
        self._GW1 = aligned_zeros((chunks, n0 * h * LANES), dt)
        self._G1 = aligned_zeros((chunks, h * LANES), dt)
        self._G2 = aligned_zeros((chunks, C * h * LANES), dt)
        self._G2b = aligned_zeros((chunks, C * LANES), dt)
        self._loss = np.zeros(chunks)
        self._hits = np.zeros(chunks)
        self._units = (0,) * h  # the hidden layer's and the output's sizes as types: one compiled variant per size
        self._classes = (0,) * C

    def labels(self, blocks: Blocks, y: np.ndarray) -> np.ndarray:
        """y in the blocks' lane order, as floats, -1 in the lanes past the last sample."""
        labels = aligned_zeros(blocks.blocks * LANES, self.dtype)  # read a vector at a time
        labels[:] = -1
        labels[: len(blocks.order)] = y[blocks.order]
        return labels

    def __call__(self, params: Sequence[Layer], blocks: Blocks, labels: np.ndarray, l2: float
                 ) -> tuple[float, float, tuple[np.ndarray, ...]]:
        """(loss, accuracy, (dW1, db1, dW2, db2)) of the step, in this pass's dtype."""
        args, outputs = self._arguments(params, blocks, labels, l2)
        loss, accuracy = _step(*args)
        return loss, accuracy, outputs

    def evaluate(self, params: Sequence[Layer], blocks: Blocks, labels: np.ndarray) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of params on the samples laid out in blocks: the forward pass alone."""
        args, _ = self._arguments(params, blocks, labels, 0.0, backward=False)
        return _step(*args)

    def _arguments(self, params: Sequence[Layer], blocks: Blocks, labels: np.ndarray, l2: float, *,
                   backward: bool = True) -> tuple[tuple[object, ...], tuple[np.ndarray, ...]]:
        W1, b1, W2, b2 = (read_only(np.ascontiguousarray(a, self.dtype)) for layer in params for a in layer)
        m = len(blocks.order)
        bounds = chunk_bounds(blocks, min(self.threads, blocks.super_tiles))
        scales = np.array([1 / m, 1 / (255 * m), l2 / m], self.dtype)
        outputs = (np.empty_like(W1), np.empty_like(b1), np.empty_like(W2), np.empty_like(b2))
        if blocks.super_blocks > self.super_blocks:
            raise ValueError(f"the blocks' super-tiles of {blocks.super_blocks} blocks do not fit this pass's scratch "
                             f"({self.super_blocks})")
        return (blocks.lists, blocks.list_start, blocks.rows, blocks.bits, blocks.back_rows, blocks.super_blocks,
                labels, bounds, m, W1, b1, W2, b2, float(l2), scales, self._units, self._classes, backward, self._W1T,
                self._W2T, self._dZ, self._GW1, self._G1, self._G2, self._G2b, self._loss, self._hits,
                *outputs), outputs


def signature(arch: Architecture, dtype: str) -> tuple[object, ...]:
    """The argument types of the kernel's calls for ``arch`` in ``dtype`` (from a tiny pass's arguments): the key of
    its compiled variant."""
    tiny = NarrowPass(arch, dtype, 1)
    blocks = blocks_of(np.zeros((1, arch.sizes[0]), np.uint8), np.zeros(1, np.int64), super_blocks=tiny.super_blocks)
    params = [Layer(np.zeros((o, i), dtype), np.zeros((o, 1), dtype)) for i, o in zip(arch.sizes[:-1], arch.sizes[1:])]
    args, _ = tiny._arguments(params, blocks, tiny.labels(blocks, np.zeros(1, np.int64)), 0.0)
    return tuple(numba.typeof(a) for a in args)


def needs_compile(arch: Architecture, dtype: str) -> bool:
    """Will the first step for ``arch`` in ``dtype`` compile the kernel (seconds), rather than find it compiled or
    in Numba's disk cache?"""
    return not is_ready(_step, signature(arch, dtype))
