"""The errors gpunn raises on purpose.

Each one says what was expected, what was found and how to fix it, in one line, so that the CLI can print
``str(error)`` and exit with ``error.exit_code`` instead of showing a traceback.
"""

from __future__ import annotations

# control characters (a newline in a file name, a NUL or a tab read from a damaged file) and Unicode's line
# separators shown as escapes, so that a message stays one line whatever it quotes
_ESCAPES = {code: chr(code).encode("unicode_escape").decode() for code in (*range(0x20), 0x7F, 0x85, 0x2028, 0x2029)}


def flat(error: BaseException, limit: int = 200) -> str:
    """Another library's exception message, quoted inside one of gpunn's: on one line, at most ``limit``
    characters, and never empty (its type's name when it has no message)."""
    text = " ".join(str(error).split())
    return (text[:limit] + " ..." if len(text) > limit else text) or type(error).__name__


class GpunnError(Exception):
    """Base class of gpunn's own errors; the CLI turns them into one line and a non-zero exit.

    ``str(error)`` is always one line: control characters in the message are shown as escapes (``\\n``)."""

    exit_code = 1

    def __str__(self) -> str:
        return super().__str__().translate(_ESCAPES)


class BackendError(GpunnError):
    """The requested device cannot be used (CuPy missing, no GPU, bad device index, ...).

    ``cause`` is the short reason alone, for ``--device auto`` to say in one line why it chose the CPU.
    """

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause or message


class DeviceSpecError(BackendError):
    """The device string itself is malformed: a usage error."""

    exit_code = 2


class ConfigError(GpunnError, ValueError):
    """A setting out of range (a NaN learning rate, ...), or settings that cannot work together (early stopping
    without a validation split, ...): a usage error. A ValueError too, as Python's own errors for bad values are."""

    exit_code = 2


class DataError(GpunnError):
    """A data file or array is missing, corrupt or of the wrong shape or range."""

    exit_code = 2


class ModelError(GpunnError):
    """A model file is missing, corrupt, or does not fit the data it is used with."""

    exit_code = 2


class TrainingDivergedError(GpunnError):
    """The loss or a weight became NaN or infinite."""

    def __init__(self, epoch: int, what: str, lr: float) -> None:
        self.epoch = epoch
        super().__init__(
            f"training diverged at epoch {epoch}: {what} is not finite; "
            f"try a smaller learning rate than --lr {lr:g}"
        )


class SignalInterrupt(KeyboardInterrupt):
    """A signal that ends a command as Ctrl-C does (SIGTERM, SIGHUP, or SIGINT itself): raised where it arrives, so
    that files being written are cleaned up as on Ctrl-C, and the process exits with 128 + ``signal``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal = signum
