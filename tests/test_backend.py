"""Backend selection: every path and every message, with CuPy's absence, breakage and devices simulated."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from gpunn.backend import Backend, CupyBackend, NumpyBackend, get_backend, parse_device
from gpunn.errors import BackendError, DeviceSpecError


class FakeCUDARuntimeError(RuntimeError):
    pass


def fake_cupy(monkeypatch, *, names=(), count_error=None, first_op_error=None, capability=(9, 0)):
    """Install a stand-in `cupy` module that reports the given GPUs, or fails where told to."""

    def get_device_count():
        if count_error is not None:
            raise FakeCUDARuntimeError(count_error)
        return len(names)

    def arange(*args, **kwargs):
        if first_op_error is not None:
            raise first_op_error
        return np.arange(*args, **kwargs)

    class Device:
        def __init__(self, index):
            self.index = index

        def use(self):
            pass

    runtime = types.SimpleNamespace(
        getDeviceCount=get_device_count,
        getDeviceProperties=lambda i: {"name": names[i].encode(), "major": capability[0], "minor": capability[1]},
        CUDARuntimeError=FakeCUDARuntimeError,
    )
    module = types.ModuleType("cupy")
    module.__version__ = "99.0.0"
    module.cuda = types.SimpleNamespace(runtime=runtime, Device=Device)
    module.arange = arange
    module.float32 = np.float32
    monkeypatch.setitem(sys.modules, "cupy", module)
    # CupyBackend builds its namespace from array_api_compat.cupy, which would import the real CuPy
    monkeypatch.setitem(sys.modules, "array_api_compat.cupy", types.ModuleType("array_api_compat.cupy"))


@pytest.fixture
def no_cupy(monkeypatch):
    """Make `import cupy` fail as it does where CuPy is not installed."""
    monkeypatch.setitem(sys.modules, "cupy", None)


def test_cpu_backend_round_trips_arrays():
    backend = get_backend("cpu")
    assert isinstance(backend, NumpyBackend) and backend.name == "cpu" and not backend.is_cuda
    host = np.arange(6, dtype=np.uint8).reshape(2, 3)
    device = backend.asarray(host, dtype=backend.xp.float32)
    assert backend.xp.isdtype(device.dtype, "real floating")
    np.testing.assert_array_equal(backend.to_numpy(device), host)
    backend.synchronize()
    described = backend.describe()
    assert described["device"] == "cpu" and np.__version__ in described["numpy"]
    assert backend.summary().startswith("cpu (")


@pytest.mark.parametrize("spec, parsed", [("cpu", ("cpu", None)), ("auto", ("auto", None)), ("cuda", ("cuda", None)),
                                          ("cuda:3", ("cuda", 3)), (" CUDA:0 ", ("cuda", 0))])
def test_parse_device(spec, parsed):
    assert parse_device(spec) == parsed


@pytest.mark.parametrize("spec", ["gpu", "gpu2", "cuda:", "cuda:-1", "cuda:x", "cpu:0", "auto:1", ""])
def test_unknown_device_names_say_what_is_expected(spec):
    with pytest.raises(DeviceSpecError, match=r"unknown device .*expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        get_backend(spec)


def test_cuda_without_cupy_names_the_extra_to_install(no_cupy):
    with pytest.raises(BackendError) as caught:
        get_backend("cuda")
    message = str(caught.value)
    assert "CuPy is not installed" in message
    assert "gpunn[cuda12]" in message and "gpunn[cuda13]" in message and "--device cpu" in message


def test_auto_without_cupy_chooses_the_cpu_and_says_why(no_cupy):
    backend = get_backend("auto")
    assert backend.name == "cpu"
    assert backend.reason == "auto chose the CPU: CuPy is not installed"


def test_cupy_that_fails_to_import_shows_its_error(monkeypatch, tmp_path):
    package = tmp_path / "cupy"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("libcudart.so.12: cannot open shared object file")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    with pytest.raises(BackendError, match=r"CuPy is installed but failed to import: .*libcudart\.so\.12"):
        get_backend("cuda")


def test_cupy_without_a_device_includes_cupys_own_error(monkeypatch):
    fake_cupy(monkeypatch, count_error="cudaErrorNoDevice: no CUDA-capable device is detected")
    with pytest.raises(BackendError) as caught:
        get_backend("cuda:0")
    assert "CuPy 99.0.0 is installed but no CUDA device answers" in str(caught.value)
    assert "cudaErrorNoDevice: no CUDA-capable device is detected" in str(caught.value)
    auto = get_backend("auto")
    assert auto.name == "cpu" and "no CUDA device answers" in auto.reason


def test_cupy_reporting_zero_devices(monkeypatch):
    fake_cupy(monkeypatch, names=())
    with pytest.raises(BackendError, match="no CUDA device answers: the CUDA runtime reports 0 devices"):
        get_backend("cuda")


def test_device_index_out_of_range_lists_the_devices(monkeypatch):
    fake_cupy(monkeypatch, names=("Fake H100", "Fake H200"))
    with pytest.raises(BackendError) as caught:
        get_backend("cuda:2")
    assert str(caught.value).startswith(
        "cuda:2 is out of range: 2 CUDA devices visible: cuda:0 (Fake H100), cuda:1 (Fake H200)"
    )


def test_device_that_fails_its_first_operation(monkeypatch):
    fake_cupy(monkeypatch, names=("Fake H100",), first_op_error=RuntimeError("CUDA driver version is insufficient"))
    with pytest.raises(BackendError, match=r"found cuda:0 but could not use it: .*driver version is insufficient"):
        get_backend("cuda")


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_a_gpu_without_tf32_and_bfloat16_tensor_cores_refuses_those_precisions(monkeypatch, precision):
    """cuBLAS would quietly compute in float32 there, under a step name that says tensor cores."""
    from gpunn.errors import ConfigError
    from gpunn.nn import Architecture

    fake_cupy(monkeypatch, names=("Tesla V100-SXM2-16GB",), capability=(7, 0))
    backend = get_backend("cuda")
    with pytest.raises(ConfigError, match=rf"^precision {precision} runs on tensor cores .* compute capability 8.0 "
                                          r"\(Ampere\); cuda:0 \(Tesla V100-SXM2-16GB\) has 7.0: use --precision "
                                          "float32$"):
        backend.step(Architecture((784, 256, 10)), dtype="float32", columns=100, precision=precision)


def test_two_cupy_wheels_at_once_are_refused(monkeypatch, tmp_path):
    for name, version in [("cupy_cuda12x", "13.6.0"), ("cupy_cuda13x", "14.0.0")]:
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendError) as caught:
        get_backend("cuda")
    message = str(caught.value)
    assert "2 CuPy packages are installed at once (cupy-cuda12x 13.6.0, cupy-cuda13x 14.0.0)" in message
    assert "pip uninstall cupy-cuda12x cupy-cuda13x" in message


def test_generic_backend_needs_only_a_namespace():
    """Any array-API namespace makes a Backend: the generic code asks nothing more of it."""
    import array_api_strict

    backend = Backend("strict", array_api_strict, array_api_strict.Device("CPU_DEVICE"))
    array = backend.asarray(np.ones(3), dtype=array_api_strict.float32)
    np.testing.assert_array_equal(backend.to_numpy(array), np.ones(3))


def test_import_and_help_never_import_cupy(tmp_path):
    """With a `cupy` on the path that announces its import, importing gpunn and every --help stay silent."""
    package = tmp_path / "cupy"
    package.mkdir()
    (package / "__init__.py").write_text("import sys\nsys.stderr.write('CUPY WAS IMPORTED\\n')\n")
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import cupy  # proves that the stand-in is importable and announces itself
        del sys.modules["cupy"]
        import gpunn
        from click.testing import CliRunner
        from gpunn.cli import main
        for args in (["--help"], ["train", "--help"], ["evaluate", "--help"], ["info", "--help"]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
        print("cupy imported:", "cupy" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    assert result.stderr.count("CUPY WAS IMPORTED") == 1, result.stderr
    assert result.stdout.strip() == "cupy imported: False"


@pytest.mark.gpu
def test_cuda_backend_describes_the_gpu(cuda):
    described = cuda.describe()
    assert described["device"] == "cuda:0"
    assert {"gpu", "memory", "cuda", "cupy"} <= set(described)
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(cuda.to_numpy(cuda.asarray(host)), host)
    cuda.synchronize()


@pytest.mark.parametrize("subclass", [NumpyBackend, CupyBackend])
def test_overrides_keep_the_base_signatures(subclass):
    """A fast path is an override that callers reach through Backend's interface: same parameters, same kinds."""
    for name, member in vars(subclass).items():
        base = getattr(Backend, name, None)
        if name.startswith("_") or base is None or not callable(member):
            continue
        assert inspect.signature(member) == inspect.signature(base), name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("sizes, m, l2", [((784, 10, 10), 1999, 0.0), ((784, 24, 16, 10), 777, 0.3)],
                         ids=["784-10-10", "784-24-16-10-l2"])
