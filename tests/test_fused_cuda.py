"""The CUDA fast path's driver (gpunn/fused_cuda.py) against the generic math: one gradient pass, the update rules,
and whole epochs replayed from a captured graph. Each test runs on the emulated device (the unchanged .cu kernels
on CPU threads, NumPy GEMMs) and, marked ``gpu``, on CuPy where a GPU answers (skipped with the reason elsewhere).
Tolerances are tests/test_fused_cpu.py's."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from conftest import cuda_backend_or_skip
from cuda_on_cpu import BuildError, EmulatedDevice, RecordedGraph, build_all, build_cublas_stand_in
from cuda_on_cpu.device import round_to
from gpunn.data import load_bundled_sample
from gpunn.fused_cuda import (
    COMPUTE_TYPES,
    CudaGraphStep,
    Cublas,
    cublas_arguments,
    CupyDevice,
    FusedCudaPass,
    FusedCudaUpdate,
    check_gemm,
    check_launch,
    kernel_signatures,
    loaded_library,
    metrics_row,
    supports,
)
from gpunn.nn import Architecture, Layer, accuracy, cost, forward, init_params, loss_and_gradients, one_hot
from gpunn.optim import OPTIMIZERS, Optimizer, learning_rate

TOLERANCE = {"float32": {"rtol": 2e-4, "atol": 1e-6}, "float64": {"rtol": 1e-10, "atol": 1e-13}}
DTYPES = ["float32", "float64"]


class Host:
    """Moves arrays to and from one device under test."""

    def __init__(self, device, cupy=None):
        self.device, self.cupy = device, cupy

    def up(self, array):
        return self.device.upload(np.ascontiguousarray(array))

    def down(self, array):
        return self.cupy.asnumpy(array) if self.cupy is not None else np.array(array)

    def layers_up(self, layers):
        return [Layer(self.up(W), self.up(b)) for W, b in layers]

    def layers_down(self, layers):
        return [Layer(self.down(W), self.down(b)) for W, b in layers]


@pytest.fixture(params=["emulated", pytest.param("cupy", marks=pytest.mark.gpu)])
def host(request):
    if request.param == "emulated":
        reason = build_all()
        if reason is not None:
            pytest.skip(reason)
        return Host(EmulatedDevice())
    backend = cuda_backend_or_skip()
    return Host(CupyDevice(backend.cupy), backend.cupy)


@pytest.fixture(scope="module")
def sample():
    data = load_bundled_sample()
    return np.ascontiguousarray(data.train_images.T), data.train_labels.astype(np.int64)


def inputs(sample, sizes, dtype, m, first=0):
    pixels, labels = sample
    X = pixels[:, first : first + m].astype(dtype) / 255
    return np.ascontiguousarray(X), np.ascontiguousarray(labels[first : first + m])


def start(sizes, dtype):
    arch = Architecture(sizes)
    return arch, [Layer(W, b + 0.01) for W, b in init_params(arch, init="he", seed=1, dtype=dtype)]  # b != 0 counts


def assert_close(actual, expected, dtype, scale=None):
    tolerance = TOLERANCE[dtype]
    atol = tolerance["atol"] * (np.abs(expected).max() if scale is None else scale)
    np.testing.assert_allclose(actual, expected, rtol=tolerance["rtol"], atol=atol)


# --- one gradient pass -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [(784, 10, 10), (784, 32, 16, 10)], ids=["one-hidden", "two-hidden"])
@pytest.mark.parametrize("l2", [0.0, 0.7])
def test_one_pass_matches_the_generic_pass(host, sample, dtype, sizes, l2):
    arch, params = start(sizes, dtype)
    X, y = inputs(sample, sizes, dtype, m=333)
    Y = one_hot(y, 10, np.dtype(dtype))
    with FusedCudaPass(arch, dtype, 400, device=host.device) as fused:
        loss, acc, grads = fused(host.layers_up(params), host.up(X), host.up(Y), host.up(y), l2=l2)
    ref_loss, ref_acc, ref_grads = loss_and_gradients(params, X, Y, y, arch, l2=l2)
    loss, acc = host.down(loss), host.down(acc)
    assert loss.shape == acc.shape == () and loss.dtype == acc.dtype == np.dtype(dtype)
    np.testing.assert_allclose(loss, ref_loss, **TOLERANCE[dtype])
    assert acc == ref_acc  # the same predictions, counted exactly
    for (dW, db), (ref_dW, ref_db) in zip(host.layers_down(grads), ref_grads, strict=True):
        assert dW.shape == ref_dW.shape and db.shape == ref_db.shape and dW.dtype == ref_dW.dtype
        assert_close(dW, ref_dW, dtype)
        assert_close(db, ref_db, dtype)


#: how far a reduced precision's gradients may be from the float32 math's, relative to the largest: the GEMMs' inputs
#: keep 10 (tf32) or 7 (bf16) mantissa bits, so each product is off by up to 2^-10 or 2^-7 of itself
PRECISION_ATOL = {"tf32": 4e-3, "bf16": 3e-2}


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_a_reduced_precision_pass_is_near_the_generic_pass_but_not_float32(host, sample, precision):
    """The GEMMs on tensor cores: the loss and gradients are the float32 math's to within the inputs' rounding, and
    not the float32 pass's bits (the rounding happened); everything but the GEMMs is unchanged."""
    sizes = (784, 32, 16, 10)
    arch, params = start(sizes, "float32")
    X, y = inputs(sample, sizes, "float32", m=333)
    results = {}
    for run in ("float32", precision):
        with FusedCudaPass(arch, "float32", 333, device=host.device, precision=run) as fused:
            loss, acc, grads = fused(host.layers_up(params), host.up(X), None, host.up(y), l2=0.1)
            results[run] = host.down(loss), host.down(acc), host.layers_down(grads)
    ref_loss, ref_acc, ref_grads = loss_and_gradients(params, X, one_hot(y, 10, np.float32), y, arch, l2=0.1)
    loss, acc, grads = results[precision]
    np.testing.assert_allclose(loss, ref_loss, rtol=PRECISION_ATOL[precision])
    assert abs(acc - ref_acc) <= 3 / 333  # a few samples near a decision boundary may tip
    for (dW, db), (ref_dW, ref_db) in zip(grads, ref_grads, strict=True):
        for got, ref in ((dW, ref_dW), (db, ref_db)):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, ref, rtol=0, atol=PRECISION_ATOL[precision] * np.abs(ref).max())
    assert any(not np.array_equal(a, b) for a, b in zip(results["float32"][2][0], grads[0]))
    if isinstance(host.device, EmulatedDevice):
        assert set(host.device.precisions) == {"float32", precision}


