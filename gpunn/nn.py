"""The network's math, written once against the Python array API standard.

Notation and shapes are the seed notes': ``X = A[0]`` is (n_0, m) with one sample per column, layer ``l`` has
``W[l]`` (n_l, n_{l-1}) and ``b[l]`` (n_l, 1), and for l = 1..L::

    Z[l] = W[l] @ A[l-1] + b[l]         A[l] = g(Z[l])  (hidden: relu/sigmoid/tanh; output: softmax or sigmoid)

    dZ[L] = A[L] - Y                    (softmax + cross-entropy, or sigmoid + binary cross-entropy)
    dW[l] = dZ[l] @ A[l-1].T / m        db[l] = sum(dZ[l], over samples) / m
    dZ[l-1] = (W[l].T @ dZ[l]) * g'(Z[l-1])
    W[l] <- W[l] - lr * dW[l]           b[l] <- b[l] - lr * db[l]    (gpunn/optim.py: this and momentum, RMSprop, Adam)

Each function takes its namespace from its arguments (``array_namespace``), so NumPy, CuPy and array-api-strict
arrays all go through this same code. Functions are pure: they return new arrays and never modify their inputs.
Fast paths that work in place live on the backends and are tested against these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import array_namespace

from gpunn.errors import ConfigError

Array = Any  # an array of any array-API-standard library

ACTIVATIONS = ("relu", "sigmoid", "tanh")
OUTPUTS = ("softmax", "sigmoid")
INITS = ("he", "xavier", "uniform")
DTYPES = ("float32", "float64")
#: how a float32 run's matrix products may compute: in float32 (the reference), or on a GPU's tensor cores with their
#: inputs rounded to TF32 (10 mantissa bits) or bfloat16 (7), the products summed in float32; the weights, the
#: gradients and everything else stay float32 (see gpunn.backend.Backend.step)
PRECISIONS = ("float32", "tf32", "bf16")


# --- activations: g(Z), and the backward pass dZ = dA * g'(Z) ----------------------------------------------------


def relu(Z: Array) -> Array:
    """max(Z, 0), element-wise."""
    return array_namespace(Z).clip(Z, min=0)


def relu_backward(dA: Array, Z: Array) -> Array:
    """dA * relu'(Z), where relu'(Z) is 1 for Z > 0 and 0 elsewhere."""
    xp = array_namespace(dA, Z)
    return dA * xp.astype(Z > 0, dA.dtype)


def sigmoid(Z: Array) -> Array:
    """1 / (1 + exp(-Z)), computed as (1 + tanh(Z/2)) / 2, which never overflows."""
    xp = array_namespace(Z)
    return (xp.tanh(Z / 2) + 1) / 2


def sigmoid_backward(dA: Array, Z: Array) -> Array:
    """dA * sigmoid'(Z), with sigmoid'(Z) = sigmoid(Z) (1 - sigmoid(Z))."""
    S = sigmoid(Z)
    return dA * S * (1 - S)


def tanh(Z: Array) -> Array:
    return array_namespace(Z).tanh(Z)


def tanh_backward(dA: Array, Z: Array) -> Array:
    """dA * tanh'(Z), with tanh'(Z) = 1 - tanh(Z)**2."""
    T = tanh(Z)
    return dA * (1 - T * T)


def softmax(Z: Array) -> Array:
    """Column-wise softmax: A[i, j] = exp(Z[i, j]) / sum_k exp(Z[k, j]).  Z: (classes, m)."""
    xp = array_namespace(Z)
    # subtract each column's max first: exp overflows above ~88 in float32, and the result does not change
    E = xp.exp(Z - xp.max(Z, axis=0, keepdims=True))
    return E / xp.sum(E, axis=0, keepdims=True)


_HIDDEN: dict[str, tuple[Callable[[Array], Array], Callable[[Array, Array], Array]]] = {
    "relu": (relu, relu_backward),
    "sigmoid": (sigmoid, sigmoid_backward),
    "tanh": (tanh, tanh_backward),
}
_OUTPUT: dict[str, Callable[[Array], Array]] = {"softmax": softmax, "sigmoid": sigmoid}


def dropout_forward(A: Array, p: float, rng: Any) -> tuple[Array, Array | None]:
    """Inverted dropout: (A * M, M) with M = (u < 1 - p) / (1 - p), u uniform from ``rng.random(shape, dtype)``.

    Each unit is dropped with probability p and the others are scaled by 1/(1 - p), so that E[A * M] = A and
    nothing needs rescaling at evaluation. With p = 0 nothing is dropped: (A, None).
    """
    if not p:
        return A, None
    xp = array_namespace(A)
    keep = 1 - p
    M = xp.astype(rng.random(A.shape, dtype=A.dtype) < keep, A.dtype) / keep
    return A * M, M


def dropout_backward(dA: Array, M: Array | None) -> Array:
    """dA * M: the gradient reaches only the units the forward pass kept, scaled as they were."""
    return dA if M is None else dA * M


# --- the network ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """Layer sizes (n_0, n_1, ..., n_L), the hidden layers' activation, and the output layer.

    ``output="softmax"`` pairs with categorical cross-entropy (MNIST); ``output="sigmoid"`` with binary
    cross-entropy (the XOR example). Both give the same output gradient dZ[L] = A[L] - Y.
    """

    sizes: tuple[int, ...]
    activation: str = "relu"
    output: str = "softmax"

    def __post_init__(self) -> None:
        if len(self.sizes) < 2 or not all(isinstance(n, Integral) and not isinstance(n, bool) and n >= 1
                                          for n in self.sizes):
            raise ConfigError(f"layer sizes must be two or more positive integers, got {self.sizes}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.output not in OUTPUTS:
            raise ConfigError(f"unknown output {self.output!r}; expected one of {OUTPUTS}")

    @property
    def depth(self) -> int:
        """L, the number of layers with weights."""
        return len(self.sizes) - 1

    def __str__(self) -> str:
        return f"{'-'.join(map(str, self.sizes))} {self.activation}/{self.output}"


class Layer(NamedTuple):
    """One layer's parameters, or their gradients: W (n_out, n_in) and b (n_out, 1)."""

    W: Array
    b: Array


