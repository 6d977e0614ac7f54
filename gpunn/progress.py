"""Progress displays for the command line, built on tqdm: training epochs (and the steps inside a slow epoch), and
downloads.

On a terminal, training shows one tqdm bar: epochs done, elapsed time and ETA, and the last epoch's loss, accuracies
and speed, fitted to the terminal's width. On a pipe or a file it prints about 20 plain lines instead, so a log is
not flooded with carriage returns. Either way a reader that goes away (``gpunn train | head``) ends the display,
not the run: :attr:`TrainingProgress.closed` says so, and training carries on to save its model.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
from typing import IO, Any, Protocol

from tqdm import tqdm

#: the training bar redraws at most this often; a burst of epochs read back together costs one redraw
REDRAW_SECONDS = 0.1
#: columns the training bar keeps for the bar itself on a narrow terminal, before the figures after it
_MIN_BAR = 10
#: the display of steps inside an epoch appears once an epoch has run this long, and then redraws this often
STEPS_AFTER_SECONDS = 1.0
STEPS_REDRAW_SECONDS = 0.25

_clock = time.monotonic  # what the redraw intervals are measured with (a test may replace it)


class EpochReport(Protocol):
    """What :class:`TrainingProgress` reads from an epoch's report (:class:`gpunn.train.EpochStats`)."""

    epoch: int
    loss: float
    train_accuracy: float
    val_accuracy: float | None
    seconds: float
    samples_per_s: float


def per_epoch(seconds: float) -> str:
    """An epoch's duration in the unit that keeps it readable: '850 µs/epoch', '7.41 ms/epoch', '2.35 s/epoch'."""
    if seconds >= 60:
        return f"{seconds / 60:.3g} min/epoch"
    return _scaled(seconds, ((1e-6, "µs"), (1e-3, "ms"), (1.0, "s"))) + "/epoch"


def samples_per_second(rate: float) -> str:
    """A throughput in the unit that keeps it readable: '850 samples/s', '12.3 k samples/s', '1.25 M samples/s'."""
    return _scaled(rate, ((1.0, ""), (1e3, "k"), (1e6, "M"), (1e9, "G"))).rstrip() + " samples/s"


def _scaled(value: float, units: tuple[tuple[float, str], ...]) -> str:
    """Three significant digits in the largest unit that leaves at least 1 (after rounding: 999.96 ms is '1 s')."""
    if not math.isfinite(value):
        return f"{value} {units[-1][1]}"
    text = f"{value / units[0][0]:.3g} {units[0][1]}"
    for scale, name in units:
        if float(f"{value / scale:.3g}") >= 1:
            text = f"{value / scale:.3g} {name}"
    return text


class _Bar(tqdm):  # type: ignore[misc]  # tqdm is not typed
    # tqdm's monitor thread only refreshes bars left alone for maxinterval seconds; gpunn redraws its own bars
    monitor_interval = 0