def test_a_reduced_precision_is_for_float32_gemms():
    A = np.ones((2, 3))
    with pytest.raises(ValueError, match="a tf32 GEMM takes float32 operands, not float64"):
        check_gemm(np.ones((2, 2)), A, A.T.copy(), False, False, "tf32")
    with pytest.raises(ValueError, match="unknown GEMM precision 'fp16'; expected one of"):
        check_gemm(*(np.ones((2, 2), np.float32),) * 3, False, False, "fp16")
    with pytest.raises(ValueError, match="compute float64 in float64 and float32 in one of"):
        FusedCudaPass(Architecture((784, 10)), "float64", 10, device=EmulatedDevice(), precision="bf16")


def test_rounding_to_a_tensor_cores_precision():
    """round_to, the emulator's model of what cuBLAS does to a GEMM's inputs: to nearest, ties to even, on the
    mantissa bits TF32 (10) and bfloat16 (7) keep; NaN and the infinities unchanged."""
    x = np.array([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-11 + 2**-20, -(1 + 2**-8), 3 * 2**-8 + 1, np.inf, -np.inf, np.nan,
                  0.0, np.finfo(np.float32).max], np.float32)
    tf32 = round_to("tf32", x)
    np.testing.assert_array_equal(tf32[:3], [1.0, 1 + 2**-9, 1 + 2**-10])
    bf16 = round_to("bf16", x)
    np.testing.assert_array_equal(bf16[3:5], [-1.0, 1 + 2**-6])  # a tie to the even 1.0, then up from 1.5 ulp
    for rounded in (tf32, bf16):
        assert rounded.dtype == np.float32
        np.testing.assert_array_equal(rounded[5:9], x[5:9])
    assert tf32[9] == bf16[9] == np.inf  # float32's largest rounds up past the largest value either can hold


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_network_without_hidden_layers(host, sample, dtype):
    """784-10, softmax regression: no bias_relu, no relu_mask, one GEMM each way."""
    arch, params = start((784, 10), dtype)
    X, y = inputs(sample, None, dtype, m=129)
    Y = one_hot(y, 10, np.dtype(dtype))
    with FusedCudaPass(arch, dtype, 129, device=host.device) as fused:
        loss, _, grads = fused(host.layers_up(params), host.up(X), None, host.up(y), l2=0.2)
    ref_loss, _, ref_grads = loss_and_gradients(params, X, Y, y, arch, l2=0.2)
    np.testing.assert_allclose(host.down(loss), ref_loss, **TOLERANCE[dtype])
    assert_close(host.down(grads[0].W), ref_grads[0].W, dtype)
    assert_close(host.down(grads[0].b), ref_grads[0].b, dtype)


