"""The CPU fast path: one training step's loss, accuracy and gradients with NumPy, in place, on every core.

The generic :func:`gpunn.nn.loss_and_gradients` is the reference; this computes the same quantities for ReLU
networks with a softmax output (any depth, float32 or float64, L2 or not, no dropout). What it changes is how:

- **Every core works.** NumPy's element-wise functions run on one thread and only the BLAS calls use the others.
  Here the columns of X are split into one chunk per core, each chunk runs the whole forward and backward pass in
  its own Python thread (NumPy releases the GIL in both), with BLAS held to one thread so the chunks do not
  oversubscribe the cores. The chunks' gradients are summed at the end: dW = sum_c dZ_c @ A_c.T / m.
- **No epoch allocates.** Activations, deltas, masks and per-column scratch live in buffers made once per run and
  written through ``out=``; with ReLU, A itself carries the mask (relu'(Z) = A > 0), so Z is never kept.
- **The softmax is computed once.** The loss, the accuracy and dZ[L] = A[L] - Y all come from one max-subtracted
  exponential, where the generic code computes the log-sum-exp again for the cost.
- **Memory stays bounded.** A chunk is processed in tiles of columns small enough that all buffers together stay
  under ``budget_bytes`` (h = 10: one tile per chunk; h = 1024: a few thousand columns per tile).

Why not the "read X once, while it is in cache" tiling the CPU issue proposed: measured on the 2-core development
machine, OpenBLAS's products with 10 rows cost 30 ms per pass over MNIST's X whether X comes from memory or from
cache (the cost is in packing X for the kernel, not in reading it), and tiles of 256 to 4,096 columns made the
step 5-40 % slower than whole chunks. Tiles are therefore used only to bound memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from gpunn.diagnostics import usable_cores
from gpunn.nn import Architecture, Layer

#: below this many columns per chunk the threads' hand-off and the one-thread BLAS cost more than the second core
#: gains (measured on 2 cores, h = 10: one chunk of 4,096 columns 6.1 ms, two chunks of 2,048 9.3 ms)
MIN_CHUNK = 4096
#: all scratch buffers of one run together, in bytes (per chunk: the activations and deltas of one tile)
DEFAULT_BUDGET = 64 * 2**20


def threads_for(columns: int, cores: int | None = None) -> int:
    """How many chunks (threads) a step of ``columns`` samples is split into: one per core, each >= MIN_CHUNK."""
    return max(1, min(usable_cores() if cores is None else cores, columns // MIN_CHUNK))


def supports(arch: Architecture, *, dropout: float) -> bool:
    """Can :class:`FusedCpuPass` compute this step? ReLU hidden layers, a softmax output, no dropout."""
    return arch.activation == "relu" and arch.output == "softmax" and not dropout


@dataclass
class _Scratch:
    """One chunk's buffers for tiles of up to ``columns`` columns."""

    A: list[np.ndarray]  # A[l] for l = 1..L (index 0 unused): hidden activations, then the logits/probabilities
    dA: list[np.ndarray]  # dA[l] for the hidden layers (index 0 and L unused)
    mask: list[np.ndarray]  # relu'(Z[l]) = A[l] > 0, as booleans, for the hidden layers
    row: np.ndarray  # (columns,) float: column maxima, then sums of exponentials, then their logs
    index: np.ndarray  # (columns,) intp: the predicted classes
    hit: np.ndarray  # (columns,) bool: predicted == label
    dW: list[np.ndarray]  # this chunk's sum over its columns of dZ[l] @ A[l-1].T (not yet divided by m)
    db: list[np.ndarray]  # and of dZ[l]
    loss: float = 0.0  # sum over the chunk's columns of -log A[L][y_j, j]
    correct: int = 0


