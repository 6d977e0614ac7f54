"""Files in and out. Outputs: a crash, an error or a signal never leaves a half-written file under the real name,
nor a temporary file beside it. Inputs: a path that is not a readable regular file (missing, a directory, a FIFO,
a device) is refused with one line before anything reads it, and unknown bytes are described rather than parsed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import stat
import string
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, BinaryIO

from gpunn.errors import GpunnError

__all__ = [
    "HELD_SIGNALS",
    "OutputError",
    "atomic_write",
    "check_directory",
    "check_writable",
    "deferred_signals",
    "describe_bytes",
    "open_input",
]


class OutputError(GpunnError):
    """An output path cannot be written."""

    exit_code = 2


# --- inputs -------------------------------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


_OPEN_REASONS = {
    errno.ENOENT: "no such file (it does not exist); check the path",
    errno.EACCES: "permission denied; make the file readable (chmod u+r) or run as its owner",
    errno.EPERM: "permission denied; make the file readable (chmod u+r) or run as its owner",
    errno.ENOTDIR: "a part of the path before the file name is not a directory; check the path",
    errno.ENAMETOOLONG: "the path is longer than the file system allows; check the path",
    errno.ELOOP: "too many levels of symbolic links; check the path",
    errno.EISDIR: "it is a directory; give a file",
    errno.ENXIO: "it is a socket or a device with no driver, not a regular file; give a regular file",
}


def open_input(path: str | Path, error: type[GpunnError]) -> BinaryIO:
    """``path`` opened for reading in binary mode, if it is a regular file; else ``error`` with one line.

    The file is opened with O_NONBLOCK and checked with fstat on the open descriptor, so a FIFO never blocks the
    process and nothing can swap the file between the check and the read.
    """
    text = os.fspath(path)
    if text == "":
        raise error("cannot read the file: the path is empty; give a file name")
    try:
        fd = os.open(text, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except ValueError as caught:  # a NUL byte in the path
        raise error(f"cannot read {text!r}: the path contains a NUL byte") from caught
    except OSError as caught:
        reason = _OPEN_REASONS.get(caught.errno or 0, caught.strerror or str(caught))
        raise error(f"cannot read {text}: {reason}") from caught
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            fix = "give the file itself" if stat.S_ISDIR(info.st_mode) else "copy the data into a regular file first"
            raise error(f"cannot read {text}: it is {_kind(info.st_mode)}, not a regular file; {fix}")
        os.set_blocking(fd, True)  # back to ordinary reads (a no-op for regular files, but say what we mean)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_TEXT = set(string.printable) - set("\x0b\x0c")


def describe_bytes(head: bytes) -> str:
    """What a file that starts with ``head`` looks like, for error messages: 'an empty file', 'a text file (starts
    with '{"type": ...')', 'gzip-compressed data', ... ``head`` should be the first 512 bytes or so (a tar archive
    is recognised at byte 257)."""
    if not head:
        return "an empty file"
    known = [
        (b"PK\x03\x04", "a zip archive (an .npz is one)"),
        (b"PK\x05\x06", "an empty zip archive"),
        (b"\x1f\x8b", "gzip-compressed data"),
        (b"BZh", "bzip2-compressed data"),
        (b"\xfd7zXZ\x00", "xz-compressed data"),
        (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
        (b"\x93NUMPY", "a single NumPy array (.npy), not an .npz archive"),
        (b"\x89PNG\r\n\x1a\n", "a PNG image"),
        (b"%PDF", "a PDF document"),
        (b"\x7fELF", "an executable (ELF)"),
        (b"\x00\x00\x08", "an IDX data file (MNIST images or labels)"),
    ]
    for magic, what in known:
        if head.startswith(magic):
            return what
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    if len(head) > 257 + 5 and head[257:262] == b"ustar":
        return "a tar archive"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as caught:
        # a multi-byte character cut off at the end of ``head`` still leaves text
        text = head[: caught.start].decode("utf-8") if caught.start >= len(head) - 3 else ""
    if text and all(ord(c) >= 0x80 or c in _TEXT for c in text):
        shown = " ".join(text.split())
        if not shown:
            return "a text file of blank lines"
        return f"a text file (starts with '{shown[:24]}{' ...' if len(shown) > 24 else ''}')"
    return f"binary data (starts with {head[:8].hex(' ')})"


# --- outputs ------------------------------------------------------------------------------------------------------


def _is_dir(path: Path) -> bool:
    """Path.is_dir() that is False, not an exception, for a path too long or otherwise impossible to look up."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _existing(path: Path, option: str) -> os.stat_result | None:
    """The stat of what ``path`` names now (following links), or None when nothing does; OutputError when the path
    itself is unusable. A dangling symbolic link counts as nothing: the new file replaces the link."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except ValueError as caught:
        raise OutputError(f"{option} {os.fspath(path)!r}: the path contains a NUL byte; give a file name") from caught
    except NotADirectoryError as caught:
        raise OutputError(f"{option} {path}: a part of the path before the file name is not a directory") from caught
    except OSError as caught:
        if caught.errno == errno.ENAMETOOLONG:
            raise OutputError(f"{option} {path}: the path is longer than the file system allows; give a shorter "
                              "name") from caught
        raise OutputError(f"{option} {path}: {caught.strerror or caught}") from caught


def _refuse_non_regular(path: Path, info: os.stat_result | None, option: str) -> None:
    if info is None or stat.S_ISREG(info.st_mode):
        return
    if stat.S_ISDIR(info.st_mode):
        raise OutputError(f"{option} {path}: is a directory; give a file name")
    # replacing a device node, a FIFO or a socket with a regular file would break whatever uses it (as root,
    # --out /dev/null would replace the real device)
    raise OutputError(f"{option} {path}: exists and is {_kind(info.st_mode)}, not a regular file; gpunn writes "
                      "only regular files, so give another path")


def check_writable(path: str | Path, option: str) -> Path:
    """Fail now, before any work, if ``path`` cannot be created: a non-empty file name of a length the file system
    allows, not naming a directory, device, FIFO or socket, in a directory that exists and is writable."""
    if os.fspath(path) == "":
        raise OutputError(f"{option}: the file name is empty; give a file name such as model.npz")
    path = Path(path)
    folder = path.parent
    # before stat(), which would only say ENAMETOOLONG
    length, limit = len(os.fsencode(path.name)), _name_max(folder if _is_dir(folder) else Path("."))
    if length > limit:
        raise OutputError(f"{option} {path.name[:40]}...: the file name is {length} bytes long, more than the "
                          f"{limit} the file system allows; give a shorter name")
    info = _existing(path, option)
    _refuse_non_regular(path, info, option)
    if not _is_dir(folder):
        if os.path.lexists(folder):
            raise OutputError(f"{option} {path}: {folder} is not a directory")
        raise OutputError(f"{option} {path}: directory {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: directory {folder} is not writable")
    return path


def check_directory(path: str | Path, option: str) -> Path:
    """Fail now if ``path`` cannot hold output files: an existing writable directory, or one its parent can hold."""
    if os.fspath(path) == "":
        raise OutputError(f"{option}: the directory name is empty; give a directory")
    path = Path(path)
    info = _existing(path, option)
    if info is not None:
        if not stat.S_ISDIR(info.st_mode):
            raise OutputError(f"{option} {path}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{option} {path}: directory is not writable")
        return path
    parent = path.parent
    if not _is_dir(parent):
        raise OutputError(f"{option} {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: directory {parent} is not writable")
    return path


_WRITE_FAILURES = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EFBIG: "the file would exceed the file-size limit (ulimit -f) or the file system's largest file; raise "
                 "the limit or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "permission denied; write to a directory you can write to",
    errno.EPERM: "permission denied; write to a directory you can write to",
    errno.EIO: "an input/output error on the device",
    errno.ENAMETOOLONG: "the file name is longer than the file system allows; give a shorter name",
}


def _failure(path: Path, caught: OSError) -> OutputError:
    reason = _WRITE_FAILURES.get(caught.errno or 0, caught.strerror or str(caught))
    return OutputError(f"cannot write {path}: {reason}; nothing was written")


def _temporary_name(path: Path) -> Path:
    """A fresh name beside ``path``: '.NAME.RANDOM.tmp', with NAME shortened so that the whole stays within the
    file system's limit on names even when ``path``'s own name is close to it."""
    suffix = f".{secrets.token_hex(6)}.tmp"
    room = _name_max(path.parent) - len(suffix) - 1
    stem = os.fsencode(path.name)[: max(room, 1)].decode("utf-8", "ignore") or "out"
    return path.with_name(f".{stem}{suffix}")


def _remove(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file beside ``path`` and rename it into place only when the block succeeds.

    - The new file gets the permissions any program's new file gets, 0666 minus the umask; a regular file it
      replaces keeps its own permission bits, as with ``>`` in a shell.
    - An OSError while writing (no space left, the file-size limit, a quota) becomes one OutputError line.
    - Whatever ends the block early (an error, KeyboardInterrupt, SystemExit from a signal handler) removes the
      temporary file; the real name then still holds its old content, or nothing.
    - A path that names a directory, a device, a FIFO or a socket is refused, before writing and again just
      before the rename.
    - The data reach the disk (fsync) before the rename, so a power cut leaves the old file or the new one.
    """
    if os.fspath(path) == "":
        raise OutputError("cannot write a file with an empty name; give a file name")
    path = Path(path)
    option = "cannot write"
    _refuse_non_regular(path, _existing(path, option), option)
    while True:
        tmp = _temporary_name(path)
        try:
            # 0o666: the kernel applies the umask, exactly as for any other program's new file
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:
            continue  # someone else's file with the same random name: never touch it, draw another
        except OSError as caught:
            raise _failure(path, caught) from caught
        except BaseException:
            # a signal handler raised just after the file was created but before ``fd`` was bound; the random
            # name was free (O_EXCL), so a file under it now is ours
            _remove(tmp)
            raise
    try:
        with contextlib.suppress(FileNotFoundError):
            kept = os.stat(path)
            if stat.S_ISREG(kept.st_mode):
                os.fchmod(fd, stat.S_IMODE(kept.st_mode) & 0o777)
        handle = os.fdopen(fd, mode) if "b" in mode else os.fdopen(fd, mode, encoding="utf-8")
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _refuse_non_regular(path, _existing(path, option), option)  # something may have appeared meanwhile
        os.replace(tmp, path)
    except OSError as caught:
        _remove(tmp)
        raise _failure(path, caught) from caught
    except BaseException:
        _remove(tmp)
        raise


