"""Update rules, L2 and mini-batches: each rule learns, Adam beats plain descent, and the formulas hold exactly."""

from __future__ import annotations

import numpy as np
import pytest

from gpunn.data import load_bundled_sample, split
from gpunn.gradcheck import check_gradients, random_problem
from gpunn.nn import Architecture, Layer, backward, cost, forward, init_params, l2_cost, one_hot
from gpunn.optim import Optimizer
from gpunn.train import TrainConfig, fit


@pytest.fixture(scope="module")
def sample_split():
    return split(load_bundled_sample(), val_size=500, seed=0)


@pytest.mark.parametrize("optimizer, lr", [("gd", 0.1), ("momentum", 0.1), ("rmsprop", 0.001), ("adam", 0.001)])
def test_every_rule_lowers_the_loss_on_every_backend(sample_split, backend, optimizer, lr):
    result = fit(sample_split, TrainConfig(hidden=(16,), epochs=4, lr=lr, optimizer=optimizer, batch_size=500),
                 backend=backend)
    losses = [s.loss for s in result.history]
    assert losses[-1] < losses[0] * 0.9, losses


def test_adam_beats_plain_gradient_descent_at_equal_epochs(sample_split, cpu):
    gd = fit(sample_split, TrainConfig(epochs=20, lr=0.1), backend=cpu)
    adam = fit(sample_split, TrainConfig(epochs=20, lr=0.01, optimizer="adam"), backend=cpu)
    assert adam.history[-1].loss < gd.history[-1].loss
    assert adam.history[-1].val_accuracy > gd.history[-1].val_accuracy


def test_the_rules_first_steps_by_hand():
    P, dP = np.array([[1.0, -2.0]]), np.array([[0.5, -0.25]])
    params, grads = [Layer(P, np.zeros((1, 1)))], [Layer(dP, np.full((1, 1), 2.0))]
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8

    def first_two(name):
        rule = Optimizer(name, b1, b2, eps)
        state = rule.init(params)
        one, state = rule.step(params, grads, state, lr, 1)
        two, _ = rule.step(one, grads, state, lr, 2)
        return one[0].W, two[0].W

    one, two = first_two("gd")
    np.testing.assert_allclose(two, P - 2 * lr * dP)
    one, two = first_two("momentum")  # v1 = 0.1 dP, v2 = 0.19 dP
    np.testing.assert_allclose(one, P - lr * 0.1 * dP)
    np.testing.assert_allclose(two, P - lr * (0.1 + 0.19) * dP)
    one, _ = first_two("rmsprop")  # s1 = 0.001 dP**2
    np.testing.assert_allclose(one, P - lr * dP / (np.sqrt(0.001 * dP**2) + eps))
    one, two = first_two("adam")  # bias correction: the first two steps are lr * sign(dP) each
    np.testing.assert_allclose(one, P - lr * np.sign(dP), rtol=1e-7)
    np.testing.assert_allclose(two, P - 2 * lr * np.sign(dP), rtol=1e-7)


def test_l2_adds_lambda_over_m_times_w_to_dw_and_nothing_to_db():
    arch = Architecture((6, 5, 3))
    rng = np.random.default_rng(0)
    params = init_params(arch, init="he", seed=0, dtype="float64")
    X, Y = rng.random((6, 8)), one_hot(rng.integers(0, 3, 8), 3, np.float64)
    trace = forward(params, X, arch)
    plain, with_l2 = backward(params, trace, Y, arch), backward(params, trace, Y, arch, l2=0.7)
    for (W, _), (dW, db), (dW2, db2) in zip(params, plain, with_l2):
        np.testing.assert_array_equal(dW2, dW + 0.7 / 8 * W)
        np.testing.assert_array_equal(db2, db)
    assert float(l2_cost(params, 0.7, 8)) == pytest.approx(0.7 / 16 * sum((W**2).sum() for W, _ in params))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_l2_gradients_match_central_differences(activation):
    arch = Architecture((5, 4, 3), activation)
    for check in check_gradients(*random_problem(arch, samples=9, seed=1), arch, l2=0.3):
        assert check.relative_error < 1e-7, check


