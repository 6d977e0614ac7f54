"""A trained network: its architecture, its parameters, and how its inputs are prepared; saved as ``.npz``.

The file holds the arrays ``W1, b1, ..., WL, bL`` and one more, ``meta``, a JSON string with the format version,
layer sizes, activation, dtype and preprocessing. It loads on any backend with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import lzma
import math
import os
import re
import struct
import tokenize
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from gpunn import __version__
from gpunn.backend import Backend
from gpunn.errors import ModelError, flat
from gpunn.files import atomic_write, describe_bytes, open_input
from gpunn.nn import ACTIVATIONS, DTYPES, OUTPUTS, Architecture, Layer, forward, scale_pixels, standardize_stats
from gpunn.optim import OPTIMIZERS, Optimizer

FORMAT = "gpunn-model"
FORMAT_VERSION = 1
# input preparations, named as gpunn train's --normalize names them: uint8 pixels divided by 255 (the seed
# notebook's), then optionally standardized per pixel with the training split's mean and standard deviation (the
# seed notes' "normalizing inputs")
PREPROCESSINGS = ("scale", "standardize")
# what files written before the two names were one call "scale"
_FORMER_NAMES = {"scale-255": "scale"}


@dataclass
class Preprocessing:
    """How uint8 pixels become the network's input: X / 255, then (X - mean) / std for ``standardize``.

    The statistics come from the training split only and are stored with the model, so validation, test and
    prediction inputs are transformed exactly as the training inputs were."""

    kind: str = "scale"
    mean: Any = None  # (n_0, 1) on the device, for "standardize"
    std: Any = None

    @classmethod
    def fit(cls, kind: str, X_uint8: Any, dtype: Any) -> Preprocessing:
        """The preprocessing ``kind`` with its statistics taken from ``X_uint8`` (the training split, on the device)."""
        if kind not in PREPROCESSINGS:
            raise ValueError(f"unknown preprocessing {kind!r}; expected one of {PREPROCESSINGS}")
        if kind == "scale":
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
    #: the file it was loaded from, to name in messages; None for a model made in this process
    source: str | None = field(default=None, compare=False)

    def probabilities(self, X: Any) -> Any:
        """A[L] for uint8 pixels X (n_0, m) already on the parameters' device: (classes, m)."""
        xp = array_namespace(X)
        return forward(self.params, self.preprocessing(X, getattr(xp, self.dtype)), self.arch).A[-1]

    def resume_state(self) -> tuple[dict[str, Any], int]:
        """The training settings (``info.config``, as :meth:`gpunn.train.TrainConfig.as_dict` wrote them) and the
        number of completed epochs (``info.epochs_done``) that a resumed run continues from.

        Raises ModelError when either is missing or mistyped, when a setting is missing, unknown or invalid,
        when ``epochs_done`` is not an integer from 0 to the run's ``epochs``, when the data fingerprint is missing,
        or when the settings do not describe this model (layer sizes, activation, dtype, inputs, optimizer state):
        resuming such a file could only fail later, or blame the wrong thing.
        """
        from gpunn.train import SETTINGS_ADDED_LATER, TrainConfig  # gpunn.train imports this module

        where = self.source or "the model"
        info = self.info
        if not isinstance(info.get("config"), dict) or "epochs_done" not in info:
            if "config" not in info or "epochs_done" not in info:
                found = f"info.{'config' if 'config' not in info else 'epochs_done'} is missing"
            else:
                found = f"info.config is {_shown(info['config'])}, not an object of settings"
            raise ModelError(f"{where} holds no training state to resume ({found}); only a model or checkpoint "
                             "saved by gpunn train can be resumed: train a new run")
        saved = {**SETTINGS_ADDED_LATER, **info["config"]}  # a setting newer than the file: what its run had
        # gpunn train writes every setting; one missing would silently become its default in the resumed run
        missing = [name for name in TrainConfig.__dataclass_fields__ if name not in saved]
        if missing:
            raise ModelError(f"{where}: its saved training settings (info.config) lack {', '.join(missing)}; the "
                             "checkpoint is damaged or from another version of gpunn: train a new run")
        try:
            config = TrainConfig.from_dict(saved)
        except (ValueError, TypeError) as error:  # ConfigError is a ValueError
            raise ModelError(f"{where}: its saved training settings (info.config) are damaged: {error}; train a "
                             "new run") from error
        done = info["epochs_done"]
        if not _is_int(done) or not 0 <= done <= config.epochs:
            raise ModelError(f"{where}: info.epochs_done is {_shown(done)}, expected a whole number from 0 to the "
                             f"run's {config.epochs} epochs; the checkpoint is damaged: train a new run")
        digest = info.get("data_sha256")
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise ModelError(f"{where}: info.data_sha256 is {_shown(digest) if 'data_sha256' in info else 'missing'}, "
                             "expected the SHA-256 of the training data; the checkpoint is damaged: train a new run")
        differ = [
            f"{what} {theirs} there, {ours} in the weights"
            for what, theirs, ours in (
                ("hidden layers", list(config.hidden), list(self.arch.sizes[1:-1])),
                ("activation", config.activation, self.arch.activation),
                ("dtype", config.dtype, self.dtype),
                ("inputs", config.normalize, self.preprocessing.kind),
                ("optimizer state", sorted(config.rule.state_names), sorted(self.optimizer_state)),
            )
            if theirs != ours
        ]
        if differ:
            raise ModelError(f"{where}: its saved training settings do not describe its own network "
                             f"({'; '.join(differ)}); the checkpoint is damaged: train a new run")
        return dict(saved), done

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
    """Read a model saved by :func:`save_model` and move its parameters to ``backend``.

    The file is validated as a schema before anything is used: a zip archive of ``.npy`` arrays without Python
    objects; ``meta`` a JSON object with the right keys and types; exactly the arrays its layer sizes call for, of
    floating-point dtype and the right shapes, every value finite. Anything else raises ModelError naming what was
    expected and what was found. Each array's size is checked against the archive before it is read, so a damaged
    header cannot make gpunn allocate more than the file can hold.
    """
    with open_input(path, ModelError) as handle:  # before Path(): Path("") would be "."
        path = Path(path)
        head = handle.read(512)
        if not head.startswith(_ZIP_MAGIC):
            raise ModelError(f"{path} is not a gpunn model file (an .npz written by gpunn train): it looks like "
                             f"{describe_bytes(head)}")
        handle.seek(0)
        size = os.fstat(handle.fileno()).st_size
        try:
            with zipfile.ZipFile(handle) as archive:
                members = _members(archive, path, size)
                meta = _check_meta(_read_meta(archive, members, path), path)
                arrays, state_names = _read_arrays(archive, members, meta, path)
        except _ZIP_ERRORS as error:
            raise ModelError(f"{path} is not a gpunn model file: the archive is damaged or truncated "
                             f"({flat(error)}); save the model again") from error

    def place(name: str) -> Any:
        return backend.asarray(arrays[name])

    arch = meta.arch
    params = [Layer(place(f"W{l}"), place(f"b{l}")) for l in range(1, arch.depth + 1)]
    optimizer_state = {name: [Layer(place(f"opt_{name}_W{l}"), place(f"opt_{name}_b{l}"))
                              for l in range(1, arch.depth + 1)] for name in state_names}
    preprocessing = Preprocessing(meta.preprocessing)
    if meta.preprocessing == "standardize":
        preprocessing = Preprocessing(meta.preprocessing, place("input_mean"), place("input_std"))
    return Model(arch, params, meta.dtype, preprocessing, meta.info, optimizer_state, source=str(path))