# --- signals during a save ----------------------------------------------------------------------------------------

#: what a user or a scheduler sends to stop a run: Ctrl-C, kill/timeout/systemd, a closed terminal
HELD_SIGNALS: tuple[int, ...] = tuple(
    s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None
)


@contextlib.contextmanager
def deferred_signals(signals: Sequence[int] = HELD_SIGNALS) -> Iterator[list[int]]:
    """Hold ``signals`` (SIGINT, SIGTERM, SIGHUP) during the block: each one that arrives is recorded, and once the
    block has ended the previous handlers are restored and each signal received is delivered again, once, in the
    order it first came. So ``with deferred_signals(): save_model(...)`` finishes the save before Ctrl-C, ``kill``
    or ``timeout`` take effect, and they then act exactly as they would have (KeyboardInterrupt, the process's own
    handler, or the default action of ending the process). When a handler raises, the signals after it are not
    delivered: its exception already ends whatever followed the save.

    The yielded list holds the signals received so far. Python runs signal handlers only in the main thread, so in
    any other thread this does nothing. A signal whose current handler was not installed from Python cannot be
    restored afterwards and is left alone.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def hold(signum: int, frame: object) -> None:
        received.append(signum)

    previous: dict[int, object] = {}
    try:
        for signum in signals:
            handler = signal.getsignal(signum)
            if handler is None:
                continue
            signal.signal(signum, hold)
            previous[signum] = handler
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        for signum in dict.fromkeys(received):
            # raise_signal runs the restored Python handler at once (KeyboardInterrupt for SIGINT), or takes the
            # default action (ending the process, as the signal would have without us)
            signal.raise_signal(signum)
