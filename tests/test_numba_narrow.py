"""The narrow single pass (samples in the vectors' lanes) against the generic math (one step: hidden sizes from 1 to
the widest it takes, L2, one and two chunks, steps of about one block, super-tiles of 64, 32 and 16 blocks; the
validation figures of its forward pass alone; 10 epochs of fit); its zero-skipping against its dense twin, bit for
bit; the layout it reads; how the chunks are cut; and which networks take it, by the CPU's vector width. Its float64
variant is checked in test_numba_cpu's read-only-package test (a compile of its own)."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from gpunn import numba_narrow
from gpunn.backend import get_backend
from gpunn.data import load_bundled_sample, split
from gpunn.nn import Architecture, cost, forward, one_hot
from gpunn.numba_cpu import SinglePassCpu, support_order
from gpunn.numba_narrow import blocks_of, chunk_bounds, super_blocks_for, takes
from gpunn.train import TrainConfig, fit

from helpers import assert_same_step, bundled_pixels, reference, same_bits, sparse_pixels, weights


@pytest.fixture(scope="module")
def sample():
    return bundled_pixels()


@pytest.mark.parametrize("hidden", [1, 10, 28])  # super-tiles of 64, 64 and 16 blocks
@pytest.mark.parametrize("l2", [0.0, 0.7])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_step_matches_the_generic_pass(sample, hidden, l2, threads):
    # 2,501 samples: 157 blocks, the last holding 5 samples; several super-tiles, cut into two chunks
    pixels, labels = sample[0][:, :2501], sample[1][:2501]
    arch, params = weights((784, hidden, 10), "float32")
    # narrow=True: h = 28 takes the narrow kernel by default only with AVX-512 (see test_which_networks_take_it)
    with SinglePassCpu(arch, "float32", 2501, threads=threads, narrow=True) as single:
        assert single.full_batch_kernel == "16 samples per vector"
        result = single(params, pixels, None, labels, l2=l2)
    assert_same_step(result, reference(params, pixels, labels, arch, "float32", l2), "float32")


def test_another_shape_of_network():
    """Not MNIST's: 100 inputs, 5 hidden units, 3 classes, pixels of any value."""
    pixels = sparse_pixels(100, 1500, density=0.3, seed=4)  # (n0, m)
    labels = np.random.default_rng(4).integers(0, 3, 1500)
    arch, params = weights((100, 5, 3), "float32")
    with SinglePassCpu(arch, "float32", 1500, threads=2) as single:
        assert single.full_batch_kernel == "16 samples per vector"
        result = single(params, pixels, None, labels, l2=0.2)
        loss, accuracy = single.evaluate(params, pixels, labels)
    expected = reference(params, pixels, labels, arch, "float32", 0.2)
    assert_same_step(result, expected, "float32")
    assert accuracy == expected[1]


@pytest.mark.parametrize("m", [1, 7, 16, 17])
def test_steps_of_about_one_block(sample, m):
    pixels, labels = sample[0][:, 300 : 300 + m], sample[1][300 : 300 + m]
    arch, params = weights((784, 10, 10), "float32")
    with SinglePassCpu(arch, "float32", m) as single:
        result = single(params, pixels, None, labels, l2=0.1)
    assert_same_step(result, reference(params, pixels, labels, arch, "float32", 0.1), "float32")


def test_skipping_zero_pixels_changes_no_bit(sample):
    pixels, labels = sample[0][:, :1999], sample[1][:1999]
    arch, params = weights((784, 12, 10), "float32")  # super-tiles of 32 blocks
    results = []
    for sparse in (True, False):
        with SinglePassCpu(arch, "float32", 1999, threads=2, sparse=sparse) as single:
            results.append(single(params, pixels, None, labels, l2=0.3))
    assert same_bits(*results)
    with SinglePassCpu(arch, "float32", 1999, threads=2, sort=False) as single:
        unsorted = single(params, pixels, None, labels, l2=0.3)
    assert not same_bits(results[0], unsorted)  # the check can fail: summed in another order, other bits
    assert_same_step(unsorted, results[0], "float32")


def _sparse_rows(m, n0, seed=0):
    return sparse_pixels(m, n0, density=0.05, empty=slice(100, 140), seed=seed)  # empty rows: blocks with nothing


