"""gpunn: one matrix implementation of an MLP's forward and backward pass, trained on MNIST with NumPy or CuPy.

The Python API, in the order a notebook uses it::

    import gpunn
    data = gpunn.load_bundled_sample()                  # or gpunn.load_idx_dir("mnist/"), gpunn.load_kaggle_csvs(...)
    parts = gpunn.split(data, val_size=1000, seed=0)    # shuffled, (784, m) columns
    backend = gpunn.get_backend("auto")                 # NumPy on the CPU, or CuPy on a GPU
    result = gpunn.fit(parts, gpunn.TrainConfig(hidden=(64,), epochs=50), backend=backend)
    gpunn.save_model("model.npz", result.model, backend)

``import gpunn`` never imports CuPy; :func:`gpunn.get_backend` does, and only when a CUDA device is asked for.
"""

__version__ = "0.1.0"

from gpunn.backend import Backend, get_backend  # noqa: E402
from gpunn.data import Dataset, Split, load_bundled_sample, load_idx_dir, load_kaggle_csvs, split  # noqa: E402
from gpunn.model import Model, load_model, save_model  # noqa: E402
from gpunn.nn import Architecture, backward, forward, init_params, loss_and_gradients  # noqa: E402
from gpunn.optim import Optimizer  # noqa: E402
from gpunn.train import EpochStats, FitResult, TrainConfig, evaluate, fit, predict_proba  # noqa: E402

__all__ = [
    "Architecture",
    "Backend",
    "Dataset",
    "EpochStats",
    "FitResult",
    "Model",
    "Optimizer",
    "Split",
    "TrainConfig",
    "__version__",
    "backward",
    "evaluate",
    "fit",
    "forward",
    "get_backend",
    "init_params",
    "load_bundled_sample",
    "load_idx_dir",
    "load_kaggle_csvs",
    "load_model",
    "loss_and_gradients",
    "predict_proba",
    "save_model",
    "split",
]