def test_a_pass_takes_smaller_batches_and_refuses_larger_ones(host, sample):
    arch, params = start((784, 10, 10), "float64")
    X, y = inputs(sample, None, "float64", m=200)
    with FusedCudaPass(arch, "float64", 200, device=host.device) as fused:
        on_device = host.layers_up(params)
        full = fused(on_device, host.up(X), None, host.up(y))
        part = fused(on_device, host.up(X[:, :77]), None, host.up(y[:77]))
        with pytest.raises(ValueError, match="made for 1 to 200 columns, got 201"):
            wide = np.zeros((784, 201))
            fused(on_device, host.up(wide), None, host.up(np.zeros(201, np.int64)))
        with pytest.raises(ValueError, match="no dropout"):
            fused(on_device, host.up(X), None, host.up(y), dropout=0.5)
    for result, m in ((full, 200), (part, 77)):
        Y = one_hot(y[:m], 10, np.float64)
        ref_loss, _, ref_grads = loss_and_gradients(params, X[:, :m], Y, y[:m], arch)
        np.testing.assert_allclose(host.down(result[0]), ref_loss, **TOLERANCE["float64"])
        assert_close(host.down(result[2][0].W), ref_grads[0].W, "float64")


@pytest.mark.parametrize("arch", [Architecture((4, 3, 2), "tanh"), Architecture((4, 3, 1), "relu", "sigmoid")])
def test_the_fast_path_refuses_networks_it_does_not_compute(arch):
    assert not supports(arch, dropout=0.0)
    with pytest.raises(ValueError, match="needs ReLU hidden layers and a softmax output"):
        FusedCudaPass(arch, "float32", 10, device=EmulatedDevice())
    assert not supports(Architecture((4, 3, 2)), dropout=0.1) and supports(Architecture((4, 3, 2)), dropout=0.0)


# --- the update rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", OPTIMIZERS)
def test_update_matches_optimizer_step(host, rule, dtype):
    """Three consecutive steps, the state carried, the learning rate changing: the same parameters and state."""
    arch, params = start((12, 5, 3), dtype)
    optimizer = Optimizer(rule, beta1=0.8, beta2=0.9)
    state = optimizer.init(params)
    update = FusedCudaUpdate(optimizer, dtype, device=host.device)
    device_params, device_state = host.layers_up(params), {k: host.layers_up(v) for k, v in state.items()}
    rng = np.random.default_rng(5)
    for t, lr in ((1, 0.1), (2, 0.05), (3, 0.02)):
        grads = [Layer(rng.standard_normal(W.shape).astype(dtype), rng.standard_normal(b.shape).astype(dtype))
                 for W, b in params]
        params, state = optimizer.step(params, grads, state, lr, t)
        device_params, device_state = update(device_params, host.layers_up(grads), device_state, lr, t)
    assert set(device_state) == set(state)
    for (W, b), (ref_W, ref_b) in zip(host.layers_down(device_params), params, strict=True):
        assert_close(W, ref_W, dtype)
        assert_close(b, ref_b, dtype)
    for name in state:
        for (V, v), (ref_V, ref_v) in zip(host.layers_down(device_state[name]), state[name], strict=True):
            assert_close(V, ref_V, dtype)
            assert_close(v, ref_v, dtype)


# --- whole epochs ----------------------------------------------------------------------------------------------


def generic_epochs(arch, params, state, data, val, rule, l2, rates, first, last):
    """What gpunn.train's full-batch loop computes for epochs first..last: each epoch's metrics row, then the
    parameters and the optimizer state after the last."""
    X, y = data
    dtype = X.dtype
    Y = one_hot(y, 10, dtype)
    rows = []
    for epoch in range(first, last + 1):
        loss, acc, grads = loss_and_gradients(params, X, Y, y, arch, l2=l2)
        params, state = rule.step(params, grads, state, rates[epoch - 1], epoch)
        if val is not None:
            trace = forward(params, val[0], arch)
            val_loss, val_acc = cost(trace.Z[-1], one_hot(val[1], 10, dtype)), accuracy(trace.A[-1], val[1])
        else:
            val_loss = val_acc = np.nan
        finite = all(np.isfinite(W).all() and np.isfinite(b).all() for W, b in params)
        rows.append([float(loss), float(acc), float(val_loss), float(val_acc), float(finite)])
    return params, state, np.array(rows)