def test_every_fast_path_matches_the_generic_math(backend, dtype, sizes, m, l2):
    """Whatever Backend.step chooses on this backend (a fast path, or the generic math), one step's loss, accuracy and
    gradients, and one update by each rule, agree with gpunn.nn and gpunn.optim on the same device."""
    import copy

    from gpunn.data import load_bundled_sample
    from gpunn.nn import Architecture, Layer, init_params, loss_and_gradients, one_hot
    from gpunn.optim import OPTIMIZERS, Optimizer

    tolerance = {"float32": dict(rtol=3e-4, atol=1e-6), "float64": dict(rtol=1e-9, atol=1e-13)}[dtype]
    sample = load_bundled_sample()
    pixels, labels = np.ascontiguousarray(sample.train_images[:m].T), sample.train_labels[:m].astype(np.int64)
    arch = Architecture(sizes)
    xp = backend.xp
    params = [Layer(backend.asarray(W), backend.asarray(b + 0.01))
              for W, b in init_params(arch, init="he", seed=3, dtype=dtype)]
    X = backend.asarray(pixels.astype(dtype) / 255)
    y = backend.asarray(labels)
    Y = one_hot(y, 10, getattr(xp, dtype))
    step = backend.step(arch, dtype=dtype, columns=m)
    generic = copy.copy(backend)
    generic.fast = False
    assert generic.step(arch, dtype=dtype, columns=m).name == "the generic array-API math"

    def host(a):
        return backend.to_numpy(a).astype(np.float64)

    with step.gradients() as gradients:
        loss, accuracy, grads = gradients(params, backend.asarray(pixels) if step.pixels else X, Y, y, l2=l2)
    ref_loss, ref_accuracy, ref_grads = loss_and_gradients(params, X, Y, y, arch, l2=l2)
    assert loss.shape == accuracy.shape == ()
    np.testing.assert_allclose(host(loss), host(ref_loss), **tolerance)
    assert host(accuracy) == host(ref_accuracy)
    for (dW, db), (ref_dW, ref_db) in zip(grads, ref_grads, strict=True):
        assert dW.shape == ref_dW.shape and db.shape == ref_db.shape and dW.dtype == ref_dW.dtype
        for got, want in ((dW, ref_dW), (db, ref_db)):
            scale = np.abs(host(want)).max()
            np.testing.assert_allclose(host(got), host(want), rtol=tolerance["rtol"], atol=tolerance["atol"] * scale)
    for name in OPTIMIZERS:
        rule = Optimizer(name)
        state = rule.init(params)
        # a second step from the first's state, so that the running averages are not zero
        for t in (1, 2):
            ref, ref_state = rule.step(params, ref_grads, state, 0.05, t)  # first: a fast update may work in place
            with step.update(rule) as update:
                new, new_state = update(params, ref_grads, state, 0.05, t)
            for got, want in zip([*new, *sum(new_state.values(), [])], [*ref, *sum(ref_state.values(), [])]):
                for a, b in zip(got, want):
                    np.testing.assert_allclose(host(a), host(b), **tolerance)
            params, state = ref, ref_state


