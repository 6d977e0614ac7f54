"""The Numba single pass (gpunn/numba_cpu.py) against the other ways to compute one full-batch step, interleaved.

    python benchmarks/numba_single_pass.py --data-dir ../shared/data/mnist          # real MNIST, m = 60,000
    python benchmarks/numba_single_pass.py --m 512 --hidden 10 --rounds 2            # toy size, synthetic pixels
    python benchmarks/numba_single_pass.py --data-dir DIR --name NAME                # also write NAME.md / NAME.json
    python benchmarks/numba_single_pass.py --data-dir DIR --steps 10                # warm steps, as in training
    python benchmarks/numba_single_pass.py --compile-times                          # cold compile and cache load
    python benchmarks/numba_single_pass.py --contention                             # threading layers, busy cores

One step = the loss, accuracy and gradients of 784-h-10 (ReLU, softmax) on all m samples, then the same plain
gradient-descent update W -= 0.1 dW for every implementation (so one step is one full-batch epoch). Implementations:

- numba-sparse: SinglePassCpu, skipping zero pixels (the default; for h up to numba_narrow.MAX_HIDDEN the narrow
  kernel, samples in the lanes, else numba_cpu's, hidden units in the lanes); numba-dense: the same kernel without
  skipping (same order of sums, same bits); numba-unsorted: skipping, with the full batch summed in the files' order
  instead of sorted by where the samples' ink lies (numba_cpu.support_order); numba-wide: numba_cpu's kernel
  whatever h (the same as numba-sparse above MAX_HIDDEN); numba-narrow: numba_narrow's kernel whatever h (not in
  the default --only; for placing the crossover, on this CPU or, with NUMBA_CPU_NAME and NUMBA_CPU_FEATURES, for
  another instruction set);
- fused-cpu: gpunn's BLAS fast path (FusedCpuPass) on float X (n0, m) as gpunn keeps it;
- generic: gpunn.nn.loss_and_gradients on the same float X;
- numpy: the seed notes' plain NumPy program, kept in the dtype (X = pixels.T / 255 in float32 stays float32).

Method: every implementation starts from the same He weights and first shows that it computes the same step (its
first loss within 1e-4 relative of the generic math's in float32, 1e-9 in float64). Then, for each round, each
implementation runs one step, in an order rotated by one every round, so that the machine's drifting load
(the development machine is shared) falls on all of them alike. Reported: min and median per implementation and,
per round, the ratios to numba-sparse.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import click
import numba
import numpy as np

from gpunn import diagnostics, numba_cpu, numba_narrow
from gpunn.fused_cpu import FusedCpuPass
from gpunn.nn import Architecture, Layer, init_params, loss_and_gradients, one_hot
from gpunn.numba_cpu import SinglePassCpu

LR = 0.1
CHECK = {"float32": 1e-4, "float64": 1e-9}


def numpy_step(W1, b1, W2, b2, X, Y):
    """The seed notes' program (forward_prop, backward_prop), kept in X's dtype: one-hot Y is made once, in it."""
    m = X.shape[1]
    Z1 = W1.dot(X) + b1
    A1 = np.maximum(Z1, 0)
    Z2 = W2.dot(A1) + b2
    E = np.exp(Z2 - Z2.max(axis=0))
    A2 = E / E.sum(axis=0)
    loss = -np.log(A2[Y.argmax(axis=0), np.arange(m)]).mean()
    dZ2 = A2 - Y
    dW2 = dZ2.dot(A1.T) / m
    db2 = dZ2.sum(axis=1, keepdims=True) / m
    dZ1 = W2.T.dot(dZ2) * (Z1 > 0)
    dW1 = dZ1.dot(X.T) / m
    db1 = dZ1.sum(axis=1, keepdims=True) / m
    return loss, [Layer(dW1, db1), Layer(dW2, db2)]


class Runner:
    """One implementation's weights and its step; step() = gradients + the shared update. A pass object (context)
    is entered around each step only, outside the timed region: the passes hold BLAS to one thread while entered,
    which must not reach the NumPy and generic steps, and SinglePassCpu sets Numba's thread count."""

    def __init__(self, name: str, gradients: Callable[[list[Layer]], tuple[Any, list[Layer]]],
                 params: list[Layer], context: Any = None) -> None:
        self.name = name
        self.gradients = gradients
        self.params = [Layer(W.copy(), b.copy()) for W, b in params]
        self.context = context if context is not None else contextlib.nullcontext()

    def step(self) -> float:
        """One step; the caller has entered ``context`` (entering it is not part of a step's time: it sets thread
        counts, which a training run does once)."""
        loss, grads = self.gradients(self.params)
        for (W, b), (dW, db) in zip(self.params, grads):
            W -= LR * dW
            b -= LR * db
        return float(loss)


