"""A corpus of hostile inputs for gpunn's readers: IDX files, Kaggle CSV files, model files and metrics files.

Each corpus maps a case's name to (content, fragment): ``fragment`` is a piece of the one-line error the reader must
raise, or ``LOADS`` for a case that is unusual but valid and must load. The tests run every case through the readers
(and some through the CLI); the property tests in test_readers_property.py generate more of the same kinds.
"""

from __future__ import annotations

import bz2
import copy
import gzip
import io
import json
import lzma
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from gpunn.model import Model, Preprocessing, save_model
from gpunn.nn import Layer, init_params
from gpunn.train import TrainConfig

LOADS = None

# --- IDX --------------------------------------------------------------------------------------------------------


def idx(shape: tuple[int, ...], data: bytes | None = None, code: int = 0x08) -> bytes:
    """An IDX file of ``shape`` (its data zeros unless given); the header may announce anything."""
    size = int(np.prod(shape, dtype=object)) if shape else 0
    body = data if data is not None else b"\0" * size
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + body


def idx_corpus() -> dict[str, tuple[bytes, str | None]]:
    good = idx((3, 28, 28))
    return {
        "empty file": (b"", "found an empty file"),
        "one byte": (b"\0", "found 00"),
        "text": (b"label,pixel0\n", "not an IDX file"),
        "wrong magic": (b"\x08\x03\0\0" + good[4:], "not an IDX file (expected magic bytes"),
        "float data type": (idx((3, 28, 28), code=0x0D), "data type 0x0d is not supported"),
        "no dimensions": (b"\0\0\x08\0", "announces 0 dimensions"),
        "255 dimensions": (b"\0\0\x08\xff" + b"\0\0\0\1" * 255, "announces 255 dimensions"),
        "header cut short": (b"\0\0\x08\x03\0\0\0\x02", "header is cut short"),
        "zero images": (idx((0, 28, 28)), "which holds no data"),
        "zero columns": (idx((5, 28, 0)), "which holds no data"),
        "product beyond int64": (idx((1, 1, 1))[:4] + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1),
                                 "79,228,162,458,924,105,385,300,197,391 bytes, but the file holds 16"),
        "absurd size, tiny file": (idx((1, 1, 1))[:4] + struct.pack(">3I", 60000, 2**20, 2**20), "bytes, but"),
        "one byte short": (good[:-1], "i.e. 2,368 bytes, but the file holds 2,367"),
        "one byte long": (good + b"\0", "but the file holds 2,369"),
        "labels 3 dims": (idx((3, 1, 1)), LOADS),  # read_idx itself accepts any 1-3 dimensions
        "gzip: valid": (gzip.compress(good), LOADS),
        "gzip: truncated": (gzip.compress(good * 40)[:-30], "corrupt or truncated gzip"),
        "gzip: magic only": (b"\x1f\x8b", "corrupt or truncated gzip"),
        "gzip: garbage after it": (gzip.compress(good) + b"garbage", "corrupt or truncated gzip"),
        "gzip: bad CRC": (gzip.compress(good)[:-8] + b"\0" * 8, "corrupt or truncated gzip"),
        "gzip: two members": (gzip.compress(good) + gzip.compress(b"x"), "but the file holds 2,369"),
        "gzip: empty content": (gzip.compress(b""), "found an empty file"),
        "gzip: absurd header": (gzip.compress(idx((1, 1, 1))[:4] + struct.pack(">3I", 60000, 2**20, 2**20)),
                                "a gzip file of this size cannot hold that many"),
        "gzip: bomb beyond the header": (gzip.compress(idx((2, 2, 2)) + b"\0" * (8 << 20)), "but the file holds"),
    }


# --- Kaggle CSV -------------------------------------------------------------------------------------------------

PIXELS = ",".join(f"pixel{i}" for i in range(784))
HEADER = "label," + PIXELS
ROW = "3," + ",".join(["0"] * 784)
GOOD_CSV = (HEADER + "\n" + ROW + "\n").encode()
# Every CSV case is tried under each of these names: pandas would pick a decompressor from the suffix, gpunn must not.
CSV_NAMES = ("train.csv", "train.csv.gz", "train.csv.zip", "train.csv.bz2", "train.csv.xz", "train.csv.zst",
             "train.tar", "train.csv.tar.gz", "train")


def last_cell(value: str) -> bytes:
    return (HEADER + "\n" + ROW[:-1] + value + "\n").encode()