class FusedCpuPass:
    """``loss_and_gradients`` for one run: made once with the network and the largest batch, called every step.

    Use it as a context manager: while it is entered, BLAS runs one thread (through threadpoolctl) in each chunk's
    thread, and the chunks' worker threads exist. Held for a whole training run rather than per step, because OpenBLAS's idle threads
    keep spinning for a while after each multi-threaded call and would take the cores from the chunks.
    """

    def __init__(self, arch: Architecture, dtype: str, columns: int, *, workers: int | None = None,
                 budget_bytes: int = DEFAULT_BUDGET) -> None:
        if not supports(arch, dropout=0.0):
            raise ValueError(f"the fused CPU pass needs ReLU hidden layers and a softmax output, not {arch}")
        self.arch = arch
        self.dtype = np.dtype(dtype)
        self.columns = columns
        self.workers = threads_for(columns, workers)
        chunk = -(-columns // self.workers)
        # bytes per column of one chunk's buffers: activations and masks of every layer, deltas of the hidden ones
        sizes = arch.sizes
        per_column = sum(sizes[1:]) * (self.dtype.itemsize + 1) + sum(sizes[1:-1]) * self.dtype.itemsize + 32
        self.tile = max(1, min(chunk, budget_bytes // (per_column * self.workers)))
        self._scratch = [self._make_scratch(self.tile) for _ in range(self.workers)]
        self._pool: ThreadPoolExecutor | None = None
        self._limits: Any = None

    def _make_scratch(self, columns: int) -> _Scratch:
        sizes, dtype = self.arch.sizes, self.dtype
        L = len(sizes) - 1
        hidden = range(1, L)
        return _Scratch(
            A=[np.empty(0, dtype)] + [np.empty((n, columns), dtype) for n in sizes[1:]],
            dA=[np.empty((sizes[l], columns), dtype) if l in hidden else np.empty(0, dtype) for l in range(L + 1)],
            mask=[np.empty((sizes[l], columns), bool) if l in hidden else np.empty(0, bool) for l in range(L + 1)],
            row=np.empty(columns, dtype),
            index=np.empty(columns, np.intp),
            hit=np.empty(columns, bool),
            dW=[np.empty(0, dtype)] + [np.empty((n_out, n_in), dtype) for n_in, n_out in zip(sizes[:-1], sizes[1:])],
            db=[np.empty(0, dtype)] + [np.empty(n, dtype) for n in sizes[1:]],
        )

    def __enter__(self) -> FusedCpuPass:
        # BLAS runs one thread per chunk, also where there is one chunk (a mini-batch, a small set): OpenBLAS's own
        # threads on such products cost more than they give, 3-10x on the shared 2-core machine (784-1024-10, batches
        # of 32 to 1,024: 2.4 against 16 ms, 32 against 110 ms), and the header's "1 thread" is then what runs
        self._limits = threadpool_limits(limits=1, user_api="blas")
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers - 1, thread_name_prefix="gpunn-chunk")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._limits is not None:
            self._limits.restore_original_limits()
            self._limits = None

    def __call__(self, params: Sequence[Layer], X: np.ndarray, Y: np.ndarray, y: np.ndarray, *, l2: float = 0.0,
                 dropout: float = 0.0, rng: Any = None) -> tuple[np.ndarray, np.ndarray, list[Layer]]:
        """The mean cross-entropy (with the L2 term), the accuracy, both 0-d arrays, and the gradients: what
        :func:`gpunn.nn.loss_and_gradients` returns. X: (n_0, m) with m <= the ``columns`` given at construction;
        Y: (classes, m) one-hot; y: (m,) labels. ``dropout`` must be 0 (``rng`` is then unused)."""
        if dropout:
            raise ValueError("the fused CPU pass has no dropout; the backend uses the generic code for it")
        m = X.shape[1]
        if m > self.columns:
            raise ValueError(f"this pass was made for at most {self.columns} columns, got {m}")
        chunks = threads_for(m, self.workers)
        bounds = [m * c // chunks for c in range(chunks + 1)]
        jobs = [(self._scratch[c], bounds[c], bounds[c + 1]) for c in range(chunks)]
        if chunks > 1 and self._pool is None:
            raise RuntimeError("enter the FusedCpuPass (with ...) before calling it with several chunks")
        # NumPy's floating-point error settings belong to the calling thread; the chunks' threads take the caller's
        errors = np.geterr()
        pending = [self._pool.submit(self._chunk, params, X, Y, y, *job, errors) for job in jobs[1:]] \
            if chunks > 1 else []
        self._chunk(params, X, Y, y, *jobs[0], errors)
        for future in pending:
            future.result()
        used = [job[0] for job in jobs]
        grads = []
        for l, (W, _) in enumerate(params, start=1):
            dW, db = used[0].dW[l].copy(), used[0].db[l].copy()
            for scratch in used[1:]:
                dW += scratch.dW[l]
                db += scratch.db[l]
            dW /= m
            db /= m
            if l2:
                dW += (l2 / m) * W
            grads.append(Layer(dW, db.reshape(-1, 1)))
        loss = sum(s.loss for s in used) / m
        if l2:
            loss += l2 / (2 * m) * sum(float(np.vdot(W, W)) for W, _ in params)
        correct = sum(s.correct for s in used)
        return np.asarray(loss, self.dtype), np.asarray(correct / m, self.dtype), grads

    def _chunk(self, params: Sequence[Layer], X: np.ndarray, Y: np.ndarray, y: np.ndarray, scratch: _Scratch,
               start: int, stop: int, errors: dict[str, str]) -> None:
        """Columns start:stop of the step, tile by tile, into ``scratch``'s sums."""
        scratch.loss, scratch.correct = 0.0, 0
        with np.errstate(**errors):
            for first in range(start, stop, self.tile):
                last = min(first + self.tile, stop)
                self._tile(params, X[:, first:last], Y[:, first:last], y[first:last], scratch,
                           accumulate=first > start)

    def _tile(self, params: Sequence[Layer], X: np.ndarray, Y: np.ndarray, y: np.ndarray, s: _Scratch, *,
              accumulate: bool) -> None:
        """One tile of columns; its gradient sums go into s.dW, s.db (added to them when ``accumulate``)."""
        L = len(params)
        n = X.shape[1]
        # forward: Z[l] = W[l] @ A[l-1] + b[l], then A[l] = max(Z[l], 0) in the same buffer
        A = [X] + [s.A[l][:, :n] for l in range(1, L + 1)]
        for l, (W, b) in enumerate(params, start=1):
            np.matmul(W, A[l - 1], out=A[l])
            A[l] += b
            if l < L:
                np.maximum(A[l], 0, out=A[l])
        # softmax, loss and accuracy from one exponential. Z := Z - max(Z) (exp overflows above ~88 in float32),
        # then -log softmax(Z)[y] = log(sum exp Z) - Z[y], and argmax(Z) is the prediction
        Z, row = A[L], s.row[:n]
        np.max(Z, axis=0, out=row)
        Z -= row
        np.argmax(Z, axis=0, out=s.index[:n])
        s.correct += int(np.count_nonzero(np.equal(s.index[:n], y, out=s.hit[:n])))
        picked = float(np.einsum("ij,ij->", Z, Y))  # sum_j Z[y_j, j], Y being one-hot
        np.exp(Z, out=Z)
        np.sum(Z, axis=0, out=row)
        Z /= row
        s.loss += float(np.sum(np.log(row, out=row), dtype=np.float64)) - picked
        # backward: dZ[L] = A[L] - Y; dW[l] += dZ[l] @ A[l-1].T; dZ[l-1] = (W[l].T @ dZ[l]) * (A[l-1] > 0)
        dZ = Z
        dZ -= Y
        for l in range(L, 0, -1):
            if accumulate:
                s.dW[l] += dZ @ A[l - 1].T
                s.db[l] += np.sum(dZ, axis=1)
            else:
                np.matmul(dZ, A[l - 1].T, out=s.dW[l])
                np.sum(dZ, axis=1, out=s.db[l])
            if l > 1:
                dA = s.dA[l - 1][:, :n]
                np.matmul(params[l - 1].W.T, dZ, out=dA)
                dA *= np.greater(A[l - 1], 0, out=s.mask[l - 1][:, :n])
                dZ = dA
