"""The math: shapes from the seed notes, finite-difference gradients, numerical stability, XOR, initialization."""

from __future__ import annotations

import numpy as np
import pytest

from gpunn.gradcheck import check_gradients, random_problem
from gpunn.nn import (
    Architecture,
    Layer,
    accuracy,
    backward,
    cost,
    forward,
    hidden_delta,
    init_params,
    linear_backward,
    one_hot,
    output_delta,
    softmax,
)
from gpunn.optim import Optimizer


def to_backend(backend, params):
    return [Layer(backend.asarray(W), backend.asarray(b)) for W, b in params]


def test_shapes_match_the_seed_tables(cpu):
    """784-10-10 with m samples: every array of the seed notes' 'Vars and shapes' table, step by step."""
    m = 37
    rng = np.random.default_rng(1)
    arch = Architecture((784, 10, 10))
    (W1, b1), (W2, b2) = init_params(arch, init="he", seed=0)
    X = rng.random((784, m), dtype=np.float32)
    Y = one_hot(rng.integers(0, 10, m), 10, np.float32)
    trace = forward([Layer(W1, b1), Layer(W2, b2)], X, arch)
    Z1, A1, Z2, A2 = trace.Z[1], trace.A[1], trace.Z[2], trace.A[2]
    dZ2 = output_delta(A2, Y)
    dW2, db2 = linear_backward(dZ2, A1)
    dZ1 = hidden_delta(W2, dZ2, Z1, "relu")
    dW1, db1 = linear_backward(dZ1, X)
    expected = {
        "W1": (10, 784), "b1": (10, 1), "Z1": (10, m), "A1": (10, m), "W2": (10, 10), "b2": (10, 1),
        "Z2": (10, m), "A2": (10, m), "dZ2": (10, m), "dW2": (10, 10), "db2": (10, 1), "dZ1": (10, m),
        "dW1": (10, 784), "db1": (10, 1),
    }
    arrays = {
        "W1": W1, "b1": b1, "Z1": Z1, "A1": A1, "W2": W2, "b2": b2, "Z2": Z2, "A2": A2, "dZ2": dZ2, "dW2": dW2,
        "db2": db2, "dZ1": dZ1, "dW1": dW1, "db1": db1,
    }
    assert {name: array.shape for name, array in arrays.items()} == expected
    # backward() is exactly these steps
    (g1, gb1), (g2, gb2) = backward([Layer(W1, b1), Layer(W2, b2)], trace, Y, arch)
    for a, b in [(g1, dW1), (gb1, db1), (g2, dW2), (gb2, db2)]:
        np.testing.assert_array_equal(a, b)


def test_bias_gradient_is_per_unit_mean_over_samples(cpu):
    """db[i] = (1/m) sum_j dZ[i, j]: one value per unit, not the seed notebook's single scalar."""
    dZ = np.array([[1.0, 2.0, 3.0], [-3.0, 0.0, 0.0]])
    dW, db = linear_backward(dZ, np.ones((4, 3)))
    np.testing.assert_array_equal(db, [[2.0], [-1.0]])
    np.testing.assert_array_equal(dW, [[2.0] * 4, [-1.0] * 4])


@pytest.mark.parametrize(
    "sizes, activation, output",
    [
        ((6, 5, 4), "relu", "softmax"),
        ((6, 5, 4), "sigmoid", "softmax"),
        ((6, 5, 4), "tanh", "softmax"),
        ((6, 5, 4, 3), "relu", "softmax"),
        ((6, 5, 4, 3), "tanh", "softmax"),
        ((2, 3, 1), "sigmoid", "sigmoid"),
    ],
)
def test_gradients_match_central_differences(sizes, activation, output):
    """Analytic gradients agree with (J(p+e) - J(p-e)) / 2e, e = 1e-7, to a relative error below 1e-7."""
    arch = Architecture(sizes, activation, output)
    params, X, Y = random_problem(arch, samples=11, seed=3)
    for check in check_gradients(params, X, Y, arch):
        assert check.relative_error < 1e-7, check


def test_gradient_check_catches_a_wrong_backward_pass(monkeypatch):
    """The check can fail: with the notebook's scalar bias gradient, the b errors are of order 1."""
    import gpunn.nn

    real = gpunn.nn.linear_backward

    def scalar_bias(dZ, A_prev):
        dW, _ = real(dZ, A_prev)
        return Layer(dW, np.full((dZ.shape[0], 1), dZ.sum() / dZ.shape[1]))

    monkeypatch.setattr(gpunn.nn, "linear_backward", scalar_bias)
    arch = Architecture((6, 5, 4))
    checks = {c.name: c.relative_error for c in check_gradients(*random_problem(arch, samples=7, seed=0), arch)}
    assert checks["W1"] < 1e-7 and checks["W2"] < 1e-7
    assert checks["b1"] > 0.1 and checks["b2"] > 0.1


