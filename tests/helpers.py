"""Small MNIST-format files written by the tests themselves, and what the fast paths' tests share."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from gpunn.data import load_bundled_sample
from gpunn.nn import Architecture, Layer, init_params, loss_and_gradients, one_hot


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: 00 00 08 ndim, the dimensions as big-endian uint32, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def write_mnist_dir(folder: Path, *, n_train: int = 1200, n_test: int = 300, compress: bool = True) -> Path:
    """A directory in MNIST's layout, filled with digits of the bundled sample (train and test disjoint)."""
    sample = load_bundled_sample()
    order = np.random.default_rng(0).permutation(len(sample.train_labels))
    train, test = order[:n_train], order[n_train : n_train + n_test]
    images = sample.train_images.reshape(-1, 28, 28)
    suffix = ".gz" if compress else ""
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", images[train], compress=compress)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", sample.train_labels[train], compress=compress)
    if n_test:
        write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", images[test], compress=compress)
        write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", sample.train_labels[test], compress=compress)
    return folder


def write_kaggle_csvs(folder: Path, *, n_train: int = 600, n_test: int = 50, test_labels: bool = False) -> tuple[Path, Path]:
    """train.csv (label,pixel0..783) and test.csv (pixel0..783, or with labels) in Kaggle's layout, from the sample."""
    sample = load_bundled_sample()
    order = np.random.default_rng(1).permutation(len(sample.train_labels))
    train, test = order[:n_train], order[n_train : n_train + n_test]
    header = ",".join(f"pixel{i}" for i in range(784))
    folder.mkdir(parents=True, exist_ok=True)

    def write(path: Path, rows: np.ndarray, labelled: bool) -> Path:
        with path.open("w") as handle:
            handle.write(("label," if labelled else "") + header + "\n")
            for i in rows:
                pixels = ",".join(map(str, sample.train_images[i]))
                handle.write((f"{sample.train_labels[i]}," if labelled else "") + pixels + "\n")
        return path

    return write(folder / "train.csv", train, True), write(folder / "test.csv", test, test_labels)


#: how close a fast path's step must come to the generic math's (gradients: atol relative to their largest entry)
STEP_TOLERANCE = {"float32": {"rtol": 2e-4, "atol": 1e-6}, "float64": {"rtol": 1e-10, "atol": 1e-13}}


def assert_same_step(result, expected, dtype):
    """A fast path's (loss, accuracy, gradients) against the generic math's: 0-d figures and gradients in ``dtype``,
    the same accuracy exactly, the rest to within STEP_TOLERANCE."""
    (loss, accuracy, grads), (ref_loss, ref_accuracy, ref_grads) = result, expected
    tolerance = STEP_TOLERANCE[dtype]
    assert loss.shape == accuracy.shape == () and loss.dtype == accuracy.dtype == np.dtype(dtype)
    np.testing.assert_allclose(loss, ref_loss, **tolerance)
    assert accuracy == ref_accuracy  # the same predictions, counted exactly
    for (dW, db), (ref_dW, ref_db) in zip(grads, ref_grads, strict=True):
        assert dW.shape == ref_dW.shape and db.shape == ref_db.shape
        assert dW.dtype == db.dtype == np.dtype(dtype)
        for got, want in ((dW, ref_dW), (db, ref_db)):
            np.testing.assert_allclose(got, want, rtol=tolerance["rtol"], atol=tolerance["atol"] * np.abs(want).max())


def weights(sizes, dtype, seed=1):
    """A network's architecture and He-initialized weights, biases 0.01 (not 0, so that they count)."""
    arch = Architecture(sizes)
    return arch, [Layer(W, b + 0.01) for W, b in init_params(arch, init="he", seed=seed, dtype=dtype)]


def reference(params, pixels, labels, arch, dtype, l2=0.0):
    """The generic math's step on uint8 pixels / 255."""
    X = pixels.astype(dtype) / 255
    return loss_and_gradients(params, X, one_hot(labels, arch.sizes[-1], getattr(np, dtype)), labels, arch, l2=l2)


def same_bits(a, b):
    """Are two steps' (loss, accuracy, gradients) the same, bit for bit?"""
    (loss_a, acc_a, grads_a), (loss_b, acc_b, grads_b) = a, b
    return loss_a.tobytes() == loss_b.tobytes() and acc_a == acc_b and all(
        x.tobytes() == y.tobytes() for la, lb in zip(grads_a, grads_b) for x, y in zip(la, lb))


def bundled_pixels():
    """The bundled MNIST sample: X (784, m) uint8 as the transposed view of its IDX rows (the single pass's fast
    layout), and its labels as int64."""
    data = load_bundled_sample()
    return data.train_images.T, data.train_labels.astype(np.int64)


def sparse_pixels(m, n0, *, density, empty=slice(0), seed=0):
    """(m, n0) uint8 rows, each pixel nonzero (1..255) with probability ``density``; the rows ``empty`` all zero
    (samples with no ink)."""
    rng = np.random.default_rng(seed)
    rows = ((rng.random((m, n0)) < density) * rng.integers(1, 256, (m, n0))).astype(np.uint8)
    rows[empty] = 0
    return rows