def make_runners(images: np.ndarray, labels: np.ndarray, h: int, dtype: str, threads: int | None,
                 only: list[str]) -> list[Runner]:
    arch = Architecture((784, h, 10))
    params = init_params(arch, init="he", seed=0, dtype=dtype)
    m = len(labels)
    pixels = images.T  # (784, m), the IDX rows' transposed view: the single pass's fast layout
    X = np.ascontiguousarray(images.T).astype(dtype)  # (784, m) C-ordered floats, as gpunn keeps them
    X /= 255
    Y = one_hot(labels, 10, getattr(np, dtype))
    runners = []
    for name, sparse, sort, narrow in (("numba-sparse", True, True, None), ("numba-dense", False, True, None),
                                       ("numba-unsorted", True, False, None), ("numba-wide", True, True, False),
                                       ("numba-narrow", True, True, True)):
        if name in only:
            single = SinglePassCpu(arch, dtype, m, threads=threads, sparse=sparse, sort=sort, narrow=narrow)
            single.prepare(pixels)
            runners.append(Runner(name, lambda p, s=single: _drop_accuracy(s(p, pixels, None, labels)), params,
                                  single))
    if "fused-cpu" in only:
        fused = FusedCpuPass(arch, dtype, m, workers=threads)
        runners.append(Runner("fused-cpu", lambda p: _drop_accuracy(fused(p, X, Y, labels)), params, fused))
    if "generic" in only:
        runners.append(Runner("generic", lambda p: _drop_accuracy(loss_and_gradients(p, X, Y, labels, arch)),
                              params))
    if "numpy" in only:
        runners.append(Runner("numpy", lambda p: numpy_step(*p[0], *p[1], X, Y), params))
    return runners


def _drop_accuracy(result: tuple[Any, Any, list[Layer]]) -> tuple[Any, list[Layer]]:
    return result[0], result[2]


def interleaved(runners: list[Runner], rounds: int, pause: float, steps: int = 1) -> dict[str, list[float]]:
    """Milliseconds per step, one slot per implementation per round, the order rotated each round. Before each slot,
    a pause: OpenBLAS's worker threads keep spinning for about 0.1 s after a call, and would otherwise take the
    cores from whichever implementation runs next (in a training run, nothing else runs in the process). A slot is
    one step (cold: its data were evicted by the others'), or with ``steps`` > 1 an untimed step and then ``steps``
    timed ones, reported as their mean (warm, as the steps of a training run follow one another)."""
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for round_ in range(rounds):
        k = round_ % len(runners)
        for runner in runners[k:] + runners[:k]:
            time.sleep(pause)
            with runner.context:
                if steps > 1:
                    runner.step()
                start = time.perf_counter()
                for _ in range(steps):
                    runner.step()
                times[runner.name].append((time.perf_counter() - start) * 1e3 / steps)
    return times


def check_same_step(runners: list[Runner]) -> dict[str, float]:
    """Each implementation's first loss (untimed; also its warm-up), which must match the generic math's."""
    losses = {}
    for runner in runners:
        with runner.context:
            losses[runner.name] = runner.step()
    return losses


