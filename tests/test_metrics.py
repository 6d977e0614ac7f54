"""Confusion matrix and per-class precision, recall and F1, checked by hand on a small case."""

from __future__ import annotations

import numpy as np
import pytest

from gpunn.metrics import confusion_matrix, format_report, report


def test_confusion_matrix_rows_are_truth_columns_are_predictions():
    C = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), classes=3)
    np.testing.assert_array_equal(C, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_report_by_hand():
    C = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    result = report(C)
    assert result["accuracy"] == pytest.approx(4 / 6)
    first, second, third = result["per_class"]
    assert (first["precision"], first["recall"]) == (pytest.approx(1 / 2), pytest.approx(1 / 2))
    assert (second["precision"], second["recall"], second["f1"]) == (pytest.approx(1 / 2), 1.0, pytest.approx(2 / 3))
    assert (third["precision"], third["recall"], third["support"]) == (1.0, pytest.approx(2 / 3), 3)


def test_a_class_never_predicted_has_zero_precision_not_nan():
    result = report(np.array([[2, 0], [1, 0]]))
    assert result["per_class"][1] == {"class": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_format_report_is_a_readable_table():
    text = format_report(report(np.array([[1234, 5], [6, 7]])))
    lines = text.splitlines()
    assert lines[0] == "accuracy: 99.12% on 1,252 digits"
    assert lines[-3].startswith("true\\pred")
    assert lines[-2].split() == ["0", "1,234", "5"] and lines[-1].split() == ["1", "6", "7"]


def test_macro_and_weighted_averages_as_scikit_learn_computes_them():
    C = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]])  # class 2 neither present nor predicted
    result = report(C)
    per_class = result["per_class"]
    macro, weighted = result["averages"]["macro avg"], result["averages"]["weighted avg"]
    for key in ("precision", "recall", "f1"):
        values = np.array([row[key] for row in per_class])
        support = np.array([row["support"] for row in per_class])
        assert macro[key] == pytest.approx(values.mean())
        assert weighted[key] == pytest.approx((values * support).sum() / support.sum())
    assert macro["support"] == weighted["support"] == 10
    lines = [line.split() for line in format_report(result).splitlines()]
    assert ["macro", "avg", "0.4603", "0.4444", "0.4469", "10"] in lines
    assert ["weighted", "avg"] == lines[lines.index(["macro", "avg", "0.4603", "0.4444", "0.4469", "10"]) + 1][:2]
