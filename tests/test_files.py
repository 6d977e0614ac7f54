"""Files in and out: output paths that are not regular files are refused, new files get the umask's mode, a failed or
interrupted write leaves nothing behind, a signal during a deferred save lets it finish; inputs that are not regular
files are refused with one line."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from gpunn.errors import DataError, ModelError
from gpunn.files import OutputError, atomic_write, check_directory, check_writable, deferred_signals, describe_bytes, \
    open_input

REPO = Path(__file__).resolve().parents[1]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def specials(tmp_path):
    """A directory holding one of each kind of file that is not a regular one (and a symlink to a device)."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    (tmp_path / "to-null").symlink_to("/dev/null")
    yield tmp_path
    server.close()


NOT_REGULAR = {
    "fifo": "is a named pipe (FIFO), not a regular file",
    "sock": "is a socket, not a regular file",
    "to-null": "is a character device, not a regular file",
    "/dev/null": "is a character device, not a regular file",
    "/dev/full": "is a character device, not a regular file",
    "dir": "is a directory; give a file name",
}


# --- check_writable ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOT_REGULAR)
def test_check_writable_refuses_what_is_not_a_regular_file(specials, name):
    path = name if name.startswith("/") else specials / name
    with pytest.raises(OutputError, match=re.escape(NOT_REGULAR[name])) as caught:
        check_writable(path, "--out")
    assert str(caught.value).startswith(f"--out {path}") and caught.value.exit_code == 2


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: "", "--out: the file name is empty"),
        (lambda tmp: tmp / ("x" * 256), "the file name is 256 bytes long, more than the 255"),
        (lambda tmp: tmp / ("é" * 128), "the file name is 256 bytes long"),  # bytes, not characters, count
        (lambda tmp: tmp / "a\0b", "contains a NUL byte"),
        (lambda tmp: tmp / "absent" / "model.npz", "directory .*absent does not exist; create it first"),
        (lambda tmp: (tmp / "file").write_text("") or tmp / "file" / "model.npz", "a part of the path before the "
                                                                                  "file name is not a directory"),
        (lambda tmp: Path("/" + "/".join(["y" * 250] * 20)), "longer than the file system allows"),
    ],
)
def test_check_writable_refuses_unusable_names(tmp_path, make, message):
    with pytest.raises(OutputError, match=message):
        check_writable(make(tmp_path), "--out")


def test_check_writable_accepts_new_and_regular_files(tmp_path):
    assert check_writable(tmp_path / "new.npz", "--out") == tmp_path / "new.npz"
    (tmp_path / "old.npz").write_bytes(b"x")
    assert check_writable(tmp_path / "old.npz", "--out") == tmp_path / "old.npz"
    assert check_writable(tmp_path / ("x" * 255), "--out").name == "x" * 255  # the longest name allowed
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert check_writable(tmp_path / "dangling", "--out")


def test_check_directory(specials):
    assert check_directory(specials / "dir", "--plot-dir") == specials / "dir"
    assert check_directory(specials / "new", "--plot-dir") == specials / "new"
    for name in ("fifo", "sock", "to-null"):
        with pytest.raises(OutputError, match="exists and is not a directory"):
            check_directory(specials / name, "--plot-dir")
    with pytest.raises(OutputError, match="the directory name is empty"):
        check_directory("", "--plot-dir")


# --- atomic_write -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o000])
def test_new_files_get_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_write(tmp_path / "out.bin") as handle:
            handle.write(b"data")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o666 & ~umask


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    target = tmp_path / "model.npz"
    target.write_bytes(b"old")
    target.chmod(0o640)
    with atomic_write(target) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o640


def test_text_mode_writes_utf8_whatever_the_locale(tmp_path):
    with atomic_write(tmp_path / "m.jsonl", "w") as handle:
        handle.write("π → ∞\n")
    assert (tmp_path / "m.jsonl").read_bytes() == "π → ∞\n".encode()


@pytest.mark.parametrize("name", ["fifo", "sock", "to-null", "dir"])
def test_atomic_write_never_replaces_what_is_not_a_regular_file(specials, name):
    before = listing(specials)
    kind = os.lstat(specials / name).st_mode
    with pytest.raises(OutputError, match=re.escape(NOT_REGULAR[name])), atomic_write(specials / name) as handle:
        handle.write(b"x")
    assert listing(specials) == before and os.lstat(specials / name).st_mode == kind


def test_atomic_write_refuses_a_device_that_appears_during_the_write(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="named pipe"), atomic_write(target) as handle:
        handle.write(b"x")
        os.mkfifo(target)
    assert listing(tmp_path) == ["out"] and stat.S_ISFIFO(os.lstat(target).st_mode)


def test_atomic_write_with_the_longest_name_allowed(tmp_path):
    target = tmp_path / ("m" * 255)  # the temporary name beside it must be shortened to fit
    with atomic_write(target) as handle:
        handle.write(b"x")
    assert listing(tmp_path) == [target.name]


