"""The single pass (gpunn/kernels/single_pass.cu, driven by gpunn.fused_cuda.SinglePassCudaPass, SinglePassGraphStep
and single_pass_step) against the generic math on X / 255: one pass on real digits (odd m, a last partial tile,
h = 1, 10, 16, with and without L2, float32 and float64), every load width and an unaligned X, small blocks, the
bits of two runs and the sums of other grids, ten epochs of the runner, the recorded graph, and the training loop
keeping X as uint8 pixels. Each test runs on the emulated device (the unchanged .cu source on CPU threads) and,
where marked ``gpu``, on CuPy where a GPU answers (skipped with the reason elsewhere). ThreadSanitizer runs the pass
in tests/test_kernels.py (tests/cuda_on_cpu/tsan_scenario.py), with every other kernel."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from conftest import EmulatedCudaBackend, cuda_backend_or_skip
from cuda_on_cpu import TEST_CONFIG, EmulatedDevice, RecordedGraph, build_all
from gpunn.backend import get_backend
from gpunn.data import Dataset, load_bundled_sample, split
from gpunn.fused_cuda import (
    CUPY_ADDED_OPTIONS,
    RAWMODULE_OPTIONS,
    CupyDevice,
    FusedCudaUpdate,
    LaunchConfig,
    SinglePassCudaPass,
    SinglePassGraphStep,
    _SinglePass,
    kernel_signatures,
    kernel_source,
    module_options,
    single_pass_block,
    single_pass_limits,
    single_pass_step,
    single_pass_unsupported,
)
from gpunn.nn import Architecture, Layer, init_params, loss_and_gradients, one_hot
from gpunn.optim import Optimizer, learning_rate
from gpunn.train import TrainConfig, fit
from test_fused_cuda import (TOLERANCE, Host, assert_close, assert_graph_stays_in_its_buffers, assert_ten_epochs,
                             generic_epochs, run_epochs)

DTYPES = ["float32", "float64"]


@pytest.fixture(params=["emulated", pytest.param("cupy", marks=pytest.mark.gpu)])
def host(request):
    if request.param == "emulated":
        reason = build_all()
        if reason is not None:
            pytest.skip(reason)
        return Host(EmulatedDevice())
    backend = cuda_backend_or_skip()
    return Host(CupyDevice(backend.cupy), backend.cupy)


@pytest.fixture
def emulated():
    reason = build_all()
    if reason is not None:
        pytest.skip(reason)
    return Host(EmulatedDevice())


@pytest.fixture(scope="module")
def digits():
    """The bundled sample's pixels (784, 5000) uint8, one digit per column, and its labels."""
    data = load_bundled_sample()
    return np.ascontiguousarray(data.train_images.T), data.train_labels.astype(np.int64)


def pixels(digits, m, first=0):
    """m real digits, with three made harder: a blank one, a saturated one (every pixel 255: the largest sums),
    and one whose only nonzero pixel is the last (a pixel the tile's other samples never touch)."""
    X, y = digits
    X = np.array(X[:, first : first + m])
    X[:, 5] = 0
    X[:, 7] = 255
    X[:, 11] = 0
    X[-1, 11] = 200
    return np.ascontiguousarray(X), np.ascontiguousarray(y[first : first + m])


def start(sizes, dtype, seed=1):
    arch = Architecture(sizes)
    return arch, [Layer(W, b + 0.01) for W, b in init_params(arch, init="he", seed=seed, dtype=dtype)]


def reference(params, X8, y, arch, dtype, l2=0.0):
    """gpunn.nn.loss_and_gradients on X / 255, as the training loop computes it on the CPU."""
    X = X8.astype(dtype) / 255
    return loss_and_gradients(params, X, one_hot(y, arch.sizes[-1], np.dtype(dtype)), y, arch, l2=l2)


