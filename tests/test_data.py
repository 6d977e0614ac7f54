"""IDX reading, the data directory, the bundled sample and the train/validation split."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from gpunn import data
from gpunn.data import load_bundled_sample, load_idx_dir, read_idx, read_images, split
from gpunn.errors import DataError

from helpers import idx_bytes, write_idx, write_mnist_dir
from hostile import LOADS, idx_corpus


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_raw_and_gzip(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "images", images, compress=compress)
    np.testing.assert_array_equal(read_idx(path), images)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not an IDX file .*found an empty file"),
        (b"\x12\x34\x08\x01\x00\x00\x00\x01\x05", "not an IDX file .*found 12 34 08 01"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x05", "data type 0x0d is not supported"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "header is cut short"),
        (idx_bytes(np.zeros((3, 2, 2), np.uint8))[:-1], r"announces shape \(3, 2, 2\), i.e. 28 bytes, but the file holds 27"),
        (gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))[:-20], "corrupt or truncated gzip"),
    ],
)
def test_read_idx_rejects_bad_files_by_name(tmp_path, content, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read .*nope"):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_dir(tmp_path, compress):
    dataset = load_idx_dir(write_mnist_dir(tmp_path, n_train=100, n_test=40, compress=compress))
    assert dataset.train_images.shape == (100, 784) and dataset.train_labels.shape == (100,)
    assert dataset.test_images.shape == (40, 784) and dataset.test_labels.shape == (40,)
    assert dataset.n_features == 784 and str(tmp_path) in dataset.source


def test_load_idx_dir_without_test_files(tmp_path):
    dataset = load_idx_dir(write_mnist_dir(tmp_path, n_train=50, n_test=0))
    assert dataset.test_images is None and dataset.test_labels is None


def test_load_idx_dir_accepts_the_dotted_names(tmp_path):
    images = np.zeros((5, 28, 28), np.uint8)
    write_idx(tmp_path / "train-images.idx3-ubyte", images)
    write_idx(tmp_path / "train-labels.idx1-ubyte", np.arange(5, dtype=np.uint8))
    assert load_idx_dir(tmp_path).train_labels.tolist() == [0, 1, 2, 3, 4]


def test_load_idx_dir_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_idx_dir(tmp_path / "absent")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[\.gz\] or .* not found"):
        load_idx_dir(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="holds 5 images but train-labels-idx1-ubyte 4 labels"):
        load_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 10, 3], np.uint8))
    with pytest.raises(DataError, match="labels must be 0-9, found 10"):
        load_idx_dir(tmp_path)


def test_bundled_sample_is_real_balanced_mnist():
    sample = load_bundled_sample()
    assert sample.train_images.shape == (5000, 784) and sample.train_images.dtype == np.uint8
    assert np.bincount(sample.train_labels).tolist() == [500] * 10
    assert sample.train_images.max() == 255 and sample.train_images.min() == 0
    assert sample.test_images is None
    assert "SHA-256 verified" in sample.source


def test_bundled_sample_digest_is_checked(monkeypatch):
    name = next(iter(data.SAMPLE_FILES))
    monkeypatch.setitem(data.SAMPLE_FILES, name, "0" * 64)
    with pytest.raises(DataError, match=f"{name} does not match its recorded SHA-256"):
        load_bundled_sample()


def test_split_shuffles_holds_out_and_transposes():
    sample = load_bundled_sample()
    parts = split(sample, val_size=1000, seed=0)
    assert parts.X_train.shape == (784, 4000) and parts.X_val.shape == (784, 1000)
    # a transposed view of the shuffled (m, 784) rows: one sample per column, its pixels contiguous, no second copy
    assert parts.X_train.T.flags.c_contiguous and parts.X_train.dtype == np.uint8
    assert parts.y_train.dtype == np.int64 and parts.X_test is None
    assert parts.sizes() == "4,000 train / 1,000 validation / 0 test"
    # every digit lands in exactly one part, with its own label
    rows = {row.tobytes(): label for row, label in zip(sample.train_images, sample.train_labels)}
    seen = [(column.tobytes(), label) for X, y in [(parts.X_train, parts.y_train), (parts.X_val, parts.y_val)]
            for column, label in zip(X.T, y)]
    assert len(seen) == len(rows) == 5000 and {key for key, _ in seen} == set(rows)
    assert all(rows[key] == label for key, label in seen)
    # shuffled: the sample is stored sorted by class, the validation part is not
    assert len(set(parts.y_val[:100].tolist())) == 10


def test_split_is_deterministic_per_seed():
    sample = load_bundled_sample()
    a, b, c = (split(sample, val_size=10, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.y_val, b.y_val)
    assert not np.array_equal(a.y_val, c.y_val)


@pytest.mark.parametrize("val_size", [-1, 5000, 6000])
def test_split_rejects_impossible_validation_sizes(val_size):
    with pytest.raises(DataError, match=f"--val-size {val_size} must be at least 0 and less than the 5,000"):
        split(load_bundled_sample(), val_size=val_size, seed=0)


# --- the hostile corpus (tests/hostile.py) ------------------------------------------------------------------------

IDX_CASES = idx_corpus()


@pytest.mark.parametrize("suffix", ["", ".gz"])  # the name says nothing: content decides
@pytest.mark.parametrize("case", IDX_CASES)
def test_hostile_idx_files_load_or_raise_one_data_error_line(tmp_path, case, suffix):
    content, fragment = IDX_CASES[case]
    path = tmp_path / f"train-images-idx3-ubyte{suffix}"
    path.write_bytes(content)
    if fragment is LOADS:
        assert read_idx(path).dtype == np.uint8
        return
    with pytest.raises(DataError) as caught:
        read_idx(path)
    message = str(caught.value)
    assert fragment in message and message.startswith(str(path)) and len(message.splitlines()) == 1
    with pytest.raises(DataError):  # and the reader of `gpunn predict` too, whatever it takes the file for
        read_images(path)


def test_an_idx_header_announcing_terabytes_allocates_nothing(tmp_path, monkeypatch):
    path = tmp_path / "huge-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + (60000).to_bytes(4, "big") + (2**20).to_bytes(4, "big") * 2))
    read_exactly = data._read_exactly

    def bounded(stream, count):
        assert count <= 12, f"asked to read {count:,} bytes: the header, and nothing announced by it"
        return read_exactly(stream, count)

    monkeypatch.setattr(data, "_read_exactly", bounded)
    with pytest.raises(DataError, match="i.e. 65,970,697,666,560,016 bytes, but a gzip file of this size cannot"):
        read_idx(path)


def test_the_data_dir_names_what_is_not_a_regular_file(tmp_path):
    write_mnist_dir(tmp_path, n_train=20, n_test=0)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    os.mkfifo(tmp_path / "train-images-idx3-ubyte")  # read naively, it would block for ever
    with pytest.raises(DataError, match="train-images-idx3-ubyte: it is a named pipe"):
        load_idx_dir(tmp_path)
    os.unlink(tmp_path / "train-images-idx3-ubyte")
    (tmp_path / "train-images-idx3-ubyte.gz").mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: it is a directory"):
        load_idx_dir(tmp_path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "absent", "no such directory"),
        (lambda tmp: (tmp / "file").write_bytes(b"") or tmp / "file", "is not a directory"),
        (lambda tmp: "/" + "/".join(["y" * 250] * 20), "File name too long"),
        (lambda tmp: "a\0b", "no such directory"),
    ],
)
def test_the_data_dir_itself(tmp_path, make, message):
    with pytest.raises(DataError, match=f"--data-dir .*{message}"):
        load_idx_dir(make(tmp_path))