@pytest.mark.parametrize(
    "code, message",
    [
        (errno.ENOSPC, "no space left on the device"),
        (errno.EDQUOT, "the disk quota is exceeded"),
        (errno.EFBIG, "file-size limit"),
        (errno.EIO, "input/output error"),
        (errno.EROFS, "read-only"),
    ],
)
def test_an_os_error_while_writing_is_one_line_and_leaves_nothing(tmp_path, code, message):
    target = tmp_path / "model.npz"
    target.write_bytes(b"previous")
    with pytest.raises(OutputError, match=f"cannot write {re.escape(str(target))}: .*{message}") as caught, \
            atomic_write(target) as handle:
        handle.write(b"half")
        raise OSError(code, os.strerror(code))
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    assert listing(tmp_path) == ["model.npz"] and target.read_bytes() == b"previous"


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit, RuntimeError])
def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, interruption):
    target = tmp_path / "model.npz"
    target.write_bytes(b"previous")
    with pytest.raises(interruption), atomic_write(target) as handle:
        handle.write(b"half")
        raise interruption()
    assert listing(tmp_path) == ["model.npz"] and target.read_bytes() == b"previous"


def test_atomic_write_into_a_missing_or_unwritable_directory(tmp_path):
    with pytest.raises(OutputError, match="cannot write .*no.*file"), atomic_write(tmp_path / "no" / "file"):
        pass
    with pytest.raises(OutputError, match="empty name"), atomic_write(""):
        pass


# --- signals during a save ------------------------------------------------------------------------------------------


def test_deferred_signals_hold_and_then_deliver(tmp_path):
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_signals() as received:
                signal.raise_signal(signal.SIGTERM)
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGTERM)
                # held: no handler has run, and the save goes on
                assert received == [signal.SIGTERM, signal.SIGINT, signal.SIGTERM] and seen == []
                with atomic_write(tmp_path / "out") as handle:
                    handle.write(b"complete")
        assert (tmp_path / "out").read_bytes() == b"complete"
        # delivered in the order they came, each once: SIGTERM's handler, then SIGINT's KeyboardInterrupt
        assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_deferred_signals_restore_the_handlers_and_deliver_each_once():
    seen: list[int] = []
    handler = lambda signum, frame: seen.append(signum)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with deferred_signals():
            signal.raise_signal(signal.SIGHUP)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGHUP)
            with deferred_signals():  # nested: the inner one hands its signals to the outer
                signal.raise_signal(signal.SIGTERM)
            assert seen == []
        assert seen == [signal.SIGHUP, signal.SIGTERM]
        assert all(signal.getsignal(s) is handler for s in previous)
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def test_deferred_signals_do_nothing_outside_the_main_thread():
    result = []

    def work():
        with deferred_signals() as received:
            result.append((received, signal.getsignal(signal.SIGINT)))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert result == [([], signal.default_int_handler)]