def make_runner(host, arch, dtype, rule, l2, rates, data, val, capacity=16, **options):
    device_val = None if val is None else (host.up(val[0]), host.up(val[1]))
    return CudaGraphStep(arch, dtype, rule, l2, rates, (host.up(data[0]), host.up(data[1])), device_val, capacity,
                         host.device, **options)


def run_epochs(host, runner, params, state, first, last):
    runner.load(host.layers_up(params), {k: host.layers_up(v) for k, v in state.items()}, epochs_done=first - 1)
    for epoch in range(first, last + 1):
        runner.run(epoch)
    new_params, new_state = runner.state()
    return host.layers_down(new_params), {k: host.layers_down(v) for k, v in new_state.items()}


CASES = {
    "gd-constant-l2": ((784, 24, 10), "float32", Optimizer("gd"), 0.1, "constant", 0.3),
    "adam-cosine-two-hidden": ((784, 16, 12, 10), "float32", Optimizer("adam"), 0.0, "cosine", 0.01),
    "momentum-step-l2-float64": ((784, 12, 10), "float64", Optimizer("momentum"), 0.05, "step", 0.2),
    "rmsprop-two-hidden-float64": ((784, 10, 8, 10), "float64", Optimizer("rmsprop"), 0.0, "constant", 0.003),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_ten_epochs_end_where_the_generic_code_ends(host, sample, case):
    sizes, dtype, rule, l2, schedule, lr = CASES[case]
    arch, params = start(sizes, dtype)
    rates = [learning_rate(schedule, lr, e, 10, step_size=4, gamma=0.5) for e in range(1, 11)]
    data, val = inputs(sample, sizes, dtype, m=301), inputs(sample, sizes, dtype, m=97, first=301)
    ref_params, ref_state, ref_rows = generic_epochs(arch, params, rule.init(params), data, val, rule, l2, rates, 1, 10)
    with make_runner(host, arch, dtype, rule, l2, rates, data, val) as runner:
        assert runner.name == CudaGraphStep.GRAPH_NAME
        got_params, got_state = run_epochs(host, runner, params, rule.init(params), 1, 10)
        rows = host.down(runner.metrics)
    assert_ten_epochs(rows, got_params, got_state, ref_rows, ref_params, ref_state, dtype, rule, samples=301)


def assert_ten_epochs(rows, params, state, ref_rows, ref_params, ref_state, dtype, rule, *, samples):
    """A runner's metrics ring (16 rows, 10 written), weights and averages after 10 epochs against the generic math's;
    ``samples``: the size of the smaller set whose accuracy is compared (one sample's flip is tolerated)."""
    assert rows.dtype == np.dtype(dtype) and rows.shape == (16, 5)
    np.testing.assert_allclose(rows[:10, [0, 2]], ref_rows[:, [0, 2]], rtol=1e-5 if dtype == "float32" else 1e-10)
    # accuracies are counted exactly; in float32 a sample on a decision boundary may tip either way after 10 epochs
    np.testing.assert_allclose(rows[:10, [1, 3]], ref_rows[:, [1, 3]], rtol=0,
                               atol=0 if dtype == "float64" else 1.01 / samples)
    np.testing.assert_array_equal(rows[:10, 4], 1)
    assert np.isnan(rows[10:]).all()  # rows no epoch wrote
    for (W, b), (ref_W, ref_b) in zip(params, ref_params, strict=True):
        np.testing.assert_allclose(W, ref_W, rtol=1e-4 if dtype == "float32" else 1e-9, atol=1e-6)
        np.testing.assert_allclose(b, ref_b, rtol=1e-4 if dtype == "float32" else 1e-9, atol=1e-6)
    assert set(state) == set(rule.state_names)
    for name in state:
        for (V, _), (ref_V, _) in zip(state[name], ref_state[name], strict=True):
            np.testing.assert_allclose(V, ref_V, rtol=1e-3 if dtype == "float32" else 1e-8, atol=1e-7)


def test_resuming_after_five_epochs_gives_the_bits_of_ten(host, sample):
    sizes, dtype, rule = (784, 16, 10), "float32", Optimizer("adam")
    arch, params = start(sizes, dtype)
    rates = [learning_rate("cosine", 0.01, e, 10) for e in range(1, 11)]
    data, val = inputs(sample, sizes, dtype, m=211), inputs(sample, sizes, dtype, m=50, first=211)
    with make_runner(host, arch, dtype, rule, 0.1, rates, data, val) as runner:
        straight = run_epochs(host, runner, params, rule.init(params), 1, 10)
        straight_rows = host.down(runner.metrics)
    with make_runner(host, arch, dtype, rule, 0.1, rates, data, val) as first_half:
        halfway = run_epochs(host, first_half, params, rule.init(params), 1, 5)
    with make_runner(host, arch, dtype, rule, 0.1, rates, data, val) as second_half:
        resumed = run_epochs(host, second_half, *halfway, 6, 10)
        resumed_rows = host.down(second_half.metrics)
    for (W, b), (ref_W, ref_b) in zip(resumed[0], straight[0], strict=True):
        assert W.tobytes() == ref_W.tobytes() and b.tobytes() == ref_b.tobytes()
    for name in ("v", "s"):
        assert all(V.tobytes() == ref.tobytes() for (V, _), (ref, _) in zip(resumed[1][name], straight[1][name]))
    assert resumed_rows[5:10].tobytes() == straight_rows[5:10].tobytes()
    assert np.isnan(resumed_rows[:5]).all()


def test_two_runs_give_identical_bits(host, sample):
    sizes, dtype, rule = (784, 8, 10), "float32", Optimizer("gd")
    arch, params = start(sizes, dtype)
    data, val = inputs(sample, sizes, dtype, m=257), inputs(sample, sizes, dtype, m=64, first=257)
    runs = []
    for _ in range(2):
        with make_runner(host, arch, dtype, rule, 0.2, [0.1] * 3, data, val) as runner:
            final, _ = run_epochs(host, runner, params, {}, 1, 3)
            runs.append(host.down(runner.metrics).tobytes() + b"".join(W.tobytes() + b.tobytes() for W, b in final))
    assert runs[0] == runs[1]


def test_the_metrics_buffer_is_a_ring(host, sample):
    sizes, dtype = (784, 6, 10), "float64"
    arch, params = start(sizes, dtype)
    data = inputs(sample, sizes, dtype, m=100)
    _, _, ref_rows = generic_epochs(arch, params, {}, data, None, Optimizer(), 0.0, [0.1] * 5, 1, 5)
    with make_runner(host, arch, dtype, Optimizer(), 0.0, [0.1] * 5, data, None, capacity=3) as runner:
        run_epochs(host, runner, params, {}, 1, 5)
        rows = host.down(runner.metrics)
    for epoch in (3, 4, 5):  # the last `capacity` epochs, each in row (epoch - 1) % 3
        np.testing.assert_allclose(rows[metrics_row(epoch, 3)], ref_rows[epoch - 1], rtol=1e-10)
    assert np.isnan(rows[:, 2:4]).all()  # no validation set: NaN, as the training loop reports it


def test_the_runner_checks_its_use(host, sample):
    sizes, dtype = (784, 8, 10), "float32"
    arch, params = start(sizes, dtype)
    data = inputs(sample, sizes, dtype, m=50)
    runner = make_runner(host, arch, dtype, Optimizer("momentum"), 0.0, [0.1] * 3, data, None)
    with pytest.raises(RuntimeError, match="load"):
        runner.run(1)
    with pytest.raises(ValueError, match="momentum keeps"):
        runner.load(host.layers_up(params), {}, epochs_done=0)
    runner.load(host.layers_up(params), {"v": host.layers_up(params)}, epochs_done=1)
    with pytest.raises(ValueError, match="expected epoch 2, got 3"):
        runner.run(3)
    runner.run(2)
    runner.run(3)
    with pytest.raises(ValueError, match="expected epoch 4"):
        runner.run(5)
    with pytest.raises(ValueError, match="learning rates for 3 epochs, not 4"):
        runner.run(4)
    with pytest.raises(ValueError, match="training data: X must be a C-contiguous float32"):
        CudaGraphStep(arch, dtype, Optimizer(), 0.0, [0.1], (host.up(data[0].astype(np.float64)), host.up(data[1])),
                      None, 4, host.device)


# --- what the graph holds: the emulated device only ------------------------------------------------------------


@pytest.fixture
def emulated():
    reason = build_all()
    if reason is not None:
        pytest.skip(reason)
    return Host(EmulatedDevice())


def assert_graph_stays_in_its_buffers(device, runner, graph, static, first_buffer):
    """Every op of the recorded epoch ``graph`` writes only the runner's own allocations (``static``) and reads only
    those and the four data arrays allocated just before them (from ``first_buffer - 4``); two replays allocate
    nothing and launch exactly the graph's kernels twice."""
    for op in graph.ops:
        for array in op.writes:
            assert device.allocation_of(array) in static, f"{op.name} writes outside the runner's buffers"
        for array in op.reads:  # the rest it reads is the data it was given
            assert device.allocation_of(array) in static | {first_buffer - 4 + i for i in range(4)}, op.name
    before_allocations, before_launches = len(device.allocations), len(device.launches)
    runner.run(1)
    runner.run(2)
    assert len(device.allocations) == before_allocations
    assert len(device.launches) - before_launches == 2 * sum(op.kind == "launch" for op in graph.ops)


def test_the_recorded_epoch_writes_only_the_runners_buffers_and_replays_without_allocating(emulated, sample):
    device = emulated.device
    sizes, dtype, rule = (784, 10, 6, 10), "float32", Optimizer("adam")
    arch, params = start(sizes, dtype)
    data, val = inputs(sample, sizes, dtype, m=120), inputs(sample, sizes, dtype, m=30, first=120)
    inputs_on_device = [emulated.up(a) for a in (*data, *val)]
    first_buffer = len(device.allocations)
    runner = CudaGraphStep(arch, dtype, rule, 0.1, [0.01] * 3, tuple(inputs_on_device[:2]),
                           tuple(inputs_on_device[2:]), 3, device)
    static = set(range(first_buffer, len(device.allocations)))
    starting = emulated.layers_up(params), {k: emulated.layers_up(v) for k, v in rule.init(params).items()}
    runner.load(*starting, epochs_done=0)
    graph = runner._graph
    assert isinstance(graph, RecordedGraph) and graph.ops
    kinds = {op.kind for op in graph.ops}
    assert kinds == {"launch", "gemm"}  # no copies, no allocations: the state is in place
    assert_graph_stays_in_its_buffers(device, runner, graph, static, first_buffer)


def test_a_failed_capture_falls_back_to_launching_each_epoch_with_the_same_result(emulated, sample):
    class NoGraphs(EmulatedDevice):
        def capture(self, enqueue):
            raise RuntimeError("operation not permitted when stream is capturing")

    sizes, dtype = (784, 6, 10), "float32"
    arch, params = start(sizes, dtype)
    data = inputs(sample, sizes, dtype, m=90)
    results = []
    for device in (EmulatedDevice(), NoGraphs()):
        host = Host(device)
        with make_runner(host, arch, dtype, Optimizer(), 0.1, [0.1] * 3, data, None) as runner:
            final, _ = run_epochs(host, runner, params, {}, 1, 3)
            results.append((runner.name, host.down(runner.metrics).tobytes(), final[0].W.tobytes()))
    assert results[0][0] == CudaGraphStep.GRAPH_NAME
    assert results[1][0] == (f"{CudaGraphStep.EAGER_NAME} (CUDA graph capture failed: operation not permitted when "
                             "stream is capturing)")
    assert results[0][1:] == results[1][1:]
    host = Host(EmulatedDevice())
    with make_runner(host, arch, dtype, Optimizer(), 0.1, [0.1], data, None, graph=False) as runner:
        assert runner.name == f"{CudaGraphStep.EAGER_NAME} (graphs turned off)"


def test_a_capture_refuses_to_allocate(emulated):
    with pytest.raises(RuntimeError, match="allocation during a capture"):
        emulated.device.capture(lambda: emulated.device.empty((4,), np.float32))


# --- pieces of the GPU device that need no GPU ---------------------------------------------------------------


def test_launch_arguments_are_checked_against_the_kernels_parameter_lists():
    def is_array(value):
        return isinstance(value, np.ndarray)

    Z, b = np.zeros((2, 3), np.float32), np.zeros(2, np.float32)
    good = (Z, b, np.int32(2), np.int32(3))
    assert check_launch("bias_relu_f32", (1, 1, 1), 32, good, is_array).name == "bias_relu_f32"
    cases = [
        ((Z, b, 2, np.int32(3)), TypeError, "int n needs a numpy.int32 scalar, got int"),
        ((Z, b, np.int64(2), np.int32(3)), TypeError, "int n needs a numpy.int32 scalar, got int64"),
        ((Z.astype(np.float64), b, np.int32(2), np.int32(3)), TypeError, "float\\* Z needs a C-contiguous float32"),
        ((Z.T, b, np.int32(2), np.int32(3)), TypeError, "not contiguous"),
        ((Z, b, np.int32(2)), TypeError, "takes 4 arguments, got 3"),
        ((Z, [0.0, 0.0], np.int32(2), np.int32(3)), TypeError, "needs a device array, got list"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            check_launch("bias_relu_f32", (1, 1, 1), 32, args, is_array)
    with pytest.raises(ValueError, match="48 threads per block"):
        check_launch("bias_relu_f32", (1, 1, 1), 48, good, is_array)
    with pytest.raises(ValueError, match="no kernel named 'bias_relu'"):
        check_launch("bias_relu", (1, 1, 1), 32, good, is_array)
    assert {p.name for p in kernel_signatures()["update_f32"].params if p.writes} == {"P", "V", "S"}


class ColumnMajorBlas:
    """A stand-in for libcublas that computes cuBLAS's column-major GEMM with NumPy on the raw host pointers it
    is given: it checks that Cublas.gemm maps a row-major product onto cuBLAS's arguments correctly."""

    def __init__(self):
        self.calls = []
        for name in Cublas.SIGNATURES:
            setattr(self, name, self._record(name))
        self.cublasSgemm_v2 = self._gemm(ctypes.c_float, np.float32)
        self.cublasDgemm_v2 = self._gemm(ctypes.c_double, np.float64)

    def _record(self, name):
        def call(*args):
            self.calls.append(name)
            return 0

        return call

    @staticmethod
    def _matrix(pointer, rows, cols, ld, ctype, dtype):
        """The column-major (rows, cols) matrix with leading dimension ld at `pointer`, as a NumPy view."""
        flat = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctype)), shape=(ld * (cols - 1) + rows,))
        return np.lib.stride_tricks.as_strided(flat, (rows, cols), (flat.itemsize, ld * flat.itemsize))

    def _gemm(self, ctype, dtype):
        def gemm(handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
            assert lda >= (k if transa else m) and ldb >= (n if transb else k) and ldc >= m
            a = self._matrix(A.value, *((k, m) if transa else (m, k)), lda, ctype, dtype)
            b = self._matrix(B.value, *((n, k) if transb else (k, n)), ldb, ctype, dtype)
            c = self._matrix(C.value, m, n, ldc, ctype, dtype)
            op_a, op_b = (a.T if transa else a), (b.T if transb else b)
            c[...] = alpha._obj.value * (op_a @ op_b) + beta._obj.value * c
            self.calls.append("gemm")
            return 0

        return gemm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("trans_a", "trans_b"), [(False, False), (False, True), (True, False), (True, True)])
