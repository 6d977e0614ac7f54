"""The straightforward NumPy program a reader of the seed notes would write.

As in the notebook: ``X = data.T / 255`` (so float64, and a transposed, Fortran-ordered view of the rows), the
one-hot matrix rebuilt inside every backward pass, new arrays at every step, no max-subtraction in the softmax.
Only the notebook's scalar-bias bug is fixed (``db`` is summed per unit), so that it computes the same step as gpunn.
"""

from __future__ import annotations

import numpy as np

AVAILABLE = True
DEVICES = ("cpu",)
DTYPES = ("float64",)  # what `/ 255` gives; a reader of the notes never asks for anything else


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


def one_hot(Y):
    one_hot_Y = np.zeros((Y.size, Y.max() + 1))
    one_hot_Y[np.arange(Y.size), Y] = 1
    return one_hot_Y.T


def backward_prop(Z1, A1, Z2, A2, W1, W2, X, Y):
    m = Y.size
    one_hot_Y = one_hot(Y)
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
    def __init__(self, images, labels, params, lr):
        (self.W1, self.b1), (self.W2, self.b2) = [(W.astype(np.float64), b.astype(np.float64)) for W, b in params]
        self.X = images.T / 255.0
        self.Y = labels
        self.lr = lr

    def step(self):
        Z1, A1, Z2, A2 = forward_prop(self.W1, self.b1, self.W2, self.b2, self.X)
        grads = backward_prop(Z1, A1, Z2, A2, self.W1, self.W2, self.X, self.Y)
        self.W1, self.b1, self.W2, self.b2 = update_params(self.W1, self.b1, self.W2, self.b2, *grads, self.lr)

    def sync(self):
        pass

    def params(self):
        return [(self.W1, self.b1), (self.W2, self.b2)]


def make(images, labels, params, *, lr, dtype, device):
    if len(params) != 2:
        raise ValueError("the seed notes' program has exactly one hidden layer")
    return Runner(images, labels, params, lr)