def test_softmax_and_cost_stay_finite_for_huge_logits(backend):
    """Max subtraction: logits of +-1e4 in float32 give exact probabilities and a finite loss, with no warning."""
    xp = backend.xp
    Z = backend.asarray(np.array([[1e4, -1e4], [0.0, 1e4], [-1e4, -1e4]], dtype=np.float32))
    Y = backend.asarray(np.array([[1, 0], [0, 1], [0, 0]], dtype=np.float32))
    A = backend.to_numpy(softmax(Z))
    np.testing.assert_array_equal(A, [[1, 0], [0, 1], [0, 0]])
    assert float(backend.to_numpy(cost(Z, Y))) == 0.0
    wrong = backend.asarray(np.array([[0, 1], [1, 0], [0, 0]], dtype=np.float32))
    loss = float(backend.to_numpy(cost(Z, wrong)))
    assert np.isfinite(loss) and loss == pytest.approx(1.5e4, rel=1e-6)
    assert A.dtype == np.float32 and xp.isdtype(softmax(Z).dtype, "real floating")


def test_xor_learns_its_truth_table(cpu):
    """The seed notes' XOR example: 2-3-1, sigmoid hidden and output, binary cross-entropy, full batch."""
    arch = Architecture((2, 3, 1), activation="sigmoid", output="sigmoid")
    X = np.array([[0, 0, 1, 1], [0, 1, 0, 1]], dtype=np.float64)
    Y = np.array([[0, 1, 1, 0]], dtype=np.float64)
    params = init_params(arch, init="uniform", seed=0, dtype="float64")
    first = float(cost(forward(params, X, arch).Z[-1], Y, "sigmoid"))
    for _ in range(5000):
        trace = forward(params, X, arch)
        params, _ = Optimizer("gd").step(params, backward(params, trace, Y, arch), {}, lr=2.0, t=1)
    trace = forward(params, X, arch)
    assert float(cost(trace.Z[-1], Y, "sigmoid")) < first / 10
    np.testing.assert_array_equal(trace.A[-1] > 0.5, [[False, True, True, False]])


@pytest.mark.parametrize("init, std", [("he", np.sqrt(2 / 784)), ("xavier", np.sqrt(1 / 784))])
def test_gaussian_inits_have_the_seed_notes_scale(init, std):
    (W1, b1), (W2, b2) = init_params(Architecture((784, 300, 10)), init=init, seed=0)
    assert W1.dtype == np.float32 and W1.shape == (300, 784)
    assert W1.std() == pytest.approx(std, rel=0.01)
    assert abs(W1.mean()) < std / 50
    assert not b1.any() and not b2.any()


def test_uniform_init_is_rand_minus_half_for_weights_and_biases():
    (W, b), = init_params(Architecture((784, 10)), init="uniform", seed=0, dtype="float64")
    assert -0.5 <= W.min() < -0.49 and 0.49 < W.max() < 0.5
    assert b.shape == (10, 1) and (b != 0).all() and np.abs(b).max() < 0.5


def test_init_is_deterministic_per_seed():
    arch = Architecture((784, 16, 16, 10))
    same = zip(init_params(arch, init="he", seed=5), init_params(arch, init="he", seed=5))
    assert all(np.array_equal(a.W, b.W) for a, b in same)
    assert not np.array_equal(init_params(arch, init="he", seed=5)[0].W, init_params(arch, init="he", seed=6)[0].W)


def test_one_hot_and_accuracy(backend):
    y = backend.asarray(np.array([2, 0, 1, 2]))
    Y = one_hot(y, 3, backend.xp.float32)
    np.testing.assert_array_equal(backend.to_numpy(Y), [[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]])
    A = backend.asarray(np.array([[0.1, 0.8, 0.1, 0.2], [0.2, 0.1, 0.8, 0.2], [0.7, 0.1, 0.1, 0.6]], np.float32))
    assert float(backend.to_numpy(accuracy(A, y))) == 1.0
    assert float(backend.to_numpy(accuracy(A[:, ::-1], y))) == 0.5


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_every_backend_computes_the_numpy_step(backend, activation):
    """Forward and backward of a 2-hidden-layer net on each backend match NumPy's float64 result in float32."""
    arch = Architecture((20, 8, 6, 10), activation)
    rng = np.random.default_rng(0)
    X = rng.random((20, 50)).astype(np.float32)
    y = rng.integers(0, 10, 50)
    host = init_params(arch, init="xavier", seed=1)
    ref_params = [Layer(W.astype(np.float64), b.astype(np.float64)) for W, b in host]
    ref_trace = forward(ref_params, X.astype(np.float64), arch)
    ref_grads = backward(ref_params, ref_trace, one_hot(y, 10, np.float64), arch)

    params = to_backend(backend, host)
    trace = forward(params, backend.asarray(X), arch)
    Y = one_hot(backend.asarray(y), 10, backend.xp.float32)
    grads = backward(params, trace, Y, arch)
    np.testing.assert_allclose(backend.to_numpy(trace.A[-1]), ref_trace.A[-1], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        for g, w in zip(got, want):
            assert backend.to_numpy(g).dtype == np.float32
            np.testing.assert_allclose(backend.to_numpy(g), w, rtol=1e-4, atol=1e-6)
