"""The ``gpunn`` command: thin click commands that parse options, pick the backend, call the library, report.

gpunn's own errors (:class:`gpunn.errors.GpunnError`) become one line on stderr and a non-zero exit status: 2 for
bad input or usage, 1 for everything else (a device that cannot be used, training that diverged).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import sys
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click
import numpy as np
from click.core import ParameterSource

from gpunn import __version__
from gpunn.backend import NumpyBackend, cuda_devices, get_backend
from gpunn.data import load_bundled_sample, load_idx_dir, load_kaggle_csvs, read_images, split, write_submission
from gpunn.diagnostics import out_of_memory_message
from gpunn.download import DATASETS, cache_root, cached, fetch
from gpunn.errors import BackendError, GpunnError, ModelError, SignalInterrupt
from gpunn.files import HELD_SIGNALS, atomic_write, check_directory, check_writable, deferred_signals
from gpunn.gradcheck import check_gradients, passed, random_problem
from gpunn.gradcheck import format_report as gradient_report
from gpunn.metrics import confusion_matrix, format_report, report
from gpunn.model import Model, load_model, save_model
from gpunn.nn import ACTIVATIONS, DTYPES, INITS, PRECISIONS, Architecture
from gpunn.optim import OPTIMIZERS, SCHEDULES
from gpunn.progress import DownloadProgress, TrainingProgress
# matplotlib itself is imported by gpunn.plots on first use, so `gpunn --help` does not pay for it
from gpunn.plots import read_metrics, require_matplotlib, write_plots
from gpunn.train import (MAX_EPOCHS, NORMALIZATIONS, TrainConfig, TrainingFailed, TrainingInterrupted, describe_run,
                         fit, predict_proba)

DEVICE_HELP = "auto (the GPU if one answers, else the CPU), cpu, cuda, or cuda:N."


class GpunnGroup(click.Group):
    """A click group that prints gpunn's own errors as one line instead of a traceback, and ends on SIGTERM and SIGHUP
    as on Ctrl-C (files being written are cleaned up; the exit status is 128 + the signal's number)."""

    def invoke(self, ctx: click.Context) -> Any:
        previous = {signum: signal.signal(signum, _raise_signal) for signum in _ENDING_SIGNALS}
        try:
            return super().invoke(ctx)
        except GpunnError as error:
            _error_line(str(error))
            ctx.exit(error.exit_code)
        except KeyboardInterrupt as interrupt:
            signum = getattr(interrupt, "signal", signal.SIGINT)
            _error_line(f"interrupted by {signal.Signals(signum).name}")
            ctx.exit(128 + signum)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            message = out_of_memory_message(error)
            if message is not None:
                _error_line(message)
                ctx.exit(1)
            # not a problem with the user's input or machine that gpunn knows how to name: a bug of gpunn's own
            traceback.print_exc()
            _error_line(f"this is a bug in gpunn {__version__}, not a problem with your input; please report it to "
                        "gpunn's issue tracker with the traceback above and the output of `gpunn info`")
            ctx.exit(1)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


# SIGINT already raises KeyboardInterrupt; training turns all of them into "stop after this epoch" (gpunn.train.fit)
_ENDING_SIGNALS = tuple(signum for signum in HELD_SIGNALS if signum != signal.SIGINT)


def _raise_signal(signum: int, frame: Any) -> None:
    raise SignalInterrupt(signum)


def _error_line(text: str) -> None:
    _note(f"Error: {text}")


def _note(text: str) -> None:
    """A line on stderr, unless stderr is closed too: then there is no one left to tell."""
    with contextlib.suppress(OSError):
        click.echo(text, err=True)


class _Output:
    """stdout for a command's report, which stops printing (and nothing else) when its reader goes away: with
    ``gpunn train ... | head``, the run still finishes and saves its model."""

    closed = False

    def __call__(self, text: str = "", nl: bool = True) -> None:
        if self.closed:
            return
        try:
            click.echo(text, nl=nl)
        except BrokenPipeError:
            self.closed = True
            # point stdout at /dev/null, so that the interpreter's last flush at exit does not fail again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


echo = _Output()


class _Finite(click.FloatRange):
    """A float option in a range that is also finite: click's FloatRange lets ``nan`` through (every comparison
    with it is false)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


@click.group(cls=GpunnGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpunn")
def main() -> None:
    """Train a small neural network on MNIST with NumPy (CPU) or CuPy (GPU), one implementation for both."""


def _parse_batch(value: str | int | None) -> int | None:
    if value is None or value == "full":
        return None
    try:
        size = int(value)
    except ValueError:
        raise click.BadParameter(f"expected 'full' or a number of samples, got {value!r}") from None
    if size < 1:
        raise click.BadParameter(f"a batch needs at least 1 sample, got {size}")
    return size


def _parse_hidden(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated layer sizes such as 10 or 16,16, got {value!r}") from None
    if any(size < 1 for size in sizes):
        raise click.BadParameter(f"every hidden layer needs at least 1 unit, got {value!r}")
    return sizes


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="Directory with MNIST's IDX files (.gz or raw). "
              "Default: the 5,000-digit sample bundled with gpunn.")
@click.option("--dataset", "dataset_name", type=click.Choice(list(DATASETS)),
              help="Download (once, verified, into the cache) and use this data set.")
@click.option("--train-csv", type=click.Path(path_type=Path),
              help="Kaggle digit-recognizer train.csv (label,pixel0,...,pixel783) instead of --data-dir.")
@click.option("--test-csv", type=click.Path(path_type=Path),
              help="With --train-csv: a test CSV. With a label column it gives the test accuracy; without one "
              "(Kaggle's test.csv), its predictions are written to --submission.")
@click.option("--submission", type=click.Path(path_type=Path), default=Path("submission.csv"), show_default=True,
              help="Where predictions for an unlabelled --test-csv go, in Kaggle's ImageId,Label format.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--cluster", metavar="SPEC",
              help="Train data-parallel on a Dask cluster, each worker on its shard of the training set (with "
              "--device on each worker): local:N starts N worker processes here, local-cuda one worker per GPU "
              "(dask-cuda), tcp://HOST:PORT joins a running scheduler. Needs gpunn[dask].")
@click.option("--fast/--generic", "fast", default=None,
              help="--generic: the generic array-API math even where the device has a fast path (to compare, or to "
              "read). --fast (the default on every device): the device's fast path wherever it has one for the "
              "network. The header's step: line names the one that runs.")
@click.option("--hidden", default="10", show_default=True, callback=_parse_hidden,
              help="Hidden layer sizes, comma-separated: 10 is the seed network 784-10-10; 16,16 has two layers.")
@click.option("--activation", type=click.Choice(ACTIVATIONS), default="relu", show_default=True,
              help="Activation of the hidden layers (the output is always softmax).")
@click.option("--init", "init", type=click.Choice(INITS),
              help="Weight initialization. Default: he for relu, xavier for sigmoid and tanh; uniform is the seed "
              "notebook's rand - 0.5.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Floating-point type of the weights and the arithmetic.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="float32", show_default=True,
              help="What a float32 network's matrix products compute in: float32, or on the GPU's tensor cores with "
              "the inputs rounded to tf32 or bf16 and the sums in float32 (weights and updates stay float32). "
              "tf32 and bf16 need --device cuda and its fast path.")
@click.option("--epochs", type=click.IntRange(min=1, max=MAX_EPOCHS), default=500, show_default=True,
              help="Epochs in all (with --resume: the new total, counting those already done).")
@click.option("--lr", type=_Finite(min=0, min_open=True), default=0.1, show_default=True,
              help="Learning rate alpha in W <- W - alpha dW.")
@click.option("--batch-size", default="full", show_default=True, callback=lambda c, p, v: _parse_batch(v),
              help="'full' (full-batch gradient descent) or N samples per mini-batch, reshuffled every epoch.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="gd", show_default=True,
              help="Update rule (see gpunn/optim.py).")
@click.option("--beta1", type=_Finite(0, 1, max_open=True), default=0.9, show_default=True,
              help="Momentum / Adam: weight of the running mean of gradients.")
@click.option("--beta2", type=_Finite(0, 1, max_open=True), default=0.999, show_default=True,
              help="RMSprop / Adam: weight of the running mean of squared gradients.")
@click.option("--eps", type=_Finite(min=0, min_open=True), default=1e-8, show_default=True,
              help="RMSprop / Adam: added to the square root in the denominator.")
@click.option("--l2", type=_Finite(min=0), default=0.0, show_default=True,
              help="L2 strength lambda: adds lambda/(2m)·sum ||W||² to the cost and lambda/m·W to each dW.")
@click.option("--normalize", type=click.Choice(NORMALIZATIONS), default="scale", show_default=True,
              help="scale: pixels / 255. standardize: then (x - mean) / std per pixel, with the training split's "
              "statistics, stored in the model and applied unchanged to every other input.")
@click.option("--dropout", type=_Finite(0, 1, max_open=True), default=0.0, show_default=True,
              help="Inverted dropout on the hidden layers during training: the probability of dropping a unit.")
@click.option("--lr-schedule", type=click.Choice(SCHEDULES), default="constant", show_default=True,
              help="step: lr·gamma^floor((epoch-1)/step-size); cosine: lr·(1+cos(pi·(epoch-1)/epochs))/2.")
@click.option("--lr-step-size", type=click.IntRange(min=1), default=100, show_default=True,
              help="Epochs between two steps of the step schedule.")
@click.option("--lr-gamma", type=_Finite(0, 1, min_open=True), default=0.1, show_default=True,
              help="Factor applied at each step of the step schedule.")
@click.option("--early-stop", type=click.IntRange(min=1), default=None, metavar="K",
              help="Stop when the validation loss has not improved for K epochs, and keep the best epoch's weights.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seeds the shuffle, the validation split and the initial weights.")
@click.option("--val-size", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Training digits held out for validation.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("model.npz"), show_default=True,
              help="Where to save the trained model.")
@click.option("--metrics-out", type=click.Path(path_type=Path),
              help="Write one JSON object per epoch, then a summary object, to this .jsonl file.")
@click.option("--plot-dir", type=click.Path(path_type=Path),
              help="Write learning curves, the confusion matrix, misclassified digits and the first layer's weights "
              "here as PNG files (needs matplotlib: gpunn[plot]).")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Save a resumable checkpoint here every --checkpoint-every epochs, and on Ctrl-C.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, help="Epochs between checkpoints.")
@click.option("--resume", type=click.Path(path_type=Path),
              help="Continue the run saved in this checkpoint (or model) up to --epochs in all. Settings not given "
              "again are taken from it; the data options must name the same data.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def train(data_dir: Path | None, dataset_name: str | None, train_csv: Path | None, test_csv: Path | None,
          submission: Path, device: str, fast: bool | None, out: Path, metrics_out: Path | None, plot_dir: Path | None,
          checkpoint: Path | None, checkpoint_every: int | None, resume: Path | None, quiet: bool, cluster: str | None,
          **settings: Any) -> None:
    """Train the network and save it.

    \f
    ``settings`` are the options named like TrainConfig's fields.
    """
    if sum(option is not None for option in (data_dir, dataset_name, train_csv)) > 1:
        raise click.UsageError("give one of --data-dir, --dataset and --train-csv")
    if test_csv is not None and train_csv is None:
        raise click.UsageError("--test-csv goes with --train-csv")
    if checkpoint_every is not None and checkpoint is None:
        raise click.UsageError("--checkpoint-every needs --checkpoint PATH")
    interrupted_path = checkpoint or out.with_name(f"{out.stem}.interrupted{out.suffix or '.npz'}")
    for path, option in [(out, "--out"), (metrics_out, "--metrics-out"), (checkpoint, "--checkpoint")]:
        if path is not None:
            check_writable(path, option)
    if plot_dir is not None:
        check_directory(plot_dir, "--plot-dir")
        require_matplotlib()  # fail now, not after training
    if cluster is None:
        backend = get_backend(device, fast=fast)
    else:
        # imported only when asked for: `gpunn --help` and single-process runs never load Dask. The cluster lives as
        # long as the command (a local one is shut down with it).
        from gpunn.cluster import connect

        backend = click.get_current_context().with_resource(connect(cluster, device=device, fast=fast))
    settings["hidden"] = tuple(settings["hidden"])
    resumed = None if resume is None else load_model(resume, backend)
    if resumed is None:
        config = TrainConfig(**settings)
    else:
        saved, done = resumed.resume_state()  # ModelError, one line, for a file that holds no usable run
        # settings not given on this command line continue the checkpoint's run; --epochs is the new total
        source = click.get_current_context().get_parameter_source
        config = TrainConfig.resumed(saved, {name: value for name, value in settings.items()
                                             if name == "epochs" or source(name) == ParameterSource.COMMANDLINE})
    data_options = _data_options(data_dir=data_dir, dataset=dataset_name, train_csv=train_csv, test_csv=test_csv)
    if resumed is not None and not data_options:
        data_options = _saved_data_options(resumed, resume)  # the checkpoint's data, when none is named again
    dataset = _load_dataset(data_options.get("data_dir"), data_options.get("train_csv"),
                            data_options.get("test_csv"), data_options.get("dataset"), quiet)
    unlabelled_test = dataset.test_images is not None and dataset.test_labels is None
    if unlabelled_test:
        check_writable(submission, "--submission")
    parts = split(dataset, val_size=config.val_size, seed=config.seed)
    # the split holds its own shuffled copy: the file's training images (47 MB for MNIST) can go before training
    source, unlabelled_images = dataset.source, dataset.test_images if unlabelled_test else None
    del dataset
    say = (lambda text: None) if quiet else echo
    for line in describe_run(config, backend, parts, source):
        say(line)
    if resumed is not None:
        say(f"resume:  {resume}, after epoch {done}")

    first = 1 if resumed is None else done + 1
    progress = TrainingProgress(config.epochs, first, enabled=not quiet)
    records: list[dict[str, Any]] = []

    def on_epoch(stats: Any) -> None:
        records.append({"type": "epoch", **stats.as_dict()})
        progress.update(stats)

    def with_data(model: Model) -> Model:
        model.info["data"] = {name: str(value) for name, value in data_options.items()}  # for a resume to find it
        return model

    try:
        result = fit(parts, config, backend=backend, on_epoch=on_epoch,
                     on_checkpoint=lambda model: save_model(checkpoint, with_data(model), backend),
                     checkpoint_every=checkpoint_every or 0, resume=resumed, on_step=progress.step,
                     on_signal=lambda signum: _note(f"{signal.Signals(signum).name}: stopping after this epoch, with a "
                                                    "checkpoint (once more to stop at once)"))
    except TrainingInterrupted as interrupted:
        progress.close()  # end the progress line before the message
        with deferred_signals():  # a second Ctrl-C must not cost the checkpoint being written
            save_model(interrupted_path, with_data(interrupted.model), backend)
        _note(f"interrupted after epoch {interrupted.epoch}: checkpoint written to {interrupted_path}; "
              f"continue with the same command and --resume {interrupted_path}")
        raise SystemExit(128 + interrupted.signal) from None
    except TrainingFailed as failed:
        if failed.model is None:
            raise
        # a cluster lost a worker: the last completed epoch is saved, and the error says where, in one line
        progress.close()
        with deferred_signals():
            save_model(interrupted_path, with_data(failed.model), backend)
        _error_line(f"{failed}; the checkpoint of epoch {failed.epoch} is in {interrupted_path}: continue with the "
                    f"same command and --resume {interrupted_path}")
        raise SystemExit(failed.exit_code) from None
    finally:
        progress.close()
    summary = {**result.summary(), "data": source}
    with deferred_signals():  # a signal now would lose the whole run: it takes effect once the model is on disk
        save_model(out, with_data(result.model), backend)
    if metrics_out is not None:
        with atomic_write(metrics_out, "w") as handle:
            for record in [*records, summary]:
                handle.write(json.dumps(record) + "\n")
    kept, epochs_run = result.kept, len(result.history)
    val = "" if kept.val_accuracy is None else f", validation accuracy {kept.val_accuracy:.2%}"
    say(f"trained {epochs_run} epoch{'s' if epochs_run != 1 else ''} in {result.total_seconds:.1f} s (median "
        f"{result.median_epoch_seconds * 1e3:.2f} ms/epoch, first epoch apart); epoch {kept.epoch}: loss "
        f"{kept.loss:.4f}, training accuracy {kept.train_accuracy:.2%}{val}")
    if result.test_accuracy is not None:
        say(f"test accuracy: {result.test_accuracy:.2%} on {result.n_test:,} digits")
    else:
        say("test accuracy: no labelled test set in this data")
    stop = result.model.info.get("early_stop")
    if stop and stop["stopped"]:
        say(f"stopped early after epoch {stop['epochs_run']}: the validation loss last improved at epoch "
            f"{stop['best_epoch']}, whose weights are kept")
    say(f"model saved to {out}" + (f", metrics to {metrics_out}" if metrics_out else ""))
    if plot_dir is not None:
        if parts.X_test is not None and parts.y_test is not None:
            images, labels, part = parts.X_test.T, parts.y_test, "test set"
        else:
            images, labels, part = parts.X_val.T, parts.y_val, "validation split"
        written = write_plots(plot_dir, [*records, summary], result.model, images, labels, part, backend)
        say(f"plots ({part}) written to {plot_dir}: {', '.join(p.name for p in written)}")
    if unlabelled_test:
        write_submission(submission, predict_proba(result.model, unlabelled_images.T, backend=backend))
        say(f"predictions for the {len(unlabelled_images):,} digits of {test_csv} written to {submission}")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="Directory with MNIST's IDX files; the test set is used. Default: the bundled sample.")
@click.option("--dataset", "dataset_name", type=click.Choice(list(DATASETS)),
              help="Download (once, verified) and use this data set's test set.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path),
              help="A labelled CSV in Kaggle's train.csv layout, instead of --data-dir.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evaluate(model_path: Path, data_dir: Path | None, dataset_name: str | None, csv_path: Path | None, device: str,
             as_json: bool) -> None:
    """MODEL's accuracy, per-class precision, recall and F1, and the confusion matrix, on labelled digits."""
    if sum(option is not None for option in (data_dir, dataset_name, csv_path)) > 1:
        raise click.UsageError("give one of --data-dir, --dataset and --csv")
    backend = get_backend(device)
    model = load_model(model_path, backend)
    dataset = _load_dataset(data_dir, csv_path, None, dataset_name, as_json)
    if dataset.test_images is not None and dataset.test_labels is not None:
        images, labels, part = dataset.test_images, dataset.test_labels, "test set"
    elif data_dir is None and csv_path is None and dataset_name is None:
        images, labels, part = dataset.train_images, dataset.train_labels, "training digits: not a held-out score"
    else:
        images, labels, part = dataset.train_images, dataset.train_labels, "all digits of the file"
    predicted = predict_proba(model, images.T, backend=backend).argmax(axis=1)
    result = report(confusion_matrix(labels.astype(np.int64), predicted))
    result.update(model=str(model_path), data=dataset.source, part=part, device=backend.name)
    if as_json:
        echo(json.dumps(result, indent=1))
    else:
        echo(f"{model_path} on {dataset.source} ({part}) [{backend.name}]")
        echo(format_report(result))


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("submission.csv"), show_default=True,
              help="Where to write the predictions (Kaggle's submission format: ImageId,Label).")
