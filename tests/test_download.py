"""Downloads against a local HTTP server on 127.0.0.1 serving small generated files: success, a wrong digest, a server
error, a truncated transfer, mirrors that stall (before answering, or in the middle of the body), and every mirror
failing."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading

import pytest
from click.testing import CliRunner

from gpunn import download
from gpunn.cli import main
from gpunn.download import DownloadError, Source, cache_root, cached, fetch

FILES = {"a.gz": b"first file " * 1000, "b.gz": b"second file " * 3000}


class Handler(http.server.BaseHTTPRequestHandler):
    """/good/NAME serves the file; /bad/NAME other bytes; /error/NAME a 500; /short/NAME half the announced bytes."""

    def do_GET(self):  # noqa: N802 - the name http.server calls
        kind, _, name = self.path.strip("/").partition("/")
        body = FILES.get(name)
        if body is None or kind == "error":
            self.send_error(404 if body is None else 500)
            return
        if kind == "bad":
            body = body.upper()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if kind == "short" else body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def source(server, *kinds):
    files = {name: ("sha256", hashlib.sha256(body).hexdigest()) for name, body in FILES.items()}
    return Source("toy", tuple(f"{server}/{kind}/" for kind in kinds), files)


def test_fetch_verifies_and_caches(server, tmp_path):
    seen = []
    folder = fetch(source(server, "good"), tmp_path, progress=lambda name, done, total: seen.append((name, done, total)))
    assert folder == tmp_path / "toy"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == FILES
    assert seen[-1] == ("b.gz", len(FILES["b.gz"]), len(FILES["b.gz"]))
    # a second fetch finds both files verified in the cache and downloads nothing
    seen.clear()
    fetch(source(server, "error"), tmp_path, progress=lambda *a: seen.append(a))
    assert seen == []


@pytest.mark.parametrize("failing", ["bad", "error", "short"])
def test_a_failing_mirror_moves_on_to_the_next(server, tmp_path, failing):
    folder = fetch(source(server, failing, "good"), tmp_path)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == FILES


@pytest.mark.parametrize(
    "failing, reason",
    [
        ("bad", "does not match the published"),
        ("error", "HTTP 500"),
        ("short", "transfer cut short after 5,500 of 11,000 bytes"),
    ],
)
def test_when_every_mirror_fails_nothing_is_left_in_the_cache(server, tmp_path, failing, reason):
    with pytest.raises(DownloadError) as caught:
        fetch(source(server, failing), tmp_path)
    message = str(caught.value)
    assert message.startswith("could not fetch a.gz of toy from any mirror")
    assert reason in message and str(tmp_path / "toy") in message and "--data-dir" in message
    assert list(tmp_path.iterdir()) == []  # no temporary file, and not the empty directory the attempt made


def test_offline(tmp_path):
    unreachable = Source("toy", ("http://127.0.0.1:9/",), {"a.gz": ("md5", "0" * 32)})  # port 9: discard, closed
    with pytest.raises(DownloadError, match="could not fetch a.gz of toy from any mirror .*127.0.0.1:9/a.gz: "):
        fetch(unreachable, tmp_path, connect_timeout=5)


def test_cache_root_follows_the_environment(tmp_path):
    assert cache_root({"GPUNN_DATA_DIR": str(tmp_path)}) == tmp_path
    assert cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "gpunn"
    assert cache_root({}).name == "gpunn"


def test_cached_lists_files_with_their_digests(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the real file")
    (row,) = cached(tmp_path)
    assert row["file"] == "t10k-labels-idx1-ubyte.gz" and row["bytes"] == 17 and row["verified"] is False
    assert row["digest"] == hashlib.sha256(b"not the real file").hexdigest()


def test_cli_train_with_a_dataset_and_data_info(server, tmp_path, monkeypatch):
    """`gpunn train --dataset mnist` through the real CLI, with the mirror list pointed at the local server."""
    from helpers import write_mnist_dir

    data = write_mnist_dir(tmp_path / "made", n_train=300, n_test=60)
    bodies = {path.name: path.read_bytes() for path in data.iterdir()}
    monkeypatch.setattr("test_download.FILES", bodies)
    files = {name: ("sha256", hashlib.sha256(body).hexdigest()) for name, body in bodies.items()}
    monkeypatch.setitem(download.DATASETS, "mnist", Source("mnist", (f"{server}/error/", f"{server}/good/"), files))
    monkeypatch.setenv("GPUNN_DATA_DIR", str(tmp_path / "cache"))
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--dataset", "mnist", "--device", "cpu", "--epochs", "3", "--val-size",
                                  "50", "--out", str(tmp_path / "m.npz")])
    assert result.exit_code == 0, result.output
    assert f"mnist (verified download in {tmp_path / 'cache' / 'mnist'}): 250 train / 50 validation / 60 test" in result.output
    info = runner.invoke(main, ["data", "info"])
    assert info.exit_code == 0 and info.output.count("verified") == 4


# --- mirrors that accept and then say nothing ---------------------------------------------------------------------

READ_TIMEOUT = 0.3


@pytest.fixture(scope="module")
def stalling():
    """Two mirrors that hang: /silent/ is a socket that listens and never answers (the kernel completes the
    connection from its backlog, and no one ever reads the request); /stall/ answers with its headers and the first
    1,000 bytes of the body, then keeps the connection open without sending more. Yields their base URLs."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=16)
    stall = socket.create_server(("127.0.0.1", 0), backlog=16)
    done = threading.Event()
    held = []

    def answer_then_stall(connection):
        request = b""
        while b"\r\n\r\n" not in request:
            request += connection.recv(4096)
        name = request.split()[1].decode().rsplit("/", 1)[1]
        body = FILES[name]
        connection.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:1000])
        done.wait()
        connection.close()

    def serve():
        stall.settimeout(0.1)
        while not done.is_set():
            try:
                connection, _ = stall.accept()
            except TimeoutError:
                continue
            held.append(threading.Thread(target=answer_then_stall, args=(connection,), daemon=True))
            held[-1].start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    yield {kind: f"http://127.0.0.1:{sock.getsockname()[1]}/{kind}/" for kind, sock in
           (("silent", silent), ("stall", stall))}
    done.set()
    server.join()
    for thread in held:
        thread.join()
    silent.close()
    stall.close()


