"""gpunn plot's reader of a --metrics-out file: JSON lines with epoch records, or one DataError line (exit 2)."""

from __future__ import annotations

import json
import os

import pytest

from gpunn.errors import DataError
from gpunn import plots
from gpunn.plots import read_metrics

from hostile import LOADS, metrics_corpus

EPOCHS = [{"type": "epoch", "epoch": e, "loss": 2.0 / e, "train_accuracy": 0.1 * e, "val_loss": 2.1 / e,
           "val_accuracy": 0.09 * e, "seconds": 0.01, "samples_per_s": 1e5} for e in (1, 2, 3)]
GOOD = "".join(json.dumps(r) + "\n" for r in [*EPOCHS, {"type": "summary", "device": "cpu"}]).encode()
MODEL = b"PK\x03\x04" + b"\0" * 60  # the start of an .npz is all the reader looks at
CASES = metrics_corpus(GOOD, MODEL)


def test_reads_what_gpunn_train_writes(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(GOOD)
    records = read_metrics(path)
    assert records[:3] == EPOCHS and records[3]["type"] == "summary"


@pytest.mark.parametrize("case", CASES)
def test_hostile_metrics_files(tmp_path, case):
    content, fragment = CASES[case]
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    if fragment is LOADS:
        assert any(r["type"] == "epoch" for r in read_metrics(path))
        return
    with pytest.raises(DataError) as caught:
        read_metrics(path)
    message = str(caught.value)
    assert fragment in message and message.startswith(str(path)), message
    assert len(message.splitlines()) == 1 and caught.value.exit_code == 2


@pytest.mark.parametrize("name, message", [("absent.jsonl", "no such file"), ("dir", "it is a directory"),
                                           ("fifo", "it is a named pipe"), ("", "the path is empty")])
def test_a_metrics_path_that_is_not_a_file(tmp_path, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DataError, match=message) as caught:
        read_metrics(name)
    assert caught.value.exit_code == 2


def test_a_large_non_json_file_is_judged_by_its_start(tmp_path, monkeypatch):
    """A data set passed by mistake is refused from its first bytes, not read whole."""
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\0\0\x08\x03" + b"\0" * (8 << 20))
    reads: list[int] = []
    real_open_input = plots.open_input

    class Recording:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.handle.close()

        def read(self, size=-1):
            reads.append(size)
            return self.handle.read(size)

    monkeypatch.setattr(plots, "open_input", lambda path, error: Recording(real_open_input(path, error)))
    with pytest.raises(DataError, match="looks like an IDX data file"):
        read_metrics(path)
    assert reads == [512]
