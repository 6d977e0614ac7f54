"""Classification metrics on the host: the confusion matrix and what follows from it."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int = 10) -> np.ndarray:
    """C[i, j] = how many digits of class i were predicted as j. Rows: true class; columns: prediction."""
    return np.bincount(y_true * classes + y_pred, minlength=classes * classes).reshape(classes, classes)


def report(C: np.ndarray) -> dict[str, Any]:
    """Accuracy, and per class precision = C[k,k]/column k, recall = C[k,k]/row k, F1 = their harmonic mean.

    A class that is never predicted (or never present) gets precision (or recall) 0 rather than a division by zero.
    """
    hits = np.diag(C).astype(np.float64)
    predicted, actual = C.sum(axis=0), C.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    support = actual.astype(np.float64)
    weights = support / support.sum() if support.sum() else np.zeros_like(support)
    averages = {
        # as scikit-learn's classification_report: the plain mean over classes, and the mean weighted by support
        name: {"precision": float(np.sum(w * precision)), "recall": float(np.sum(w * recall)),
               "f1": float(np.sum(w * f1)), "support": int(C.sum())}
        for name, w in (("macro avg", np.full(len(C), 1 / len(C))), ("weighted avg", weights))
    }
    return {
        "samples": int(C.sum()),
        "accuracy": float(hits.sum() / max(C.sum(), 1)),
        "averages": averages,
        "per_class": [
            {"class": k, "precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
             "support": int(actual[k])}
            for k in range(len(C))
        ],
        "confusion_matrix": C.tolist(),
    }


def format_report(result: dict[str, Any]) -> str:
    """The report as text: a per-class table and the confusion matrix with its row and column labels."""
    lines = [f"accuracy: {result['accuracy']:.2%} on {result['samples']:,} digits", "",
             f"{'class':>12}  precision  recall     F1  support"]
    rows = [(str(row["class"]), row) for row in result["per_class"]]
    rows += [(name, row) for name, row in result.get("averages", {}).items()]
    for label, row in rows:
        lines.append(f"{label:>12}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  "
                     f"{row['support']:7,}")
    C = np.asarray(result["confusion_matrix"])
    width = max(5, len(f"{C.max():,}") + 1)
    lines += ["", "confusion matrix (rows: true digit, columns: predicted digit)",
              "true\\pred" + "".join(f"{k:>{width}}" for k in range(len(C)))]
    for k, row in enumerate(C):
        lines.append(f"{k:>9}" + "".join(f"{v:>{width},}" for v in row))
    return "\n".join(lines)
