"""Data-parallel training on a Dask LocalCluster of 2 worker processes: the same weights as one process (full batch,
mini-batches, dropout, standardized inputs, a worker with no sample in a batch), resume bit-identical to itself, both
reductions giving the same bits, the CLI end to end, a lost worker (one line, exit 1, a checkpoint that resumes),
and the one-line hints when Dask or dask-cuda is missing.

One cluster serves the module; the CLI tests start their own, as the command does."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("distributed", reason="Dask's distributed is not installed (pip install 'gpunn[dask]')")

import gpunn.cli  # noqa: E402
from gpunn import cluster as cluster_module  # noqa: E402
from gpunn.backend import get_backend  # noqa: E402
from gpunn.cluster import (  # noqa: E402
    ClusterError,
    ClusterSpecError,
    add_sums,
    connect,
    parse_cluster,
    shard_bounds,
    tree_levels,
    tree_sum,
)
from gpunn.data import Split, load_bundled_sample, split  # noqa: E402
from gpunn.errors import BackendError, ConfigError  # noqa: E402
from gpunn.model import load_model  # noqa: E402
from gpunn.train import TrainConfig, TrainingInterrupted, fit  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    with connect("local:2", device="cpu") as backend:
        yield backend


@pytest.fixture(scope="module")
def parts():
    return split(load_bundled_sample(), val_size=500, seed=0)


@pytest.fixture(scope="module")
def fewer(parts):
    """2,000 training digits, for the tests with many steps: the machine's two cores are shared."""
    return Split(parts.X_train[:, :2000], parts.y_train[:2000], parts.X_val[:, :300], parts.y_val[:300], None, None)


def assert_same_weights(a, b, *, rtol, atol):
    for x, y in zip(a.model.params, b.model.params):
        np.testing.assert_allclose(x.W, y.W, rtol=rtol, atol=atol)
        np.testing.assert_allclose(x.b, y.b, rtol=rtol, atol=atol)


def assert_identical(a, b):
    assert [s.loss for s in a.history] == [s.loss for s in b.history]
    for x, y in zip(a.model.params, b.model.params):
        np.testing.assert_array_equal(x.W, y.W)
        np.testing.assert_array_equal(x.b, y.b)
    for name in a.model.optimizer_state:
        for x, y in zip(a.model.optimizer_state[name], b.model.optimizer_state[name]):
            np.testing.assert_array_equal(x.W, y.W)


# --- without a cluster --------------------------------------------------------------------------------------------


