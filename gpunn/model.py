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
from gpunn.nn import DTYPES, Architecture, Layer, forward, scale_pixels, standardize_stats

FORMAT = "gpunn-model"
FORMAT_VERSION = 1
# input preparations: uint8 pixels divided by 255 (the seed notebook's), then optionally standardized per pixel
# with the training split's mean and standard deviation (the seed notes' "normalizing inputs")
PREPROCESSINGS = ("scale-255", "standardize")


@dataclass
class Preprocessing:
    """How uint8 pixels become the network's input: X / 255, then (X - mean) / std for ``standardize``.

    The statistics come from the training split only and are stored with the model, so validation, test and
    prediction inputs are transformed exactly as the training inputs were."""

    kind: str = "scale-255"
    mean: Any = None  # (n_0, 1) on the device, for "standardize"
    std: Any = None

    @classmethod
    def fit(cls, kind: str, X_uint8: Any, dtype: Any) -> Preprocessing:
        """The preprocessing ``kind`` with its statistics taken from ``X_uint8`` (the training split, on the device)."""
        if kind not in PREPROCESSINGS:
            raise ValueError(f"unknown preprocessing {kind!r}; expected one of {PREPROCESSINGS}")
        if kind == "scale-255":
            return cls(kind)
        return cls(kind, *standardize_stats(scale_pixels(X_uint8, dtype)))

    def __call__(self, X_uint8: Any, dtype: Any) -> Any:
        X = scale_pixels(X_uint8, dtype)
        if self.kind == "standardize":
            X -= self.mean  # in place on the new array, as in scale_pixels
            X /= self.std
        return X


@dataclass
class Model:
    """An architecture and its parameters (arrays of one backend), plus free-form facts about its training."""

    arch: Architecture
    params: list[Layer]
    dtype: str = "float32"
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    info: dict[str, Any] = field(default_factory=dict)
    #: the optimizer's running averages ("v", "s"), shaped like ``params``; saved so that a resumed run continues
    optimizer_state: dict[str, list[Layer]] = field(default_factory=dict)

    def probabilities(self, X: Any) -> Any:
        """A[L] for uint8 pixels X (n_0, m) already on the parameters' device: (classes, m)."""
        xp = array_namespace(X)
        return forward(self.params, self.preprocessing(X, getattr(xp, self.dtype)), self.arch).A[-1]

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "gpunn_version": __version__,
            "layer_sizes": list(self.arch.sizes),
            "activation": self.arch.activation,
            "output": self.arch.output,
            "dtype": self.dtype,
            "preprocessing": self.preprocessing.kind,
            "info": self.info,
        }


def save_model(path: str | Path, model: Model, backend: Backend) -> None:
    """Write ``model`` to ``path`` (``.npz``), atomically: a failure leaves no file behind."""
    arrays: dict[str, Any] = {"meta": np.asarray(json.dumps(model.meta()))}
    for l, (W, b) in enumerate(model.params, start=1):
        arrays[f"W{l}"] = backend.to_numpy(W)
        arrays[f"b{l}"] = backend.to_numpy(b)
    if model.preprocessing.kind == "standardize":
        arrays["input_mean"] = backend.to_numpy(model.preprocessing.mean)
        arrays["input_std"] = backend.to_numpy(model.preprocessing.std)
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
        kind = meta.get("preprocessing", "scale-255")
        if kind not in PREPROCESSINGS:
            raise ValueError(f"preprocessing {kind!r} is not one of {PREPROCESSINGS}")
        preprocessing = Preprocessing(kind)
        if kind == "standardize":
            mean, std = arrays["input_mean"], arrays["input_std"]
            if mean.shape != (arch.sizes[0], 1) or std.shape != mean.shape:
                raise ValueError(f"input_mean {mean.shape} / input_std {std.shape} do not fit {arch.sizes[0]} inputs")
            preprocessing = Preprocessing(kind, backend.asarray(mean.astype(dtype)), backend.asarray(std.astype(dtype)))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{path} is a damaged gpunn model file: {error}") from error
    return Model(arch, params, dtype, preprocessing, meta.get("info", {}), optimizer_state)
