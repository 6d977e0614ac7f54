"""A trained network: its architecture, its parameters, and how its inputs are prepared; saved as ``.npz``.

The file holds the arrays ``W1, b1, ..., WL, bL`` and one more, ``meta``, a JSON string with the format version,
layer sizes, activation, dtype and preprocessing. It loads on any backend with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from gpunn import __version__
from gpunn.backend import Backend
from gpunn.errors import ModelError
from gpunn.files import atomic_write
from gpunn.nn import DTYPES, Architecture, Layer, forward, scale_pixels

FORMAT = "gpunn-model"
FORMAT_VERSION = 1
# the only input preparation so far: uint8 pixels divided by 255 (nn.scale_pixels)
PREPROCESSING = "scale-255"


@dataclass
class Model:
    """An architecture and its parameters (arrays of one backend), plus free-form facts about its training."""

    arch: Architecture
    params: list[Layer]
    dtype: str = "float32"
    preprocessing: str = PREPROCESSING
    info: dict[str, Any] = field(default_factory=dict)
    #: the optimizer's running averages ("v", "s"), shaped like ``params``; saved so that a resumed run continues
    optimizer_state: dict[str, list[Layer]] = field(default_factory=dict)

    def probabilities(self, X: Any) -> Any:
        """A[L] for uint8 pixels X (n_0, m) already on the parameters' device: (classes, m)."""
        xp = array_namespace(X)
        return forward(self.params, scale_pixels(X, getattr(xp, self.dtype)), self.arch).A[-1]

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "gpunn_version": __version__,
            "layer_sizes": list(self.arch.sizes),
            "activation": self.arch.activation,
            "output": self.arch.output,
            "dtype": self.dtype,
            "preprocessing": self.preprocessing,
            "info": self.info,
        }


def save_model(path: str | Path, model: Model, backend: Backend) -> None:
    """Write ``model`` to ``path`` (``.npz``), atomically: a failure leaves no file behind."""
    arrays: dict[str, Any] = {"meta": np.asarray(json.dumps(model.meta()))}
    for l, (W, b) in enumerate(model.params, start=1):
        arrays[f"W{l}"] = backend.to_numpy(W)
        arrays[f"b{l}"] = backend.to_numpy(b)
    for name, layers in model.optimizer_state.items():
        for l, (W, b) in enumerate(layers, start=1):
            arrays[f"opt_{name}_W{l}"] = backend.to_numpy(W)
            arrays[f"opt_{name}_b{l}"] = backend.to_numpy(b)
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)


def load_model(path: str | Path, backend: Backend) -> Model:
    """Read a model saved by :func:`save_model` and move its parameters to ``backend``."""
    path = Path(path)
    try:
        # open the file here: np.load leaks its own handle when the file is not a valid archive
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except FileNotFoundError as error:
        raise ModelError(f"model file {path} does not exist") from error
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ModelError(f"{path} is not a gpunn model file ({error})") from error
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (KeyError, json.JSONDecodeError) as error:
        raise ModelError(f"{path} is not a gpunn model file: its 'meta' entry is missing or not JSON") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{path} is not a gpunn model file (format {meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{path} has model format version {meta.get('format_version')}; this gpunn ({__version__}) reads "
            f"version {FORMAT_VERSION}: retrain or use the gpunn that wrote it"
        )
    try:
        arch = Architecture(tuple(meta["layer_sizes"]), meta["activation"], meta["output"])
        dtype = meta["dtype"]
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
        names = sorted({key.split("_")[1] for key in arrays if key.startswith("opt_")})
        params, optimizer_state = [], {name: [] for name in names}
        for l, (n_in, n_out) in enumerate(zip(arch.sizes[:-1], arch.sizes[1:]), start=1):
            for prefix, layers in [("", params)] + [(f"opt_{name}_", optimizer_state[name]) for name in names]:
                W, b = arrays[f"{prefix}W{l}"], arrays[f"{prefix}b{l}"]
                if W.shape != (n_out, n_in) or b.shape != (n_out, 1):
                    raise ValueError(f"{prefix}W{l} {W.shape} / {prefix}b{l} {b.shape} do not fit layer sizes "
                                     f"{arch.sizes}")
                layers.append(Layer(backend.asarray(W.astype(dtype)), backend.asarray(b.astype(dtype))))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{path} is a damaged gpunn model file: {error}") from error
    return Model(arch, params, dtype, meta.get("preprocessing", PREPROCESSING), meta.get("info", {}), optimizer_state)
