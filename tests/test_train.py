"""Training: it learns, it is deterministic, it stops on divergence, it never leaves the device, and mini-batches reach
a pass that reads them in place as an index into the data."""

from __future__ import annotations

import numpy as np
import pytest

from gpunn import numba_cpu
from gpunn.backend import get_backend
from gpunn.data import load_bundled_sample, load_idx_dir, split
from gpunn.errors import ModelError, TrainingDivergedError
from gpunn.nn import Architecture, init_params, loss_and_gradients
from gpunn.optim import Optimizer
from gpunn.train import DeviceData, TrainConfig, TrainingInterrupted, evaluate, fit, train_step

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


def test_the_validation_pass_runs_on_the_pixels_where_the_step_can_evaluate_them(sample_split, cpu, monkeypatch):
    """A full batch through the narrow Numba kernel: the validation figures come from its forward pass over the
    validation pixels (the generic forward pass is not called), and equal the generic run's."""
    config = TrainConfig(epochs=3, seed=2)
    generic = fit(sample_split, config, backend=get_backend("cpu", fast=False))
    calls = []
    evaluate_pixels = numba_cpu.SinglePassCpu.evaluate
    monkeypatch.setattr(numba_cpu.SinglePassCpu, "evaluate",
                        lambda self, params, X, y: calls.append(X) or evaluate_pixels(self, params, X, y))
    monkeypatch.setattr("gpunn.train.forward", None)  # the generic validation pass would fail
    fast = fit(sample_split, config, backend=cpu)
    assert len(calls) == 3 and all(X.dtype == np.uint8 and X is calls[0] for X in calls)
    np.testing.assert_array_equal(calls[0], sample_split.X_val)
    for a, b in zip(fast.history, generic.history):
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-5) and a.val_accuracy == b.val_accuracy


def test_evaluate_refuses_data_of_another_size(sample_split, cpu):
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


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"epochs": 2**63}, {"lr": 0.0}, {"lr": -1.0}, {"precision": "fp16"},
                                 {"precision": "tf32", "dtype": "float64"}])