# --- reading and validating the file ------------------------------------------------------------------------------

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# what zipfile and its decompressors raise on a damaged archive (OverflowError: a seek to an offset beyond any file).
# Nothing broader: an error of gpunn's own must still show as the bug it is.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
               RuntimeError, OverflowError, zlib.error, lzma.LZMAError, struct.error)
# gpunn writes a meta string of about a kilobyte; a megabyte is certainly not one
_MAX_META_BYTES = 1 << 20
# deflate's largest expansion, about 1032:1: what a compressed member can honestly claim to hold
_DEFLATE_RATIO = 1032
_CHUNK = 1 << 20
_OPTIMIZER_ARRAY = re.compile(r"opt_([A-Za-z0-9]+)_([Wb][0-9]+)")
#: the running averages any update rule keeps ("v", "s")
_STATE_NAMES = frozenset(name for rule in OPTIMIZERS for name in Optimizer(rule).state_names)
_DTYPE_WORDS = {"i": "integers", "u": "unsigned integers", "b": "booleans", "c": "complex numbers",
                "U": "strings", "S": "bytes", "V": "raw records", "M": "dates", "m": "time spans", "O": "objects"}



@dataclass(frozen=True)
class _Member:
    """One ``.npy`` array in the archive, known from its header alone."""

    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    offset: int  # bytes of the .npy header, before the data

    @property
    def what(self) -> str:
        return f"{self.dtype} array of shape {self.shape}"


def _damaged(path: Path, detail: str) -> ModelError:
    return ModelError(f"{path} is a damaged gpunn model file: {detail}; save or train the model again")