def test_gpunn_and_its_help_do_not_import_dask():
    code = ("import sys, gpunn, gpunn.cli\n"
            "from click.testing import CliRunner\n"
            "assert CliRunner().invoke(gpunn.cli.main, ['train', '--help']).exit_code == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'gpunn.cluster')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_parse_cluster():
    assert parse_cluster("local:3") == cluster_module.ClusterSpec("local", "local:3", workers=3)
    assert parse_cluster("local-cuda").kind == "local-cuda"
    assert parse_cluster("tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    for bad in ("local:0", "local", "10.0.0.5:8786", "tcp://", "gpu"):
        with pytest.raises(ClusterSpecError):
            parse_cluster(bad)


def test_shards_are_contiguous_and_cover_the_training_set():
    for m, n in [(10, 3), (4500, 2), (7, 7)]:
        bounds = shard_bounds(m, n)
        assert bounds[0] == 0 and bounds[-1] == m and all(b > a for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("n", range(1, 10))
def test_the_tree_on_the_workers_adds_in_the_clients_order(n):
    """The rounds the workers run (tree_levels) build the same expression as the client's pairwise sum, so the two
    reductions give the same bits for any number of workers, not only the two a test cluster has."""
    on_workers = [f"s{r}" for r in range(n)]
    for level in tree_levels(n):
        for r, s in level:
            on_workers[r], on_workers[s] = f"({on_workers[r]}+{on_workers[s]})", None
    assert on_workers[0] == tree_sum([f"s{r}" for r in range(n)], lambda a, b: f"({a}+{b})")
    assert len(tree_levels(n)) == (n - 1).bit_length()
    assert add_sums(None, None) is None


# --- on the module's cluster ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, rtol, atol", [("float64", 1e-10, 1e-12), ("float32", 1e-4, 1e-6)])
def test_full_batch_gives_the_single_process_weights(cluster, parts, dtype, rtol, atol):
    config = TrainConfig(hidden=(16,), epochs=10, dtype=dtype, lr=0.5)
    on_cluster = fit(parts, config, backend=cluster)
    alone = fit(parts, config, backend=get_backend("cpu"))
    assert on_cluster.model.info["step"].startswith("data-parallel on 2 workers, sums added here: ")
    assert on_cluster.model.info["device"] == "cluster local:2"
    assert [s.epoch for s in on_cluster.history] == list(range(1, 11))
    np.testing.assert_allclose([s.loss for s in on_cluster.history], [s.loss for s in alone.history], rtol=rtol)
    np.testing.assert_allclose([s.val_loss for s in on_cluster.history], [s.val_loss for s in alone.history],
                               rtol=rtol)
    assert [s.train_accuracy for s in on_cluster.history] == [s.train_accuracy for s in alone.history]
    assert_same_weights(on_cluster, alone, rtol=rtol, atol=atol)


def test_mini_batches_give_the_single_process_weights(cluster, fewer):
    """Batches of 600 (and one of 200) from the epoch's permutation, split across the shards by sample number, with
    Adam's state and L2 (added once, on the client), two hidden layers (the CPU's fused pass on each worker)."""
    config = TrainConfig(hidden=(16, 8), epochs=10, dtype="float64", batch_size=600, optimizer="adam", lr=0.01,
                         l2=0.5)
    on_cluster = fit(fewer, config, backend=cluster)
    alone = fit(fewer, config, backend=get_backend("cpu"))
    np.testing.assert_allclose([s.loss for s in on_cluster.history], [s.loss for s in alone.history], rtol=1e-10)
    assert_same_weights(on_cluster, alone, rtol=1e-9, atol=1e-12)


def test_a_worker_without_samples_in_a_batch_adds_zeros_and_keeps_its_dropout_masks_in_step(cluster, parts):
    """40 samples in batches of 3: some batches fall in one shard only, and the other worker contributes nothing
    but must still draw its masks, or every later step would drop other units than one process does."""
    small = Split(parts.X_train[:, :40], parts.y_train[:40], parts.X_val[:, :50], parts.y_val[:50], None, None)
    config = TrainConfig(hidden=(12, 12), epochs=3, dtype="float64", batch_size=3, dropout=0.3, lr=0.2, seed=3)
    half = shard_bounds(40, 2)[1]
    one_sided = sum(
        bool(np.all(order[i:i + 3] < half) or np.all(order[i:i + 3] >= half))
        for epoch in range(1, 4)
        for order in [np.random.default_rng([config.seed, epoch]).permutation(40)] for i in range(0, 40, 3))
    assert one_sided >= 3  # the case this test is about happens
    on_cluster = fit(small, config, backend=cluster)
    alone = fit(small, config, backend=get_backend("cpu"))
    assert "single pass over uint8 pixels" not in on_cluster.model.info["step"]  # dropout: no fast path
    np.testing.assert_allclose([s.loss for s in on_cluster.history], [s.loss for s in alone.history], rtol=1e-10)
    assert_same_weights(on_cluster, alone, rtol=1e-9, atol=1e-12)


def test_standardized_inputs_train_as_the_generic_math_does_in_one_process(cluster, parts):
    """Each worker standardizes its shard with the whole training split's statistics; a pass over raw pixels cannot
    (it folds in the 1/255 and nothing more), so the workers' step takes the prepared floats."""
    config = TrainConfig(hidden=(16,), epochs=5, dtype="float64", normalize="standardize", lr=0.2)
    on_cluster = fit(parts, config, backend=cluster)
    alone = fit(parts, config, backend=get_backend("cpu", fast=False))
    assert "single pass over uint8 pixels" not in on_cluster.model.info["step"]
    np.testing.assert_array_equal(on_cluster.model.preprocessing.mean, alone.model.preprocessing.mean)
    assert_same_weights(on_cluster, alone, rtol=1e-9, atol=1e-12)


def test_resume_on_the_cluster_is_bit_identical(cluster, fewer):
    config = TrainConfig(hidden=(16,), epochs=10, batch_size=700, optimizer="momentum", lr=0.2)
    straight = fit(fewer, config, backend=cluster)
    half = fit(fewer, TrainConfig(hidden=(16,), epochs=5, batch_size=700, optimizer="momentum", lr=0.2),
               backend=cluster)
    resumed = fit(fewer, config, backend=cluster, resume=half.model)
    assert [s.epoch for s in resumed.history] == list(range(6, 11))
    resumed.history[:0] = half.history
    assert_identical(resumed, straight)


def test_ctrl_c_stops_after_the_epoch_and_leaves_the_workers_alone(cluster, fewer):
    """A terminal's Ctrl-C reaches every process of its group, the workers too: they ignore it (gpunn's preload),
    and fit stops after the epoch with its state, as in one process; the run resumes on the same workers."""
    workers = cluster.client.run(os.getpid)
    config = TrainConfig(hidden=(16,), epochs=8, batch_size=700, optimizer="adam", lr=0.01)

    def ctrl_c_after_epoch_3(stats):
        if stats.epoch == 3:
            for pid in [*workers.values(), os.getpid()]:
                os.kill(pid, signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as caught:
        fit(fewer, config, backend=cluster, on_epoch=ctrl_c_after_epoch_3)
    # the cluster's runner reads its figures back after every epoch, so the run stops right after epoch 3
    assert caught.value.epoch == 3 and caught.value.model.info["epochs_done"] == 3
    assert caught.value.signal == signal.SIGINT
    assert cluster.client.run(os.getpid) == workers
    finished = fit(fewer, config, backend=cluster, resume=caught.value.model)
    straight = fit(fewer, config, backend=cluster)
    finished.history[:0] = straight.history[:3]
    assert_identical(finished, straight)


def test_the_tree_on_the_workers_and_the_sum_on_the_client_give_the_same_bits(cluster, fewer, monkeypatch):
    config = TrainConfig(hidden=(16,), epochs=3, batch_size=700, optimizer="adam", lr=0.01)
    here = fit(fewer, config, backend=cluster)
    monkeypatch.setattr(cluster, "reduce", "tree")
    in_tree = fit(fewer, config, backend=cluster)
    assert in_tree.model.info["step"].startswith("data-parallel on 2 workers, sums added in a tree on the workers: ")
    assert_identical(in_tree, here)


def test_a_worker_that_cannot_use_the_device_is_named(cluster):
    """--device cuda where the workers have no usable GPU: the worker's own one-line reason, with its address."""
    try:
        get_backend("cuda")
    except BackendError as error:
        reason = error.cause
    else:
        pytest.skip("a CUDA device answers here, so the workers can use it")
    address = cluster.client.scheduler.address
    with pytest.raises(ClusterError, match=rf"^worker tcp://[\d.:]+: .*{re.escape(reason)}") as caught:
        cluster_module.ClusterBackend(cluster.client, parse_cluster(address), device="cuda")
    assert caught.value.exit_code == 1


def test_the_workers_are_asked_for_the_runs_precision(cluster, fewer):
    """The precision reaches each worker's own step: the CPU workers refuse tf32 as a CPU process does, in one line."""
    with pytest.raises(ConfigError, match=r"^precision tf32 runs .* this run on cpu would compute them in float32"):
        fit(fewer, TrainConfig(epochs=1, precision="tf32"), backend=cluster)


# --- the command -----------------------------------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(gpunn.cli.main, [str(a) for a in args])


def test_the_command_trains_on_a_local_cluster_survives_a_lost_worker_and_resumes(cluster, tmp_path, monkeypatch):
    """`--cluster local:2` with a worker killed after epoch 3: one line, exit 1, and the checkpoint of epoch 3. Joining
    the module's cluster by its address, `--resume` continues it to the weights of an uninterrupted run on that
    cluster, bit for bit."""
    started = []

    def connect_and_keep(*args, **kwargs):
        started.append(connect(*args, **kwargs))
        return started[-1]

    class KillAWorkerAfterEpoch3(gpunn.cli.TrainingProgress):
        def update(self, stats):
            super().update(stats)
            if stats.epoch == 3:
                pids = started[-1].client.run(os.getpid)
                os.kill(pids[max(pids)], signal.SIGKILL)

    monkeypatch.setattr(cluster_module, "connect", connect_and_keep)
    monkeypatch.setattr(gpunn.cli, "TrainingProgress", KillAWorkerAfterEpoch3)
    options = ["--device", "cpu", "--hidden", 16, "--optimizer", "momentum", "--lr", 0.2, "--out", tmp_path / "m.npz"]
    lost = run("train", "--cluster", "local:2", *options, "--epochs", 6)
    assert lost.exit_code == 1, lost.output
    assert "device:  cluster local:2: 2 workers: tcp://" in lost.output
    assert "step:    data-parallel on 2 workers, sums added here: " in lost.output
    error = lost.output.strip().splitlines()[-1]
    assert "Traceback" not in lost.output
    assert error.startswith("Error: worker tcp://") and "left the cluster during epoch 4" in error
    assert f"the checkpoint of epoch 3 is in {tmp_path / 'm.interrupted.npz'}" in error
    checkpoint = load_model(tmp_path / "m.interrupted.npz", get_backend("cpu"))
    assert checkpoint.info["epochs_done"] == 3

    monkeypatch.undo()  # the resumed run is left alone
    address = cluster.client.scheduler.address
    resumed = run("train", "--cluster", address, *options, "--epochs", 6, "--resume", tmp_path / "m.interrupted.npz")
    assert resumed.exit_code == 0, resumed.output
    assert f"device:  cluster {address}: 2 workers: tcp://" in resumed.output
    assert "resume:  " in resumed.output and "after epoch 3" in resumed.output
    assert "trained 3 epochs in " in resumed.output and "model saved to " in resumed.output
    straight = fit(split(load_bundled_sample(), val_size=1000, seed=0),
                   TrainConfig(hidden=(16,), epochs=6, optimizer="momentum", lr=0.2), backend=cluster)
    model = load_model(tmp_path / "m.npz", get_backend("cpu"))
    for x, y in zip(model.params, straight.model.params):
        np.testing.assert_array_equal(x.W, y.W)


def test_without_distributed_one_line_says_what_to_install(monkeypatch):
    """Exit 1, as for CuPy missing: the command line is right, the machine lacks a package."""
    monkeypatch.setitem(sys.modules, "distributed", None)  # what `import distributed` meets where it is not installed
    result = run("train", "--cluster", "local:2", "--epochs", 1)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        "Error: --cluster needs Dask's distributed, which is not installed; install it with: pip install 'gpunn[dask]'"]


def test_a_broken_distributed_is_told_apart_from_a_missing_one(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "distributed":
            raise ImportError("cannot import name 'gen' from 'tornado'", name="tornado")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "distributed")
    monkeypatch.setattr(builtins, "__import__", broken)
    result = run("train", "--cluster", "local:2", "--epochs", 1)
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (
        "Error: --cluster needs Dask's distributed, which is installed but cannot be imported (ImportError: cannot "
        "import name 'gen' from 'tornado'); reinstall it with: pip install 'gpunn[dask]' --force-reinstall")


def test_local_cuda_needs_dask_cuda_and_a_cuda_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    missing = run("train", "--cluster", "local-cuda", "--epochs", 1)
    assert missing.exit_code == 1 and missing.output.strip() == (
        "Error: --cluster needs dask-cuda (for local-cuda: one worker per GPU), which is not installed; install it "
        "with: pip install dask-cuda")
    on_cpu = run("train", "--cluster", "local-cuda", "--device", "cpu", "--epochs", 1)
    assert on_cpu.exit_code == 2 and "use it with --device cuda, not cpu" in on_cpu.output
    bad = run("train", "--cluster", "local:x", "--epochs", 1)
    assert bad.exit_code == 2 and bad.output.startswith("Error: unknown cluster 'local:x'; expected local:N")


def test_the_scaling_benchmark_at_toy_size(tmp_path):
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "cluster_scaling.py")
    done = subprocess.run([sys.executable, script, "--m", "300", "--hidden", "8", "--workers", "2", "--rounds", "2",
                           "--slot-ms", "0", "--settle-ms", "0", "--out-dir", str(tmp_path), "--name", "toy"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "toy.json").read_text())
    rows = {row["configuration"]: row for row in result["rows"]}
    assert list(rows) == ["one process", "local:2"] and result["orders"] == [["one process", "local:2"],
                                                                            ["local:2", "one process"]]
    assert all(len(row["epoch_ms"]) == 2 and row["median_ms"] > 0 for row in rows.values())
    cluster_row = rows["local:2"]
    assert len(cluster_row["workers"]) == 2 and cluster_row["steps_timed"] == 2 * result["epochs_per_slot"]
    assert 0 < cluster_row["worker_step_ms"] < cluster_row["step_ms"] and cluster_row["tiny_step_ms"] > 0
    assert result["bytes_per_step_per_worker"]["to_worker"] == 4 * (784 * 8 + 8 + 8 * 10 + 10)
    assert (tmp_path / "toy.md").read_text().startswith("# Epoch time on a LocalCluster, interleaved: toy")
