"""gpunn: one matrix implementation of an MLP's forward and backward pass, trained on MNIST with NumPy or CuPy.

``import gpunn`` never imports CuPy; :func:`gpunn.get_backend` does, and only when a CUDA device is asked for.
"""

__version__ = "0.1.0"

from gpunn.backend import Backend, get_backend  # noqa: E402

__all__ = ["Backend", "__version__", "get_backend"]