def _members(archive: zipfile.ZipFile, path: Path, size: int) -> dict[str, _Member]:
    """Every array's header, checked: names, dtypes without Python objects, and sizes the archive can hold."""
    members: dict[str, _Member] = {}
    for info in archive.infolist():
        name = info.filename
        if not name.endswith(".npy") or info.is_dir():
            raise ModelError(f"{path} is not a gpunn model file: it holds {name!r}, which is not a NumPy array; a "
                             "gpunn model (an .npz written by gpunn train) holds only .npy arrays")
        key = name[: -len(".npy")]
        if key in members:
            raise _damaged(path, f"the array {key} appears twice")
        if info.flag_bits & 0x1:
            raise ModelError(f"{path} is not a gpunn model file: {name} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ModelError(f"{path} is not a gpunn model file: {name} uses zip compression method "
                             f"{info.compress_type}; gpunn writes uncompressed (or deflated) arrays")
        most = info.compress_size if info.compress_type == zipfile.ZIP_STORED else \
            _DEFLATE_RATIO * info.compress_size + 1024
        if info.compress_size > size or info.file_size > most:
            raise _damaged(path, f"{name} claims {info.file_size:,} bytes, more than the file can hold")
        with archive.open(info) as stream:
            try:
                version = np.lib.format.read_magic(stream)
                if version not in ((1, 0), (2, 0)):
                    raise _damaged(path, f"{name} is in .npy format version {version}, which gpunn does not write")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                with warnings.catch_warnings():
                    # numpy retries a header it cannot parse as Python 2's, and warns about it: the file is damaged,
                    # and saying so once is enough
                    warnings.simplefilter("ignore")
                    shape, fortran, dtype = read_header(stream)
            except (ValueError, TypeError, SyntaxError, RecursionError, tokenize.TokenError) as error:
                # numpy's messages here can quote its own parse tree; what matters is which entry is damaged
                raise _damaged(path, f"{name} does not start with a valid .npy header") from error
            offset = stream.tell()
        if dtype.hasobject:
            # refused from the header: loading it would need pickle, which runs code from the file
            raise ModelError(f"{path} is not a gpunn model file: the array {key} holds Python objects (pickled "
                             "data), which a gpunn model never does; it was not written by gpunn train")
        nbytes = math.prod(shape) * dtype.itemsize  # Python integers: no overflow
        if offset + nbytes != info.file_size:
            raise _damaged(path, f"the array {key} announces shape {shape} of {dtype} ({nbytes:,} bytes), but its "
                                 f"entry holds {max(info.file_size - offset, 0):,}")
        members[key] = _Member(info, tuple(shape), bool(fortran), dtype, offset)
    return members


def _read_data(archive: zipfile.ZipFile, member: _Member) -> np.ndarray:
    """The array's data, as its header describes it (already checked against the entry's size)."""
    count = math.prod(member.shape)
    nbytes = count * member.dtype.itemsize
    with archive.open(member.info) as stream:
        stream.read(member.offset)
        parts, left = [], nbytes
        while left > 0:
            chunk = stream.read(min(left, _CHUNK))
            if not chunk:
                raise EOFError(f"{member.info.filename} ends {left:,} bytes early")
            parts.append(chunk)
            left -= len(chunk)
    flat = np.frombuffer(b"".join(parts), dtype=member.dtype, count=count)
    return flat.reshape(member.shape, order="F" if member.fortran else "C")


def _read_meta(archive: zipfile.ZipFile, members: dict[str, _Member], path: Path) -> Any:
    member = members.get("meta")
    if member is None:
        raise ModelError(f"{path} is not a gpunn model file: its 'meta' entry is missing (the arrays are "
                         f"{_few(sorted(members))}); a gpunn model is an .npz written by gpunn train")
    if member.dtype.kind not in "US" or member.shape != () or member.dtype.itemsize == 0:
        raise ModelError(f"{path} is not a gpunn model file: its 'meta' entry is a {member.what}, not the JSON "
                         "string gpunn writes")
    if member.info.file_size > _MAX_META_BYTES:
        raise _damaged(path, f"its 'meta' entry is {member.info.file_size:,} bytes, far more than gpunn writes")
    value = _read_data(archive, member)[()]
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelError(f"{path} is not a gpunn model file: its 'meta' entry is missing or not JSON "
                         f"({flat(error)})") from error


def _few(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "") or "none"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A JSON value as it appears in the file, cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class _Meta:
    arch: Architecture
    dtype: str
    preprocessing: str
    info: dict[str, Any]


