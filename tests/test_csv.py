"""Kaggle digit-recognizer CSV files: reading, the checks on them, and the train -> predict -> submission flow."""

from __future__ import annotations

import csv
import gzip
import os

import numpy as np
import pytest
from click.testing import CliRunner

from gpunn.cli import main
from gpunn.data import read_images, read_kaggle_csv
from gpunn.errors import DataError

from helpers import write_idx, write_kaggle_csvs
from hostile import CSV_NAMES, LOADS, csv_corpus

HEADER = "label," + ",".join(f"pixel{i}" for i in range(784))


def row(label, value=0):
    return f"{label}," + ",".join([str(value)] * 784)


def test_read_labelled_and_unlabelled(tmp_path):
    train, test = write_kaggle_csvs(tmp_path, n_train=30, n_test=7)
    images, labels = read_kaggle_csv(train)
    assert images.shape == (30, 784) and images.dtype == np.uint8 and labels.shape == (30,)
    test_images, test_labels = read_kaggle_csv(test)
    assert test_images.shape == (7, 784) and test_labels is None
    np.testing.assert_array_equal(read_images(test), test_images)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "not a CSV file with a header row"),
        (HEADER + "\n", "has a header but no rows"),
        ("label,pixel0,pixel1\n1,2,3\n", "found 3 columns: missing pixel2, pixel3, pixel4 and 779 more"),
        (HEADER + ",pixel784\n" + row(1) + ",0\n", "found 786 columns: unexpected pixel784"),
        (HEADER.replace("pixel5,pixel6", "pixel6,pixel5") + "\n" + row(1) + "\n", "columns out of order"),
        (HEADER + "\n" + row(1) + "\n" + row(2).replace(",0,", ",x,", 1) + "\n",
         "data row 2, column pixel0: the cell 'x' is not an integer"),
        (HEADER + "\n" + row(1).replace(",0,", ",,", 1) + "\n", "data row 1, column pixel0: the cell is empty"),
        (HEADER + "\n" + row(1) + "\n" + row(3, 256) + "\n", "pixel values must be 0-255; data row 2, column pixel0 holds 256"),
        (HEADER + "\n" + row(1, -1) + "\n", "pixel values must be 0-255; data row 1, column pixel0 holds -1"),
        (HEADER + "\n" + row(12) + "\n", "labels must be 0-9; data row 1, column label holds 12"),
    ],
)
def test_bad_csv_files_name_the_file_and_the_fault(tmp_path, text, message):
    path = tmp_path / "train.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as caught:
        read_kaggle_csv(path)
    assert str(path) in str(caught.value)


