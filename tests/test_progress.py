"""The progress displays: tqdm's bar on a (simulated) terminal, with elapsed time, ETA and readable units at every
speed, fitted to the width; the compact log on a pipe; steps inside a slow epoch; and a reader that goes away."""

from __future__ import annotations

import io
import os
import re

import pytest

import gpunn.progress
from gpunn.progress import DownloadProgress, TrainingProgress, per_epoch, samples_per_second
from gpunn.train import EpochStats


def stats(epoch, seconds=0.0037, samples_per_s=1.08e6, val=0.11):
    return EpochStats(epoch=epoch, loss=2.302585, train_accuracy=0.1, val_loss=2.31, val_accuracy=val,
                      seconds=seconds, samples_per_s=samples_per_s)


def screens(text):
    """What a terminal shows, redraw by redraw: the text between carriage returns and newlines."""
    return [part for part in re.split(r"[\r\n]", text) if part.strip()]


@pytest.mark.parametrize(
    "seconds, rate, shown",
    [
        (0.00042, 9.5e6, ("420 µs/epoch", "9.5 M samples/s")),
        (0.0123, 325_203, ("12.3 ms/epoch", "325 k samples/s")),
        (2.35, 25_531, ("2.35 s/epoch", "25.5 k samples/s")),
        (0.99996, 999.9, ("1 s/epoch", "1 k samples/s")),  # rounding moves to the next unit, not to "1e+03 ms"
        (95.0, 631.6, ("1.58 min/epoch", "632 samples/s")),
    ],
)
def test_the_bar_shows_elapsed_eta_and_readable_speed(seconds, rate, shown):
    out = io.StringIO()
    with TrainingProgress(40, file=out, tty=True, ncols=120) as progress:
        for epoch in range(1, 11):
            progress.update(stats(epoch, seconds, rate))
    last = screens(out.getvalue())[-1]
    assert re.match(r"epoch 10/40 +25%\|.*\| \[\d\d:\d\d<\d\d:\d\d, loss 2\.3026, val 11\.00%, ", last), last
    for text in shown:
        assert text in last
    assert "train 10.00%" in last


@pytest.mark.parametrize("ncols", [60, 80, 100, 140])
def test_the_bar_fits_the_width_and_keeps_a_bar(ncols):
    out = io.StringIO()
    with TrainingProgress(500, file=out, tty=True, ncols=ncols) as progress:
        progress.update(stats(1))
        progress.update(stats(500))
    shown = screens(out.getvalue())
    assert all(len(line) <= ncols for line in shown), shown
    last = shown[-1]
    assert last.startswith("epoch 500/500 100%|") and "loss 2.3026" in last
    assert re.search(r"\|#{10,}\|", last), last  # the figures never squeeze the bar below 10 columns
    if ncols >= 110:
        assert "3.7 ms/epoch, 1.08 M samples/s" in last


def test_units_by_magnitude():
    assert [per_epoch(s) for s in (2e-5, 0.5, 59.4, 3600)] == ["20 µs/epoch", "500 ms/epoch", "59.4 s/epoch",
                                                                "60 min/epoch"]
    assert [samples_per_second(r) for r in (12, 12_345, 987_654_321, 1.2e9)] == [
        "12 samples/s", "12.3 k samples/s", "988 M samples/s", "1.2 G samples/s"]


def test_a_burst_of_epochs_costs_one_redraw():
    out = io.StringIO()
    progress = TrainingProgress(1000, file=out, tty=True, ncols=100)
    drawn = len(screens(out.getvalue()))
    for epoch in range(1, 300):  # arriving together, as the training loop delivers them
        progress.update(stats(epoch))
    assert len(screens(out.getvalue())) == drawn + 1  # the first of the burst; the rest wait for the next redraw
    progress.close()  # ... and close draws the last one reported
    assert screens(out.getvalue())[-1].startswith("epoch 299/1000")


def test_on_a_pipe_the_log_keeps_its_compact_lines():
    """Exactly the lines gpunn printed before tqdm: the first epoch, every tenth of 200, and the last."""
    out = io.StringIO()
    with TrainingProgress(200, file=out) as progress:  # a StringIO is no terminal
        for epoch in range(1, 201):
            progress.update(stats(epoch))
        progress.note("checkpoint written")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "epoch   1/200  loss 2.3026  train 10.00%  val 11.00%      3.70 ms     1.08 M samples/s"
    assert [int(line.split()[1].split("/")[0]) for line in lines[:-1]] == [1, *range(10, 201, 10)]
    assert lines[-1] == "checkpoint written"


