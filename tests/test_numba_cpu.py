"""The Numba single pass against the generic math (one step, both dtypes, L2, odd m and short tiles, mini-batches,
one and two threads); its zero-skipping against its dense twin, bit for bit; its per-training-set index; determinism;
the networks it refuses; and its disk cache from a package directory that cannot be written.

To keep the module quick (a cold compile takes seconds), this interpreter compiles the kernel in float32 only (the
sparse and dense kernels are one compiled function), once, and loads it from Numba's cache on later runs. The float64
kernel is compiled, checked against the generic math and loaded again in the read-only-package test's fresh
interpreters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest

from gpunn import numba_cpu
from gpunn.data import load_bundled_sample
from gpunn.nn import Architecture, init_params
from gpunn.numba_cpu import (SinglePassCpu, full_batch, needs_compile, samples_of, support_order, supports,
                             threads_for)

from helpers import assert_same_step, bundled_pixels, reference, same_bits, sparse_pixels, weights


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Two threads for steps of a few hundred samples, so that the chunks' sums meet in every test."""
    monkeypatch.setattr(numba_cpu, "MIN_WORK_PER_THREAD", 64)


@pytest.fixture(scope="module")
def sample():
    return bundled_pixels()


@pytest.mark.parametrize("hidden", [10, 40], ids=["h10", "h40"])  # one hidden vector; three (two at a time, then one)
@pytest.mark.parametrize("l2", [0.0, 0.7])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_step_matches_the_generic_pass(sample, hidden, l2, threads):
    dtype = "float32"  # float64: test_float64_from_a_package_directory_that_cannot_be_written
    # 1,001 samples: two chunks of 496 and 505 samples (chunks start at multiples of 8), each ending in a short tile
    pixels, labels = sample[0][:, :1001], sample[1][:1001]
    arch, params = weights((784, hidden, 10), dtype)
    with SinglePassCpu(arch, dtype, 1001, threads=threads) as single:
        assert single.threads == threads and numba.get_num_threads() == threads
        result = single(params, pixels, None, labels, l2=l2)
    assert_same_step(result, reference(params, pixels, labels, arch, dtype, l2), dtype)


@pytest.mark.parametrize("m", [1, 7, 16, 19])
def test_steps_shorter_than_a_tile(sample, m):
    pixels, labels = sample[0][:, 100 : 100 + m], sample[1][100 : 100 + m]
    arch, params = weights((784, 24, 10), "float32")
    with SinglePassCpu(arch, "float32", m) as single:
        assert_same_step(single(params, pixels, None, labels), reference(params, pixels, labels, arch, "float32"),
                         "float32")


@pytest.mark.parametrize("hidden", [10, 40], ids=["h10", "h40"])
@pytest.mark.parametrize("threads", [1, 2])
def test_skipping_zero_pixels_changes_no_bit(sample, hidden, threads):
    pixels, labels = sample[0][:, :999], sample[1][:999]
    arch, params = weights((784, hidden, 10), "float32")
    batch = np.random.default_rng(3).permutation(999)[:613]
    results = []
    for sparse in (True, False):
        with SinglePassCpu(arch, "float32", 999, threads=threads, sparse=sparse) as single:
            results.append((single(params, pixels, None, labels, l2=0.3),
                            single(params, pixels, None, labels, index=batch)))
    (full_sparse, batch_sparse), (full_dense, batch_dense) = results
    assert same_bits(full_sparse, full_dense) and same_bits(batch_sparse, batch_dense)
    # and the check can fail: a step over other samples differs
    assert not same_bits(full_sparse, batch_sparse)


def test_a_mini_batch_is_read_in_place(sample):
    dtype = "float32"
    pixels, labels = sample
    arch, params = weights((784, 40, 10), dtype)
    batch = np.random.default_rng(5).choice(pixels.shape[1], size=333, replace=False)
    with SinglePassCpu(arch, dtype, 512) as single:
        prepared = single.prepare(pixels, batches=True)
        result = single(params, pixels, None, labels, index=batch)
        assert single.prepare(pixels, batches=True) is prepared  # built once per training set
        assert prepared.rows.base is pixels.base  # the IDX rows themselves, not a copy
    assert_same_step(result, reference(params, pixels[:, batch], labels[batch], arch, dtype), dtype)