class Recorder:
    """A FetchProgress that keeps every event."""

    def __init__(self):
        self.events = []

    def trying(self, name, url):
        self.events.append(("trying", name, url))

    def received(self, name, done, total):
        self.events.append(("received", name, done, total))

    def failed(self, name, url, reason):
        self.events.append(("failed", name, url, reason))

    def finished(self, name, size):
        self.events.append(("finished", name, size))


def fetch_in_thread(*args, **kwargs):
    """fetch(), in a thread that must end: without the read timeout, these mirrors would hold it for hours."""
    outcome = {}

    def target():
        try:
            outcome["folder"] = fetch(*args, **kwargs)
        except DownloadError as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "fetch hung on a stalled mirror"
    return outcome


def test_stalled_mirrors_are_left_for_the_next_one_and_reported(server, stalling, tmp_path):
    files = {name: ("sha256", hashlib.sha256(body).hexdigest()) for name, body in FILES.items()}
    mirrors = (stalling["silent"], stalling["stall"], f"{server}/good/")
    recorder = Recorder()
    outcome = fetch_in_thread(Source("toy", mirrors, files), tmp_path, progress=recorder, read_timeout=READ_TIMEOUT)
    assert {p.name: p.read_bytes() for p in outcome["folder"].iterdir()} == FILES

    # what a user is told about a.gz, byte counts aside
    a = [event for event in recorder.events if event[1] == "a.gz" and event[0] != "received"]
    assert a == [
        ("trying", "a.gz", stalling["silent"] + "a.gz"),
        ("failed", "a.gz", stalling["silent"] + "a.gz",
         f"timed out after {READ_TIMEOUT:g} s with no data (before the response)"),
        ("trying", "a.gz", stalling["stall"] + "a.gz"),
        ("failed", "a.gz", stalling["stall"] + "a.gz",
         f"timed out after {READ_TIMEOUT:g} s with no data (after 1,000 bytes)"),
        ("trying", "a.gz", f"{server}/good/a.gz"),
        ("finished", "a.gz", 11000),
    ]
    # the bar moved while the stalled mirror still sent, up to its 1,000 bytes, and then with the good mirror
    tried = [i for i, event in enumerate(recorder.events) if event[0] == "trying" and event[1] == "a.gz"]
    stalled = [event for event in recorder.events[tried[1]:tried[2]] if event[0] == "received"]
    assert stalled and stalled[-1] == ("received", "a.gz", 1000, 11000)
    assert ("received", "a.gz", 11000, 11000) in recorder.events[tried[2]:]
    assert [event[0] for event in recorder.events].count("finished") == 2

    # a second fetch finds both files in the cache and reports nothing
    recorder.events.clear()
    fetch_in_thread(Source("toy", mirrors, files), tmp_path, progress=recorder, read_timeout=READ_TIMEOUT)
    assert recorder.events == []


def test_when_every_mirror_stalls_the_error_names_each_and_the_cache_stays_empty(stalling, tmp_path):
    files = {"a.gz": ("sha256", hashlib.sha256(FILES["a.gz"]).hexdigest())}
    root = tmp_path / "cache" / "gpunn"  # neither exists yet: fetch makes both, and must take both back
    outcome = fetch_in_thread(Source("toy", (stalling["silent"], stalling["stall"]), files), root,
                              read_timeout=READ_TIMEOUT)
    message = str(outcome["error"])
    assert f"{stalling['silent']}a.gz: timed out after {READ_TIMEOUT:g} s with no data (before the response)" in message
    assert f"{stalling['stall']}a.gz: timed out after {READ_TIMEOUT:g} s with no data (after 1,000 bytes)" in message
    assert list(tmp_path.iterdir()) == []


def test_a_file_fetched_before_a_failure_stays_and_nothing_else(server, tmp_path):
    files = {name: ("sha256", hashlib.sha256(body).hexdigest()) for name, body in FILES.items()}
    files["missing.gz"] = ("sha256", "0" * 64)  # every mirror answers 404
    with pytest.raises(DownloadError, match="could not fetch missing.gz of toy from any mirror .*HTTP 404"):
        fetch(Source("toy", (f"{server}/good/",), files), tmp_path)
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["a.gz", "b.gz"]


def test_a_connection_that_is_not_made_in_time_is_named_as_such(monkeypatch, tmp_path):
    """A mirror behind a firewall that drops packets never completes the connection; that has its own, short
    timeout and its own message (simulated: the connect itself times out)."""
    seen = []

    def no_answer(address, timeout, *args, **kwargs):
        seen.append(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", no_answer)
    files = {"a.gz": ("sha256", "0" * 64)}
    with pytest.raises(DownloadError) as caught:
        fetch(Source("toy", ("http://192.0.2.1/", "http://192.0.2.2/"), files), tmp_path, connect_timeout=1.5,
              read_timeout=99)
    assert seen == [1.5, 1.5]  # the connect timeout, not the read timeout
    assert "http://192.0.2.1/a.gz: could not connect: timed out after 1.5 s; " \
           "http://192.0.2.2/a.gz: could not connect: timed out after 1.5 s" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