def test_a_resumed_run_starts_its_log_and_its_bar_at_the_first_epoch_it_trains():
    out = io.StringIO()
    with TrainingProgress(100, 61, file=out) as progress:
        for epoch in range(61, 101):
            progress.update(stats(epoch, val=None))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("epoch  61/100  loss 2.3026  train 10.00%      3.70 ms") and len(lines) == 9

    out = io.StringIO()
    TrainingProgress(100, 61, file=out, tty=True, ncols=100).close()
    assert screens(out.getvalue())[0].startswith("epoch 60/100  60%|")


def test_a_note_goes_above_the_bar():
    out = io.StringIO()
    with TrainingProgress(10, file=out, tty=True, ncols=100) as progress:
        progress.update(stats(3))
        progress.note("checkpoint written to ckpt.npz")
    text = out.getvalue()
    assert "checkpoint written to ckpt.npz\n" in text
    assert screens(text[text.index("checkpoint written"):])[1].startswith("epoch 3/10")  # the bar, drawn again


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_steps_inside_an_epoch_show_only_when_the_epoch_is_slow(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(gpunn.progress, "_clock", clock)
    out = io.StringIO()
    progress = TrainingProgress(5, file=out, tty=True, ncols=100)
    before = out.getvalue()
    for done in range(1, 101):  # a fast epoch: 100 steps in 0.5 s
        clock.now += 0.005
        progress.step(done, 100)
    assert out.getvalue() == before
    progress.update(stats(1))
    for done in range(1, 101):  # a slow one: 100 steps in 6.25 s (1/16 s each: exact in binary)
        clock.now += 0.0625
        progress.step(done, 100)
    shown = [line for line in screens(out.getvalue()) if line.startswith("  steps ")]
    # from one second after the epoch's first step on, and then every 0.25 s (4 steps), not every step
    assert shown and shown[0].startswith("  steps 17/100  17%|") and "step/s" in shown[0]
    assert shown[-1].startswith("  steps 97/100") and len(shown) == 21
    progress.step(1, 100)  # the next epoch starts over
    assert screens(out.getvalue())[-1].startswith("  steps 0/100")
    progress.close()
    assert not screens(out.getvalue())[-1].startswith("  steps")  # the steps line is cleared at the end


def test_steps_cost_nothing_off_a_terminal():
    out = io.StringIO()
    progress = TrainingProgress(5, file=out)
    for done in range(1, 1001):
        progress.step(done, 1000)
    assert out.getvalue() == ""


@pytest.mark.parametrize("tty", [False, True])
def test_a_reader_that_goes_away_stops_the_display_and_nothing_else(tty):
    read, write = os.pipe()
    os.close(read)
    stream = os.fdopen(write, "w")
    progress = TrainingProgress(50, file=stream, tty=tty, ncols=80)
    for epoch in range(1, 51):
        progress.update(stats(epoch))
    progress.note("still running")
    progress.step(3, 10)
    progress.close()
    assert progress.closed
    # the descriptor now leads to /dev/null: what was buffered, and the interpreter's last flush, go there quietly
    assert os.write(write, b"more") == 4
    stream.close()


def test_the_quiet_progress_prints_nothing():
    out = io.StringIO()
    with TrainingProgress(3, file=out, tty=True, enabled=False) as progress:
        progress.update(stats(1))
        progress.note("nothing")
        progress.step(1, 2)
    assert out.getvalue() == "" and not progress.closed


def test_download_progress_names_the_mirror_and_draws_a_byte_bar():
    out = io.StringIO()
    progress = DownloadProgress(file=out, tty=True, ncols=100)
    progress.trying("a.gz", "http://one/a.gz")
    progress.received("a.gz", 2_000_000, 9_912_422)
    progress.failed("a.gz", "http://one/a.gz", "timed out after 20 s with no data (after 2,000,000 bytes)")
    progress.trying("a.gz", "http://two/a.gz")
    progress.received("a.gz", 9_912_422, 9_912_422)
    progress.finished("a.gz", 9_912_422)
    shown = screens(out.getvalue())
    assert shown[0] == "fetching a.gz from http://one/a.gz"
    assert any(re.match(r"  a\.gz: +20%\|.*\| 2\.00MB/9\.91MB \[", line) for line in shown), shown
    assert "  http://one/a.gz failed: timed out after 20 s with no data (after 2,000,000 bytes)" in shown
    assert shown[-1] == "  a.gz: 9.9 MB, digest verified"


def test_download_progress_on_a_pipe_prints_events_only():
    out = io.StringIO()
    progress = DownloadProgress(file=out)
    progress.trying("a.gz", "http://one/a.gz")
    progress.received("a.gz", 5, 10)
    progress.failed("a.gz", "http://one/a.gz", "HTTP 500 Internal Server Error")
    assert out.getvalue().splitlines() == ["fetching a.gz from http://one/a.gz",
                                           "  http://one/a.gz failed: HTTP 500 Internal Server Error"]