@pytest.mark.parametrize("hidden", [10, 40])  # the narrow kernel and the other one
def test_the_same_step_gives_the_same_bits(sample, hidden):
    pixels, labels = sample[0][:, :2000], sample[1][:2000]
    arch, params = weights((784, hidden, 10), "float32")
    with SinglePassCpu(arch, "float32", 2000, threads=2) as first, SinglePassCpu(arch, "float32", 2000,
                                                                                  threads=2) as second:
        results = [first(params, pixels, None, labels), first(params, pixels, None, labels),
                   second(params, pixels, None, labels)]
    assert same_bits(results[0], results[1]) and same_bits(results[0], results[2])


def test_pixel_major_and_sample_major_x_give_the_same_step(sample):
    rows = np.ascontiguousarray(sample[0][:, :500].T)  # (m, 784): the IDX layout; X = rows.T is its view
    pixel_major = np.ascontiguousarray(rows.T)  # (784, m) C-ordered, as gpunn keeps X today
    labels = sample[1][:500].astype(np.uint8)  # labels of any integer dtype
    arch, params = weights((784, 10, 10), "float32")
    with SinglePassCpu(arch, "float32", 500) as single:
        assert same_bits(single(params, rows.T, None, labels), single(params, pixel_major, None, labels))


def _sparse_rows(m, n0, seed=0):
    return sparse_pixels(m, n0, density=0.1, empty=slice(8, 16), seed=seed)


def test_a_full_batch_is_summed_in_the_order_of_the_samples_coarse_masks():
    rows = _sparse_rows(43, 70)
    order = support_order(rows)
    assert sorted(order) == list(range(43))
    # each sample's coarse mask: for each run of 16 pixels (the last one of 6), is one of them nonzero
    coarse = [tuple(bool(rows[s, k : k + 16].any()) for k in range(0, 70, 16)) for s in order]
    assert coarse == sorted(coarse)  # ascending, run 0 first
    assert list(order[:8]) == list(range(8, 16))  # the empty samples first, ties in their own order
    # the same masks on an MNIST digit: the order depends on where the ink lies, not on its values
    digits = load_bundled_sample().train_images[:300]
    assert np.array_equal(support_order(digits), support_order((digits != 0).astype(np.uint8) * 7))


def test_the_full_batch_index_holds_the_rows_in_order_and_each_groups_nonzero_pixels():
    rows = _sparse_rows(43, 70)
    for X in (rows.T, np.ascontiguousarray(rows.T)):  # the sample-major view, and pixel-major C order
        full = full_batch(X)
        assert full.X is X and np.array_equal(full.order, support_order(rows))
        assert full.rows.flags.c_contiguous and np.array_equal(full.rows, rows[full.order])
        assert np.array_equal(full.positions, np.arange(43)) and len(full.list_start) == 6 + 1
        for k in range(6):  # groups of 8 rows, the last one of 3
            listed = full.lists[full.list_start[k] : full.list_start[k + 1]]
            assert list(listed) == list(np.flatnonzero(full.rows[8 * k : 8 * k + 8].any(axis=0)))
        assert full.list_start[1] == 0  # the 8 empty samples come first: a group with nothing to visit
        assert full.nonzero_blocks == pytest.approx(len(full.lists) / (6 * 70))
        as_given = full_batch(X, sort=False)  # for measurements: the samples in X's order
        assert np.array_equal(as_given.order, np.arange(43)) and np.array_equal(as_given.rows, rows)


def test_the_mini_batch_index_holds_each_samples_nonzero_pixels():
    rows = _sparse_rows(43, 70, seed=1)
    for X in (rows.T, np.ascontiguousarray(rows.T)):
        samples = samples_of(X)
        assert samples.rows.flags.c_contiguous and np.array_equal(samples.rows, rows)
        assert np.shares_memory(samples.rows, rows) == (X.base is rows)  # the transposed view is used in place
        bits = np.unpackbits(samples.mask.view(np.uint8), axis=1, bitorder="little")[:, :70]
        assert np.array_equal(bits, rows != 0)


