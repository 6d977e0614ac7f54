"""Numerical gradient checking (seed notes: "Numerical approximation of gradients").

Every analytic gradient from :func:`gpunn.nn.backward` is compared with the two-sided difference
(J(p + eps) - J(p - eps)) / (2 eps), element by element, in float64 on the host. Each parameter array gets the
relative error ||analytic - numeric|| / (||analytic|| + ||numeric||). Above about 1e-7 the backward pass is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpunn.nn import Architecture, Layer, backward, cost, forward, l2_cost, one_hot

EPSILON = 1e-7
THRESHOLD = 1e-7


@dataclass(frozen=True)
class ParameterCheck:
    name: str  # "W1", "b1", ...
    relative_error: float
    max_abs_difference: float


def numerical_gradients(params: list[Layer], X: np.ndarray, Y: np.ndarray, arch: Architecture, *, l2: float = 0.0,
                        eps: float = EPSILON) -> list[Layer]:
    """dJ/dp by central differences for every parameter (float64 NumPy arrays, perturbed in place and restored)."""
    m = X.shape[1]

    def J() -> float:
        return float(cost(forward(params, X, arch).Z[-1], Y, arch.output) + l2_cost(params, l2, m))

    grads = []
    for layer in params:
        pair = []
        for P in layer:
            G = np.zeros_like(P)
            for index in np.ndindex(P.shape):
                saved = P[index]
                P[index] = saved + eps
                plus = J()
                P[index] = saved - eps
                minus = J()
                P[index] = saved
                G[index] = (plus - minus) / (2 * eps)
            pair.append(G)
        grads.append(Layer(*pair))
    return grads


def check_gradients(params: list[Layer], X: np.ndarray, Y: np.ndarray, arch: Architecture, *, l2: float = 0.0
                    ) -> list[ParameterCheck]:
    """Analytic against numerical gradients, one :class:`ParameterCheck` per parameter array."""
    analytic = backward(params, forward(params, X, arch), Y, arch, l2=l2)
    numeric = numerical_gradients(params, X, Y, arch, l2=l2)
    checks = []
    for l, (a_layer, n_layer) in enumerate(zip(analytic, numeric), start=1):
        for kind, a, n in zip(("W", "b"), a_layer, n_layer):
            denominator = np.linalg.norm(a) + np.linalg.norm(n)
            relative = float(np.linalg.norm(a - n) / denominator) if denominator else 0.0
            checks.append(ParameterCheck(f"{kind}{l}", relative, float(np.abs(a - n).max())))
    return checks


def random_problem(arch: Architecture, *, samples: int, seed: int) -> tuple[list[Layer], np.ndarray, np.ndarray]:
    """Unit-variance weights, biases and inputs, and random labels: gradients well above the difference quotient's
    rounding error (about 1e-16 * J / eps), and biases away from zero so that their gradients are exercised too."""
    rng = np.random.default_rng(seed)
    params = [Layer(rng.normal(size=(n_out, n_in)), rng.normal(size=(n_out, 1)))
              for n_in, n_out in zip(arch.sizes[:-1], arch.sizes[1:])]
    X = rng.normal(size=(arch.sizes[0], samples))
    if arch.output == "softmax":
        Y = one_hot(rng.integers(0, arch.sizes[-1], samples), arch.sizes[-1], np.float64)
    else:
        Y = rng.integers(0, 2, (arch.sizes[-1], samples)).astype(np.float64)
    return params, X, Y