def test_the_cpu_chooses_its_fast_path_by_network(monkeypatch):
    """One hidden ReLU layer of up to SINGLE_PASS_MAX_HIDDEN units: the Numba single pass over uint8 pixels (the narrow
    kernel for a full batch through up to numba_narrow.MAX_HIDDEN units); deeper or wider ReLU networks: the fused BLAS
    pass; anything else: the generic math. A compile ahead is announced, for the kernel the run takes."""
    from gpunn import numba_cpu
    from gpunn.backend import NumpyBackend
    from gpunn.nn import Architecture

    cpu = get_backend("cpu")

    def step(*sizes, activation="relu", dropout=0.0, batches=False):
        return cpu.step(Architecture(sizes, activation), dtype="float32", columns=60_000, dropout=dropout,
                        batches=batches)

    single = step(784, 10, 10)
    assert single.name.startswith("single pass over uint8 pixels (Numba, 16 samples per vector)") and single.pixels
    for wide in (step(784, 10, 10, batches=True), step(784, 29, 10)):
        assert wide.name.startswith("single pass over uint8 pixels (Numba, 16 hidden units per vector)")
    # the pass runs the kernel the step names: a run of mini-batches holds no scratch for the narrow one
    batches = step(784, 10, 10, batches=True)
    assert single.evaluates_pixels and not batches.evaluates_pixels
    for run in (single, batches):
        with run.gradients() as gradients:
            assert gradients.evaluates_pixels == run.evaluates_pixels
    assert step(784, NumpyBackend.SINGLE_PASS_MAX_HIDDEN, 10).pixels
    for fused in (step(784, NumpyBackend.SINGLE_PASS_MAX_HIDDEN + 1, 10), step(784, 16, 16, 10)):
        assert fused.name.startswith("fused CPU pass") and not fused.pixels
    assert step(784, 10, 10, activation="tanh").name == "the generic array-API math"
    assert step(784, 10, 10, dropout=0.5).name == "the generic array-API math"
    asked = []
    monkeypatch.setattr(numba_cpu, "needs_compile", lambda dtype, **run: asked.append(run) or True)
    assert step(784, 10, 10).notice.startswith("compiling the single-pass CPU kernel for float32 and 10 hidden "
                                               "units (once")
    assert step(784, 10, 10, batches=True).notice.startswith("compiling the single-pass CPU kernel for float32 (once")
    assert [run["batches"] for run in asked] == [False, True] and asked[0]["arch"] == Architecture((784, 10, 10))
    monkeypatch.setattr(numba_cpu, "needs_compile", lambda dtype, **run: False)
    assert step(784, 10, 10).notice == ""