@pytest.mark.parametrize("dense", [False, True])
def test_the_layout_holds_every_pair_in_the_order_each_pass_reads_it(dense):
    rows = _sparse_rows(1100, 70)  # 69 blocks, the last holding 12 samples; super-tiles of 8 blocks, the last of 5
    order = np.random.default_rng(1).permutation(1100)
    blocks = blocks_of(rows.T.T, order, super_blocks=8, dense=dense)
    padded = np.zeros((69 * 16, 70), np.uint8)
    padded[:1100] = rows[order]
    cube = padded.reshape(69, 16, 70).transpose(0, 2, 1)  # (block, pixel, lane)
    assert np.array_equal(blocks.order, order) and blocks.blocks == 69 and blocks.super_tiles == 9
    forward = blocks.rows.reshape(-1, 16)
    for b in range(69):
        pairs = slice(blocks.list_start[b], blocks.list_start[b + 1])
        expected = np.arange(70) if dense else np.flatnonzero(cube[b].any(axis=1))
        assert list(blocks.lists[pairs]) == list(expected)
        assert np.array_equal(forward[pairs], cube[b, expected])
    backward, q = blocks.back_rows.reshape(-1, 16), 0
    for s in range(9):
        for p in range(70):
            word = int(blocks.bits[s * 70 + p])
            ks = [k for k in range(64) if word >> k & 1]
            assert ks == [k for k in range(8) if s * 8 + k < 69 and (dense or cube[s * 8 + k, p].any())]
            for k in ks:
                assert np.array_equal(backward[q], cube[s * 8 + k, p])
                q += 1
    assert q == len(forward) == len(blocks.lists)
    if not dense:
        assert blocks.nonzero_blocks == pytest.approx(len(blocks.lists) / (69 * 70)) and blocks.nonzero_blocks < 0.7


