"""The pictures: each file is a real PNG of a sensible size, and the commands fail cleanly without matplotlib."""

from __future__ import annotations

import sys

import numpy as np
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


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plots draw, kept open for inspection (they are still written)."""
    import gpunn.plots

    kept = []

    def keep(fig, path):
        fig.canvas.draw()  # lay the ticks out as the file has them
        kept.append(fig)
        with gpunn.plots.atomic_write(path) as handle:
            fig.savefig(handle, format="png")
        return path

    monkeypatch.setattr(gpunn.plots, "_save", keep)
    return kept


def epochs_records(losses):
    return [{"type": "epoch", "epoch": e, "loss": loss, "train_accuracy": 0.5, "val_loss": loss * 1.1,
             "val_accuracy": 0.5} for e, loss in enumerate(losses, start=1)]


@pytest.mark.parametrize("losses", [[2.3, 1.9, 1.4, 1.0, 0.8, 0.7, 0.65], list(2.3 * 0.97 ** np.arange(200))],
                         ids=["less than a decade", "three decades"])
def test_learning_curves_read_at_a_glance(tmp_path, figures, losses):
    from gpunn.plots import learning_curves

    learning_curves(epochs_records(losses), tmp_path / "curves.png")
    (loss, accuracy), = [fig.axes for fig in figures]
    for axis in (loss, accuracy):
        assert axis.get_xlabel() == "epoch"
        assert all(float(t).is_integer() for t in axis.get_xticks())  # whole epochs only
    assert "cross-entropy" in loss.get_ylabel() and "nats" in loss.get_ylabel()
    assert loss.get_yscale() == "log"
    labels = [t.get_text() for t in loss.get_yticklabels() if t.get_text()]
    assert len(labels) >= 3, labels  # a few round numbers even when the loss spans less than a decade
    for text in labels:
        float(text)  # plain numbers: "0.5", "2", "0.002", never "10^-1" or "1e-01"
        assert "e" not in text and "^" not in text
    assert [t.get_text() for t in accuracy.get_yticklabels() if t.get_text()][-1].endswith("%")


def test_the_weights_share_one_colour_scale_with_its_bar(tmp_path, figures):
    from gpunn.plots import first_layer_weights

    W1 = np.random.default_rng(0).normal(size=(12, 784)) * np.linspace(0.1, 3, 12)[:, None]
    first_layer_weights(W1, tmp_path / "weights.png")
    (fig,) = figures
    images = [image for axis in fig.axes for image in axis.get_images()]
    assert len(images) == 12 and len({image.get_clim() for image in images}) == 1
    assert images[0].get_clim() == (-np.abs(W1).max(), np.abs(W1).max())
    assert any(axis.get_ylabel() == "weight" for axis in fig.axes)  # the colour bar