def run_pass(host, arch, dtype, params, X8, y, *, l2=0.0, columns=None):
    with SinglePassCudaPass(arch, dtype, columns or X8.shape[1], device=host.device) as single:
        loss, acc, grads = single(host.layers_up(params), host.up(X8), None, host.up(y), l2=l2)
    return host.down(loss), host.down(acc), host.layers_down(grads)


def assert_matches(result, expected, dtype):
    loss, acc, grads = result
    ref_loss, ref_acc, ref_grads = expected
    assert loss.shape == acc.shape == () and loss.dtype == acc.dtype == np.dtype(dtype)
    np.testing.assert_allclose(loss, ref_loss, **TOLERANCE[dtype])
    assert acc == ref_acc  # the same predictions, counted exactly
    for (dW, db), (ref_dW, ref_db) in zip(grads, ref_grads, strict=True):
        assert dW.shape == ref_dW.shape and db.shape == ref_db.shape and dW.dtype == ref_dW.dtype
        assert_close(dW, ref_dW, dtype)
        assert_close(db, ref_db, dtype)


# --- what NVRTC makes of it -------------------------------------------------------------------------------------


def test_launch_bounds_and_static_shared_memory_reach_the_ptx(nvrtc):
    """The launch bounds are declared apart from the definitions (single_pass.cu says why); they must still reach
    the compiled kernels: 256 threads at most, two blocks per SM for float32 up to 14 units. And every pass stays
    within the 48 KB of static shared memory that any GPU gives a block without an opt-in. (tests/test_kernels.py
    compiles every kernel file, this one included, for compute_80, compute_90 and sm_90; NVRTC runs each compile
    once per session, see tests/cuda_on_cpu/nvrtc.py.)"""
    ptx, log = nvrtc.compile(kernel_source("single_pass.cu"), "single_pass.cu",
                             RAWMODULE_OPTIONS + CUPY_ADDED_OPTIONS + ("-arch=compute_90",))
    assert "warning" not in log.lower(), log
    entries = re.findall(r"\.entry (single_pass_h(\d+)_(f32|f64))\((.*?)\n\}", ptx.decode(), re.S)
    assert len(entries) == 16
    for name, hp, suffix, body in entries:
        assert ".maxntid 256, 1, 1" in body, name
        minimum = 2 if suffix == "f32" and int(hp) <= 14 else 1
        assert f".minnctapersm {minimum}" in body, name
        shared = sum(int(size) for size in re.findall(r"\.shared \.align \d+ \.b8 \w+\[(\d+)\]", body))
        assert 40_000 < shared <= 48 * 1024, (name, shared)


def test_each_single_pass_kernel_comes_from_a_module_of_its_own_hidden_size(nvrtc):
    """CupyDevice loads a kernel of single_pass.cu from a module compiled with fused_cuda.module_options: the passes
    of that hidden size alone, with prepare and reduce (SP_ONLY_HP=0: those two alone), so that a first run compiles
    two of the 16 passes. Every kernel is in the module it is asked from, and no other size's pass is."""
    signatures = kernel_signatures()
    single_pass = [info for info in signatures.values() if info.file == "single_pass.cu"]
    common = {name for name in (info.name for info in single_pass) if not re.match(r"single_pass_h\d+_", name)}
    assert common == {f"single_pass_{kind}_{suffix}" for kind in ("prepare", "reduce") for suffix in ("f32", "f64")}
    modules: dict[tuple[str, ...], set[str]] = {}
    for info in single_pass:
        modules.setdefault(module_options(info), set()).add(info.name)
    assert len(modules) == 9 and modules[("-DSP_ONLY_HP=0",)] == common
    for options, asked in modules.items():
        ptx, log = nvrtc.compile(kernel_source("single_pass.cu"), "single_pass.cu",
                                 RAWMODULE_OPTIONS + CUPY_ADDED_OPTIONS + options + ("-arch=compute_90",))
        assert "warning" not in log.lower(), log
        entries = set(re.findall(r"\.entry\s+(\w+)", ptx.decode()))
        assert entries == asked | common, options
    assert module_options(signatures["update_f32"]) == ()