def test_a_batch_of_every_sample_is_full_batch_exactly(sample_split, cpu):
    full = fit(sample_split, TrainConfig(epochs=3, optimizer="adam", lr=0.01), backend=cpu)
    batched = fit(sample_split, TrainConfig(epochs=3, optimizer="adam", lr=0.01, batch_size=len(sample_split.y_train)),
                  backend=cpu)
    assert [s.loss for s in batched.history] == [s.loss for s in full.history]
    np.testing.assert_array_equal(batched.model.params[0].W, full.model.params[0].W)


def test_mini_batches_use_the_last_partial_batch(sample_split, cpu, monkeypatch):
    """4,500 samples in batches of 1,000: five steps per epoch, the last of 500; every sample once per epoch."""
    import gpunn.train

    seen = []
    real_step = gpunn.train.train_step

    def recording_step(params, state, data, arch, **kwargs):
        labels = np.asarray(data.y)[np.asarray(kwargs["columns"])]  # the step's samples: columns of all the data
        seen.append((kwargs["t"], len(labels), labels))
        return real_step(params, state, data, arch, **kwargs)

    monkeypatch.setattr(gpunn.train, "train_step", recording_step)
    fit(sample_split, TrainConfig(epochs=2, batch_size=1000), backend=cpu)
    assert [t for t, _, _ in seen] == list(range(1, 11))
    assert [m for _, m, _ in seen] == [1000, 1000, 1000, 1000, 500] * 2
    for epoch in (seen[:5], seen[5:]):
        labels = np.concatenate([y for _, _, y in epoch])
        assert np.array_equal(np.sort(labels), np.sort(sample_split.y_train))
    # reshuffled: the two epochs see the samples in different orders
    assert not np.array_equal(seen[0][2], seen[5][2])


def test_resume_with_adam_and_mini_batches_is_bit_identical(sample_split, cpu):
    config = dict(hidden=(16,), optimizer="adam", lr=0.005, batch_size=700)
    straight = fit(sample_split, TrainConfig(epochs=6, **config), backend=cpu)
    half = fit(sample_split, TrainConfig(epochs=3, **config), backend=cpu)
    assert set(half.model.optimizer_state) == {"v", "s"}
    resumed = fit(sample_split, TrainConfig(epochs=6, **config), backend=cpu, resume=half.model)
    for a, b in zip(straight.model.params, resumed.model.params):
        np.testing.assert_array_equal(a.W, b.W)


def test_learning_rate_schedules():
    from gpunn.optim import learning_rate

    assert [learning_rate("constant", 0.1, e, 10) for e in (1, 10)] == [0.1, 0.1]
    assert [learning_rate("step", 1.0, e, 10, step_size=3, gamma=0.5) for e in (1, 3, 4, 7, 10)] == \
        [1.0, 1.0, 0.5, 0.25, 0.125]
    cosine = [learning_rate("cosine", 0.2, e, 4) for e in (1, 2, 3, 4)]
    assert cosine == pytest.approx([0.2, 0.2 * (1 + np.cos(np.pi / 4)) / 2, 0.1, 0.2 * (1 + np.cos(3 * np.pi / 4)) / 2])
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        learning_rate("linear", 0.1, 1, 10)


def test_early_stopping_keeps_the_best_epoch(sample_split, cpu):
    """Adam at a high rate overfits the 4,500 digits fast; training stops K epochs after the best validation loss
    and returns that epoch's weights."""
    config = TrainConfig(hidden=(64,), epochs=200, optimizer="adam", lr=0.01, batch_size=250, early_stop=3)
    result = fit(sample_split, config, backend=cpu)
    stop = result.model.info["early_stop"]
    assert stop["stopped"] and stop["epochs_run"] == stop["best_epoch"] + 3 < 200
    val_losses = {s.epoch: s.val_loss for s in result.history}
    assert val_losses[stop["best_epoch"]] == min(val_losses.values())
    assert result.model.info["epochs_done"] == stop["best_epoch"]
    # the kept weights are the best epoch's: training exactly that many epochs gives the same arrays
    again = fit(sample_split, TrainConfig(hidden=(64,), epochs=stop["best_epoch"], optimizer="adam", lr=0.01,
                                          batch_size=250), backend=cpu)
    np.testing.assert_array_equal(again.model.params[0].W, result.model.params[0].W)