class _Stream:
    """A text stream that stops writing, for good, once its reader has gone away (EPIPE).

    Python ignores SIGPIPE, so a write to a closed pipe raises BrokenPipeError, from tqdm's drawing as from a
    plain line. Here it sets :attr:`broken` instead and points the stream's file descriptor at /dev/null: whatever
    is still buffered then drains there, and the interpreter's own flush at exit does not fail again ("Exception
    ignored ... BrokenPipeError").
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._give_up()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._give_up()

    def _give_up(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.stream.fileno())
            finally:
                os.close(devnull)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding: tqdm reads them to size the bar
        return getattr(self.stream, name)


class TrainingProgress:
    """Per-epoch progress for ``gpunn train``.

    ``epochs``: the run's last epoch; ``first``: the first epoch this run trains (after ``--resume``, the one after
    the checkpoint). ``file``: stdout by default; ``tty``: whether to draw a bar (by default, whether ``file`` is a
    terminal); ``ncols``: the bar's width (by default the terminal's, followed as it is resized).

    :meth:`update` takes each epoch's report, :meth:`step` the steps inside an epoch, :meth:`note` prints a line
    without breaking the bar, :meth:`close` ends the display. A context manager closes it on the way out.
    """

    def __init__(self, epochs: int, first: int = 1, *, enabled: bool = True, file: IO[str] | None = None,
                 tty: bool | None = None, ncols: int | None = None) -> None:
        self.epochs = epochs
        self.first = first
        self.enabled = enabled
        self._stream = _Stream(file if file is not None else sys.stdout)
        self.tty = enabled and (self._stream.isatty() if tty is None else tty)
        self._ncols = ncols
        # the log: the first epoch, every `every`-th and the last, about 20 lines whatever the run's length
        self.every = max(1, epochs // 20)
        self._bar: _Bar | None = None
        self._steps: _Bar | None = None
        self._pending = 0  # epochs reported since the last redraw
        self._latest: EpochReport | None = None
        self._next_draw = 0.0
        self._step_done: float = math.inf  # so that the first step starts an epoch
        self._epoch_started = 0.0
        self._next_step_draw = 0.0
        if self.tty:
            self._bar = self._new_bar(total=epochs, initial=first - 1, unit="epoch",
                                      bar_format="epoch {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| "
                                                 "[{elapsed}<{remaining}{postfix}]")

    @property
    def closed(self) -> bool:
        """True once the output's reader has gone away (a closed pipe): nothing more is printed."""
        return self._stream.broken

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def update(self, stats: EpochReport) -> None:
        """One finished epoch. Cheap when epochs come in bursts: on a terminal, at most ten redraws a second."""
        if not self.enabled or self.closed:
            return
        final = stats.epoch >= self.epochs
        if self._bar is None:
            if stats.epoch == self.first or stats.epoch % self.every == 0 or final:
                self._print(self.log_line(stats))
            return
        self._pending += 1
        self._latest = stats
        now = _clock()
        if final or now >= self._next_draw:
            self._draw()
            self._next_draw = now + REDRAW_SECONDS

    def step(self, done: int, total: int) -> None:
        """``done`` of ``total`` steps (mini-batches) of the current epoch are done.

        Call it after every step: when epochs are fast it returns at once. Once an epoch has run for
        :data:`STEPS_AFTER_SECONDS`, a second line below the bar shows the epoch's steps, their rate and the
        epoch's ETA, redrawn at most every :data:`STEPS_REDRAW_SECONDS`. A ``done`` not above the last one
        starts a new epoch.
        """
        if self._bar is None or total <= 1 or self.closed:
            return
        now = _clock()
        if done <= self._step_done:
            self._epoch_started = now
            if self._steps is not None:
                self._steps.reset(total)
        self._step_done = done
        if now < self._next_step_draw or (self._steps is None and now - self._epoch_started < STEPS_AFTER_SECONDS):
            return
        self._next_step_draw = now + STEPS_REDRAW_SECONDS
        if self._steps is None:
            # delay: not drawn at 0 on creation, only by the refresh below, once its count and clock are set
            self._steps = self._new_bar(total=total, leave=False, unit="step", position=1, delay=math.inf,
                                        bar_format="  steps {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| "
                                                   "[{elapsed}<{remaining}, {rate_fmt}]")
            # the epoch began before the display did: time it from the epoch's start, for an honest rate
            self._steps.start_t = self._steps.last_print_t = time.time() - (now - self._epoch_started)
        self._steps.n = min(done, total)
        self._steps.refresh()
        self._steps.delay = 0  # drawn now: close() must clear it (tqdm leaves a bar alone that it never drew)

    def note(self, text: str) -> None:
        """Print a line (a checkpoint written, early stopping) above the bar, which is redrawn below it."""
        if not self.enabled or self.closed:
            return
        if self._bar is None:
            self._print(text)
        else:
            _Bar.write(text, file=self._stream)

    def close(self) -> None:
        """Draw the last epoch reported and end the display (idempotent)."""
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        if self._bar is not None:
            if self._pending and not self.closed:
                self._draw()
            self._bar.close()
            self._bar = None
        self._stream.flush()

    def log_line(self, stats: EpochReport) -> str:
        """The line the log shows for an epoch (a pipe or file)."""
        val = "" if stats.val_accuracy is None else f"  val {stats.val_accuracy:6.2%}"
        return (f"epoch {stats.epoch:>{len(str(self.epochs))}}/{self.epochs}  loss {stats.loss:.4f}  "
                f"train {stats.train_accuracy:6.2%}{val}  {stats.seconds * 1e3:8.2f} ms  "
                f"{stats.samples_per_s / 1e6:7.2f} M samples/s")

    @staticmethod
    def postfix(stats: EpochReport) -> list[str]:
        """What the bar shows after the times, most important first: the last epoch's loss, its accuracy (validation
        where there is a validation split), its duration and throughput, and then the training accuracy."""
        train = f"train {stats.train_accuracy:.2%}"
        fields = [f"loss {stats.loss:.4f}"]
        fields += [train] if stats.val_accuracy is None else [f"val {stats.val_accuracy:.2%}"]
        fields += [per_epoch(stats.seconds), samples_per_second(stats.samples_per_s)]
        fields += [] if stats.val_accuracy is None else [train]
        return fields

    def _draw(self) -> None:
        assert self._bar is not None and self._latest is not None
        fields = self.postfix(self._latest)
        meter = self._bar.format_dict  # also reads the terminal's current width
        if meter["ncols"]:
            # on a narrow terminal, drop figures from the end until the bar keeps _MIN_BAR columns
            without_bar = meter["bar_format"].replace("{bar}", "")
            while len(fields) > 1 and len(self._bar.format_meter(**{
                    **meter, "n": self._latest.epoch, "ncols": None, "bar_format": without_bar,
                    "postfix": ", ".join(fields)})) + _MIN_BAR > meter["ncols"]:
                fields.pop()
        self._bar.set_postfix_str(", ".join(fields), refresh=False)
        done = self._latest.epoch - self._bar.n
        if done > 0:
            self._bar.update(done)  # also feeds tqdm's smoothed rate, from which it takes the ETA
        else:
            self._bar.refresh()
        self._pending = 0

    def _new_bar(self, **kwargs: Any) -> _Bar:
        return _Bar(file=self._stream, ncols=self._ncols, dynamic_ncols=self._ncols is None, mininterval=0,
                    miniters=1, **kwargs)

    def _print(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()


class DownloadProgress:
    """What :func:`gpunn.download.fetch` reports, drawn for a person: which mirror is being tried, a byte bar while
    data arrive (tqdm, kB/MB/s), and why a mirror failed. On a pipe or file: one line per event, no bar.

    It implements the protocol :class:`gpunn.download.FetchProgress`. Output goes to stderr by default, so that
    it stays apart from a command's report on stdout.
    """

    def __init__(self, *, file: IO[str] | None = None, tty: bool | None = None, ncols: int | None = None) -> None:
        self._stream = _Stream(file if file is not None else sys.stderr)
        self.tty = self._stream.isatty() if tty is None else tty
        self._ncols = ncols
        self._bar: _Bar | None = None

    @property
    def closed(self) -> bool:
        return self._stream.broken

    def trying(self, name: str, url: str) -> None:
        self._end_bar(keep=False)
        self._line(f"fetching {name} from {url}")

    def received(self, name: str, done: int, total: int | None) -> None:
        if not self.tty or self.closed:
            return
        if self._bar is None:
            # initial: the first bytes arrived before the bar's clock started, so they count for the bar, not
            # for the rate
            self._bar = _Bar(total=total, initial=done, desc=f"  {name}", unit="B", unit_scale=True,
                             file=self._stream, ncols=self._ncols, dynamic_ncols=self._ncols is None,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}{unit}/{total_fmt}{unit} "
                                        "[{elapsed}<{remaining}, {rate_fmt}]" if total else
                                        "{desc}: {n_fmt}{unit} [{elapsed}, {rate_fmt}]")  # size unknown: no bar
        else:
            self._bar.update(done - self._bar.n)
        if done == total:
            self._bar.refresh()

    def failed(self, name: str, url: str, reason: str) -> None:
        self._end_bar(keep=False)
        self._line(f"  {url} failed: {reason}")

    def finished(self, name: str, size: int) -> None:
        self._end_bar(keep=True)  # the full bar stays, with the size, the time taken and the rate
        self._line(f"  {name}: {size / 1e6:.1f} MB, digest verified")

    def _end_bar(self, *, keep: bool) -> None:
        if self._bar is not None:
            self._bar.leave = keep
            self._bar.close()
            self._bar = None

    def _line(self, text: str) -> None:
        if self.closed:
            return
        if self._bar is not None:
            _Bar.write(text, file=self._stream)
        else:
            self._stream.write(text + "\n")
            self._stream.flush()
