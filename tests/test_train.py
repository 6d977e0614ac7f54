"""Full-batch training: it learns, it is deterministic, it stops on divergence, and it never leaves the device."""

from __future__ import annotations

import numpy as np
import pytest

from gpunn.data import load_bundled_sample, load_idx_dir, split
from gpunn.errors import TrainingDivergedError
from gpunn.train import TrainConfig, evaluate, fit

from helpers import write_mnist_dir


@pytest.fixture(scope="module")
def sample_split():
    return split(load_bundled_sample(), val_size=500, seed=0)


def test_training_lowers_the_loss_on_every_backend(sample_split, backend):
    """On NumPy, CuPy, and array-api-strict's simulated device: the last caught any implicit host conversion
    or mixing of devices inside the loop, because it raises on both."""
    epochs = 5
    result = fit(sample_split, TrainConfig(hidden=(16, 16), epochs=epochs, lr=0.5, seed=0), backend=backend)
    losses = [s.loss for s in result.history]
    assert [s.epoch for s in result.history] == list(range(1, epochs + 1))
    assert losses[-1] < losses[0]
    assert all(0 <= s.train_accuracy <= 1 and 0 <= s.val_accuracy <= 1 for s in result.history)
    assert all(s.seconds > 0 and s.samples_per_s == pytest.approx(4500 / s.seconds) for s in result.history)
    assert result.test_accuracy is None and result.n_test == 0
    assert result.model.arch.sizes == (784, 16, 16, 10)


def test_same_seed_same_run(sample_split, cpu):
    config = TrainConfig(epochs=3, seed=4)
    first, second = (fit(sample_split, config, backend=cpu) for _ in range(2))
    assert [s.loss for s in first.history] == [s.loss for s in second.history]
    for a, b in zip(first.model.params, second.model.params):
        np.testing.assert_array_equal(a.W, b.W)


def test_test_accuracy_is_reported_when_labelled_test_data_exists(tmp_path, cpu):
    dataset = load_idx_dir(write_mnist_dir(tmp_path, n_train=1000, n_test=200))
    parts = split(dataset, val_size=100, seed=0)
    result = fit(parts, TrainConfig(epochs=30, lr=0.5), backend=cpu)
    assert result.n_test == 200
    assert result.test_accuracy == evaluate(result.model, parts.X_test, parts.y_test, backend=cpu)
    assert result.test_accuracy > 0.5


def test_evaluate_refuses_data_of_another_size(sample_split, cpu):
    from gpunn.errors import ModelError

    model = fit(sample_split, TrainConfig(epochs=1), backend=cpu).model
    with pytest.raises(ModelError, match="takes 784 inputs per digit but the data has 256 pixels"):
        evaluate(model, np.zeros((256, 3), np.uint8), np.zeros(3, np.int64), backend=cpu)


def test_no_validation_split(cpu):
    parts = split(load_bundled_sample(), val_size=0, seed=0)
    result = fit(parts, TrainConfig(epochs=2), backend=cpu)
    assert result.history[-1].val_accuracy is None and result.history[-1].val_loss is None


def test_divergence_stops_at_once_and_names_the_epoch(sample_split, cpu):
    with pytest.raises(TrainingDivergedError, match=r"diverged at epoch 3: .* not finite; try a smaller .*--lr 1e\+10"):
        fit(sample_split, TrainConfig(epochs=50, lr=1e10), backend=cpu)


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"lr": 0.0}, {"lr": -1.0}])
def test_config_rejects_impossible_values(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_float64_training(sample_split, cpu, activation):
    result = fit(sample_split, TrainConfig(activation=activation, dtype="float64", epochs=3), backend=cpu)
    assert result.model.params[0].W.dtype == np.float64
    assert result.history[-1].loss < result.history[0].loss


@pytest.mark.gpu
def test_cupy_training_matches_numpy(sample_split, cpu, cuda):
    """Same seed, same data: the GPU run follows the CPU run epoch by epoch within float32 tolerance."""
    config = TrainConfig(hidden=(64,), epochs=20, lr=0.1, seed=0)
    on_cpu, on_gpu = fit(sample_split, config, backend=cpu), fit(sample_split, config, backend=cuda)
    np.testing.assert_allclose([s.loss for s in on_gpu.history], [s.loss for s in on_cpu.history], rtol=1e-4)
    for a, b in zip(on_cpu.model.params, on_gpu.model.params):
        np.testing.assert_allclose(cuda.to_numpy(b.W), a.W, rtol=1e-3, atol=1e-5)
    assert abs(on_gpu.history[-1].val_accuracy - on_cpu.history[-1].val_accuracy) <= 0.002
