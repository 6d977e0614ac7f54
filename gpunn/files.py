"""Writing files so that a crash or an error never leaves a half-written file under the real name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from gpunn.errors import GpunnError


class OutputError(GpunnError):
    """An output path cannot be written."""

    exit_code = 2


def check_writable(path: str | Path, option: str) -> Path:
    """Fail now, before any work, if ``path`` cannot be created: the directory must exist and be writable."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a directory; give a file name")
    if not folder.is_dir():
        raise OutputError(f"{option} {path}: directory {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: directory {folder} is not writable")
    return path


def check_directory(path: str | Path, option: str) -> Path:
    """Fail now if ``path`` cannot hold output files: an existing writable directory, or one its parent can hold."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{option} {path}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{option} {path}: directory is not writable")
        return path
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: directory {parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file beside ``path`` and rename it into place only when the block succeeds."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from error
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