# --- one pass -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h", [1, 10, 16])
@pytest.mark.parametrize("l2", [0.0, 0.7])
def test_one_pass_matches_the_generic_pass_on_pixels_over_255(host, digits, dtype, h, l2):
    """784-h-10 on 333 real digits: 11 tiles, the last of 13 samples, on blocks that run several tiles each. h = 1
    runs the padded unit; h = 16 in float64 adds the forward slices' sums in rounds of 3 (scratch holds 3 slices)."""
    arch, params = start((784, h, 10), dtype)
    X8, y = pixels(digits, 333)
    assert_matches(run_pass(host, arch, dtype, params, X8, y, l2=l2), reference(params, X8, y, arch, dtype, l2),
                   dtype)


@pytest.mark.parametrize(("m", "offset", "width"), [(352, 0, 16), (328, 0, 8), (324, 0, 4), (333, 0, 1), (352, 3, 1)],
                         ids=["16-byte", "8-byte", "4-byte", "byte", "unaligned"])
def test_every_load_width_and_an_unaligned_x(emulated, digits, m, offset, width):
    """Each 16-byte chunk of a pixel row is loaded as widely as its address allows: every chunk in one 16-byte
    load when m is a multiple of 16; every other row in two 8-byte loads when m is 8 mod 16 (as for 59,000); 4 bytes
    or single bytes out of line otherwise, and for the last samples of each row. `width` is the widest load that
    every chunk could use; an X that starts 3 bytes into its buffer gets only byte loads."""
    arch, params = start((784, 10, 10), "float32")
    X8, y = pixels(digits, m)
    buffer = emulated.device.empty((X8.size + offset,), np.uint8)
    X = buffer[offset:].reshape(X8.shape)
    X[...] = X8
    address = X.ctypes.data
    assert max(w for w in (16, 8, 4, 1) if m % w == 0 and address % w == 0) == width
    with SinglePassCudaPass(arch, "float32", m, device=emulated.device) as single:
        loss, acc, grads = single(emulated.layers_up(params), X, None, emulated.up(y))
    assert_matches((loss, acc, grads), reference(params, X8, y, arch, "float32"), "float32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n0", "threads"), [(48, 16), (100, 32), (200, 64)])
def test_small_inputs_run_on_smaller_blocks(host, dtype, n0, threads):
    """Fewer inputs take fewer threads (on the emulator, whose LaunchConfig.block is 8): one forward slice of 16, or
    2 and 4 of them; the pixels past 3 x threads (4 of 100, 8 of 200) have their dW1 kept in shared memory."""
    rng = np.random.default_rng(n0)
    X8 = ((rng.random((n0, 75)) < 0.25) * rng.integers(1, 256, (n0, 75))).astype(np.uint8)
    X8[-3:, :] = rng.integers(0, 256, (3, 75))  # the leftover pixels are busy
    y = rng.integers(0, 5, 75).astype(np.int64)
    arch, params = start((n0, 7, 5), dtype, seed=n0)
    if not isinstance(host.device, EmulatedDevice):
        threads = 256  # a GPU runs every pass on LaunchConfig().block threads
    assert single_pass_block(n0, host.device.config) == threads
    assert_matches(run_pass(host, arch, dtype, params, X8, y, l2=0.2), reference(params, X8, y, arch, dtype, 0.2),
                   dtype)


def test_a_label_out_of_range_makes_the_loss_nan_and_nothing_else(emulated, digits):
    arch, params = start((784, 6, 10), "float64")
    X8, y = pixels(digits, 40)
    bad = y.copy()
    bad[3] = 12
    loss, acc, grads = run_pass(emulated, arch, "float64", params, X8, bad)
    assert np.isnan(loss)
    # the sample's dZ2 is P with no 1 subtracted, as one_hot gives an out-of-range label no 1
    ref_loss, ref_acc, ref_grads = reference(params, X8, bad, arch, "float64")
    assert acc == ref_acc
    assert_close(grads[0].W, ref_grads[0].W, "float64")
    assert_close(grads[1].b, ref_grads[1].b, "float64")