def test_cublas_calls_compute_the_row_major_product(dtype, trans_a, trans_b):
    rng = np.random.default_rng(0)
    M, N, K = 5, 7, 3
    A = rng.standard_normal((K, M) if trans_a else (M, K)).astype(dtype)
    B = rng.standard_normal((N, K) if trans_b else (K, N)).astype(dtype)
    C = rng.standard_normal((M, N)).astype(dtype)
    expected = 0.5 * ((A.T if trans_a else A) @ (B.T if trans_b else B)) + 2.0 * C
    lib = ColumnMajorBlas()
    blas = Cublas(lib, workspace_ptr=1234, workspace_bytes=4096)
    blas.use_stream(99)
    blas.use_stream(99)  # unchanged: no call
    blas.gemm(np.dtype(dtype), (C.ctypes.data, C.shape), (A.ctypes.data, A.shape), (B.ctypes.data, B.shape),
              trans_a, trans_b, 0.5, 2.0)
    np.testing.assert_allclose(C, expected, rtol=1e-5 if dtype == "float32" else 1e-12)
    assert lib.calls == ["cublasCreate_v2", "cublasSetPointerMode_v2", "cublasSetMathMode", "cublasSetStream_v2",
                         "cublasSetWorkspace_v2", "gemm"]  # the workspace set again after every stream change