def measure(images, labels, hidden: list[int], dtypes: list[str], rounds: int, threads: int | None,
            only: list[str], f64_hidden: list[int], pause: float, steps: int = 1) -> list[dict[str, Any]]:
    rows = []
    for dtype in dtypes:
        for h in hidden if dtype == "float32" else f64_hidden:
            runners = make_runners(images, labels, h, dtype, threads, only)
            losses = check_same_step(runners)
            reference = losses.get("generic", next(iter(losses.values())))
            refused = {n: l for n, l in losses.items() if abs(l - reference) > CHECK[dtype] * abs(reference)}
            timed = [r for r in runners if r.name not in refused]
            times = interleaved(timed, rounds, pause, steps)
            row = {"dtype": dtype, "hidden": h, "first_loss": losses, "refused": sorted(refused), "ms": times}
            rows.append(row)
            click.echo(summary(row))
    return rows


def summary(row: dict[str, Any]) -> str:
    times = row["ms"]
    first = next(iter(times), None)  # the first implementation timed: the others' rounds are compared with it
    lines = [f"784-{row['hidden']}-10 {row['dtype']}:"]
    for name, ms in times.items():
        ratios = "" if name == first else \
            f"  per round ×{first}: " + " ".join(f"{a / b:.2f}" for a, b in zip(ms, times[first]))
        lines.append(f"  {name:13s} min {min(ms):8.2f}  median {statistics.median(ms):8.2f} ms{ratios}")
    for name in row["refused"]:
        lines.append(f"  {name}: refused, first loss {row['first_loss'][name]:.8g} differs from the generic math's")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    first = next(iter(result["rows"][0]["ms"]), None) if result["rows"] else None  # the first implementation timed
    lines = [
        f"# The Numba single pass, interleaved: {result['name']}",
        "",
        f"Data: {result['data']}, m = {result['m']:,}. {result['rounds']} rounds; in each, every implementation "
        "runs one slot, in an order rotated by one per round, after a pause of "
        f"{result['pause_s']:g} s: " + ("one full-batch step (gradients + update), cold. "
                                        if result.get("steps", 1) == 1 else
                                        f"an untimed step, then {result['steps']} timed ones (ms: their mean). ") +
        f"Command: `{result['command']}`",
        "",
        f"- CPU: {result['environment']['cpu']}, {result['environment']['cores']} usable cores; Numba "
        f"{result['environment']['numba']}, threading layer {result['environment']['threading_layer']}, "
        f"threads for a full step: {result['environment']['threads']}; compiled for "
        f"{result['environment'].get('compiled_for', 'this CPU')}; NumPy {result['environment']['numpy']}",
        f"- load average at the start: {result['environment']['load_average']}",
        "",
        f"| dtype | h | implementation | min ms | median ms | median × {first} | rounds slower than {first} |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        base = row["ms"].get(first)
        for name, ms in row["ms"].items():  # in the order they were made (make_runners)
            ratio = statistics.median(a / b for a, b in zip(ms, base)) if base else float("nan")
            slower = sum(a > b for a, b in zip(ms, base)) if base else 0
            lines.append(f"| {row['dtype']} | {row['hidden']} | {name} | {min(ms):.2f} | {statistics.median(ms):.2f} "
                         f"| {ratio:.2f} | {slower}/{len(ms)} |")
    lines += ["", f"× {first}: the median over rounds of (this step's time / {first}'s in the same round)."]
    return "\n".join(lines) + "\n"


# --- compile and cache-load times -------------------------------------------------------------------------------

_COMPILE_CHILD = textwrap.dedent("""
    import json, sys, time
    start = time.perf_counter()
    import numpy as np
    from gpunn import numba_cpu
    from gpunn.nn import Architecture, init_params
    imported = time.perf_counter()
    dtype = sys.argv[1]
    kind = sys.argv[2]
    hidden, columns, batches = {"narrow": (10, 60000, False), "wide": (64, 60000, False),
                                "one-thread": (10, 64, True)}[kind]
    arch = Architecture((784, hidden, 10))
    threads = numba_cpu.threads_for(columns, hidden)
    needs = numba_cpu.needs_compile(dtype, threads=threads, arch=arch, batches=batches)
    checked = time.perf_counter()
    pixels = np.random.default_rng(0).integers(0, 256, (784, 64), dtype=np.uint8)
    labels = np.arange(64) % 10
    with numba_cpu.SinglePassCpu(arch, dtype, columns) as step:  # the kernel of a run of `columns` per step
        step(init_params(arch, init="he", seed=0, dtype=dtype), pixels, None, labels,
             index=np.arange(0, 64, 2) if batches else None)
    done = time.perf_counter()
    print(json.dumps({"threads": threads, "needs_compile": needs, "import_s": imported - start,
                      "check_s": checked - imported, "first_step_s": done - checked}))
""")


def compile_times() -> list[dict[str, Any]]:
    """Per dtype and kernel (the sparse and dense kernels are one compiled function): the narrow kernel of a run of
    full MNIST batches at h = 10 (numba_narrow), numba_cpu's parallel kernel of one at h = 64, and its one-thread
    kernel of a run of 64-sample mini-batches; in fresh interpreters with an empty Numba cache directory: the first
    step cold (compiling), then twice more (loading the cache)."""
    results = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for dtype in ("float32", "float64"):
            for kind in ("narrow", "wide", "one-thread"):
                for attempt in ("cold", "cached", "cached"):
                    out = subprocess.run([sys.executable, "-c", _COMPILE_CHILD, dtype, kind], env=env,
                                         check=True, capture_output=True, text=True).stdout
                    row = {"dtype": dtype, "kernel": kind, "attempt": attempt, **json.loads(out)}
                    results.append(row)
                    click.echo(f"{dtype}, {kind} kernel ({row['threads']} threads) {attempt}: needs_compile="
                               f"{row['needs_compile']}, import {row['import_s']:.2f} s, first step "
                               f"{row['first_step_s']:.2f} s")
    return results


# --- threading layers on busy cores ------------------------------------------------------------------------------

_LAYER_CHILD = textwrap.dedent("""
    import json, sys, time
    import numba, numpy as np
    numba.config.THREADING_LAYER = sys.argv[1]
    from gpunn import numba_cpu
    from gpunn.nn import Architecture, init_params
    arch = Architecture((784, 10, 10))
    m = int(sys.argv[2])
    from gpunn.data import load_bundled_sample
    sample = load_bundled_sample()
    reps = -(-m // len(sample.train_labels))
    pixels = np.tile(sample.train_images, (reps, 1))[:m].T  # MNIST's own sparsity, from the bundled sample
    labels = np.tile(sample.train_labels, reps)[:m].astype(np.int64)
    params = init_params(arch, init="he", seed=0, dtype="float32")
    with numba_cpu.SinglePassCpu(arch, "float32", m, threads=2) as step:
        step(params, pixels, None, labels)
        times = []
        cpu = time.process_time()
        for _ in range(int(sys.argv[3])):
            t = time.perf_counter()
            step(params, pixels, None, labels)
            times.append((time.perf_counter() - t) * 1e3)
            time.sleep(0.002)  # the training loop's own work between steps, while the workers idle
        cpu = (time.process_time() - cpu) * 1e3 / len(times)
    print(json.dumps({"layer": numba.threading_layer(), "ms": times, "cpu_ms_per_step": cpu}))
""")


def contention(m: int, calls: int) -> list[dict[str, Any]]:
    """2-thread steps per threading layer (OpenMP with its default wait policy and with OMP_WAIT_POLICY=active, set
    in the child's environment; Numba's workqueue), alone and while one or two busy processes spin."""
    results = []
    for spinners in (0, 1, 2):
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(spinners)]
        try:
            for layer, policy in (("omp", None), ("omp", "active"), ("workqueue", None)):
                env = dict(os.environ, **({"OMP_WAIT_POLICY": policy} if policy else {}))
                out = subprocess.run([sys.executable, "-c", _LAYER_CHILD, layer, str(m), str(calls)], check=True,
                                     capture_output=True, text=True, env=env).stdout
                row = {"busy_processes": spinners, "wait_policy": policy or "default", **json.loads(out)}
                results.append(row)
                click.echo(f"{row['layer']:9s} wait policy {row['wait_policy']:7s} busy processes {spinners}: min "
                           f"{min(row['ms']):.2f} median {statistics.median(row['ms']):.2f} max {max(row['ms']):.2f} "
                           f"ms; CPU time per step (2 ms pause after each) {row['cpu_ms_per_step']:.1f} ms")
        finally:
            for process in busy:
                process.kill()
                process.wait()
    return results


