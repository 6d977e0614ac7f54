"""The straightforward NumPy program a reader of the seed notes would write, in float64 and in float32.

float64 is the notebook as written: ``X = data.T / 255`` (so float64, and a transposed, Fortran-ordered view of the
rows), the one-hot matrix rebuilt inside every backward pass, new arrays at every step, no max-subtraction in the
softmax. Only the notebook's scalar-bias bug is fixed (``db`` is summed per unit), so that it computes the same step
as gpunn.

float32 is the same program with ``X = (data.T / 255).astype(np.float32)`` and float32 weights, everything else as
the notebook writes it, except one thing that keeps it in float32: the one-hot matrix is made in the activations'
dtype. The notebook's ``np.zeros(...)`` is float64, and ``A2 - one_hot_Y`` would turn every gradient, then every
weight, into float64 after the first step (and cast X to float64 in every ``dZ1.dot(X.T)``), so the program would
be a float64 one with extra casts. The runner checks after each step that the weights are still float32.
"""

from __future__ import annotations

import numpy as np

AVAILABLE = True
DEVICES = ("cpu",)
DTYPES = ("float32", "float64")


def ReLU(Z):
    return np.maximum(Z, 0)


def softmax(Z):
    return np.exp(Z) / sum(np.exp(Z))


def forward_prop(W1, b1, W2, b2, X):
    Z1 = W1.dot(X) + b1
    A1 = ReLU(Z1)
    Z2 = W2.dot(A1) + b2
    A2 = softmax(Z2)
    return Z1, A1, Z2, A2


def one_hot(Y, dtype=np.float64):
    one_hot_Y = np.zeros((Y.size, Y.max() + 1), dtype)
    one_hot_Y[np.arange(Y.size), Y] = 1
    return one_hot_Y.T


def backward_prop(Z1, A1, Z2, A2, W1, W2, X, Y):
    m = Y.size
    one_hot_Y = one_hot(Y, A2.dtype)
    dZ2 = A2 - one_hot_Y
    dW2 = 1 / m * dZ2.dot(A1.T)
    db2 = 1 / m * np.sum(dZ2, axis=1, keepdims=True)
    dZ1 = W2.T.dot(dZ2) * (Z1 > 0)
    dW1 = 1 / m * dZ1.dot(X.T)
    db1 = 1 / m * np.sum(dZ1, axis=1, keepdims=True)
    return dW1, db1, dW2, db2


def update_params(W1, b1, W2, b2, dW1, db1, dW2, db2, alpha):
    W1 = W1 - alpha * dW1
    b1 = b1 - alpha * db1
    W2 = W2 - alpha * dW2
    b2 = b2 - alpha * db2
    return W1, b1, W2, b2


class Runner:
    def __init__(self, images, labels, params, lr, dtype="float64"):
        if dtype not in DTYPES:
            raise ValueError(f"the naive program runs {' or '.join(DTYPES)}, not {dtype}")
        self.dtype = np.dtype(dtype)
        (self.W1, self.b1), (self.W2, self.b2) = [(W.astype(self.dtype), b.astype(self.dtype)) for W, b in params]
        self.X = images.T / 255 if dtype == "float64" else (images.T / 255).astype(np.float32)
        self.Y = labels
        self.lr = lr

    def step(self):
        Z1, A1, Z2, A2 = forward_prop(self.W1, self.b1, self.W2, self.b2, self.X)
        grads = backward_prop(Z1, A1, Z2, A2, self.W1, self.W2, self.X, self.Y)
        self.W1, self.b1, self.W2, self.b2 = update_params(self.W1, self.b1, self.W2, self.b2, *grads, self.lr)
        if self.W1.dtype != self.dtype or self.W2.dtype != self.dtype:
            raise TypeError(f"the weights became {self.W1.dtype}/{self.W2.dtype} in a {self.dtype} run")

    def sync(self):
        pass

    def params(self):
        return [(self.W1, self.b1), (self.W2, self.b2)]


def make(images, labels, params, *, lr, dtype, device):
    if len(params) != 2:
        raise ValueError("the seed notes' program has exactly one hidden layer")
    if device != "cpu":
        raise ValueError(f"the naive program runs on the CPU, not {device}")
    return Runner(images, labels, params, lr, dtype)