def zipped(*members: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def tarred(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def csv_corpus() -> dict[str, tuple[bytes, str | None]]:
    many = GOOD_CSV + (ROW + "\n").encode() * 2499
    return {
        "valid": (GOOD_CSV, LOADS),
        "valid, CRLF": (GOOD_CSV.replace(b"\n", b"\r\n"), LOADS),
        "valid, UTF-8 BOM": (b"\xef\xbb\xbf" + GOOD_CSV, LOADS),
        "valid, blank lines": (b"\n\n" + GOOD_CSV + b"\n\n", LOADS),
        "valid gzip": (gzip.compress(GOOD_CSV), LOADS),
        "valid bzip2": (bz2.compress(GOOD_CSV), LOADS),
        "valid xz": (lzma.compress(GOOD_CSV), LOADS),
        "valid zip": (zipped(("train.csv", GOOD_CSV)), LOADS),
        "empty file": (b"", "not a CSV file with a header row: the file holds no text"),
        "blank lines only": (b"\n \n\n", "the file holds no text"),
        "header only": ((HEADER + "\n").encode(), "has a header but no rows"),
        "header without newline": (HEADER.encode(), "has a header but no rows"),
        "overflowing cell": (last_cell("99999999999999999999"),
                             "column pixel783: the cell '99999999999999999999' is out of range"),
        "negative overflow": (last_cell("-99999999999999999999"), "is out of range"),
        "just above int64": (last_cell("9223372036854775808"), "is out of range"),
        "int64 but not a pixel": (last_cell("9223372036854775807"), "pixel values must be 0-255"),
        "NaN cell": (last_cell("NaN"), "the cell 'NaN' is not an integer"),
        "inf cell": (last_cell("inf"), "the cell 'inf' is not an integer"),
        "fraction": (last_cell("1.5"), "the cell '1.5' is not an integer"),
        "hex": (last_cell("0x10"), "the cell '0x10' is not an integer"),
        "empty cell": (last_cell(""), "the cell is empty"),
        "NUL cell": (last_cell("\0"), "is not an integer"),
        "long garbage cell": (last_cell("x" * 10000), "the cell '" + "x" * 21 + "...' is not an integer"),
        "bad cell after 2,500 good rows": (many + last_cell("x")[len(HEADER) + 1:], "data row 2501, column pixel783"),
        "not UTF-8 in a row": (last_cell("\xe9").replace("\xe9".encode(), b"\xe9"), "byte 0xe9 on line 2"),
        "not UTF-8 in the header": (b"\xe9" + GOOD_CSV, "not a CSV file with a header row: the file is not UTF-8"),
        "UTF-16": (("\ufeff" + HEADER + "\n" + ROW + "\n").encode("utf-16"), "the file is UTF-16 text"),
        "row one cell short": ((HEADER + "\n" + ROW[:-2] + "\n").encode(), "column pixel783: the cell is empty"),
        "row one cell long": ((HEADER + "\n" + ROW + ",0\n").encode(), "data row 1 has more cells than the header"),
        "first row one cell long, unlabelled": ((PIXELS + "\n7," + ",".join(["0"] * 784) + "\n").encode(),
                                                "data row 1 has more cells than the header's 784"),
        "later row one cell long": ((HEADER + "\n" + ROW + "\n" + ROW + ",0\n").encode(),
                                    "the rows cannot be parsed (Error tokenizing data. C error: Expected 785 fields in "
                                    "line 3, saw 786)"),
        "unterminated quote": (last_cell('"1'), "the rows cannot be parsed (Error tokenizing data. C error: EOF "
                                                "inside string"),
        "semicolons": (GOOD_CSV.replace(b",", b";"), "found 1 columns"),
        "duplicate column": ((HEADER + ",pixel0\n" + ROW + ",0\n").encode(), "more than once pixel0"),
        "newline in a header name": (('"la\nbel"' + HEADER[5:] + "\n" + ROW + "\n").encode(), "unexpected la\\nbel"),
        "NUL in the header": (b"\0" + GOOD_CSV, "found binary data (starts with 00 6c 61 62"),
        "million-column header": (b"a," * 600_000 + b"b\n", "the first line is longer than 1,048,576 bytes"),
        "wide header": (b",".join(b"c%d" % i for i in range(50_000)) + b"\n", "found 50000 columns"),
        "label out of range": ((HEADER + "\n1" + ROW + "\n").encode(), "labels must be 0-9"),
        "gzip: truncated": (gzip.compress(many)[:-30], "corrupt or truncated gzip data"),
        "bzip2: truncated": (bz2.compress(many)[:-30], "corrupt or truncated bz2 data"),
        "xz: truncated": (lzma.compress(many)[:-30], "corrupt or truncated xz data"),
        "zip: truncated": (zipped(("train.csv", many))[:-30], "corrupt or truncated zip"),
        "zip: bad CRC": (zipped(("train.csv", GOOD_CSV)).replace(b"pixel1,", b"pixelX,", 1), "Bad CRC-32"),
        "zip: two files": (zipped(("a.csv", GOOD_CSV), ("b.csv", GOOD_CSV)), "a zip archive of 2 files (a.csv, b.csv)"),
        "zip: empty": (zipped(), "found an empty zip archive"),
        "zip: a model": (zipped(("meta.npy", b"x"), ("W1.npy", b"y")), "found an .npz archive of NumPy arrays "
                                                                      "(meta.npy, W1.npy), such as a gpunn model"),
        "zstd": (b"\x28\xb5\x2f\xfd" + b"\0" * 20, "found zstd-compressed data"),
        "tar": (tarred("train.csv", GOOD_CSV), "found a tar archive"),
        "an IDX file": (idx((2, 28, 28)), "found an IDX data file"),
        "a PNG": (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "found a PNG image"),
        "a pickle": (b"\x80\x04\x95" + b"\0" * 40, "found a Python pickle"),
        "binary noise": (bytes(range(256)) * 4, "found binary data (starts with 00 01 02"),
        "invalid UTF-8 noise": (bytes(range(128, 256)) * 4, "not a CSV file with a header row: the file is not UTF-8 "
                                                            "text: byte 0x80 on line 1"),
    }


# --- model files ------------------------------------------------------------------------------------------------


def npz_bytes(arrays: dict[str, Any], compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def checkpoint_bytes(tmp_path: Any, cpu: Any) -> bytes:
    """A valid checkpoint as gpunn train writes it: 784-6-10 relu, standardized inputs, Adam's state, 3 of 5 epochs."""
    config = TrainConfig(hidden=(6,), optimizer="adam", normalize="standardize", epochs=5)
    arch = config.architecture(784)
    params = [Layer(W, b) for W, b in init_params(arch, init="he", seed=0, dtype="float32")]
    state = {name: [Layer(np.full_like(W, 0.01), np.full_like(b, 0.01)) for W, b in params] for name in ("v", "s")}
    preprocessing = Preprocessing("standardize", np.full((784, 1), 0.1, np.float32), np.ones((784, 1), np.float32))
    info = {"config": config.as_dict(), "epochs_done": 3, "data_sha256": "ab" * 32}
    model = Model(arch, params, "float32", preprocessing, info, state)
    save_model(tmp_path / "checkpoint.npz", model, cpu)
    return (tmp_path / "checkpoint.npz").read_bytes()


def model_corpus(good: bytes) -> dict[str, tuple[bytes, str]]:
    """Damaged variants of the valid checkpoint ``good`` (784-6-10 relu, standardized inputs, Adam state), each with
    a fragment of the ModelError that loading it must raise."""
    with np.load(io.BytesIO(good)) as npz:
        arrays = {key: npz[key] for key in npz.files}
    meta = json.loads(str(arrays["meta"]))

    def with_meta(change: Callable[[dict[str, Any]], Any]) -> bytes:
        edited = copy.deepcopy(meta)
        result = change(edited)
        return npz_bytes({**arrays, "meta": np.asarray(json.dumps(edited if result is None else result))})

    def meta_value(value: Any) -> bytes:
        return npz_bytes({**arrays, "meta": np.asarray(json.dumps(value))})

    def with_arrays(**changes: Any) -> bytes:
        return npz_bytes({key: value for key, value in {**arrays, **changes}.items() if value is not None})

    def setting(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
        return lambda m: m.__setitem__(key, value)

    def without(key: str) -> Callable[[dict[str, Any]], None]:
        return lambda m: m.__delitem__(key)

    W1 = arrays["W1"]
    flip = good.index(b"\x93NUMPY", good.index(b"W1.npy")) + 400  # a byte of W1's values: its entry's CRC-32 fails
    nan3 = W1.copy()
    nan3.flat[:3] = np.nan
    not_a_model = "is not a gpunn model file (an .npz written by gpunn train): it looks like"
    return {
        "empty file": (b"", f"{not_a_model} an empty file"),
        "metrics file": (b'{"type": "epoch", "epoch": 1, "loss": 2.3}\n',
                         f"{not_a_model} a text file (starts with '{{\"type\": \"epoch\", \"epoch ...')"),
        "text": (b"hello\n", f"{not_a_model} a text file"),
        "binary": (bytes(range(256)), f"{not_a_model} binary data"),
        "npy": (good[good.index(b"\x93NUMPY"):], f"{not_a_model} a single NumPy array"),
        "pickle": (b"\x80\x04\x95" + b"\0" * 40, f"{not_a_model} a Python pickle"),
        "gzip": (gzip.compress(good), f"{not_a_model} gzip-compressed data"),
        "IDX": (idx((1, 28, 28)), f"{not_a_model} an IDX data file"),
        "truncated": (good[: len(good) // 2], "the archive is damaged or truncated"),
        "zip magic only": (b"PK\x03\x04", "the archive is damaged or truncated"),
        "flipped byte": (good[:flip] + bytes([good[flip] ^ 0xFF]) + good[flip + 1:], "is"),
        "empty zip": (b"PK\x05\x06" + b"\0" * 18, "its 'meta' entry is missing"),
        "zip of text": (zipped(("notes.txt", b"hi")), "it holds 'notes.txt', which is not a NumPy array"),
        "duplicate entry": (_with_duplicate(good, "W1.npy"), "the array W1 appears twice"),
        "meta a list": (meta_value([1, 2]), "its 'meta' entry is the JSON array [1, 2], where gpunn writes an object"),
        "meta a string": (meta_value("gpunn"), "its 'meta' entry is the JSON string \"gpunn\""),
        "meta null": (meta_value(None), "its 'meta' entry is the JSON value null"),
        "meta a number": (meta_value(3.5), "its 'meta' entry is the JSON number 3.5"),
        "meta true": (meta_value(True), "its 'meta' entry is the JSON boolean true"),
        "meta not JSON": (with_arrays(meta=np.asarray("{not json")), "'meta' entry is missing or not JSON"),
        "meta nested 100,000 deep": (with_arrays(meta=np.asarray("[" * 100_000 + "]" * 100_000)), "not JSON"),
        "meta a 5,000-digit number": (with_arrays(meta=np.asarray('{"format_version": ' + "9" * 5000 + "}")),
                                      "not JSON"),
        "meta an array of floats": (with_arrays(meta=np.zeros(3)), "its 'meta' entry is a float64 array"),
        "meta of objects": (with_arrays(meta=np.array([{"a": 1}], dtype=object)), "holds Python objects"),
        "meta missing": (with_arrays(meta=None), "its 'meta' entry is missing"),
        "format missing": (with_meta(without("format")), "format None, expected 'gpunn-model'"),
        "format a number": (with_meta(setting("format", 1)), "format 1, expected"),
        "version true": (with_meta(setting("format_version", True)), "model format version true"),
        "version a string": (with_meta(setting("format_version", "1")), 'model format version "1"'),
        "version 99": (with_meta(setting("format_version", 99)), "model format version 99"),
        "layer_sizes missing": (with_meta(without("layer_sizes")), "meta.layer_sizes is missing"),
        "layer_sizes a string": (with_meta(setting("layer_sizes", "784,6,10")), 'meta.layer_sizes is "784,6,10"'),
        "layer_sizes floats": (with_meta(setting("layer_sizes", [784, 6.0, 10])), "meta.layer_sizes is [784, 6.0"),
        "layer_sizes bools": (with_meta(setting("layer_sizes", [784, True, 10])), "meta.layer_sizes is [784, true"),
        "layer_sizes zero": (with_meta(setting("layer_sizes", [784, 0, 10])), "positive integers"),
        "layer_sizes negative": (with_meta(setting("layer_sizes", [784, -6, 10])), "positive integers"),
        "layer_sizes one": (with_meta(setting("layer_sizes", [784])), "at least 2"),
        "layer_sizes nested": (with_meta(setting("layer_sizes", [[784], [6], [10]])), "positive integers"),
        "layer_sizes an object": (with_meta(setting("layer_sizes", {"a": 1})), 'meta.layer_sizes is {"a": 1}'),
        "layer_sizes absurd": (with_meta(setting("layer_sizes", [784, 10**12, 10])),
                               "W1 (6, 784) does not fit the layer sizes [784, 1000000000000, 10]"),
        "layer_sizes other": (with_meta(setting("layer_sizes", [784, 12, 10])), "W1 (6, 784) does not fit"),
        "activation a number": (with_meta(setting("activation", 3)), "meta.activation is 3, expected one of relu"),
        "activation a list": (with_meta(setting("activation", ["relu"])), 'meta.activation is ["relu"]'),
        "activation unknown": (with_meta(setting("activation", "gelu")), 'meta.activation is "gelu"'),
        "output missing": (with_meta(without("output")), "meta.output is missing"),
        "dtype int32": (with_meta(setting("dtype", "int32")), 'meta.dtype is "int32"'),
        "dtype a number": (with_meta(setting("dtype", 32)), "meta.dtype is 32"),
        "preprocessing unknown": (with_meta(setting("preprocessing", "whiten")), 'meta.preprocessing is "whiten"'),
        "preprocessing a number": (with_meta(setting("preprocessing", 1)), "meta.preprocessing is 1"),
        "scale with statistics": (with_meta(setting("preprocessing", "scale")),
                                      "it holds input_mean, input_std, which a 784-6-10"),
        "info a list": (with_meta(setting("info", [1])), "meta.info is [1], expected an object"),
        "gpunn_version a number": (with_meta(setting("gpunn_version", 1)), "meta.gpunn_version is 1"),
        "W1 of objects": (with_arrays(W1=np.empty(W1.shape, dtype=object)), "the array W1 holds Python objects"),
        "W1 complex": (with_arrays(W1=W1.astype(np.complex64)), "W1 is an array of complex64 (complex numbers)"),
        "W1 integers": (with_arrays(W1=W1.astype(np.int32)), "W1 is an array of int32 (integers)"),
        "W1 strings": (with_arrays(W1=W1.astype(str)), "(strings)"),
        "W1 booleans": (with_arrays(W1=W1 > 0), "W1 is an array of bool"),
        "W1 records": (with_arrays(W1=np.zeros(W1.shape, dtype=[("x", "f4")])), "(raw records)"),
        "W1 3 NaNs": (with_arrays(W1=nan3), "W1 holds 3 non-finite values (NaN or infinite) in float32; the model is "
                                            "damaged or came from a diverged run"),
        "W1 infinite": (with_arrays(W1=np.full_like(W1, np.inf)), "W1 holds 4,704 non-finite values"),
        "W1 beyond float32": (with_arrays(W1=np.full(W1.shape, 1e300)), "W1 holds 4,704 non-finite values"),
        "W1 transposed": (with_arrays(W1=W1.T), "W1 (784, 6) does not fit the layer sizes [784, 6, 10], which need "
                                                "(6, 784)"),
        "W1 flat": (with_arrays(W1=W1.ravel()), "W1 (4704,) does not fit"),
        "W1 a scalar": (with_arrays(W1=np.float32(1)), "W1 () does not fit"),
        "b1 flat": (with_arrays(b1=arrays["b1"].ravel()), "b1 (6,) does not fit"),
        "W2 missing": (with_arrays(W2=None), "the array W2 of the layer sizes [784, 6, 10] is missing"),
        "unknown array": (with_arrays(extra=np.zeros(3)), "it holds extra, which a 784-6-10"),
        "W3 without its layer": (with_arrays(W3=np.zeros((10, 10), np.float32)), "it holds W3"),
        "input_std zero": (with_arrays(input_std=np.zeros_like(arrays["input_std"])), "input_std holds 784 values "
                                                                                     "that are not positive"),
        "input_std missing": (with_arrays(input_std=None), "the array input_std"),
        "input_mean NaN": (with_arrays(input_mean=np.full_like(arrays["input_mean"], np.nan)), "input_mean holds 784 "
                                                                                              "non-finite"),
        "optimizer state of the wrong shape": (with_arrays(opt_v_W1=arrays["opt_v_W1"][:3]), "opt_v_W1 (3, 784)"),
        "optimizer state incomplete": (with_arrays(opt_v_b2=None), "the array opt_v_b2"),
        "unknown optimizer state": (with_arrays(opt_q_W1=W1), "it holds optimizer state 'q'"),
        "negative squared averages": (with_arrays(opt_s_W1=-np.ones_like(W1)), "opt_s_W1 holds 4,704 values that are "
                                                                              "not at least 0"),
        "NaN optimizer state": (with_arrays(opt_v_W1=np.full_like(W1, np.nan)), "opt_v_W1 holds 4,704 non-finite"),
        "header announces another shape": (good.replace(b"'shape': (6, 784)", b"'shape': (6, 785)", 1),
                                           "the array W1 announces shape (6, 785) of float32 (18,840 bytes), but its "
                                           "entry holds 18,816"),
        "header announces an expression": (good.replace(b"'shape': (6, 784)", b"'shape': (6**784)", 1),
                                           "W1.npy does not start with a valid .npy header"),
        "NUL in an .npy header": (good.replace(b"'descr': '<f4'", b"'descr': '<f\0'", 1),
                                  "W1.npy does not start with a valid .npy header"),
        "header announces no dtype": (good.replace(b"'descr': '<f4'", b"'descr': 'zzz'", 1),
                                      "does not start with a valid .npy header"),
        "lzma-compressed entries": (_recompressed(good, zipfile.ZIP_LZMA), "uses zip compression method 14"),
    }


def _with_duplicate(good: bytes, name: str) -> bytes:
    buffer = io.BytesIO(good)
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "a") as archive:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name: that is the point
        archive.writestr(name, archive.read(name))
    return buffer.getvalue()


def _recompressed(good: bytes, method: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as source, zipfile.ZipFile(buffer, "w", compression=method) as target:
        for name in source.namelist():
            target.writestr(name, source.read(name))
    return buffer.getvalue()


def model_variants_that_load(good: bytes) -> dict[str, bytes]:
    """Unusual but valid encodings of ``good``: each must load with the same weights."""
    with np.load(io.BytesIO(good)) as npz:
        arrays = {key: npz[key] for key in npz.files}
    return {
        "deflated": npz_bytes(arrays, compressed=True),
        "W1 float64": npz_bytes({**arrays, "W1": arrays["W1"].astype(np.float64)}),
        "W1 big-endian": npz_bytes({**arrays, "W1": arrays["W1"].astype(">f4")}),
        "W1 Fortran order": npz_bytes({**arrays, "W1": np.asfortranarray(arrays["W1"])}),
        "meta as bytes": npz_bytes({**arrays, "meta": np.asarray(str(arrays["meta"]).encode())}),
    }


def resume_corpus(good: bytes) -> dict[str, tuple[bytes, str]]:
    """Variants of ``good`` that load (for evaluate and predict) but whose resume state is missing or damaged: each
    with a fragment of the ModelError that ``Model.resume_state()`` must raise."""
    with np.load(io.BytesIO(good)) as npz:
        arrays = {key: npz[key] for key in npz.files}
    meta = json.loads(str(arrays["meta"]))

    def info(change: Callable[[dict[str, Any]], None]) -> bytes:
        edited = copy.deepcopy(meta)
        change(edited["info"])
        return npz_bytes({**arrays, "meta": np.asarray(json.dumps(edited))})

    def config(key: str, value: Any) -> bytes:
        return info(lambda i: i["config"].__setitem__(key, value))

    no_state = "holds no training state to resume"
    return {
        "no info": (npz_bytes({**arrays, "meta": np.asarray(json.dumps({k: v for k, v in meta.items()
                                                                          if k != "info"}))}),
                    f"{no_state} (info.config is missing)"),
        "no config": (info(lambda i: i.pop("config")), f"{no_state} (info.config is missing)"),
        "no epochs_done": (info(lambda i: i.pop("epochs_done")), f"{no_state} (info.epochs_done is missing)"),
        "config a list": (info(lambda i: i.__setitem__("config", [1])), "info.config is [1], not an object of "
                                                                        "settings"),
        "config a string": (info(lambda i: i.__setitem__("config", "x")), 'info.config is "x"'),
        "run shorter than its epochs": (config("epochs", 2), "info.epochs_done is 3, expected a whole number from 0 "
                                                             "to the run's 2 epochs"),
        "epochs_done -3": (info(lambda i: i.__setitem__("epochs_done", -3)),
                           "info.epochs_done is -3, expected a whole number from 0 to the run's 5 epochs"),
        "epochs_done a string": (info(lambda i: i.__setitem__("epochs_done", "3")), 'info.epochs_done is "3"'),
        "epochs_done a float": (info(lambda i: i.__setitem__("epochs_done", 3.0)), "info.epochs_done is 3.0"),
        "epochs_done true": (info(lambda i: i.__setitem__("epochs_done", True)), "info.epochs_done is true"),
        "epochs_done null": (info(lambda i: i.__setitem__("epochs_done", None)), "info.epochs_done is null"),
        "epochs_done beyond the run": (info(lambda i: i.__setitem__("epochs_done", 6)), "info.epochs_done is 6"),
        "lr a string": (config("lr", "0.1"), "saved training settings (info.config) are damaged"),
        "lr NaN": (config("lr", float("nan")), "saved training settings (info.config) are damaged"),
        "epochs true": (config("epochs", True), "saved training settings (info.config) are damaged"),
        "epochs negative": (config("epochs", -1), "saved training settings (info.config) are damaged"),
        "hidden a string": (config("hidden", "6"), "saved training settings (info.config) are damaged"),
        "unknown setting": (config("momentum", 0.9), "saved training settings (info.config) are damaged"),
        "a setting missing": (info(lambda i: i["config"].pop("lr")), "saved training settings (info.config) lack lr"),
        "epochs missing": (info(lambda i: i["config"].pop("epochs")), "(info.config) lack epochs"),
        "hidden not the weights'": (config("hidden", [12]), "hidden layers [12] there, [6] in the weights"),
        "activation not the weights'": (config("activation", "tanh"), "activation tanh there, relu in the weights"),
        "dtype not the weights'": (config("dtype", "float64"), "dtype float64 there, float32 in the weights"),
        "inputs not the weights'": (config("normalize", "scale"), "inputs scale there, standardize in the weights"),
        "optimizer not the state's": (config("optimizer", "momentum"), "optimizer state ['v'] there, ['s', 'v']"),
        "data digest missing": (info(lambda i: i.pop("data_sha256")), "info.data_sha256 is missing"),
        "data digest a number": (info(lambda i: i.__setitem__("data_sha256", 5)), "info.data_sha256 is 5"),
    }


# --- metrics files ----------------------------------------------------------------------------------------------


def metrics_corpus(good: bytes, model: bytes) -> dict[str, tuple[bytes, str | None]]:
    epoch = {"type": "epoch", "epoch": 1, "loss": 2.3, "train_accuracy": 0.1, "val_loss": None, "val_accuracy": None}

    def line(**changes: Any) -> bytes:
        record = {key: value for key, value in {**epoch, **changes}.items() if value != "DROP"}
        return (json.dumps(record) + "\n").encode()

    expected = "expected the JSON lines that gpunn train --metrics-out writes"
    return {
        "valid": (good, LOADS),
        "valid, BOM and CRLF": (b"\xef\xbb\xbf" + good.replace(b"\n", b"\r\n"), LOADS),
        "valid, no validation split": (line(), LOADS),
        "a model": (model, f"{expected}, one object per epoch; the file looks like a zip archive"),
        "binary": (bytes(range(256)), "the file looks like binary data"),
        "empty": (b"", "the file looks like an empty file"),
        "blank lines": (b"\n\n \n", "the file looks like a text file of blank lines"),
        "a CSV": (b"label,pixel0\n1,2\n", "the file looks like a text file (starts with 'label,pixel0 1,2')"),
        "a JSON list": (b"[1, 2]\n", "the file looks like a text file"),
        "an object without type": (b'{"a": 1}\n', 'line 1 is {"a": 1}, not a metrics record with a "type"'),
        "a summary only": (b'{"type": "summary"}\n', 'no epoch records ("type": "epoch") to plot'),
        "epoch without loss": (line(loss="DROP"), 'the epoch record\'s "loss" is missing, expected a number'),
        "epoch without epoch": (line(epoch="DROP"), 'the epoch record\'s "epoch" is missing'),
        "loss a string": (line(loss="x"), 'the epoch record\'s "loss" is "x", expected a number'),
        "accuracy true": (line(train_accuracy=True), '"train_accuracy" is true'),
        "epoch a float": (line(epoch=1.5), '"epoch" is 1.5, expected a whole number'),
        "val_loss a list": (line(val_loss=[1]), '"val_loss" is [1], expected a number or null'),
        "a broken line": (good + b"{oops\n", "is not JSON"),
        "a line of another type": (good + b"[1]\n", "is [1], not a metrics record"),
        "not UTF-8": (b'{"type": "epoch\xe9"}\n', "is not UTF-8 text"),
        "nested 100,000 deep": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"\n", "line 1 is not JSON"),
    }
