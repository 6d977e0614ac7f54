"""PyTorch doing the same full-batch step by hand (no autograd, no nn.Module): eagerly, under torch.compile, or
(on a CUDA device) captured once as a CUDA graph and replayed.

Written the way a PyTorch user would port the seed math: tensors on the device in the run's dtype, ``X`` as
(784, m), ``@`` for the products, ``torch.softmax`` for the output.
"""

from __future__ import annotations

import numpy as np

try:
    import torch
except ImportError:  # the benchmark reports the peer as unavailable
    torch = None

AVAILABLE = torch is not None
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")
#: what a float32 run's matrix products may compute in: torch.set_float32_matmul_precision's name for each of
#: gpunn's precisions ("high": TF32 tensor cores; "medium": bfloat16 where PyTorch's cuBLAS calls take it)
PRECISIONS = {"float32": "highest", "tf32": "high", "bf16": "medium"}
#: untimed calls of the step on a side stream before a CUDA graph captures it, as PyTorch's notes do
GRAPH_WARMUP = 3


def _step(X, Y, m: int, lr: float, W1, b1, W2, b2):
    Z1 = W1 @ X + b1
    A1 = torch.relu(Z1)
    Z2 = W2 @ A1 + b2
    A2 = torch.softmax(Z2, dim=0)
    dZ2 = A2 - Y
    dW2 = dZ2 @ A1.T / m
    db2 = dZ2.sum(dim=1, keepdim=True) / m
    dZ1 = (W2.T @ dZ2) * (Z1 > 0)
    dW1 = dZ1 @ X.T / m
    db1 = dZ1.sum(dim=1, keepdim=True) / m
    return W1 - lr * dW1, b1 - lr * db1, W2 - lr * dW2, b2 - lr * db2


class Runner:
    """One step per call of :meth:`step`: the new weights are new tensors (the eager and compiled peers)."""

    def __init__(self, images, labels, params, lr, dtype, device, compile_step=False, precision="float32"):
        # process-wide in PyTorch: every torch peer of a benchmark run is made with the run's one precision
        torch.set_float32_matmul_precision(PRECISIONS[precision])
        self.device = torch.device(device if device.startswith("cuda") else "cpu")
        float_dtype = getattr(torch, dtype)
        # torch warns on read-only arrays (real MNIST is read with np.frombuffer): it has no read-only tensors
        pixels = torch.from_numpy(np.require(images, requirements="W")).to(self.device)
        self.X = pixels.T.contiguous().to(float_dtype) / 255
        y = torch.from_numpy(labels).to(self.device)
        self.Y = torch.nn.functional.one_hot(y, 10).T.contiguous().to(float_dtype)
        self.m = len(labels)
        self.lr = lr
        self.weights = [torch.from_numpy(a).to(self.device, float_dtype) for W, b in params for a in (W, b)]
        self._step = torch.compile(_step) if compile_step else _step

    def step(self):
        with torch.no_grad():
            self.weights = list(self._step(self.X, self.Y, self.m, self.lr, *self.weights))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def params(self):
        W1, b1, W2, b2 = (w.cpu().numpy() for w in self.weights)
        return [(W1, b1), (W2, b2)]


class GraphRunner(Runner):
    """The eager step captured once as a CUDA graph, replayed once per epoch (PyTorch's "whole network capture").

    X, Y and the four weight tensors are static: the graph reads them at fixed addresses, and its last kernels copy
    the new weights into the old ones with ``copy_``. Before the capture, the step runs GRAPH_WARMUP times on a side
    stream with its results thrown away (the weights stay the initial ones), as PyTorch's CUDA-graph notes ask, and
    the capture uses that same stream (as torch.cuda.make_graphed_callables does, so that no library handle is first
    made during the capture). The learning rate and m are Python numbers, so they are fixed into the graph.
    """

    def __init__(self, images, labels, params, lr, dtype, device, precision="float32"):
        if not device.startswith("cuda"):
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        super().__init__(images, labels, params, lr, dtype, device, precision=precision)
        with torch.cuda.device(self.device), torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP):
                    _step(self.X, self.Y, self.m, self.lr, *self.weights)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side):  # capture where the warm-up ran (cuBLAS's handles)
                new = _step(self.X, self.Y, self.m, self.lr, *self.weights)
                for weight, value in zip(self.weights, new):
                    weight.copy_(value)
        # capture records the kernels without running them: the weights are still the initial ones here

    def step(self):
        self.graph.replay()


def make(images, labels, params, *, lr, dtype, device, compile_step=False, precision="float32"):
    if len(params) != 2:
        raise ValueError("this peer has exactly one hidden layer")
    return Runner(images, labels, params, lr, dtype, device, compile_step, precision)


def make_compiled(images, labels, params, *, lr, dtype, device, precision="float32"):
    return make(images, labels, params, lr=lr, dtype=dtype, device=device, compile_step=True, precision=precision)


def make_graphed(images, labels, params, *, lr, dtype, device, precision="float32"):
    if len(params) != 2:
        raise ValueError("this peer has exactly one hidden layer")
    return GraphRunner(images, labels, params, lr, dtype, device, precision)