@pytest.fixture(scope="module")
def cublas_stand_in():
    """libcublas's C API on the host (tests/cuda_on_cpu/cublas_cpu.cpp), loaded through ctypes as Cublas loads
    cuBLAS."""
    try:
        return ctypes.CDLL(str(build_cublas_stand_in()))
    except BuildError as error:
        pytest.skip(f"the cuBLAS stand-in cannot be built here: {str(error)[:200]}")


@pytest.mark.parametrize("precision", ["float32", "tf32", "bf16"])
@pytest.mark.parametrize(("trans_a", "trans_b"), [(False, False), (False, True), (True, False)])
def test_cublas_passes_each_precision_through_the_c_api(cublas_stand_in, precision, trans_a, trans_b):
    """Cublas.gemm's ctypes declarations against C functions of cuBLAS's signatures: float32 runs cublasSgemm; tf32
    and bf16 run cublasGemmEx with float32 matrices and their compute type, which rounds the inputs."""
    rng = np.random.default_rng(1)
    M, N, K = 6, 5, 40
    A = rng.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    B = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    C = rng.standard_normal((M, N)).astype(np.float32)
    a, b = (A.T if trans_a else A).astype(np.float64), (B.T if trans_b else B).astype(np.float64)
    exact = 0.5 * (a @ b) + 2.0 * C
    if precision != "float32":
        a, b = round_to(precision, a.astype(np.float32)), round_to(precision, b.astype(np.float32))
    expected = 0.5 * (a.astype(np.float64) @ b) + 2.0 * C
    blas = Cublas(cublas_stand_in, workspace_ptr=1234, workspace_bytes=4096)
    blas.use_stream(99)
    blas.gemm(np.dtype(np.float32), (C.ctypes.data, C.shape), (A.ctypes.data, A.shape), (B.ctypes.data, B.shape),
              trans_a, trans_b, 0.5, 2.0, precision)
    np.testing.assert_allclose(C, expected, rtol=1e-5, atol=1e-5)
    assert cublas_stand_in.cublas_cpu_last_compute_type() == COMPUTE_TYPES.get(precision, 68)  # CUBLAS_COMPUTE_32F
    assert (precision == "float32") == np.allclose(C, exact, rtol=1e-5, atol=1e-5)  # the rounding happened
    blas.close()