def test_read_images_from_idx(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(3, 28, 28)
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte", images, compress=True)
    np.testing.assert_array_equal(read_images(path), images.reshape(3, 784))


def read_submission(path):
    with path.open() as handle:
        return list(csv.reader(handle))


def test_kaggle_flow_train_then_predict(tmp_path):
    """train.csv -> model -> predictions for test.csv in Kaggle's submission format, from both commands."""
    train, test = write_kaggle_csvs(tmp_path, n_train=600, n_test=50)
    runner = CliRunner()
    model, direct = tmp_path / "model.npz", tmp_path / "direct.csv"
    result = runner.invoke(main, ["train", "--train-csv", str(train), "--test-csv", str(test), "--device", "cpu",
                                  "--epochs", "30", "--val-size", "100", "--out", str(model), "--submission", str(direct)])
    assert result.exit_code == 0, result.output
    assert "500 train / 100 validation / 0 test" in result.output
    assert f"predictions for the 50 digits of {test} written to {direct}" in result.output

    submission = tmp_path / "submission.csv"
    result = runner.invoke(main, ["predict", str(model), str(test), "-o", str(submission), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = read_submission(submission)
    assert rows[0] == ["ImageId", "Label"]
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(1, 51)]
    assert all(r[1] in list("0123456789") for r in rows[1:])
    assert rows == read_submission(direct)

    with_proba = tmp_path / "proba.csv"
    result = runner.invoke(main, ["predict", str(model), str(test), "-o", str(with_proba), "--proba", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = read_submission(with_proba)
    assert rows[0] == ["ImageId", "Label"] + [f"p{k}" for k in range(10)]
    probabilities = np.array([[float(p) for p in r[2:]] for r in rows[1:]])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    assert [int(r[1]) for r in rows[1:]] == probabilities.argmax(axis=1).tolist()


def test_labelled_test_csv_gives_test_accuracy_and_evaluate_reports(tmp_path):
    train, test = write_kaggle_csvs(tmp_path, n_train=600, n_test=80, test_labels=True)
    runner = CliRunner()
    model = tmp_path / "model.npz"
    result = runner.invoke(main, ["train", "--train-csv", str(train), "--test-csv", str(test), "--device", "cpu",
                                  "--epochs", "30", "--val-size", "100", "--out", str(model)])
    assert result.exit_code == 0, result.output
    assert "test accuracy:" in result.output and "on 80 digits" in result.output
    assert not (tmp_path / "submission.csv").exists()
    result = runner.invoke(main, ["evaluate", str(model), "--csv", str(test), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "confusion matrix (rows: true digit, columns: predicted digit)" in result.output
    assert "class  precision  recall     F1  support" in result.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--data-dir", "x", "--train-csv", "y"], "give one of --data-dir, --dataset and --train-csv"),
        (["--test-csv", "y"], "--test-csv goes with --train-csv"),
        (["--train-csv", "absent.csv"], "absent.csv: no such file"),
    ],
)
def test_csv_option_errors(tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--device", "cpu", *args])
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output


def test_predict_errors_leave_no_output(tmp_path):
    train, test = write_kaggle_csvs(tmp_path, n_train=200, n_test=5)
    runner = CliRunner()
    model = tmp_path / "model.npz"
    assert runner.invoke(main, ["train", "--train-csv", str(train), "--device", "cpu", "--epochs", "1",
                                "--val-size", "10", "--quiet", "--out", str(model)]).exit_code == 0
    small = write_idx(tmp_path / "small-idx3-ubyte", np.zeros((4, 16, 16), np.uint8))
    out = tmp_path / "out.csv"
    for args, fragment in [
        ([str(model), str(small)], "takes 784 inputs per digit but the data has 256"),
        ([str(tmp_path / "none.npz"), str(test)], "does not exist"),
        ([str(model), str(tmp_path / "none.csv")], "cannot read"),
    ]:
        result = runner.invoke(main, ["predict", *args, "-o", str(out), "--device", "cpu"])
        assert result.exit_code == 2, result.output
        assert fragment in result.output and "Traceback" not in result.output
        assert not out.exists()


# --- the hostile corpus (tests/hostile.py) ------------------------------------------------------------------------

CSV_CASES = csv_corpus()


def verdict(reader, path):
    """What a reader makes of a file: the shapes it loaded, or its one-line DataError (any other exception fails)."""
    try:
        result = reader(path)
    except DataError as error:
        message = str(error)
        assert len(message.splitlines()) == 1 and str(path) in message, message
        return message.replace(str(path), "FILE")
    arrays = result if isinstance(result, tuple) else (result,)
    return [None if a is None else (a.shape, str(a.dtype)) for a in arrays]


# "train.csv.gz": a plain file under a compressed name, or the reverse, must make no difference
@pytest.mark.parametrize("name", ["train.csv", "train.csv.gz"])
@pytest.mark.parametrize("case", CSV_CASES)
def test_hostile_csv_files_load_or_raise_one_data_error_line(tmp_path, case, name):
    content, fragment = CSV_CASES[case]
    path = tmp_path / name
    path.write_bytes(content)
    result = verdict(read_kaggle_csv, path)
    if fragment is LOADS:
        assert result == [((1, 784), "uint8"), ((1,), "uint8")]
    else:
        assert isinstance(result, str) and fragment in result, result


@pytest.mark.parametrize("case", ["valid gzip", "valid zip", "valid bzip2", "valid xz", "valid", "zstd", "tar",
                                  "zip: two files", "gzip: truncated", "overflowing cell", "header only"])
def test_the_file_name_never_changes_the_verdict(tmp_path, case):
    content, _ = CSV_CASES[case]
    verdicts = set()
    for name in CSV_NAMES:
        path = tmp_path / name
        path.write_bytes(content)
        kaggle, images = verdict(read_kaggle_csv, path), verdict(read_images, path)
        verdicts.add(str(kaggle))
        # read_images returns the images alone: the same verdict, without the labels
        assert images == (kaggle if isinstance(kaggle, str) else kaggle[:1]), (name, images, kaggle)
    assert len(verdicts) == 1, verdicts


def test_a_gzipped_csv_reaches_predict_as_a_csv(tmp_path):
    """read_images tells an IDX file from a CSV by content, inside the gzip too."""
    path = tmp_path / "test.csv.gz"
    path.write_bytes(gzip.compress(CSV_CASES["valid"][0].replace(b"label,", b"").replace(b"\n3,", b"\n")))
    assert read_images(path).shape == (1, 784)


@pytest.mark.parametrize("name", ["dir", "fifo", "absent.csv"])
def test_a_csv_path_that_is_not_a_file(tmp_path, name):
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for reader in (read_kaggle_csv, read_images):
        with pytest.raises(DataError, match=f"cannot read {tmp_path / name}: "):
            reader(tmp_path / name)


def test_a_row_with_one_cell_too_many_is_never_taken_for_an_index(tmp_path):
    """pandas, left to itself, makes the first cell of such a row the index and shifts the rest: silently wrong."""
    path = tmp_path / "test.csv"
    path.write_text(",".join(f"pixel{i}" for i in range(784)) + "\n" + "9," + ",".join(["0"] * 784) + "\n")
    with pytest.raises(DataError, match="data row 1 has more cells than the header's 784"):
        read_images(path)
