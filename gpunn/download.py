"""Fetch MNIST-format data sets from public mirrors into a local cache, verifying every file's published digest.

Each file streams into a temporary file in the cache directory while it is hashed. It is renamed to its real name
only when the digest matches, so the cache never holds a partial or altered file under a real name. A mirror that
fails (error status, broken or truncated transfer, wrong digest) is skipped for the next one. When all of them fail,
DownloadError lists why, for each mirror.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpunn.errors import GpunnError

CHUNK = 1 << 16


class DownloadError(GpunnError):
    """No mirror delivered a file with the published digest."""


@dataclass(frozen=True)
class Source:
    """A data set: the base URLs of its mirrors, in order, and each file's published digest (algorithm, hex)."""

    name: str
    mirrors: tuple[str, ...]
    files: dict[str, tuple[str, str]]


DATASETS = {
    "mnist": Source(
        "mnist",
        (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        {
            "train-images-idx3-ubyte.gz": ("sha256", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            "train-labels-idx1-ubyte.gz": ("sha256", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            "t10k-images-idx3-ubyte.gz": ("sha256", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            "t10k-labels-idx1-ubyte.gz": ("sha256", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        },
    ),
    # Zalando publishes MD5 sums only
    "fashion-mnist": Source(
        "fashion-mnist",
        (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        {
            "train-images-idx3-ubyte.gz": ("md5", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            "train-labels-idx1-ubyte.gz": ("md5", "25c81989df183df01b3e8a0aad5dffbe"),
            "t10k-images-idx3-ubyte.gz": ("md5", "bef4ecab320f06d8554ea6380940ec79"),
            "t10k-labels-idx1-ubyte.gz": ("md5", "bb300cfdad3c16e7a12a480ee83cd310"),
        },
    ),
}


def cache_root(environ: dict[str, str] | None = None) -> Path:
    """``$GPUNN_DATA_DIR``, else ``$XDG_CACHE_HOME/gpunn``, else ``~/.cache/gpunn``."""
    env = os.environ if environ is None else environ
    if env.get("GPUNN_DATA_DIR"):
        return Path(env["GPUNN_DATA_DIR"])
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpunn"


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(
    source: Source,
    root: Path | None = None,
    *,
    progress: Callable[[str, int, int | None], None] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Make sure every file of ``source`` is in ``root/source.name`` with its published digest; return that folder.

    Files already cached with the right digest are not fetched again. ``progress(name, bytes_so_far, total)`` is
    called as data arrive (``total`` None when the server does not say).
    """
    folder = (root or cache_root()) / source.name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DownloadError(f"cannot create the data cache {folder}: {error.strerror or error}; set GPUNN_DATA_DIR "
                            "to a writable directory") from error
    for name, (algorithm, expected) in source.files.items():
        target = folder / name
        if target.is_file() and file_digest(target, algorithm) == expected:
            continue
        failures = []
        for mirror in source.mirrors:
            url = mirror + name
            try:
                _download(url, target, algorithm, expected, progress, timeout)
                break
            except _MirrorFailed as failure:
                failures.append(f"{url}: {failure}")
        else:
            raise DownloadError(
                f"could not fetch {name} of {source.name} from any mirror ({'; '.join(failures)}). "
                f"The data cache is {folder}. Offline, download the four files by other means and pass their directory "
                f"with --data-dir DIR, or train on the bundled sample by giving no data option"
            )
    return folder


class _MirrorFailed(Exception):
    """One mirror could not deliver one file; the next mirror is tried."""


def _download(url: str, target: Path, algorithm: str, expected: str,
              progress: Callable[[str, int, int | None], None] | None, timeout: float) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    digest = hashlib.new(algorithm)
    received = 0
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "gpunn"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    if progress is not None:
                        progress(target.name, received, total)
        if total is not None and received != total:
            raise _MirrorFailed(f"transfer cut short after {received:,} of {total:,} bytes")
        if digest.hexdigest() != expected:
            raise _MirrorFailed(f"{algorithm} {digest.hexdigest()} does not match the published {expected}")
        os.replace(tmp, target)
    except urllib.error.HTTPError as error:
        raise _MirrorFailed(f"HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:  # refused, reset, ...
        reason = getattr(error, "reason", None) or error
        raise _MirrorFailed(f"{type(error).__name__}: {reason}") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def cached(root: Path | None = None) -> list[dict[str, object]]:
    """What the cache holds, per data set and file: size, digest, and whether it matches the published one."""
    rows = []
    base = root or cache_root()
    for source in DATASETS.values():
        for name, (algorithm, expected) in source.files.items():
            path = base / source.name / name
            if path.is_file():
                actual = file_digest(path, algorithm)
                rows.append({"dataset": source.name, "file": name, "path": str(path), "bytes": path.stat().st_size,
                             "algorithm": algorithm, "digest": actual, "verified": actual == expected})
    return rows
