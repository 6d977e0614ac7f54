"""Downloads against a local HTTP server on 127.0.0.1 serving small generated files: success, a wrong digest, a server
error, a truncated transfer, and every mirror failing."""

from __future__ import annotations

import hashlib
import http.server
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
    assert list((tmp_path / "toy").iterdir()) == []


def test_offline(tmp_path):
    unreachable = Source("toy", ("http://127.0.0.1:9/",), {"a.gz": ("md5", "0" * 32)})  # port 9: discard, closed
    with pytest.raises(DownloadError, match="could not fetch a.gz of toy from any mirror .*127.0.0.1:9/a.gz: "):
        fetch(unreachable, tmp_path, timeout=5)


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