def test_a_failed_cublas_call_names_its_status(cublas_stand_in):
    blas = Cublas(cublas_stand_in, workspace_ptr=1234, workspace_bytes=4096)
    blas.fn["cublasGemmEx"] = lambda *args: 15
    A = np.ones((2, 2), np.float32)
    with pytest.raises(RuntimeError, match=r"^cublasGemmEx \(bf16\) failed with cuBLAS status 15 "
                                           r"\(CUBLAS_STATUS_NOT_SUPPORTED\)$"):
        blas.gemm(np.dtype(np.float32), *[(A.ctypes.data, A.shape)] * 3, False, False, 1.0, 0.0, "bf16")


def test_the_column_major_arguments_of_a_row_major_product():
    # C (5, 7) = A (5, 3) @ B (3, 7): cuBLAS computes C.T (7, 5) = B.T (7, 3) @ A.T (3, 5), no transposes
    assert cublas_arguments((5, 7), (5, 3), (3, 7), False, False) == (0, 0, 7, 5, 3, 7, 3, 7)
    # dW (h, n) = dZ (h, m) @ X.T, X (n, m): the backward pass's product with X
    assert cublas_arguments((10, 784), (10, 59_000), (784, 59_000), False, True) == (1, 0, 784, 10, 59_000, 59_000,
                                                                                   59_000, 784)


