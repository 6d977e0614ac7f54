"""The benchmark scripts run at toy size and write well-formed results; a peer that computes another step is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import epoch_throughput  # noqa: E402
from peers import naive_numpy  # noqa: E402


def test_epoch_throughput_at_toy_size(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "epoch_throughput.py"), "--m", "256", "--hidden", "10,16", "--dtypes",
         "float32,float64", "--epochs", "2", "--peers", "numpy-naive", "--devices", "cpu", "--out-dir", str(tmp_path),
         "--name", "toy"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "toy.json").read_text())
    assert data["m"] == 256 and data["budget"]["epochs"] == 2 and data["budget"]["warmup"] == 1
    assert set(data["limits"]["cpu"]) == {"read_bytes_per_s", "gemm_flops_per_s_float32", "gemm_flops_per_s_float64"}
    assert "cpu" in data["environment"]["devices"] and data["peak_rss_mib"] > 0
    rows = {(r["dtype"], r["hidden"], r["implementation"]): r for r in data["rows"]}
    # gpunn (its fast path) and the generic math beside it in both dtypes; the naive program in float64 only, as
    # its `/ 255` makes it
    assert set(rows) == {(d, h, i) for d in ("float32", "float64") for h in (10, 16)
                         for i in ("gpunn", "gpunn-generic")} | {("float64", h, "numpy-naive") for h in (10, 16)}
    for row in rows.values():
        assert row["status"] == "ok"
        assert len(row["warmup_ms"]) == 1 and len(row["epoch_ms"]) == 2 and min(row["epoch_ms"]) > 0
        assert row["bound_ms"] > 0
    naive = rows[("float64", 10, "numpy-naive")]
    assert naive["check_loss"] == pytest.approx(naive["reference_loss"], rel=1e-9)
    table = (tmp_path / "toy.md").read_text()
    assert table.count("\n| cpu |") == 10 and "× bound" in table
    assert "toy.json" in result.stdout


def test_a_wrong_peer_is_refused(monkeypatch):
    """The notebook's own bias bug (db summed into one scalar) computes another step: no timing is reported."""

    def scalar_bias_backward(Z1, A1, Z2, A2, W1, W2, X, Y):
        dW1, _, dW2, _ = correct_backward(Z1, A1, Z2, A2, W1, W2, X, Y)
        m = Y.size
        dZ2 = A2 - naive_numpy.one_hot(Y)
        dZ1 = W2.T.dot(dZ2) * (Z1 > 0)
        return dW1, 1 / m * np.sum(dZ1), dW2, 1 / m * np.sum(dZ2)

    correct_backward = naive_numpy.backward_prop
    monkeypatch.setattr(naive_numpy, "backward_prop", scalar_bias_backward)
    from gpunn.backend import get_backend

    backend = get_backend("cpu")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, 64)
    params = epoch_throughput.init_params(epoch_throughput.Architecture((784, 8, 10)), init="he", seed=0,
                                          dtype="float64")
    params = [(W, b + 0.1) for W, b in params]  # non-zero biases, so that the wrong db shows at once
    reference = epoch_throughput.loss_after_steps(
        lambda *a, **k: epoch_throughput.GpunnRunner(*a, **k, backend=backend), images, labels, params,
        dtype="float64")
    row = epoch_throughput.time_peer("numpy-naive", backend, "float64", 8, params, images, labels, images, labels,
                                     reference, 1.0, epoch_throughput.Budget(1, 1, 1))
    assert row.status.startswith("refused: its loss after 3 epochs is")
    assert row.epoch_ms == []
    monkeypatch.setattr(naive_numpy, "backward_prop", correct_backward)
    row = epoch_throughput.time_peer("numpy-naive", backend, "float64", 8, params, images, labels, images, labels,
                                     reference, 1.0, epoch_throughput.Budget(1, 1, 1))
    assert row.status == "ok" and len(row.epoch_ms) == 1


def test_train_memory_at_toy_size(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_memory.py"), "--epochs", "1", "--out-dir", str(tmp_path), "--name",
         "toy", "--", "--hidden", "12"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    data = json.loads((tmp_path / "toy.json").read_text())
    assert data["train_command"] == "gpunn train --device cpu --epochs 1 --val-size 1000 --hidden 12"
    assert data["train_samples"] == 4000 and data["x_float32_mib"] == pytest.approx(784 * 4000 * 4 / 2**20)
    assert data["baseline_mib"] > 20 and data["peak_mib"] > 20  # an interpreter with NumPy in it, at least
    assert data["over_baseline_mib"] == pytest.approx(data["peak_mib"] - data["baseline_mib"])
    assert "| over / X |" in (tmp_path / "toy.md").read_text()