def test_chunks_are_whole_super_tiles_of_about_equal_work():
    rows = _sparse_rows(3000, 70, seed=2)
    # 188 blocks in 24 super-tiles, whose work differs in support order
    blocks = blocks_of(rows, support_order(rows), super_blocks=8)
    work = np.diff(blocks.list_start[np.minimum(np.arange(0, 25) * 8, 188)])
    for chunks in (1, 2, 3, 24, 30):
        bounds = chunk_bounds(blocks, chunks)
        assert len(bounds) == chunks + 1 and bounds[0] == 0 and bounds[-1] == 24 and np.all(np.diff(bounds) >= 0)
        shares = [work[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
        assert max(shares) <= work.sum() / chunks + work.max()


@pytest.mark.parametrize("bits", [512, 256])
def test_which_networks_take_it(monkeypatch, bits):
    monkeypatch.setattr(numba_narrow, "vector_bits", lambda: bits)
    widest = numba_narrow.MAX_HIDDEN[bits]
    assert widest["float32"] == (28 if bits == 512 else 24) and widest["float64"] == 12
    assert takes(Architecture((784, 10, 10)), "float32")
    assert takes(Architecture((784, widest["float32"], 10)), "float32")
    assert not takes(Architecture((784, widest["float32"] + 1, 10)), "float32")
    assert takes(Architecture((784, 12, 10)), "float64") and not takes(Architecture((784, 13, 10)), "float64")
    assert not takes(Architecture((784, 10, 10, 10)), "float32")
    # a super-tile's dZ1 stays within DZ_BYTES
    for hidden, dtype in ((1, "float32"), (10, "float32"), (28, "float32"), (12, "float64")):
        blocks = super_blocks_for(hidden, dtype)
        assert 8 <= blocks <= numba_narrow.SUPER and blocks * hidden * 16 * np.dtype(dtype).itemsize <= \
            max(numba_narrow.DZ_BYTES, 8 * hidden * 16 * np.dtype(dtype).itemsize)
    assert super_blocks_for(10, "float32") == 64 and super_blocks_for(16, "float32") == 32


def test_the_vector_width_is_the_one_numba_compiles_for(monkeypatch):
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+fma,-avx512f")
    assert numba_narrow.vector_bits() == 256
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+avx512f,+fma")
    assert numba_narrow.vector_bits() == 512
    monkeypatch.setattr(numba.config, "CPU_FEATURES", None)  # this machine's own
    monkeypatch.setattr(numba_narrow, "get_host_cpu_features", lambda: "+sse2,+avx,+avx2")
    assert numba_narrow.vector_bits() == 256


def test_mini_batches_run_the_other_kernel(sample):
    """The layout is made once per training set: a step over chosen samples runs numba_cpu's kernel."""
    pixels, labels = sample[0][:, :1000], sample[1][:1000]
    arch, params = weights((784, 10, 10), "float32")
    batch = np.arange(0, 1000, 3)
    with SinglePassCpu(arch, "float32", 1000) as single:
        result = single(params, pixels, None, labels, index=batch)
        assert "narrow" not in single._layouts  # no narrow layout made for a run of mini-batches
    assert_same_step(result, reference(params, pixels[:, batch], labels[batch], arch, "float32"), "float32")


@pytest.mark.parametrize("m", [1000, 7])
def test_evaluate_gives_the_validation_figures_of_the_generic_forward_pass(sample, m):
    pixels, labels = sample[0][:, 4000 : 4000 + m], sample[1][4000 : 4000 + m]
    arch, params = weights((784, 10, 10), "float32")
    with SinglePassCpu(arch, "float32", 3000) as single:
        assert single.evaluates_pixels
        loss, accuracy = single.evaluate(params, pixels, labels)
        assert single.evaluate(params, pixels, labels) == (loss, accuracy)  # its layout made once, the same sums
    trace = forward(params, pixels.astype(np.float32) / 255, arch)
    expected_loss = cost(trace.Z[-1], one_hot(labels, 10, np.float32), arch.output)
    assert loss.shape == accuracy.shape == () and loss.dtype == accuracy.dtype == np.float32
    np.testing.assert_allclose(loss, expected_loss, rtol=2e-6)
    assert accuracy == np.float32(np.mean(np.argmax(trace.A[-1], axis=0) == labels))


def test_evaluate_needs_the_narrow_kernel(sample):
    arch, params = weights((784, 40, 10), "float32")
    with SinglePassCpu(arch, "float32", 100) as single:
        assert not single.evaluates_pixels
        with pytest.raises(ValueError, match="evaluates with its narrow kernel, which does not take 784-40-10"):
            single.evaluate(params, sample[0][:, :100], sample[1][:100])


@pytest.mark.parametrize("batch_size", [None, 1000], ids=["full-batch", "mini-batches"])
def test_ten_epochs_of_fit_end_where_the_generic_code_ends(batch_size):
    """784-10-10 with L2: full batches run the narrow kernel (and validate with its forward pass), mini-batches the
    other one; both against the generic math after 10 epochs of fit."""
    parts = split(load_bundled_sample(), val_size=500, seed=0)
    # lr 0.1: at 0.3, mini-batches of 1,000 amplify float32's rounding from epoch to epoch (measured: 4 % apart after
    # 10 epochs, against 7e-16 in float64; 2e-7 at lr 0.1)
    config = TrainConfig(epochs=10, lr=0.1, l2=0.1, batch_size=batch_size)
    fast, generic = get_backend("cpu"), get_backend("cpu", fast=False)
    lanes = "16 hidden units" if batch_size else "16 samples"
    assert f"(Numba, {lanes} per vector)" in fast.step(Architecture((784, 10, 10)), dtype="float32", columns=4500,
                                                        batches=batch_size is not None).name
    runs = [fit(parts, config, backend=backend) for backend in (fast, generic)]
    for figure in ("loss", "val_loss"):
        np.testing.assert_allclose([getattr(s, figure) for s in runs[0].history],
                                   [getattr(s, figure) for s in runs[1].history], rtol=1e-5)
    for (W, b), (ref_W, ref_b) in zip(runs[0].model.params, runs[1].model.params, strict=True):
        np.testing.assert_allclose(W, ref_W, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b, ref_b, rtol=1e-4, atol=1e-6)


def test_a_compiled_variant_needs_no_compile(sample):
    from gpunn import numba_cpu

    arch, params = weights((784, 10, 10), "float32")
    with SinglePassCpu(arch, "float32", 500) as single:
        single(params, sample[0][:, :500], None, sample[1][:500])
    assert numba_narrow.needs_compile(arch, "float32") is False
    assert numba_cpu.needs_compile("float32", arch=arch) is False
