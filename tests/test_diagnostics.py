"""Diagnostics: the machine's description and the one-line messages for failures of the machine."""

from __future__ import annotations

import sys
import types

import numpy as np

from gpunn.diagnostics import cpu_model, numpy_blas, one_line, out_of_memory_message


def test_out_of_gpu_memory_names_what_was_needed_and_what_is_free(monkeypatch):
    """CuPy's OutOfMemoryError, recognized by name (no CuPy import), becomes one line with both figures."""
    class Device:
        id = 0
        mem_info = (512 * 2**20, 80 * 2**30)

    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(Device=Device)
    monkeypatch.setitem(sys.modules, "cupy", module)
    OutOfMemoryError = type("OutOfMemoryError", (MemoryError,), {"__module__": "cupy.cuda.memory"})
    error = OutOfMemoryError("Out of memory allocating 3,221,225,472 bytes (allocated so far: 1,024 bytes).")
    assert out_of_memory_message(error) == (
        "out of GPU memory: needed 3.00 GiB more on cuda:0, which has 0.50 GiB free of 80.00 GiB; "
        "try a smaller --hidden, --dtype float32, or --device cpu"
    )
    assert out_of_memory_message(ValueError("other")) is None
    assert out_of_memory_message(MemoryError("Unable to allocate 5 GiB")).startswith("out of host memory: ")


def test_the_machine_is_described():
    assert cpu_model()
    assert numpy_blas().startswith("BLAS ")
    assert np.__version__


def test_one_line_names_the_error_type_once():
    assert one_line(ValueError("bad\n  value")) == "ValueError: bad value"
    assert one_line(OSError("OSError: disk")) == "OSError: disk"
    assert one_line(KeyError()) == "KeyError"