Params = list[Layer]


class Trace(NamedTuple):
    """What the forward pass keeps for the backward pass: Z[l] and A[l] for l = 0..L (Z[0] is None, A[0] = X),
    and the dropout masks M[l] (None where nothing was dropped: the input, the output, or every layer when p = 0)."""

    Z: list[Array | None]
    A: list[Array]
    M: list[Array | None]


def init_params(arch: Architecture, *, init: str, seed: int, dtype: str = "float32") -> list[Layer]:
    """Weights drawn on the host from ``numpy.random.default_rng(seed)``; NumPy arrays, ready for any backend.

    ``he``: W ~ N(0, 2/n_in) (for ReLU); ``xavier``: W ~ N(0, 1/n_in) (for tanh and sigmoid), both with b = 0;
    ``uniform``: W and b ~ U(-0.5, 0.5), the seed notebook's ``np.random.rand(...) - 0.5``. Drawing on the host
    and moving the result to the device makes a CPU run and a GPU run with the same seed start identical.
    """
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; expected one of {INITS}")
    rng = np.random.default_rng(seed)
    params = []
    for n_in, n_out in zip(arch.sizes[:-1], arch.sizes[1:]):
        if init == "uniform":
            W = rng.random((n_out, n_in)) - 0.5
            b = rng.random((n_out, 1)) - 0.5
        else:
            scale = np.sqrt((2.0 if init == "he" else 1.0) / n_in)
            W = rng.standard_normal((n_out, n_in)) * scale
            b = np.zeros((n_out, 1))
        params.append(Layer(W.astype(dtype), b.astype(dtype)))
    return params


def default_init(activation: str) -> str:
    """He initialization for ReLU, Xavier for the saturating activations (seed notes, "weight initialization")."""
    return "he" if activation == "relu" else "xavier"


def forward(params: Sequence[Layer], X: Array, arch: Architecture, *, dropout: float = 0.0, rng: Any = None
            ) -> Trace:
    """The forward pass. X: (n_0, m). Returns Z[l], A[l] for every layer; A[L] holds the class probabilities.

    ``dropout`` = p > 0 (training only) applies :func:`dropout_forward` to every hidden layer's activations, with
    masks drawn from ``rng``.
    """
    g, _ = _HIDDEN[arch.activation]
    L = len(params)
    Z: list[Array | None] = [None]
    A = [X]
    M: list[Array | None] = [None]
    for l, (W, b) in enumerate(params, start=1):
        Z.append(W @ A[l - 1] + b)
        if l < L:
            A_l, M_l = dropout_forward(g(Z[l]), dropout, rng)
        else:
            A_l, M_l = _OUTPUT[arch.output](Z[l]), None
        A.append(A_l)
        M.append(M_l)
    return Trace(Z, A, M)


def output_delta(A_L: Array, Y: Array) -> Array:
    """dZ[L] = A[L] - Y: the cost's gradient at the output logits, for softmax with cross-entropy and for a
    sigmoid with binary cross-entropy alike (the 1/m is applied in :func:`linear_backward`)."""
    return A_L - Y


def linear_backward(dZ: Array, A_prev: Array) -> Layer:
    """dW = dZ @ A_prev.T / m and db = sum(dZ over samples) / m: one gradient per weight and per unit's bias."""
    xp = array_namespace(dZ, A_prev)
    m = dZ.shape[1]
    return Layer(dZ @ A_prev.T / m, xp.sum(dZ, axis=1, keepdims=True) / m)


def hidden_delta(W_next: Array, dZ_next: Array, Z: Array, activation: str, M: Array | None = None) -> Array:
    """dZ[l] = (W[l+1].T @ dZ[l+1]) * g'(Z[l]): the error sent back through the next layer's weights (and through
    the dropout mask M[l] of the forward pass, where there was one)."""
    _, g_backward = _HIDDEN[activation]
    dA = dropout_backward(W_next.T @ dZ_next, M)
    return g_backward(dA, Z)


