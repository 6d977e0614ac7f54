"""Every kind of bad input ends with exit code 2 and one line naming the file or option at fault: no traceback, and
nothing half-written left behind."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from gpunn.cli import main

from helpers import idx_bytes, write_idx, write_kaggle_csvs, write_mnist_dir


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A model trained for one epoch, an MNIST directory and a Kaggle CSV pair, all valid."""
    root = tmp_path_factory.mktemp("good")
    model = root / "model.npz"
    result = CliRunner().invoke(main, ["train", "--device", "cpu", "--epochs", "1", "--quiet", "--out", str(model)])
    assert result.exit_code == 0, result.output
    write_mnist_dir(root / "mnist", n_train=60, n_test=20)
    write_kaggle_csvs(root / "csv", n_train=60, n_test=5)
    return root


def mnist_with(folder, name, content):
    (folder / name).write_bytes(content)
    return folder


def broken_dir(good, tmp_path, name, content):
    folder = shutil.copytree(good / "mnist", tmp_path / "mnist")
    return str(mnist_with(folder, name, content))


def csv_with(tmp_path, text):
    path = tmp_path / "train.csv"
    path.write_text(text)
    return str(path)


HEADER = "label," + ",".join(f"pixel{i}" for i in range(784))
ROW = "3," + ",".join(["0"] * 784)
TRAIN_GZ = "train-images-idx3-ubyte.gz"


def case_truncated_gz(good, tmp):
    raw = (good / "mnist" / TRAIN_GZ).read_bytes()
    return ["train", "--data-dir", broken_dir(good, tmp, TRAIN_GZ, raw[: len(raw) // 2])], "corrupt or truncated gzip"


def case_corrupt_gz(good, tmp):
    return ["train", "--data-dir", broken_dir(good, tmp, TRAIN_GZ, b"\x1f\x8b" + b"\x00" * 50)], "corrupt or truncated"


def case_wrong_magic(good, tmp):
    content = gzip.compress(b"\x08\x03\x00\x00" + idx_bytes(np.zeros((60, 28, 28), np.uint8))[4:])
    return ["train", "--data-dir", broken_dir(good, tmp, TRAIN_GZ, content)], "not an IDX file (expected magic bytes"


def case_count_mismatch(good, tmp):
    content = gzip.compress(idx_bytes(np.zeros((59, 28, 28), np.uint8)))
    return ["train", "--data-dir", broken_dir(good, tmp, TRAIN_GZ, content)], "holds 59 images but"


def case_labels_out_of_range(good, tmp):
    content = gzip.compress(idx_bytes(np.full(60, 11, np.uint8)))
    return ["train", "--data-dir", broken_dir(good, tmp, "train-labels-idx1-ubyte.gz", content)], "labels must be 0-9"


def case_empty_idx(good, tmp):
    return ["train", "--data-dir", broken_dir(good, tmp, TRAIN_GZ, b"")], "found an empty file"


def case_images_not_28x28(good, tmp):
    folder = tmp / "small"
    folder.mkdir()
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((5, 16, 16), np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((5, 16, 16), np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    return ["evaluate", str(good / "model.npz"), "--data-dir", str(folder)], "takes 784 inputs per digit but the data has 256"


def case_csv_missing_column(good, tmp):
    return ["train", "--train-csv", csv_with(tmp, HEADER.rsplit(",", 1)[0] + "\n" + ROW.rsplit(",", 1)[0] + "\n")], \
        "missing pixel783"


def case_csv_extra_column(good, tmp):
    return ["train", "--train-csv", csv_with(tmp, HEADER + ",extra\n" + ROW + ",1\n")], "unexpected extra"


def case_csv_non_numeric(good, tmp):
    return ["train", "--train-csv", csv_with(tmp, HEADER + "\n" + ROW[:-1] + "x\n")], "column pixel783: the cell 'x' is not an integer"


def case_csv_empty_cell(good, tmp):
    return ["train", "--train-csv", csv_with(tmp, HEADER + "\n" + ROW[:-1] + "\n")], "column pixel783: the cell is empty"


def case_csv_pixel_out_of_range(good, tmp):
    return ["train", "--train-csv", csv_with(tmp, HEADER + "\n" + ROW[:-1] + "300\n")], "pixel values must be 0-255"


def case_csv_empty_file(good, tmp):
    return ["train", "--train-csv", csv_with(tmp, "")], "not a CSV file with a header row"


def case_csv_unlabelled_for_training(good, tmp):
    return ["train", "--train-csv", str(good / "csv" / "test.csv")], "a training CSV needs a 'label' column"


def case_missing_model(good, tmp):
    return ["evaluate", str(tmp / "absent.npz")], "does not exist"


def case_corrupt_model(good, tmp):
    (tmp / "model.npz").write_bytes(b"PK\x03\x04 not really a zip")
    return ["evaluate", str(tmp / "model.npz")], "is not a gpunn model file"


def case_incompatible_model(good, tmp):
    with np.load(good / "model.npz") as npz:
        arrays = dict(npz)
    arrays["W2"] = arrays["W2"][:, :5]
    with open(tmp / "model.npz", "wb") as handle:
        np.savez(handle, **arrays)
    return ["predict", str(tmp / "model.npz"), str(good / "csv" / "test.csv"), "-o", str(tmp / "out.csv")], \
        "damaged gpunn model file: W2 (10, 5)"


def case_unwritable_output(good, tmp):
    return ["predict", str(good / "model.npz"), str(good / "csv" / "test.csv"), "-o", str(tmp / "no" / "out.csv")], \
        "directory " + str(tmp / "no") + " does not exist"


def case_output_is_a_directory(good, tmp):
    return ["train", "--epochs", "1", "--out", str(tmp)], "is a directory; give a file name"


def case_unknown_device(good, tmp):
    return ["train", "--device", "tpu"], "unknown device 'tpu'"


def case_lr_not_positive(good, tmp):
    return ["train", "--lr", "0"], "Invalid value for '--lr'"


def case_epochs_below_one(good, tmp):
    return ["train", "--epochs", "0"], "Invalid value for '--epochs'"


def case_hidden_size_zero(good, tmp):
    return ["train", "--hidden", "16,0"], "every hidden layer needs at least 1 unit"


def case_val_size_too_large(good, tmp):
    return ["train", "--val-size", "5000"], "--val-size 5000 must be at least 0 and less than the 5,000 training"


CASES = [value for name, value in sorted(globals().items()) if name.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__[5:] for case in CASES])
def test_bad_input_exits_2_with_one_line_and_no_partial_file(good, tmp_path, monkeypatch, case):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args, fragment = case(good, inputs)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, args + (["--device", "cpu"] if "--device" not in args else []))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1 and fragment in error_lines[0], result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written anywhere


def test_out_of_host_memory_is_one_line(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise MemoryError("Unable to allocate 584. GiB for an array with shape (100000000, 784) and data type float64")

    monkeypatch.setattr("gpunn.train.init_params", refuse)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--device", "cpu", "--epochs", "1"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: out of host memory: ")
    assert "584. GiB" in result.output and list(tmp_path.iterdir()) == []