def test_config_rejects_impossible_values(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_tensor_core_gemms_learn_what_float32_learns(sample_split, precision):
    """A run whose GEMMs take their inputs rounded to TF32 or bfloat16 (here on the emulated CUDA device) ends near the
    float32 run from the same seed: the same accuracy give or take a point, its weights float32, its setting kept."""
    from conftest import emulated_cuda_or_skip

    backend = emulated_cuda_or_skip()
    config = {"hidden": (32,), "epochs": 20, "lr": 0.2}
    reference = fit(sample_split, TrainConfig(**config), backend=backend)
    result = fit(sample_split, TrainConfig(**config, precision=precision), backend=backend)
    assert result.model.info["step"] == ("fused CUDA kernels, one CUDA graph per epoch, cuBLAS GEMMs on "
                                         f"{'TF32' if precision == 'tf32' else 'bfloat16'} tensor cores")
    assert abs(result.history[-1].val_accuracy - reference.history[-1].val_accuracy) <= 0.01
    assert result.history[-1].loss == pytest.approx(reference.history[-1].loss, rel=0.01)
    assert result.history[-1].loss != reference.history[-1].loss
    assert result.model.params[0].W.dtype == np.float32
    assert set(backend.kernels.precisions) == {"float32", precision}  # the float32 run's GEMMs, then this run's


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


def test_resume_is_bit_identical(sample_split, cpu):
    """20 epochs straight, and 10 epochs resumed for 10 more, end with exactly the same weights."""
    straight = fit(sample_split, TrainConfig(hidden=(16,), epochs=20), backend=cpu)
    half = fit(sample_split, TrainConfig(hidden=(16,), epochs=10), backend=cpu)
    assert half.model.info["epochs_done"] == 10
    resumed = fit(sample_split, TrainConfig(hidden=(16,), epochs=20), backend=cpu, resume=half.model)
    assert [s.epoch for s in resumed.history] == list(range(11, 21))
    assert [s.loss for s in resumed.history] == [s.loss for s in straight.history[10:]]
    for a, b in zip(straight.model.params, resumed.model.params):
        np.testing.assert_array_equal(a.W, b.W)
        np.testing.assert_array_equal(a.b, b.b)


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SIGINT", "SIGTERM"])
def test_checkpoints_and_interruption(sample_split, cpu, how):
    import os
    import signal

    saved, heard = [], []

    def interrupt_at_7(stats):
        if stats.epoch == 7:
            if how == "KeyboardInterrupt":  # raised where no handler sees it, e.g. by a callback
                raise KeyboardInterrupt
            os.kill(os.getpid(), getattr(signal, how))

    config = TrainConfig(epochs=12)
    with pytest.raises(TrainingInterrupted) as caught:
        fit(sample_split, config, backend=cpu, on_epoch=interrupt_at_7, on_checkpoint=saved.append, checkpoint_every=3,
            on_signal=heard.append)
    assert [m.info["epochs_done"] for m in saved][:2] == [3, 6]
    # reports reach the host in batches, so the run stops after the last epoch it had run: a whole epoch, >= 7
    assert 7 <= caught.value.epoch < 12 and caught.value.model.info["epochs_done"] == caught.value.epoch
    assert caught.value.signal == (signal.SIGINT if how == "KeyboardInterrupt" else getattr(signal, how))
    assert heard == ([] if how == "KeyboardInterrupt" else [getattr(signal, how)])
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are restored after the run
    finished = fit(sample_split, config, backend=cpu, resume=caught.value.model)
    straight = fit(sample_split, config, backend=cpu)
    np.testing.assert_array_equal(finished.model.params[0].W, straight.model.params[0].W)


def test_resume_refuses_another_run(sample_split, cpu):
    model = fit(sample_split, TrainConfig(epochs=2), backend=cpu).model
    with pytest.raises(ModelError, match=r"settings differ from the checkpoint's \(lr 0.1 there, 0.2 here\)"):
        fit(sample_split, TrainConfig(epochs=4, lr=0.2), backend=cpu, resume=model)
    with pytest.raises(ModelError, match="the training data .* differ"):
        fit(split(load_bundled_sample(), val_size=500, seed=1), TrainConfig(epochs=4, seed=0), backend=cpu,
            resume=model)
    with pytest.raises(ModelError, match="nothing to resume: the checkpoint has done 2 epochs and --epochs is 2"):
        fit(sample_split, TrainConfig(epochs=2), backend=cpu, resume=model)


def test_standardize_uses_the_training_split_only_and_travels_with_the_model(sample_split, cpu, tmp_path):
    from gpunn.model import load_model, save_model

    result = fit(sample_split, TrainConfig(epochs=3, normalize="standardize"), backend=cpu)
    pre = result.model.preprocessing
    X_train = sample_split.X_train / 255.0
    np.testing.assert_allclose(pre.mean[:, 0], X_train.mean(axis=1), rtol=1e-5, atol=1e-6)
    expected_std = X_train.std(axis=1)
    np.testing.assert_allclose(pre.std[:, 0], np.where(expected_std > 0, expected_std, 1), rtol=1e-4, atol=1e-6)
    # the validation part's own statistics are not the ones used
    assert not np.allclose(pre.mean[:, 0], (sample_split.X_val / 255.0).mean(axis=1), atol=1e-4)
    # a constant pixel (the corner) keeps std 1, so it stays 0 rather than 0/0
    assert pre.std[0, 0] == 1.0 and float(pre.mean[0, 0]) == 0.0
    path = tmp_path / "m.npz"
    save_model(path, result.model, cpu)
    loaded = load_model(path, cpu)
    assert loaded.preprocessing.kind == "standardize"
    np.testing.assert_array_equal(loaded.preprocessing.mean, pre.mean)
    accuracy = evaluate(loaded, sample_split.X_val, sample_split.y_val, backend=cpu)
    assert accuracy == pytest.approx(result.history[-1].val_accuracy)


def test_standardized_inputs_take_a_step_that_sees_them(sample_split, cpu):
    """A step over raw pixels folds in the 1/255 and nothing more: with --normalize standardize the CPU must choose
    a step that takes the prepared floats, and train as the generic math does."""
    config = TrainConfig(epochs=4, normalize="standardize", lr=0.05)
    arch = config.architecture(784)
    assert not cpu.step(arch, dtype="float32", columns=4500, pixels=False).pixels
    fast, generic = fit(sample_split, config, backend=cpu), fit(sample_split, config, backend=get_backend("cpu",
                                                                                                          fast=False))
    assert not fast.model.info["step"].startswith("single pass")
    np.testing.assert_allclose([s.loss for s in fast.history], [s.loss for s in generic.history], rtol=1e-5)


class _Recording:
    """A gradient pass (the generic math) that records what each call was given."""

    def __init__(self, arch, reads_in_place):
        self.arch, self.reads_in_place, self.calls = arch, reads_in_place, []

    def __call__(self, params, X, Y, y, *, index=None, **options):
        self.calls.append((X, index))
        if index is not None:
            X, Y, y = X[:, index], Y[:, index], y[index]
        return loss_and_gradients(params, X, Y, y, self.arch, **options)


@pytest.mark.parametrize("in_place", [True, False], ids=["reads-in-place", "gathered"])
def test_a_mini_batch_reaches_the_pass_as_an_index_into_the_data_when_it_reads_in_place(in_place):
    cpu = get_backend("cpu", fast=False)
    data = load_bundled_sample()
    train = DeviceData.from_host(data.train_images[:300].T, data.train_labels[:300].astype(np.int64), backend=cpu,
                                 dtype="float64")
    arch = Architecture((784, 8, 10))
    params = init_params(arch, init="he", seed=0, dtype="float64")
    columns = np.random.default_rng(1).permutation(300)[:77]
    recording = _Recording(arch, in_place)

    stepped = train_step(params, {}, train, arch, lr=0.1, t=1, rule=Optimizer("gd"), gradients=recording,
                         columns=columns)
    expected = train_step(params, {}, train.take(columns), arch, lr=0.1, t=1, rule=Optimizer("gd"))
    (X, index), = recording.calls
    if in_place:
        assert X is train.X and index is columns  # nothing gathered
    else:
        assert index is None and np.array_equal(X, train.X[:, columns])
    for (W, b), (W_expected, b_expected) in zip(stepped[0], expected[0]):
        np.testing.assert_array_equal(W, W_expected)
        np.testing.assert_array_equal(b, b_expected)


def test_mini_batches_on_the_single_pass_read_the_training_pixels_in_place(sample_split, cpu, monkeypatch):
    """The CPU's single pass takes each mini-batch as an index into the uint8 training pixels (no batch is gathered,
    no index is made per batch), and trains as the generic math does."""
    config = TrainConfig(hidden=(16,), epochs=2, lr=0.3, batch_size=600, optimizer="momentum", l2=0.01)
    assert cpu.step(config.architecture(784), dtype="float32", columns=600).pixels
    gathered = []
    monkeypatch.setattr(DeviceData, "take", lambda self, columns: gathered.append(columns))
    built = []
    real_samples_of = numba_cpu.samples_of
    monkeypatch.setattr(numba_cpu, "samples_of", lambda X: built.append(X) or real_samples_of(X))
    fast = fit(sample_split, config, backend=cpu)
    monkeypatch.undo()
    assert gathered == [] and len(built) == 1 and built[0].shape == (784, len(sample_split.y_train))
    generic = fit(sample_split, config, backend=get_backend("cpu", fast=False))
    for ours, reference in zip(fast.history, generic.history, strict=True):
        assert ours.train_accuracy == pytest.approx(reference.train_accuracy, abs=5 / 4500)  # a few digits at most
    for a, b in zip(fast.model.params, generic.model.params):
        np.testing.assert_allclose(a.W, b.W, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("layout", ["columns contiguous", "rows contiguous"])
def test_taking_samples_gathers_the_columns_whatever_the_layout(layout):
    rng = np.random.default_rng(0)
    rows = rng.random((50, 7), dtype=np.float32)
    X = rows.T if layout == "columns contiguous" else np.ascontiguousarray(rows.T)  # (7, 50) either way
    y = rng.integers(0, 10, 50)
    data = DeviceData(X, y, np.eye(10, dtype=np.float32)[:, y])
    columns = np.array([4, 49, 0, 4, 17])
    part = data.take(columns)
    assert np.array_equal(part.X, X[:, columns]) and np.array_equal(part.y, y[columns])
    assert np.array_equal(part.Y, data.Y[:, columns])
    # the columns-contiguous X keeps its layout: its batch was gathered as rows of X.T, not through a copy of all of X
    assert part.X.flags.f_contiguous == (layout == "columns contiguous")