def load(data_dir: Path | None, m: int) -> tuple[np.ndarray, np.ndarray, str]:
    if data_dir is not None:
        from gpunn.data import load_idx_dir

        data = load_idx_dir(data_dir)
        return data.train_images[:m], data.train_labels[:m].astype(np.int64), f"MNIST from {data_dir}"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(m, 784), dtype=np.uint8)
    images[images < 205] = 0  # about MNIST's 19 % of nonzero pixels, so that skipping has MNIST's share to skip
    return images, rng.integers(0, 10, size=m).astype(np.int64), "synthetic (uint8, 19 % nonzero, labels 0-9)"


def environment(threads: int) -> dict[str, Any]:
    return {"cpu": diagnostics.cpu_model(), "cores": diagnostics.usable_cores(), "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__,
            "threading_layer": numba_cpu.threading_layer(), "threads": threads,
            "compiled_for": f"{numba.config.CPU_NAME or 'this CPU'}, "
                            f"{numba_narrow.vector_bits()}-bit vectors",
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", type=click.Path(path_type=Path), help="MNIST IDX directory; default: synthetic pixels.")
@click.option("--m", "m", type=click.IntRange(min=16), default=60000, show_default=True)
@click.option("--hidden", default="10,64,256", show_default=True, help="float32 hidden sizes, comma-separated.")
@click.option("--f64-hidden", default="10", show_default=True, help="float64 hidden sizes ('' for none).")
@click.option("--rounds", type=click.IntRange(min=1), default=9, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="Threads for the parallel implementations.")
@click.option("--pause", type=click.FloatRange(min=0), default=0.25, show_default=True,
              help="Seconds of rest before each step (lets other implementations' spinning threads sleep).")
@click.option("--steps", type=click.IntRange(min=1), default=1, show_default=True,
              help="Timed steps per slot; above 1, after an untimed one (warm steps, as in training).")
@click.option("--only", default="numba-sparse,numba-dense,numba-unsorted,numba-wide,fused-cpu,generic,numpy",
              show_default=True)
@click.option("--compile-times", is_flag=True, help="Measure cold compile and cache load instead.")
@click.option("--contention", is_flag=True, help="Compare threading layers with and without a busy process.")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
@click.option("--name", help="Write NAME.md and NAME.json under --out-dir (default: print only).")
def main(data_dir, m, hidden, f64_hidden, rounds, threads, pause, steps, only, compile_times, contention, out_dir,
         name) -> None:
    """Time the single pass against the other implementations of one step, interleaved."""
    # the instruction set Numba compiles for is part of the command where the environment names one
    target = [f"{var}={os.environ[var]}" for var in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES") if var in os.environ]
    result: dict[str, Any] = {"name": name or "", "command": " ".join([*target, "python", *sys.argv])}
    if compile_times:
        result["compile"] = globals()["compile_times"]()
    elif contention:
        result["contention"] = globals()["contention"](min(m, 60000), 20)
    else:
        images, labels, data = load(data_dir, m)
        result.update(data=data, m=len(labels), rounds=rounds, steps=steps)
        threads_used = numba_cpu.threads_for(len(labels), 16, threads)
        rows = measure(images, labels, [int(h) for h in hidden.split(",")], ["float32", "float64"], rounds,
                       threads, only.split(","), [int(h) for h in f64_hidden.split(",") if h], pause, steps)
        result.update(rows=rows, pause_s=pause, environment=environment(threads_used))
    if name:
        out_dir.mkdir(parents=True, exist_ok=True)
        Path(out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        if "rows" in result:
            Path(out_dir / f"{name}.md").write_text(markdown(result))
        click.echo(f"wrote {out_dir / name}.json" + (f" and {name}.md" if "rows" in result else ""))


if __name__ == "__main__":
    main()
