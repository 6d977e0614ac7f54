"""The gradient check in both directions: correct gradients pass for every size (the seed network 784-10-10
included, which a fixed 1e-7 threshold failed), and each planted bug fails, in the arrays it touches and by orders
of magnitude. The bugs live in a hand-written backward pass here, so that gpunn/nn.py stays untouched."""

from __future__ import annotations

import numpy as np
import pytest

import gpunn.gradcheck
from gpunn.gradcheck import _differences, check_gradients, format_report, passed, random_problem
from gpunn.nn import Architecture, Layer, forward

BUGS = ("sign", "1/m", "relu", "bias", "l2")


def hand_backward(params, trace, Y, arch, *, l2=0.0, bug=None):
    """The README's backward pass written out once more, with one of BUGS planted on request:
    sign: dZ[L] = Y - A[L]; 1/m: the sums over samples are not divided by m; relu: relu'(Z) = (Z >= -1) instead
    of (Z > 0); bias: db = 0; l2: (lambda / 2m) W added to dW instead of (lambda / m) W."""
    L, m = len(params), Y.shape[1]
    dZ = (Y - trace.A[L]) if bug == "sign" else (trace.A[L] - Y)
    divisor = 1 if bug == "1/m" else m
    grads = []
    for l in range(L, 0, -1):
        dW = dZ @ trace.A[l - 1].T / divisor + (l2 / (2 * m) if bug == "l2" else l2 / m) * params[l - 1].W
        db = np.zeros((dZ.shape[0], 1)) if bug == "bias" else dZ.sum(axis=1, keepdims=True) / divisor
        grads.append(Layer(dW, db))
        if l > 1:
            Z = trace.Z[l - 1]
            if arch.activation == "relu":
                slope = (Z >= -1.0) if bug == "relu" else (Z > 0)
            elif arch.activation == "sigmoid":
                S = 1 / (1 + np.exp(-Z))
                slope = S * (1 - S)
            else:
                slope = 1 - np.tanh(Z) ** 2
            dZ = (params[l - 1].W.T @ dZ) * slope
    return grads[::-1]


def run(sizes, activation="relu", *, samples, l2=0.0, seed=0, bug=None, hand=False):
    arch = Architecture(sizes, activation)
    params, X, Y = random_problem(arch, samples=samples, seed=seed)
    gradients = None
    if hand or bug:
        gradients = hand_backward(params, forward(params, X, arch), Y, arch, l2=l2, bug=bug)
    return check_gradients(params, X, Y, arch, l2=l2, gradients=gradients)


@pytest.mark.parametrize("samples", [32, 100])
def test_the_seed_network_passes(samples):
    """784-10-10, the shape `gpunn gradcheck` failed at 1.2e-7 to 2.6e-7 against its fixed 1e-7 threshold."""
    checks = run((784, 10, 10), samples=samples)
    report = format_report(checks)
    assert passed(checks), "\n".join(report)
    assert report[-1].endswith(": ok") and report[-1].startswith("all 7,960 entries within their expected error")
    for check in checks:
        # the bound is honest, not loose: within some 10^-9 of the gradient, and the error a fair part of it
        assert check.expected_error < 1e-9 and check.ratio > 0.01, check


@pytest.mark.parametrize(
    "sizes, activation, samples, l2",
    [
        ((8, 5, 4), "relu", 16, 0.0),  # the CLI's default
        ((30, 20, 15, 10), "relu", 32, 0.0),
        ((12, 9, 8, 7, 5), "tanh", 20, 0.5),
        ((40, 16, 10), "sigmoid", 32, 0.0),
        ((40, 16, 10), "tanh", 7, 3.0),
        ((25, 12, 10), "relu", 1, 0.1),  # one sample: half the units dead, J unchanged by their weights
    ],
)
def test_correct_gradients_pass(sizes, activation, samples, l2):
    checks = run(sizes, activation, samples=samples, l2=l2)
    assert passed(checks), "\n".join(format_report(checks))
    # the hand-written pass below, without a bug, passes too: what fails in the next test is the bug
    assert passed(run(sizes, activation, samples=samples, l2=l2, hand=True))


@pytest.mark.parametrize(
    "bug, wrong",
    [
        ("sign", {"W1", "b1", "W2", "b2", "W3", "b3"}),
        ("1/m", {"W1", "b1", "W2", "b2", "W3", "b3"}),
        ("relu", {"W1", "b1", "W2", "b2"}),  # relu' is used below the hidden layers only
        ("bias", {"b1", "b2", "b3"}),
        ("l2", {"W1", "W2", "W3"}),
    ],
)
def test_planted_bugs_fail_clearly(bug, wrong):
    checks = run((30, 16, 12, 10), samples=32, l2=0.5, bug=bug)
    report = format_report(checks)
    assert not passed(checks) and report[-1].endswith(": FAILED"), "\n".join(report)
    assert {c.name for c in checks if not c.ok} == wrong, "\n".join(report)
    # not a near miss: each wrong array is thousands of times outside its expected error
    assert min(c.ratio for c in checks if not c.ok) > 1e3, "\n".join(report)
    rows = {line.split()[0]: line for line in report[3:-1]}
    assert {name for name, line in rows.items() if "above the expected error" in line} == wrong


def test_the_default_gradients_come_from_the_module_level_backward(monkeypatch):
    """Tests and learners can swap the backward pass under check without touching gpunn/nn.py."""
    monkeypatch.setattr(gpunn.gradcheck, "backward",
                        lambda params, trace, Y, arch, l2=0.0: hand_backward(params, trace, Y, arch, l2=l2, bug="bias"))
    checks = run((10, 6, 4), samples=8)
    assert {c.name for c in checks if not c.ok} == {"b1", "b2"}


def test_a_relu_kink_inside_the_step_is_skipped_not_failed():
    """With a pre-activation 1e-9 from 0, the step moves it across the kink: D(h) then measures neither one-sided
    slope, so those entries are left out (and counted) instead of failing a correct gradient."""
    arch = Architecture((20, 6, 4))
    params, X, Y = random_problem(arch, samples=5, seed=1)
    Z1 = params[0].W @ X + params[0].b
    params[0].b[2, 0] -= Z1[2, 0] - 1e-9  # unit 2 sits on its kink for sample 0
    checks = {c.name: c for c in check_gradients(params, X, Y, arch)}
    assert checks["W1"].skipped == 20 and checks["b1"].skipped == 1  # row 2 of W1, and b1[2]
    assert checks["W2"].skipped == checks["b2"].skipped == 0
    assert all(c.ok for c in checks.values())

    # and skipping is needed: at those entries the difference quotient is far from the (correct) gradient
    trace = forward(params, X, arch)
    d = _differences(params, trace, Y, arch, 0.0, 0, 1)
    analytic = gpunn.gradcheck.backward(params, trace, Y, arch)[0].b.reshape(-1)
    assert d.kink.tolist() == [False, False, True, False, False, False]
    assert abs(analytic[2] - d.D1[2]) > 1e3 * checks["b1"].expected_error


def test_float32_parameters_are_checked_in_float64():
    arch = Architecture((10, 6, 4))
    params, X, Y = random_problem(arch, samples=8, seed=2)
    single = [Layer(W.astype(np.float32), b.astype(np.float32)) for W, b in params]
    assert passed(check_gradients(single, X.astype(np.float32), Y, arch))