def test_a_pass_takes_smaller_batches_and_refuses_what_it_cannot_compute(emulated, digits):
    arch, params = start((784, 10, 10), "float32")
    X8, y = pixels(digits, 100)
    device = emulated.device
    with SinglePassCudaPass(arch, "float32", 100, device=device) as single:
        on_device = emulated.layers_up(params)
        part = single(on_device, emulated.up(X8[:, :37]), None, emulated.up(y[:37]))
        with pytest.raises(ValueError, match="made for 1 to 100 columns, got 101"):
            single(on_device, emulated.up(np.zeros((784, 101), np.uint8)), None, emulated.up(np.zeros(101, np.int64)))
        with pytest.raises(ValueError, match="X must be the C-contiguous uint8 pixels"):
            single(on_device, emulated.up(X8 / 255), None, emulated.up(y))
        with pytest.raises(ValueError, match="no dropout"):
            single(on_device, emulated.up(X8), None, emulated.up(y), dropout=0.5)
    part = (emulated.down(part[0]), emulated.down(part[1]), emulated.layers_down(part[2]))
    assert_matches(part, reference(params, np.ascontiguousarray(X8[:, :37]), y[:37], arch, "float32"), "float32")


@pytest.mark.parametrize(("sizes", "dtype", "dropout", "why"), [
    ((784, 32, 10), "float32", 0.0, "at most 16 hidden units, not 32"),
    ((784, 16, 16, 10), "float32", 0.0, "exactly one hidden layer, not 2"),
    ((785, 10, 10), "float32", 0.0, "at most 784 inputs"),
    ((784, 10, 17), "float32", 0.0, "at most 16 classes, not 17"),
    ((784, 10, 10), "float16", 0.0, "float32 or float64, not float16"),
    ((784, 10, 10), "float32", 0.5, "no dropout"),
])
def test_networks_it_does_not_compute_get_no_single_pass(sizes, dtype, dropout, why):
    arch = Architecture(sizes)
    assert why in single_pass_unsupported(arch, dtype=dtype, dropout=dropout)
    assert single_pass_step(arch, dtype=dtype, columns=100, dropout=dropout, device=EmulatedDevice()) is None
    if dtype in DTYPES and not dropout:
        with pytest.raises(ValueError, match=re.escape(why)):
            SinglePassCudaPass(arch, dtype, 100, device=EmulatedDevice())
    sigmoid = Architecture((784, 10, 10), "sigmoid")
    assert "ReLU hidden layers" in single_pass_unsupported(sigmoid, dtype="float32", dropout=0.0)


# --- determinism and the grid --------------------------------------------------------------------------------------


def test_two_runs_give_identical_bits(host, digits):
    arch, params = start((784, 10, 10), "float32")
    X8, y = pixels(digits, 300)
    runs = []
    for _ in range(2):
        loss, acc, grads = run_pass(host, arch, "float32", params, X8, y, l2=0.1)
        runs.append(loss.tobytes() + acc.tobytes() + b"".join(W.tobytes() + b.tobytes() for W, b in grads))
    assert runs[0] == runs[1]


