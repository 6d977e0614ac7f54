"""Fetch MNIST-format data sets from public mirrors into a local cache, verifying every file's published digest.

Each file streams into a temporary file in the cache directory while it is hashed. It is renamed to its real name
only when the digest matches, so the cache never holds a partial or altered file under a real name. A mirror that
fails (error status, broken, stalled or truncated transfer, wrong digest) is skipped for the next one. When all of
them fail, DownloadError lists why, for each mirror, and the cache is left as it was: no temporary file, and no
directory that the attempt created.

No mirror can hang a fetch: connecting has :data:`CONNECT_TIMEOUT` seconds, and after that every wait for data (the
response's headers, then each piece of the body) has :data:`READ_TIMEOUT` seconds. A caller's progress object hears
which mirror is being tried, the bytes as they arrive, and why a mirror failed (:class:`FetchProgress`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gpunn.errors import GpunnError

CHUNK = 1 << 16
#: seconds to open a connection (TCP, and TLS for https). A reachable server answers in well under one; a mirror
#: behind a firewall that drops packets is given up quickly
CONNECT_TIMEOUT = 10.0
#: seconds to wait for the response's headers, and then for each piece of the body. A mirror that accepts the
#: connection and then stalls is left after this long, not after the operating system's minutes
READ_TIMEOUT = 20.0


class FetchProgress(Protocol):
    """What :func:`fetch` tells its caller, per file, as it works (:class:`gpunn.progress.DownloadProgress` draws
    it). Files already in the cache with the right digest cause no call at all."""

    def trying(self, name: str, url: str) -> None:
        """About to connect to ``url`` for the file ``name``."""

    def received(self, name: str, done: int, total: int | None) -> None:
        """``done`` bytes of ``name`` have arrived; ``total`` is None when the server does not say."""

    def failed(self, name: str, url: str, reason: str) -> None:
        """``url`` could not deliver ``name``, for ``reason``; the next mirror (if any) follows."""

    def finished(self, name: str, size: int) -> None:
        """``name`` arrived whole, its digest matched, and it is in place in the cache."""


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
    progress: FetchProgress | Callable[[str, int, int | None], None] | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
) -> Path:
    """Make sure every file of ``source`` is in ``root/source.name`` with its published digest; return that folder.

    Files already cached with the right digest are not fetched again. ``progress``: a :class:`FetchProgress`, or a
    plain callable ``progress(name, bytes_so_far, total)`` that hears of the bytes only. ``connect_timeout`` and
    ``read_timeout``: see :data:`CONNECT_TIMEOUT` and :data:`READ_TIMEOUT`.
    """
    report = _as_fetch_progress(progress)
    folder = (root or cache_root()) / source.name
    created = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    opener = urllib.request.build_opener(_HTTPHandler(read_timeout), _HTTPSHandler(read_timeout))
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DownloadError(f"cannot create the data cache {folder}: {error.strerror or error}; set "
                                "GPUNN_DATA_DIR to a writable directory") from error
        for name, (algorithm, expected) in source.files.items():
            target = folder / name
            if target.is_file() and file_digest(target, algorithm) == expected:
                continue
            failures = []
            for mirror in source.mirrors:
                url = mirror + name
                report.trying(name, url)
                try:
                    size = _download(opener, url, target, algorithm, expected, report, connect_timeout, read_timeout)
                except _MirrorFailed as failure:
                    report.failed(name, url, str(failure))
                    failures.append(f"{url}: {failure}")
                else:
                    report.finished(name, size)
                    break
            else:
                raise DownloadError(
                    f"could not fetch {name} of {source.name} from any mirror ({'; '.join(failures)}). "
                    f"The data cache is {folder}. Offline, download the four files by other means and pass their "
                    f"directory with --data-dir DIR, or train on the bundled sample by giving no data option"
                )
    except BaseException:
        # Ctrl-C as well: take back the directories this call made, deepest first, where nothing landed in them
        for path in created:
            try:
                path.rmdir()
            except OSError:  # not empty (a file fetched before the failure), or never made
                break
        raise
    return folder


class _MirrorFailed(Exception):
    """One mirror could not deliver one file; the next mirror is tried."""


class _ConnectTimeout(TimeoutError):
    """The connection itself was not made in time (as opposed to a server that connected and then went quiet)."""


class _ReadTimeoutConnection:
    """Connects within the connection's own ``timeout`` (the connect timeout, given to urlopen), then gives every
    wait for data ``read_timeout``. urllib has one timeout for both, so a short one would cut off a slow but live
    mirror, and a long one would leave a user watching a dead one."""

    read_timeout: float
    sock: Any

    def connect(self) -> None:
        try:
            super().connect()  # type: ignore[misc]
        except TimeoutError as error:
            raise _ConnectTimeout(str(error)) from error
        self.sock.settimeout(self.read_timeout)


class _HTTPConnection(_ReadTimeoutConnection, http.client.HTTPConnection):
    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout


class _HTTPSConnection(_ReadTimeoutConnection, http.client.HTTPSConnection):
    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, read_timeout: float) -> None:
        super().__init__()
        self.read_timeout = read_timeout

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTPConnection, read_timeout=self.read_timeout), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout: float) -> None:
        super().__init__()
        self.read_timeout = read_timeout

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTPSConnection, read_timeout=self.read_timeout), req,
                            context=self._context)


class _BytesOnly:
    """A plain ``progress(name, done, total)`` callable, seen as a :class:`FetchProgress`."""

    def __init__(self, callback: Callable[[str, int, int | None], None] | None) -> None:
        self.callback = callback

    def trying(self, name: str, url: str) -> None:
        pass

    def received(self, name: str, done: int, total: int | None) -> None:
        if self.callback is not None:
            self.callback(name, done, total)

    def failed(self, name: str, url: str, reason: str) -> None:
        pass

    def finished(self, name: str, size: int) -> None:
        pass


def _as_fetch_progress(progress: FetchProgress | Callable[[str, int, int | None], None] | None) -> FetchProgress:
    if progress is None or not hasattr(progress, "trying"):
        return _BytesOnly(progress)  # type: ignore[arg-type]
    return progress  # type: ignore[return-value]


def _download(opener: urllib.request.OpenerDirector, url: str, target: Path, algorithm: str, expected: str,
              progress: FetchProgress, connect_timeout: float, read_timeout: float) -> int:
    """Fetch ``url`` into ``target`` through a temporary file, checking its digest; return its size in bytes."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    digest = hashlib.new(algorithm)
    received = 0
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "gpunn"})
            with opener.open(request, timeout=connect_timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                # read1: whatever one wait for data brings, so that the read timeout bounds each wait, and progress
                # moves as bytes arrive rather than per 64 KiB
                while chunk := response.read1(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    progress.received(target.name, received, total)
        if total is not None and received != total:
            raise _MirrorFailed(f"transfer cut short after {received:,} of {total:,} bytes")
        if digest.hexdigest() != expected:
            raise _MirrorFailed(f"{algorithm} {digest.hexdigest()} does not match the published {expected}")
        os.replace(tmp, target)
        return received
    except urllib.error.HTTPError as error:
        raise _MirrorFailed(f"HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:  # refused, reset, ...
        reason = getattr(error, "reason", None) or error
        if isinstance(reason, _ConnectTimeout):
            raise _MirrorFailed(f"could not connect: timed out after {connect_timeout:g} s") from error
        if isinstance(reason, TimeoutError):
            during = f"after {received:,} bytes" if received else "before the response"
            raise _MirrorFailed(f"timed out after {read_timeout:g} s with no data ({during})") from error
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
