"""Pictures of a training run (matplotlib, the optional extra ``gpunn[plot]``): learning curves, the confusion
matrix, misclassified digits and the first layer's weights. Everything here works on NumPy arrays on the host."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gpunn.errors import DataError, GpunnError
from gpunn.files import atomic_write, describe_bytes, open_input


class PlotError(GpunnError):
    """matplotlib is missing, or there is nothing to draw."""


def require_matplotlib() -> None:
    """Raise PlotError, with the install command, when matplotlib is missing."""
    _pyplot()


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise PlotError("plots need matplotlib, which is not installed: pip install 'gpunn[plot]'") from error
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=110)
    _pyplot().close(fig)
    return path


_METRICS_EXPECTED = "expected the JSON lines that gpunn train --metrics-out writes, one object per epoch"
# the fields each epoch record must have for the curves, and those that may be null (no validation split)
_EPOCH_FIELDS = ("epoch", "loss", "train_accuracy")
_OPTIONAL_FIELDS = ("val_loss", "val_accuracy")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``--metrics-out`` file: one JSON object per line, those of ``"type": "epoch"`` with the
    numbers the learning curves need. Anything else raises DataError (exit 2) saying what was expected and what
    the file looks like; a missing or unreadable file too."""
    with open_input(path, DataError) as handle:  # before Path(): Path("") would be "."
        path = Path(path)
        head = handle.read(512)
        if not head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{"):
            # not JSON lines at all (a model .npz, an image, a data set): say what it looks like, without reading it
            raise DataError(f"{path}: {_METRICS_EXPECTED}; the file looks like {describe_bytes(head)}")
        text = (head + handle.read()).removeprefix(b"\xef\xbb\xbf")
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: {_METRICS_EXPECTED}; byte {error.start:,} is not UTF-8 text") from error
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as error:
            raise DataError(f"{path}: line {number} is not JSON ({' '.join(str(error).split())[:80]}); "
                            f"{_METRICS_EXPECTED}") from error
        if not isinstance(record, dict) or not isinstance(record.get("type"), str):
            raise DataError(f"{path}: line {number} is {_short_json(record)}, not a metrics record with a \"type\"; "
                            f"{_METRICS_EXPECTED}")
        if record["type"] == "epoch":
            _check_epoch(record, path, number)
        records.append(record)
    if not any(record["type"] == "epoch" for record in records):
        raise DataError(f"{path}: no epoch records (\"type\": \"epoch\") to plot; {_METRICS_EXPECTED}")
    return records


def _short_json(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_epoch(record: dict[str, Any], path: Path, number: int) -> None:
    epoch = record.get("epoch")
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0):
        raise DataError(f"{path}: line {number}: the epoch record's \"epoch\" is "
                        f"{_short_json(epoch) if 'epoch' in record else 'missing'}, expected a whole number")
    for field in _EPOCH_FIELDS[1:]:
        if not _is_number(record.get(field)):
            found = _short_json(record[field]) if field in record else "missing"
            raise DataError(f"{path}: line {number}: the epoch record's \"{field}\" is {found}, expected a number; "
                            f"{_METRICS_EXPECTED}")
    for field in _OPTIONAL_FIELDS:
        if record.get(field) is not None and not _is_number(record[field]):
            raise DataError(f"{path}: line {number}: the epoch record's \"{field}\" is {_short_json(record[field])}, "
                            "expected a number or null")


def learning_curves(records: list[dict[str, Any]], path: Path) -> Path:
    """Loss and accuracy per epoch, training against validation, from ``--metrics-out`` records."""
    epochs = [r for r in records if r.get("type") == "epoch"]
    if not epochs:
        raise PlotError("no epoch records to plot: give the .jsonl file written by gpunn train --metrics-out")
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter, PercentFormatter

    x = [r["epoch"] for r in epochs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [(left, "loss", "val_loss", "cross-entropy loss", "mean cross-entropy (nats per digit)"),
              (right, "train_accuracy", "val_accuracy", "accuracy", "digits labelled correctly")]
    for axis, train_key, val_key, title, ylabel in panels:
        axis.plot(x, [r[train_key] for r in epochs], label="training (before each epoch's update)")
        if any(r.get(val_key) is not None for r in epochs):
            # a gap, not an error, where an epoch has no validation figure
            axis.plot(x, [math.nan if r.get(val_key) is None else r[val_key] for r in epochs],
                      label="validation (after it)")
        axis.set_xlabel("epoch")
        axis.set_ylabel(ylabel)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 2.5
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()
    left.set_yscale("log")
    # a log axis whose labels are plain numbers (0.3, 0.5, 1, 2), not powers of ten, with ticks between the decades
    losses = [r[key] for r in epochs for key in ("loss", "val_loss") if r.get(key) is not None and r[key] > 0]
    if losses:
        left.yaxis.set_major_locator(FixedLocator(_log_ticks(min(losses), max(losses))))
    left.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    left.yaxis.set_minor_formatter(NullFormatter())
    right.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
    fig.tight_layout()
    return _save(fig, path)


def _log_ticks(low: float, high: float) -> list[float]:
    """Ticks for a log axis from ``low`` to ``high`` at round numbers, denser the fewer decades it spans: 1, 2, 5 per
    decade over many, every digit over less than one (0.6, 0.7, 0.8, 0.9, 1, 1.5, 2)."""
    decades = math.log10(high / low)
    mantissas = ((1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9) if decades < 1 else (1, 2, 3, 5, 7) if decades < 2.5 else (1, 2, 5)
                 if decades < 6 else (1,))
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    ticks = [float(f"{m * 10.0**k:.12g}") for k in range(first, last + 1) for m in mantissas]
    return [t for t in ticks if low / 1.15 <= t <= high * 1.15]


def confusion_heatmap(C: np.ndarray, path: Path, title: str = "confusion matrix") -> Path:
    """Rows: true digit; columns: prediction; each cell shows its count, coloured by its share of the row."""
    plt = _pyplot()
    share = C / np.maximum(C.sum(axis=1, keepdims=True), 1)
    fig, axis = plt.subplots(figsize=(6.4, 5.6))
    image = axis.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(C.shape):
        axis.text(j, i, f"{C[i, j]:,}", ha="center", va="center", fontsize=7,
                  color="white" if share[i, j] > 0.5 else "black")
    axis.set_xticks(range(len(C)))
    axis.set_yticks(range(len(C)))
    axis.set_xlabel("predicted digit")
    axis.set_ylabel("true digit")
    axis.set_title(f"{title} ({C.trace() / max(C.sum(), 1):.2%} correct)")
    fig.colorbar(image, ax=axis, label="share of the true digit's samples")
    fig.tight_layout()
    return _save(fig, path)


def misclassified_grid(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, path: Path, *,
                       limit: int = 36) -> Path:
    """The first ``limit`` wrongly labelled digits (images (m, 784) uint8), each titled 'true → predicted'."""
    wrong = np.flatnonzero(labels != predicted)[:limit]
    if not len(wrong):
        raise PlotError("every digit was labelled correctly: there is no misclassified digit to show")
    plt = _pyplot()
    columns = min(9, len(wrong))
    rows = -(-len(wrong) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.25 * columns, 1.45 * rows), squeeze=False)
    side = int(round(np.sqrt(images.shape[1])))
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, wrong):
        axis.imshow(images[index].reshape(side, side), cmap="gray_r", vmin=0, vmax=255)
        axis.set_title(f"{labels[index]} → {predicted[index]}", fontsize=9, color="firebrick")
    fig.suptitle(f"misclassified digits ({len(np.flatnonzero(labels != predicted)):,} of {len(labels):,}); "
                 "title: true → predicted", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def first_layer_weights(W1: np.ndarray, path: Path, *, limit: int = 64) -> Path:
    """Each hidden unit's incoming weights W1[k] as a 28×28 image on one colour scale for all units, with its colour
    bar: red pushes the unit up, blue down."""
    plt = _pyplot()
    units = W1[:limit]
    side = int(round(np.sqrt(units.shape[1])))
    columns = min(8, len(units))
    rows = -(-len(units) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns + 0.9, 1.4 * rows + 0.4), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    # one symmetric colour scale shared by every unit, so that their images compare; a colour bar gives its values
    bound = float(np.abs(units).max()) or 1.0
    image = None
    for k, (axis, weights) in enumerate(zip(axes.flat, units)):
        image = axis.imshow(weights.reshape(side, side), cmap="RdBu_r", vmin=-bound, vmax=bound)
        axis.set_title(f"unit {k}", fontsize=8)
    fig.suptitle(f"first-layer weights, {len(units)} of {len(W1)} units (red +, blue −)", fontsize=10)
    fig.tight_layout()
    fig.colorbar(image, ax=axes, shrink=0.8, label="weight")
    return _save(fig, path)


def write_plots(folder: Path, records: list[dict[str, Any]], model: Any = None, images: Any = None,
                labels: Any = None, part: str = "", backend: Any = None) -> list[Path]:
    """curves.png from a run's metrics records; with a model, labelled digits (images (m, n_0) uint8, labels (m,))
    and its backend, also confusion.png, misclassified.png (where the model gets any wrong) and weights.png.
    ``part`` names the digits in the confusion matrix's title. Returns the files written."""
    from gpunn.metrics import confusion_matrix
    from gpunn.train import predict_proba  # gpunn.train is a layer above the pictures; only this needs it

    folder.mkdir(exist_ok=True)
    written = [learning_curves(records, folder / "curves.png")]
    if model is not None:
        predicted = predict_proba(model, images.T, backend=backend).argmax(axis=1)
        labels = labels.astype(np.int64)
        written.append(confusion_heatmap(confusion_matrix(labels, predicted), folder / "confusion.png",
                                         f"confusion matrix, {part}"))
        if (predicted != labels).any():
            written.append(misclassified_grid(images, labels, predicted, folder / "misclassified.png"))
        written.append(first_layer_weights(backend.to_numpy(model.params[0].W), folder / "weights.png"))
    return written