def test_a_sorted_and_an_unsorted_full_batch_take_the_same_step(sample):
    pixels, labels = sample[0][:, :1500], sample[1][:1500]
    arch, params = weights((784, 10, 10), "float32")
    results = []
    for sort in (True, False):
        with SinglePassCpu(arch, "float32", 1500, sort=sort) as single:
            results.append(single(params, pixels, None, labels, l2=0.2))
    assert_same_step(results[0], results[1], "float32")
    assert not same_bits(results[0], results[1])  # summed in another order


def test_sorting_the_full_batch_leaves_out_more_blocks_on_mnist(sample):
    # the digits in a random order, as a training split holds them (the bundled sample's file is sorted by label)
    pixels = sample[0][:, np.random.default_rng(0).permutation(sample[0].shape[1])]
    shuffled = np.mean([pixels[:, k : k + 8].any(axis=1).mean() for k in range(0, pixels.shape[1] - 7, 8)])
    assert full_batch(pixels).nonzero_blocks < 0.8 * shuffled


@pytest.mark.parametrize(
    ("arch", "dropout", "dtype", "message"),
    [
        (Architecture((784, 32, 16, 10)), 0.0, "float32", "exactly one hidden layer"),
        (Architecture((784, 10, 10), "sigmoid"), 0.0, "float32", "ReLU hidden layer and a softmax output"),
        (Architecture((4, 3, 1), "relu", "sigmoid"), 0.0, "float32", "ReLU hidden layer and a softmax output"),
        (Architecture((784, 10, 10)), 0.5, "float32", "no dropout"),
        (Architecture((784, 10, 10)), 0.0, "float16", "float32 or float64"),
        (Architecture((784, 10, 17)), 0.0, "float32", "at most 16 classes"),
    ],
    ids=["two-hidden", "sigmoid", "sigmoid-output", "dropout", "float16", "17-classes"],
)
def test_what_the_pass_refuses(arch, dropout, dtype, message):
    assert not supports(arch, dropout=dropout, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        if dropout:
            with SinglePassCpu(arch, dtype, 100) as single:
                X = np.zeros((784, 4), np.uint8)
                single(init_params(arch, init="he", seed=0, dtype=dtype), X, None, np.zeros(4, int), dropout=dropout,
                       rng=np.random.default_rng(0))
        else:
            SinglePassCpu(arch, dtype, 100)


# gpunn's command line in a child: with Numba's compiler off (NUMBA_DISABLE_JIT=1, a way to debug Numba code: the
# kernels are plain functions, which cannot run their vector operations), or with a Numba that does not import
# (built for another NumPy, say; `import numba` then raises ImportError)
_CLI_CHILD = textwrap.dedent("""
    import sys
    if sys.argv.pop(1) == "no-import":
        sys.modules["numba"] = None
    from gpunn.cli import main
    main(sys.argv[1:], prog_name="gpunn")
""")
_WITHOUT_NUMBA = {  # how, the environment, what the train header's step line says, what `gpunn info` says
    "compiler-off": ({"NUMBA_DISABLE_JIT": "1"}, "NUMBA_DISABLE_JIT", "single pass: off: NUMBA_DISABLE_JIT is set"),
    "no-import": ({}, "needs Numba, which does not import", "single pass: unavailable: Numba does not import"),
}


@pytest.mark.parametrize("command", ["info", "train"])
@pytest.mark.parametrize("how", list(_WITHOUT_NUMBA))
def test_without_a_working_numba_a_run_takes_the_blas_pass_and_says_why(tmp_path, how, command):
    """gpunn still imports, `gpunn info` says why the single pass is off, and `gpunn train` takes the fused BLAS
    pass, its header saying why."""
    env, in_step, in_info = _WITHOUT_NUMBA[how]
    args = ["info"] if command == "info" else ["train", "--device", "cpu", "--epochs", "1", "--out",
                                               str(tmp_path / "model.npz")]
    done = subprocess.run([sys.executable, "-c", _CLI_CHILD, how, *args], cwd=tmp_path,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if command == "info":
        assert in_info in done.stdout
    else:
        step = next(line for line in done.stdout.splitlines() if line.startswith("step:"))
        assert "fused CPU pass" in step and in_step in step
        assert (tmp_path / "model.npz").is_file()


def test_what_the_pass_refuses_to_read(sample):
    """The kernel reads without bounds checks, so what it would index with is checked before it runs."""
    pixels, labels = sample[0][:, :50], sample[1][:50]
    arch, params = weights((784, 10, 10), "float32")
    with SinglePassCpu(arch, "float32", 100) as single:
        with pytest.raises(ValueError, match="uint8 pixels"):
            single(params, pixels.astype(np.float32), None, labels)
        with pytest.raises(ValueError, match="at most 100 samples"):
            single(params, sample[0][:, :200], None, sample[1][:200])
        with pytest.raises(ValueError, match=r"sample numbers must lie in 0\.\.49"):
            single(params, pixels, None, labels, index=np.array([3, 50]))
        bad = labels.copy()
        bad[7] = 10
        with pytest.raises(ValueError, match="one label in 0..9 per column"):
            single(params, pixels, None, bad)
        with pytest.raises(ValueError, match="one label in 0..9 per column"):
            single(params, pixels, None, labels[:49])
        with pytest.raises(ValueError, match="shapes"):
            single(weights((784, 12, 10), "float32")[1], pixels, None, labels)


def test_threads_follow_the_cores_and_the_work(monkeypatch):
    assert supports(Architecture((784, 10, 10)))
    monkeypatch.setattr(numba_cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(numba_cpu, "MIN_WORK_PER_THREAD", 1024)
    work = 1024
    assert threads_for(60_000, 10) == min(2, numba.config.NUMBA_NUM_THREADS)
    assert threads_for(60_000, 10, cores=1) == 1
    assert threads_for(2 * work - 1, 10) == 1  # a small batch does not wake a second thread
    assert threads_for(64, 10) == 1
    # a wider layer has more work per sample: 2 * work / 4 samples of 64 hidden units keep two threads busy
    assert threads_for(2 * work // 4, 64) == min(2, numba.config.NUMBA_NUM_THREADS)


def test_a_compiled_variant_needs_no_compile(sample):
    arch, params = weights((784, 10, 10), "float32")
    for threads in (1, 2):
        with SinglePassCpu(arch, "float32", 500, threads=threads) as single:
            single(params, sample[0][:, :500], None, sample[1][:500])
        assert needs_compile("float32", threads=single.threads) is False


def test_a_run_on_one_thread_calls_the_kernel_without_a_parallel_region(sample):
    """Its own kernel, the same bits as the parallel kernel's for a step of one chunk."""
    pixels, labels = sample[0][:, :40], sample[1][:40]
    arch, params = weights((784, 24, 10), "float32")
    batch = np.arange(3, 40, 2)
    results = []
    for threads in (1, 2):  # 40 samples are one chunk either way; the run of 1,000 would use two threads
        with SinglePassCpu(arch, "float32", 1000, threads=threads) as single:
            assert single._kernel is numba_cpu.kernel_for(threads) and single.threads == threads
            results.append((single(params, pixels, None, labels, l2=0.1), single(params, pixels, None, labels,
                                                                                    index=batch)))
    assert numba_cpu.kernel_for(1) is not numba_cpu.kernel_for(2)
    (full_one, batch_one), (full_two, batch_two) = results
    assert same_bits(full_one, full_two) and same_bits(batch_one, batch_two)
    assert_same_step(full_one, reference(params, pixels, labels, arch, "float32", 0.1), "float32")


_READ_ONLY_CHILD = textwrap.dedent("""
    import json
    import numpy as np
    import gpunn
    from gpunn import numba_cpu
    from gpunn.data import load_bundled_sample
    from gpunn.nn import Architecture, Layer, init_params, loss_and_gradients, one_hot
    numba_cpu.MIN_WORK_PER_THREAD = 64  # two chunks for 1,001 samples
    needs = numba_cpu.needs_compile("float64")
    narrow_needs = numba_cpu.needs_compile("float64", arch=Architecture((784, 6, 10)))
    data = load_bundled_sample()
    pixels, labels = data.train_images[:1001].T, data.train_labels[:1001].astype(np.int64)
    report = {"package": gpunn.__file__, "needs_compile": needs, "narrow_needs_compile": narrow_needs,
              "cache_dir": numba_cpu.cache_dir(), "steps": []}
    for hidden, l2, threads in ((10, 0.0, 1), (40, 0.7, 2), (6, 0.3, 2)):  # the last one: the narrow kernel
        arch = Architecture((784, hidden, 10))
        params = [Layer(W, b + 0.01) for W, b in init_params(arch, init="he", seed=1, dtype="float64")]
        with numba_cpu.SinglePassCpu(arch, "float64", 1001, threads=threads) as single:
            loss, accuracy, grads = single(params, pixels, None, labels, l2=l2)
        ref_loss, ref_accuracy, ref_grads = loss_and_gradients(params, pixels / 255.0, one_hot(labels, 10, np.float64),
                                                               labels, arch, l2=l2)
        error = max(float(np.abs(a - b).max() / np.abs(b).max())
                    for g, r in zip(grads, ref_grads) for a, b in zip(g, r))
        report["steps"].append({"threads": single.threads, "dtype": str(loss.dtype), "loss": float(loss),
                                "ref_loss": float(ref_loss), "same_accuracy": bool(accuracy == ref_accuracy),
                                "error": error})
    print(json.dumps(report))
""")


_NEEDS_COMPILE_CHILD = textwrap.dedent("""
    import json
    from gpunn import numba_cpu
    from gpunn.nn import Architecture
    print(json.dumps([numba_cpu.needs_compile("float64"),
                      numba_cpu.needs_compile("float64", arch=Architecture((784, 6, 10)))]))
""")


def test_float64_from_a_package_directory_that_cannot_be_written(tmp_path):
    """A copy of the package whose directory cannot take Numba's cache (read-only; as root, whom permissions do not
    stop, its __pycache__ is a file): the float64 kernels compile, match the generic math (one and two threads, L2,
    1,001 samples; both kernels), cache under the user-wide directory, and a second interpreter loads them from
    there; once numba_vectors.py is edited, they would compile again."""
    package = tmp_path / "site" / "gpunn"
    shutil.copytree(Path(numba_cpu.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    if os.geteuid() == 0:
        (package / "__pycache__").write_text("")
    else:
        for path in (package, *package.rglob("*")):
            path.chmod(0o555 if path.is_dir() else 0o444)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(package.parent), XDG_CACHE_HOME=str(tmp_path / "cache"))
    runs = []
    try:
        for _ in range(2):
            done = subprocess.run([sys.executable, "-c", _READ_ONLY_CHILD], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            runs.append(json.loads(done.stdout))
    finally:
        for path in (package, *package.rglob("*")):
            if path.is_dir():
                path.chmod(0o755)
    first, second = runs
    assert Path(first["package"]).parent == package
    assert Path(first["cache_dir"]).is_relative_to(tmp_path / "cache" / "numba")
    assert first["needs_compile"] is True and second["needs_compile"] is False
    assert first["narrow_needs_compile"] is True and second["narrow_needs_compile"] is False
    assert any(Path(first["cache_dir"]).glob("numba_cpu._step-*.nbc"))
    assert any(Path(first["cache_dir"]).glob("numba_narrow._step-*.nbc"))
    assert not list(package.rglob("*.nbi"))
    assert [step["threads"] for step in first["steps"]] == [1, 2, 2]
    for step in first["steps"]:
        assert step["dtype"] == "float64" and step["same_accuracy"]
        assert step["loss"] == pytest.approx(step["ref_loss"], rel=1e-10) and step["error"] < 1e-10
    assert second["steps"] == first["steps"]
    # the kernels inline numba_vectors' operations: an edit of that file alone makes both compile again
    vectors = package / "numba_vectors.py"
    vectors.chmod(0o644)
    vectors.write_text(vectors.read_text() + "\n# an edit\n")
    asked = subprocess.run([sys.executable, "-c", _NEEDS_COMPILE_CHILD], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout) == [True, True]