def test_cuda_chooses_its_fast_path_by_network():
    """On CUDA (here its emulation): the single pass over uint8 pixels for one hidden ReLU layer of up to 16 units on
    plain pixels / 255; the layer-wise fused kernels for the rest; the generic math where neither applies."""
    from conftest import emulated_cuda_or_skip

    from gpunn.nn import Architecture

    cuda = emulated_cuda_or_skip()

    def step(*sizes, pixels=True, dropout=0.0):
        return cuda.step(Architecture(sizes), dtype="float32", columns=60_000, dropout=dropout, pixels=pixels)

    assert step(784, 10, 10).name.startswith("single-pass CUDA kernel over uint8 pixels") and step(784, 10, 10).pixels
    assert step(784, 16, 10).pixels
    for fused in (step(784, 17, 10), step(784, 10, 10, pixels=False), step(784, 16, 16, 10)):
        assert fused.name.startswith("fused CUDA kernels") and not fused.pixels
    assert step(784, 10, 10, dropout=0.2).name == "the generic array-API math"


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_a_reduced_precision_takes_the_tensor_core_gemms_or_says_why_not(precision):
    """tf32 and bf16 are for the CUDA fast path's cuBLAS GEMMs: on CUDA (here its emulation) every ReLU network takes
    the fused kernels with them, the 784-10-10 too (the single pass has no GEMMs); everywhere else the step refuses
    the run with a ConfigError that says what to use instead."""
    from conftest import emulated_cuda_or_skip

    from gpunn.errors import ConfigError
    from gpunn.nn import Architecture

    cuda = emulated_cuda_or_skip()
    for sizes in [(784, 10, 10), (784, 256, 10), (784, 16, 16, 10)]:
        step = cuda.step(Architecture(sizes), dtype="float32", columns=1000, precision=precision)
        cores = "TF32" if precision == "tf32" else "bfloat16"
        assert step.name.startswith(f"fused CUDA kernels, cuBLAS GEMMs on {cores} tensor cores"), step.name
        assert not step.pixels
    refused = [(cuda, "float64", 0.0), (cuda, "float32", 0.2), (get_backend("cpu"), "float32", 0.0),
               (get_backend("cpu", fast=False), "float32", 0.0)]
    for backend, dtype, dropout in refused:
        with pytest.raises(ConfigError, match=rf"^precision {precision} runs .* on CUDA tensor cores, .* this run on "
                                              rf"{backend.name} would compute them in {dtype}: use --device cuda"):
            backend.step(Architecture((784, 10, 10)), dtype=dtype, columns=1000, dropout=dropout, precision=precision)