def test_other_grids_group_the_sums_otherwise_and_agree_to_rounding(digits):
    """1 to 11 blocks for 11 tiles: each grid adds the samples' contributions in other groups, so the sums agree to
    float32 rounding, not bit for bit; each is still within the generic code's tolerance."""
    reason = build_all()
    if reason is not None:
        pytest.skip(reason)
    arch, params = start((784, 10, 10), "float32")
    X8, y = pixels(digits, 333)
    results, blocks = [], []
    for resident in (1, 2, 5, 11):
        host = Host(EmulatedDevice(replace(TEST_CONFIG, reduce_blocks=resident)))
        with SinglePassCudaPass(arch, "float32", 333, device=host.device) as single:
            loss, acc, grads = single(host.layers_up(params), host.up(X8), None, host.up(y))
            blocks.append(single.sp.blocks_for(333))
        results.append((host.down(loss), host.down(acc), host.layers_down(grads)))
    assert blocks == [1, 2, 4, 11]  # 11 tiles on 5 resident blocks: 3 rounds either way, so 4 blocks do
    for loss, acc, grads in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
        assert acc == results[0][1]
        for (dW, db), (dW0, db0) in zip(grads, results[0][2]):
            np.testing.assert_allclose(dW, dW0, rtol=1e-5, atol=1e-7 * np.abs(dW0).max())
            np.testing.assert_allclose(db, db0, rtol=1e-5, atol=1e-7 * np.abs(db0).max())
    for result in results:
        assert_matches(result, reference(params, X8, y, arch, "float32"), "float32")


def test_the_grid_evens_out_the_tiles():
    """A GPU's 264 resident blocks (132 SMs x 2) and full MNIST: 60,000 samples are 1,875 tiles, 8 rounds, so 235
    blocks of 8 tiles; 59,000 (gpunn's split) are 1,844 tiles, 7 rounds on all 264 blocks."""
    device = EmulatedDevice(replace(TEST_CONFIG, reduce_blocks=264))
    sp = _SinglePass(Architecture((784, 10, 10)), "float32", device, 60_000)
    assert (sp.blocks_for(60_000), sp.blocks_for(59_000), sp.blocks_for(1), sp.blocks_for(33)) == (235, 264, 1, 2)
    assert sp.block == 256 and sp.kernel == "single_pass_h10_f32" and sp.max_blocks == 235
    assert single_pass_block(784, LaunchConfig()) == 256 and single_pass_block(784, TEST_CONFIG) == 256
    with pytest.raises(ValueError, match="needs 512 threads per block for 800 inputs; at most 256"):
        single_pass_block(800, TEST_CONFIG)
    assert single_pass_limits()["TILE"] == 32


def test_the_gpu_device_sizes_the_grid_from_the_drivers_occupancy(monkeypatch):
    """CupyDevice.resident_blocks on a stand-in for CuPy's API as CuPy 13/14 have it: RawModule.get_function gives
    a RawKernel whose CUfunction handle is ``.kernel.ptr``, and the driver's occupancy call takes that handle."""
    from types import SimpleNamespace

    import gpunn.fused_cuda as fused_cuda

    calls = []

    class RawModule:
        def __init__(self, code, options):
            assert "single_pass_h10_f32" in code and options == fused_cuda.RAWMODULE_OPTIONS + ("-DSP_ONLY_HP=10",)

        def get_function(self, name):
            return SimpleNamespace(kernel=SimpleNamespace(ptr=0xBEEF), max_threads_per_block=256)

    def occupancy(handle, block, dynamic_shared):
        calls.append((handle, block, dynamic_shared))
        return 2

    device_attributes = SimpleNamespace(id=0, attributes={"MultiProcessorCount": 132})
    cupy = SimpleNamespace(RawModule=RawModule, cuda=SimpleNamespace(
        Device=lambda: device_attributes, driver=SimpleNamespace(occupancyMaxActiveBlocksPerMultiprocessor=occupancy)))
    monkeypatch.setattr(fused_cuda, "_MODULES", {})  # the stand-in's modules must not outlive the test
    assert CupyDevice(cupy).resident_blocks("single_pass_h10_f32", 256) == 264
    assert calls == [(0xBEEF, 256, 0)]


# --- the two small kernels ------------------------------------------------------------------------------------------


