"""The pictures: each file is a real PNG of a sensible size, and the commands fail cleanly without matplotlib."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from gpunn.cli import main

from helpers import write_mnist_dir

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the PNG header."""
    data = path.read_bytes()
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_train_plot_dir_and_gpunn_plot(tmp_path):
    data = write_mnist_dir(tmp_path / "mnist", n_train=400, n_test=100)
    runner = CliRunner()
    plots, metrics, model = tmp_path / "plots", tmp_path / "m.jsonl", tmp_path / "m.npz"
    result = runner.invoke(main, ["train", "--data-dir", str(data), "--device", "cpu", "--epochs", "15", "--hidden",
                                  "12", "--val-size", "50", "--out", str(model), "--metrics-out", str(metrics),
                                  "--plot-dir", str(plots)])
    assert result.exit_code == 0, result.output
    assert "plots (test set) written to" in result.output
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["confusion.png", "curves.png", "misclassified.png", "weights.png"]
    for name in names:
        width, height = png_size(plots / name)
        assert width >= 400 and height >= 150, (name, width, height)

    again = tmp_path / "again"
    result = runner.invoke(main, ["plot", str(metrics), "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in again.iterdir()] == ["curves.png"]
    result = runner.invoke(main, ["plot", str(metrics), "--model", str(model), "--data-dir", str(data), "-o",
                                  str(again), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(list(again.iterdir())) == 4


def test_plot_errors(tmp_path, monkeypatch):
    runner = CliRunner()
    (tmp_path / "bad.jsonl").write_text("not json\n")
    result = runner.invoke(main, ["plot", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "out")])
    # bad input: exit 2, as every other bad file (it was 1 before gpunn.plots.read_metrics)
    assert result.exit_code == 2 and "expected the JSON lines that gpunn train --metrics-out writes" in result.output
    (tmp_path / "empty.jsonl").write_text('{"type": "summary"}\n')
    result = runner.invoke(main, ["plot", str(tmp_path / "empty.jsonl"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no epoch records" in result.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, ["train", "--device", "cpu", "--epochs", "1", "--plot-dir", "plots"])
    assert result.exit_code == 1
    assert "plots need matplotlib, which is not installed: pip install 'gpunn[plot]'" in result.output
    assert not (tmp_path / "plots").exists() and not (tmp_path / "model.npz").exists()


@pytest.mark.parametrize("plot_dir, message", [("a/b", "directory a does not exist"),
                                               ("file.txt", "exists and is not a directory")])
def test_plot_dir_is_checked_before_training(tmp_path, monkeypatch, plot_dir, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("")
    result = CliRunner().invoke(main, ["train", "--device", "cpu", "--epochs", "1", "--plot-dir", plot_dir])
    assert result.exit_code == 2 and message in result.output