@click.option("--proba", is_flag=True, help="Add the ten class probabilities as columns p0,...,p9.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
def predict(model_path: Path, input_path: Path, output: Path, proba: bool, device: str) -> None:
    """Predict the digits in INPUT (a CSV in Kaggle's test.csv layout, or IDX images) with MODEL."""
    check_writable(output, "--output")
    backend = get_backend(device)
    model = load_model(model_path, backend)
    images = read_images(input_path)
    probabilities = predict_proba(model, images.T, backend=backend)
    write_submission(output, probabilities, with_proba=proba)
    echo(f"{len(images):,} predictions for {input_path} written to {output} [{backend.name}]")


@main.command()
@click.argument("metrics", type=click.Path(path_type=Path))
@click.option("--model", "model_path", type=click.Path(path_type=Path),
              help="Also draw the confusion matrix, misclassified digits and first-layer weights of this model.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="With --model: MNIST IDX files (the test set).")
@click.option("--dataset", "dataset_name", type=click.Choice(list(DATASETS)),
              help="With --model: a downloaded data set's test set.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="With --model: a labelled Kaggle-layout CSV.")
@click.option("-o", "--out-dir", type=click.Path(path_type=Path), default=Path("plots"), show_default=True,
              help="Directory for the PNG files (made if missing).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
def plot(metrics: Path, model_path: Path | None, data_dir: Path | None, dataset_name: str | None,
         csv_path: Path | None, out_dir: Path, device: str) -> None:
    """Draw METRICS (a --metrics-out .jsonl file) and, with --model, what the model gets wrong, as PNG files."""
    records = read_metrics(metrics)
    model = images = labels = backend = None
    part = ""
    if model_path is not None:
        backend = get_backend(device)
        model = load_model(model_path, backend)
        dataset = _load_dataset(data_dir, csv_path, None, dataset_name, False)
        labelled_test = dataset.test_images is not None and dataset.test_labels is not None
        images, labels = (dataset.test_images, dataset.test_labels) if labelled_test else \
            (dataset.train_images, dataset.train_labels)
        part = "test set" if labelled_test else "all digits of the data"
    check_directory(out_dir, "--out-dir")
    written = write_plots(out_dir, records, model, images, labels, part, backend)
    echo(f"wrote {', '.join(str(p) for p in written)}")


@main.command()
@click.option("--hidden", default="5", show_default=True, callback=_parse_hidden, help="Hidden layer sizes.")
@click.option("--activation", type=click.Choice(ACTIVATIONS), default="relu", show_default=True,
              help="Activation of the hidden layers.")
@click.option("--l2", type=_Finite(min=0), default=0.0, show_default=True, help="L2 strength lambda.")
@click.option("--inputs", type=click.IntRange(min=1), default=8, show_default=True, help="Input units.")
@click.option("--classes", type=click.IntRange(min=2), default=4, show_default=True, help="Output units (softmax).")
@click.option("--samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="Random samples (columns of X) the cost is averaged over.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seeds the random weights, inputs and labels.")
def gradcheck(hidden: tuple[int, ...], activation: str, l2: float, inputs: int, classes: int, samples: int,
              seed: int) -> None:
    """Compare every analytic gradient with central differences in float64, each entry against the error that float64
    and the step size allow; exit 1 when one is above it."""
    arch = Architecture((inputs, *hidden, classes), activation)
    checks = check_gradients(*random_problem(arch, samples=samples, seed=seed), arch, l2=l2)
    echo(f"network {arch}, {samples} samples, L2 {l2:g}, float64")
    for line in gradient_report(checks):
        echo(line)
    if not passed(checks):
        raise SystemExit(1)


@main.group()
def data() -> None:
    """Download data sets into the cache, and show what it holds."""


@data.command("fetch")
@click.option("--dataset", "dataset_name", type=click.Choice(list(DATASETS)), default="mnist",
              show_default=True, help="Which data set to download.")
def data_fetch(dataset_name: str) -> None:
    """Download a data set's four files (if not cached yet) and verify their published digests."""
    folder = fetch(DATASETS[dataset_name], progress=DownloadProgress())
    echo(f"{dataset_name}: all four files verified in {folder}")


@data.command("info")
def data_info() -> None:
    """List the cached files with their sizes and digests."""
    rows = cached()
    echo(f"cache: {cache_root()} (set GPUNN_DATA_DIR to move it)")
    if not rows:
        echo("empty: `gpunn data fetch --dataset mnist` fills it")
    for row in rows:
        state = "verified" if row["verified"] else "DIGEST MISMATCH: delete it and fetch again"
        echo(f"{row['dataset']:<14} {row['file']:<28} {row['bytes']:>12,} bytes  "
                   f"{row['algorithm']} {row['digest']}  {state}")


@main.command()
def info() -> None:
    """Show gpunn's version, its libraries, and the devices it can use."""

    libraries = ", ".join(f"{name} {version(name)}"
                          for name in ("numpy", "array-api-compat", "click", "pandas", "numba"))
    echo(f"gpunn {__version__}, Python {platform.python_version()}, {libraries}")
    cpu = NumpyBackend()
    echo(f"cpu:  {cpu.summary()}")
    echo(f"      single pass: {cpu.single_pass_summary()}")
    try:
        devices = cuda_devices()
    except BackendError as error:
        echo(f"cuda: unavailable: {error}")
        return
    for index in range(len(devices)):
        try:
            echo(f"cuda: {get_backend(f'cuda:{index}').summary()}")
        except BackendError as error:
            echo(f"cuda: cuda:{index} unusable: {error}")


def _data_options(**options: Path | str | None) -> dict[str, Path | str]:
    """The data options given, with paths made absolute, so that a checkpoint names its data from anywhere."""
    return {name: value.resolve() if isinstance(value, Path) else value
            for name, value in options.items() if value is not None}


def _saved_data_options(model: Model, path: Path) -> dict[str, Path | str]:
    saved = model.info.get("data", {})
    if not isinstance(saved, dict) or not all(
            key in ("data_dir", "dataset", "train_csv", "test_csv") and isinstance(value, str)
            for key, value in saved.items()):
        raise ModelError(f"--resume {path}: its record of the training data is damaged; name the data again "
                         "(--data-dir, --dataset or --train-csv)")
    return {key: value if key == "dataset" else Path(value) for key, value in saved.items()}


def _load_dataset(data_dir: Path | None, train_csv: Path | None, test_csv: Path | None, dataset_name: str | None = None,
                  quiet: bool = False) -> Any:
    """The data a command was asked for: a Kaggle CSV, a downloaded data set, an IDX directory, or the sample."""
    if train_csv is not None:
        return load_kaggle_csvs(train_csv, test_csv)
    if dataset_name is not None:
        folder = fetch(DATASETS[dataset_name], progress=None if quiet else DownloadProgress())
        loaded = load_idx_dir(folder)
        return type(loaded)(f"{dataset_name} (verified download in {folder})", loaded.train_images,
                            loaded.train_labels, loaded.test_images, loaded.test_labels)
    return load_bundled_sample() if data_dir is None else load_idx_dir(data_dir)