def test_early_stopping_needs_a_validation_split(cpu):
    from gpunn.errors import ConfigError

    parts = split(load_bundled_sample(), val_size=0, seed=0)
    with pytest.raises(ConfigError, match="needs --val-size > 0"):
        fit(parts, TrainConfig(epochs=5, early_stop=2), backend=cpu)


def test_dropout_keeps_the_expected_activation_scale():
    arch = Architecture((50, 400, 10))
    params = init_params(arch, init="he", seed=0, dtype="float64")
    X = np.random.default_rng(1).random((50, 2000))
    plain = forward(params, X, arch)
    dropped = forward(params, X, arch, dropout=0.4, rng=np.random.default_rng(2))
    A, A_drop, M = plain.A[1], dropped.A[1], dropped.M[1]
    assert set(np.unique(M)) == {0.0, 1 / 0.6}
    assert (M == 0).mean() == pytest.approx(0.4, abs=0.005)
    assert A_drop.mean() == pytest.approx(A.mean(), rel=0.01)  # inverted dropout: same expectation
    np.testing.assert_array_equal(A_drop, A * M)
    assert dropped.M[0] is None and dropped.M[2] is None  # input and output are never dropped


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_dropout_gradients_match_central_differences_for_fixed_masks(activation):
    """With the masks held fixed (the same seed for every evaluation of J), dropout's backward pass is exact."""
    arch = Architecture((5, 6, 4, 3), activation)
    params, X, Y = random_problem(arch, samples=9, seed=4)

    def trace():
        return forward(params, X, arch, dropout=0.5, rng=np.random.default_rng(7))

    analytic = backward(params, trace(), Y, arch)
    for layer, grad in zip(params, analytic):
        for P, dP in zip(layer, grad):
            numeric = np.zeros_like(P)
            for index in np.ndindex(P.shape):
                saved = P[index]
                P[index] = saved + 1e-7
                plus = float(cost(trace().Z[-1], Y))
                P[index] = saved - 1e-7
                minus = float(cost(trace().Z[-1], Y))
                P[index] = saved
                numeric[index] = (plus - minus) / 2e-7
            assert np.linalg.norm(dP - numeric) / (np.linalg.norm(dP) + np.linalg.norm(numeric)) < 1e-7


def test_dropout_trains_on_every_backend_and_is_off_at_evaluation(sample_split, backend):
    from gpunn.train import evaluate

    config = TrainConfig(hidden=(32,), epochs=3, optimizer="adam", lr=0.003, batch_size=900, dropout=0.3)
    result = fit(sample_split, config, backend=backend)
    assert result.history[-1].loss < result.history[0].loss
    first = evaluate(result.model, sample_split.X_val, sample_split.y_val, backend=backend)
    assert first == evaluate(result.model, sample_split.X_val, sample_split.y_val, backend=backend)
    assert first == pytest.approx(result.history[-1].val_accuracy)


def test_resume_with_dropout_is_bit_identical(sample_split, cpu):
    config = dict(hidden=(16,), optimizer="adam", lr=0.005, batch_size=1500, dropout=0.2)
    straight = fit(sample_split, TrainConfig(epochs=4, **config), backend=cpu)
    half = fit(sample_split, TrainConfig(epochs=2, **config), backend=cpu)
    resumed = fit(sample_split, TrainConfig(epochs=4, **config), backend=cpu, resume=half.model)
    np.testing.assert_array_equal(straight.model.params[1].W, resumed.model.params[1].W)