def backward(params: Sequence[Layer], trace: Trace, Y: Array, arch: Architecture, *, l2: float = 0.0) -> list[Layer]:
    """Gradients (dW[l], db[l]) of the mean cross-entropy for l = 1..L. Y: (n_L, m), one-hot (or 0/1).

    With ``l2`` = lambda > 0 the cost has the term (lambda / 2m) sum_l ||W[l]||_F^2 (:func:`l2_cost`), which adds
    (lambda / m) W[l] to each dW[l]; biases are not penalized.
    """
    L = len(params)
    m = Y.shape[1]
    grads: list[Layer] = []
    dZ = output_delta(trace.A[L], Y)
    for l in range(L, 0, -1):
        dW, db = linear_backward(dZ, trace.A[l - 1])
        grads.append(Layer(dW + (l2 / m) * params[l - 1].W, db) if l2 else Layer(dW, db))
        if l > 1:
            dZ = hidden_delta(params[l - 1].W, dZ, trace.Z[l - 1], arch.activation, trace.M[l - 1])
    return grads[::-1]


def loss_and_gradients(params: Sequence[Layer], X: Array, Y: Array, y: Array, arch: Architecture, *,
                       l2: float = 0.0, dropout: float = 0.0, rng: Any = None) -> tuple[Array, Array, list[Layer]]:
    """One step's work before the update: the cost (L2 term included) and the accuracy, both 0-d arrays measured
    on ``params`` as they are, and the gradients. X: (n_0, m), Y: (n_L, m) one-hot, y: (m,) labels.

    This is the reference that the backends' fast paths (:meth:`gpunn.backend.Backend.gradient_pass`) are tested
    against. With ``dropout`` the figures are those of the thinned network being trained.
    """
    trace = forward(params, X, arch, dropout=dropout, rng=rng)
    loss = cost(trace.Z[-1], Y, arch.output) + l2_cost(params, l2, Y.shape[1])
    return loss, accuracy(trace.A[-1], y), backward(params, trace, Y, arch, l2=l2)


def cost(Z_L: Array, Y: Array, output: str = "softmax") -> Array:
    """Mean cross-entropy of the logits Z[L] against Y, a 0-d array on Z_L's device.

    Softmax: -(1/m) sum_j sum_i Y[i, j] log softmax(Z)[i, j], from the max-subtracted log-sum-exp, so logits of
    +-1e4 stay finite in float32. Sigmoid: -(1/m) sum [y log a + (1 - y) log(1 - a)] = (1/m) sum [log(1 + e^z) - y z].
    """
    xp = array_namespace(Z_L, Y)
    m = Z_L.shape[1]
    if output == "softmax":
        shifted = Z_L - xp.max(Z_L, axis=0, keepdims=True)
        log_probs = shifted - xp.log(xp.sum(xp.exp(shifted), axis=0, keepdims=True))
        return -xp.sum(Y * log_probs) / m
    return xp.sum(xp.logaddexp(xp.zeros_like(Z_L), Z_L) - Y * Z_L) / m


def l2_cost(params: Sequence[Layer], l2: float, m: int) -> Array | float:
    """(lambda / 2m) sum_l ||W[l]||_F^2, the seed notes' L2 term (0.0 when lambda is 0)."""
    if not l2:
        return 0.0
    xp = array_namespace(params[0].W)
    return l2 / (2 * m) * sum(xp.sum(W * W) for W, _ in params)


def one_hot(y: Array, classes: int, dtype: Any) -> Array:
    """Y[i, j] = 1 where y[j] == i.  y: (m,) integer labels; Y: (classes, m), on y's device."""
    xp = array_namespace(y)
    rows = xp.reshape(xp.arange(classes, device=y.device), (classes, 1))
    return xp.astype(xp.reshape(y, (1, -1)) == rows, dtype)


def predict(A_L: Array) -> Array:
    """The most probable class of each column of A[L] (or of Z[L]: softmax keeps the order)."""
    return array_namespace(A_L).argmax(A_L, axis=0)


def accuracy(A_L: Array, y: Array) -> Array:
    """The fraction of columns whose most probable class is the label, as a 0-d float array on the device."""
    xp = array_namespace(A_L, y)
    return xp.mean(xp.astype(predict(A_L) == y, A_L.dtype))


def standardize_stats(X: Array) -> tuple[Array, Array]:
    """Per-input mean and standard deviation over the samples. X: (n_0, m); both results (n_0, 1).

    An input that never varies (MNIST's border pixels) gets a deviation of 1, so that it stays 0 instead of 0/0."""
    xp = array_namespace(X)
    mean = xp.mean(X, axis=1, keepdims=True)
    std = xp.std(X, axis=1, keepdims=True)
    return mean, xp.where(std > 0, std, xp.ones_like(std))


def scale_pixels(X: Array, dtype: Any) -> Array:
    """uint8 pixels 0..255 -> floats in [0, 1], the seed notebook's ``X / 255``, done on X's device."""
    xp = array_namespace(X)
    scaled = xp.astype(X, dtype, copy=True)
    scaled /= 255  # in place, on the new array: MNIST's X in float32 is 188 MB, and `/ 255` would make a second
    return scaled