def test_a_loaded_library_is_found_in_the_process_map():
    maps = ("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libcublasLt.so.13.0.1\n"
            "7f02-7f03 r-xp 00000000 08:01 2 /opt/nvidia/cu13/lib/libcublas.so.13\n"
            "7f04-7f05 rw-p 00000000 00:00 0 \n")
    assert loaded_library("libcublas.so", maps) == "/opt/nvidia/cu13/lib/libcublas.so.13"
    assert loaded_library("libcusparse.so", maps) is None
    assert loaded_library("libc.so") is not None or loaded_library("libc-") is not None  # this process's own libc


@pytest.mark.gpu
def test_cupy_device_captures_a_graph_on_the_gpu():
    """On a GPU: the runner really captured a CUDA graph (not the fallback), and its epochs match the emulator's
    eager launches to float32 rounding."""
    backend = cuda_backend_or_skip()
    sizes, dtype = (784, 10, 10), "float32"
    arch, params = start(sizes, dtype)
    sample = load_bundled_sample()
    data = (np.ascontiguousarray(sample.train_images[:500].T.astype(dtype) / 255),
            sample.train_labels[:500].astype(np.int64))
    host = Host(CupyDevice(backend.cupy), backend.cupy)
    with make_runner(host, arch, dtype, Optimizer(), 0.0, [0.1] * 5, data, None) as runner:
        run_epochs(host, runner, params, {}, 1, 5)
        assert runner.name == CudaGraphStep.GRAPH_NAME, runner.name
        assert isinstance(runner._graph, backend.cupy.cuda.Graph)
        rows = host.down(runner.metrics)
    _, _, ref_rows = generic_epochs(arch, params, {}, data, None, Optimizer(), 0.0, [0.1] * 5, 1, 5)
    np.testing.assert_allclose(rows[:5, 0], ref_rows[:, 0], rtol=1e-5)