def _check_meta(meta: Any, path: Path) -> _Meta:
    """``meta`` checked key by key against what :meth:`Model.meta` writes."""
    if not isinstance(meta, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(meta), "value")
        raise ModelError(f"{path} is not a gpunn model file: its 'meta' entry is the JSON {kind} {_shown(meta)}, "
                         "where gpunn writes an object with the format, layer sizes and settings")
    if meta.get("format") != FORMAT:
        raise ModelError(f"{path} is not a gpunn model file (format {meta.get('format')!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise ModelError(
            f"{path} has model format version {_shown(version)}; this gpunn ({__version__}) reads "
            f"version {FORMAT_VERSION}: retrain or use the gpunn that wrote it"
        )

    def bad(key: str, expected: str) -> ModelError:
        found = "missing" if key not in meta else _shown(meta[key])
        return _damaged(path, f"meta.{key} is {found}, expected {expected}")

    sizes = meta.get("layer_sizes")
    if not (isinstance(sizes, list) and len(sizes) >= 2 and all(_is_int(n) and n >= 1 for n in sizes)):
        raise bad("layer_sizes", "a list of at least 2 positive integers, such as [784, 10, 10]")
    for key, allowed in (("activation", ACTIVATIONS), ("output", OUTPUTS), ("dtype", DTYPES)):
        if not (isinstance(meta.get(key), str) and meta[key] in allowed):
            raise bad(key, f"one of {', '.join(allowed)}")
    kind = meta.get("preprocessing", "scale")  # files from before standardization lack it
    kind = _FORMER_NAMES.get(kind, kind) if isinstance(kind, str) else kind
    if not (isinstance(kind, str) and kind in PREPROCESSINGS):
        raise bad("preprocessing", f"one of {', '.join(PREPROCESSINGS)}")
    if not isinstance(meta.get("gpunn_version", ""), str):
        raise bad("gpunn_version", "a version string")
    info = meta.get("info", {})
    if not isinstance(info, dict):
        raise bad("info", "an object")
    arch = Architecture(tuple(sizes), meta["activation"], meta["output"])
    return _Meta(arch, meta["dtype"], kind, info)


def _expected_arrays(meta: _Meta, members: dict[str, _Member], path: Path) -> tuple[dict[str, tuple[int, ...]],
                                                                                     tuple[str, ...]]:
    """The shape of every array the file must hold, and the optimizer states it holds."""
    sizes = meta.arch.sizes
    shapes: dict[str, tuple[int, ...]] = {}
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        shapes[f"W{l}"], shapes[f"b{l}"] = (n_out, n_in), (n_out, 1)
    names = sorted({match.group(1) for key in members if (match := _OPTIMIZER_ARRAY.fullmatch(key))})
    for name in names:
        if name not in _STATE_NAMES:
            raise _damaged(path, f"it holds optimizer state {name!r}; gpunn's update rules keep "
                                 f"{', '.join(sorted(_STATE_NAMES))}")
    parameters = dict(shapes)
    for name in names:
        shapes.update({f"opt_{name}_{key}": shape for key, shape in parameters.items()})
    if meta.preprocessing == "standardize":
        shapes["input_mean"] = shapes["input_std"] = (sizes[0], 1)
    unknown = sorted(set(members) - set(shapes) - {"meta"})
    if unknown:
        raise _damaged(path, f"it holds {_few(unknown)}, which a {meta.arch} model with "
                             f"{meta.preprocessing} inputs does not have")
    missing = [key for key in shapes if key not in members]
    if missing:
        raise _damaged(path, f"the array{'s' * (len(missing) > 1)} {_few(missing)} of the layer sizes "
                             f"{list(sizes)} {'are' if len(missing) > 1 else 'is'} missing")
    return shapes, tuple(names)


def _read_arrays(archive: zipfile.ZipFile, members: dict[str, _Member], meta: _Meta, path: Path
                 ) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Every array, in the model's dtype, after checking dtypes and shapes (from the headers) and then values;
    and the names of the optimizer states among them."""
    shapes, names = _expected_arrays(meta, members, path)
    for key, shape in shapes.items():
        member = members[key]
        if member.dtype.kind != "f":
            words = _DTYPE_WORDS.get(member.dtype.kind, str(member.dtype))
            raise _damaged(path, f"{key} is an array of {member.dtype} ({words}); a gpunn model stores float32 or "
                                 "float64")
        if member.shape != shape:
            raise _damaged(path, f"{key} {member.shape} does not fit the layer sizes {list(meta.arch.sizes)}, "
                                 f"which need {shape}")
    arrays = {}
    for key in shapes:
        # cast first: a float64 weight beyond float32's range becomes inf, and is refused like one stored as inf
        with np.errstate(over="ignore", invalid="ignore"):
            array = _read_data(archive, members[key]).astype(meta.dtype)
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise _damaged(path, f"{key} holds {bad:,} non-finite value{'s' * (bad > 1)} (NaN or infinite) in "
                                 f"{meta.dtype}; the model is damaged or came from a diverged run")
        if key == "input_std" or key.startswith("opt_s_"):
            low = int(np.count_nonzero(array <= 0 if key == "input_std" else array < 0))
            if low:
                limit = "positive" if key == "input_std" else "at least 0"
                raise _damaged(path, f"{key} holds {low:,} value{'s' * (low > 1)} that are not {limit}")
        arrays[key] = array
    return arrays, names