@pytest.fixture(params=["emulated", pytest.param("cupy", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cupy":
        return CupyDevice(cuda_backend_or_skip().cupy)
    reason = build_all()
    if reason is not None:
        pytest.skip(reason)
    return EmulatedDevice()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [8, 256])
@pytest.mark.parametrize("rows", [13, 75])
def test_the_reduction_adds_the_rows_and_divides_dw1_by_255(device, dtype, threads, rows):
    """On 8 threads a column is one thread; on 256 (a GPU's), 8 lanes per column and a tree of three rounds; 3
    blocks for 500 sums: each block takes several groups of columns. A lane reads 8 of its rows at once and the rest
    one by one: 75 rows are 9 and 10 per lane on 8 lanes, 75 on one."""
    part = np.random.default_rng(4).standard_normal((rows, 500)).astype(dtype)
    G = device.empty((500,), dtype)
    suffix = {"float32": "f32", "float64": "f64"}[dtype]
    device.launch(f"single_pass_reduce_{suffix}", 3, threads,
                  (device.upload(part), np.int32(rows), np.int64(500), np.int64(120), G))
    expected = part.sum(axis=0, dtype=np.float64)
    expected[:120] /= 255
    got = G.get() if hasattr(G, "get") else np.asarray(G)
    # summed in double: float32 sums are within one rounding of float32, float64 ones within a few of the largest
    tolerance = {"rtol": 1e-6} if dtype == "float32" else {"rtol": 1e-13, "atol": 1e-15}
    np.testing.assert_allclose(got, expected.astype(dtype), **tolerance)
    if threads == 8:  # one lane per column: the rows in order, one at a time, whatever the loads' grouping
        in_order = np.cumsum(part.astype(np.float64), axis=0)[-1]
        in_order[:120] /= 255
        np.testing.assert_array_equal(got, in_order.astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepare_transposes_w1_and_pads_it_with_zeros(device, dtype):
    P = np.random.default_rng(5).standard_normal(7 * 30 + 50).astype(dtype)  # W1 (7, 30), then the rest
    W1T = device.empty((30 * 8,), dtype)
    suffix = {"float32": "f32", "float64": "f64"}[dtype]
    device.launch(f"single_pass_prepare_{suffix}", 2, 32, (device.upload(P), np.int32(30), np.int32(7), np.int32(8),
                                                          W1T))
    got = (W1T.get() if hasattr(W1T, "get") else np.asarray(W1T)).reshape(30, 8)
    np.testing.assert_array_equal(got[:, :7], P[: 7 * 30].reshape(7, 30).T)
    assert (got[:, 7] == 0).all()


# --- whole epochs ---------------------------------------------------------------------------------------------------


def make_runner(host, arch, dtype, rule, l2, rates, data, val, capacity=16, **options):
    """A runner on uint8 training pixels, with the validation set as the loop prepares it: floats, X / 255."""
    device_val = None if val is None else (host.up(val[0].astype(dtype) / 255), host.up(val[1]))
    return SinglePassGraphStep(arch, dtype, rule, l2, rates, (host.up(data[0]), host.up(data[1])), device_val,
                               capacity, host.device, **options)


CASES = {
    "gd-constant-l2": ((784, 10, 10), "float32", Optimizer("gd"), 0.1, "constant", 0.3),
    "adam-cosine-odd-h": ((784, 13, 10), "float32", Optimizer("adam"), 0.0, "cosine", 0.01),
    "momentum-step-l2-float64": ((784, 6, 10), "float64", Optimizer("momentum"), 0.05, "step", 0.2),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_ten_epochs_end_where_the_generic_code_ends(host, digits, case):
    sizes, dtype, rule, l2, schedule, lr = CASES[case]
    arch, params = start(sizes, dtype)
    rates = [learning_rate(schedule, lr, e, 10, step_size=4, gamma=0.5) for e in range(1, 11)]
    data, val = pixels(digits, 301), pixels(digits, 97, first=301)
    as_floats = (data[0].astype(dtype) / 255, data[1])
    ref_params, ref_state, ref_rows = generic_epochs(arch, params, rule.init(params), as_floats,
                                                     (val[0].astype(dtype) / 255, val[1]), rule, l2, rates, 1, 10)
    with make_runner(host, arch, dtype, rule, l2, rates, data, val) as runner:
        assert runner.name == SinglePassGraphStep.GRAPH_NAME
        got_params, got_state = run_epochs(host, runner, params, rule.init(params), 1, 10)
        rows = host.down(runner.metrics)
    assert_ten_epochs(rows, got_params, got_state, ref_rows, ref_params, ref_state, dtype, rule, samples=97)


def test_two_runs_of_three_epochs_give_identical_bits(host, digits):
    arch, params = start((784, 8, 10), "float32")
    data, val = pixels(digits, 257), pixels(digits, 64, first=257)
    runs = []
    for _ in range(2):
        with make_runner(host, arch, "float32", Optimizer("gd"), 0.2, [0.1] * 3, data, val) as runner:
            final, _ = run_epochs(host, runner, params, {}, 1, 3)
            runs.append(host.down(runner.metrics).tobytes() + b"".join(W.tobytes() + b.tobytes() for W, b in final))
    assert runs[0] == runs[1]


def test_the_recorded_epoch_writes_only_the_runners_buffers_and_replays_without_allocating(emulated, digits):
    device = emulated.device
    arch, params = start((784, 10, 10), "float32")
    rule = Optimizer("adam")
    data, val = pixels(digits, 120), pixels(digits, 30, first=120)
    inputs_on_device = [emulated.up(data[0]), emulated.up(data[1]), emulated.up(val[0] / np.float32(255)),
                        emulated.up(val[1])]
    first_buffer = len(device.allocations)
    runner = SinglePassGraphStep(arch, "float32", rule, 0.1, [0.01] * 3, tuple(inputs_on_device[:2]),
                                 tuple(inputs_on_device[2:]), 3, device)
    static = set(range(first_buffer, len(device.allocations)))
    runner.load(emulated.layers_up(params), {k: emulated.layers_up(v) for k, v in rule.init(params).items()},
                epochs_done=0)
    graph = runner._graph
    assert isinstance(graph, RecordedGraph) and graph.ops
    names = [op.name for op in graph.ops]
    assert names[1:4] == ["single_pass_prepare_f32", "single_pass_h10_f32", "single_pass_reduce_f32"]
    assert {op.kind for op in graph.ops} == {"launch", "gemm"}  # the validation pass's GEMMs; no copies
    assert_graph_stays_in_its_buffers(device, runner, graph, static, first_buffer)


def test_a_failed_capture_falls_back_to_launching_each_epoch_with_the_same_bits(digits):
    reason = build_all()
    if reason is not None:
        pytest.skip(reason)

    class NoGraphs(EmulatedDevice):
        def capture(self, enqueue):
            raise RuntimeError("operation not permitted when stream is capturing")

    arch, params = start((784, 6, 10), "float32")
    data = pixels(digits, 90)
    results = []
    for device in (EmulatedDevice(), NoGraphs()):
        host = Host(device)
        with make_runner(host, arch, "float32", Optimizer(), 0.1, [0.1] * 3, data, None) as runner:
            final, _ = run_epochs(host, runner, params, {}, 1, 3)
            results.append((runner.name, host.down(runner.metrics).tobytes(), final[0].W.tobytes()))
    assert results[0][0] == SinglePassGraphStep.GRAPH_NAME
    assert results[1][0] == (f"{SinglePassGraphStep.EAGER_NAME} (CUDA graph capture failed: operation not permitted "
                             "when stream is capturing)")
    assert results[0][1:] == results[1][1:]


def test_the_runner_takes_pixels_for_training_and_floats_for_validation(emulated, digits):
    arch, _ = start((784, 8, 10), "float32")
    data = pixels(digits, 50)
    with pytest.raises(ValueError, match="training data: X must be the C-contiguous uint8 pixels"):
        SinglePassGraphStep(arch, "float32", Optimizer(), 0.0, [0.1], (emulated.up(data[0] / 255),
                            emulated.up(data[1])), None, 4, emulated.device)
    with pytest.raises(ValueError, match="validation data: X must be a C-contiguous float32"):
        SinglePassGraphStep(arch, "float32", Optimizer(), 0.0, [0.1], (emulated.up(data[0]), emulated.up(data[1])),
                            (emulated.up(data[0]), emulated.up(data[1])), 4, emulated.device)


# --- through the training loop ------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [None, 128], ids=["full-batch", "mini-batches"])
def test_training_keeps_the_pixels_as_uint8_and_ends_where_the_generic_run_ends(batch_size):
    """gpunn.fit with the single pass: full batches run SinglePassGraphStep, mini-batches the gradient pass on
    the uint8 columns the loop gathers; both end where the generic CPU code ends (same seed, same batches)."""
    reason = build_all()
    if reason is not None:
        pytest.skip(reason)
    data = load_bundled_sample()
    small = Dataset(data.source, data.train_images[:420], data.train_labels[:420])
    parts = split(small, val_size=100, seed=0)
    config = TrainConfig(hidden=(10,), epochs=3, lr=0.5, batch_size=batch_size, optimizer="momentum", l2=0.1)
    backend = EmulatedCudaBackend()  # gpunn.fused_cuda.cuda_step's choice, as CupyBackend makes it
    step = backend.step(config.architecture(784), dtype="float32", columns=config.batch_columns(320))
    assert step.pixels and step.name.startswith("single-pass CUDA kernel over uint8 pixels")
    standardized = backend.step(config.architecture(784), dtype="float32", columns=320, pixels=False)
    assert not standardized.pixels and "single-pass" not in standardized.name
    assert step.update(config.rule).__class__ is FusedCudaUpdate
    ours = fit(parts, config, backend=backend)
    generic = fit(parts, config, backend=get_backend("cpu", fast=False))
    assert ours.model.info["step"] == (SinglePassGraphStep.GRAPH_NAME if batch_size is None else step.name)
    for a, b in zip(ours.history, generic.history, strict=True):
        np.testing.assert_allclose([a.loss, a.val_loss], [b.loss, b.val_loss], rtol=1e-5)
        assert abs(a.train_accuracy - b.train_accuracy) <= 1.01 / 320 and abs(a.val_accuracy - b.val_accuracy) <= 0.011
    for (W, bias), (ref_W, ref_b) in zip(ours.model.params, generic.model.params, strict=True):
        np.testing.assert_allclose(W, ref_W, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(bias, ref_b, rtol=1e-4, atol=1e-6)


# --- on a GPU only --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_on_the_gpu_the_pass_fits_two_blocks_per_sm_and_the_runner_is_a_cuda_graph(digits):
    """The occupancy the grid is sized from (two 256-thread blocks per SM for float32 up to 14 units, as the launch
    bounds ask), and a real CUDA graph whose epochs match the generic code."""
    backend = cuda_backend_or_skip()
    device = CupyDevice(backend.cupy)
    sms = backend.cupy.cuda.Device().attributes["MultiProcessorCount"]
    assert device.resident_blocks("single_pass_h10_f32", 256) == 2 * sms
    host = Host(device, backend.cupy)
    arch, params = start((784, 10, 10), "float32")
    data = pixels(digits, 2000)
    with make_runner(host, arch, "float32", Optimizer(), 0.0, [0.1] * 5, data, None) as runner:
        run_epochs(host, runner, params, {}, 1, 5)
        assert runner.name == SinglePassGraphStep.GRAPH_NAME, runner.name
        assert isinstance(runner._graph, backend.cupy.cuda.Graph)
        rows = host.down(runner.metrics)
    _, _, ref_rows = generic_epochs(arch, params, {}, (data[0].astype("float32") / 255, data[1]), None, Optimizer(),
                                    0.0, [0.1] * 5, 1, 5)
    np.testing.assert_allclose(rows[:5, 0], ref_rows[:, 0], rtol=1e-5)