def run_child(code: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


# The child writes the first part of a file, says so, and waits for the parent's "go" before writing the rest: the
# parent sends the signal in between, so it arrives while the file is being written, every time, without sleeping.
WRITER = """
import signal, sys
from gpunn.files import atomic_write, deferred_signals
{setup}
chunk = b"x" * (1 << 20)
with {guard}:
    with atomic_write(sys.argv[1]) as handle:
        handle.write(chunk)
        print("writing", flush=True)
        sys.stdin.readline()
        for _ in range(63):
            handle.write(chunk)
print("after the save", flush=True)
"""


def signal_mid_write(tmp_path, signum, *, setup="", guard="deferred_signals()"):
    target = tmp_path / "big.bin"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", WRITER.format(setup=setup, guard=guard), str(target)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert child.stdout.readline() == "writing\n"
    child.send_signal(signum)
    out, err = child.communicate("go\n", timeout=60)
    return child.returncode, out, err, target


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_a_deferred_save_finishes_the_save_then_acts(tmp_path, signum):
    code, out, err, target = signal_mid_write(tmp_path, signum)
    # the save completed, then the signal took its usual effect: the process ended by it, nothing ran after
    assert code == -signum, (code, err)
    assert out == "" and target.stat().st_size == 64 << 20 and listing(tmp_path) == ["big.bin"]


def test_a_signal_handler_that_raises_runs_after_the_deferred_save(tmp_path):
    setup = "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))"
    code, out, err, target = signal_mid_write(tmp_path, signal.SIGTERM, setup=setup)
    assert code == 128 + signal.SIGTERM and out == "", err
    assert target.stat().st_size == 64 << 20 and listing(tmp_path) == ["big.bin"]


@pytest.mark.parametrize("signum, setup", [
    (signal.SIGINT, ""),  # Python's KeyboardInterrupt
    (signal.SIGTERM, "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))"),  # a handler raising SystemExit
])
def test_a_signal_during_an_undeferred_save_leaves_no_temporary_file(tmp_path, signum, setup):
    code, out, err, target = signal_mid_write(tmp_path, signum, setup="import contextlib\n" + setup,
                                              guard="contextlib.nullcontext()")
    assert code in (-signum, 128 + signum, 1), err
    assert out == "" and listing(tmp_path) == []  # neither the file nor its temporary


def test_sigterm_during_a_large_model_save_finishes_it(tmp_path):
    """A real save_model of ~100 MB, SIGTERM sent as soon as the child says the save begins."""
    target = tmp_path / "model.npz"
    code = f"""
    import numpy as np
    from gpunn.backend import get_backend
    from gpunn.files import deferred_signals
    from gpunn.model import Model, save_model
    from gpunn.nn import Architecture, Layer
    arch = Architecture((784, 32000, 10))
    params = [Layer(np.full((32000, 784), 0.5, np.float32), np.zeros((32000, 1), np.float32)),
              Layer(np.zeros((10, 32000), np.float32), np.zeros((10, 1), np.float32))]
    with deferred_signals():
        print("saving", flush=True)
        save_model({str(target)!r}, Model(arch, params), get_backend("cpu"))
    print("after the save", flush=True)
    """
    child = run_child(code)
    assert child.stdout.readline() == "saving\n"
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGTERM and out == "", err
    assert listing(tmp_path) == ["model.npz"]
    from gpunn.backend import get_backend
    from gpunn.model import load_model

    model = load_model(target, get_backend("cpu"))  # complete and valid
    assert model.arch.sizes == (784, 32000, 10) and float(model.params[0].W[-1, -1]) == 0.5


def test_the_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE in a child; SIGXFSZ ignored there, so that write() fails with EFBIG instead of killing it."""
    code = f"""
    import resource, signal, sys
    import numpy as np
    from gpunn.backend import get_backend
    from gpunn.errors import GpunnError
    from gpunn.model import Model, save_model
    from gpunn.nn import Architecture, Layer
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    arch = Architecture((784, 1000, 10))
    params = [Layer(np.zeros((1000, 784), np.float32), np.zeros((1000, 1), np.float32)),
              Layer(np.zeros((10, 1000), np.float32), np.zeros((10, 1), np.float32))]
    try:
        save_model({str(tmp_path / 'model.npz')!r}, Model(arch, params), get_backend("cpu"))
    except GpunnError as error:
        print(type(error).__name__, error.exit_code, error)
    """
    child = run_child(code)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.startswith(f"OutputError 2 cannot write {tmp_path / 'model.npz'}: the file would exceed the file-size "
                          "limit (ulimit -f)"), out
    assert out.count("\n") == 1 and listing(tmp_path) == []


# --- inputs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, message",
    [
        ("fifo", "it is a named pipe \\(FIFO\\), not a regular file"),  # and it does not block
        ("sock", "it is a socket or a device with no driver"),
        ("to-null", "it is a character device"),
        ("dir", "it is a directory, not a regular file"),
        ("absent", "no such file \\(it does not exist\\)"),
        ("dir/../fifo/x", "a part of the path before the file name is not a directory"),
        ("", "the path is empty"),
        ("a\0b", "contains a NUL byte"),
        ("x" * 300, "longer than the file system allows"),
    ],
)
@pytest.mark.parametrize("error", [DataError, ModelError])
def test_open_input_refuses_what_is_not_a_readable_regular_file(specials, monkeypatch, name, message, error):
    monkeypatch.chdir(specials)
    with pytest.raises(error, match=f"cannot read .*{message}") as caught:
        open_input(name, error)
    assert caught.value.exit_code == 2


def test_open_input_names_a_permission_problem(tmp_path, monkeypatch):
    (tmp_path / "secret").write_bytes(b"x")

    def refuse(*args, **kwargs):  # root reads any file; simulate what everyone else gets
        raise PermissionError(errno.EACCES, "Permission denied", args[0])

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(DataError, match="cannot read .*secret: permission denied; make the file readable"):
        open_input(tmp_path / "secret", DataError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_open_input_refuses_an_unreadable_file(tmp_path):
    (tmp_path / "secret").write_bytes(b"x")
    (tmp_path / "secret").chmod(0)
    with pytest.raises(DataError, match="permission denied"):
        open_input(tmp_path / "secret", DataError)


@pytest.mark.parametrize(
    "head, looks",
    [
        (b"", "an empty file"),
        (b'{"type": "epoch", "epoch": 1, "loss": 2.3}\n',
         "a text file (starts with '{\"type\": \"epoch\", \"epoch ...')"),
        (b"\n \n", "a text file of blank lines"),
        (b"PK\x03\x04rest", "a zip archive"),
        (b"\x1f\x8b\x08\x00", "gzip-compressed data"),
        (b"\x93NUMPY\x01\x00", "a single NumPy array (.npy)"),
        (b"\x80\x04\x95\x00", "a Python pickle"),
        (b"\x00\x00\x08\x03\x00\x00", "an IDX data file"),
        (b"\x00\xff\xfe\x01", "binary data (starts with 00 ff fe 01)"),
        ("größe".encode()[:3], "a text file (starts with 'g"),
    ],
)
def test_describe_bytes(head, looks):
    assert describe_bytes(head).startswith(looks)
